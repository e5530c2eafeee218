//! Configuration: the raw TOML types (`raw.rs`) are checked into [`Config`] (`validate.rs`), whose
//! cross-references (route → provider, route → bucket, key → model) are resolved and whose
//! problems are reported all at once, one line each, naming the offending key.

mod money;
pub mod raw;
mod validate;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use rust_decimal::Decimal;

use crate::metering::tokenizer::TokenizerKind;
pub use validate::{load_file, parse_str, ConfigProblems};

/// A checked configuration. Built only by [`parse_str`]/[`load_file`].
#[derive(Debug, Clone)]
pub struct Config {
    pub server: Server,
    pub settlement: Settlement,
    pub ledger: Ledger,
    pub routing: Routing,
    pub store: StoreConfig,
    pub buckets: BTreeMap<String, Arc<Bucket>>,
    pub providers: Vec<Arc<Provider>>,
    pub models: Vec<Arc<Model>>,
    pub keys: Vec<BootstrapKey>,
    /// Unix seconds when the configuration was loaded (`created` in `/v1/models`).
    pub loaded_at: i64,
    /// The file it was read from (`None` when parsed from a string).
    pub path: Option<PathBuf>,
}

impl Config {
    pub fn model(&self, name: &str) -> Option<&Arc<Model>> {
        self.models.iter().find(|m| m.name == name)
    }
    pub fn provider(&self, id: &str) -> Option<&Arc<Provider>> {
        self.providers.iter().find(|p| p.id == id)
    }
    pub fn routes(&self) -> impl Iterator<Item = (&Arc<Model>, &Arc<Route>)> {
        self.models
            .iter()
            .flat_map(|m| m.routes.iter().map(move |r| (m, r)))
    }

    /// What is allowed but probably a mistake, one line each with its key path: a provider key
    /// (`api_key_env`) sent over plain `http://` to a host that is not loopback travels in clear.
    /// `serve` logs these at start and `check-config` prints them.
    pub fn warnings(&self) -> Vec<String> {
        self.providers
            .iter()
            .enumerate()
            .filter(|(_, p)| p.api_key_env.is_some() && cleartext_remote(&p.base_url))
            .map(|(i, p)| {
                format!(
                    "providers[{i}].base_url: provider \"{}\" sends its key (api_key_env) over plain http:// to {}, which is not loopback: anyone on the path can read it (use https://)",
                    p.id, p.base_url
                )
            })
            .collect()
    }
}

/// An `http://` URL whose host is not a loopback address (or `localhost`).
fn cleartext_remote(url: &str) -> bool {
    if !url.starts_with("http://") {
        return false;
    }
    let Some(host) = url
        .parse::<http::Uri>()
        .ok()
        .and_then(|u| u.host().map(str::to_owned))
    else {
        return true;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    !loopback
}

#[derive(Debug, Clone)]
pub struct Server {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// Where the admin token comes from: `Inline(token)` or `Env(variable)`; resolved at start.
    pub admin_token: AdminToken,
    pub data_dir: PathBuf,
    pub max_body_bytes: usize,
    pub workers: usize,
    pub tls: Option<Tls>,
    pub client_idle_timeout_s: u64,
    pub client_request_timeout_ms: u64,
    pub shutdown_drain_s: u64,
    pub max_messages: usize,
    /// Seconds an operator console session lasts after its login.
    pub console_session_ttl_s: u64,
}

#[derive(Clone)]
pub enum AdminToken {
    Inline(String),
    Env(String),
}

/// Never the inline token itself (R42), should a config ever be debug-printed.
impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdminToken::Inline(_) => f.write_str("Inline([redacted])"),
            AdminToken::Env(var) => f.debug_tuple("Env").field(var).finish(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Settlement {
    pub flush_interval_ms: u64,
    pub initial_output_hold_tokens: u64,
    pub max_output_hold_tokens: u64,
    pub default_max_tokens: u64,
    pub wallet_idle_s: u64,
}

#[derive(Debug, Clone)]
pub struct Ledger {
    pub retention_days: u32,
}

/// sled's page cache when `store.cache_mb` is not set, MiB.
pub const DEFAULT_SLED_CACHE_MB: u64 = 8;

/// `[store]`, checked.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreConfig {
    /// The embedded store in `server.data_dir`: one process owns it. `cache_bytes` bounds sled's
    /// page cache, a large part of the process's resident memory.
    Sled { cache_bytes: u64 },
    /// A PostgreSQL database shared by every instance of a fleet.
    Postgres(PostgresStore),
}

#[derive(Debug, Clone, PartialEq)]
pub struct PostgresStore {
    /// The environment variable that holds the connection URL (read at start).
    pub url_env: String,
    pub pool_size: usize,
    /// Names this instance in leases, open holds and `/admin/routes`.
    pub instance_id: String,
    pub lease_ttl_ms: u64,
}

#[derive(Debug, Clone)]
pub struct Routing {
    pub retry_budget_ratio: f64,
    pub retry_budget_min_per_s: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteKind {
    Official,
    Routed,
}

impl RouteKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::Official => "official",
            RouteKind::Routed => "routed",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Bucket {
    pub name: String,
    pub currency: String,
    pub kind: RouteKind,
    pub display_scale: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Http2Mode {
    Auto,
    Always,
    Never,
}

#[derive(Debug, Clone)]
pub enum ProviderKind {
    Http,
    /// Served by this process: the built-in mock upstream.
    Mock {
        listen: SocketAddr,
        ttft_ms: u64,
        tokens: u32,
        interval_ms: u64,
    },
}

#[derive(Debug, Clone)]
pub struct Circuit {
    pub failure_threshold: u32,
    pub failure_rate: f64,
    pub window_s: u64,
    pub min_requests: u32,
    pub open_ms: u64,
    pub max_open_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    Models,
    Chat,
}

#[derive(Debug, Clone)]
pub struct Probe {
    pub interval_ms: u64,
    pub kind: ProbeKind,
}

/// The wire format a provider speaks: which client endpoints its routes can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// OpenAI's: chat completions, embeddings, responses.
    OpenAi,
    /// Anthropic's: messages.
    Anthropic,
}

impl Api {
    pub fn as_str(self) -> &'static str {
        match self {
            Api::OpenAi => "openai",
            Api::Anthropic => "anthropic",
        }
    }

    /// Can a route on a provider of this format serve `endpoint`? No translation between the
    /// formats exists, so each endpoint needs its own.
    pub fn serves(self, endpoint: Endpoint) -> bool {
        match endpoint {
            Endpoint::Chat | Endpoint::Embeddings | Endpoint::Responses => self == Api::OpenAi,
            Endpoint::Messages => self == Api::Anthropic,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Provider {
    pub id: String,
    pub kind: ProviderKind,
    pub api: Api,
    /// For kind `mock` this is empty until the mock is bound; `serve` fills it in.
    pub base_url: String,
    pub api_key_env: Option<String>,
    pub http2: Http2Mode,
    pub connect_timeout_ms: u64,
    pub first_token_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub circuit: Circuit,
    pub probe: Option<Probe>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    Chat,
    Embeddings,
    Responses,
    Messages,
}

impl Endpoint {
    /// The name in config files and the catalog.
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Responses => "responses",
            Endpoint::Messages => "messages",
        }
    }

    /// The ledger record's `endpoint`.
    pub fn ledger_name(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat.completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Responses => "responses",
            Endpoint::Messages => "messages",
        }
    }

    /// The path under a provider's `base_url`.
    pub fn upstream_path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/chat/completions",
            Endpoint::Embeddings => "/embeddings",
            Endpoint::Responses => "/responses",
            Endpoint::Messages => "/messages",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Retry {
    pub max_retries: u32,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
}

#[derive(Debug, Clone)]
pub struct Route {
    pub id: String,
    pub model: String,
    pub provider: String,
    pub upstream_model: String,
    pub bucket: String,
    pub input_per_mtok: Decimal,
    pub output_per_mtok: Decimal,
    /// Input tokens read from / written to the provider's prompt cache (`input_per_mtok` unless
    /// the route sets them).
    pub cache_read_per_mtok: Decimal,
    pub cache_write_per_mtok: Decimal,
    pub priority: i64,
    pub weight: u32,
    /// Position of the route in the model's list (stable tie-break).
    pub position: usize,
}

#[derive(Debug, Clone)]
pub struct Model {
    pub name: String,
    pub endpoints: Vec<Endpoint>,
    pub tokenizer: TokenizerKind,
    pub retry: Retry,
    /// Sorted by (priority, position).
    pub routes: Vec<Arc<Route>>,
}

impl Model {
    pub fn serves(&self, endpoint: Endpoint) -> bool {
        self.endpoints.contains(&endpoint)
    }
}

#[derive(Clone)]
pub struct BootstrapKey {
    pub name: String,
    pub secret: String,
    pub workspace: String,
    pub project: String,
    pub models: Option<Vec<String>>,
    pub buckets: Option<Vec<String>>,
    pub allow_cross_bucket_fallback: bool,
    pub rpm: Option<u32>,
    pub tpm: Option<u64>,
    pub max_concurrent_streams: Option<u32>,
    pub topup: BTreeMap<String, Decimal>,
}

/// Never the secret itself (R42), should a config ever be debug-printed.
impl std::fmt::Debug for BootstrapKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootstrapKey")
            .field("name", &self.name)
            .field("secret", &"[redacted]")
            .field("workspace", &self.workspace)
            .field("project", &self.project)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    const MINIMAL: &str = r#"
[server]
admin_token = "admin-0123456789"

[buckets.credit]
currency = "USD"

[[providers]]
id = "demo"
kind = "mock"

[[models]]
name = "m"
routes = [{ provider = "demo", upstream_model = "u", bucket = "credit", input_per_mtok = "1", output_per_mtok = "2" }]
"#;

    #[test]
    fn the_store_is_sled_unless_postgres_is_asked_for() {
        let c = super::parse_str(MINIMAL).unwrap();
        assert_eq!(
            c.store,
            super::StoreConfig::Sled {
                cache_bytes: super::DEFAULT_SLED_CACHE_MB << 20
            }
        );
        let big = format!("{MINIMAL}\n[store]\ncache_mb = 256\n");
        assert_eq!(
            super::parse_str(&big).unwrap().store,
            super::StoreConfig::Sled {
                cache_bytes: 256 << 20
            }
        );
        for bad in [
            "cache_mb = 0",
            "cache_mb = 1048577",
            "kind = \"postgres\"\nurl_env = \"DB_URL\"\ncache_mb = 64",
        ] {
            let text = format!("{MINIMAL}\n[store]\n{bad}\n");
            let err = super::parse_str(&text).unwrap_err().to_string();
            assert!(err.contains("store.cache_mb"), "{err}");
        }
        let pg = format!(
            "{MINIMAL}\n[store]\nkind = \"postgres\"\nurl_env = \"DB_URL\"\ninstance_id = \"gw-1\"\n"
        );
        match super::parse_str(&pg).unwrap().store {
            super::StoreConfig::Postgres(p) => {
                assert_eq!(p.url_env, "DB_URL");
                assert_eq!(p.instance_id, "gw-1");
                assert_eq!(p.pool_size, 16);
                assert_eq!(p.lease_ttl_ms, 10_000);
            }
            other => panic!("{other:?}"),
        }
        let defaulted = format!("{MINIMAL}\n[store]\nkind = \"postgres\"\nurl_env = \"DB_URL\"\n");
        match super::parse_str(&defaulted).unwrap().store {
            super::StoreConfig::Postgres(p) => {
                assert!(
                    p.instance_id.ends_with(&format!("-{}", std::process::id())),
                    "{}",
                    p.instance_id
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn store_problems_are_named_by_key() {
        let problems = |store: &str| {
            super::parse_str(&format!("{MINIMAL}\n[store]\n{store}\n"))
                .unwrap_err()
                .0
        };
        let p = problems("kind = \"postgres\"");
        assert!(
            p.iter().any(|l| l.starts_with("store.url_env: missing")),
            "{p:?}"
        );
        let p = problems("kind = \"mysql\"");
        assert!(
            p.iter().any(|l| l.starts_with("store.kind: unknown store")),
            "{p:?}"
        );
        let p = problems("kind = \"postgres\"\nurl_env = \"U\"\npool_size = 0\nlease_ttl_ms = 50\ninstance_id = \"a b\"");
        for key in ["store.pool_size", "store.lease_ttl_ms", "store.instance_id"] {
            assert!(p.iter().any(|l| l.starts_with(key)), "{key}: {p:?}");
        }
        let p = problems("url_env = \"U\"");
        assert!(
            p.iter().any(|l| l.starts_with("store.url_env: only used")),
            "{p:?}"
        );
        let p = problems("kind = \"sled\"\nlease_ttls = 5");
        assert!(
            p.iter()
                .any(|l| l.starts_with("store:") && l.contains("lease_ttls")),
            "{p:?}"
        );
    }

    #[test]
    fn debug_output_carries_no_secret() {
        let config = super::parse_str(
            r#"
[server]
admin_token = "admin-0123456789"

[buckets.credit]
currency = "USD"

[[providers]]
id = "demo"
kind = "mock"

[[models]]
name = "m"
routes = [{ provider = "demo", upstream_model = "u", bucket = "credit", input_per_mtok = "1", output_per_mtok = "2" }]

[[keys]]
name = "demo"
secret = "tg-secret-0123456789"
"#,
        )
        .unwrap();
        let text = format!("{config:?}");
        assert!(text.contains("\"demo\""), "{text}");
        assert!(!text.contains("admin-0123456789"), "{text}");
        assert!(!text.contains("tg-secret-0123456789"), "{text}");
    }

    #[test]
    fn cleartext_warnings_name_remote_http_providers_with_a_key() {
        let config = super::parse_str(
            r#"
[server]
admin_token = "admin-0123456789"

[buckets.credit]
currency = "USD"

[[providers]]
id = "plain"
base_url = "http://10.0.0.7:8000/v1"
api_key_env = "K"

[[providers]]
id = "keyless"
base_url = "http://10.0.0.7:8000/v1"

[[providers]]
id = "local"
base_url = "http://[::1]:8000/v1"
api_key_env = "K"

[[providers]]
id = "tls"
base_url = "https://10.0.0.7/v1"
api_key_env = "K"

[[models]]
name = "m"
routes = [{ provider = "plain", upstream_model = "u", bucket = "credit", input_per_mtok = "1", output_per_mtok = "2" }]
"#,
        )
        .unwrap();
        let w = config.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with("providers[0].base_url: provider \"plain\""),
            "{w:?}"
        );
    }
}
