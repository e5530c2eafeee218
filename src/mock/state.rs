//! State shared by every connection of one mock server: options, counters, the last request.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};

use super::fault::{parse_fault, FaultSetting};
use super::{MockOptions, MockStatsSnapshot};

/// Options with the fault string parsed once, published as one `Arc` per change.
#[derive(Debug)]
pub(super) struct Effective {
    pub(super) opts: MockOptions,
    pub(super) fault: FaultSetting,
}

impl Effective {
    pub(super) fn new(opts: MockOptions) -> Effective {
        let fault = match &opts.fault {
            Some(raw) => parse_fault(raw),
            None => Ok(None),
        };
        Effective { opts, fault }
    }
}

/// Counters behind `GET /stats`; all `Relaxed`, they are statistics, not synchronisation.
#[derive(Debug, Default)]
pub(super) struct Stats {
    pub(super) requests: AtomicU64,
    pub(super) chat_requests: AtomicU64,
    pub(super) stream_requests: AtomicU64,
    pub(super) embeddings_requests: AtomicU64,
    pub(super) responses_requests: AtomicU64,
    pub(super) messages_requests: AtomicU64,
    pub(super) models_requests: AtomicU64,
    pub(super) completion_tokens: AtomicU64,
    pub(super) streams_completed: AtomicU64,
    pub(super) streams_cancelled: AtomicU64,
    pub(super) connections_opened: AtomicU64,
    pub(super) connections_closed: AtomicU64,
    pub(super) open_connections: AtomicU64,
}

pub(super) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Relaxed);
}

impl Stats {
    pub(super) fn snapshot(&self) -> MockStatsSnapshot {
        MockStatsSnapshot {
            requests: self.requests.load(Relaxed),
            chat_requests: self.chat_requests.load(Relaxed),
            stream_requests: self.stream_requests.load(Relaxed),
            embeddings_requests: self.embeddings_requests.load(Relaxed),
            responses_requests: self.responses_requests.load(Relaxed),
            messages_requests: self.messages_requests.load(Relaxed),
            models_requests: self.models_requests.load(Relaxed),
            completion_tokens: self.completion_tokens.load(Relaxed),
            streams_completed: self.streams_completed.load(Relaxed),
            streams_cancelled: self.streams_cancelled.load(Relaxed),
            connections_opened: self.connections_opened.load(Relaxed),
            connections_closed: self.connections_closed.load(Relaxed),
            open_connections: self.open_connections.load(Relaxed),
        }
    }

    /// Zeroes every counter except the `open_connections` gauge.
    pub(super) fn reset(&self) {
        for counter in [
            &self.requests,
            &self.chat_requests,
            &self.stream_requests,
            &self.embeddings_requests,
            &self.responses_requests,
            &self.messages_requests,
            &self.models_requests,
            &self.completion_tokens,
            &self.streams_completed,
            &self.streams_cancelled,
            &self.connections_opened,
            &self.connections_closed,
        ] {
            counter.store(0, Relaxed);
        }
    }
}

/// The last chat or embeddings request; `GET /_mock/last` renders it. Its headers are not
/// kept: they carry the gateway's provider key (R44).
#[derive(Debug)]
pub(super) struct LastRequest {
    pub(super) path: String,
    pub(super) http_version: String,
    pub(super) content_type: Option<String>,
    pub(super) body: Bytes,
}

#[derive(Debug)]
pub(super) struct Shared {
    options: RwLock<Arc<Effective>>,
    pub(super) stats: Stats,
    pub(super) last: Mutex<Option<LastRequest>>,
    /// Numbers the `chatcmpl-mock-<n>` ids.
    next_id: AtomicU64,
    /// Drives the `fail-rate` draws: a counter hashed by splitmix64, deterministic per server.
    draws: AtomicU64,
}

impl Shared {
    pub(super) fn new(opts: MockOptions) -> Shared {
        Shared {
            options: RwLock::new(Arc::new(Effective::new(opts))),
            stats: Stats::default(),
            last: Mutex::new(None),
            next_id: AtomicU64::new(1),
            draws: AtomicU64::new(0),
        }
    }

    pub(super) fn options(&self) -> Arc<Effective> {
        self.options.read().clone()
    }

    pub(super) fn set_options(&self, opts: MockOptions) {
        let effective = Arc::new(Effective::new(opts));
        *self.options.write() = effective;
    }

    pub(super) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Relaxed)
    }

    /// A uniform draw in `[0, 1)`.
    pub(super) fn draw(&self) -> f64 {
        let mut z = self
            .draws
            .fetch_add(1, Relaxed)
            .wrapping_add(1)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}
