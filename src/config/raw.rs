//! Raw configuration as written in TOML. Every struct rejects unknown keys; defaults live here so
//! that `check-config` and `serve` agree on them. Validation into [`super::Config`] is in
//! `validate.rs`.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::money::Amount;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    #[serde(default = "d_listen")]
    pub listen: String,
    #[serde(default = "d_admin_listen")]
    pub admin_listen: String,
    pub admin_token_env: Option<String>,
    pub admin_token: Option<String>,
    #[serde(default = "d_data_dir")]
    pub data_dir: String,
    #[serde(default = "d_max_body")]
    pub max_body_bytes: u64,
    pub workers: Option<u32>,
    pub tls: Option<RawTls>,
    /// Seconds a client connection may stay idle (keep-alive) before it is closed.
    #[serde(default = "d_client_idle")]
    pub client_idle_timeout_s: u64,
    /// Milliseconds a client has to send its request head (slow-loris protection).
    #[serde(default = "d_client_request_timeout")]
    pub client_request_timeout_ms: u64,
    /// Seconds in-flight streams may run on SIGTERM before they are cut.
    #[serde(default = "d_drain")]
    pub shutdown_drain_s: u64,
    /// Most entries a chat request's `messages` (or an embeddings `input` array) may have.
    #[serde(default = "d_max_messages")]
    pub max_messages: u64,
    /// Seconds an operator console session lasts after its login.
    #[serde(default = "d_console_session")]
    pub console_session_ttl_s: u64,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: d_listen(),
            admin_listen: d_admin_listen(),
            admin_token_env: None,
            admin_token: None,
            data_dir: d_data_dir(),
            max_body_bytes: d_max_body(),
            workers: None,
            tls: None,
            client_idle_timeout_s: d_client_idle(),
            client_request_timeout_ms: d_client_request_timeout(),
            shutdown_drain_s: d_drain(),
            max_messages: d_max_messages(),
            console_session_ttl_s: d_console_session(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSettlement {
    #[serde(default = "d_flush")]
    pub flush_interval_ms: u64,
    #[serde(default = "d_initial_hold")]
    pub initial_output_hold_tokens: u64,
    #[serde(default = "d_max_hold")]
    pub max_output_hold_tokens: u64,
    #[serde(default = "d_default_max_tokens")]
    pub default_max_tokens: u64,
    /// Seconds without traffic after which a wallet actor stops (its state stays in sled).
    #[serde(default = "d_wallet_idle")]
    pub wallet_idle_s: u64,
}

impl Default for RawSettlement {
    fn default() -> Self {
        RawSettlement {
            flush_interval_ms: d_flush(),
            initial_output_hold_tokens: d_initial_hold(),
            max_output_hold_tokens: d_max_hold(),
            default_max_tokens: d_default_max_tokens(),
            wallet_idle_s: d_wallet_idle(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLedger {
    #[serde(default = "d_retention")]
    pub retention_days: u32,
}

impl Default for RawLedger {
    fn default() -> Self {
        RawLedger {
            retention_days: d_retention(),
        }
    }
}

/// `[store]`: where keys, wallets and the ledger live (sled in `server.data_dir`, or a
/// PostgreSQL database shared by a fleet).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    #[serde(default = "d_store_kind")]
    pub kind: String,
    pub url_env: Option<String>,
    #[serde(default = "d_pool_size")]
    pub pool_size: u32,
    pub instance_id: Option<String>,
    #[serde(default = "d_lease_ttl")]
    pub lease_ttl_ms: u64,
    /// sled only: the page cache, MiB (default 8).
    pub cache_mb: Option<u64>,
}

impl Default for RawStore {
    fn default() -> Self {
        RawStore {
            kind: d_store_kind(),
            url_env: None,
            pool_size: d_pool_size(),
            instance_id: None,
            lease_ttl_ms: d_lease_ttl(),
            cache_mb: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouting {
    #[serde(default = "d_budget_ratio")]
    pub retry_budget_ratio: f64,
    #[serde(default = "d_budget_min")]
    pub retry_budget_min_per_s: f64,
}

impl Default for RawRouting {
    fn default() -> Self {
        RawRouting {
            retry_budget_ratio: d_budget_ratio(),
            retry_budget_min_per_s: d_budget_min(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBucket {
    pub currency: Option<String>,
    #[serde(default = "d_bucket_kind")]
    pub kind: String,
    #[serde(default = "d_display_scale")]
    pub display_scale: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCircuit {
    #[serde(default = "d_failure_threshold")]
    pub failure_threshold: u32,
    #[serde(default = "d_failure_rate")]
    pub failure_rate: f64,
    #[serde(default = "d_window_s")]
    pub window_s: u64,
    #[serde(default = "d_min_requests")]
    pub min_requests: u32,
    #[serde(default = "d_open_ms")]
    pub open_ms: u64,
    #[serde(default = "d_max_open_ms")]
    pub max_open_ms: u64,
}

impl Default for RawCircuit {
    fn default() -> Self {
        RawCircuit {
            failure_threshold: d_failure_threshold(),
            failure_rate: d_failure_rate(),
            window_s: d_window_s(),
            min_requests: d_min_requests(),
            open_ms: d_open_ms(),
            max_open_ms: d_max_open_ms(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProbe {
    #[serde(default = "d_probe_interval")]
    pub interval_ms: u64,
    #[serde(default = "d_probe_kind")]
    pub kind: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMock {
    #[serde(default = "d_mock_ttft")]
    pub ttft_ms: u64,
    #[serde(default = "d_mock_tokens")]
    pub tokens: u32,
    #[serde(default = "d_mock_interval")]
    pub interval_ms: u64,
}

impl Default for RawMock {
    fn default() -> Self {
        RawMock {
            ttft_ms: d_mock_ttft(),
            tokens: d_mock_tokens(),
            interval_ms: d_mock_interval(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProvider {
    pub id: Option<String>,
    #[serde(default = "d_provider_kind")]
    pub kind: String,
    pub base_url: Option<String>,
    pub api_key_env: Option<String>,
    #[serde(default = "d_http2")]
    pub http2: String,
    /// The wire format the upstream speaks: `openai` or `anthropic`.
    #[serde(default = "d_api")]
    pub api: String,
    #[serde(default = "d_connect_timeout")]
    pub connect_timeout_ms: u64,
    #[serde(default = "d_first_token_timeout")]
    pub first_token_timeout_ms: u64,
    #[serde(default = "d_idle_timeout")]
    pub idle_timeout_ms: u64,
    #[serde(default)]
    pub circuit: RawCircuit,
    pub probe: Option<RawProbe>,
    /// kind = "mock" only: where the built-in mock listens (default: an ephemeral loopback port).
    pub listen: Option<String>,
    /// kind = "mock" only: the mock's behaviour.
    pub mock: Option<RawMock>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    #[serde(default = "d_max_retries")]
    pub max_retries: u32,
    #[serde(default = "d_backoff_base")]
    pub backoff_base_ms: u64,
    #[serde(default = "d_backoff_max")]
    pub backoff_max_ms: u64,
}

impl Default for RawRetry {
    fn default() -> Self {
        RawRetry {
            max_retries: d_max_retries(),
            backoff_base_ms: d_backoff_base(),
            backoff_max_ms: d_backoff_max(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub id: Option<String>,
    pub provider: Option<String>,
    pub upstream_model: Option<String>,
    pub bucket: Option<String>,
    pub input_per_mtok: Option<Amount>,
    pub output_per_mtok: Option<Amount>,
    /// Price of input tokens read from the provider's prompt cache; default `input_per_mtok`.
    pub cache_read_per_mtok: Option<Amount>,
    /// Price of input tokens written to the provider's prompt cache; default `input_per_mtok`.
    pub cache_write_per_mtok: Option<Amount>,
    pub priority: Option<i64>,
    pub weight: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub name: Option<String>,
    #[serde(default = "d_endpoints")]
    pub endpoints: Vec<String>,
    #[serde(default = "d_tokenizer")]
    pub tokenizer: String,
    #[serde(default)]
    pub retry: RawRetry,
    pub routes: Option<Vec<RawRoute>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    pub name: Option<String>,
    pub secret: Option<String>,
    pub workspace: Option<String>,
    pub project: Option<String>,
    pub models: Option<Vec<String>>,
    pub buckets: Option<Vec<String>>,
    #[serde(default)]
    pub allow_cross_bucket_fallback: bool,
    pub rpm: Option<u32>,
    pub tpm: Option<u64>,
    pub max_concurrent_streams: Option<u32>,
    #[serde(default)]
    pub topup: BTreeMap<String, Amount>,
}

fn d_listen() -> String {
    "127.0.0.1:8080".into()
}
fn d_admin_listen() -> String {
    "127.0.0.1:8081".into()
}
fn d_data_dir() -> String {
    "./data".into()
}
fn d_max_body() -> u64 {
    4 * 1024 * 1024
}
fn d_client_idle() -> u64 {
    60
}
fn d_client_request_timeout() -> u64 {
    10_000
}
fn d_drain() -> u64 {
    30
}
fn d_console_session() -> u64 {
    8 * 3600
}
fn d_max_messages() -> u64 {
    2048
}
fn d_flush() -> u64 {
    50
}
fn d_initial_hold() -> u64 {
    32
}
fn d_max_hold() -> u64 {
    1024
}
fn d_default_max_tokens() -> u64 {
    4096
}
fn d_wallet_idle() -> u64 {
    60
}
fn d_retention() -> u32 {
    90
}
fn d_store_kind() -> String {
    "sled".into()
}
fn d_pool_size() -> u32 {
    16
}
fn d_lease_ttl() -> u64 {
    10_000
}
fn d_budget_ratio() -> f64 {
    0.2
}
fn d_budget_min() -> f64 {
    10.0
}
fn d_bucket_kind() -> String {
    "official".into()
}
fn d_display_scale() -> u32 {
    6
}
fn d_failure_threshold() -> u32 {
    5
}
fn d_failure_rate() -> f64 {
    0.5
}
fn d_window_s() -> u64 {
    10
}
fn d_min_requests() -> u32 {
    20
}
fn d_open_ms() -> u64 {
    5000
}
fn d_max_open_ms() -> u64 {
    60_000
}
fn d_probe_interval() -> u64 {
    15_000
}
fn d_probe_kind() -> String {
    "models".into()
}
fn d_mock_ttft() -> u64 {
    50
}
fn d_mock_tokens() -> u32 {
    64
}
fn d_mock_interval() -> u64 {
    20
}
fn d_provider_kind() -> String {
    "http".into()
}
fn d_http2() -> String {
    "auto".into()
}
fn d_connect_timeout() -> u64 {
    2000
}
fn d_first_token_timeout() -> u64 {
    30_000
}
fn d_idle_timeout() -> u64 {
    60_000
}
fn d_max_retries() -> u32 {
    1
}
fn d_backoff_base() -> u64 {
    50
}
fn d_backoff_max() -> u64 {
    2000
}
fn d_api() -> String {
    "openai".into()
}
fn d_endpoints() -> Vec<String> {
    vec!["chat".into()]
}
fn d_tokenizer() -> String {
    "o200k_base".into()
}
