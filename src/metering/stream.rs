//! The metered stream: upstream SSE in, client SSE out, the same for the three streamed formats
//! (chat, Responses, Messages). Each event is parsed incrementally and read by the format's
//! [`EventReader`]; content tokens are counted and paid from the hold before the event is
//! forwarded byte for byte; the event that carries the usage is held back, settled and rewritten
//! with the `tollgate` object. Every ending — done, cut at zero, upstream break, client gone
//! (`Drop`) — settles the hold exactly once, in [`MeteredStream::settle`] or its detached twin in
//! `Drop`.

use std::time::{Duration, Instant};

use super::chunk::Usage;
use super::meter::{Billed, Meter, Prices};
use super::sse::{SseEvent, SseParser};
use super::tokenizer::Tokenizer;
use super::wire::{Closing, EventReader, Keep, Reading, Wire};
use crate::ledger::{LedgerRecord, Status, UpstreamUsage, UsageSource};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use rust_decimal::Decimal;

/// Why the stream could not produce its first content token (nothing was sent to the client).
#[derive(Debug, Clone)]
pub enum EarlyFailure {
    Timeout,
    Broken(String),
    Malformed(String),
    /// The hold could not pay the first token (cannot happen with a grant ≥ input + one token,
    /// except with a tokenizer that counts several tokens for the first event).
    Unpaid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Completed,
    BalanceExhausted,
    UpstreamBroke,
    /// The gateway is shutting down and the drain deadline came (recorded `interrupted`).
    Shutdown,
}

pub struct StreamParts {
    pub body: Incoming,
    pub meter: Meter,
    pub tokenizer: Tokenizer,
    /// The stream's format: which events carry output and usage.
    pub wire: Wire,
    pub idle: Duration,
    /// Chat: the client asked for the usage chunk.
    pub include_usage: bool,
    /// Draft record: route, attempts, prices and attribution are filled in.
    pub record: LedgerRecord,
    pub started: Instant,
    pub max_event_bytes: usize,
    /// Reports the attempt's outcome to its route when the stream ends.
    pub reporter: Option<crate::route::AttemptReporter>,
    /// The key's rate limiter, to count the billed output tokens (tokens per minute).
    pub limiter: Option<std::sync::Arc<crate::limits::KeyLimiter>>,
    /// Turns true at the shutdown drain deadline: the stream ends itself and settles.
    pub shutdown: Option<tokio::sync::watch::Receiver<bool>>,
}

pub struct MeteredStream {
    body: Option<Incoming>,
    parser: SseParser,
    meter: Option<Meter>,
    tokenizer: Tokenizer,
    reader: EventReader,
    idle: Duration,
    include_usage: bool,
    record: Option<LedgerRecord>,
    started: Instant,
    first_token_at: Option<Instant>,
    usage: Option<Usage>,
    /// Output tokens paid when the upstream's usage last arrived: tokens after it mean the usage
    /// was not the final count.
    tokens_at_usage: u64,
    /// The data of the last event held back to be rewritten at the end ([`Keep::Rewrite`]).
    held: Option<String>,
    /// The event held back to go last at a normal end ([`Keep::Last`]).
    last: Option<Bytes>,
    out: BytesMut,
    /// Output tokens paid for and sitting in `out`, not yet handed to the client's connection.
    out_tokens: u64,
    /// An event read but not paid yet: its tokens need an extension of the hold, and the output
    /// before it left first rather than wait behind that round trip.
    unpaid: Option<(SseEvent, Reading)>,
    /// Set once the final events were produced; the next poll drains the upstream and ends.
    finished: bool,
    eof: bool,
    in_gauge: bool,
    /// Set once the response is handed to the client (after the first token).
    delivering: bool,
    /// Time spent waiting on upstream frames, so that per-chunk overhead can exclude it.
    upstream_wait: Duration,
    /// How long the last blocking wait for an upstream frame took.
    last_wait: Duration,
    /// `tollgate_gateway_overhead_seconds`, looked up once.
    overhead: metrics::Histogram,
    reporter: Option<crate::route::AttemptReporter>,
    limiter: Option<std::sync::Arc<crate::limits::KeyLimiter>>,
    shutdown: Option<ShutdownSignal>,
    /// The idle timer, made at the first wait after the first token and reused.
    idle_timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// Set when the shutdown signal ended the wait for the next upstream frame.
    shutting_down: bool,
}

impl MeteredStream {
    pub fn new(p: StreamParts) -> MeteredStream {
        crate::metrics::hot(|m| m.streams_active.increment(1.0));
        MeteredStream {
            body: Some(p.body),
            parser: SseParser::with_max_event_bytes(p.max_event_bytes),
            meter: Some(p.meter),
            tokenizer: p.tokenizer,
            reader: EventReader::new(p.wire),
            idle: p.idle,
            include_usage: p.include_usage,
            record: Some(p.record),
            started: p.started,
            first_token_at: None,
            usage: None,
            tokens_at_usage: 0,
            held: None,
            last: None,
            out: BytesMut::new(),
            out_tokens: 0,
            unpaid: None,
            finished: false,
            eof: false,
            in_gauge: true,
            delivering: false,
            upstream_wait: Duration::ZERO,
            last_wait: Duration::ZERO,
            overhead: crate::metrics::hot(|m| m.overhead.clone()),
            reporter: p.reporter,
            limiter: p.limiter,
            shutdown: p.shutdown.map(|mut rx| -> ShutdownSignal {
                Box::pin(async move {
                    if rx.wait_for(|stop| *stop).await.is_err() {
                        // The sender is gone without a shutdown: never fire.
                        std::future::pending::<()>().await;
                    }
                })
            }),
            idle_timer: None,
            shutting_down: false,
        }
    }

    /// From now on the client owns the stream: a drop bills what was delivered.
    pub fn start_delivery(&mut self) {
        self.delivering = true;
    }

    /// Reads until the first content token has been paid, or the upstream stream ended normally.
    /// Returns the bytes to send first (earlier events included, R24). On failure nothing was
    /// sent, and the caller may retry or fall back after [`MeteredStream::abandon`].
    pub async fn first_token(
        &mut self,
        deadline: tokio::time::Instant,
    ) -> Result<Bytes, EarlyFailure> {
        loop {
            match self.next_event(Some(deadline)).await {
                Err(e) => return Err(e),
                // With a deadline, `next_event` never asks to flush: only events or the end.
                Ok(Step::Eof | Step::Flush) if self.usage.is_some() => {
                    // EOF without [DONE] but with the upstream's usage: a complete answer
                    // without content, as after the first token.
                    let tail = self.settle(End::Completed).await;
                    self.out.extend_from_slice(&tail);
                    return Ok(self.take_out());
                }
                Ok(Step::Eof | Step::Flush) => {
                    // EOF before any content, without [DONE] or usage: a broken stream.
                    return Err(EarlyFailure::Broken(
                        "upstream closed the stream before the first token".into(),
                    ));
                }
                Ok(Step::Event(ev)) => match self.on_event(ev).await {
                    Flow::Continue => {
                        if self.first_token_at.is_some() {
                            return Ok(self.take_out());
                        }
                    }
                    Flow::End(End::Completed) => {
                        // Ended normally without content: send everything now.
                        let tail = self.settle(End::Completed).await;
                        self.out.extend_from_slice(&tail);
                        return Ok(self.take_out());
                    }
                    Flow::End(End::BalanceExhausted) => return Err(EarlyFailure::Unpaid),
                    // `on_event` never ends with `Shutdown` (only the wait for a frame does).
                    Flow::End(End::UpstreamBroke | End::Shutdown) => {
                        return Err(EarlyFailure::Malformed(
                            "upstream sent an invalid event".into(),
                        ))
                    }
                },
            }
        }
    }

    /// Gives up this attempt before anything was sent: releases the hold, writes no record.
    pub fn abandon(&mut self) {
        // The caller reports this failed attempt itself.
        self.reporter = None;
        self.leave_gauge();
        self.record = None;
        self.body = None;
        if let Some(m) = self.meter.take() {
            drop(m.hold);
        }
    }

    /// The next bytes for the client, or `None` at the end.
    pub async fn next_chunk(&mut self) -> Option<Bytes> {
        let t0 = Instant::now();
        let waited = self.upstream_wait;
        loop {
            if self.finished {
                Box::pin(self.drain_upstream()).await;
                return None;
            }
            if let Some((ev, read)) = self.unpaid.take() {
                if let Flow::End(e) = self.on_reading(ev, read).await {
                    return Some(Box::pin(self.end(e)).await);
                }
                continue;
            }
            let ev = match self.next_event(None).await {
                Ok(Step::Event(ev)) => ev,
                Ok(Step::Flush) => {
                    // Gateway overhead per forwarded write: parse, count, pay, copy.
                    let busy = t0
                        .elapsed()
                        .saturating_sub(self.upstream_wait.saturating_sub(waited));
                    self.overhead.record(busy.as_secs_f64());
                    return Some(self.take_out());
                }
                Ok(Step::Eof) => {
                    // EOF without [DONE]: complete if the upstream reported usage, else broken.
                    let end = if self.usage.is_some() {
                        End::Completed
                    } else {
                        End::UpstreamBroke
                    };
                    return Some(Box::pin(self.end(end)).await);
                }
                Err(_) if self.shutting_down => {
                    return Some(Box::pin(self.end(End::Shutdown)).await)
                }
                Err(_) => return Some(Box::pin(self.end(End::UpstreamBroke)).await),
            };
            let read = self.reader.read(&ev, &self.tokenizer);
            if !self.out.is_empty() && self.needs_extension(&read) {
                // Paid output goes out now; the event is paid at the next call.
                self.unpaid = Some((ev, read));
                return Some(self.take_out());
            }
            if let Flow::End(e) = self.on_reading(ev, read).await {
                return Some(Box::pin(self.end(e)).await);
            }
        }
    }

    /// Whether paying for `read` waits for the wallet (the hold cannot cover its tokens).
    fn needs_extension(&self, read: &Reading) -> bool {
        read.tokens > 0
            && !read.broken
            && read.keep == Keep::Forward
            && self.meter.as_ref().is_some_and(|m| !m.covers(read.tokens))
    }

    /// Hands the waiting output over: its tokens count as delivered from now on, and only now
    /// become the consumption a crash bills (R9, F1).
    fn take_out(&mut self) -> Bytes {
        self.out_tokens = 0;
        if let Some(m) = &self.meter {
            m.hold.publish_drawn();
        }
        self.out.split().freeze()
    }

    fn leave_gauge(&mut self) {
        if std::mem::take(&mut self.in_gauge) {
            crate::metrics::hot(|m| m.streams_active.decrement(1.0));
        }
    }

    async fn end(&mut self, e: End) -> Bytes {
        let tail = self.settle(e).await;
        self.out.extend_from_slice(&tail);
        self.take_out()
    }

    async fn drain_upstream(&mut self) {
        if let Some(mut body) = self.body.take() {
            if self.eof {
                return;
            }
            // Read the rest (the chunked terminator) so the connection can be pooled.
            let _ = tokio::time::timeout(Duration::from_millis(100), async {
                while let Some(Ok(_)) = body.frame().await {}
            })
            .await;
        }
    }

    /// The next upstream event. With output waiting (after the first token), it does not wait:
    /// it gives the upstream connection task one turn to decode what it has already read, and
    /// returns [`Step::Flush`] if no event came of it. A burst of events read in one go thus
    /// leaves in one write instead of one write per token.
    async fn next_event(
        &mut self,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Step, EarlyFailure> {
        loop {
            match self.parser.next_event() {
                Ok(Some(ev)) => return Ok(Step::Event(ev)),
                Ok(None) => {}
                Err(e) => return Err(EarlyFailure::Malformed(e.to_string())),
            }
            if self.eof {
                return match self.parser.finish() {
                    // The upstream's last event may lack its blank line: forwarded as it came,
                    // the gateway's own events after it would join it and the client could not
                    // read the tokens it paid for.
                    Ok(Some(mut ev)) => {
                        ev.raw = terminated(ev.raw);
                        Ok(Step::Event(ev))
                    }
                    Ok(None) => Ok(Step::Eof),
                    Err(e) => Err(EarlyFailure::Malformed(e.to_string())),
                };
            }
            let Some(body) = self.body.as_mut() else {
                return Ok(Step::Eof);
            };
            let waiting = Instant::now();
            let frame = if deadline.is_none() && !self.out.is_empty() {
                // Paced upstreams (the last frame took a while) gain nothing from waiting.
                if self.out.len() >= COALESCE_BYTES || self.last_wait >= COALESCE_WAIT {
                    return Ok(Step::Flush);
                }
                tokio::task::yield_now().await;
                let ready = futures_util::FutureExt::now_or_never(body.frame());
                self.upstream_wait += waiting.elapsed();
                match ready {
                    Some(f) => f,
                    None => return Ok(Step::Flush),
                }
            } else {
                let frame = match deadline {
                    // Before the first token: the router's deadline, no shutdown cut (a stream
                    // still waiting for its first token is left to the router).
                    Some(d) => tokio::time::timeout_at(d, body.frame()).await.ok(),
                    None => {
                        let waited = Self::wait_frame(
                            body,
                            &mut self.idle_timer,
                            self.idle,
                            &mut self.shutdown,
                        )
                        .await;
                        match waited {
                            Wait::Frame(f) => Some(f),
                            Wait::Idle => None,
                            Wait::Shutdown => {
                                self.shutting_down = true;
                                return Err(EarlyFailure::Broken(
                                    "the gateway is shutting down".into(),
                                ));
                            }
                        }
                    }
                };
                self.last_wait = waiting.elapsed();
                self.upstream_wait += self.last_wait;
                match frame {
                    None => return Err(EarlyFailure::Timeout),
                    Some(f) => f,
                }
            };
            match frame {
                None => self.eof = true,
                Some(Err(e)) => return Err(EarlyFailure::Broken(e.to_string())),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.parser.push(data);
                    }
                }
            }
        }
    }

    /// Waits for the next upstream frame, at most `idle` since the last one, and until the
    /// shutdown drain deadline. The idle timer and the shutdown future live as long as the
    /// stream: a frame costs no timer registration, the timer is pushed back only when it fires.
    async fn wait_frame(
        body: &mut Incoming,
        timer: &mut Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
        idle: Duration,
        shutdown: &mut Option<ShutdownSignal>,
    ) -> Wait {
        let due = tokio::time::Instant::now() + idle;
        let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        loop {
            let stop = async {
                match shutdown.as_mut() {
                    Some(s) => s.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = stop => {
                    *shutdown = None;
                    return Wait::Shutdown;
                }
                f = body.frame() => return Wait::Frame(f),
                _ = timer.as_mut() => {
                    if tokio::time::Instant::now() >= due {
                        return Wait::Idle;
                    }
                    // Set for an earlier wait: push it back to this wait's deadline.
                    timer.as_mut().reset(due);
                }
            }
        }
    }

    async fn on_event(&mut self, ev: SseEvent) -> Flow {
        let read = self.reader.read(&ev, &self.tokenizer);
        self.on_reading(ev, read).await
    }

    async fn on_reading(&mut self, ev: SseEvent, read: Reading) -> Flow {
        if read.broken {
            return Flow::End(End::UpstreamBroke);
        }
        if let Some(u) = read.usage {
            self.usage = Some(u);
            // This event's own tokens (paid below) come with the usage, not after it.
            let paid = self.meter.as_ref().map_or(0, |m| m.tokens);
            self.tokens_at_usage = paid.saturating_add(read.tokens);
        }
        match read.keep {
            Keep::Forward => {}
            Keep::Rewrite => {
                // Held back: settled and rewritten (or dropped) at the end.
                self.held = ev.data;
                return self.after_held(read.end);
            }
            Keep::Last => {
                self.last = Some(ev.raw);
                return self.after_held(read.end);
            }
            Keep::Drop => return self.after_held(read.end),
        }
        if read.tokens > 0 {
            let paid = match self.meter.as_mut() {
                Some(m) => m.pay(read.tokens).await,
                None => false,
            };
            if !paid {
                return Flow::End(End::BalanceExhausted);
            }
            if self.first_token_at.is_none() {
                self.first_token_at = Some(Instant::now());
            }
            self.out_tokens += read.tokens;
        }
        self.out.extend_from_slice(&ev.raw);
        if read.end {
            return Flow::End(End::Completed);
        }
        Flow::Continue
    }

    /// After an event that was held back: the stream goes on, or it ended with it.
    fn after_held(&self, end: bool) -> Flow {
        if end {
            Flow::End(End::Completed)
        } else {
            Flow::Continue
        }
    }

    /// Settles the hold for this ending and returns the final events (usage chunk if asked for,
    /// error event for a cut or a break, `[DONE]`).
    async fn settle(&mut self, e: End) -> Bytes {
        self.finished = true;
        if e != End::Completed {
            // Stop the upstream generating: close its request now.
            self.body = None;
        }
        let Some(mut rec) = self.record.take() else {
            return Bytes::new();
        };
        let Some(meter) = self.meter.take() else {
            return Bytes::new();
        };
        let status = match e {
            End::Completed => Status::Completed,
            End::BalanceExhausted => Status::BalanceExhausted,
            End::UpstreamBroke => Status::UpstreamError,
            End::Shutdown => Status::Interrupted,
        };
        let broke = (e == End::UpstreamBroke)
            .then(|| format!("the stream broke after {} output tokens", meter.tokens));
        if let Some(why) = &broke {
            // The serving attempt failed after all (R17): say so in the ledger too.
            if let Some(a) = rec.attempts.last_mut() {
                a.outcome = "stream_error".into();
                a.error = Some(why.clone());
            }
        }
        if let Some(r) = self.reporter.take() {
            r.finish(broke);
        }
        let charge = fill_record(
            &mut rec,
            &meter.prices,
            meter.tokens,
            status,
            self.final_usage(e, meter.tokens),
            self.first_token_at,
            self.started,
        );
        let delivered = meter.tokens;
        let tail = meter
            .hold
            .settle_sealed(charge, rec, |rec| {
                account(rec, Some(delivered), self.limiter.as_deref());
                self.final_events(e, rec)
            })
            .await;
        self.leave_gauge();
        tail
    }

    /// The upstream's usage to bill for an ending, if it is authoritative (R6): only for a
    /// completed stream, and only as a final count. When content the client received came after
    /// the usage (sent mid-stream), at least the delivered tokens are billed.
    fn final_usage(&self, e: End, delivered: u64) -> Option<Usage> {
        let mut u = self.usage.filter(|_| e == End::Completed)?;
        if delivered > self.tokens_at_usage {
            u.completion_tokens = u.completion_tokens.max(delivered);
        }
        Some(u)
    }

    /// The events after the last token, in the stream's format: at a normal end the held usage
    /// event with the `tollgate` object (chat: the usage chunk if asked for, then `[DONE]`);
    /// after a cut or a break the error event that says why.
    fn final_events(&self, e: End, rec: &LedgerRecord) -> Bytes {
        let message;
        let error = match e {
            End::Completed => None,
            End::BalanceExhausted => {
                metrics::counter!(crate::metrics::STREAM_CUTOFFS, "reason" => "balance_exhausted")
                    .increment(1);
                message = format!(
                    "the {} balance is exhausted: the stream was stopped after {} paid output tokens",
                    rec.bucket.as_deref().unwrap_or("wallet"),
                    rec.output_tokens_delivered
                );
                Some(Closing {
                    kind: "insufficient_quota",
                    code: "balance_exhausted",
                    message: &message,
                })
            }
            End::UpstreamBroke => {
                metrics::counter!(crate::metrics::STREAM_CUTOFFS, "reason" => "upstream_error")
                    .increment(1);
                message = format!(
                    "the upstream stream of route {} broke after {} tokens; only delivered tokens are billed",
                    rec.route.as_deref().unwrap_or("?"),
                    rec.output_tokens_delivered
                );
                Some(Closing {
                    kind: "upstream_error",
                    code: "upstream_stream_error",
                    message: &message,
                })
            }
            End::Shutdown => {
                metrics::counter!(crate::metrics::STREAM_CUTOFFS, "reason" => "shutdown")
                    .increment(1);
                message = format!(
                    "the gateway is shutting down: the stream was stopped after {} output tokens, which are billed; retry the request",
                    rec.output_tokens_delivered
                );
                Some(Closing {
                    kind: "service_unavailable",
                    code: "shutting_down",
                    message: &message,
                })
            }
        };
        self.reader.closing_events(
            rec,
            self.held.as_deref(),
            self.last.as_ref(),
            self.include_usage,
            error,
        )
    }
}

enum Flow {
    Continue,
    End(End),
}

/// Resolves at the shutdown drain deadline.
type ShutdownSignal = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// How a wait for an upstream frame ended.
enum Wait {
    Frame(Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>),
    Idle,
    Shutdown,
}

/// What [`MeteredStream::next_event`] found.
enum Step {
    Event(SseEvent),
    /// The upstream body ended (after any event left in the parser).
    Eof,
    /// Output is waiting and nothing more is ready without waiting: send what there is.
    Flush,
}

/// Coalesced output is sent once it reaches this size even if more events are ready.
const COALESCE_BYTES: usize = 32 * 1024;
/// Output is coalesced only while upstream frames follow each other faster than this.
const COALESCE_WAIT: Duration = Duration::from_millis(1);

/// `raw` ending with the blank line that ends an SSE event (added when it lacks one).
fn terminated(raw: Bytes) -> Bytes {
    let ended = [&b"\n\n"[..], b"\r\r", b"\r\n\r\n"]
        .iter()
        .any(|end| raw.ends_with(end));
    if ended {
        return raw;
    }
    let mut out = BytesMut::with_capacity(raw.len() + 2);
    out.extend_from_slice(&raw);
    match raw.last() {
        // The last line is ended: one more line ending makes the blank line.
        Some(b'\n') => out.extend_from_slice(b"\n"),
        Some(b'\r') => out.extend_from_slice(b"\r"),
        _ => out.extend_from_slice(b"\n\n"),
    }
    out.freeze()
}

/// Fills the billing fields of `rec` for an ending and returns the charge at the serving
/// route's `prices` (R6, docs/ledger.md). Cached input is billed at the cache prices only when
/// the upstream's usage says so; a count of our own bills the whole input at the input price.
pub fn fill_record(
    rec: &mut LedgerRecord,
    prices: &Prices,
    delivered: u64,
    status: Status,
    upstream: Option<Usage>,
    first_token_at: Option<Instant>,
    started: Instant,
) -> Decimal {
    rec.status = status;
    rec.http_status = 200;
    rec.finished_at = chrono::Utc::now();
    rec.duration_ms = started.elapsed().as_millis() as u64;
    rec.ttft_ms = first_token_at.map(|t| t.duration_since(started).as_millis() as u64);
    rec.output_tokens_delivered = delivered;
    let billed = match upstream {
        Some(u) => {
            rec.usage_source = UsageSource::Upstream;
            rec.upstream_usage = Some(UpstreamUsage {
                prompt_tokens: u.prompt_tokens,
                completion_tokens: u.completion_tokens,
            });
            Billed {
                input: u.prompt_tokens,
                cache_read: u.cache_read_tokens,
                cache_write: u.cache_write_tokens,
                output: u.completion_tokens,
            }
            .clamped()
        }
        None => {
            rec.usage_source = UsageSource::Counted;
            Billed {
                input: rec.input_tokens,
                output: delivered,
                ..Billed::default()
            }
        }
    };
    rec.input_tokens = billed.input;
    rec.cache_read_tokens = billed.cache_read;
    rec.cache_write_tokens = billed.cache_write;
    rec.output_tokens = billed.output;
    prices.charge(billed)
}

/// After a settlement: count the request's metrics, and its billed input and output in place of
/// the admission's input estimate against the key's tokens-per-minute limit (R39).
pub fn account(
    rec: &LedgerRecord,
    delivered: Option<u64>,
    limiter: Option<&crate::limits::KeyLimiter>,
) {
    crate::metrics::observe_request(rec, delivered);
    if let Some(l) = limiter {
        l.settle(rec.input_tokens.saturating_add(rec.output_tokens));
    }
}

/// The `tollgate` object of bodies and usage chunks (docs/api.md), written straight from the
/// record.
#[derive(serde::Serialize)]
pub struct TollgateObject<'a> {
    request_id: &'a str,
    route: Option<&'a str>,
    provider: Option<&'a str>,
    upstream_model: Option<&'a str>,
    bucket: Option<&'a str>,
    currency: Option<&'a str>,
    cost: String,
    input_tokens: u64,
    cache_read_tokens: u64,
    cache_write_tokens: u64,
    output_tokens: u64,
    fallbacks: u32,
    retries: u32,
    status: &'static str,
}

pub fn tollgate_object(rec: &LedgerRecord) -> TollgateObject<'_> {
    TollgateObject {
        request_id: &rec.request_id,
        route: rec.route.as_deref(),
        provider: rec.provider.as_deref(),
        upstream_model: rec.upstream_model.as_deref(),
        bucket: rec.bucket.as_deref(),
        currency: rec.currency.as_deref(),
        cost: rec.cost.normalize().to_string(),
        input_tokens: rec.input_tokens,
        cache_read_tokens: rec.cache_read_tokens,
        cache_write_tokens: rec.cache_write_tokens,
        output_tokens: rec.output_tokens,
        fallbacks: rec.fallbacks,
        retries: rec.retries,
        status: rec.status.as_str(),
    }
}

impl Drop for MeteredStream {
    fn drop(&mut self) {
        if !self.delivering {
            // Dropped before the response started (the client left while we waited for the
            // first token): nothing was delivered, so nothing is billed, and the request's
            // single record is written by the handler's guard.
            self.abandon();
            return;
        }
        // The client went away mid-stream (actix dropped the body): bill what was delivered.
        let (Some(mut rec), Some(meter)) = (self.record.take(), self.meter.take()) else {
            return;
        };
        self.body = None;
        // Tokens paid for but still waiting in `out` never reached the client: not billed.
        let delivered = meter.tokens - self.out_tokens;
        let charge = fill_record(
            &mut rec,
            &meter.prices,
            delivered,
            Status::ClientDisconnected,
            None,
            self.first_token_at,
            self.started,
        );
        // The charge fits the hold (it only bills what was paid), so it is what gets debited.
        rec.cost = charge;
        account(&rec, Some(delivered), self.limiter.as_deref());
        metrics::counter!(crate::metrics::STREAM_CUTOFFS, "reason" => "client_disconnected")
            .increment(1);
        self.leave_gauge();
        meter.hold.settle_detached(charge, Some(rec));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn prices() -> Prices {
        Prices {
            input: Decimal::from(3),
            cache_read: Decimal::new(3, 1),
            cache_write: Decimal::new(375, 2),
            output: Decimal::from(15),
        }
    }

    /// The upstream's usage bills its cache counts at the cache prices; a report of more cached
    /// tokens than input tokens raises the billed input to them, and `upstream_usage` keeps
    /// what the upstream said.
    #[test]
    fn the_record_carries_the_billed_cache_counts() {
        let mut rec = LedgerRecord::empty("req_1".into(), chrono::Utc::now());
        let usage = Usage {
            prompt_tokens: 196,
            completion_tokens: 9,
            cache_read_tokens: 64,
            cache_write_tokens: 32,
        };
        let started = Instant::now();
        let charge = fill_record(
            &mut rec,
            &prices(),
            9,
            Status::Completed,
            Some(usage),
            None,
            started,
        );
        // 100 × 3 + 64 × 0.3 + 32 × 3.75 + 9 × 15 = 574.2 per million.
        assert_eq!(charge, "0.0005742".parse::<Decimal>().unwrap());
        assert_eq!(
            (
                rec.input_tokens,
                rec.cache_read_tokens,
                rec.cache_write_tokens,
                rec.output_tokens
            ),
            (196, 64, 32, 9)
        );

        let odd = Usage {
            prompt_tokens: 10,
            cache_read_tokens: 50,
            ..usage
        };
        let charge = fill_record(
            &mut rec,
            &prices(),
            9,
            Status::Completed,
            Some(odd),
            None,
            started,
        );
        assert_eq!((rec.input_tokens, rec.cache_read_tokens), (82, 50));
        assert_eq!(rec.upstream_usage.map(|u| u.prompt_tokens), Some(10));
        // Nothing uncached: 50 × 0.3 + 32 × 3.75 + 9 × 15 = 270 per million.
        assert_eq!(charge, "0.00027".parse::<Decimal>().unwrap());

        // Without the upstream's usage: the input estimate at the input price, no cache counts.
        rec.input_tokens = 100;
        let charge = fill_record(
            &mut rec,
            &prices(),
            4,
            Status::BalanceExhausted,
            None,
            None,
            started,
        );
        assert_eq!((rec.cache_read_tokens, rec.cache_write_tokens), (0, 0));
        assert_eq!(charge, "0.00036".parse::<Decimal>().unwrap());
    }
}
