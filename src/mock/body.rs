//! Response bodies: a fixed buffer, or a paced chat stream that writes one SSE event per frame.
//!
//! The stream is a hand-rolled state machine around one `Sleep`, so ten thousand open streams
//! cost ten thousand small structs and timer entries; each event is formatted straight into its
//! own buffer without serde.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::state::{bump, Shared};

/// The words of the deterministic completion: token `i` is `WORDS[i % 16]` plus a space.
pub(super) const WORDS: [&str; 16] = [
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "then", "runs",
    "far", "into", "green", "hills",
];

/// The shortest pause before an abort, so the frames before it are flushed to the socket first.
const ABORT_GRACE: Duration = Duration::from_millis(1);

/// The error a body yields to make hyper abort the exchange (h1: close, h2: `RST_STREAM`).
#[derive(Debug)]
pub(super) struct MockAbort;

impl fmt::Display for MockAbort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("mock fault: connection aborted on purpose")
    }
}

impl std::error::Error for MockAbort {}

pub(super) enum MockBody {
    Full(Option<Bytes>),
    Chat(Box<ChatStream>),
}

impl MockBody {
    pub(super) fn full(bytes: impl Into<Bytes>) -> MockBody {
        MockBody::Full(Some(bytes.into()))
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = MockAbort;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, MockAbort>>> {
        match self.get_mut() {
            MockBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            MockBody::Chat(stream) => stream.poll_event(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            MockBody::Full(bytes) => bytes.is_none(),
            MockBody::Chat(stream) => matches!(stream.phase, Phase::Ended),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            MockBody::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            MockBody::Chat(_) => SizeHint::default(),
        }
    }
}

/// What one streamed chat completion will send.
#[derive(Debug)]
pub(super) struct StreamPlan {
    /// `data: {"id":..,"object":"chat.completion.chunk","created":..,"model":..,"choices":[`
    pub(super) prefix: Bytes,
    pub(super) n: u32,
    pub(super) tokens: u32,
    pub(super) finish_reason: &'static str,
    pub(super) include_usage: bool,
    pub(super) prompt_tokens: u64,
    /// Reported as `usage.prompt_tokens_details.cached_tokens` when set.
    pub(super) cached_tokens: Option<u64>,
    pub(super) ttft: Duration,
    pub(super) interval: Duration,
    /// `reset-after:N`: abort instead of sending content step `N`.
    pub(super) abort_after: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    Waiting,
    Content,
    Finish,
    Usage,
    Done,
    Ended,
}

pub(super) struct ChatStream {
    plan: StreamPlan,
    shared: Arc<Shared>,
    sleep: Pin<Box<Sleep>>,
    phase: Phase,
    /// Content step (token index) and the choice within it.
    step: u32,
    choice: u32,
    /// Set once the stream reached `[DONE]` or aborted on purpose: dropping it then is no cancel.
    settled: bool,
}

impl ChatStream {
    pub(super) fn new(plan: StreamPlan, shared: Arc<Shared>) -> ChatStream {
        let first_wait = if plan.abort_after == Some(0) {
            ABORT_GRACE
        } else {
            plan.ttft
        };
        ChatStream {
            sleep: Box::pin(tokio::time::sleep(first_wait)),
            phase: if first_wait.is_zero() {
                Phase::Content
            } else {
                Phase::Waiting
            },
            plan,
            shared,
            step: 0,
            choice: 0,
            settled: false,
        }
    }

    fn poll_event(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, MockAbort>>> {
        loop {
            match self.phase {
                Phase::Waiting => {
                    ready!(self.sleep.as_mut().poll(cx));
                    self.phase = Phase::Content;
                }
                Phase::Content => {
                    if self.choice == 0 && self.plan.abort_after == Some(self.step) {
                        self.phase = Phase::Ended;
                        self.settled = true;
                        return Poll::Ready(Some(Err(MockAbort)));
                    }
                    if self.step >= self.plan.tokens {
                        self.phase = Phase::Finish;
                        self.choice = 0;
                        continue;
                    }
                    let event = self.content_event();
                    bump(&self.shared.stats.completion_tokens);
                    self.advance_content();
                    return Poll::Ready(Some(Ok(Frame::data(event))));
                }
                Phase::Finish => {
                    if self.choice < self.plan.n {
                        let event = self.finish_event();
                        self.choice += 1;
                        return Poll::Ready(Some(Ok(Frame::data(event))));
                    }
                    self.phase = if self.plan.include_usage {
                        Phase::Usage
                    } else {
                        Phase::Done
                    };
                }
                Phase::Usage => {
                    self.phase = Phase::Done;
                    return Poll::Ready(Some(Ok(Frame::data(self.usage_event()))));
                }
                Phase::Done => {
                    self.phase = Phase::Ended;
                    self.settled = true;
                    bump(&self.shared.stats.streams_completed);
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
                        b"data: [DONE]\n\n",
                    )))));
                }
                Phase::Ended => return Poll::Ready(None),
            }
        }
    }

    /// Moves to the next choice, or to the next step after a pause.
    fn advance_content(&mut self) {
        self.choice += 1;
        if self.choice < self.plan.n {
            return;
        }
        self.choice = 0;
        self.step += 1;
        let aborting = self.plan.abort_after == Some(self.step);
        let pause = if aborting {
            self.plan.interval.max(ABORT_GRACE)
        } else if self.step < self.plan.tokens {
            self.plan.interval
        } else {
            Duration::ZERO
        };
        if !pause.is_zero() {
            self.sleep.as_mut().reset(Instant::now() + pause);
            self.phase = Phase::Waiting;
        }
    }

    fn content_event(&self) -> Bytes {
        let word = WORDS[self.step as usize % WORDS.len()];
        let mut buf = BytesMut::with_capacity(self.plan.prefix.len() + 96);
        buf.put_slice(&self.plan.prefix);
        buf.put_slice(b"{\"index\":");
        put_u64(&mut buf, u64::from(self.choice));
        buf.put_slice(b",\"delta\":{");
        if self.step == 0 {
            buf.put_slice(b"\"role\":\"assistant\",");
        }
        buf.put_slice(b"\"content\":\"");
        buf.put_slice(word.as_bytes());
        buf.put_slice(b" \"},\"finish_reason\":null}]}\n\n");
        buf.freeze()
    }

    fn finish_event(&self) -> Bytes {
        let mut buf = BytesMut::with_capacity(self.plan.prefix.len() + 64);
        buf.put_slice(&self.plan.prefix);
        buf.put_slice(b"{\"index\":");
        put_u64(&mut buf, u64::from(self.choice));
        buf.put_slice(b",\"delta\":{},\"finish_reason\":\"");
        buf.put_slice(self.plan.finish_reason.as_bytes());
        buf.put_slice(b"\"}]}\n\n");
        buf.freeze()
    }

    fn usage_event(&self) -> Bytes {
        let completion = u64::from(self.plan.tokens) * u64::from(self.plan.n);
        let mut buf = BytesMut::with_capacity(self.plan.prefix.len() + 96);
        buf.put_slice(&self.plan.prefix);
        buf.put_slice(b"],\"usage\":{\"prompt_tokens\":");
        put_u64(&mut buf, self.plan.prompt_tokens);
        buf.put_slice(b",\"completion_tokens\":");
        put_u64(&mut buf, completion);
        buf.put_slice(b",\"total_tokens\":");
        put_u64(&mut buf, self.plan.prompt_tokens + completion);
        if let Some(cached) = self.plan.cached_tokens {
            buf.put_slice(b",\"prompt_tokens_details\":{\"cached_tokens\":");
            put_u64(&mut buf, cached);
            buf.put_slice(b"}");
        }
        buf.put_slice(b"}}\n\n");
        buf.freeze()
    }
}

impl Drop for ChatStream {
    fn drop(&mut self) {
        if !self.settled {
            bump(&self.shared.stats.streams_cancelled);
        }
    }
}

/// Writes `v` in decimal without allocating.
fn put_u64(buf: &mut BytesMut, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    buf.put_slice(&digits[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_u64_writes_decimal() {
        for v in [0u64, 7, 10, 1234567890, u64::MAX] {
            let mut buf = BytesMut::new();
            put_u64(&mut buf, v);
            assert_eq!(&buf[..], v.to_string().as_bytes());
        }
    }
}
