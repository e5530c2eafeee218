//! The route ledger record (docs/ledger.md): one per authenticated request that got past input
//! validation. It explains which key spent what, on which route, from which balance, and which
//! fallbacks and retries ran.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Completed,
    BalanceExhausted,
    ClientDisconnected,
    UpstreamError,
    Rejected,
    Interrupted,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Completed => "completed",
            Status::BalanceExhausted => "balance_exhausted",
            Status::ClientDisconnected => "client_disconnected",
            Status::UpstreamError => "upstream_error",
            Status::Rejected => "rejected",
            Status::Interrupted => "interrupted",
        }
    }
    pub fn parse(s: &str) -> Option<Status> {
        Some(match s {
            "completed" => Status::Completed,
            "balance_exhausted" => Status::BalanceExhausted,
            "client_disconnected" => Status::ClientDisconnected,
            "upstream_error" => Status::UpstreamError,
            "rejected" => Status::Rejected,
            "interrupted" => Status::Interrupted,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageSource {
    Upstream,
    Counted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// One upstream attempt, sent or skipped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    pub route: String,
    pub upstream_model: String,
    pub bucket: String,
    pub retry: u32,
    pub outcome: String,
    pub http_status: Option<u16>,
    pub error: Option<String>,
    #[serde(with = "time")]
    pub started_at: DateTime<Utc>,
    pub latency_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LedgerRecord {
    pub request_id: String,
    #[serde(with = "time")]
    pub started_at: DateTime<Utc>,
    #[serde(with = "time")]
    pub finished_at: DateTime<Utc>,
    pub workspace: String,
    pub key_id: String,
    pub key_name: String,
    pub project: String,
    pub end_user: Option<String>,
    /// The caller's workflow run (`X-Tollgate-Task`); absent from records written before it.
    #[serde(default)]
    pub task: Option<String>,
    pub endpoint: String,
    pub requested_model: String,
    pub stream: bool,
    pub route: Option<String>,
    pub provider: Option<String>,
    pub upstream_model: Option<String>,
    pub route_kind: Option<String>,
    pub bucket: Option<String>,
    pub currency: Option<String>,
    pub attempts: Vec<Attempt>,
    pub fallbacks: u32,
    pub retries: u32,
    pub status: Status,
    pub http_status: u16,
    /// The whole input, cached tokens included.
    pub input_tokens: u64,
    /// Input tokens the upstream read from its prompt cache (billed at the route's
    /// `cache_read_per_mtok`); absent from records written before it.
    #[serde(default)]
    pub cache_read_tokens: u64,
    /// Input tokens the upstream wrote to its prompt cache (billed at `cache_write_per_mtok`).
    #[serde(default)]
    pub cache_write_tokens: u64,
    pub output_tokens: u64,
    pub output_tokens_delivered: u64,
    pub usage_source: UsageSource,
    pub upstream_usage: Option<UpstreamUsage>,
    #[serde(with = "rust_decimal::serde::str_option")]
    pub input_per_mtok: Option<Decimal>,
    #[serde(with = "rust_decimal::serde::str_option")]
    pub output_per_mtok: Option<Decimal>,
    #[serde(with = "rust_decimal::serde::str")]
    pub cost: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub shortfall: Decimal,
    pub ttft_ms: Option<u64>,
    pub duration_ms: u64,
    /// The fleet instance that served the request (`store.instance_id`); absent with sled.
    /// Not part of the compact encoding (a shared store keeps it in a column of its own).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "instance")]
    pub instance_id: Option<String>,
}

/// The record as stored under compact version 2, before the cache counts (postcard is
/// positional, so such records only read with this layout). Never written any more.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct LedgerRecordV2 {
    pub request_id: String,
    #[serde(with = "time")]
    pub started_at: DateTime<Utc>,
    #[serde(with = "time")]
    pub finished_at: DateTime<Utc>,
    pub workspace: String,
    pub key_id: String,
    pub key_name: String,
    pub project: String,
    pub end_user: Option<String>,
    pub task: Option<String>,
    pub endpoint: String,
    pub requested_model: String,
    pub stream: bool,
    pub route: Option<String>,
    pub provider: Option<String>,
    pub upstream_model: Option<String>,
    pub route_kind: Option<String>,
    pub bucket: Option<String>,
    pub currency: Option<String>,
    pub attempts: Vec<Attempt>,
    pub fallbacks: u32,
    pub retries: u32,
    pub status: Status,
    pub http_status: u16,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub output_tokens_delivered: u64,
    pub usage_source: UsageSource,
    pub upstream_usage: Option<UpstreamUsage>,
    #[serde(with = "rust_decimal::serde::str_option")]
    pub input_per_mtok: Option<Decimal>,
    #[serde(with = "rust_decimal::serde::str_option")]
    pub output_per_mtok: Option<Decimal>,
    #[serde(with = "rust_decimal::serde::str")]
    pub cost: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub shortfall: Decimal,
    pub ttft_ms: Option<u64>,
    pub duration_ms: u64,
}

/// [`LedgerRecord::instance_id`]: as itself in JSON, as nothing at all in the compact storage
/// encoding (postcard writes a unit as zero bytes), so that stored layouts stay as they are.
mod instance {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            v.serialize(s)
        } else {
            s.serialize_unit()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        if d.is_human_readable() {
            Option::<String>::deserialize(d)
        } else {
            <()>::deserialize(d).map(|()| None)
        }
    }
}

impl From<LedgerRecordV2> for LedgerRecord {
    fn from(r: LedgerRecordV2) -> LedgerRecord {
        LedgerRecord {
            request_id: r.request_id,
            started_at: r.started_at,
            finished_at: r.finished_at,
            workspace: r.workspace,
            key_id: r.key_id,
            key_name: r.key_name,
            project: r.project,
            end_user: r.end_user,
            task: r.task,
            endpoint: r.endpoint,
            requested_model: r.requested_model,
            stream: r.stream,
            route: r.route,
            provider: r.provider,
            upstream_model: r.upstream_model,
            route_kind: r.route_kind,
            bucket: r.bucket,
            currency: r.currency,
            attempts: r.attempts,
            fallbacks: r.fallbacks,
            retries: r.retries,
            status: r.status,
            http_status: r.http_status,
            input_tokens: r.input_tokens,
            cache_read_tokens: 0,
            cache_write_tokens: 0,
            output_tokens: r.output_tokens,
            output_tokens_delivered: r.output_tokens_delivered,
            usage_source: r.usage_source,
            upstream_usage: r.upstream_usage,
            input_per_mtok: r.input_per_mtok,
            output_per_mtok: r.output_per_mtok,
            cost: r.cost,
            shortfall: r.shortfall,
            ttft_ms: r.ttft_ms,
            duration_ms: r.duration_ms,
            instance_id: None,
        }
    }
}

/// The record as stored under compact version 1, before `task` (postcard is positional, so
/// such records only read with this layout). Never written any more.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct LedgerRecordV1 {
    pub request_id: String,
    #[serde(with = "time")]
    pub started_at: DateTime<Utc>,
    #[serde(with = "time")]
    pub finished_at: DateTime<Utc>,
    pub workspace: String,
    pub key_id: String,
    pub key_name: String,
    pub project: String,
    pub end_user: Option<String>,
    pub endpoint: String,
    pub requested_model: String,
    pub stream: bool,
    pub route: Option<String>,
    pub provider: Option<String>,
    pub upstream_model: Option<String>,
    pub route_kind: Option<String>,
    pub bucket: Option<String>,
    pub currency: Option<String>,
    pub attempts: Vec<Attempt>,
    pub fallbacks: u32,
    pub retries: u32,
    pub status: Status,
    pub http_status: u16,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub output_tokens_delivered: u64,
    pub usage_source: UsageSource,
    pub upstream_usage: Option<UpstreamUsage>,
    #[serde(with = "rust_decimal::serde::str_option")]
    pub input_per_mtok: Option<Decimal>,
    #[serde(with = "rust_decimal::serde::str_option")]
    pub output_per_mtok: Option<Decimal>,
    #[serde(with = "rust_decimal::serde::str")]
    pub cost: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub shortfall: Decimal,
    pub ttft_ms: Option<u64>,
    pub duration_ms: u64,
}

impl From<LedgerRecordV1> for LedgerRecord {
    fn from(r: LedgerRecordV1) -> LedgerRecord {
        LedgerRecord {
            request_id: r.request_id,
            started_at: r.started_at,
            finished_at: r.finished_at,
            workspace: r.workspace,
            key_id: r.key_id,
            key_name: r.key_name,
            project: r.project,
            end_user: r.end_user,
            task: None,
            endpoint: r.endpoint,
            requested_model: r.requested_model,
            stream: r.stream,
            route: r.route,
            provider: r.provider,
            upstream_model: r.upstream_model,
            route_kind: r.route_kind,
            bucket: r.bucket,
            currency: r.currency,
            attempts: r.attempts,
            fallbacks: r.fallbacks,
            retries: r.retries,
            status: r.status,
            http_status: r.http_status,
            input_tokens: r.input_tokens,
            cache_read_tokens: 0,
            cache_write_tokens: 0,
            output_tokens: r.output_tokens,
            output_tokens_delivered: r.output_tokens_delivered,
            usage_source: r.usage_source,
            upstream_usage: r.upstream_usage,
            input_per_mtok: r.input_per_mtok,
            output_per_mtok: r.output_per_mtok,
            cost: r.cost,
            shortfall: r.shortfall,
            ttft_ms: r.ttft_ms,
            duration_ms: r.duration_ms,
            instance_id: None,
        }
    }
}

/// Record times as RFC 3339 strings. JSON gets chrono's own form. The compact storage encoding
/// (not human-readable) gets the same kind of string, always with nine fraction digits, written
/// without the formatting machinery (a record's times were most of its encoding cost); any
/// RFC 3339 string reads back the same way.
mod time {
    use chrono::{DateTime, Datelike, Timelike, Utc};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            return t.serialize(s);
        }
        match compact(t) {
            Some(buf) => s.serialize_str(std::str::from_utf8(&buf).unwrap_or_default()),
            None => s.serialize_str(&t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        DateTime::<Utc>::deserialize(d)
    }

    /// `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`, for years 0–9999 outside a leap second.
    pub(super) fn compact(t: &DateTime<Utc>) -> Option<[u8; 30]> {
        let nanos = t.nanosecond();
        let year = u32::try_from(t.year()).ok().filter(|y| *y <= 9999)?;
        if nanos >= 1_000_000_000 {
            return None;
        }
        let mut buf = *b"0000-00-00T00:00:00.000000000Z";
        let mut put = |at: usize, width: usize, mut v: u32| {
            for i in (at..at + width).rev() {
                buf[i] = b'0' + (v % 10) as u8;
                v /= 10;
            }
        };
        put(0, 4, year);
        put(5, 2, t.month());
        put(8, 2, t.day());
        put(11, 2, t.hour());
        put(14, 2, t.minute());
        put(17, 2, t.second());
        put(20, 9, nanos);
        Some(buf)
    }
}

impl LedgerRecord {
    /// A record with only its id and start time set: no key, no route, nothing billed, status
    /// `rejected`. Callers fill in what they know with struct-update syntax.
    pub fn empty(request_id: String, started_at: DateTime<Utc>) -> LedgerRecord {
        LedgerRecord {
            request_id,
            started_at,
            finished_at: started_at,
            workspace: String::new(),
            key_id: String::new(),
            key_name: String::new(),
            project: String::new(),
            end_user: None,
            task: None,
            endpoint: String::new(),
            requested_model: String::new(),
            stream: false,
            route: None,
            provider: None,
            upstream_model: None,
            route_kind: None,
            bucket: None,
            currency: None,
            attempts: Vec::new(),
            fallbacks: 0,
            retries: 0,
            status: Status::Rejected,
            http_status: 0,
            input_tokens: 0,
            cache_read_tokens: 0,
            cache_write_tokens: 0,
            output_tokens: 0,
            output_tokens_delivered: 0,
            usage_source: UsageSource::Counted,
            upstream_usage: None,
            input_per_mtok: None,
            output_per_mtok: None,
            cost: Decimal::ZERO,
            shortfall: Decimal::ZERO,
            ttft_ms: None,
            duration_ms: 0,
            instance_id: None,
        }
    }
}

/// Field order of the record (docs/ledger.md), used for CSV export.
pub const FIELDS: &[&str] = &[
    "request_id",
    "started_at",
    "finished_at",
    "workspace",
    "key_id",
    "key_name",
    "project",
    "end_user",
    "task",
    "endpoint",
    "requested_model",
    "stream",
    "route",
    "provider",
    "upstream_model",
    "route_kind",
    "bucket",
    "currency",
    "attempts",
    "fallbacks",
    "retries",
    "status",
    "http_status",
    "input_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "output_tokens",
    "output_tokens_delivered",
    "usage_source",
    "upstream_usage",
    "input_per_mtok",
    "output_per_mtok",
    "cost",
    "shortfall",
    "ttft_ms",
    "duration_ms",
];

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn compact_times_read_back_exactly() {
        let times = [
            Utc.timestamp_opt(0, 0).unwrap(),
            Utc.timestamp_opt(1_795_000_000, 1).unwrap(),
            Utc.timestamp_opt(1_795_000_000, 999_999_999).unwrap(),
            Utc.timestamp_opt(253_402_300_799, 123_000_000).unwrap(), // 9999-12-31T23:59:59.123
            Utc::now(),
        ];
        for t in times {
            let buf = time::compact(&t).expect("in range");
            let text = std::str::from_utf8(&buf).unwrap();
            assert_eq!(DateTime::parse_from_rfc3339(text).unwrap(), t, "{text}");
        }
        let far = Utc.timestamp_opt(253_402_300_800, 0).unwrap(); // year 10000
        assert!(time::compact(&far).is_none());
        let before_zero = Utc.with_ymd_and_hms(-1, 1, 1, 0, 0, 0).unwrap();
        assert!(time::compact(&before_zero).is_none());
    }

    #[test]
    fn records_keep_their_times_in_both_encodings() {
        let mut rec = LedgerRecord::empty("req_1".into(), Utc::now());
        rec.finished_at = Utc.with_ymd_and_hms(-1, 1, 1, 0, 0, 0).unwrap();
        rec.attempts.push(Attempt {
            route: "m/up".into(),
            upstream_model: "u".into(),
            bucket: "credit".into(),
            retry: 0,
            outcome: "ok".into(),
            http_status: Some(200),
            error: None,
            started_at: Utc.timestamp_opt(1_795_000_000, 5).unwrap(),
            latency_ms: 3,
        });
        let binary: LedgerRecord =
            postcard::from_bytes(&postcard::to_allocvec(&rec).unwrap()).unwrap();
        assert_eq!(binary, rec);
        let json = serde_json::to_value(&rec).unwrap();
        assert_eq!(
            json["started_at"],
            serde_json::to_value(rec.started_at).unwrap(),
            "JSON keeps chrono's own form"
        );
        assert_eq!(serde_json::from_value::<LedgerRecord>(json).unwrap(), rec);
    }
}
