//! Response bodies: a fixed buffer, or a paced stream that writes one SSE event per frame, in the
//! chat completions, Responses or Messages format ([`Dialect`]).
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

/// The format of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dialect {
    Chat,
    /// OpenAI Responses: typed events with sequence numbers, `response.completed` last.
    Responses,
    /// Anthropic Messages: `message_start` … `content_block_delta` … `message_stop`.
    Messages,
}

/// What one streamed answer will send.
#[derive(Debug)]
pub(super) struct StreamPlan {
    pub(super) dialect: Dialect,
    /// Chat: `data: {"id":..,"object":"chat.completion.chunk","created":..,"model":..,"choices":[`.
    /// Responses and Messages: the id of the response or message.
    pub(super) prefix: Bytes,
    /// Responses and Messages: the model, as a JSON string.
    pub(super) model_json: String,
    pub(super) n: u32,
    pub(super) tokens: u32,
    pub(super) finish_reason: &'static str,
    pub(super) include_usage: bool,
    /// The input that was not read from the prompt cache. OpenAI formats report it plus the
    /// cache reads as their input; Messages reports the three apart.
    pub(super) prompt_tokens: u64,
    /// Input tokens reported as read from / written to the prompt cache (`x-mock-cache-*`).
    pub(super) cache_read_tokens: u64,
    pub(super) cache_write_tokens: u64,
    pub(super) ttft: Duration,
    pub(super) interval: Duration,
    /// `reset-after:N`: abort instead of sending content step `N`.
    pub(super) abort_after: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    /// Responses and Messages: the opening events, sent at once.
    Opening,
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
            phase: if plan.dialect != Dialect::Chat {
                Phase::Opening
            } else if first_wait.is_zero() {
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
                Phase::Opening => {
                    self.phase = Phase::Waiting;
                    return Poll::Ready(Some(Ok(Frame::data(self.opening_events()))));
                }
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
                    self.phase = if self.plan.include_usage || self.plan.dialect != Dialect::Chat {
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
                    let done: &'static [u8] = match self.plan.dialect {
                        Dialect::Chat => b"data: [DONE]\n\n",
                        // `response.completed` was the last event.
                        Dialect::Responses => continue,
                        Dialect::Messages => {
                            b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"
                        }
                    };
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(done)))));
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
        match self.plan.dialect {
            Dialect::Chat => {}
            Dialect::Responses => {
                let mut buf = BytesMut::with_capacity(192);
                buf.put_slice(b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"sequence_number\":");
                put_u64(&mut buf, u64::from(self.step) + 4);
                buf.put_slice(b",\"item_id\":\"msg_");
                buf.put_slice(&self.plan.prefix);
                buf.put_slice(b"\",\"output_index\":0,\"content_index\":0,\"delta\":\"");
                buf.put_slice(word.as_bytes());
                buf.put_slice(b" \"}\n\n");
                return buf.freeze();
            }
            Dialect::Messages => {
                let mut buf = BytesMut::with_capacity(160);
                buf.put_slice(b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"");
                buf.put_slice(word.as_bytes());
                buf.put_slice(b" \"}}\n\n");
                return buf.freeze();
            }
        }
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

    /// The text of the whole answer (what the Responses closing events repeat).
    fn full_text(&self) -> String {
        answer_text(self.plan.tokens)
    }

    /// Responses: `response.created`, `response.in_progress`, the output item and its content
    /// part; Messages: `message_start` (with the input usage) and the text block's start.
    fn opening_events(&self) -> Bytes {
        let id = String::from_utf8_lossy(&self.plan.prefix);
        let model = &self.plan.model_json;
        let text = match self.plan.dialect {
            Dialect::Chat => String::new(),
            Dialect::Responses => {
                let response = format!(
                    "{{\"id\":\"resp_{id}\",\"object\":\"response\",\"status\":\"in_progress\",\"model\":{model},\"output\":[]}}"
                );
                format!(
                    "event: response.created\ndata: {{\"type\":\"response.created\",\"sequence_number\":0,\"response\":{response}}}\n\n\
                     event: response.in_progress\ndata: {{\"type\":\"response.in_progress\",\"sequence_number\":1,\"response\":{response}}}\n\n\
                     event: response.output_item.added\ndata: {{\"type\":\"response.output_item.added\",\"sequence_number\":2,\"output_index\":0,\"item\":{{\"id\":\"msg_{id}\",\"type\":\"message\",\"status\":\"in_progress\",\"role\":\"assistant\",\"content\":[]}}}}\n\n\
                     event: response.content_part.added\ndata: {{\"type\":\"response.content_part.added\",\"sequence_number\":3,\"item_id\":\"msg_{id}\",\"output_index\":0,\"content_index\":0,\"part\":{{\"type\":\"output_text\",\"text\":\"\",\"annotations\":[]}}}}\n\n"
                )
            }
            Dialect::Messages => format!(
                "event: message_start\ndata: {{\"type\":\"message_start\",\"message\":{{\"id\":\"msg_{id}\",\"type\":\"message\",\"role\":\"assistant\",\"model\":{model},\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{{\"input_tokens\":{},\"cache_creation_input_tokens\":{},\"cache_read_input_tokens\":{},\"output_tokens\":1}}}}}}\n\n\
                 event: content_block_start\ndata: {{\"type\":\"content_block_start\",\"index\":0,\"content_block\":{{\"type\":\"text\",\"text\":\"\"}}}}\n\n\
                 event: ping\ndata: {{\"type\":\"ping\"}}\n\n",
                self.plan.prompt_tokens, self.plan.cache_write_tokens, self.plan.cache_read_tokens
            ),
        };
        Bytes::from(text)
    }

    fn finish_event(&self) -> Bytes {
        match self.plan.dialect {
            Dialect::Chat => {}
            Dialect::Responses => {
                let id = String::from_utf8_lossy(&self.plan.prefix);
                let text = serde_json::to_string(&self.full_text()).unwrap_or_default();
                let seq = u64::from(self.plan.tokens) + 4;
                return Bytes::from(format!(
                    "event: response.output_text.done\ndata: {{\"type\":\"response.output_text.done\",\"sequence_number\":{},\"item_id\":\"msg_{id}\",\"output_index\":0,\"content_index\":0,\"text\":{text}}}\n\n\
                     event: response.content_part.done\ndata: {{\"type\":\"response.content_part.done\",\"sequence_number\":{},\"item_id\":\"msg_{id}\",\"output_index\":0,\"content_index\":0,\"part\":{{\"type\":\"output_text\",\"text\":{text},\"annotations\":[]}}}}\n\n\
                     event: response.output_item.done\ndata: {{\"type\":\"response.output_item.done\",\"sequence_number\":{},\"output_index\":0,\"item\":{}}}\n\n",
                    seq,
                    seq + 1,
                    seq + 2,
                    self.output_item(&text),
                ));
            }
            Dialect::Messages => {
                return Bytes::from_static(
                    b"event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
                )
            }
        }
        let mut buf = BytesMut::with_capacity(self.plan.prefix.len() + 64);
        buf.put_slice(&self.plan.prefix);
        buf.put_slice(b"{\"index\":");
        put_u64(&mut buf, u64::from(self.choice));
        buf.put_slice(b",\"delta\":{},\"finish_reason\":\"");
        buf.put_slice(self.plan.finish_reason.as_bytes());
        buf.put_slice(b"\"}]}\n\n");
        buf.freeze()
    }

    /// The Responses output item of the whole answer; `text` is the JSON string of its text.
    fn output_item(&self, text: &str) -> String {
        let id = String::from_utf8_lossy(&self.plan.prefix);
        format!(
            "{{\"id\":\"msg_{id}\",\"type\":\"message\",\"status\":\"completed\",\"role\":\"assistant\",\"content\":[{{\"type\":\"output_text\",\"text\":{text},\"annotations\":[]}}]}}"
        )
    }

    fn usage_event(&self) -> Bytes {
        match self.plan.dialect {
            Dialect::Chat => {}
            Dialect::Responses => {
                let id = String::from_utf8_lossy(&self.plan.prefix);
                let text = serde_json::to_string(&self.full_text()).unwrap_or_default();
                let input = self.plan.prompt_tokens + self.plan.cache_read_tokens;
                let output = u64::from(self.plan.tokens);
                let (status, incomplete) = if self.plan.finish_reason == "length" {
                    ("incomplete", "{\"reason\":\"max_output_tokens\"}")
                } else {
                    ("completed", "null")
                };
                return Bytes::from(format!(
                    "event: response.{status}\ndata: {{\"type\":\"response.{status}\",\"sequence_number\":{},\"response\":{{\"id\":\"resp_{id}\",\"object\":\"response\",\"status\":\"{status}\",\"incomplete_details\":{incomplete},\"model\":{},\"output\":[{}],\"usage\":{{\"input_tokens\":{input},\"input_tokens_details\":{{\"cached_tokens\":{}}},\"output_tokens\":{output},\"output_tokens_details\":{{\"reasoning_tokens\":0}},\"total_tokens\":{}}}}}}}\n\n",
                    output + 7,
                    self.plan.model_json,
                    self.output_item(&text),
                    self.plan.cache_read_tokens,
                    input + output,
                ));
            }
            Dialect::Messages => {
                let stop = if self.plan.finish_reason == "length" {
                    "max_tokens"
                } else {
                    "end_turn"
                };
                return Bytes::from(format!(
                    "event: message_delta\ndata: {{\"type\":\"message_delta\",\"delta\":{{\"stop_reason\":\"{stop}\",\"stop_sequence\":null}},\"usage\":{{\"output_tokens\":{}}}}}\n\n",
                    self.plan.tokens
                ));
            }
        }
        let completion = u64::from(self.plan.tokens) * u64::from(self.plan.n);
        let mut buf = BytesMut::with_capacity(self.plan.prefix.len() + 96);
        buf.put_slice(&self.plan.prefix);
        let prompt = self.plan.prompt_tokens + self.plan.cache_read_tokens;
        buf.put_slice(b"],\"usage\":{\"prompt_tokens\":");
        put_u64(&mut buf, prompt);
        buf.put_slice(b",\"completion_tokens\":");
        put_u64(&mut buf, completion);
        buf.put_slice(b",\"total_tokens\":");
        put_u64(&mut buf, prompt + completion);
        if self.plan.cache_read_tokens > 0 {
            buf.put_slice(b",\"prompt_tokens_details\":{\"cached_tokens\":");
            put_u64(&mut buf, self.plan.cache_read_tokens);
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

/// The text of an answer of `tokens` words, as the streams send it word by word.
pub(super) fn answer_text(tokens: u32) -> String {
    (0..tokens as usize)
        .map(|i| WORDS[i % WORDS.len()])
        .flat_map(|word| [word, " "])
        .collect()
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
