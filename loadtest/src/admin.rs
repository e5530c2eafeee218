//! Control-plane calls: tollgate's admin API (keys, wallets, ledger) for `--verify-ledger`, and
//! the mock's `POST /_mock/options` and `GET /stats`.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::Value;

use crate::client::HttpClient;
use crate::scenario::MockSettings;

const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// One JSON call; returns the status and the parsed body (`null` when empty or not JSON).
pub async fn call(
    client: &HttpClient,
    method: Method,
    url: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Result<(u16, Value), String> {
    let mut req = Request::builder().method(method).uri(url);
    if let Some(t) = token {
        req = req.header(AUTHORIZATION, format!("Bearer {t}"));
    }
    let payload = match body {
        Some(b) => {
            req = req.header(CONTENT_TYPE, "application/json");
            Bytes::from(b.to_string())
        }
        None => Bytes::new(),
    };
    let req = req
        .body(Full::new(payload))
        .map_err(|e| format!("{url}: {e}"))?;
    let exchange = async {
        let response = client
            .request(req)
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let status = response.status().as_u16();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{url}: {e}"))?
            .to_bytes();
        Ok::<_, String>((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    };
    tokio::time::timeout(CALL_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("{url}: timed out"))?
}

async fn ok_json(
    client: &HttpClient,
    method: Method,
    url: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Result<Value, String> {
    let (status, v) = call(client, method, url, token, body).await?;
    if (200..300).contains(&status) {
        Ok(v)
    } else {
        Err(format!("{url}: HTTP {status}: {v}"))
    }
}

/// The admin API of one tollgate.
#[derive(Clone, Debug)]
pub struct Admin {
    pub url: String,
    pub token: String,
}

/// One bucket of a wallet view.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct BucketView {
    pub balance: Decimal,
    pub held: Decimal,
    pub available: Decimal,
}

impl Admin {
    fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url.trim_end_matches('/'))
    }

    /// Creates a key and funds it; returns (id, secret).
    pub async fn create_funded_key(
        &self,
        client: &HttpClient,
        name: &str,
        topup: &BTreeMap<String, String>,
    ) -> Result<(String, String), String> {
        let created = ok_json(
            client,
            Method::POST,
            &self.at("/admin/keys"),
            Some(&self.token),
            Some(
                &serde_json::json!({"name": name, "workspace": "loadtest", "project": "loadtest"}),
            ),
        )
        .await?;
        let id = created["id"].as_str().unwrap_or_default().to_string();
        let secret = created["secret"].as_str().unwrap_or_default().to_string();
        if id.is_empty() || secret.is_empty() {
            return Err(format!(
                "POST /admin/keys answered without id/secret: {created}"
            ));
        }
        for (bucket, amount) in topup {
            ok_json(
                client,
                Method::POST,
                &self.at(&format!("/admin/keys/{id}/topup")),
                Some(&self.token),
                Some(&serde_json::json!({"bucket": bucket, "amount": amount})),
            )
            .await?;
        }
        Ok((id, secret))
    }

    pub async fn key_of_request(
        &self,
        client: &HttpClient,
        request_id: &str,
    ) -> Result<String, String> {
        // The record is written at settlement, a moment after the response ends.
        for _ in 0..50 {
            let (status, v) = call(
                client,
                Method::GET,
                &self.at(&format!("/admin/ledger/{request_id}")),
                Some(&self.token),
                None,
            )
            .await?;
            if status == 200 {
                if let Some(k) = v["key_id"].as_str() {
                    return Ok(k.to_string());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!("ledger record {request_id} did not appear"))
    }

    pub async fn wallet(
        &self,
        client: &HttpClient,
        key_id: &str,
    ) -> Result<BTreeMap<String, BucketView>, String> {
        let v = ok_json(
            client,
            Method::GET,
            &self.at(&format!("/admin/keys/{key_id}/wallet")),
            Some(&self.token),
            None,
        )
        .await?;
        let mut out = BTreeMap::new();
        let Some(buckets) = v["buckets"].as_object() else {
            return Err(format!("wallet view without buckets: {v}"));
        };
        for (name, b) in buckets {
            out.insert(
                name.clone(),
                BucketView {
                    balance: dec(&b["balance"])?,
                    held: dec(&b["held"])?,
                    available: dec(&b["available"])?,
                },
            );
        }
        Ok(out)
    }

    /// Waits until no hold is open on the key (settlements done), up to `limit`.
    pub async fn quiescent_wallet(
        &self,
        client: &HttpClient,
        key_id: &str,
        limit: Duration,
    ) -> Result<BTreeMap<String, BucketView>, String> {
        let until = std::time::Instant::now() + limit;
        loop {
            let w = self.wallet(client, key_id).await?;
            if w.values().all(|b| b.held.is_zero()) || std::time::Instant::now() > until {
                return Ok(w);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every ledger record of `key_id` since `since` (RFC 3339), all pages.
    pub async fn ledger_since(
        &self,
        client: &HttpClient,
        key_id: &str,
        since: &str,
    ) -> Result<Vec<Value>, String> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut url = self.at(&format!(
                "/admin/ledger?key_id={key_id}&since={}&limit=1000",
                since.replace('+', "%2B").replace(':', "%3A")
            ));
            if let Some(c) = &cursor {
                url.push_str(&format!("&cursor={c}"));
            }
            let v = ok_json(client, Method::GET, &url, Some(&self.token), None).await?;
            if let Some(records) = v["records"].as_array() {
                out.extend(records.iter().cloned());
            }
            match v["next_cursor"].as_str() {
                Some(c) if !c.is_empty() => cursor = Some(c.to_string()),
                _ => return Ok(out),
            }
        }
    }
}

pub fn dec(v: &Value) -> Result<Decimal, String> {
    match v {
        Value::String(s) => Decimal::from_str(s).map_err(|e| format!("bad decimal {s:?}: {e}")),
        Value::Null => Ok(Decimal::ZERO),
        other => Err(format!("expected a decimal string, got {other}")),
    }
}

/// `POST {mock}/_mock/options`.
pub async fn set_mock_options(
    client: &HttpClient,
    mock_url: &str,
    options: &MockSettings,
) -> Result<(), String> {
    if options.is_empty() {
        return Ok(());
    }
    let url = format!("{}/_mock/options", mock_url.trim_end_matches('/'));
    ok_json(client, Method::POST, &url, None, Some(&options.to_json()))
        .await
        .map(|_| ())
}

/// The mock's `completion_tokens` counter from `GET {mock}/stats`.
pub async fn mock_tokens(client: &HttpClient, mock_url: &str) -> Result<u64, String> {
    let url = format!("{}/stats", mock_url.trim_end_matches('/'));
    let v = ok_json(client, Method::GET, &url, None, None).await?;
    v["completion_tokens"]
        .as_u64()
        .ok_or_else(|| format!("{url}: no completion_tokens"))
}
