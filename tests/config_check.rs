//! `tollgate check-config FILE` (R35–R36): every problem in one run, one line each,
//! prefixed by its key path; and `serve` refusing to start on an unset `api_key_env`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs the binary with `args`, killing it if it has not exited within 20 s.
fn run(args: &[&str], envs: &[(&str, Option<&str>)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    cmd.args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tollgate {args:?} did not exit within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_end(&mut stderr)
        .unwrap();
    Output {
        status,
        stdout,
        stderr,
    }
}

fn check(path: &Path) -> (Option<i32>, Vec<String>, String) {
    let out = run(&["check-config", path.to_str().unwrap()], &[]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    (
        out.status.code(),
        stdout.lines().map(str::to_string).collect(),
        stderr,
    )
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

const VALID: &str = r#"
[server]
listen = "127.0.0.1:18080"
admin_listen = "127.0.0.1:18081"
admin_token = "an-admin-token"
data_dir = "./data"

[buckets.credit]
currency = "USD"
kind = "official"

[buckets.routed]
currency = "CNY"
kind = "routed"

[[providers]]
id = "openai"
base_url = "https://api.openai.com/v1"
api_key_env = "OPENAI_API_KEY"

[[providers]]
id = "demo"
kind = "mock"
listen = "127.0.0.1:0"

[[models]]
name = "m"
routes = [
  { provider = "openai", upstream_model = "up", bucket = "credit", input_per_mtok = "0.15", output_per_mtok = 0.6 },
  { provider = "demo", upstream_model = "up", bucket = "routed", input_per_mtok = 1, output_per_mtok = "2" },
]

[[models]]
name = "e"
endpoints = ["embeddings"]
routes = [
  { provider = "demo", upstream_model = "emb", bucket = "credit", input_per_mtok = "0.02", output_per_mtok = "0" },
]

[[keys]]
name = "demo"
secret = "tg-demo-0123456789"
topup = { credit = "5.00" }
"#;

#[test]
fn valid_file_passes_with_a_summary() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "ok.toml", VALID);
    let (code, lines, stderr) = check(&p);
    assert_eq!(code, Some(0), "{lines:?} {stderr}");
    assert_eq!(
        lines,
        [format!(
            "{}: ok (2 buckets, 2 providers, 2 models, 3 routes, 1 keys)",
            p.display()
        )]
    );
}

#[test]
fn shipped_default_config_passes() {
    // Integration tests run from the package directory.
    let p = Path::new("config/default.toml");
    let (code, lines, stderr) = check(p);
    assert_eq!(code, Some(0), "{lines:?} {stderr}");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with(&format!("{}: ok (", p.display())),
        "{lines:?}"
    );
}

#[test]
fn every_problem_is_reported_once_with_its_key_path() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        &dir,
        "bad.toml",
        r#"
colour = "blue"

[server]
listen = "localhost:80"
admin_listen = "127.0.0.1:18081"
admin_token = "an-admin-token"
admin_token_env = "TOLLGATE_ADMIN_TOKEN"

[buckets.credit]
currency = "USD"

[[providers]]
id = "real"
kind = "http"

[[providers]]
id = "mock1"
kind = "mock"

[[models]]
name = "m"
routes = [
  { provider = "mock1", upstream_model = "u", bucket = "credit", input_per_mtok = "1", output_per_mtok = "2" },
  { provider = "nope", upstream_model = "u", bucket = "credit", input_per_mtok = "1", output_per_mtok = "2" },
  { provider = "mock1", upstream_model = "u", bucket = "missing", input_per_mtok = "-1", output_per_mtok = "2" },
]
"#,
    );
    let (code, lines, stderr) = check(&p);
    assert_eq!(code, Some(1), "{lines:?} {stderr}");
    assert_eq!(
        lines,
        [
            "colour: unknown key (expected one of: server, settlement, ledger, routing, store, buckets, providers, models, keys)",
            "server.listen: \"localhost:80\" is not a listen address (expected IP:PORT, e.g. \"127.0.0.1:8080\")",
            "server.admin_token: set either admin_token or admin_token_env, not both",
            "providers[0].base_url: missing (required for providers that are not kind \"mock\")",
            "models[0].routes[1].provider: unknown provider \"nope\" (declare it under [[providers]])",
            "models[0].routes[2].bucket: unknown bucket \"missing\" (declare it as [buckets.missing])",
            "models[0].routes[2].input_per_mtok: must not be negative (got -1)",
            "models[0].routes[2].id: duplicate route id \"m/mock1\" (set a distinct id on one of them)",
        ]
    );
}

#[test]
fn missing_required_fields_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        &dir,
        "missing.toml",
        r#"
[server]
admin_token = "an-admin-token"

[buckets.credit]
kind = "official"

[buckets.routed]
currency = "CNY"

[[providers]]
kind = "mock"

[[providers]]
id = "p"
kind = "mock"

[[models]]
name = "a"

[[models]]
name = "b"
routes = [
  { provider = "p", bucket = "routed", output_per_mtok = "2" },
  { id = "b/explicit", provider = "p", upstream_model = "u", bucket = "routed", input_per_mtok = "1", output_per_mtok = "2" },
  { id = "b/explicit", provider = "p", upstream_model = "u", bucket = "routed", input_per_mtok = "1", output_per_mtok = "2" },
]
"#,
    );
    let (code, lines, stderr) = check(&p);
    assert_eq!(code, Some(1), "{lines:?} {stderr}");
    assert_eq!(
        lines,
        [
            "buckets.credit.currency: missing (required)",
            "providers[0].id: missing (required)",
            "models[0].routes: missing (required)",
            "models[1].routes[0].upstream_model: missing (required)",
            "models[1].routes[0].input_per_mtok: missing (required)",
            "models[1].routes[2].id: duplicate route id \"b/explicit\" (set a distinct id on one of them)",
        ]
    );
}

#[test]
fn toml_syntax_error_is_one_line_with_its_line_number() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        &dir,
        "syntax.toml",
        "[server]\nadmin_token = \"t-0123456789\"\nlisten = \"127.0.0.1:8080\n\n[buckets.credit]\ncurrency = \"USD\"\n",
    );
    let (code, lines, stderr) = check(&p);
    assert_eq!(code, Some(1), "{lines:?} {stderr}");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].starts_with("line 3: "), "{lines:?}");

    let p = write(
        &dir,
        "syntax2.toml",
        "[server]\nadmin_token = \"t-0123456789\"\n\n\n[buckets.credit]\ncurrency = = \"USD\"\n",
    );
    let (code, lines, _) = check(&p);
    assert_eq!(code, Some(1));
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].starts_with("line 6: "), "{lines:?}");

    // A file that does not exist is one line too, naming the path.
    let missing = dir.path().join("absent.toml");
    let (code, lines, _) = check(&missing);
    assert_eq!(code, Some(1));
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with(&format!("{}: cannot read", missing.display())),
        "{lines:?}"
    );
}

#[test]
fn serve_refuses_an_unset_provider_key_variable() {
    const VAR: &str = "TOLLGATE_TEST_UNSET_PROVIDER_KEY_7F3A";
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        r#"
[server]
listen = "127.0.0.1:{}"
admin_listen = "127.0.0.1:{}"
admin_token = "an-admin-token"
data_dir = "{}"

[buckets.credit]
currency = "USD"

[[providers]]
id = "remote"
base_url = "http://127.0.0.1:9/v1"
api_key_env = "{VAR}"

[[models]]
name = "m"
routes = [
  {{ provider = "remote", upstream_model = "u", bucket = "credit", input_per_mtok = "1", output_per_mtok = "2" }},
]
"#,
        free_port(),
        free_port(),
        dir.path().join("data").display()
    );
    let p = write(&dir, "serve.toml", &cfg);
    // check-config alone accepts it: the variable is read at start-up.
    let (code, lines, _) = check(&p);
    assert_eq!(code, Some(0), "{lines:?}");

    let out = run(&["serve", "--config", p.to_str().unwrap()], &[(VAR, None)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "serve started without {VAR}: {stdout} {stderr}"
    );
    assert!(stderr.contains(VAR), "stderr does not name {VAR}: {stderr}");

    // An empty variable counts as unset.
    let out = run(
        &["serve", "--config", p.to_str().unwrap()],
        &[(VAR, Some(""))],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(VAR), "{stderr}");
}

#[test]
fn durations_are_bounded_and_mock_listeners_are_loopback_only() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        &dir,
        "bounds.toml",
        r#"
[server]
admin_token = "an-admin-token"
client_request_timeout_ms = 0
client_idle_timeout_s = 9223372036854775807
shutdown_drain_s = 86401

[settlement]
flush_interval_ms = 86400001
wallet_idle_s = 9223372036854775807

[buckets.credit]
currency = "USD"

[[providers]]
id = "remote"
base_url = "https://api.example.com/v1"
connect_timeout_ms = 9223372036854775807
first_token_timeout_ms = 86400000
idle_timeout_ms = 86400001
circuit = { window_s = 86401, open_ms = 86400001, max_open_ms = 86400002 }
probe = { interval_ms = 86400001 }

[[providers]]
id = "wide"
kind = "mock"
listen = "0.0.0.0:8090"
mock = { ttft_ms = 86400001, interval_ms = 86400001, tokens = 100001 }

[[models]]
name = "m"
retry = { backoff_base_ms = 86400001, backoff_max_ms = 86400002 }
routes = [
  { provider = "remote", upstream_model = "u", bucket = "credit", input_per_mtok = "1", output_per_mtok = "2" },
  { provider = "wide", upstream_model = "u", bucket = "credit", input_per_mtok = "1", output_per_mtok = "2" },
]
"#,
    );
    let (code, lines, stderr) = check(&p);
    assert_eq!(code, Some(1), "{lines:?} {stderr}");
    assert_eq!(
        lines,
        [
            "server.client_idle_timeout_s: must be at most 86400 (24 h)",
            "server.client_request_timeout_ms: must be >= 1",
            "server.shutdown_drain_s: must be at most 86400 (24 h)",
            "settlement.flush_interval_ms: must be at most 86400000 (24 h)",
            "settlement.wallet_idle_s: must be at most 86400 (24 h)",
            "providers[0].connect_timeout_ms: must be at most 86400000 (24 h)",
            "providers[0].idle_timeout_ms: must be at most 86400000 (24 h)",
            "providers[0].circuit.window_s: must be at most 86400 (24 h)",
            "providers[0].circuit.open_ms: must be at most 86400000 (24 h)",
            "providers[0].circuit.max_open_ms: must be at most 86400000 (24 h)",
            "providers[0].probe.interval_ms: must be at most 86400000 (24 h)",
            "providers[1].listen: \"0.0.0.0:8090\" is not a loopback address (a built-in mock listens on 127.0.0.1 or ::1 only)",
            "providers[1].mock.ttft_ms: must be at most 86400000 (24 h)",
            "providers[1].mock.interval_ms: must be at most 86400000 (24 h)",
            "providers[1].mock.tokens: must be at most 100000",
            "models[0].retry.backoff_base_ms: must be at most 86400000 (24 h)",
            "models[0].retry.backoff_max_ms: must be at most 86400000 (24 h)",
        ]
    );
}

#[test]
fn the_standalone_mock_refuses_a_non_loopback_address() {
    let out = run(&["mock-upstream", "--listen", "0.0.0.0:0"], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("loopback"), "{stderr}");
    let out = run(
        &[
            "mock-upstream",
            "--listen",
            "127.0.0.1:0",
            "--tokens",
            "100001",
        ],
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("100000"), "{stderr}");
}

#[test]
fn serve_refuses_an_empty_admin_token_variable() {
    const VAR: &str = "TOLLGATE_TEST_BLANK_ADMIN_TOKEN_5C1D";
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        r#"
[server]
listen = "127.0.0.1:{}"
admin_listen = "127.0.0.1:{}"
admin_token_env = "{VAR}"
data_dir = "{}"

[buckets.credit]
currency = "USD"

[[providers]]
id = "demo"
kind = "mock"

[[models]]
name = "m"
routes = [
  {{ provider = "demo", upstream_model = "u", bucket = "credit", input_per_mtok = "1", output_per_mtok = "2" }},
]
"#,
        free_port(),
        free_port(),
        dir.path().join("data").display()
    );
    let p = write(&dir, "serve.toml", &cfg);
    for blank in [" ", " \t\n"] {
        let out = run(
            &["serve", "--config", p.to_str().unwrap()],
            &[(VAR, Some(blank))],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "started with a blank token: {stderr}"
        );
        assert!(stderr.contains(VAR) && stderr.contains("empty"), "{stderr}");
    }
}
