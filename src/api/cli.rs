//! The admin CLI's client: one request to the admin API, its body printed to stdout.

use std::path::Path;
use std::process::ExitCode;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::config::{self, AdminToken};

pub fn run(
    url: &Option<String>,
    token: &Option<String>,
    config_path: &Path,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> ExitCode {
    let cfg = config::load_file(config_path).ok();
    let base = url
        .clone()
        .or_else(|| {
            cfg.as_ref()
                .map(|c| format!("http://{}", c.server.admin_listen))
        })
        .unwrap_or_else(|| "http://127.0.0.1:8081".into());
    let token = token
        .clone()
        .or_else(|| std::env::var("TOLLGATE_ADMIN_TOKEN").ok())
        .or_else(|| match cfg.as_ref().map(|c| &c.server.admin_token) {
            Some(AdminToken::Inline(t)) => Some(t.clone()),
            Some(AdminToken::Env(v)) => std::env::var(v).ok(),
            None => None,
        });
    let Some(token) = token else {
        eprintln!("no admin token: pass --admin-token or set TOLLGATE_ADMIN_TOKEN");
        return ExitCode::from(2);
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(async move {
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let payload = body.map(|b| b.to_string()).unwrap_or_default();
        let req = http::Request::builder()
            .method(method)
            .uri(format!("{}{}", base.trim_end_matches('/'), path))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(payload)));
        let req = match req {
            Ok(r) => r,
            Err(e) => {
                eprintln!("bad request: {e}");
                return ExitCode::from(2);
            }
        };
        match client.request(req).await {
            Err(e) => {
                eprintln!("cannot reach the admin API at {base}: {e}");
                ExitCode::from(1)
            }
            Ok(resp) => {
                let status = resp.status();
                let json = resp
                    .headers()
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|c| c.starts_with("application/json"));
                if status.is_success() && !json {
                    // Exports (JSON Lines, CSV): copied to stdout as they stream, unchanged.
                    return copy_body(resp.into_body()).await;
                }
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map(|c| c.to_bytes())
                    .unwrap_or_default();
                let text = String::from_utf8_lossy(&body);
                let pretty = serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|v| serde_json::to_string_pretty(&v).ok());
                if status.is_success() {
                    println!("{}", pretty.unwrap_or_else(|| text.into_owned()));
                    ExitCode::SUCCESS
                } else {
                    eprintln!(
                        "{} {}",
                        status.as_u16(),
                        pretty.unwrap_or_else(|| text.into_owned())
                    );
                    ExitCode::from(1)
                }
            }
        }
    })
}

async fn copy_body(mut body: hyper::body::Incoming) -> ExitCode {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    if let Err(e) = out.write_all(d) {
                        eprintln!("cannot write the output: {e}");
                        return ExitCode::from(1);
                    }
                }
            }
            Err(e) => {
                eprintln!("the transfer broke off: {e}");
                return ExitCode::from(1);
            }
        }
    }
    match out.flush() {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::from(1),
    }
}
