//! The mock upstream: an OpenAI- and Anthropic-compatible server with fault injection that the
//! demo, the tests and the load tests put behind the gateway in place of a real provider.
//!
//! It sits at the far end of the request path (gateway → upstream client → *mock*). It answers
//! `POST /v1/chat/completions`, `POST /v1/responses` (OpenAI Responses) and `POST /v1/messages`
//! (Anthropic Messages), each streamed or not, `POST /v1/embeddings` and `GET /v1/models`
//! deterministically, paced by `ttft_ms`/`interval_ms`, and lets tests steer it through
//! `x-mock-*` request headers, `POST /_mock/options` and [`MockServer::set_options`]. `GET /stats`
//! counts what it did, `GET /_mock/last` shows the last request it received (path, version,
//! content type and body; never its headers). HTTP/1.1 and h2c share one port. It is built to
//! hold ten thousand slow streams on one core. It listens on loopback only and caps what a
//! request may ask of it (R44): it runs inside the gateway's process.

mod body;
mod fault;
mod handlers;
mod server;
mod state;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::oneshot;

use self::state::Shared;

/// How long [`MockServer::shutdown`] lets open exchanges finish before dropping them.
const SERVER_STOP_GRACE: Duration = Duration::from_millis(250);
/// How long [`serve`] lets open exchanges finish after its shutdown signal.
const SERVE_STOP_GRACE: Duration = Duration::from_secs(2);
/// Accept backlog: load tests open thousands of connections at once.
const LISTEN_BACKLOG: i32 = 4096;

/// How the mock behaves; also the flags of `tollgate mock-upstream` and the `mock = {..}` table
/// of a `kind = "mock"` provider.
#[derive(Clone, Debug, PartialEq, clap::Args, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MockOptions {
    /// Delay before the first content chunk, in milliseconds.
    #[arg(long, default_value_t = 50)]
    pub ttft_ms: u64,
    /// Content tokens per response (per choice).
    #[arg(long, default_value_t = 64)]
    pub tokens: u32,
    /// Delay between content chunks, in milliseconds.
    #[arg(long, default_value_t = 20)]
    pub interval_ms: u64,
    /// A fault for every request, same syntax as the `x-mock-fault` header (which wins).
    #[arg(long)]
    pub fault: Option<String>,
    /// Model ids listed by `GET /v1/models` (empty: `mock-model`).
    #[arg(long, value_delimiter = ',')]
    pub models: Vec<String>,
}

impl Default for MockOptions {
    fn default() -> MockOptions {
        MockOptions {
            ttft_ms: 50,
            tokens: 64,
            interval_ms: 20,
            fault: None,
            models: Vec::new(),
        }
    }
}

impl MockOptions {
    /// Rejects a `fault` that matches none of the fault syntaxes, and `tokens` above the cap.
    fn check(&self) -> io::Result<()> {
        if u64::from(self.tokens) > MAX_TOKENS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("tokens must be at most {MAX_TOKENS} (got {})", self.tokens),
            ));
        }
        match self.fault.as_deref().map(fault::parse_fault) {
            Some(Err(invalid)) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                invalid.to_string(),
            )),
            _ => Ok(()),
        }
    }
}

/// The most content tokens per choice a mock answers with (R44); see [`handlers::MAX_TOKENS`].
pub const MAX_TOKENS: u64 = handlers::MAX_TOKENS;

/// The mock serves loopback only (R44): it has no authentication, and its control endpoints
/// change what every caller gets.
fn check_loopback(addr: SocketAddr) -> io::Result<()> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{addr} is not a loopback address: the mock upstream listens on 127.0.0.1 or ::1 only"),
        ))
    }
}

/// The counters behind `GET /stats`.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MockStatsSnapshot {
    /// Every HTTP request.
    pub requests: u64,
    pub chat_requests: u64,
    pub stream_requests: u64,
    pub embeddings_requests: u64,
    /// `POST /v1/responses` (OpenAI Responses format).
    #[serde(default)]
    pub responses_requests: u64,
    /// `POST /v1/messages` (Anthropic Messages format).
    #[serde(default)]
    pub messages_requests: u64,
    pub models_requests: u64,
    /// Content tokens actually handed to connections.
    pub completion_tokens: u64,
    /// Streams that produced `[DONE]`.
    pub streams_completed: u64,
    /// Streams whose client went away before the end.
    pub streams_cancelled: u64,
    pub connections_opened: u64,
    pub connections_closed: u64,
    /// A gauge; `POST /stats/reset` leaves it alone.
    pub open_connections: u64,
}

/// A mock upstream running on its own OS thread and single-threaded tokio runtime, so it works
/// from plain tests, from inside an actix system, or from `main`. Stops on drop.
pub struct MockServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl MockServer {
    /// Binds `listen` (port 0 allowed) and starts serving; returns once the socket is bound.
    pub fn start(listen: SocketAddr, opts: MockOptions) -> io::Result<MockServer> {
        check_loopback(listen)?;
        opts.check()?;
        let std_listener = bind(listen)?;
        let addr = std_listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let listener = {
            let _entered = runtime.enter();
            tokio::net::TcpListener::from_std(std_listener)?
        };
        let shared = Arc::new(Shared::new(opts));
        let (stop, stopped) = oneshot::channel::<()>();
        let served = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("mock-upstream-{}", addr.port()))
            .spawn(move || {
                let shutdown = async {
                    // A dropped sender means the same as a sent stop.
                    let _ = stopped.await;
                };
                runtime.block_on(server::run(listener, served, shutdown, SERVER_STOP_GRACE));
            })?;
        Ok(MockServer {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The bound address (with the real port when started on port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The same numbers as `GET /stats`.
    pub fn stats(&self) -> MockStatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// Replaces the options for the requests that arrive from now on. An invalid `fault` makes
    /// every chat and embeddings request answer 400 naming the valid syntaxes.
    pub fn set_options(&self, opts: MockOptions) {
        self.shared.set_options(opts);
    }

    /// Stops accepting, gives open exchanges a moment, and ends the thread.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("mock upstream thread panicked");
            }
        }
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

impl std::fmt::Debug for MockServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Runs the mock inside the caller's tokio runtime until `shutdown` resolves (used by
/// `tollgate mock-upstream`). Fails at once if `opts` are invalid or the listener is not on a
/// loopback address.
pub async fn serve(
    listener: tokio::net::TcpListener,
    opts: MockOptions,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    check_loopback(listener.local_addr()?)?;
    opts.check()?;
    let shared = Arc::new(Shared::new(opts));
    server::run(listener, shared, shutdown, SERVE_STOP_GRACE).await;
    Ok(())
}

fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}
