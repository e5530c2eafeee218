//! `--verify-ledger`: after the run, read the key's wallet and ledger through the admin API and
//! check the money invariants (docs/rules.md) over the run's window: conservation per bucket, no
//! open holds, no negative balances, one record per request, and for completed streams tokens
//! charged == tokens the clients received (== tokens the mock emitted, when every stream
//! completed).

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::Value;

use crate::admin::{dec, BucketView};

#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    pub key_id: String,
    pub records: usize,
    pub by_status: BTreeMap<String, u64>,
    pub cost_by_bucket: BTreeMap<String, String>,
    pub shortfall_by_bucket: BTreeMap<String, String>,
    /// Σ `fallbacks` and Σ `retries` over the records.
    pub fallbacks: u64,
    pub retries: u64,
    /// Records by serving route.
    pub by_route: BTreeMap<String, u64>,
    pub checks: Vec<Check>,
    pub passed: bool,
}

/// What the load generator saw on the gateway during the run.
#[derive(Clone, Debug, Default)]
pub struct ClientSide {
    /// Requests sent to the gateway (every outcome).
    pub requests: u64,
    /// Requests that never reached it (connect errors, dropped open-loop starts).
    pub unsent: u64,
    pub completed: u64,
    /// Content tokens received in completed requests.
    pub completed_tokens: u64,
    /// Completed streams whose usage chunk disagreed with the tokens received.
    pub usage_mismatches: u64,
    /// Tokens the mocks emitted during the gateway rounds, when known.
    pub mock_tokens: Option<u64>,
}

pub fn verify(
    key_id: &str,
    before: &BTreeMap<String, BucketView>,
    after: &BTreeMap<String, BucketView>,
    records: &[Value],
    client: &ClientSide,
) -> Result<VerifyReport, String> {
    let mut r = VerifyReport {
        key_id: key_id.to_string(),
        records: records.len(),
        ..VerifyReport::default()
    };
    let mut cost: BTreeMap<String, Decimal> = BTreeMap::new();
    let mut shortfall: BTreeMap<String, Decimal> = BTreeMap::new();
    let mut charged_completed = 0u64;
    let mut charged_all = 0u64;
    for rec in records {
        let status = rec["status"].as_str().unwrap_or("?").to_string();
        *r.by_status.entry(status.clone()).or_default() += 1;
        r.fallbacks += rec["fallbacks"].as_u64().unwrap_or(0);
        r.retries += rec["retries"].as_u64().unwrap_or(0);
        let route = rec["route"].as_str().unwrap_or("none").to_string();
        *r.by_route.entry(route).or_default() += 1;
        let bucket = rec["bucket"].as_str().unwrap_or("").to_string();
        let c = dec(&rec["cost"])?;
        let s = dec(&rec["shortfall"])?;
        if !c.is_zero() || !s.is_zero() {
            *cost.entry(bucket.clone()).or_default() += c;
            *shortfall.entry(bucket).or_default() += s;
        }
        let out = rec["output_tokens"].as_u64().unwrap_or(0);
        charged_all += out;
        if status == "completed" {
            charged_completed += out;
        }
    }
    let mut checks = Vec::new();
    for (bucket, b) in after {
        let start = before.get(bucket).map(|v| v.balance).unwrap_or_default();
        let spent = cost.get(bucket).copied().unwrap_or_default();
        checks.push(Check {
            name: format!("conservation[{bucket}]"),
            ok: start - spent == b.balance,
            detail: format!(
                "balance before {start} − Σ cost {spent} = {} ; balance after {}",
                start - spent,
                b.balance
            ),
        });
        checks.push(Check {
            name: format!("no_open_holds[{bucket}]"),
            ok: b.held.is_zero(),
            detail: format!("held {}", b.held),
        });
        checks.push(Check {
            name: format!("non_negative[{bucket}]"),
            ok: b.balance >= Decimal::ZERO && b.available >= Decimal::ZERO,
            detail: format!("balance {}, available {}", b.balance, b.available),
        });
    }
    for bucket in cost.keys() {
        if !after.contains_key(bucket) {
            checks.push(Check {
                name: format!("conservation[{bucket}]"),
                ok: false,
                detail: "records charge a bucket the wallet does not show".into(),
            });
        }
    }
    let reached = client.requests.saturating_sub(client.unsent);
    checks.push(Check {
        name: "one_record_per_request".into(),
        ok: records.len() as u64 == reached,
        detail: format!(
            "{} records, {reached} requests reached the gateway",
            records.len()
        ),
    });
    let completed_records = r.by_status.get("completed").copied().unwrap_or(0);
    checks.push(Check {
        name: "completed_records_match".into(),
        ok: completed_records == client.completed,
        detail: format!(
            "{completed_records} completed records, {} requests completed at the client",
            client.completed
        ),
    });
    checks.push(Check {
        name: "tokens_charged_eq_received".into(),
        ok: charged_completed == client.completed_tokens,
        detail: format!(
            "completed: {charged_completed} tokens charged, {} received",
            client.completed_tokens
        ),
    });
    checks.push(Check {
        name: "usage_chunk_eq_received".into(),
        ok: client.usage_mismatches == 0,
        detail: format!("{} streams disagreed", client.usage_mismatches),
    });
    if let Some(emitted) = client.mock_tokens {
        let all_completed = completed_records as usize == records.len();
        checks.push(Check {
            name: "tokens_charged_eq_emitted".into(),
            // When streams were cut or failed the mock emitted tokens nobody was charged for.
            ok: !all_completed || charged_all == emitted,
            detail: format!(
                "{charged_all} tokens charged, {emitted} emitted by the mocks{}",
                if all_completed {
                    ""
                } else {
                    " (informational: not every request completed)"
                }
            ),
        });
    }
    r.cost_by_bucket = cost
        .iter()
        .map(|(k, v)| (k.clone(), v.to_string()))
        .collect();
    r.shortfall_by_bucket = shortfall
        .iter()
        .map(|(k, v)| (k.clone(), v.to_string()))
        .collect();
    r.passed = checks.iter().all(|c| c.ok);
    r.checks = checks;
    Ok(r)
}

impl VerifyReport {
    /// Adds a check (and fails the report when it failed).
    pub fn add(&mut self, check: Check) {
        self.passed &= check.ok;
        self.checks.push(check);
    }
}

/// A fleet: every instance's admin API shows the key's wallet alike (they share one database).
pub fn same_everywhere(views: &[(String, BTreeMap<String, BucketView>)]) -> Check {
    let ok = views.windows(2).all(|w| w[0].1 == w[1].1);
    let detail = views
        .iter()
        .map(|(url, w)| {
            let buckets: Vec<String> = w
                .iter()
                .map(|(b, v)| format!("{b} {}/{}", v.balance, v.held))
                .collect();
            format!("{url}: {}", buckets.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ");
    Check {
        name: "same_wallet_on_every_instance".into(),
        ok,
        detail: format!("balance/held: {detail}"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn view(balance: &str) -> BucketView {
        BucketView {
            balance: balance.parse().unwrap(),
            held: Decimal::ZERO,
            available: balance.parse().unwrap(),
        }
    }

    #[test]
    fn conservation_and_tokens() {
        let before = BTreeMap::from([("credit".to_string(), view("1.000000"))]);
        let after = BTreeMap::from([("credit".to_string(), view("0.999872"))]);
        let records = vec![
            json!({"status":"completed","bucket":"credit","cost":"0.000064","shortfall":"0","output_tokens":64}),
            json!({"status":"completed","bucket":"credit","cost":"0.000064","shortfall":"0","output_tokens":64}),
        ];
        let client = ClientSide {
            requests: 2,
            completed: 2,
            completed_tokens: 128,
            mock_tokens: Some(128),
            ..ClientSide::default()
        };
        let r = verify("k", &before, &after, &records, &client).unwrap();
        assert!(r.passed, "{:?}", r.checks);
        let wrong = BTreeMap::from([("credit".to_string(), view("0.999873"))]);
        let r = verify("k", &before, &wrong, &records, &client).unwrap();
        assert!(!r.passed);
        assert!(!r.checks[0].ok);
    }

    #[test]
    fn a_fleet_must_agree_on_the_wallet() {
        let one = BTreeMap::from([("credit".to_string(), view("1.5"))]);
        let other = BTreeMap::from([("credit".to_string(), view("1.4"))]);
        let mut r = VerifyReport {
            passed: true,
            ..VerifyReport::default()
        };
        r.add(same_everywhere(&[
            ("a".into(), one.clone()),
            ("b".into(), one.clone()),
        ]));
        assert!(r.passed);
        r.add(same_everywhere(&[("a".into(), one), ("b".into(), other)]));
        assert!(!r.passed);
        assert_eq!(r.checks.len(), 2);
    }
}
