//! Usage aggregation (`GET /admin/usage`, R32): ledger records folded into groups by the
//! requested dimensions plus currency. Currency is always part of the group, so costs are never
//! summed across currencies; records without a bucket (rejected requests) form their own group
//! with `currency: null`. Pure functions over records: the admin handler feeds them from a store
//! scan, so memory grows with the number of groups, not records.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::Serialize;

use super::record::{LedgerRecord, Status};
use super::rollup::{TaskCell, TaskStats};

/// A dimension usage can be grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum GroupKey {
    KeyId,
    Project,
    /// The workflow run (`X-Tollgate-Task`); `null` for records without one.
    Task,
    /// The requested model (as the ledger's `model` filter, R31).
    Model,
    Route,
    Bucket,
}

impl GroupKey {
    pub const ALL: [GroupKey; 6] = [
        GroupKey::KeyId,
        GroupKey::Project,
        GroupKey::Task,
        GroupKey::Model,
        GroupKey::Route,
        GroupKey::Bucket,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            GroupKey::KeyId => "key_id",
            GroupKey::Project => "project",
            GroupKey::Task => "task",
            GroupKey::Model => "model",
            GroupKey::Route => "route",
            GroupKey::Bucket => "bucket",
        }
    }

    pub fn parse(s: &str) -> Option<GroupKey> {
        GroupKey::ALL.into_iter().find(|k| k.as_str() == s)
    }

    fn value(self, r: &LedgerRecord) -> Option<String> {
        match self {
            GroupKey::KeyId => Some(r.key_id.clone()),
            GroupKey::Project => Some(r.project.clone()),
            GroupKey::Task => r.task.clone(),
            GroupKey::Model => Some(r.requested_model.clone()),
            GroupKey::Route => r.route.clone(),
            GroupKey::Bucket => r.bucket.clone(),
        }
    }
}

/// Parses `group_by=key_id,project,...`: any subset, in any order, duplicates ignored; empty
/// items are ignored so that `group_by=` means no grouping. Returns the unknown name on error.
pub fn parse_group_by(s: &str) -> Result<Vec<GroupKey>, String> {
    let mut keys = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let k = GroupKey::parse(part).ok_or_else(|| part.to_string())?;
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    keys.sort();
    Ok(keys)
}

/// One group of the usage answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageGroup {
    /// The grouping dimensions asked for, by name (`null` for a record without a route or bucket).
    pub group: BTreeMap<&'static str, Option<String>>,
    pub currency: Option<String>,
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    #[serde(with = "rust_decimal::serde::str")]
    pub cost: Decimal,
    pub fallbacks: u64,
    pub retries: u64,
    pub balance_exhausted: u64,
}

#[derive(Debug, Default, Clone)]
struct Totals {
    requests: u64,
    input_tokens: u64,
    output_tokens: u64,
    cost: Decimal,
    fallbacks: u64,
    retries: u64,
    balance_exhausted: u64,
}

/// Folds records into groups. `add` each record, then `finish`.
#[derive(Debug, Clone)]
pub struct Usage {
    group_by: Vec<GroupKey>,
    groups: BTreeMap<(Vec<Option<String>>, Option<String>), Totals>,
}

impl Usage {
    pub fn new(group_by: Vec<GroupKey>) -> Usage {
        Usage {
            group_by,
            groups: BTreeMap::new(),
        }
    }

    pub fn add(&mut self, r: &LedgerRecord) {
        let dims: Vec<Option<String>> = self.group_by.iter().map(|k| k.value(r)).collect();
        // A record without a bucket was never billed: its currency is null whatever it says.
        let currency = r.bucket.as_ref().and(r.currency.clone());
        let t = self.groups.entry((dims, currency)).or_default();
        t.requests += 1;
        t.input_tokens += r.input_tokens;
        t.output_tokens += r.output_tokens;
        t.cost += r.cost;
        t.fallbacks += u64::from(r.fallbacks);
        t.retries += u64::from(r.retries);
        if r.status == Status::BalanceExhausted {
            t.balance_exhausted += 1;
        }
    }

    /// Adds the sums of a cell of workflow run `task`'s rollup: the same as adding each of its
    /// records.
    pub fn add_task_cell(&mut self, task: &str, c: &TaskCell, s: &TaskStats) {
        let dims: Vec<Option<String>> = self
            .group_by
            .iter()
            .map(|k| match k {
                GroupKey::KeyId => Some(c.key_id.clone()),
                GroupKey::Project => Some(c.project.clone()),
                GroupKey::Task => Some(task.to_string()),
                GroupKey::Model => Some(c.model.clone()),
                GroupKey::Route => c.route.clone(),
                GroupKey::Bucket => c.bucket.clone(),
            })
            .collect();
        let currency = c.bucket.as_ref().and(c.currency.clone());
        let t = self.groups.entry((dims, currency)).or_default();
        t.requests += s.requests;
        t.input_tokens += s.input_tokens;
        t.output_tokens += s.output_tokens;
        t.cost += s.cost;
        t.fallbacks += s.fallbacks;
        t.retries += s.retries;
        if c.status == Status::BalanceExhausted.as_str() {
            t.balance_exhausted += s.requests;
        }
    }

    /// The groups, ordered by their dimension values and then currency (null first).
    pub fn finish(self) -> Vec<UsageGroup> {
        let group_by = self.group_by;
        self.groups
            .into_iter()
            .map(|((dims, currency), t)| UsageGroup {
                group: group_by.iter().map(|k| k.as_str()).zip(dims).collect(),
                cost: if currency.is_none() {
                    Decimal::ZERO
                } else {
                    t.cost.normalize()
                },
                currency,
                requests: t.requests,
                input_tokens: t.input_tokens,
                output_tokens: t.output_tokens,
                fallbacks: t.fallbacks,
                retries: t.retries,
                balance_exhausted: t.balance_exhausted,
            })
            .collect()
    }
}

/// Aggregates `records` grouped by `group_by` (plus currency, always).
pub fn aggregate<'a>(
    group_by: Vec<GroupKey>,
    records: impl IntoIterator<Item = &'a LedgerRecord>,
) -> Vec<UsageGroup> {
    let mut u = Usage::new(group_by);
    for r in records {
        u.add(r);
    }
    u.finish()
}

/// What the ledger says each route did (the console's routes page): attempts sent or skipped,
/// attempts that were not `ok`, retries on the route, and fallbacks from it (a failed attempt
/// followed by an attempt on another route). Fold records in with `add`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteActivity {
    pub routes: BTreeMap<String, RouteCounts>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouteCounts {
    pub attempts: u64,
    pub failed: u64,
    pub retries: u64,
    pub fallbacks: u64,
}

impl RouteActivity {
    pub fn add(&mut self, r: &LedgerRecord) {
        for (i, a) in r.attempts.iter().enumerate() {
            let c = self.routes.entry(a.route.clone()).or_default();
            c.attempts += 1;
            if a.outcome != "ok" {
                c.failed += 1;
            }
            if a.retry > 0 {
                c.retries += 1;
            }
            if r.attempts.get(i + 1).is_some_and(|n| n.route != a.route) {
                c.fallbacks += 1;
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::ledger::record::UsageSource;
    use chrono::{TimeZone, Utc};

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    /// A completed record served by `route` (model `m`), or a rejected one when `route` is None.
    pub(crate) fn rec(
        key: &str,
        route: Option<(&str, &str, &str)>,
        input: u64,
        output: u64,
        cost: &str,
    ) -> LedgerRecord {
        let t = Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap();
        LedgerRecord {
            workspace: "ws".into(),
            key_id: key.into(),
            key_name: key.into(),
            project: format!("proj-{key}"),
            endpoint: "chat.completions".into(),
            requested_model: "m".into(),
            stream: true,
            route: route.map(|r| r.0.to_string()),
            provider: route.map(|_| "p".to_string()),
            upstream_model: route.map(|_| "up".to_string()),
            route_kind: route.map(|_| "official".to_string()),
            bucket: route.map(|r| r.1.to_string()),
            currency: route.map(|r| r.2.to_string()),
            status: if route.is_some() {
                Status::Completed
            } else {
                Status::Rejected
            },
            http_status: if route.is_some() { 200 } else { 404 },
            input_tokens: input,
            output_tokens: output,
            output_tokens_delivered: output,
            usage_source: UsageSource::Upstream,
            input_per_mtok: route.map(|_| d("1")),
            output_per_mtok: route.map(|_| d("2")),
            cost: d(cost),
            duration_ms: 1,
            instance_id: None,
            ..LedgerRecord::empty(format!("r-{key}-{input}-{output}"), t)
        }
    }

    #[test]
    fn route_activity_counts_attempts_retries_and_fallbacks_per_route() {
        let mut r = rec("k1", Some(("m/p2", "routed", "CNY")), 2, 8, "0.1");
        let at = |route: &str, retry: u32, outcome: &str| crate::ledger::Attempt {
            route: route.into(),
            upstream_model: "u".into(),
            bucket: "b".into(),
            retry,
            outcome: outcome.into(),
            http_status: None,
            error: None,
            started_at: r.started_at,
            latency_ms: 1,
        };
        r.attempts = vec![
            at("m/p1", 0, "http_500"),
            at("m/p1", 1, "http_500"),
            at("m/p2", 0, "ok"),
        ];
        let mut a = RouteActivity::default();
        a.add(&r);
        a.add(&rec("k1", None, 1, 0, "0"));
        let p1 = a.routes["m/p1"];
        assert_eq!(
            (p1.attempts, p1.failed, p1.retries, p1.fallbacks),
            (2, 2, 1, 1)
        );
        let p2 = a.routes["m/p2"];
        assert_eq!(
            (p2.attempts, p2.failed, p2.retries, p2.fallbacks),
            (1, 0, 0, 0)
        );
    }

    #[test]
    fn group_by_parses_subsets_and_rejects_unknown_names() {
        assert_eq!(parse_group_by("").unwrap(), vec![]);
        assert_eq!(
            parse_group_by("route, key_id,route").unwrap(),
            vec![GroupKey::KeyId, GroupKey::Route]
        );
        assert_eq!(parse_group_by("key_id,colour").unwrap_err(), "colour");
    }

    #[test]
    fn one_group_per_currency_without_group_by() {
        let usd = Some(("m/p1", "credit", "USD"));
        let cny = Some(("m/p2", "routed", "CNY"));
        let mut a = rec("k1", usd, 2, 8, "0.000018");
        a.fallbacks = 1;
        a.retries = 2;
        let mut b = rec("k2", usd, 3, 1, "0.0000050");
        b.status = Status::BalanceExhausted;
        let c = rec("k1", cny, 2, 8, "0.000038");
        let rejected = rec("k1", None, 5, 0, "0");
        let groups = aggregate(vec![], [&a, &b, &c, &rejected]);
        assert_eq!(groups.len(), 3);
        assert_eq!(groups[0].currency, None);
        assert_eq!(groups[0].requests, 1);
        assert_eq!(groups[0].cost, Decimal::ZERO);
        assert_eq!(groups[1].currency.as_deref(), Some("CNY"));
        assert_eq!(groups[1].cost, d("0.000038"));
        let usd = &groups[2];
        assert_eq!(usd.currency.as_deref(), Some("USD"));
        assert_eq!(
            (usd.requests, usd.input_tokens, usd.output_tokens),
            (2, 5, 9)
        );
        assert_eq!(usd.cost.to_string(), "0.000023");
        assert_eq!(
            (usd.fallbacks, usd.retries, usd.balance_exhausted),
            (1, 2, 1)
        );
        let v = serde_json::to_value(usd).unwrap();
        assert_eq!(v["cost"], "0.000023");
        assert_eq!(v["group"], serde_json::json!({}));
    }

    #[test]
    fn groups_by_dimensions_and_currency() {
        let usd = Some(("m/p1", "credit", "USD"));
        let records = [
            rec("k1", usd, 1, 1, "0.000003"),
            rec("k1", usd, 1, 1, "0.000003"),
            rec("k2", usd, 1, 1, "0.000003"),
            rec("k2", None, 1, 0, "0"),
        ];
        let groups = aggregate(parse_group_by("key_id,route").unwrap(), &records);
        let view: Vec<String> = groups
            .iter()
            .map(|g| serde_json::to_string(g).unwrap())
            .collect();
        assert_eq!(
            view,
            vec![
                r#"{"group":{"key_id":"k1","route":"m/p1"},"currency":"USD","requests":2,"input_tokens":2,"output_tokens":2,"cost":"0.000006","fallbacks":0,"retries":0,"balance_exhausted":0}"#,
                r#"{"group":{"key_id":"k2","route":null},"currency":null,"requests":1,"input_tokens":1,"output_tokens":0,"cost":"0","fallbacks":0,"retries":0,"balance_exhausted":0}"#,
                r#"{"group":{"key_id":"k2","route":"m/p1"},"currency":"USD","requests":1,"input_tokens":1,"output_tokens":1,"cost":"0.000003","fallbacks":0,"retries":0,"balance_exhausted":0}"#,
            ]
        );
    }
}
