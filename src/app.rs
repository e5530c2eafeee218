//! Wiring: builds the shared state (store, writer, keys, wallets, routes, metrics), starts the
//! built-in mock providers, and runs the client and admin listeners until a signal stops them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, App, HttpServer};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::config::{AdminToken, Config, ProviderKind};
use crate::keys::Keys;
use crate::ledger::writer::{TopupOutcome, WriterThread};
use crate::ledger::LedgerWriter;
use crate::metering::tokenizer::Tokenizer;
use crate::mock::{MockOptions, MockServer};
use crate::route::RouteTable;
use crate::router::budget::RetryBudget;
use crate::router::upstream::{provider_keys, Upstreams};
use crate::wallet::Wallets;

pub struct AppState {
    pub config: Arc<Config>,
    /// Reads of keys, wallets and the ledger: sled, or the database a fleet shares.
    pub store: Arc<dyn crate::store::StateStore>,
    /// This instance's name in a fleet (`store.instance_id`); `None` with sled.
    pub instance_id: Option<String>,
    pub writer: LedgerWriter,
    pub keys: Keys,
    pub wallets: Wallets,
    pub routes: RouteTable,
    pub budget: RetryBudget,
    pub metrics: PrometheusHandle,
    tokenizers: HashMap<String, Tokenizer>,
    default_tokenizer: Tokenizer,
    admin_token: String,
    redactor: Redactor,
    pub ready: AtomicBool,
    pub provider_keys: HashMap<String, String>,
    /// Per-key rate limits (rpm, tpm, concurrent streams).
    pub limits: crate::limits::Limits,
    /// Set on SIGTERM/SIGINT: new requests are refused with 503 `shutting_down`.
    pub draining: AtomicBool,
    /// Turns true at the drain deadline (minus a margin): open streams end themselves with the
    /// `shutting_down` error event and settle (R34).
    pub shutdown: tokio::sync::watch::Sender<bool>,
    /// The console's sessions: operators' and marketplace key holders'.
    pub sessions: crate::console::session::SessionStore,
    /// Failed operator logins per client address.
    pub login_failures: crate::console::operator::session::LoginFailures,
}

impl AppState {
    pub fn tokenizer(&self, model: &str) -> Tokenizer {
        self.tokenizers
            .get(model)
            .unwrap_or(&self.default_tokenizer)
            .clone()
    }

    /// Replaces every provider key in `text` with `[redacted]` (R26).
    pub fn redact(&self, text: &str) -> String {
        self.redactor.text(text)
    }

    /// Before a ledger read: waits until every write queued so far is committed, so that the
    /// read sees the records the writer is still grouping (at most its group-commit window).
    pub async fn settle_reads(&self) {
        if let Err(e) = self.writer.barrier().await {
            tracing::warn!(error = %e, "ledger read without the writer's barrier");
        }
    }

    /// The redactor for upstream bytes bound for clients (cheap to clone: one `Arc`).
    pub fn redactor(&self) -> Redactor {
        self.redactor.clone()
    }

    /// Constant-time comparison of a presented admin token.
    pub fn admin_token_matches(&self, presented: &str) -> bool {
        use sha2::{Digest, Sha256};
        use subtle::ConstantTimeEq;
        let a = Sha256::digest(presented.as_bytes());
        let b = Sha256::digest(self.admin_token.as_bytes());
        bool::from(a.ct_eq(&b))
    }
}

/// Replaces provider keys in upstream bytes bound for a client with `[redacted]` (R26): an
/// upstream may echo the key it was sent in content, not only in error bodies.
#[derive(Clone, Default)]
pub struct Redactor(Arc<[Secret]>);

/// A provider key and its searcher, built once.
struct Secret {
    text: String,
    finder: memchr::memmem::Finder<'static>,
}

impl Redactor {
    pub fn new(secrets: Vec<String>) -> Redactor {
        Redactor(
            secrets
                .into_iter()
                .map(|text| Secret {
                    finder: memchr::memmem::Finder::new(text.as_bytes()).into_owned(),
                    text,
                })
                .collect(),
        )
    }

    /// Returns `b` unchanged (no copy) unless it contains a key. A key cannot straddle two
    /// calls: streams pass whole SSE events.
    pub fn bytes(&self, b: bytes::Bytes) -> bytes::Bytes {
        if self.0.iter().any(|s| s.finder.find(&b).is_some()) {
            bytes::Bytes::from(self.text(&String::from_utf8_lossy(&b)))
        } else {
            b
        }
    }

    pub fn text(&self, text: &str) -> String {
        let mut out = text.to_string();
        for s in self.0.iter() {
            if out.contains(s.text.as_str()) {
                out = out.replace(s.text.as_str(), "[redacted]");
            }
        }
        out
    }
}

/// Everything `serve` starts, so that it can be stopped in order.
pub struct Running {
    pub state: Arc<AppState>,
    pub client_addr: std::net::SocketAddr,
    pub admin_addr: std::net::SocketAddr,
    writer_thread: Option<WriterThread>,
    _mocks: Vec<MockServer>,
}

/// The admin token, trimmed: a presented token is trimmed too, so surrounding whitespace (a
/// trailing newline from a secrets file) could never match. An empty one is refused.
fn resolve_admin_token(config: &Config) -> Result<String, String> {
    match &config.server.admin_token {
        AdminToken::Inline(t) => Ok(t.trim().to_string()),
        AdminToken::Env(var) => match std::env::var(var) {
            Ok(v) if !v.trim().is_empty() => Ok(v.trim().to_string()),
            Ok(_) => Err(format!(
                "server.admin_token_env: environment variable {var} is empty (or only whitespace); set it to the admin token"
            )),
            Err(_) => Err(format!(
                "server.admin_token_env: environment variable {var} is not set (set it, or put admin_token in [server] for a demo)"
            )),
        },
    }
}

/// Builds the state: store (with crash recovery), writer, keys (with bootstrap top-ups),
/// wallets, routes. Must run inside an actix `System`.
pub async fn build(mut config: Config) -> Result<Running, String> {
    let metrics = crate::metrics::install();
    crate::metrics::init_route_series(&config);
    let admin_token = resolve_admin_token(&config)?;
    let provider_keys = provider_keys(&config)?;

    // Built-in mock providers listen before anything routes to them.
    let mut mocks = Vec::new();
    let mut providers = Vec::new();
    for p in &config.providers {
        let mut p = (**p).clone();
        if let ProviderKind::Mock {
            listen,
            ttft_ms,
            tokens,
            interval_ms,
        } = p.kind
        {
            let models: Vec<String> = config
                .routes()
                .filter(|(_, r)| r.provider == p.id)
                .map(|(_, r)| r.upstream_model.clone())
                .collect();
            let opts = MockOptions {
                ttft_ms,
                tokens,
                interval_ms,
                fault: None,
                models,
            };
            let m = MockServer::start(listen, opts).map_err(|e| {
                format!("providers.{}: cannot start the mock on {listen}: {e}", p.id)
            })?;
            p.base_url = format!("http://{}/v1", m.addr());
            tracing::info!(provider = %p.id, addr = %m.addr(), "built-in mock upstream listening");
            mocks.push(m);
        }
        providers.push(Arc::new(p));
    }
    config.providers = providers;

    let mut tokenizers = HashMap::new();
    for m in &config.models {
        let t =
            Tokenizer::new(m.tokenizer).map_err(|e| format!("models.{}.tokenizer: {e}", m.name))?;
        tokenizers.insert(m.name.clone(), t);
    }

    let flush = Duration::from_millis(config.settlement.flush_interval_ms);
    let crate::store::Opened {
        store,
        writer,
        thread: writer_thread,
        instance_id,
        instances,
    } = crate::store::open(&config)?;
    let keys = Keys::load(store.clone(), writer.clone()).map_err(|e| e.to_string())?;
    let wallets = Wallets::new(
        2,
        writer.clone(),
        flush,
        Duration::from_secs(config.settlement.wallet_idle_s.max(1)),
    );
    // Instances of a fleet starting together may race to create the same bootstrap key (its
    // name is unique in the store): the loser reads the winner's and goes on.
    let mut tries = 0;
    let boot = loop {
        match keys.bootstrap(&config).await {
            Ok(b) => break b,
            Err(e) if tries < 3 && instance_id.is_some() => {
                tries += 1;
                tracing::warn!(error = %e, "bootstrap keys raced another instance; reading them again");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    for (key_id, topups, name) in boot {
        for (bucket, amount) in topups {
            let reference = format!("bootstrap:{name}:{bucket}");
            match wallets
                .topup(&key_id, &bucket, amount, Some(reference))
                .await
            {
                Ok(TopupOutcome::Applied) => {
                    tracing::info!(key = %name, %bucket, %amount, "bootstrap top-up applied")
                }
                Ok(_) => {}
                Err(e) => return Err(format!("bootstrap top-up for key {name}: {e}")),
            }
        }
    }
    let routes = RouteTable::start(&config, &provider_keys)?;
    let budget = RetryBudget::new(
        config.routing.retry_budget_ratio,
        config.routing.retry_budget_min_per_s,
    );
    let secrets: Vec<String> = provider_keys
        .values()
        .filter(|s| s.len() >= 4)
        .cloned()
        .collect();
    let state = Arc::new(AppState {
        config: Arc::new(config),
        store,
        instance_id,
        writer,
        keys,
        wallets,
        routes,
        budget,
        metrics,
        tokenizers,
        default_tokenizer: Tokenizer::new(crate::metering::tokenizer::TokenizerKind::Chunks)
            .map_err(|e| e.to_string())?,
        admin_token,
        redactor: Redactor::new(secrets),
        ready: AtomicBool::new(false),
        provider_keys,
        limits: crate::limits::Limits::shared(instances),
        draining: AtomicBool::new(false),
        shutdown: tokio::sync::watch::Sender::new(false),
        sessions: Default::default(),
        login_failures: Default::default(),
    });
    Ok(Running {
        client_addr: state.config.server.listen,
        admin_addr: state.config.server.admin_listen,
        state,
        writer_thread: Some(writer_thread),
        _mocks: mocks,
    })
}

/// How often an instance of a fleet looks whether the shared keys changed (cheap: the store
/// answers from its heartbeat's fingerprint of the key table and reads the keys only then).
const KEY_SYNC: Duration = Duration::from_millis(250);

/// Runs both listeners until SIGINT/SIGTERM, then drains, settles and flushes.
pub async fn serve(config: Config) -> Result<(), String> {
    let mut running = build(config).await?;
    let state = running.state.clone();
    let cfg = state.config.clone();
    let client_state = web::Data::from(state.clone());
    let keys = state.provider_keys.clone();
    let cfg2 = cfg.clone();
    let client = HttpServer::new(move || {
        // One upstream client set per worker: pooled connections stay on the worker using them.
        let ups = match Upstreams::new(&cfg2, &keys) {
            Ok(u) => u,
            Err(e) => {
                tracing::error!(error = %e, "cannot build upstream clients");
                Upstreams::empty()
            }
        };
        App::new()
            .app_data(client_state.clone())
            .app_data(web::Data::new(ups))
            // The API's routes first: a client request matches them before any page's.
            .configure(crate::api::client::routes)
            .configure(crate::console::client_routes)
    })
    .workers(cfg.server.workers)
    // Streams write one small SSE event at a time: without TCP_NODELAY, Nagle holds an event
    // behind the client's delayed ACK (~40 ms on Linux loopback).
    .tcp_nodelay(true)
    .backlog(4096)
    .max_connections(100_000)
    .keep_alive(Duration::from_secs(cfg.server.client_idle_timeout_s.max(1)))
    .client_request_timeout(Duration::from_millis(cfg.server.client_request_timeout_ms))
    // A client that closes its side while its request is being served is gone: actix then
    // drops the handler, which closes the upstream request and releases the hold. (Kept open,
    // the request would run to its upstream deadline holding both.)
    .h1_allow_half_closed(false)
    .disable_signals()
    .shutdown_timeout(cfg.server.shutdown_drain_s);
    let client = match &cfg.server.tls {
        Some(tls) => client
            .bind_rustls_0_23(cfg.server.listen, crate::api::tls::server_config(tls)?)
            .map_err(|e| format!("server.listen: cannot bind {}: {e}", cfg.server.listen))?,
        None => client
            .bind(cfg.server.listen)
            .map_err(|e| format!("server.listen: cannot bind {}: {e}", cfg.server.listen))?,
    };
    let client_addr = client.addrs().first().copied().unwrap_or(cfg.server.listen);
    let admin_state = web::Data::from(state.clone());
    let admin = HttpServer::new(move || {
        App::new()
            .app_data(admin_state.clone())
            .configure(crate::console::admin_routes)
            .configure(crate::api::admin::routes)
    })
    .workers(1)
    .disable_signals()
    // The admin listener stops after the client one has drained: short admin calls only.
    .shutdown_timeout(cfg.server.shutdown_drain_s.min(5))
    .bind(cfg.server.admin_listen)
    .map_err(|e| {
        format!(
            "server.admin_listen: cannot bind {}: {e}",
            cfg.server.admin_listen
        )
    })?;
    let admin_addr = admin
        .addrs()
        .first()
        .copied()
        .unwrap_or(cfg.server.admin_listen);
    running.client_addr = client_addr;
    running.admin_addr = admin_addr;
    let client = client.run();
    let admin = admin.run();
    state.ready.store(true, Ordering::Release);
    announce(&state, client_addr, admin_addr);
    // Ledger retention: prunes on the writer thread once now, then hourly.
    let retention = actix_rt::spawn(crate::ledger::retention::run(
        state.writer.clone(),
        cfg.ledger.retention_days,
    ));
    let stopper = actix_rt::spawn(stop_on_signal(state.clone(), client.handle()));
    // In a fleet, keys created, changed or revoked through another instance take effect here
    // within a second (a new key's first request looks it up at once). The store reads them
    // only when its heartbeat saw the key table change.
    let key_sync = state.instance_id.is_some().then(|| {
        let st = state.clone();
        actix_rt::spawn(async move {
            let mut seen = None;
            loop {
                tokio::time::sleep(KEY_SYNC).await;
                let store = st.store.clone();
                let read = web::block(move || {
                    let r = store.keys_if_changed(&mut seen);
                    (r, seen)
                })
                .await;
                match read {
                    Ok((r, s)) => {
                        seen = s;
                        match r {
                            Ok(Some(records)) => st.keys.sync(records),
                            Ok(None) => {}
                            Err(e) => tracing::warn!(error = %e, "cannot read the fleet's keys"),
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot read the fleet's keys"),
                }
            }
        })
    });
    let admin_handle = admin.handle();
    let admin = actix_rt::spawn(admin);
    // The admin listener keeps answering (`/readyz` 503, `/metrics`) while the client drains.
    let a = client.await;
    admin_handle.stop(true).await;
    let b = admin
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
    stopper.abort();
    retention.abort();
    if let Some(k) = key_sync {
        k.abort();
    }
    state.ready.store(false, Ordering::Release);
    tracing::info!("listeners stopped; settling open holds and flushing the ledger");
    // Connections, and the streams in them, may be dropped after the listeners report stopped:
    // wait for their settlements to reach the wallets (what does not arrive in time is persisted
    // as an open hold and settled as `interrupted` at the next start).
    if !state.wallets.wait_settled(Duration::from_secs(10)).await {
        tracing::error!(
            holds = state.wallets.live_holds(),
            "requests still hold money 10 s after the listeners stopped; recovery settles them"
        );
    }
    // The streams the listeners dropped have queued their settlements with the wallets. Each
    // wallet answers once it has handled them and handed its open holds to the writer; then the
    // writer commits all of it before it stops.
    if !state.wallets.flush_all(Duration::from_secs(10)).await {
        tracing::error!("wallets did not answer within 10 s; recovery settles what they held");
    }
    let _ = state.writer.flush().await;
    state.wallets.stop_all();
    if let Some(w) = running.writer_thread.take() {
        w.stop();
    }
    a.and(b).map_err(|e| e.to_string())
}

async fn next_signal(
    term: &mut tokio::signal::unix::Signal,
    int: &mut tokio::signal::unix::Signal,
) -> &'static str {
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// Waits for SIGTERM or SIGINT, then drains (R34): new requests get 503
/// `shutting_down`, `/readyz` 503; the client listener stops accepting and in-flight requests
/// run for `shutdown_drain_s`; a second before the deadline the open streams end themselves with
/// the `shutting_down` error event and settle (`interrupted`). A second signal cuts at once.
async fn stop_on_signal(state: Arc<AppState>, client: actix_web::dev::ServerHandle) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install the SIGTERM/SIGINT handlers; no graceful shutdown");
        return;
    };
    let sig = next_signal(&mut term, &mut int).await;
    let drain = Duration::from_secs(state.config.server.shutdown_drain_s);
    tracing::warn!(
        signal = sig,
        drain_s = drain.as_secs(),
        "shutting down: refusing new requests, draining in-flight ones"
    );
    state.draining.store(true, Ordering::Release);
    state.ready.store(false, Ordering::Release);
    // Streams end themselves a little before actix force-closes the connections, so that the
    // client gets the error event and the ledger the settled record.
    let cut = drain.saturating_sub(Duration::from_secs(1).min(drain / 2));
    let st = state.clone();
    let cutter = actix_rt::spawn(async move {
        tokio::time::sleep(cut).await;
        st.shutdown.send_replace(true);
    });
    let stop = client.stop(true);
    tokio::select! {
        _ = stop => {}
        sig = next_signal(&mut term, &mut int) => {
            tracing::warn!(signal = sig, "second signal: cutting open streams now");
            state.shutdown.send_replace(true);
            tokio::time::sleep(Duration::from_millis(200)).await;
            client.stop(false).await;
        }
    }
    cutter.abort();
}

fn announce(state: &AppState, client: std::net::SocketAddr, admin: std::net::SocketAddr) {
    let scheme = if state.config.server.tls.is_some() {
        "https"
    } else {
        "http"
    };
    tracing::info!("client API on {scheme}://{client}  (POST /v1/chat/completions, /v1/embeddings, GET /v1/models)");
    tracing::info!("admin API on http://{admin}  (/admin/*, /metrics)");
    let key = state.config.keys.first();
    let model = state.config.models.first();
    if let (Some(k), Some(m)) = (key, model) {
        // Never the secret itself (R42): the line says where it is configured.
        let file = state.config.path.as_ref().map_or_else(
            || "the configuration".to_string(),
            |p| p.display().to_string(),
        );
        println!(
            "ready: curl -N {scheme}://{client}/v1/chat/completions -H \"Authorization: Bearer $TOLLGATE_KEY\" -H 'Content-Type: application/json' -d '{{\"model\":\"{}\",\"stream\":true,\"stream_options\":{{\"include_usage\":true}},\"messages\":[{{\"role\":\"user\",\"content\":\"hello\"}}]}}'  # TOLLGATE_KEY: the secret of key '{}' in {file} (keys[0].secret)",
            m.name, k.name
        );
    } else {
        println!("ready: client API on {scheme}://{client}, admin API on http://{admin}");
    }
}
