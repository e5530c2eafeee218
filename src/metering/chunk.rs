//! Reading OpenAI chat completion responses for metering: the step after SSE parsing.
//!
//! [`parse_chunk`] deserialises only what metering needs from one streamed
//! `chat.completion.chunk` (`data` of an SSE event): each choice's index, delta texts and finish
//! reason, the usage block, the model, and whether the chunk is an error object. Strings borrow
//! from the event's `data` unless they contain JSON escapes; unknown fields are skipped.
//! [`completion_output`] does the same for a non-stream `chat.completion` body.
//!
//! The texts that count as output (R5): `content`, `reasoning_content`, `refusal`, and
//! every tool call's `function.arguments` (also the legacy `function_call.arguments`). A delta
//! that carries anything else (any other member but `role` with a value that is not null,
//! false or empty, e.g. `audio`) is output too, so that it is paid for before it is forwarded:
//! it counts as at least one token.

use std::borrow::Cow;

use serde::de::IgnoredAny;
use serde::Deserialize;

/// Token usage as reported by an upstream (`usage.prompt_tokens` / `usage.completion_tokens`,
/// or the same counts of the Responses and Messages formats). `prompt_tokens` is the whole
/// input, cached tokens included; the cache counts say how much of it was read from or written
/// to the provider's prompt cache (0 when the upstream does not say; chat reports reads only,
/// as `usage.prompt_tokens_details.cached_tokens`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    #[serde(default)]
    pub cache_read_tokens: u64,
    #[serde(default)]
    pub cache_write_tokens: u64,
}

/// A borrowed view of one `chat.completion.chunk`.
#[derive(Debug, Deserialize)]
pub struct ChunkView<'a> {
    #[serde(borrow, default)]
    choices: Option<Vec<RawChoice<'a>>>,
    #[serde(default)]
    usage: Option<RawUsage>,
    #[serde(borrow, default)]
    model: Option<Text<'a>>,
    #[serde(default)]
    error: Option<IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
struct RawChoice<'a> {
    #[serde(default)]
    index: u32,
    #[serde(borrow, default)]
    delta: Option<RawDelta<'a>>,
    #[serde(borrow, default)]
    finish_reason: Option<Text<'a>>,
}

#[derive(Debug, Default, Deserialize)]
struct RawDelta<'a> {
    #[serde(borrow, default)]
    content: Option<Text<'a>>,
    #[serde(borrow, default)]
    reasoning_content: Option<Text<'a>>,
    #[serde(borrow, default)]
    refusal: Option<Text<'a>>,
    #[serde(borrow, default)]
    tool_calls: Option<Vec<RawToolCall<'a>>>,
    #[serde(borrow, default)]
    function_call: Option<RawFunction<'a>>,
    /// Some other member carries output (see the module doc); set after parsing.
    #[serde(skip)]
    other: bool,
}

/// Members of a delta that are not output themselves (the known text fields are read apart).
const NOT_OUTPUT: [&str; 6] = [
    "role",
    "content",
    "reasoning_content",
    "refusal",
    "tool_calls",
    "function_call",
];

/// A JSON value that carries nothing: null, false, an empty string, array or object.
pub(super) fn is_empty_json(value: &str) -> bool {
    match value
        .trim_matches(|c: char| c.is_ascii_whitespace())
        .as_bytes()
    {
        b"null" | b"false" | b"\"\"" => true,
        [b'[', inner @ .., b']'] | [b'{', inner @ .., b'}'] => {
            inner.iter().all(u8::is_ascii_whitespace)
        }
        _ => false,
    }
}

/// [`is_empty_json`] for a parsed value.
fn is_empty_value(v: &serde_json::Value) -> bool {
    use serde_json::Value;
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// For a chunk read by serde_json (the slow path): marks the deltas whose other members carry
/// output, as the one-pass reader does.
fn mark_other_output(view: &mut ChunkView<'_>, data: &str) {
    let Ok(serde_json::Value::Object(doc)) = serde_json::from_str::<serde_json::Value>(data) else {
        return;
    };
    let Some(serde_json::Value::Array(choices)) = doc.get("choices") else {
        return;
    };
    let parsed = view.choices.as_deref_mut().unwrap_or_default();
    for (raw, choice) in parsed.iter_mut().zip(choices) {
        let (Some(delta), Some(serde_json::Value::Object(members))) =
            (raw.delta.as_mut(), choice.get("delta"))
        else {
            continue;
        };
        delta.other = members
            .iter()
            .any(|(k, v)| !NOT_OUTPUT.contains(&k.as_str()) && !is_empty_value(v));
    }
}

#[derive(Debug, Deserialize)]
struct RawToolCall<'a> {
    #[serde(borrow, default)]
    function: Option<RawFunction<'a>>,
}

#[derive(Debug, Deserialize)]
struct RawFunction<'a> {
    #[serde(borrow, default)]
    arguments: Option<Text<'a>>,
}

/// `usage` as it may arrive; metering trusts it only when both counts are present.
#[derive(Debug, Deserialize)]
struct RawUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<RawPromptDetails>,
}

/// `usage.prompt_tokens_details`: the cached part of the prompt. Read leniently: a detail
/// that is not a count leaves the input uncached rather than failing the chunk.
#[derive(Debug)]
struct RawPromptDetails {
    cached_tokens: Option<u64>,
}

impl<'de> Deserialize<'de> for RawPromptDetails {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<RawPromptDetails, D::Error> {
        let details = serde_json::Value::deserialize(d)?;
        Ok(RawPromptDetails {
            cached_tokens: details
                .get("cached_tokens")
                .and_then(serde_json::Value::as_u64),
        })
    }
}

impl RawUsage {
    /// Chat usage needs both counts; embeddings usage only `prompt_tokens` (completion 0).
    fn counts(&self, chat: bool) -> Option<Usage> {
        let cached = self.prompt_tokens_details.as_ref();
        Some(Usage {
            prompt_tokens: self.prompt_tokens?,
            completion_tokens: if chat { self.completion_tokens? } else { 0 },
            cache_read_tokens: cached.and_then(|d| d.cached_tokens).unwrap_or(0),
            cache_write_tokens: 0,
        })
    }
}

/// A JSON string borrowed from the input unless it has escapes. (serde borrows a bare
/// `Cow<str>` field marked `borrow`, but not one inside an `Option`; this newtype keeps it bare.)
#[derive(Debug, Deserialize)]
#[serde(transparent)]
pub(super) struct Text<'a>(#[serde(borrow)] pub(super) Cow<'a, str>);

impl std::ops::Deref for Text<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

/// Parses one streamed chunk's JSON.
///
/// A hand-written scanner reads the usual chunk shape in one pass (serde_json's derive costs
/// about twice as much, and this runs for every token); anything it is not sure about — an
/// escaped key, a duplicate field, an unusual number, deep nesting — goes to serde_json, so the
/// result (or the error) is always the one serde_json gives.
pub fn parse_chunk(data: &str) -> Result<ChunkView<'_>, serde_json::Error> {
    match scan::chunk(data) {
        Some(view) => Ok(view),
        None => {
            let mut view: ChunkView<'_> = serde_json::from_str(data)?;
            mark_other_output(&mut view, data);
            Ok(view)
        }
    }
}

impl ChunkView<'_> {
    /// Each choice's delta, in the order the upstream sent them.
    pub fn choices(&self) -> impl Iterator<Item = ChoiceDelta<'_>> {
        self.choices
            .as_deref()
            .unwrap_or_default()
            .iter()
            .map(ChoiceDelta::from_raw)
    }

    /// The upstream's usage, when the chunk carries both token counts (the final usage chunk).
    pub fn usage(&self) -> Option<Usage> {
        self.usage.as_ref()?.counts(true)
    }

    /// True when some choice's delta carries output (see [`ChoiceDelta::has_output`]).
    pub fn has_content(&self) -> bool {
        self.choices().any(|c| c.has_output())
    }

    /// The upstream's `model` field, if present.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// True when the chunk is an error object (`{"error": ...}`) rather than a completion chunk.
    pub fn is_error(&self) -> bool {
        self.error.is_some()
    }
}

/// One choice of a chunk: its index, the delta's text fields and the finish reason.
#[derive(Debug, Clone, Copy)]
pub struct ChoiceDelta<'a> {
    pub index: u32,
    pub content: Option<&'a str>,
    pub reasoning_content: Option<&'a str>,
    pub refusal: Option<&'a str>,
    pub finish_reason: Option<&'a str>,
    tool_calls: &'a [RawToolCall<'a>],
    function_call: Option<&'a str>,
    /// Output in another member than the texts (e.g. `audio`).
    pub other: bool,
}

impl<'a> ChoiceDelta<'a> {
    fn from_raw(raw: &'a RawChoice<'a>) -> Self {
        ChoiceDelta {
            index: raw.index,
            finish_reason: raw.finish_reason.as_deref(),
            ..ChoiceDelta::of(raw.delta.as_ref())
        }
    }

    /// A delta's texts without a choice around it (a non-stream message has a delta's fields).
    fn of(delta: Option<&'a RawDelta<'a>>) -> Self {
        ChoiceDelta {
            index: 0,
            finish_reason: None,
            content: delta.and_then(|d| d.content.as_deref()),
            reasoning_content: delta.and_then(|d| d.reasoning_content.as_deref()),
            refusal: delta.and_then(|d| d.refusal.as_deref()),
            tool_calls: delta
                .and_then(|d| d.tool_calls.as_deref())
                .unwrap_or_default(),
            function_call: delta
                .and_then(|d| d.function_call.as_ref())
                .and_then(|f| f.arguments.as_deref()),
            other: delta.is_some_and(|d| d.other),
        }
    }

    /// The `function.arguments` fragment of each tool call in this delta that has one (and of
    /// the legacy `function_call`).
    pub fn tool_arguments(&self) -> impl Iterator<Item = &'a str> + 'a {
        self.tool_calls
            .iter()
            .filter_map(|call| call.function.as_ref()?.arguments.as_deref())
            .chain(self.function_call)
    }

    /// Every non-empty output text of this delta: content, reasoning content, refusal, then tool
    /// call arguments.
    pub fn texts(&self) -> impl Iterator<Item = &'a str> + 'a {
        [self.content, self.reasoning_content, self.refusal]
            .into_iter()
            .flatten()
            .chain(self.tool_arguments())
            .filter(|text| !text.is_empty())
    }

    /// True when the delta carries any non-empty output text; role-only and finish-only deltas
    /// do not.
    pub fn has_text(&self) -> bool {
        self.texts().next().is_some()
    }

    /// True when the delta carries output of any kind: text, or another member that is not
    /// empty (which metering counts as at least one token).
    pub fn has_output(&self) -> bool {
        self.other || self.has_text()
    }
}

/// The output texts of a non-stream `chat.completion` body (each choice's message `content`,
/// `reasoning_content`, `refusal` and tool call `arguments`, non-empty ones only, in order) and
/// its usage when it reports both counts.
pub fn completion_output(body: &serde_json::Value) -> (Vec<&str>, Option<Usage>) {
    let mut texts = Vec::new();
    let choices = body.get("choices").and_then(|c| c.as_array());
    for choice in choices.into_iter().flatten() {
        let Some(message) = choice.get("message") else {
            continue;
        };
        for field in ["content", "reasoning_content", "refusal"] {
            if let Some(text) = message.get(field).and_then(|v| v.as_str()) {
                texts.push(text);
            }
        }
        let calls = message.get("tool_calls").and_then(|c| c.as_array());
        for call in calls.into_iter().flatten() {
            if let Some(args) = call.pointer("/function/arguments").and_then(|v| v.as_str()) {
                texts.push(args);
            }
        }
        if let Some(args) = message
            .pointer("/function_call/arguments")
            .and_then(|v| v.as_str())
        {
            texts.push(args);
        }
    }
    texts.retain(|t| !t.is_empty());
    (texts, chat_usage(body))
}

/// A non-stream upstream body (chat completion or embeddings) that is a JSON object.
pub enum UpstreamBody<'a> {
    /// The usual shape, read in one pass: strings borrow from the body, unknown members are
    /// skipped without building them.
    View(RawBody<'a>),
    /// Any other object (a member of an unexpected type, a duplicate member): read as a `Value`,
    /// so the result is the one [`completion_output`] and the usage functions give.
    Json(serde_json::Value),
}

/// What metering reads from a non-stream body.
#[derive(Debug, Deserialize)]
pub struct RawBody<'a> {
    #[serde(borrow, default)]
    choices: Option<Vec<RawMessageChoice<'a>>>,
    #[serde(default)]
    usage: Option<RawUsage>,
    #[serde(default)]
    tollgate: Seen,
}

#[derive(Debug, Deserialize)]
struct RawMessageChoice<'a> {
    /// A message has the fields of a delta.
    #[serde(borrow, default)]
    message: Option<RawDelta<'a>>,
}

/// Whether a member was present, whatever its value (`null` included).
#[derive(Debug, Default)]
struct Seen(bool);

impl<'de> Deserialize<'de> for Seen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Seen, D::Error> {
        IgnoredAny::deserialize(d)?;
        Ok(Seen(true))
    }
}

impl<'a> UpstreamBody<'a> {
    /// `None` when `body` is not one JSON object in UTF-8.
    pub fn parse(body: &'a [u8]) -> Option<UpstreamBody<'a>> {
        let text = std::str::from_utf8(body).ok()?;
        if text.trim_start().starts_with('{') {
            if let Ok(view) = serde_json::from_str::<RawBody>(text) {
                return Some(UpstreamBody::View(view));
            }
        }
        match serde_json::from_str(text) {
            Ok(v @ serde_json::Value::Object(_)) => Some(UpstreamBody::Json(v)),
            _ => None,
        }
    }

    /// The chat output texts and usage, as [`completion_output`] reads them.
    pub fn completion_output(&self) -> (Vec<&str>, Option<Usage>) {
        let view = match self {
            UpstreamBody::View(view) => view,
            UpstreamBody::Json(v) => return completion_output(v),
        };
        let messages = view.choices.iter().flatten().map(|c| c.message.as_ref());
        let texts = messages.flat_map(|m| ChoiceDelta::of(m).texts()).collect();
        (texts, self.usage(true))
    }

    /// The embeddings usage, as [`embeddings_usage`] reads it.
    pub fn embeddings_usage(&self) -> Option<Usage> {
        self.usage(false)
    }

    /// Chat usage needs both counts; embeddings usage only `prompt_tokens`.
    fn usage(&self, chat: bool) -> Option<Usage> {
        let view = match self {
            UpstreamBody::View(view) => view,
            UpstreamBody::Json(v) if chat => return chat_usage(v),
            UpstreamBody::Json(v) => return embeddings_usage(v),
        };
        view.usage.as_ref()?.counts(chat)
    }

    /// Does the body have a `tollgate` member of its own?
    pub fn has_tollgate(&self) -> bool {
        match self {
            UpstreamBody::View(view) => view.tollgate.0,
            UpstreamBody::Json(v) => v.get("tollgate").is_some(),
        }
    }
}

/// `usage` of a chat completion body, when it has both `prompt_tokens` and `completion_tokens`.
/// Its `prompt_tokens_details.cached_tokens`, when a count, is the cached part of the input.
pub fn chat_usage(body: &serde_json::Value) -> Option<Usage> {
    let usage = body.get("usage")?;
    Some(Usage {
        prompt_tokens: usage.get("prompt_tokens")?.as_u64()?,
        completion_tokens: usage.get("completion_tokens")?.as_u64()?,
        cache_read_tokens: usage
            .pointer("/prompt_tokens_details/cached_tokens")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0),
        cache_write_tokens: 0,
    })
}

/// `usage` of an embeddings body: `prompt_tokens` is required, `completion_tokens` is 0.
pub fn embeddings_usage(body: &serde_json::Value) -> Option<Usage> {
    let usage = body.get("usage")?;
    Some(Usage {
        prompt_tokens: usage.get("prompt_tokens")?.as_u64()?,
        ..Usage::default()
    })
}

/// The fast path of [`parse_chunk`]: a strict JSON scanner that builds the same [`ChunkView`]
/// as the serde derive, or gives up (`None`) and leaves the input to serde_json.
mod scan {
    use super::*;

    /// Nesting beyond this is left to serde_json (whose limit is 128).
    const MAX_DEPTH: usize = 64;

    /// Bytes that end a plain run inside a JSON string: quote, backslash, control characters.
    static STRING_SPECIAL: [bool; 256] = {
        let mut table = [false; 256];
        let mut b = 0;
        while b < 0x20 {
            table[b] = true;
            b += 1;
        }
        table[b'"' as usize] = true;
        table[b'\\' as usize] = true;
        table
    };

    struct Scanner<'a> {
        text: &'a str,
        pos: usize,
    }

    pub(super) fn chunk(text: &str) -> Option<ChunkView<'_>> {
        let mut s = Scanner { text, pos: 0 };
        let mut view = ChunkView {
            choices: None,
            usage: None,
            model: None,
            error: None,
        };
        let (mut choices, mut usage, mut model, mut error) = (false, false, false, false);
        s.object(|s, key| {
            match key {
                "choices" => {
                    once(&mut choices)?;
                    if !s.null()? {
                        // Filled in place: a choice is large, and moving it costs.
                        let list = view.choices.insert(Vec::with_capacity(1));
                        s.array(|s| {
                            list.push(RawChoice::default());
                            s.choice(list.last_mut()?)
                        })?;
                    }
                }
                "usage" => {
                    once(&mut usage)?;
                    view.usage = s.nullable(|s| s.usage())?;
                }
                "model" => {
                    once(&mut model)?;
                    view.model = s.nullable(|s| s.string())?;
                }
                "error" => {
                    once(&mut error)?;
                    view.error = s.nullable(|s| s.skip_value(1).map(|()| IgnoredAny))?;
                }
                _ => s.skip_value(1)?,
            }
            Some(())
        })?;
        s.ws();
        (s.pos == text.len()).then_some(view)
    }

    /// A known field may appear once (serde's derive rejects duplicates).
    fn once(seen: &mut bool) -> Option<()> {
        if std::mem::replace(seen, true) {
            None
        } else {
            Some(())
        }
    }

    impl<'a> Scanner<'a> {
        fn peek(&self) -> Option<u8> {
            self.text.as_bytes().get(self.pos).copied()
        }

        fn ws(&mut self) {
            while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
                self.pos += 1;
            }
        }

        fn eat(&mut self, byte: u8) -> Option<()> {
            self.ws();
            if self.peek() == Some(byte) {
                self.pos += 1;
                Some(())
            } else {
                None
            }
        }

        fn literal(&mut self, word: &str) -> Option<()> {
            let rest = self.text.as_bytes().get(self.pos..)?;
            if rest.starts_with(word.as_bytes()) {
                self.pos += word.len();
                Some(())
            } else {
                None
            }
        }

        /// Consumes a `null` if one is next.
        fn null(&mut self) -> Option<bool> {
            self.ws();
            if self.peek() == Some(b'n') {
                self.literal("null")?;
                Some(true)
            } else {
                Some(false)
            }
        }

        /// `null` gives `None`; anything else is read by `read`.
        fn nullable<T>(&mut self, read: impl FnOnce(&mut Self) -> Option<T>) -> Option<Option<T>> {
            self.ws();
            if self.peek() == Some(b'n') {
                self.literal("null")?;
                Some(None)
            } else {
                read(self).map(Some)
            }
        }

        /// An object, calling `field` with each key (unescaped keys only) positioned at its value.
        fn object(
            &mut self,
            mut field: impl FnMut(&mut Self, &'a str) -> Option<()>,
        ) -> Option<()> {
            self.eat(b'{')?;
            self.ws();
            if self.peek() == Some(b'}') {
                self.pos += 1;
                return Some(());
            }
            loop {
                self.eat(b'"')?;
                let (start, end, escaped) = self.string_end()?;
                if escaped {
                    return None;
                }
                let key = self.text.get(start..end)?;
                self.eat(b':')?;
                field(self, key)?;
                self.ws();
                match self.peek()? {
                    b',' => self.pos += 1,
                    b'}' => {
                        self.pos += 1;
                        return Some(());
                    }
                    _ => return None,
                }
            }
        }

        fn array<T>(&mut self, mut item: impl FnMut(&mut Self) -> Option<T>) -> Option<Vec<T>> {
            self.eat(b'[')?;
            let mut items = Vec::new();
            self.ws();
            if self.peek() == Some(b']') {
                self.pos += 1;
                return Some(items);
            }
            loop {
                items.push(item(self)?);
                self.ws();
                match self.peek()? {
                    b',' => self.pos += 1,
                    b']' => {
                        self.pos += 1;
                        return Some(items);
                    }
                    _ => return None,
                }
            }
        }

        /// After an opening quote: finds the closing one. Returns the content's range and whether
        /// it holds escapes; refuses raw control characters, as JSON does.
        fn string_end(&mut self) -> Option<(usize, usize, bool)> {
            let bytes = self.text.as_bytes();
            let start = self.pos;
            let mut escaped = false;
            let mut i = start;
            loop {
                while bytes
                    .get(i)
                    .is_some_and(|&b| !STRING_SPECIAL[usize::from(b)])
                {
                    i += 1;
                }
                match *bytes.get(i)? {
                    b'"' => {
                        self.pos = i + 1;
                        return Some((start, i, escaped));
                    }
                    b'\\' => {
                        escaped = true;
                        i += 2;
                    }
                    0..=0x1f => return None,
                    _ => i += 1,
                }
            }
        }

        /// A string value, borrowed unless it has escapes (those are decoded by serde_json).
        fn string(&mut self) -> Option<Text<'a>> {
            self.eat(b'"')?;
            let (start, end, escaped) = self.string_end()?;
            if escaped {
                let quoted = self.text.get(start - 1..end + 1)?;
                serde_json::from_str::<String>(quoted)
                    .ok()
                    .map(|s| Text(Cow::Owned(s)))
            } else {
                self.text.get(start..end).map(|s| Text(Cow::Borrowed(s)))
            }
        }

        /// A non-negative integer without sign, fraction or exponent.
        fn unsigned(&mut self) -> Option<u64> {
            self.ws();
            let bytes = self.text.as_bytes();
            let start = self.pos;
            let mut value: u64 = 0;
            while let Some(digit @ b'0'..=b'9') = bytes.get(self.pos).copied() {
                value = value
                    .checked_mul(10)?
                    .checked_add(u64::from(digit - b'0'))?;
                self.pos += 1;
            }
            let digits = self.pos - start;
            let leading_zero = digits > 1 && bytes[start] == b'0';
            let continues = matches!(self.peek(), Some(b'.' | b'e' | b'E'));
            (digits > 0 && !leading_zero && !continues).then_some(value)
        }

        fn choice(&mut self, choice: &mut RawChoice<'a>) -> Option<()> {
            let (mut index, mut delta, mut finish) = (false, false, false);
            self.object(|s, key| {
                match key {
                    "index" => {
                        once(&mut index)?;
                        choice.index = u32::try_from(s.unsigned()?).ok()?;
                    }
                    "delta" => {
                        once(&mut delta)?;
                        choice.delta = None;
                        if !s.null()? {
                            s.delta(choice.delta.insert(RawDelta::default()))?;
                        }
                    }
                    "finish_reason" => {
                        once(&mut finish)?;
                        choice.finish_reason = s.nullable(|s| s.string())?;
                    }
                    _ => s.skip_value(3)?,
                }
                Some(())
            })
        }

        fn delta(&mut self, delta: &mut RawDelta<'a>) -> Option<()> {
            let mut seen = [false; 5];
            self.object(|s, key| {
                match key {
                    "content" => {
                        once(&mut seen[0])?;
                        delta.content = s.nullable(|s| s.string())?;
                    }
                    "reasoning_content" => {
                        once(&mut seen[1])?;
                        delta.reasoning_content = s.nullable(|s| s.string())?;
                    }
                    "refusal" => {
                        once(&mut seen[2])?;
                        delta.refusal = s.nullable(|s| s.string())?;
                    }
                    "tool_calls" => {
                        once(&mut seen[3])?;
                        delta.tool_calls = s.nullable(|s| s.array(|s| s.tool_call()))?;
                    }
                    "function_call" => {
                        once(&mut seen[4])?;
                        delta.function_call = s.nullable(|s| s.function(5))?;
                    }
                    _ => {
                        let start = s.pos;
                        s.skip_value(4)?;
                        if key != "role" && !is_empty_json(s.text.get(start..s.pos)?) {
                            delta.other = true;
                        }
                    }
                }
                Some(())
            })
        }

        fn tool_call(&mut self) -> Option<RawToolCall<'a>> {
            let mut call = RawToolCall { function: None };
            let mut seen = false;
            self.object(|s, key| {
                if key == "function" {
                    once(&mut seen)?;
                    call.function = s.nullable(|s| s.function(7))?;
                } else {
                    s.skip_value(6)?;
                }
                Some(())
            })?;
            Some(call)
        }

        fn function(&mut self, depth: usize) -> Option<RawFunction<'a>> {
            let mut function = RawFunction { arguments: None };
            let mut seen = false;
            self.object(|s, key| {
                if key == "arguments" {
                    once(&mut seen)?;
                    function.arguments = s.nullable(|s| s.string())?;
                } else {
                    s.skip_value(depth)?;
                }
                Some(())
            })?;
            Some(function)
        }

        fn usage(&mut self) -> Option<RawUsage> {
            let mut usage = RawUsage {
                prompt_tokens: None,
                completion_tokens: None,
                prompt_tokens_details: None,
            };
            let (mut prompt, mut completion, mut details) = (false, false, false);
            self.object(|s, key| {
                match key {
                    "prompt_tokens" => {
                        once(&mut prompt)?;
                        usage.prompt_tokens = s.nullable(|s| s.unsigned())?;
                    }
                    "completion_tokens" => {
                        once(&mut completion)?;
                        usage.completion_tokens = s.nullable(|s| s.unsigned())?;
                    }
                    "prompt_tokens_details" => {
                        once(&mut details)?;
                        usage.prompt_tokens_details = s.nullable(|s| s.prompt_details())?;
                    }
                    _ => s.skip_value(2)?,
                }
                Some(())
            })?;
            Some(usage)
        }

        fn prompt_details(&mut self) -> Option<RawPromptDetails> {
            let mut details = RawPromptDetails {
                cached_tokens: None,
            };
            let mut seen = false;
            self.object(|s, key| {
                if key == "cached_tokens" {
                    once(&mut seen)?;
                    details.cached_tokens = s.nullable(|s| s.unsigned())?;
                } else {
                    s.skip_value(3)?;
                }
                Some(())
            })?;
            Some(details)
        }

        /// Skips one valid JSON value at nesting `depth`.
        fn skip_value(&mut self, depth: usize) -> Option<()> {
            if depth > MAX_DEPTH {
                return None;
            }
            self.ws();
            match self.peek()? {
                b'"' => {
                    self.pos += 1;
                    let (start, end, escaped) = self.string_end()?;
                    if escaped {
                        // Let serde_json judge the escapes.
                        let quoted = self.text.get(start - 1..end + 1)?;
                        serde_json::from_str::<IgnoredAny>(quoted).ok()?;
                    }
                    Some(())
                }
                b'{' => self.object(|s, _| s.skip_value(depth + 1)),
                b'[' => self.array(|s| s.skip_value(depth + 1)).map(drop),
                b't' => self.literal("true"),
                b'f' => self.literal("false"),
                b'n' => self.literal("null"),
                b'-' | b'0'..=b'9' => self.number(),
                _ => None,
            }
        }

        /// Skips a JSON number: `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`.
        fn number(&mut self) -> Option<()> {
            let bytes = self.text.as_bytes();
            let digits = |pos: &mut usize| {
                let start = *pos;
                while bytes.get(*pos).is_some_and(u8::is_ascii_digit) {
                    *pos += 1;
                }
                *pos > start
            };
            let mut pos = self.pos;
            if bytes.get(pos) == Some(&b'-') {
                pos += 1;
            }
            match bytes.get(pos)? {
                b'0' => pos += 1,
                b'1'..=b'9' => {
                    digits(&mut pos);
                }
                _ => return None,
            }
            if bytes.get(pos) == Some(&b'.') {
                pos += 1;
                if !digits(&mut pos) {
                    return None;
                }
            }
            if let Some(b'e' | b'E') = bytes.get(pos) {
                pos += 1;
                if let Some(b'+' | b'-') = bytes.get(pos) {
                    pos += 1;
                }
                if !digits(&mut pos) {
                    return None;
                }
            }
            if bytes.get(pos).is_some_and(u8::is_ascii_digit) {
                return None; // a leading zero followed by digits
            }
            self.pos = pos;
            Some(())
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::json;

    const CONTENT: &str = r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","system_fingerprint":"fp","choices":[{"index":0,"delta":{"content":" hello"},"logprobs":null,"finish_reason":null}],"usage":null}"#;

    #[test]
    fn content_chunk() {
        let chunk = parse_chunk(CONTENT).unwrap();
        assert!(chunk.has_content());
        assert_eq!(chunk.usage(), None);
        assert_eq!(chunk.model(), Some("gpt-4o-mini"));
        assert!(!chunk.is_error());
        let choices: Vec<_> = chunk.choices().collect();
        assert_eq!(choices.len(), 1);
        assert_eq!(choices[0].index, 0);
        assert_eq!(choices[0].content, Some(" hello"));
        assert_eq!(choices[0].finish_reason, None);
        assert_eq!(choices[0].texts().collect::<Vec<_>>(), vec![" hello"]);
    }

    #[test]
    fn strings_borrow_unless_escaped() {
        let chunk = parse_chunk(CONTENT).unwrap();
        let raw = &chunk.choices.as_ref().unwrap()[0];
        assert!(matches!(
            raw.delta.as_ref().unwrap().content,
            Some(Text(Cow::Borrowed(_)))
        ));
        let escaped =
            parse_chunk(r#"{"choices":[{"index":0,"delta":{"content":"a\nb\u00e9"}}]}"#).unwrap();
        assert_eq!(escaped.choices().next().unwrap().content, Some("a\nbé"));
    }

    #[test]
    fn role_only_and_finish_only_deltas_have_no_content() {
        let role = parse_chunk(
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#,
        )
        .unwrap();
        assert!(!role.has_content());
        let finish =
            parse_chunk(r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#).unwrap();
        assert!(!finish.has_content());
        assert_eq!(finish.choices().next().unwrap().finish_reason, Some("stop"));
        let nulls = parse_chunk(
            r#"{"choices":[{"index":0,"delta":{"content":null,"tool_calls":null,"refusal":null}}]}"#,
        )
        .unwrap();
        assert!(!nulls.has_content());
    }

    #[test]
    fn reasoning_refusal_and_tool_arguments_count_as_content() {
        for data in [
            r#"{"choices":[{"index":0,"delta":{"reasoning_content":"hmm"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"refusal":"no"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"c","type":"function","function":{"name":"f","arguments":"{\""}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"function_call":{"arguments":"{}"}}}]}"#,
        ] {
            assert!(parse_chunk(data).unwrap().has_content(), "{data}");
        }
        // A tool call that only names the function carries no output text yet.
        let name_only = parse_chunk(
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"name":"f","arguments":""}}]}}]}"#,
        )
        .unwrap();
        assert!(!name_only.has_content());
    }

    #[test]
    fn several_choices_and_texts() {
        let chunk = parse_chunk(
            r#"{"choices":[{"index":1,"delta":{"content":"a","reasoning_content":"r","tool_calls":[{"function":{"arguments":"x"}},{"function":{"arguments":"y"}}]}},{"index":0,"delta":{"role":"assistant"}}]}"#,
        )
        .unwrap();
        let choices: Vec<_> = chunk.choices().collect();
        assert_eq!(choices[0].index, 1);
        assert_eq!(
            choices[0].texts().collect::<Vec<_>>(),
            vec!["a", "r", "x", "y"]
        );
        assert!(!choices[1].has_text());
    }

    #[test]
    fn usage_chunk() {
        let chunk = parse_chunk(
            r#"{"id":"x","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":34,"total_tokens":46,"completion_tokens_details":{"reasoning_tokens":0}}}"#,
        )
        .unwrap();
        assert_eq!(
            chunk.usage(),
            Some(Usage {
                prompt_tokens: 12,
                completion_tokens: 34,
                ..Usage::default()
            })
        );
        assert!(!chunk.has_content());
        let partial = parse_chunk(r#"{"choices":[],"usage":{"prompt_tokens":12}}"#).unwrap();
        assert_eq!(partial.usage(), None);
    }

    #[test]
    fn error_chunk_and_invalid_json() {
        let err = parse_chunk(r#"{"error":{"message":"boom","type":"server_error"}}"#).unwrap();
        assert!(err.is_error());
        assert_eq!(err.choices().count(), 0);
        assert!(parse_chunk("[DONE]").is_err());
        assert!(parse_chunk(r#"{"choices":[{"index":-1}]}"#).is_err());
    }

    #[test]
    fn non_stream_completion_output() {
        let body = json!({
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "Hello there",
                  "tool_calls": [{"id": "c", "type": "function",
                                  "function": {"name": "f", "arguments": "{\"a\":1}"}}]}},
                {"index": 1, "message": {"role": "assistant", "content": null, "refusal": "no",
                  "reasoning_content": ""}}
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
        });
        let (texts, usage) = completion_output(&body);
        assert_eq!(texts, vec!["Hello there", "{\"a\":1}", "no"]);
        assert_eq!(
            usage,
            Some(Usage {
                prompt_tokens: 5,
                completion_tokens: 7,
                ..Usage::default()
            })
        );
        let bogus = json!({"choices": "bogus"});
        let (texts, usage) = completion_output(&bogus);
        assert!(texts.is_empty());
        assert_eq!(usage, None);
    }

    #[test]
    fn non_stream_bodies_read_in_one_pass_as_their_json_values_read() {
        let bodies: [&[u8]; 14] = [
            br#"{"id":"x","choices":[{"index":0,"message":{"role":"assistant","content":"Hi \"there\" \u00e9","refusal":null}}],"usage":{"prompt_tokens":3,"completion_tokens":4}}"#,
            br#"{"choices":[{"message":{"content":"","reasoning_content":"think","tool_calls":[{"function":{"name":"f","arguments":"{}"}},{"type":"x"}],"function_call":{"arguments":"[1]"}}},{"message":null},{}]}"#,
            br#"{"choices":null,"usage":null,"tollgate":null}"#,
            br#"{"choices":"bogus","usage":{"prompt_tokens":2}}"#,
            br#"{"choices":[{"message":{"content":["a","b"]}}],"usage":{"prompt_tokens":2,"completion_tokens":1}}"#,
            br#"{"usage":{"prompt_tokens":2.0,"completion_tokens":1}}"#,
            br#"{"usage":{"prompt_tokens":-1,"completion_tokens":1}}"#,
            br#"{"usage":{"prompt_tokens":1,"completion_tokens":1},"usage":{"prompt_tokens":5,"completion_tokens":6}}"#,
            br#"{"data":[{"embedding":[0.1,-2e-3,3]}],"usage":{"prompt_tokens":9,"total_tokens":9},"tollgate":{"x":1}}"#,
            br#"  {}  "#,
            br#"[{"choices":[]}]"#,
            br#"{"choices":[]} trailing"#,
            b"{\"data\":\"\xff\"}",
            br#""text""#,
        ];
        for body in bodies {
            let shown = String::from_utf8_lossy(body);
            let value = std::str::from_utf8(body)
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(t).ok())
                .filter(|v| v.is_object());
            let parsed = UpstreamBody::parse(body);
            assert_eq!(parsed.is_some(), value.is_some(), "{shown}");
            let (Some(parsed), Some(value)) = (parsed, value) else {
                continue;
            };
            assert_eq!(
                parsed.completion_output(),
                completion_output(&value),
                "{shown}"
            );
            assert_eq!(
                parsed.embeddings_usage(),
                embeddings_usage(&value),
                "{shown}"
            );
            assert_eq!(
                parsed.has_tollgate(),
                value.get("tollgate").is_some(),
                "{shown}"
            );
        }
        // The usual shapes take the one-pass reader.
        for body in &bodies[..3] {
            assert!(matches!(
                UpstreamBody::parse(body),
                Some(UpstreamBody::View(_))
            ));
        }
    }

    #[test]
    fn embeddings_usage_has_no_completion_tokens() {
        let body = json!({"data": [], "usage": {"prompt_tokens": 9, "total_tokens": 9}});
        assert_eq!(
            embeddings_usage(&body),
            Some(Usage {
                prompt_tokens: 9,
                completion_tokens: 0,
                ..Usage::default()
            })
        );
        assert_eq!(chat_usage(&body), None);
    }

    #[test]
    fn usage_serialises_with_its_cache_counts() {
        let usage = Usage {
            prompt_tokens: 1,
            completion_tokens: 2,
            cache_read_tokens: 3,
            cache_write_tokens: 0,
        };
        assert_eq!(
            serde_json::to_value(usage).unwrap(),
            json!({"prompt_tokens": 1, "completion_tokens": 2, "cache_read_tokens": 3, "cache_write_tokens": 0})
        );
        let old: Usage =
            serde_json::from_value(json!({"prompt_tokens": 1, "completion_tokens": 2})).unwrap();
        assert_eq!((old.cache_read_tokens, old.cache_write_tokens), (0, 0));
    }

    /// Chat reports its cached prompt tokens as `usage.prompt_tokens_details.cached_tokens`:
    /// read as cache reads on both parsing paths, in chunks and whole bodies; a detail that is
    /// not a count leaves the input uncached and the usage intact.
    #[test]
    fn cached_prompt_tokens_are_cache_reads() {
        let cached = |prompt, completion, read| Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            cache_read_tokens: read,
            cache_write_tokens: 0,
        };
        let data = r#"{"choices":[],"usage":{"prompt_tokens":1200,"completion_tokens":34,"total_tokens":1234,"prompt_tokens_details":{"cached_tokens":1024,"audio_tokens":0}}}"#;
        assert!(scan::chunk(data).is_some(), "the fast path reads it");
        assert_eq!(
            parse_chunk(data).unwrap().usage(),
            Some(cached(1200, 34, 1024))
        );
        assert_eq!(
            serde_view(data).unwrap().usage(),
            Some(cached(1200, 34, 1024))
        );
        for (details, read) in [
            ("null", 0),
            ("{}", 0),
            (r#"{"cached_tokens":null}"#, 0),
            (r#"{"cached_tokens":-5}"#, 0),
            (r#"{"cached_tokens":2.5}"#, 0),
            (r#""many""#, 0),
            ("7", 0),
            (r#"{"cached_tokens":1,"cached_tokens":9}"#, 9),
        ] {
            let data = format!(
                r#"{{"choices":[],"usage":{{"prompt_tokens":12,"completion_tokens":3,"prompt_tokens_details":{details}}}}}"#
            );
            let chunk = parse_chunk(&data).unwrap_or_else(|e| panic!("{data}: {e}"));
            assert_eq!(chunk.usage(), Some(cached(12, 3, read)), "{data}");
            let body = format!(
                r#"{{"choices":[{{"message":{{"content":"hi"}}}}],"usage":{{"prompt_tokens":12,"completion_tokens":3,"prompt_tokens_details":{details}}}}}"#
            );
            let (_, usage) = UpstreamBody::parse(body.as_bytes())
                .unwrap()
                .completion_output();
            assert_eq!(usage, Some(cached(12, 3, read)), "{body}");
            let value: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(
                completion_output(&value).1,
                Some(cached(12, 3, read)),
                "{body}"
            );
        }
    }

    // ---- the fast scanner agrees with serde_json ----

    /// The slow path: serde_json, then the other-output marks from the document.
    fn serde_view(data: &str) -> Result<ChunkView<'_>, serde_json::Error> {
        let mut view = serde_json::from_str(data)?;
        mark_other_output(&mut view, data);
        Ok(view)
    }

    #[test]
    fn fast_path_takes_the_usual_chunks() {
        for data in [
            CONTENT,
            r#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":34,"total_tokens":46,"prompt_tokens_details":{"cached_tokens":0}}}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"c","type":"function","function":{"name":"f","arguments":"{\"a\": [1, 2.5e-3]}"}}]}}]}"#,
            r#" { "choices" : [ { "index" : 3 , "delta" : { "content" : "a\u00e9\n" } , "logprobs" : { "content" : [ { "token" : "x" , "logprob" : -0.5 , "bytes" : [ 120 ] } ] } } ] } "#,
            r#"{"error":{"message":"boom","code":null}}"#,
        ] {
            let fast = scan::chunk(data).unwrap_or_else(|| panic!("fast path refused {data}"));
            assert_eq!(
                format!("{fast:?}"),
                format!("{:?}", serde_view(data).unwrap())
            );
        }
    }

    #[test]
    fn fast_path_defers_what_serde_must_judge() {
        for data in [
            r#"{"choices":[],"choices":[]}"#,
            r#"{"choices":[{"index":0,"index":1}]}"#,
            r#"{"cho\u0069ces":[{"index":0,"delta":{"content":"x"}}]}"#,
            r#"{"choices":[{"index":1.0}]}"#,
            r#"{"choices":[{"index":-0}]}"#,
            r#"{"choices":[{"index":4294967296}]}"#,
            r#"{"choices":[[0,{"content":"seq"}]]}"#,
            r#"{"choices":[{"delta":{"content":"bad \x escape"}}]}"#,
            "{\"choices\":[{\"delta\":{\"content\":\"raw\ncontrol\"}}]}",
            r#"{"choices":[]} x"#,
            r#"{"a":01}"#,
            r#"{"a":[1,]}"#,
            "",
        ] {
            assert!(scan::chunk(data).is_none(), "{data}");
            // parse_chunk then answers exactly as serde_json does.
            assert_eq!(
                format!("{:?}", parse_chunk(data).map_err(|e| e.to_string())),
                format!("{:?}", serde_view(data).map_err(|e| e.to_string()))
            );
        }
        // Duplicates are an error, sequences a valid alternative form for serde.
        assert!(parse_chunk(r#"{"choices":[],"choices":[]}"#).is_err());
        let seq = parse_chunk(r#"{"choices":[[0,{"content":"seq"}]]}"#).unwrap();
        assert!(seq.has_content());
    }

    mod differential {
        use super::*;
        use proptest::prelude::*;
        use serde_json::Value;

        fn text() -> BoxedStrategy<Value> {
            prop_oneof![
                12 => "[a-z \"\\\\/\n\t\u{7f}é🌍]{0,8}".prop_map(Value::String),
                1 => Just(Value::Null),
                1 => any::<i64>().prop_map(Value::from),
                1 => Just(json!(1.5)),
                1 => Just(json!({"nested": [true, false, null, "s"]})),
            ]
            .boxed()
        }

        fn count() -> BoxedStrategy<Value> {
            prop_oneof![
                12 => (0u64..100_000).prop_map(Value::from),
                1 => any::<u64>().prop_map(Value::from),
                1 => any::<i64>().prop_map(Value::from),
                1 => Just(json!(2.0)),
                1 => Just(json!(1e300)),
                1 => Just(Value::Null),
                1 => Just(json!("7")),
            ]
            .boxed()
        }

        fn maybe(
            key: &'static str,
            v: impl Strategy<Value = Value>,
        ) -> impl Strategy<Value = Option<(String, Value)>> {
            proptest::option::weighted(0.7, v.prop_map(move |v| (key.to_owned(), v)))
        }

        fn object(fields: Vec<Option<(String, Value)>>) -> Value {
            Value::Object(fields.into_iter().flatten().collect())
        }

        fn tool_call() -> BoxedStrategy<Value> {
            (
                maybe("index", count()),
                maybe(
                    "function",
                    (maybe("name", text()), maybe("arguments", text()))
                        .prop_map(|(a, b)| object(vec![a, b])),
                ),
            )
                .prop_map(|(a, b)| object(vec![a, b]))
                .boxed()
        }

        fn delta() -> BoxedStrategy<Value> {
            (
                maybe("role", text()),
                maybe("content", text()),
                maybe("reasoning_content", text()),
                maybe("refusal", text()),
                maybe(
                    "tool_calls",
                    prop_oneof![
                        proptest::collection::vec(tool_call(), 0..3).prop_map(Value::from),
                        Just(Value::Null)
                    ],
                ),
                maybe(
                    "function_call",
                    prop_oneof![
                        maybe("arguments", text()).prop_map(|a| object(vec![a])),
                        Just(Value::Null),
                        text()
                    ],
                ),
            )
                .prop_map(|(a, b, c, d, e, f)| object(vec![a, b, c, d, e, f]))
                .boxed()
        }

        fn choice() -> BoxedStrategy<Value> {
            (
                maybe("index", count()),
                maybe("delta", prop_oneof![4 => delta(), 1 => text()]),
                maybe("finish_reason", text()),
                maybe("logprobs", text()),
            )
                .prop_map(|(a, b, c, d)| object(vec![a, b, c, d]))
                .boxed()
        }

        fn chunk() -> BoxedStrategy<Value> {
            (
                maybe("id", text()),
                maybe("model", text()),
                maybe("choices", prop_oneof![4 => proptest::collection::vec(choice(), 0..3).prop_map(Value::from), 1 => text()]),
                maybe("usage", prop_oneof![
                    4 => (maybe("prompt_tokens", count()), maybe("completion_tokens", count()), maybe("total_tokens", count()))
                        .prop_map(|(a, b, c)| object(vec![a, b, c])),
                    1 => text(),
                ]),
                maybe("error", prop_oneof![Just(Value::Null), text()]),
            )
                .prop_map(|(a, b, c, d, e)| object(vec![a, b, c, d, e]))
            .boxed()
        }

        /// A serialised chunk, sometimes pretty, sometimes damaged by one edit.
        fn document() -> impl Strategy<Value = String> {
            (
                chunk(),
                any::<bool>(),
                proptest::option::of((any::<usize>(), 0usize..3, "[\\[\\]{}\",:0-9a-z\\\\ ]{0,2}")),
            )
                .prop_map(|(v, pretty, edit)| {
                    let text = if pretty {
                        serde_json::to_string_pretty(&v).unwrap()
                    } else {
                        serde_json::to_string(&v).unwrap()
                    };
                    let Some((at, remove, insert)) = edit else {
                        return text;
                    };
                    let mut chars: Vec<char> = text.chars().collect();
                    let at = at % (chars.len() + 1);
                    let remove = remove.min(chars.len() - at);
                    chars.splice(at..at + remove, insert.chars());
                    chars.into_iter().collect()
                })
        }

        /// The generator reaches both paths: most intact documents take the fast path.
        #[test]
        fn generator_covers_both_paths() {
            use proptest::strategy::ValueTree;
            let mut runner = proptest::test_runner::TestRunner::deterministic();
            let (mut fast, mut deferred_ok, mut invalid) = (0, 0, 0);
            for _ in 0..500 {
                let data = document().new_tree(&mut runner).unwrap().current();
                match (scan::chunk(&data).is_some(), serde_view(&data).is_ok()) {
                    (true, _) => fast += 1,
                    (false, true) => deferred_ok += 1,
                    (false, false) => invalid += 1,
                }
            }
            assert!(fast > 150 && invalid > 50, "{fast} {deferred_ok} {invalid}");
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]
            #[test]
            fn fast_path_matches_serde(data in document()) {
                let reference = serde_view(&data);
                match scan::chunk(&data) {
                    Some(fast) => {
                        let reference = reference.map_err(|e| e.to_string());
                        prop_assert!(reference.is_ok(), "fast path accepted what serde refuses: {data} ({reference:?})");
                        prop_assert_eq!(format!("{fast:?}"), format!("{:?}", reference.unwrap()));
                    }
                    None => {
                        // Deferred: parse_chunk gives serde's answer by construction.
                    }
                }
            }
        }
    }
}
