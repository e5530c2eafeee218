//! The three streamed formats the metered stream carries: OpenAI chat completions, OpenAI
//! Responses and Anthropic Messages. The SSE parser, the hold drawing and the settlement are the
//! same for all three (`stream.rs`); a format only contributes its [`EventReader`]: which events
//! carry output and how many tokens, where the upstream's usage is, which event ends the answer
//! or reports an error, and how the gateway's own closing events are written (the `tollgate`
//! object, the error event of a cut or a break). [`complete_output`] reads a non-stream answer of
//! the two agent formats the same way.

use std::borrow::Cow;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use super::chunk::{is_empty_json, parse_chunk, Text, Usage};
use super::sse::SseEvent;
use super::stream::tollgate_object;
use super::tokenizer::Tokenizer;
use crate::config::Endpoint;
use crate::ledger::LedgerRecord;

/// The wire format of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    Chat,
    Responses,
    Messages,
}

impl Wire {
    /// The format of an endpoint's streams (embeddings do not stream: read as chat).
    pub fn of(endpoint: Endpoint) -> Wire {
        match endpoint {
            Endpoint::Chat | Endpoint::Embeddings => Wire::Chat,
            Endpoint::Responses => Wire::Responses,
            Endpoint::Messages => Wire::Messages,
        }
    }
}

/// What the metered stream does with an event, after paying its tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Forward it as it came.
    Forward,
    /// Hold it back: it is written again at the end with the `tollgate` object (chat's usage
    /// chunk, the Responses `response.completed`, Anthropic's last `message_delta`).
    Rewrite,
    /// Hold it back and send it last at a normal end (Anthropic's `message_stop`).
    Last,
    /// Drop it: the gateway writes its own (chat's `[DONE]`).
    Drop,
}

/// One event as the meter sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    /// Output tokens the event carries, paid before it is forwarded.
    pub tokens: u64,
    /// The upstream's usage, when this event makes it known.
    pub usage: Option<Usage>,
    /// What to do with the event once its tokens are paid.
    pub keep: Keep,
    /// The upstream ended its answer normally with this event.
    pub end: bool,
    /// The upstream reported an error or sent an event that cannot be read: the stream broke.
    pub broken: bool,
}

impl Reading {
    fn forward(tokens: u64) -> Reading {
        Reading {
            tokens,
            usage: None,
            keep: Keep::Forward,
            end: false,
            broken: false,
        }
    }

    fn broken() -> Reading {
        Reading {
            broken: true,
            ..Reading::forward(0)
        }
    }
}

/// The error a stream ends with when it does not complete: what the client is told in the
/// format's error event.
#[derive(Debug, Clone, Copy)]
pub struct Closing<'a> {
    /// The OpenAI error `type` (chat only).
    pub kind: &'a str,
    /// The code: `balance_exhausted`, `upstream_stream_error` or `shutting_down`.
    pub code: &'a str,
    pub message: &'a str,
}

/// Reads the events of one stream in its format, keeping what the closing events need.
#[derive(Debug)]
pub struct EventReader {
    wire: Wire,
    /// Chat: `id`, `created` and `model` of the first chunk, for a synthesized usage chunk.
    meta: Option<(Value, Value, Value)>,
    /// Responses: the last `sequence_number` the upstream sent.
    sequence: Option<u64>,
    /// Messages: the usage so far (`message_start`'s input counts, `message_delta`'s output).
    usage: MessagesUsage,
}

impl EventReader {
    pub fn new(wire: Wire) -> EventReader {
        EventReader {
            wire,
            meta: None,
            sequence: None,
            usage: MessagesUsage::default(),
        }
    }

    pub fn wire(&self) -> Wire {
        self.wire
    }

    /// Reads one event. Comment-only events carry nothing and are forwarded.
    pub fn read(&mut self, ev: &SseEvent, tokenizer: &Tokenizer) -> Reading {
        let Some(data) = ev.data.as_deref() else {
            return Reading::forward(0);
        };
        match self.wire {
            Wire::Chat => self.read_chat(ev, data, tokenizer),
            Wire::Responses => self.read_responses(data, tokenizer),
            Wire::Messages => self.read_messages(data, tokenizer),
        }
    }

    /// Chat: one token count per chunk (R5); the usage chunk without content is held back;
    /// `[DONE]` ends the answer.
    fn read_chat(&mut self, ev: &SseEvent, data: &str, tokenizer: &Tokenizer) -> Reading {
        if ev.is_done() {
            return Reading {
                keep: Keep::Drop,
                end: true,
                ..Reading::forward(0)
            };
        }
        let Ok(chunk) = parse_chunk(data) else {
            return Reading::broken();
        };
        if chunk.is_error() {
            return Reading::broken();
        }
        let tokens = tokenizer.chunk_output_tokens(&chunk);
        let usage = chunk.usage();
        let content = chunk.has_content();
        drop(chunk);
        if self.meta.is_none() {
            if let Ok(Value::Object(m)) = serde_json::from_str::<Value>(data) {
                self.meta = Some((
                    m.get("id").cloned().unwrap_or(Value::Null),
                    m.get("created").cloned().unwrap_or(Value::Null),
                    m.get("model").cloned().unwrap_or(Value::Null),
                ));
            }
        }
        Reading {
            tokens,
            usage,
            keep: if usage.is_some() && !content {
                Keep::Rewrite
            } else {
                Keep::Forward
            },
            end: false,
            broken: false,
        }
    }

    /// Responses: tokens per delta event; `response.completed` (or `.incomplete`) carries the
    /// usage and ends the answer; `error` and `response.failed` break it.
    fn read_responses(&mut self, data: &str, tokenizer: &Tokenizer) -> Reading {
        let Ok(event) = serde_json::from_str::<ResponsesEvent>(data) else {
            return Reading::broken();
        };
        if let Some(n) = event.sequence_number {
            self.sequence = Some(n);
        }
        let kind = event.kind.as_deref().unwrap_or_default();
        match kind {
            "response.completed" | "response.incomplete" => {
                let usage = serde_json::from_str::<Value>(data)
                    .ok()
                    .and_then(|v| v.get("response").and_then(responses_usage));
                Reading {
                    usage,
                    keep: Keep::Rewrite,
                    end: true,
                    ..Reading::forward(0)
                }
            }
            "error" | "response.failed" => Reading::broken(),
            _ if kind.ends_with(".delta") => {
                Reading::forward(event.delta.map_or(0, |d| delta_tokens(d, tokenizer)))
            }
            _ => Reading::forward(0),
        }
    }

    /// Messages: tokens per `content_block_delta` of text, thinking or tool input; the usage is
    /// `message_start`'s input and the last `message_delta`'s output, known at `message_stop`,
    /// which ends the answer; `error` breaks it.
    fn read_messages(&mut self, data: &str, tokenizer: &Tokenizer) -> Reading {
        let Ok(event) = serde_json::from_str::<MessagesEvent>(data) else {
            return Reading::broken();
        };
        match event.kind.as_deref().unwrap_or_default() {
            "content_block_delta" => {
                let text = event.delta.as_ref().and_then(|d| {
                    match d.kind.as_deref().unwrap_or_default() {
                        "text_delta" => d.text.as_deref(),
                        "thinking_delta" => d.thinking.as_deref(),
                        "input_json_delta" => d.partial_json.as_deref(),
                        _ => None,
                    }
                });
                Reading::forward(text.map_or(0, |t| tokenizer.delta_tokens(t)))
            }
            "message_start" => {
                if let Some(u) = event.message.and_then(|m| m.usage) {
                    self.usage.merge(&u);
                }
                Reading::forward(0)
            }
            "message_delta" => {
                if let Some(u) = &event.usage {
                    self.usage.merge(u);
                }
                Reading {
                    keep: Keep::Rewrite,
                    ..Reading::forward(0)
                }
            }
            "message_stop" => Reading {
                usage: self.usage.counts(),
                keep: Keep::Last,
                end: true,
                ..Reading::forward(0)
            },
            "error" => Reading::broken(),
            _ => Reading::forward(0),
        }
    }

    /// The events after the last paid one: at a normal end, the held event rewritten with the
    /// `tollgate` object (and what was held to go last); otherwise the format's error event.
    /// `held` is the data of the last [`Keep::Rewrite`] event, `last` the raw [`Keep::Last`]
    /// event; `include_usage` is the chat client's `stream_options.include_usage`.
    pub fn closing_events(
        &self,
        rec: &LedgerRecord,
        held: Option<&str>,
        last: Option<&Bytes>,
        include_usage: bool,
        error: Option<Closing<'_>>,
    ) -> Bytes {
        let mut out = BytesMut::new();
        let tollgate = serde_json::to_value(tollgate_object(rec)).unwrap_or_default();
        match self.wire {
            Wire::Chat => {
                if include_usage {
                    let chunk = self.chat_usage_chunk(rec, held, tollgate);
                    push_event(&mut out, None, &chunk.to_string());
                }
                if let Some(e) = error {
                    let body = json!({"error": {
                        "message": e.message,
                        "type": e.kind,
                        "code": e.code,
                        "param": null,
                    }});
                    push_event(&mut out, None, &body.to_string());
                }
                out.extend_from_slice(b"data: [DONE]\n\n");
            }
            Wire::Responses => match error {
                None => {
                    let Some(Value::Object(mut event)) =
                        held.and_then(|d| serde_json::from_str(d).ok())
                    else {
                        return out.freeze();
                    };
                    if let Some(Value::Object(response)) = event.get_mut("response") {
                        response.insert("tollgate".into(), tollgate);
                    } else {
                        event.insert("tollgate".into(), tollgate);
                    }
                    let kind = event
                        .get("type")
                        .and_then(Value::as_str)
                        .unwrap_or("response.completed")
                        .to_string();
                    push_event(&mut out, Some(&kind), &Value::Object(event).to_string());
                }
                Some(e) => {
                    let mut event = json!({
                        "type": "error",
                        "code": e.code,
                        "message": e.message,
                        "param": null,
                    });
                    if let Some(n) = self.sequence {
                        event["sequence_number"] = json!(n.saturating_add(1));
                    }
                    event["tollgate"] = tollgate;
                    push_event(&mut out, Some("error"), &event.to_string());
                }
            },
            Wire::Messages => match error {
                None => {
                    let mut event = match held.map(serde_json::from_str::<Value>) {
                        Some(Ok(Value::Object(m))) => m,
                        _ => {
                            let mut m = Map::new();
                            m.insert("type".into(), json!("message_delta"));
                            m.insert(
                                "delta".into(),
                                json!({"stop_reason": null, "stop_sequence": null}),
                            );
                            m.insert("usage".into(), json!({"output_tokens": rec.output_tokens}));
                            m
                        }
                    };
                    event.insert("tollgate".into(), tollgate);
                    push_event(
                        &mut out,
                        Some("message_delta"),
                        &Value::Object(event).to_string(),
                    );
                    match last {
                        Some(raw) => out.extend_from_slice(raw),
                        None => push_event(
                            &mut out,
                            Some("message_stop"),
                            "{\"type\":\"message_stop\"}",
                        ),
                    }
                }
                Some(e) => {
                    let event = json!({
                        "type": "error",
                        "error": {"type": e.code, "message": e.message},
                        "tollgate": tollgate,
                    });
                    push_event(&mut out, Some("error"), &event.to_string());
                }
            },
        }
        out.freeze()
    }

    /// Chat's usage chunk: the upstream's (held) or one made from the first chunk's metadata,
    /// with the billed counts (R23) and the `tollgate` object.
    fn chat_usage_chunk(&self, rec: &LedgerRecord, held: Option<&str>, tollgate: Value) -> Value {
        let mut chunk = match held.map(serde_json::from_str::<Value>) {
            Some(Ok(Value::Object(m))) => m,
            _ => {
                let (id, created, model) =
                    self.meta
                        .clone()
                        .unwrap_or((Value::Null, Value::Null, Value::Null));
                let mut m = Map::new();
                m.insert("id".into(), id);
                m.insert("object".into(), json!("chat.completion.chunk"));
                m.insert("created".into(), created);
                m.insert("model".into(), model);
                m.insert("choices".into(), json!([]));
                m
            }
        };
        let usage = billed_chat_usage(chunk.remove("usage"), rec);
        chunk.insert("usage".into(), usage);
        chunk.insert("tollgate".into(), tollgate);
        Value::Object(chunk)
    }
}

/// Chat's `usage` with the billed numbers (R23): the upstream's other members are kept (its
/// details), the counts replaced, and `prompt_tokens_details.cached_tokens` set to the billed
/// cache reads when there are any.
fn billed_chat_usage(upstream: Option<Value>, rec: &LedgerRecord) -> Value {
    let mut usage = match upstream {
        Some(Value::Object(m)) => m,
        _ => Map::new(),
    };
    usage.insert("prompt_tokens".into(), json!(rec.input_tokens));
    usage.insert("completion_tokens".into(), json!(rec.output_tokens));
    usage.insert(
        "total_tokens".into(),
        json!(rec.input_tokens.saturating_add(rec.output_tokens)),
    );
    match usage.get_mut("prompt_tokens_details") {
        Some(Value::Object(details)) => {
            details.insert("cached_tokens".into(), json!(rec.cache_read_tokens));
        }
        _ if rec.cache_read_tokens > 0 => {
            usage.insert(
                "prompt_tokens_details".into(),
                json!({ "cached_tokens": rec.cache_read_tokens }),
            );
        }
        _ => {}
    }
    Value::Object(usage)
}

fn push_event(out: &mut BytesMut, event: Option<&str>, data: &str) {
    if let Some(name) = event {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\n");
    }
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(data.as_bytes());
    out.extend_from_slice(b"\n\n");
}

/// What metering reads from a Responses event: its type, the `delta` of a delta event, and the
/// sequence number (for the gateway's own error event). Other members are skipped unread.
#[derive(Deserialize)]
struct ResponsesEvent<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Text<'a>>,
    #[serde(borrow, default)]
    delta: Option<&'a RawValue>,
    #[serde(default)]
    sequence_number: Option<u64>,
}

/// Tokens of a Responses `delta`: a string's text tokens; any other value that is not empty
/// (e.g. an audio delta) counts one, so that it is paid for before it is forwarded.
fn delta_tokens(delta: &RawValue, tokenizer: &Tokenizer) -> u64 {
    let raw = delta.get();
    if raw.starts_with('"') {
        let text: Cow<'_, str> = if raw.contains('\\') {
            match serde_json::from_str::<String>(raw) {
                Ok(s) => Cow::Owned(s),
                Err(_) => return 1,
            }
        } else {
            Cow::Borrowed(&raw[1..raw.len().saturating_sub(1).max(1)])
        };
        tokenizer.delta_tokens(&text)
    } else {
        u64::from(!is_empty_json(raw))
    }
}

/// `usage` of a Responses `response` object, when it has both counts.
fn responses_usage(response: &Value) -> Option<Usage> {
    let usage = response.get("usage")?;
    Some(Usage {
        prompt_tokens: usage.get("input_tokens")?.as_u64()?,
        completion_tokens: usage.get("output_tokens")?.as_u64()?,
        cache_read_tokens: usage
            .pointer("/input_tokens_details/cached_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(0),
        cache_write_tokens: 0,
    })
}

/// What metering reads from a Messages event.
#[derive(Deserialize)]
struct MessagesEvent<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Text<'a>>,
    #[serde(borrow, default)]
    delta: Option<MessagesDelta<'a>>,
    #[serde(default)]
    usage: Option<RawMessagesUsage>,
    #[serde(default)]
    message: Option<MessageHead>,
}

#[derive(Deserialize)]
struct MessagesDelta<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Text<'a>>,
    #[serde(borrow, default)]
    text: Option<Text<'a>>,
    #[serde(borrow, default)]
    thinking: Option<Text<'a>>,
    #[serde(borrow, default)]
    partial_json: Option<Text<'a>>,
}

#[derive(Deserialize)]
struct MessageHead {
    #[serde(default)]
    usage: Option<RawMessagesUsage>,
}

/// Anthropic's `usage` as it may arrive (every count optional, `null` included).
#[derive(Debug, Default, Clone, Deserialize)]
struct RawMessagesUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
}

/// A Messages stream's usage as it builds up: a later event's counts replace earlier ones.
#[derive(Debug, Default, Clone)]
struct MessagesUsage {
    input: Option<u64>,
    cache_write: Option<u64>,
    cache_read: Option<u64>,
    output: Option<u64>,
}

impl MessagesUsage {
    fn merge(&mut self, u: &RawMessagesUsage) {
        self.input = u.input_tokens.or(self.input);
        self.cache_write = u.cache_creation_input_tokens.or(self.cache_write);
        self.cache_read = u.cache_read_input_tokens.or(self.cache_read);
        self.output = u.output_tokens.or(self.output);
    }

    /// The usage once both the input and the output count are known. The whole input is the
    /// uncached input plus the cache writes and reads.
    fn counts(&self) -> Option<Usage> {
        anthropic_usage(
            self.input?,
            self.cache_write.unwrap_or(0),
            self.cache_read.unwrap_or(0),
            self.output?,
        )
    }
}

fn anthropic_usage(input: u64, cache_write: u64, cache_read: u64, output: u64) -> Option<Usage> {
    Some(Usage {
        prompt_tokens: input.checked_add(cache_write)?.checked_add(cache_read)?,
        completion_tokens: output,
        cache_read_tokens: cache_read,
        cache_write_tokens: cache_write,
    })
}

/// The output texts of a non-stream Responses or Messages answer (what is billed when the
/// upstream reports no usage) and its usage. Responses: each output item's `output_text`,
/// `refusal`, function call `arguments` and reasoning text; Messages: each content block's
/// `text`, `thinking` and tool `input` (as JSON). Chat and embeddings are read elsewhere.
pub fn complete_output(wire: Wire, body: &Value) -> (Vec<Cow<'_, str>>, Option<Usage>) {
    fn text(v: Option<&Value>) -> Option<Cow<'_, str>> {
        v.and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .map(Cow::Borrowed)
    }
    let mut texts: Vec<Cow<'_, str>> = Vec::new();
    match wire {
        Wire::Chat => (Vec::new(), None),
        Wire::Responses => {
            let items = body.get("output").and_then(Value::as_array);
            for item in items.into_iter().flatten() {
                texts.extend(text(item.get("arguments")));
                for list in ["content", "summary"] {
                    let parts = item.get(list).and_then(Value::as_array);
                    for part in parts.into_iter().flatten() {
                        texts.extend(text(part.get("text")));
                        texts.extend(text(part.get("refusal")));
                    }
                }
            }
            (texts, responses_usage(body))
        }
        Wire::Messages => {
            let mut inputs = Vec::new();
            let blocks = body.get("content").and_then(Value::as_array);
            for block in blocks.into_iter().flatten() {
                texts.extend(text(block.get("text")));
                texts.extend(text(block.get("thinking")));
                if let Some(input) = block.get("input").filter(|v| !v.is_string()) {
                    inputs.push(Cow::Owned(input.to_string()));
                }
            }
            texts.extend(inputs);
            let usage = body.get("usage").and_then(|u| {
                let n = |k: &str| u.get(k).and_then(Value::as_u64);
                anthropic_usage(
                    n("input_tokens")?,
                    n("cache_creation_input_tokens").unwrap_or(0),
                    n("cache_read_input_tokens").unwrap_or(0),
                    n("output_tokens")?,
                )
            });
            (texts, usage)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::metering::sse::SseParser;
    use crate::metering::tokenizer::TokenizerKind;

    fn events(text: &str) -> Vec<SseEvent> {
        let mut p = SseParser::new();
        p.push(Bytes::copy_from_slice(text.as_bytes()));
        let mut out = Vec::new();
        while let Ok(Some(ev)) = p.next_event() {
            out.push(ev);
        }
        out
    }

    fn chunks() -> Tokenizer {
        Tokenizer::new(TokenizerKind::Chunks).unwrap()
    }

    #[test]
    fn responses_deltas_of_every_kind_are_counted_and_completed_carries_usage() {
        let stream = concat!(
            "event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"r\",\"output\":[]}}\n\n",
            "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"sequence_number\":1,\"delta\":\"Hi\"}\n\n",
            "event: response.refusal.delta\ndata: {\"type\":\"response.refusal.delta\",\"sequence_number\":2,\"delta\":\"no\"}\n\n",
            "event: response.function_call_arguments.delta\ndata: {\"type\":\"response.function_call_arguments.delta\",\"sequence_number\":3,\"delta\":\"{\\\"a\\\":\"}\n\n",
            "event: response.reasoning_text.delta\ndata: {\"type\":\"response.reasoning_text.delta\",\"sequence_number\":4,\"delta\":\"think\"}\n\n",
            "event: response.reasoning_summary_text.delta\ndata: {\"type\":\"response.reasoning_summary_text.delta\",\"sequence_number\":5,\"delta\":\"sum\"}\n\n",
            "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"sequence_number\":6,\"delta\":\"\"}\n\n",
            "event: response.output_text.done\ndata: {\"type\":\"response.output_text.done\",\"sequence_number\":7,\"text\":\"Hi\"}\n\n",
            "event: response.completed\ndata: {\"type\":\"response.completed\",\"sequence_number\":8,\"response\":{\"id\":\"r\",\"usage\":{\"input_tokens\":30,\"input_tokens_details\":{\"cached_tokens\":20},\"output_tokens\":5}}}\n\n",
        );
        let mut r = EventReader::new(Wire::Responses);
        let t = chunks();
        let got: Vec<Reading> = events(stream).iter().map(|e| r.read(e, &t)).collect();
        let tokens: Vec<u64> = got.iter().map(|g| g.tokens).collect();
        assert_eq!(tokens, [0, 1, 1, 1, 1, 1, 0, 0, 0]);
        let last = got.last().unwrap();
        assert!(last.end && !last.broken);
        assert_eq!(last.keep, Keep::Rewrite);
        assert_eq!(
            last.usage,
            Some(Usage {
                prompt_tokens: 30,
                completion_tokens: 5,
                cache_read_tokens: 20,
                cache_write_tokens: 0
            })
        );
        assert!(got[..8]
            .iter()
            .all(|g| !g.end && !g.broken && g.keep == Keep::Forward));
        // BPE counts the text of each delta.
        let bpe = Tokenizer::new(TokenizerKind::O200kBase).unwrap();
        let ev = &events(
            "data: {\"type\":\"response.output_text.delta\",\"delta\":\"hello there, world\"}\n\n",
        )[0];
        assert_eq!(
            EventReader::new(Wire::Responses).read(ev, &bpe).tokens,
            bpe.count_text("hello there, world")
        );
    }

    #[test]
    fn responses_errors_and_bad_events_break_the_stream() {
        let t = chunks();
        for data in [
            "{\"type\":\"error\",\"code\":\"server_error\",\"message\":\"x\"}",
            "{\"type\":\"response.failed\",\"response\":{}}",
            "{not json",
            "[1,2]",
        ] {
            let ev = &events(&format!("data: {data}\n\n"))[0];
            assert!(
                EventReader::new(Wire::Responses).read(ev, &t).broken,
                "{data}"
            );
        }
    }

    #[test]
    fn messages_deltas_are_counted_and_usage_adds_the_cache_to_the_input() {
        let stream = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"content\":[],\"usage\":{\"input_tokens\":10,\"cache_creation_input_tokens\":100,\"cache_read_input_tokens\":1000,\"output_tokens\":1}}}\n\n",
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"thinking\",\"thinking\":\"\"}}\n\n",
            "event: ping\ndata: {\"type\":\"ping\"}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"thinking_delta\",\"thinking\":\"hmm\"}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"signature_delta\",\"signature\":\"abc\"}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":2,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"q\\\":\"}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":7}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        );
        let mut r = EventReader::new(Wire::Messages);
        let t = chunks();
        let got: Vec<Reading> = events(stream).iter().map(|e| r.read(e, &t)).collect();
        let tokens: Vec<u64> = got.iter().map(|g| g.tokens).collect();
        assert_eq!(tokens, [0, 0, 0, 1, 0, 1, 1, 0, 0]);
        assert_eq!(got[7].keep, Keep::Rewrite);
        assert_eq!(got[7].usage, None, "known only at message_stop");
        let stop = got[8];
        assert!(stop.end);
        assert_eq!(stop.keep, Keep::Last);
        assert_eq!(
            stop.usage,
            Some(Usage {
                prompt_tokens: 1110,
                completion_tokens: 7,
                cache_read_tokens: 1000,
                cache_write_tokens: 100
            })
        );
        let err = &events("event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"x\"}}\n\n")[0];
        assert!(EventReader::new(Wire::Messages).read(err, &t).broken);
        // Without a message_delta the output is unknown: no usage.
        let stop = &events("data: {\"type\":\"message_stop\"}\n\n")[0];
        assert_eq!(EventReader::new(Wire::Messages).read(stop, &t).usage, None);
    }

    #[test]
    fn non_stream_answers_give_their_texts_and_usage() {
        let body = json!({"output": [
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": "s"}], "content": [{"type": "reasoning_text", "text": "r"}]},
            {"type": "function_call", "arguments": "{\"a\":1}"},
            {"type": "message", "content": [{"type": "output_text", "text": "hello"}, {"type": "refusal", "refusal": "no"}]},
        ], "usage": {"input_tokens": 3, "output_tokens": 9}});
        let (texts, usage) = complete_output(Wire::Responses, &body);
        assert_eq!(texts, ["r", "s", "{\"a\":1}", "hello", "no"]);
        assert_eq!(
            usage.map(|u| (u.prompt_tokens, u.completion_tokens)),
            Some((3, 9))
        );

        let body = json!({"content": [
            {"type": "thinking", "thinking": "t"},
            {"type": "text", "text": "hi"},
            {"type": "tool_use", "id": "x", "name": "f", "input": {"q": 1}},
        ], "usage": {"input_tokens": 2, "cache_read_input_tokens": 5, "output_tokens": 4}});
        let (texts, usage) = complete_output(Wire::Messages, &body);
        assert_eq!(texts, ["t", "hi", "{\"q\":1}"]);
        let u = usage.unwrap();
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.cache_read_tokens),
            (7, 4, 5)
        );
        assert_eq!(
            complete_output(Wire::Messages, &json!({"content": []})).1,
            None
        );
    }
}
