//! Checks a raw configuration and builds the [`Config`]. Every problem found is reported, one
//! line each, prefixed by the key path it concerns (`models[0].routes[1].bucket: ...`).

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rust_decimal::Decimal;
use serde::de::DeserializeOwned;
use toml::{Table, Value};

use super::raw::*;
use super::*;

/// All the problems of one configuration file, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblems(pub Vec<String>);

impl fmt::Display for ConfigProblems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigProblems {}

/// Reads and checks a configuration file.
pub fn load_file(path: &Path) -> Result<Config, ConfigProblems> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigProblems(vec![format!("{}: cannot read: {e}", path.display())]))?;
    let mut config = parse_str(&text)?;
    config.path = Some(path.to_path_buf());
    Ok(config)
}

/// The longest duration any `*_ms` key may set: 24 h.
pub const MAX_DURATION_MS: u64 = 86_400_000;
/// The longest duration any `*_s` key may set: 24 h.
pub const MAX_DURATION_S: u64 = 86_400;

const TOP_LEVEL: &[&str] = &[
    "server",
    "settlement",
    "ledger",
    "routing",
    "store",
    "buckets",
    "providers",
    "models",
    "keys",
];

struct Checker {
    problems: Vec<String>,
}

impl Checker {
    fn problem(&mut self, path: impl fmt::Display, msg: impl fmt::Display) {
        self.problems.push(format!("{path}: {msg}"));
    }

    /// Deserializes one value, recording a problem (with its key path) when it does not fit.
    fn decode<T: DeserializeOwned>(&mut self, path: &str, value: Value) -> Option<T> {
        match T::deserialize(value) {
            Ok(v) => Some(v),
            Err(e) => {
                self.problem(path, one_line(e.message()));
                None
            }
        }
    }

    fn section<T: DeserializeOwned + Default>(&mut self, table: &Table, name: &str) -> T {
        match table.get(name) {
            None => T::default(),
            Some(v) => self.decode(name, v.clone()).unwrap_or_default(),
        }
    }

    fn array<T: DeserializeOwned>(&mut self, table: &Table, name: &str) -> Vec<Option<T>> {
        match table.get(name) {
            None => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| self.decode(&format!("{name}[{i}]"), v.clone()))
                .collect(),
            Some(_) => {
                self.problem(name, format!("expected an array of tables ([[{name}]])"));
                Vec::new()
            }
        }
    }

    fn addr(&mut self, path: &str, text: &str) -> Option<SocketAddr> {
        match text.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.problem(
                    path,
                    format!("\"{text}\" is not a listen address (expected IP:PORT, e.g. \"127.0.0.1:8080\")"),
                );
                None
            }
        }
    }

    fn required<'a, T>(&mut self, path: &str, v: &'a Option<T>) -> Option<&'a T> {
        if v.is_none() {
            self.problem(path, "missing (required)");
        }
        v.as_ref()
    }

    /// A duration in milliseconds: at most [`MAX_DURATION_MS`] (a larger one would overflow the
    /// deadlines built from it).
    fn duration_ms(&mut self, path: impl fmt::Display, v: u64) {
        if v > MAX_DURATION_MS {
            self.problem(path, format!("must be at most {MAX_DURATION_MS} (24 h)"));
        }
    }

    /// A duration in seconds: at most [`MAX_DURATION_S`].
    fn duration_s(&mut self, path: impl fmt::Display, v: u64) {
        if v > MAX_DURATION_S {
            self.problem(path, format!("must be at most {MAX_DURATION_S} (24 h)"));
        }
    }

    fn non_negative(&mut self, path: &str, v: Decimal) -> Decimal {
        if v.is_sign_negative() && !v.is_zero() {
            self.problem(path, format!("must not be negative (got {v})"));
        }
        v
    }
}

/// One line per problem (R36): toml's messages can span lines.
fn one_line(message: &str) -> String {
    message
        .trim()
        .lines()
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Parses and checks configuration text.
pub fn parse_str(text: &str) -> Result<Config, ConfigProblems> {
    let table: Table = match text.parse::<Table>() {
        Ok(t) => t,
        Err(e) => {
            let msg = one_line(e.message());
            let at = e
                .span()
                .map(|s| {
                    let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
                    format!("line {line}")
                })
                .unwrap_or_else(|| "toml".into());
            return Err(ConfigProblems(vec![format!("{at}: {msg}")]));
        }
    };
    let mut c = Checker {
        problems: Vec::new(),
    };
    for k in table.keys() {
        if !TOP_LEVEL.contains(&k.as_str()) {
            c.problem(
                k,
                format!("unknown key (expected one of: {})", TOP_LEVEL.join(", ")),
            );
        }
    }
    let server: RawServer = c.section(&table, "server");
    let settlement: RawSettlement = c.section(&table, "settlement");
    let ledger: RawLedger = c.section(&table, "ledger");
    let routing: RawRouting = c.section(&table, "routing");
    let store: RawStore = c.section(&table, "store");
    let raw_buckets: BTreeMap<String, Option<RawBucket>> = match table.get("buckets") {
        None => BTreeMap::new(),
        Some(Value::Table(t)) => t
            .iter()
            .map(|(k, v)| (k.clone(), c.decode(&format!("buckets.{k}"), v.clone())))
            .collect(),
        Some(_) => {
            c.problem("buckets", "expected a table of buckets ([buckets.NAME])");
            BTreeMap::new()
        }
    };
    let raw_providers: Vec<Option<RawProvider>> = c.array(&table, "providers");
    let raw_models: Vec<Option<RawModel>> = c.array(&table, "models");
    let raw_keys: Vec<Option<RawKey>> = c.array(&table, "keys");

    let server = check_server(&mut c, server);
    let settlement = check_settlement(&mut c, settlement);
    let store = check_store(&mut c, store, settlement.as_ref());
    if !(routing.retry_budget_ratio >= 0.0 && routing.retry_budget_ratio.is_finite()) {
        c.problem("routing.retry_budget_ratio", "must be a number >= 0");
    }
    if !(routing.retry_budget_min_per_s >= 0.0 && routing.retry_budget_min_per_s.is_finite()) {
        c.problem("routing.retry_budget_min_per_s", "must be a number >= 0");
    }

    let buckets = check_buckets(&mut c, raw_buckets);
    let providers = check_providers(&mut c, raw_providers);
    let models = check_models(&mut c, raw_models, &buckets, &providers);
    let keys = check_keys(&mut c, raw_keys, &buckets, &models);

    if !c.problems.is_empty() {
        return Err(ConfigProblems(c.problems));
    }
    let (Some(server), Some(settlement), Some(store)) = (server, settlement, store) else {
        return Err(ConfigProblems(vec!["config: invalid".into()]));
    };
    Ok(Config {
        server,
        settlement,
        ledger: Ledger {
            retention_days: ledger.retention_days,
        },
        routing: Routing {
            retry_budget_ratio: routing.retry_budget_ratio,
            retry_budget_min_per_s: routing.retry_budget_min_per_s,
        },
        store,
        buckets,
        providers,
        models,
        keys,
        loaded_at: chrono::Utc::now().timestamp(),
        path: None,
    })
}

fn check_server(c: &mut Checker, s: RawServer) -> Option<Server> {
    let listen = c.addr("server.listen", &s.listen);
    let admin_listen = c.addr("server.admin_listen", &s.admin_listen);
    if let (Some(a), Some(b)) = (listen, admin_listen) {
        if a == b && a.port() != 0 {
            c.problem(
                "server.admin_listen",
                format!("must differ from server.listen (both are {a})"),
            );
        }
    }
    let admin_token = match (s.admin_token, s.admin_token_env) {
        (Some(_), Some(_)) => {
            c.problem(
                "server.admin_token",
                "set either admin_token or admin_token_env, not both",
            );
            None
        }
        (Some(t), None) => {
            if t.trim().is_empty() {
                c.problem("server.admin_token", "must not be empty");
            }
            Some(AdminToken::Inline(t))
        }
        (None, Some(env)) => Some(AdminToken::Env(env)),
        (None, None) => Some(AdminToken::Env("TOLLGATE_ADMIN_TOKEN".into())),
    };
    if s.max_body_bytes == 0 {
        c.problem("server.max_body_bytes", "must be > 0");
    }
    if s.max_messages == 0 {
        c.problem("server.max_messages", "must be >= 1");
    }
    if s.data_dir.trim().is_empty() {
        c.problem("server.data_dir", "must not be empty");
    }
    c.duration_s("server.client_idle_timeout_s", s.client_idle_timeout_s);
    if s.client_request_timeout_ms == 0 {
        c.problem("server.client_request_timeout_ms", "must be >= 1");
    }
    c.duration_ms(
        "server.client_request_timeout_ms",
        s.client_request_timeout_ms,
    );
    c.duration_s("server.shutdown_drain_s", s.shutdown_drain_s);
    if s.console_session_ttl_s == 0 {
        c.problem("server.console_session_ttl_s", "must be >= 1");
    }
    c.duration_s("server.console_session_ttl_s", s.console_session_ttl_s);
    let workers = match s.workers {
        Some(0) => {
            c.problem("server.workers", "must be >= 1");
            1
        }
        Some(n) => n as usize,
        None => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2),
    };
    Some(Server {
        listen: listen?,
        admin_listen: admin_listen?,
        admin_token: admin_token?,
        data_dir: PathBuf::from(s.data_dir),
        max_body_bytes: usize::try_from(s.max_body_bytes).unwrap_or(usize::MAX),
        workers,
        tls: s.tls.map(|t| Tls {
            cert: PathBuf::from(t.cert),
            key: PathBuf::from(t.key),
        }),
        client_idle_timeout_s: s.client_idle_timeout_s,
        client_request_timeout_ms: s.client_request_timeout_ms,
        shutdown_drain_s: s.shutdown_drain_s,
        max_messages: usize::try_from(s.max_messages).unwrap_or(usize::MAX),
        console_session_ttl_s: s.console_session_ttl_s,
    })
}

/// The largest `store.cache_mb` (1 TiB): sled's cache is counted in bytes.
const MAX_SLED_CACHE_MB: u64 = 1 << 20;

/// The longest `store.instance_id`: it is written into every lease and open hold.
const MAX_INSTANCE_ID: usize = 64;

fn check_store(
    c: &mut Checker,
    s: RawStore,
    settlement: Option<&Settlement>,
) -> Option<StoreConfig> {
    match s.kind.as_str() {
        "sled" => {
            // The PostgreSQL keys mean nothing to sled: setting them is a mistake worth naming.
            if s.url_env.is_some() {
                c.problem("store.url_env", "only used with kind = \"postgres\"");
            }
            if s.instance_id.is_some() {
                c.problem("store.instance_id", "only used with kind = \"postgres\"");
            }
            let cache_mb = s.cache_mb.unwrap_or(DEFAULT_SLED_CACHE_MB);
            if cache_mb == 0 || cache_mb > MAX_SLED_CACHE_MB {
                c.problem(
                    "store.cache_mb",
                    format!("must be between 1 and {MAX_SLED_CACHE_MB}"),
                );
            }
            Some(StoreConfig::Sled {
                cache_bytes: cache_mb << 20,
            })
        }
        "postgres" => {
            if s.cache_mb.is_some() {
                c.problem("store.cache_mb", "only used with kind = \"sled\"");
            }
            let url_env = match s.url_env {
                Some(v) if !v.trim().is_empty() => Some(v),
                Some(_) => {
                    c.problem("store.url_env", "must name an environment variable");
                    None
                }
                None => {
                    c.problem(
                        "store.url_env",
                        "missing (required with kind = \"postgres\": the environment variable that holds the connection URL)",
                    );
                    None
                }
            };
            if s.pool_size == 0 || s.pool_size > 1024 {
                c.problem("store.pool_size", "must be between 1 and 1024");
            }
            let instance_id = match s.instance_id {
                Some(id) => {
                    let printable = id.bytes().all(|b| b.is_ascii_graphic());
                    if id.is_empty() || id.len() > MAX_INSTANCE_ID || !printable {
                        c.problem(
                            "store.instance_id",
                            format!("must be 1 to {MAX_INSTANCE_ID} printable ASCII characters without spaces"),
                        );
                    }
                    id
                }
                None => default_instance_id(),
            };
            if s.lease_ttl_ms < 100 {
                c.problem("store.lease_ttl_ms", "must be >= 100");
            }
            c.duration_ms("store.lease_ttl_ms", s.lease_ttl_ms);
            if let Some(st) = settlement {
                // Leases are renewed at a third of their TTL and holds persisted every flush:
                // a TTL shorter than a few flushes would reap live instances.
                if s.lease_ttl_ms < st.flush_interval_ms.saturating_mul(4) {
                    c.problem(
                        "store.lease_ttl_ms",
                        format!(
                            "must be at least 4 × settlement.flush_interval_ms ({})",
                            st.flush_interval_ms.saturating_mul(4)
                        ),
                    );
                }
            }
            Some(StoreConfig::Postgres(PostgresStore {
                url_env: url_env?,
                pool_size: s.pool_size as usize,
                instance_id,
                lease_ttl_ms: s.lease_ttl_ms,
            }))
        }
        other => {
            c.problem(
                "store.kind",
                format!("unknown store \"{other}\" (expected sled or postgres)"),
            );
            None
        }
    }
}

/// `hostname-pid`: unique among the instances of a fleet that run on distinct hosts or as
/// distinct processes.
fn default_instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "tollgate".into());
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(48)
        .collect();
    format!("{host}-{}", std::process::id())
}

fn check_settlement(c: &mut Checker, s: RawSettlement) -> Option<Settlement> {
    if s.flush_interval_ms == 0 {
        c.problem("settlement.flush_interval_ms", "must be >= 1");
    }
    c.duration_ms("settlement.flush_interval_ms", s.flush_interval_ms);
    c.duration_s("settlement.wallet_idle_s", s.wallet_idle_s);
    if s.initial_output_hold_tokens == 0 {
        c.problem("settlement.initial_output_hold_tokens", "must be >= 1");
    }
    if s.max_output_hold_tokens < s.initial_output_hold_tokens {
        c.problem(
            "settlement.max_output_hold_tokens",
            format!(
                "must be >= initial_output_hold_tokens ({})",
                s.initial_output_hold_tokens
            ),
        );
    }
    if s.default_max_tokens == 0 {
        c.problem("settlement.default_max_tokens", "must be >= 1");
    }
    Some(Settlement {
        flush_interval_ms: s.flush_interval_ms.max(1),
        initial_output_hold_tokens: s.initial_output_hold_tokens.max(1),
        max_output_hold_tokens: s.max_output_hold_tokens.max(1),
        default_max_tokens: s.default_max_tokens.max(1),
        wallet_idle_s: s.wallet_idle_s,
    })
}

fn check_buckets(
    c: &mut Checker,
    raw: BTreeMap<String, Option<RawBucket>>,
) -> BTreeMap<String, Arc<Bucket>> {
    if raw.is_empty() {
        c.problem(
            "buckets",
            "at least one bucket is required ([buckets.NAME] with a currency)",
        );
    }
    let mut out = BTreeMap::new();
    for (name, b) in raw {
        let Some(b) = b else { continue };
        let path = format!("buckets.{name}");
        let currency = match &b.currency {
            Some(cur) if !cur.trim().is_empty() => cur.trim().to_string(),
            Some(_) => {
                c.problem(format!("{path}.currency"), "must not be empty");
                continue;
            }
            None => {
                c.problem(format!("{path}.currency"), "missing (required)");
                continue;
            }
        };
        let kind = match b.kind.as_str() {
            "official" => RouteKind::Official,
            "routed" => RouteKind::Routed,
            other => {
                c.problem(
                    format!("{path}.kind"),
                    format!("\"{other}\" is not one of \"official\", \"routed\""),
                );
                continue;
            }
        };
        if b.display_scale > 28 {
            c.problem(format!("{path}.display_scale"), "must be at most 28");
        }
        out.insert(
            name.clone(),
            Arc::new(Bucket {
                name,
                currency,
                kind,
                display_scale: b.display_scale.min(28),
            }),
        );
    }
    out
}

fn check_providers(c: &mut Checker, raw: Vec<Option<RawProvider>>) -> Vec<Arc<Provider>> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (i, p) in raw.into_iter().enumerate() {
        let Some(p) = p else { continue };
        let path = format!("providers[{i}]");
        let Some(id) = c.required(&format!("{path}.id"), &p.id).cloned() else {
            continue;
        };
        if !seen.insert(id.clone()) {
            c.problem(
                format!("{path}.id"),
                format!("duplicate provider id \"{id}\""),
            );
        }
        let kind = match p.kind.as_str() {
            "http" | "openai" => {
                if p.listen.is_some() {
                    c.problem(
                        format!("{path}.listen"),
                        "only for providers of kind \"mock\"",
                    );
                }
                if p.mock.is_some() {
                    c.problem(
                        format!("{path}.mock"),
                        "only for providers of kind \"mock\"",
                    );
                }
                ProviderKind::Http
            }
            "mock" => {
                let listen = match &p.listen {
                    Some(l) => c.addr(&format!("{path}.listen"), l),
                    None => Some(SocketAddr::from(([127, 0, 0, 1], 0))),
                };
                // R44: the built-in mock has no authentication and runs in this process.
                if let Some(a) = listen.filter(|a| !a.ip().is_loopback()) {
                    c.problem(
                        format!("{path}.listen"),
                        format!("\"{a}\" is not a loopback address (a built-in mock listens on 127.0.0.1 or ::1 only)"),
                    );
                }
                let m = p.mock.clone().unwrap_or_default();
                c.duration_ms(format!("{path}.mock.ttft_ms"), m.ttft_ms);
                c.duration_ms(format!("{path}.mock.interval_ms"), m.interval_ms);
                if u64::from(m.tokens) > crate::mock::MAX_TOKENS {
                    c.problem(
                        format!("{path}.mock.tokens"),
                        format!("must be at most {}", crate::mock::MAX_TOKENS),
                    );
                }
                match listen {
                    Some(listen) => ProviderKind::Mock {
                        listen,
                        ttft_ms: m.ttft_ms,
                        tokens: m.tokens,
                        interval_ms: m.interval_ms,
                    },
                    None => continue,
                }
            }
            other => {
                c.problem(
                    format!("{path}.kind"),
                    format!("\"{other}\" is not one of \"http\", \"mock\""),
                );
                continue;
            }
        };
        let base_url = match (&kind, &p.base_url) {
            (ProviderKind::Http, None) => {
                c.problem(
                    format!("{path}.base_url"),
                    "missing (required for providers that are not kind \"mock\")",
                );
                String::new()
            }
            (ProviderKind::Http, Some(u)) => {
                if !(u.starts_with("http://") || u.starts_with("https://")) {
                    c.problem(
                        format!("{path}.base_url"),
                        format!("\"{u}\" must start with http:// or https://"),
                    );
                } else if u.parse::<http::Uri>().is_err() {
                    c.problem(
                        format!("{path}.base_url"),
                        format!("\"{u}\" is not a valid URL"),
                    );
                }
                u.trim_end_matches('/').to_string()
            }
            (ProviderKind::Mock { .. }, Some(_)) => {
                c.problem(
                    format!("{path}.base_url"),
                    "not used for kind \"mock\" (the mock's address comes from listen)",
                );
                String::new()
            }
            (ProviderKind::Mock { .. }, None) => String::new(),
        };
        let api = match p.api.as_str() {
            "openai" => Api::OpenAi,
            "anthropic" => Api::Anthropic,
            other => {
                c.problem(
                    format!("{path}.api"),
                    format!("\"{other}\" is not one of \"openai\", \"anthropic\""),
                );
                Api::OpenAi
            }
        };
        let http2 = match p.http2.as_str() {
            "auto" => Http2Mode::Auto,
            "always" => Http2Mode::Always,
            "never" => Http2Mode::Never,
            other => {
                c.problem(
                    format!("{path}.http2"),
                    format!("\"{other}\" is not one of \"auto\", \"always\", \"never\""),
                );
                Http2Mode::Auto
            }
        };
        for (field, v) in [
            ("connect_timeout_ms", p.connect_timeout_ms),
            ("first_token_timeout_ms", p.first_token_timeout_ms),
            ("idle_timeout_ms", p.idle_timeout_ms),
        ] {
            if v == 0 {
                c.problem(format!("{path}.{field}"), "must be >= 1");
            }
            c.duration_ms(format!("{path}.{field}"), v);
        }
        let cc = &p.circuit;
        if cc.failure_threshold == 0 {
            c.problem(format!("{path}.circuit.failure_threshold"), "must be >= 1");
        }
        if !(cc.failure_rate > 0.0 && cc.failure_rate <= 1.0) {
            c.problem(format!("{path}.circuit.failure_rate"), "must be in (0, 1]");
        }
        if cc.window_s == 0 {
            c.problem(format!("{path}.circuit.window_s"), "must be >= 1");
        }
        c.duration_s(format!("{path}.circuit.window_s"), cc.window_s);
        c.duration_ms(format!("{path}.circuit.open_ms"), cc.open_ms);
        c.duration_ms(format!("{path}.circuit.max_open_ms"), cc.max_open_ms);
        if cc.open_ms == 0 || cc.max_open_ms < cc.open_ms {
            c.problem(
                format!("{path}.circuit.max_open_ms"),
                "open_ms must be >= 1 and max_open_ms >= open_ms",
            );
        }
        let probe = match &p.probe {
            None => None,
            Some(pr) => {
                let kind = match pr.kind.as_str() {
                    "models" => ProbeKind::Models,
                    "chat" => ProbeKind::Chat,
                    other => {
                        c.problem(
                            format!("{path}.probe.kind"),
                            format!("\"{other}\" is not one of \"models\", \"chat\""),
                        );
                        ProbeKind::Models
                    }
                };
                if pr.interval_ms < 100 {
                    c.problem(format!("{path}.probe.interval_ms"), "must be >= 100");
                }
                c.duration_ms(format!("{path}.probe.interval_ms"), pr.interval_ms);
                Some(Probe {
                    interval_ms: pr.interval_ms.max(100),
                    kind,
                })
            }
        };
        if let Some(env) = &p.api_key_env {
            if env.trim().is_empty() {
                c.problem(format!("{path}.api_key_env"), "must not be empty");
            }
        }
        out.push(Arc::new(Provider {
            id,
            kind,
            api,
            base_url,
            api_key_env: p.api_key_env.clone(),
            http2,
            connect_timeout_ms: p.connect_timeout_ms.max(1),
            first_token_timeout_ms: p.first_token_timeout_ms.max(1),
            idle_timeout_ms: p.idle_timeout_ms.max(1),
            circuit: Circuit {
                failure_threshold: cc.failure_threshold.max(1),
                failure_rate: cc.failure_rate,
                window_s: cc.window_s.max(1),
                min_requests: cc.min_requests,
                open_ms: cc.open_ms.max(1),
                max_open_ms: cc.max_open_ms.max(cc.open_ms.max(1)),
            },
            probe,
        }));
    }
    out
}

fn check_models(
    c: &mut Checker,
    raw: Vec<Option<RawModel>>,
    buckets: &BTreeMap<String, Arc<Bucket>>,
    providers: &[Arc<Provider>],
) -> Vec<Arc<Model>> {
    let mut out = Vec::new();
    let mut names = HashSet::new();
    let mut route_ids: HashSet<String> = HashSet::new();
    for (i, m) in raw.into_iter().enumerate() {
        let Some(m) = m else { continue };
        let path = format!("models[{i}]");
        let Some(name) = c.required(&format!("{path}.name"), &m.name).cloned() else {
            continue;
        };
        if name.trim().is_empty() {
            c.problem(format!("{path}.name"), "must not be empty");
        }
        if !names.insert(name.clone()) {
            c.problem(
                format!("{path}.name"),
                format!("duplicate model name \"{name}\""),
            );
        }
        let mut endpoints = Vec::new();
        for (j, e) in m.endpoints.iter().enumerate() {
            match e.as_str() {
                "chat" => endpoints.push(Endpoint::Chat),
                "embeddings" => endpoints.push(Endpoint::Embeddings),
                "responses" => endpoints.push(Endpoint::Responses),
                "messages" => endpoints.push(Endpoint::Messages),
                other => c.problem(
                    format!("{path}.endpoints[{j}]"),
                    format!("\"{other}\" is not one of \"chat\", \"embeddings\", \"responses\", \"messages\""),
                ),
            }
        }
        if m.endpoints.is_empty() {
            c.problem(
                format!("{path}.endpoints"),
                "must list at least one endpoint",
            );
        }
        let tokenizer = match m.tokenizer.as_str() {
            "o200k_base" => TokenizerKind::O200kBase,
            "cl100k_base" => TokenizerKind::Cl100kBase,
            "chunks" => TokenizerKind::Chunks,
            other => {
                c.problem(
                    format!("{path}.tokenizer"),
                    format!(
                        "\"{other}\" is not one of \"o200k_base\", \"cl100k_base\", \"chunks\""
                    ),
                );
                TokenizerKind::Chunks
            }
        };
        c.duration_ms(
            format!("{path}.retry.backoff_base_ms"),
            m.retry.backoff_base_ms,
        );
        c.duration_ms(
            format!("{path}.retry.backoff_max_ms"),
            m.retry.backoff_max_ms,
        );
        if m.retry.backoff_max_ms < m.retry.backoff_base_ms {
            c.problem(
                format!("{path}.retry.backoff_max_ms"),
                "must be >= backoff_base_ms",
            );
        }
        let Some(raw_routes) = c.required(&format!("{path}.routes"), &m.routes).cloned() else {
            continue;
        };
        if raw_routes.is_empty() {
            c.problem(format!("{path}.routes"), "must list at least one route");
        }
        let mut routes = Vec::new();
        for (j, r) in raw_routes.into_iter().enumerate() {
            let rp = format!("{path}.routes[{j}]");
            let provider = c.required(&format!("{rp}.provider"), &r.provider).cloned();
            let upstream_model = c
                .required(&format!("{rp}.upstream_model"), &r.upstream_model)
                .cloned();
            let bucket = c.required(&format!("{rp}.bucket"), &r.bucket).cloned();
            let input = c
                .required(&format!("{rp}.input_per_mtok"), &r.input_per_mtok)
                .copied();
            let output = c
                .required(&format!("{rp}.output_per_mtok"), &r.output_per_mtok)
                .copied();
            if let Some(p) = &provider {
                match providers.iter().find(|x| &x.id == p) {
                    None => c.problem(
                        format!("{rp}.provider"),
                        format!("unknown provider \"{p}\" (declare it under [[providers]])"),
                    ),
                    // A route serves an endpoint only in its provider's wire format.
                    Some(x) => {
                        for e in endpoints.iter().filter(|e| !x.api.serves(**e)) {
                            c.problem(
                                format!("{rp}.provider"),
                                format!(
                                    "provider \"{p}\" speaks api \"{}\", which cannot serve the model's endpoint \"{}\" (use a provider with api = \"{}\", or drop the endpoint)",
                                    x.api.as_str(),
                                    e.as_str(),
                                    if x.api == Api::OpenAi { "anthropic" } else { "openai" },
                                ),
                            );
                        }
                    }
                }
            }
            if let Some(b) = &bucket {
                if !buckets.contains_key(b) {
                    c.problem(
                        format!("{rp}.bucket"),
                        format!("unknown bucket \"{b}\" (declare it as [buckets.{b}])"),
                    );
                }
            }
            if let Some(u) = &upstream_model {
                if u.trim().is_empty() {
                    c.problem(format!("{rp}.upstream_model"), "must not be empty");
                }
            }
            let input = input.map(|a| c.non_negative(&format!("{rp}.input_per_mtok"), a.0));
            let output = output.map(|a| c.non_negative(&format!("{rp}.output_per_mtok"), a.0));
            let cache_read = r
                .cache_read_per_mtok
                .map(|a| c.non_negative(&format!("{rp}.cache_read_per_mtok"), a.0));
            let cache_write = r
                .cache_write_per_mtok
                .map(|a| c.non_negative(&format!("{rp}.cache_write_per_mtok"), a.0));
            if r.weight == Some(0) {
                c.problem(format!("{rp}.weight"), "must be >= 1");
            }
            let (Some(provider), Some(upstream_model), Some(bucket), Some(input), Some(output)) =
                (provider, upstream_model, bucket, input, output)
            else {
                continue;
            };
            let id = r.id.clone().unwrap_or_else(|| format!("{name}/{provider}"));
            if !route_ids.insert(id.clone()) {
                c.problem(
                    format!("{rp}.id"),
                    format!("duplicate route id \"{id}\" (set a distinct id on one of them)"),
                );
            }
            routes.push(Arc::new(Route {
                id,
                model: name.clone(),
                provider,
                upstream_model,
                bucket,
                input_per_mtok: input,
                output_per_mtok: output,
                cache_read_per_mtok: cache_read.unwrap_or(input),
                cache_write_per_mtok: cache_write.unwrap_or(input),
                priority: r.priority.unwrap_or(j as i64),
                weight: r.weight.unwrap_or(1).max(1),
                position: j,
            }));
        }
        routes.sort_by_key(|r| (r.priority, r.position));
        out.push(Arc::new(Model {
            name,
            endpoints,
            tokenizer,
            retry: Retry {
                max_retries: m.retry.max_retries,
                backoff_base_ms: m.retry.backoff_base_ms,
                backoff_max_ms: m.retry.backoff_max_ms.max(m.retry.backoff_base_ms),
            },
            routes,
        }));
    }
    out
}

fn check_keys(
    c: &mut Checker,
    raw: Vec<Option<RawKey>>,
    buckets: &BTreeMap<String, Arc<Bucket>>,
    models: &[Arc<Model>],
) -> Vec<BootstrapKey> {
    let mut out = Vec::new();
    let mut names = HashSet::new();
    let mut secrets = HashSet::new();
    for (i, k) in raw.into_iter().enumerate() {
        let Some(k) = k else { continue };
        let path = format!("keys[{i}]");
        let name = c.required(&format!("{path}.name"), &k.name).cloned();
        let secret = c.required(&format!("{path}.secret"), &k.secret).cloned();
        if let Some(n) = &name {
            if !names.insert(n.clone()) {
                c.problem(
                    format!("{path}.name"),
                    format!("duplicate key name \"{n}\""),
                );
            }
        }
        if let Some(s) = &secret {
            if s.len() < 8 {
                c.problem(format!("{path}.secret"), "must be at least 8 characters");
            }
            if !secrets.insert(s.clone()) {
                c.problem(format!("{path}.secret"), "duplicate secret");
            }
        }
        for (j, m) in k.models.iter().flatten().enumerate() {
            if !models.iter().any(|x| &x.name == m) {
                c.problem(
                    format!("{path}.models[{j}]"),
                    format!("unknown model \"{m}\""),
                );
            }
        }
        for (j, b) in k.buckets.iter().flatten().enumerate() {
            if !buckets.contains_key(b) {
                c.problem(
                    format!("{path}.buckets[{j}]"),
                    format!("unknown bucket \"{b}\""),
                );
            }
        }
        let mut topup = BTreeMap::new();
        for (b, amount) in &k.topup {
            if !buckets.contains_key(b) {
                c.problem(
                    format!("{path}.topup.{b}"),
                    format!("unknown bucket \"{b}\""),
                );
            }
            if amount.0 <= Decimal::ZERO {
                c.problem(format!("{path}.topup.{b}"), "must be > 0");
            }
            topup.insert(b.clone(), amount.0);
        }
        let (Some(name), Some(secret)) = (name, secret) else {
            continue;
        };
        out.push(BootstrapKey {
            name,
            secret,
            workspace: k.workspace.clone().unwrap_or_else(|| "default".into()),
            project: k.project.clone().unwrap_or_else(|| "default".into()),
            models: k.models.clone(),
            buckets: k.buckets.clone(),
            allow_cross_bucket_fallback: k.allow_cross_bucket_fallback,
            rpm: k.rpm,
            tpm: k.tpm,
            max_concurrent_streams: k.max_concurrent_streams,
            topup,
        });
    }
    out
}
