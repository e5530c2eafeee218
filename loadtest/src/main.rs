//! tollgate-loadtest: runs a scenario file against any OpenAI-compatible endpoint (`--base-url`,
//! `--key`), optionally side by side with the mock upstream directly (`--direct-url`) and with a
//! plain reverse proxy in front of it (`--proxy-url`, `--proxy-pid`: the yardstick, reported as
//! gateway ÷ proxy), measures SSE timing in HDR histograms, reads the gateway process's cost from
//! `/proc` (`--gateway-pid`), checks tollgate's money invariants (`--verify-ledger`), and writes
//! JSON, Markdown and SVG. A fleet is several `--base-url`s (requests round robin), `--gateway-pid`s (cost summed) and
//! `--admin-url`s (each must show the same wallet), with `--pg-url` for the database's
//! transactions per request. It starts nothing itself; `loadtest/run.sh` starts a mock and a
//! gateway for the standard runs, `loadtest/fleet.sh` a database and three instances.

mod admin;
mod client;
mod dbstat;
mod procstat;
mod report;
mod runner;
mod scenario;
mod stats;
mod verify;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;

use crate::admin::Admin;
use crate::client::{build_client, send, Target};
use crate::report::Report;
use crate::runner::Runner;
use crate::scenario::Scenario;
use crate::verify::ClientSide;

#[derive(Debug, Parser)]
#[command(name = "tollgate-loadtest", version, about)]
struct Cli {
    /// Scenario file (see loadtest/scenarios/).
    #[arg(long)]
    scenario: PathBuf,
    /// OpenAI base URL of the endpoint under test, e.g. http://127.0.0.1:8080/v1. Repeat it for
    /// the instances of a fleet: requests go to them round robin.
    #[arg(long, required = true)]
    base_url: Vec<String>,
    /// API key for --base-url (sent as a bearer token).
    #[arg(long, env = "LOADTEST_KEY")]
    key: Option<String>,
    /// OpenAI base URL of the mock upstream, for the side-by-side comparison.
    #[arg(long)]
    direct_url: Option<String>,
    /// OpenAI base URL of a plain reverse proxy in front of the mock (the yardstick, e.g. nginx
    /// with `proxy_pass`): run side by side too, and the report gives gateway ÷ proxy.
    #[arg(long)]
    proxy_url: Option<String>,
    /// PID of the proxy's processes (e.g. nginx's master and worker), for its CPU and RSS.
    /// Repeatable (summed).
    #[arg(long)]
    proxy_pid: Vec<u32>,
    /// Mock control URLs as NAME=URL (e.g. primary=http://127.0.0.1:9101), for `POST
    /// /_mock/options` before each round and for its token counters. Repeatable.
    #[arg(long = "mock", value_parser = parse_mock)]
    mocks: Vec<(String, String)>,
    /// tollgate admin API, for --verify-ledger and scenario keys. Repeat it for a fleet: the
    /// first creates keys and reads the ledger, and every one must show the same wallet.
    #[arg(long)]
    admin_url: Vec<String>,
    #[arg(long, env = "TOLLGATE_ADMIN_TOKEN")]
    admin_token: Option<String>,
    /// After the run, check the money invariants through the admin API.
    #[arg(long)]
    verify_ledger: bool,
    /// The key to verify (default: found from a warm-up request's ledger record).
    #[arg(long)]
    key_id: Option<String>,
    /// PID of the gateway process, for CPU and RSS from /proc. Repeat it for a fleet (summed).
    #[arg(long)]
    gateway_pid: Vec<u32>,
    /// The fleet's PostgreSQL URL: the database's transactions per request (read with psql).
    #[arg(long)]
    pg_url: Option<String>,
    /// Directory for <name>.json, <name>.md and <name>.svg.
    #[arg(long, default_value = "loadtest/results")]
    out: PathBuf,
    /// Base name of the result files (default: the scenario's name).
    #[arg(long)]
    name: Option<String>,
    /// Scale every phase's request count and duration (e.g. 0.2 for a quick run).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Load-generator threads (1: a current-thread runtime).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// No progress bar (one line per round on stderr instead).
    #[arg(long)]
    no_progress: bool,
}

fn parse_mock(raw: &str) -> Result<(String, String), String> {
    match raw.split_once('=') {
        Some((name, url)) if !name.is_empty() && !url.is_empty() => {
            Ok((name.to_string(), url.to_string()))
        }
        _ => Err(format!("expected NAME=URL, got {raw:?}")),
    }
}

fn main() {
    let cli = Cli::parse();
    let runtime = if cli.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cli.threads)
            .enable_all()
            .build()
    };
    let code = match runtime {
        Ok(rt) => match rt.block_on(run(cli)) {
            Ok(passed) => i32::from(!passed),
            Err(e) => {
                eprintln!("tollgate-loadtest: {e}");
                2
            }
        },
        Err(e) => {
            eprintln!("tollgate-loadtest: cannot start the runtime: {e}");
            2
        }
    };
    std::process::exit(code);
}

fn conditions() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    // The machine's cores, not this process's share (run.sh pins the load client to some).
    let cores = std::fs::read_to_string("/proc/cpuinfo")
        .map(|t| t.lines().filter(|l| l.starts_with("processor")).count())
        .unwrap_or(0);
    let mine = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!(
        "{cores} cores ({mine} for the load client), loadavg {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )
}

/// Runs the scenario; Ok(false) when the ledger verification failed.
async fn run(cli: Cli) -> Result<bool, String> {
    let mut scenario = Scenario::load(&cli.scenario)?;
    if cli.scale != 1.0 {
        if cli.scale.is_nan() || cli.scale <= 0.0 {
            return Err("--scale must be above 0".into());
        }
        for p in &mut scenario.phases {
            p.requests = ((p.requests as f64 * cli.scale).ceil() as u64).max(1);
            p.duration_s *= cli.scale;
            p.warmup_s *= cli.scale;
            for e in &mut p.events {
                e.at_s *= cli.scale;
            }
        }
    }
    let max_conc = scenario
        .phases
        .iter()
        .map(|p| {
            p.concurrency
                .max(p.max_in_flight.min(p.rate.ceil() as u32 * 10))
        })
        .max()
        .unwrap_or(64) as usize;
    let client = build_client(max_conc.max(16));
    let admins: Vec<Admin> = match &cli.admin_token {
        Some(token) => cli
            .admin_url
            .iter()
            .map(|url| Admin {
                url: url.clone(),
                token: token.clone(),
            })
            .collect(),
        None if !cli.admin_url.is_empty() => return Err("--admin-url needs --admin-token".into()),
        None => Vec::new(),
    };
    let admin = admins.first().cloned();
    if cli.verify_ledger && admin.is_none() {
        return Err("--verify-ledger needs --admin-url and --admin-token".into());
    }
    let mut key = cli.key.clone();
    let mut key_id = cli.key_id.clone();
    if let Some(setup) = &scenario.key {
        let Some(admin) = &admin else {
            return Err(format!(
                "scenario {} creates a key: give --admin-url and --admin-token",
                scenario.name
            ));
        };
        let (id, secret) = admin
            .create_funded_key(&client, &setup.name, &setup.topup)
            .await?;
        eprintln!("created key {id} ({}) funded {:?}", setup.name, setup.topup);
        key = Some(secret);
        key_id = Some(id);
    }
    let endpoint = scenario.request.endpoint;
    let gateway = Target::fleet("gateway", &cli.base_url, key.as_deref(), endpoint)?;
    let direct = match &cli.direct_url {
        Some(u) => Some(Target::new("direct", u, None, endpoint)?),
        None => None,
    };
    let proxy = match &cli.proxy_url {
        Some(u) => Some(Target::new("proxy", u, None, endpoint)?),
        None => None,
    };

    // The ledger window starts after a quiescent wallet snapshot.
    let mut ledger_start = None;
    if cli.verify_ledger {
        if let Some(admin) = &admin {
            let id = match key_id.clone() {
                Some(id) => id,
                None => {
                    let warm = send(
                        &client,
                        &gateway,
                        scenario.body(scenario.model_for(0)),
                        Instant::now(),
                        Instant::now(),
                        Duration::from_secs(30),
                    )
                    .await;
                    let rid = warm.request_id.ok_or_else(|| {
                        format!(
                            "warm-up request gave no x-tollgate-request-id ({:?}); pass --key-id",
                            warm.error
                        )
                    })?;
                    admin.key_of_request(&client, &rid).await?
                }
            };
            let before = admin
                .quiescent_wallet(&client, &id, Duration::from_secs(10))
                .await?;
            // Ledger times have millisecond precision; start the window just after the snapshot.
            tokio::time::sleep(Duration::from_millis(5)).await;
            let since = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            ledger_start = Some((id, before, since));
        }
    }

    let started_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let before_conditions = conditions();
    let runner = Runner {
        scenario: scenario.clone(),
        client: client.clone(),
        gateway,
        direct,
        proxy,
        mocks: cli.mocks.clone(),
        gateway_pids: cli.gateway_pid.clone(),
        proxy_pids: cli.proxy_pid.clone(),
        pg_url: cli.pg_url.clone(),
        progress: !cli.no_progress,
    };
    let run_start = Instant::now();
    let runs = runner.run(run_start).await?;
    // Leave the mocks as the scenario's base options found them (no fault left behind).
    for (_, url) in &cli.mocks {
        let reset = scenario::MockSettings {
            fault: Some("none".into()),
            ..scenario.mock.clone()
        };
        if let Err(e) = admin::set_mock_options(&client, url, &reset).await {
            eprintln!("warning: {e}");
        }
    }

    let verify = match (&admin, ledger_start) {
        (Some(admin), Some((id, before, since))) => {
            let after = admin
                .quiescent_wallet(&client, &id, Duration::from_secs(15))
                .await?;
            let records = admin.ledger_since(&client, &id, &since).await?;
            let mut side = ClientSide::default();
            for r in &runs {
                let g = &r.gateway.totals;
                side.requests += g.requests;
                side.unsent += g.unsent;
                side.completed += g.ok;
                side.completed_tokens += g.ok_tokens;
                side.usage_mismatches += g.usage_mismatches;
                side.mock_tokens = match (side.mock_tokens, r.mock_tokens) {
                    (Some(a), Some(b)) => Some(a + b),
                    (None, b) => b,
                    (a, None) => a,
                };
            }
            let mut report = verify::verify(&id, &before, &after, &records, &side)?;
            if admins.len() > 1 {
                let mut views = Vec::new();
                for a in &admins {
                    views.push((a.url.clone(), a.wallet(&client, &id).await?));
                }
                report.add(verify::same_everywhere(&views));
            }
            Some(report)
        }
        _ => None,
    };

    let report = Report {
        tool: "tollgate-loadtest",
        version: env!("CARGO_PKG_VERSION"),
        started_at,
        base_url: cli.base_url.join(" "),
        direct_url: cli.direct_url.clone().filter(|_| scenario.compare),
        proxy_url: cli.proxy_url.clone().filter(|_| scenario.compare),
        conditions: format!("{before_conditions} (before), {} (after)", conditions()),
        phases: runs.iter().map(report::phase_report).collect(),
        verify,
        scenario,
    };
    let name = cli
        .name
        .clone()
        .unwrap_or_else(|| report.scenario.name.clone());
    std::fs::create_dir_all(&cli.out).map_err(|e| format!("{}: {e}", cli.out.display()))?;
    let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
    let md = report::markdown(&report);
    for (ext, text) in [
        ("json", json),
        ("md", md.clone()),
        ("svg", report::svg(&report)),
    ] {
        let path = cli.out.join(format!("{name}.{ext}"));
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    println!("{md}");
    eprintln!("wrote {}/{name}.{{json,md,svg}}", cli.out.display());
    Ok(report.verify.as_ref().is_none_or(|v| v.passed))
}
