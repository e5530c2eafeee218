//! The route ledger record (DESIGN §5.1): one per authenticated request that got past input
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
    pub started_at: DateTime<Utc>,
    pub latency_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LedgerRecord {
    pub request_id: String,
    pub started_at: DateTime<Utc>,
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
        }
    }
}

/// Field order of §5.1, used for CSV export.
pub const FIELDS: &[&str] = &[
    "request_id",
    "started_at",
    "finished_at",
    "workspace",
    "key_id",
    "key_name",
    "project",
    "end_user",
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
