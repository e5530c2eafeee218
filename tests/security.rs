//! Security checks (issue 8): a provider key never leaks (R26) into client responses, the
//! ledger, metrics, admin views, the log or the data dir; client keys are stored hashed; every
//! admin route needs the admin token; admin routes and `/metrics` are not on the client listener
//! (R34); the data dir is owner-only; and the client API speaks HTTPS with HTTP/2 and HTTP/1.1
//! by ALPN (R1).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

fn http() -> ::reqwest::Client {
    bounded_client(Duration::from_secs(30))
}

/// The fake upstream's behaviours that quote the `Authorization` header they received.
const ECHO_CASES: &[&str] = &[
    "echo-400",
    "echo-400-text",
    "echo-401",
    "echo-500",
    "echo-stream-error",
    "echo-content",
    "echo-header",
];

fn echo_body(base_url: &str) -> String {
    let mut b = format!(
        r#"
[buckets.credit]
currency = "USD"
kind = "official"

[[providers]]
id = "raw"
base_url = "{base_url}"
api_key_env = "TG_TEST_CANARY_KEY"
connect_timeout_ms = 500
first_token_timeout_ms = 2000
idle_timeout_ms = 2000
probe = {{ interval_ms = 200, kind = "models" }}
{NO_BREAKER}
"#
    );
    for case in ECHO_CASES {
        b.push_str(&format!(
            r#"
[[models]]
name = "{case}"
tokenizer = "chunks"
retry = {{ max_retries = 1, backoff_base_ms = 5, backoff_max_ms = 50 }}
routes = [
  {{ provider = "raw", upstream_model = "{case}", bucket = "credit", input_per_mtok = "1", output_per_mtok = "2" }},
]
"#
        ));
    }
    b.push_str(&format!(
        r#"
[[keys]]
name = "demo"
secret = "{DEMO_KEY}"
workspace = "ws"
project = "proj"
topup = {{ credit = "10" }}
"#
    ));
    b
}

/// Every byte of every file under `dir`.
fn all_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        if meta.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        } else if meta.is_file() {
            out.push((p.display().to_string(), std::fs::read(&p).unwrap()));
        }
    }
    out
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn provider_keys_never_leak() {
    let canary = format!("sk-canary-{}", uuid::Uuid::new_v4().simple());
    let fake = fake_upstream::start().await;
    let setup = Setup {
        mocks: vec![],
        body: echo_body(&fake.base_url()),
        data_dir: None,
    };
    let extra = Extra {
        env: vec![("TG_TEST_CANARY_KEY".into(), canary.clone())],
        ..Extra::default()
    };
    let g = tokio::task::spawn_blocking(move || Gateway::start_extra(setup, extra))
        .await
        .unwrap();

    // Client responses: status, every header, the whole body.
    let mut seen = String::new();
    let mut request_ids = Vec::new();
    for case in ECHO_CASES {
        for stream in [true, false] {
            let mut body = json!({"model": case, "stream": stream,
                "messages": [{"role": "user", "content": "hi"}]});
            if stream {
                body["stream_options"] = json!({"include_usage": true});
            }
            let r = http()
                .post(g.chat_url())
                .bearer_auth(DEMO_KEY)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = r.status();
            let mut text = format!("{case} stream={stream}: {status}\n");
            for (k, v) in r.headers() {
                text.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
            }
            if let Some(id) = r.headers().get("x-tollgate-request-id") {
                request_ids.push(id.to_str().unwrap().to_string());
            }
            text.push_str(&r.text().await.unwrap());
            eprintln!("{}", text.chars().take(600).collect::<String>());
            seen.push_str(&text);
            seen.push('\n');
        }
    }
    // The upstream did echo the key, and the gateway redacted it.
    assert!(
        seen.contains("[redacted]"),
        "no echo reached the client:\n{seen}"
    );
    assert!(
        !seen.contains(&canary),
        "the provider key leaked to a client:\n{seen}"
    );

    // Let probes run and fail (quoting the key) so that routes and catalog carry a failure.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let admin = |path: &str| {
        let url = format!("{}{}", g.admin_url, path);
        async move {
            let r = http()
                .get(url)
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .unwrap();
            let mut text = String::new();
            for (k, v) in r.headers() {
                text.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
            }
            text.push_str(&r.text().await.unwrap());
            text
        }
    };
    let mut places = vec![
        ("/metrics".to_string(), admin("/metrics").await),
        ("/admin/routes".into(), admin("/admin/routes").await),
        ("/admin/catalog".into(), admin("/admin/catalog").await),
        ("/admin/keys".into(), admin("/admin/keys").await),
        ("/admin/usage".into(), admin("/admin/usage").await),
        (
            "/admin/ledger/export?format=jsonl".into(),
            admin("/admin/ledger/export?format=jsonl").await,
        ),
        (
            "/admin/ledger/export?format=csv".into(),
            admin("/admin/ledger/export?format=csv").await,
        ),
    ];
    let key_id = g.demo_key_id().await;
    let recs = g.assert_invariant1(&key_id, &[("credit", "10")]).await;
    assert!(recs.len() >= ECHO_CASES.len() * 2, "{recs:?}");
    places.push((
        "/admin/ledger".into(),
        serde_json::to_string(&recs).unwrap(),
    ));
    for id in &request_ids {
        let path = format!("/admin/ledger/{id}");
        let text = admin(&path).await;
        places.push((path, text));
    }
    let (_, routes) = g.admin_get("/admin/routes").await;
    assert!(
        routes["routes"][0]["last_failure"].is_object()
            || routes["routes"][0]["last_probe"].is_object(),
        "probes should have run: {routes}"
    );
    places.push(("gateway log".into(), g.log()));
    for (place, text) in &places {
        assert!(
            !text.contains(&canary),
            "the provider key leaked into {place}:\n{text}"
        );
    }
    // Nor in any file of the data dir (ledger records, wallet state).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for (file, bytes) in all_bytes(&g.dir.path().join("data")) {
        assert!(!contains(&bytes, &canary), "the provider key is in {file}");
    }
    g.assert_no_panic();
    drop(fake);
}

/// Every admin route, with a method that it serves.
fn admin_routes(key_id: &str, request_id: &str) -> Vec<(&'static str, String)> {
    vec![
        ("GET", "/admin/keys".into()),
        ("POST", "/admin/keys".into()),
        ("GET", format!("/admin/keys/{key_id}")),
        ("DELETE", format!("/admin/keys/{key_id}")),
        ("POST", format!("/admin/keys/{key_id}/topup")),
        ("GET", format!("/admin/keys/{key_id}/wallet")),
        ("GET", "/admin/ledger".into()),
        ("GET", "/admin/ledger/export".into()),
        ("GET", format!("/admin/ledger/{request_id}")),
        ("GET", "/admin/usage".into()),
        ("GET", "/admin/usage/explain".into()),
        ("GET", "/admin/routes".into()),
        ("GET", "/admin/catalog".into()),
        ("GET", "/admin/nope".into()),
    ]
}

/// Folders 0700 and files 0600 under (and including) `dir`.
fn assert_owner_only(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut stack = vec![dir.to_path_buf()];
    let mut files = 0;
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        let mode = meta.permissions().mode() & 0o777;
        if meta.is_dir() {
            assert_eq!(mode, 0o700, "{} is {mode:o}", p.display());
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        } else {
            files += 1;
            assert_eq!(mode, 0o600, "{} is {mode:o}", p.display());
        }
    }
    assert!(files > 0, "no files under {}", dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_at_rest_admin_auth_and_listeners() {
    let g = Gateway::start(Setup {
        mocks: vec![("p1", ""), ("p2", "")],
        body: standard_body("", "1", "1"),
        data_dir: None,
    });
    let data = g.dir.path().join("data");
    assert_owner_only(&data);

    // Traffic, a key created at run time and a top-up, so the store has records of each kind.
    let r = http()
        .post(g.chat_url())
        .bearer_auth(DEMO_KEY)
        .json(&json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let request_id = r.headers()["x-tollgate-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    let (s, created) = g.admin_post("/admin/keys", json!({"name": "bob"})).await;
    assert_eq!(s, 201, "{created}");
    let secret = created["secret"].as_str().unwrap().to_string();
    let bob = created["id"].as_str().unwrap().to_string();
    let (s, v) = g
        .admin_post(
            &format!("/admin/keys/{bob}/topup"),
            json!({"bucket": "credit", "amount": "1", "reference": "r1"}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let r = http()
        .post(g.chat_url())
        .bearer_auth(&secret)
        .json(&json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let key_id = g.demo_key_id().await;

    // Every admin route refuses a missing or wrong token, before doing anything.
    for (method, path) in admin_routes(&key_id, &request_id) {
        for token in [None, Some("wrong-token"), Some("")] {
            let mut r = http().request(method.parse().unwrap(), format!("{}{path}", g.admin_url));
            if let Some(t) = token {
                r = r.header("authorization", format!("Bearer {t}"));
            }
            let r = r.json(&json!({"bucket": "credit", "amount": "5", "name": "x"}));
            let resp = r.send().await.unwrap();
            assert_eq!(resp.status(), 401, "{method} {path} with {token:?}");
            let v: Value = resp.json().await.unwrap();
            assert_eq!(v["error"]["code"], "invalid_api_key", "{v}");
        }
    }
    // Nothing changed: the key is live and its wallet untouched by the refused top-ups.
    let (_, keys) = g.admin_get("/admin/keys").await;
    assert!(keys.to_string().contains("demo"));
    assert!(keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .all(|k| k["revoked_at"].is_null()));

    // The client listener serves neither `/metrics` nor `/admin/*` (R34), token or not.
    for path in ["/metrics", "/admin/keys", "/admin/ledger", "/admin/routes"] {
        let r = http()
            .get(format!("{}{path}", g.client_url))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path} on the client listener");
    }
    let r = http()
        .get(format!("{}/metrics", g.admin_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Client keys are stored hashed: no secret in any file of the data dir, once flushed.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for (file, bytes) in all_bytes(&data) {
        for s in [DEMO_KEY, secret.as_str(), ADMIN_TOKEN] {
            assert!(!contains(&bytes, s), "{s} is stored in clear in {file}");
        }
    }
    // And the data dir is still owner-only after the store grew.
    assert_owner_only(&data);
    g.assert_no_panic();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_http2_and_http1_by_alpn() {
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert_pem = ck.cert.pem();
    let tmp = tempfile::tempdir().unwrap();
    let cert = tmp.path().join("cert.pem");
    let key = tmp.path().join("key.pem");
    std::fs::write(&cert, &cert_pem).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    let setup = Setup {
        mocks: vec![("p1", ""), ("p2", "")],
        body: standard_body("", "1", "1"),
        data_dir: None,
    };
    let extra = Extra {
        server: format!(
            "tls = {{ cert = \"{}\", key = \"{}\" }}",
            cert.display(),
            key.display()
        ),
        tls: true,
        ..Extra::default()
    };
    let g = tokio::task::spawn_blocking(move || Gateway::start_extra(setup, extra))
        .await
        .unwrap();
    assert!(g.client_url.starts_with("https://"));
    let root = ::reqwest::Certificate::from_pem(cert_pem.as_bytes()).unwrap();
    let body = json!({"model": "m", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "12345678"}]});
    for h1 in [false, true] {
        let mut b = ::reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(root.clone())
            .timeout(Duration::from_secs(30));
        if h1 {
            b = b.http1_only();
        }
        let client = b.build().unwrap();
        let r = client
            .post(g.chat_url())
            .bearer_auth(DEMO_KEY)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let want = if h1 {
            ::reqwest::Version::HTTP_11
        } else {
            ::reqwest::Version::HTTP_2
        };
        assert_eq!(r.version(), want, "h1_only={h1}");
        assert_eq!(r.headers()["x-tollgate-route"], "m/p1");
        let events = sse_events(r).await;
        assert_eq!(events.last().unwrap(), "[DONE]");
        let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
        assert_eq!(usage["usage"]["completion_tokens"], 8);
        assert_eq!(dec(&usage["tollgate"]["cost"]), "0.000018".parse().unwrap());
    }
    // Plain HTTP on the TLS port is not served.
    let plain = g.client_url.replace("https://", "http://");
    let r = http().get(format!("{plain}/healthz")).send().await;
    assert!(r.map(|r| r.status() != 200).unwrap_or(true));
    let key_id = g.demo_key_id().await;
    g.assert_invariant1(&key_id, &[("credit", "1"), ("routed", "1")])
        .await;
    g.assert_no_panic();
}

/// R42: the ready line names the demo key and where its secret is configured, and no log line
/// (at debug level) carries a key secret, the admin token or a provider key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_is_printed_or_logged() {
    let provider_key = format!("sk-canary-{}", uuid::Uuid::new_v4().simple());
    let setup = Setup {
        mocks: vec![
            ("p1", "api_key_env = \"TG_TEST_MOCK_PROVIDER_KEY\""),
            ("p2", ""),
        ],
        body: standard_body("", "1", "1"),
        data_dir: None,
    };
    let extra = Extra {
        env: vec![
            ("TG_TEST_MOCK_PROVIDER_KEY".into(), provider_key.clone()),
            ("RUST_LOG".into(), "debug".into()),
        ],
        ..Extra::default()
    };
    let g = Gateway::start_extra(setup, extra);
    // Traffic, a key created at run time, a top-up and an admin call, so that every path logs.
    let r = http()
        .post(g.chat_url())
        .bearer_auth(DEMO_KEY)
        .json(
            &json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.text().await.unwrap();
    let (s, created) = g.admin_post("/admin/keys", json!({"name": "bob"})).await;
    assert_eq!(s, 201, "{created}");
    let secret = created["secret"].as_str().unwrap().to_string();
    let key_id = g.demo_key_id().await;
    let (s, v) = g
        .admin_post(
            &format!("/admin/keys/{key_id}/topup"),
            json!({"bucket": "credit", "amount": "1", "reference": "r-log"}),
        )
        .await;
    assert_eq!(s, 200, "{v}");

    let log = g.log();
    let ready = log
        .lines()
        .find(|l| l.starts_with("ready: "))
        .unwrap_or_else(|| panic!("no ready line:\n{log}"));
    assert!(ready.contains("key 'demo'"), "{ready}");
    assert!(
        ready.contains(&g.config_path.display().to_string()),
        "{ready}"
    );
    for s in [
        DEMO_KEY,
        ADMIN_TOKEN,
        provider_key.as_str(),
        secret.as_str(),
    ] {
        assert!(!log.contains(s), "{s} printed:\n{log}");
    }
    g.assert_no_panic();
}

/// The admin token is checked before any request body is read: a request without it is refused
/// at once, even when it announces a body it never sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_is_checked_before_the_body_is_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let g = Gateway::start(Setup {
        mocks: vec![("p1", ""), ("p2", "")],
        body: standard_body("", "1", "1"),
        data_dir: None,
    });
    let key_id = g.demo_key_id().await;
    let addr = g.admin_url.trim_start_matches("http://").to_string();
    for path in [
        "/admin/keys".to_string(),
        format!("/admin/keys/{key_id}/topup"),
    ] {
        for auth in ["", "Authorization: Bearer wrong-token\r\n"] {
            let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let head = format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: 200000\r\n\r\n{{\"name\":"
            );
            s.write_all(head.as_bytes()).await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("{path} {auth:?}: no answer before the body"))
                .unwrap();
            let text = String::from_utf8_lossy(&buf[..n]).to_string();
            assert!(text.starts_with("HTTP/1.1 401"), "{path}: {text}");
            assert!(text.contains("invalid_api_key"), "{path}: {text}");
        }
    }
    // With the token, the body is read as before.
    let (s, v) = g.admin_post("/admin/keys", json!({"name": "carol"})).await;
    assert_eq!(s, 201, "{v}");
    g.assert_no_panic();
}

/// An admin token taken from the environment is trimmed: a trailing newline (as `$(cat file)`
/// or a secrets mount leaves it) does not make it unmatchable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_from_the_environment_is_trimmed() {
    let mut g = Gateway::start(Setup {
        mocks: vec![("p1", ""), ("p2", "")],
        body: standard_body("", "1", "1"),
        data_dir: None,
    });
    g.kill9();
    let cfg = std::fs::read_to_string(&g.config_path).unwrap();
    let cfg = cfg.replace(
        &format!("admin_token = \"{ADMIN_TOKEN}\""),
        "admin_token_env = \"TG_TEST_ADMIN_TOKEN_WS\"",
    );
    std::fs::write(&g.config_path, cfg).unwrap();
    g.spawn_env(&[(
        "TG_TEST_ADMIN_TOKEN_WS".into(),
        format!("  {ADMIN_TOKEN}\n"),
    )]);
    let (s, v) = g.admin_get("/admin/keys").await;
    assert_eq!(s, 200, "{v}");
    let r = http()
        .get(format!("{}/admin/keys", g.admin_url))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

/// A provider key sent over plain http to a host that is not loopback is warned about at start,
/// naming the provider (and by check-config).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_with_a_provider_key_is_warned_about() {
    let body = format!(
        r#"
[buckets.credit]
currency = "USD"

[[providers]]
id = "cleartext"
base_url = "http://192.0.2.10:8080/v1"
api_key_env = "TG_TEST_CLEARTEXT_KEY"

[[providers]]
id = "local"
base_url = "http://127.0.0.1:9/v1"
api_key_env = "TG_TEST_CLEARTEXT_KEY"

[[models]]
name = "m"
routes = [
  {{ provider = "cleartext", upstream_model = "u", bucket = "credit", input_per_mtok = "1", output_per_mtok = "2" }},
  {{ provider = "local", upstream_model = "u", bucket = "credit", input_per_mtok = "1", output_per_mtok = "2" }},
]

[[keys]]
name = "demo"
secret = "{DEMO_KEY}"
topup = {{ credit = "1" }}
"#
    );
    let g = Gateway::start_extra(
        Setup {
            mocks: vec![],
            body,
            data_dir: None,
        },
        Extra {
            env: vec![("TG_TEST_CLEARTEXT_KEY".into(), "sk-cleartext-1".into())],
            ..Extra::default()
        },
    );
    let log = g.log();
    let warned: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
    assert!(
        warned
            .iter()
            .any(|l| l.contains("cleartext") && l.contains("http://")),
        "{log}"
    );
    assert!(
        !warned
            .iter()
            .any(|l| l.contains("\"local\"") || l.contains("provider=local")),
        "{log}"
    );
    assert!(!log.contains("sk-cleartext-1"), "{log}");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("check-config")
        .arg(&g.config_path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: providers[0].base_url") && !stderr.contains("providers[1]"),
        "{stderr}"
    );
}
