//! The accept loop and per-connection serving: HTTP/1.1 and h2c on one port via hyper-util's
//! auto builder, `TCP_NODELAY` on every socket, connection counters, graceful stop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::handlers::handle;
use super::state::{bump, Shared};

/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// Serves `listener` until `shutdown` resolves, then lets open connections finish for at most
/// `grace` and drops the rest.
pub(super) async fn run(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let builder = Arc::new(connection_builder());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    connections.spawn(serve_connection(
                        stream,
                        peer,
                        shared.clone(),
                        builder.clone(),
                        stop_rx.clone(),
                    ));
                }
                Err(err) => {
                    tracing::warn!(error = %err, "mock upstream: accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::debug!(
            left = connections.len(),
            "mock upstream: dropping connections still open after the grace period"
        );
    }
    connections.shutdown().await;
}

fn connection_builder() -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    // Gateways multiplex thousands of streams over few h2 connections under load.
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(100_000)
        .max_pending_accept_reset_streams(100_000);
    builder
}

/// Counts a connection as open for as long as it lives.
struct ConnectionGuard(Arc<Shared>);

impl ConnectionGuard {
    fn open(shared: Arc<Shared>) -> ConnectionGuard {
        bump(&shared.stats.connections_opened);
        bump(&shared.stats.open_connections);
        ConnectionGuard(shared)
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        bump(&self.0.stats.connections_closed);
        self.0.stats.open_connections.fetch_sub(1, Relaxed);
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    builder: Arc<Builder<TokioExecutor>>,
    mut stop: watch::Receiver<bool>,
) {
    let _guard = ConnectionGuard::open(shared.clone());
    if let Err(err) = stream.set_nodelay(true) {
        tracing::debug!(error = %err, %peer, "mock upstream: could not set TCP_NODELAY");
    }
    let service = service_fn(move |req| handle(shared.clone(), req));
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = stop.changed() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(err) = result {
        // Aborts on purpose (reset-after) and clients going away land here.
        tracing::trace!(error = %err, %peer, "mock upstream: connection ended with an error");
    }
}
