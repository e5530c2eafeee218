//! The `tollgate` command: CLI → config → start actors → servers. Admin subcommands call the
//! admin API of a running gateway.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tollgate::config;

/// jemalloc instead of the C library's allocator: the ledger writer frees what the HTTP workers
/// allocated (each settled record), and glibc's per-thread arenas made that a third of the
/// writer's time (see docs/performance.md, "The allocator").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "OpenAI-compatible LLM gateway with live metering, exact wallets and a route ledger"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Args, Clone)]
struct AdminArgs {
    /// Admin API base URL (default: http://<server.admin_listen of --config>).
    #[arg(long, global = true)]
    admin_url: Option<String>,
    /// Admin token (default: $TOLLGATE_ADMIN_TOKEN, else the config's inline admin_token).
    #[arg(long, global = true)]
    admin_token: Option<String>,
    /// Config file used to find the admin listener and token.
    #[arg(long, global = true, default_value = "config/default.toml")]
    config: PathBuf,
}

impl AdminArgs {
    /// One admin API call, printed; the exit code says how it went.
    fn call(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> ExitCode {
        tollgate::api::cli::run(
            &self.admin_url,
            &self.admin_token,
            &self.config,
            method,
            path,
            body,
        )
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        #[arg(long, default_value = "config/default.toml")]
        config: PathBuf,
    },
    /// Validate a config file: one line per problem, exit 1 if any.
    CheckConfig { file: PathBuf },
    /// Run the OpenAI-compatible mock upstream (fault injection via x-mock-fault).
    MockUpstream {
        #[arg(long, default_value = "127.0.0.1:8090")]
        listen: String,
        #[command(flatten)]
        opts: tollgate::mock::MockOptions,
    },
    /// Manage API keys through the admin API.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Wallet top-ups and balances through the admin API.
    Wallet {
        #[command(subcommand)]
        action: WalletAction,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Ledger export through the admin API.
    Ledger {
        #[command(subcommand)]
        action: LedgerAction,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand)]
enum KeysAction {
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        workspace: Option<String>,
        #[arg(long)]
        project: Option<String>,
        #[arg(long, value_delimiter = ',')]
        models: Option<Vec<String>>,
        #[arg(long, value_delimiter = ',')]
        buckets: Option<Vec<String>>,
        #[arg(long)]
        allow_cross_bucket_fallback: bool,
    },
    List,
    Revoke {
        id: String,
    },
}

#[derive(Subcommand)]
enum WalletAction {
    Topup {
        key_id: String,
        #[arg(long)]
        bucket: String,
        #[arg(long)]
        amount: String,
        #[arg(long)]
        reference: Option<String>,
    },
    Show {
        key_id: String,
    },
}

#[derive(Subcommand)]
enum LedgerAction {
    Export {
        #[arg(long, default_value = "jsonl")]
        format: String,
        #[arg(long)]
        key_id: Option<String>,
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
    },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,actix_server=warn,sled=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve {
        config: PathBuf::from("config/default.toml"),
    });
    match command {
        Command::CheckConfig { file } => match config::load_file(&file) {
            Ok(c) => {
                for w in c.warnings() {
                    eprintln!("warning: {w}");
                }
                println!(
                    "{}: ok ({} buckets, {} providers, {} models, {} routes, {} keys)",
                    file.display(),
                    c.buckets.len(),
                    c.providers.len(),
                    c.models.len(),
                    c.routes().count(),
                    c.keys.len()
                );
                ExitCode::SUCCESS
            }
            Err(problems) => {
                for p in &problems.0 {
                    println!("{p}");
                }
                ExitCode::from(1)
            }
        },
        Command::Serve { config: path } => {
            init_logging();
            let cfg = match config::load_file(&path) {
                Ok(c) => c,
                Err(problems) => {
                    eprintln!("{}: invalid configuration:", path.display());
                    for p in &problems.0 {
                        eprintln!("  {p}");
                    }
                    return ExitCode::from(1);
                }
            };
            for w in cfg.warnings() {
                tracing::warn!("{w}");
            }
            let sys = actix_web::rt::System::new();
            match sys.block_on(tollgate::app::serve(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tollgate: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::MockUpstream { listen, opts } => {
            init_logging();
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("tollgate mock-upstream: {e}");
                    return ExitCode::from(1);
                }
            };
            let r = rt.block_on(async move {
                // Loopback only (R44): refused before anything is bound.
                for addr in tokio::net::lookup_host(&listen).await? {
                    if !addr.ip().is_loopback() {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidInput,
                            format!("--listen {listen}: {addr} is not a loopback address (the mock listens on 127.0.0.1 or ::1 only)"),
                        ));
                    }
                }
                let listener = tokio::net::TcpListener::bind(&listen).await?;
                println!(
                    "mock upstream listening on http://{}",
                    listener.local_addr()?
                );
                tollgate::mock::serve(listener, opts, async {
                    let _ = tokio::signal::ctrl_c().await;
                })
                .await
            });
            match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tollgate mock-upstream: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Keys { action, admin } => {
            let (method, path, body) = match action {
                KeysAction::Create {
                    name,
                    workspace,
                    project,
                    models,
                    buckets,
                    allow_cross_bucket_fallback,
                } => (
                    "POST",
                    "/admin/keys".to_string(),
                    Some(
                        serde_json::json!({"name": name, "workspace": workspace, "project": project, "models": models, "buckets": buckets, "allow_cross_bucket_fallback": allow_cross_bucket_fallback}),
                    ),
                ),
                KeysAction::List => ("GET", "/admin/keys".to_string(), None),
                KeysAction::Revoke { id } => ("DELETE", format!("/admin/keys/{id}"), None),
            };
            admin.call(method, &path, body)
        }
        Command::Wallet { action, admin } => {
            let (method, path, body) = match action {
                WalletAction::Topup {
                    key_id,
                    bucket,
                    amount,
                    reference,
                } => (
                    "POST",
                    format!("/admin/keys/{key_id}/topup"),
                    Some(
                        serde_json::json!({"bucket": bucket, "amount": amount, "reference": reference}),
                    ),
                ),
                WalletAction::Show { key_id } => {
                    ("GET", format!("/admin/keys/{key_id}/wallet"), None)
                }
            };
            admin.call(method, &path, body)
        }
        Command::Ledger { action, admin } => {
            let LedgerAction::Export {
                format,
                key_id,
                since,
                until,
            } = action;
            let mut q = vec![format!("format={format}")];
            for (k, v) in [("key_id", key_id), ("since", since), ("until", until)] {
                if let Some(v) = v {
                    // Percent-encoded, so that a `+01:00` offset is not read as a space.
                    let v: String = v
                        .bytes()
                        .map(|b| match b {
                            b'A'..=b'Z'
                            | b'a'..=b'z'
                            | b'0'..=b'9'
                            | b'-'
                            | b'.'
                            | b'_'
                            | b'~'
                            | b':' => char::from(b).to_string(),
                            _ => format!("%{b:02X}"),
                        })
                        .collect();
                    q.push(format!("{k}={v}"));
                }
            }
            let path = format!("/admin/ledger/export?{}", q.join("&"));
            admin.call("GET", &path, None)
        }
    }
}
