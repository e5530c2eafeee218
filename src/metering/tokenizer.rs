//! Token counting for metering (R5): the gateway's own count of input and output tokens,
//! billed when the upstream reports no usage and compared with it when it does.
//!
//! A route's tokenizer is one of:
//! - `chunks`: no vocabulary. Input and non-stream output are ceil(UTF-8 bytes / 4); a streamed
//!   chunk counts one token per choice delta that carries output text.
//! - `o200k_base`, `cl100k_base`: OpenAI's BPE vocabularies (tiktoken). Each text is encoded
//!   with `encode_ordinary` (special-token text counts as plain text); a chat request adds 3
//!   tokens per message and 3 for the reply's priming.
//!
//! Each BPE table is set up once per process, on first use, and shared by every [`Tokenizer`].
//! It is our own compact counting table (`bpe.rs`, 4.1 MiB of read-only data for `o200k_base`),
//! written at build time from the vocabulary tiktoken-rs ships, and counts exactly as
//! tiktoken-rs's `encode_ordinary` does.
//! Text with a very long run of whitespace or non-whitespace is counted in pieces of at most
//! [`MAX_RUN_BYTES`] within that run: the BPE merge is quadratic in the length of one run (and
//! the split regex can give up on long whitespace), so a hostile request could otherwise stall
//! a worker. Ordinary text never has such runs and is counted exactly.

use std::sync::OnceLock;

use serde_json::Value;

use crate::metering::bpe::{BpeTable, Vocabulary as Vocab};
use crate::metering::chunk::ChunkView;

/// Longest run of whitespace or non-whitespace that is handed to the BPE in one piece.
pub const MAX_RUN_BYTES: usize = 256;

/// Which tokenizer a route meters with (config `tokenizer`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenizerKind {
    O200kBase,
    Cl100kBase,
    Chunks,
}

impl TokenizerKind {
    /// The config name of this tokenizer.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenizerKind::O200kBase => "o200k_base",
            TokenizerKind::Cl100kBase => "cl100k_base",
            TokenizerKind::Chunks => "chunks",
        }
    }
}

impl std::fmt::Display for TokenizerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenizerError {
    /// The embedded BPE table could not be set up (an internal error).
    #[error("cannot load the {kind} tokenizer: {message}")]
    Load {
        kind: TokenizerKind,
        message: String,
    },
}

/// A token counter. Cheap to clone: the BPE table is shared.
#[derive(Clone)]
pub struct Tokenizer {
    kind: TokenizerKind,
    bpe: Option<Vocabulary>,
}

/// A shared BPE table, built on first use, and the index of its per-thread memo.
#[derive(Clone)]
struct Vocabulary {
    kind: TokenizerKind,
    memo_slot: usize,
}

impl Vocabulary {
    /// The process-wide table: set up by the first count that needs it (its split regex is
    /// compiled then, about 1.4 MiB; the table itself is embedded data, paged in as counting
    /// touches it), so a model that is never asked for costs no memory. `None` only if the
    /// embedded table is inconsistent or the regex does not compile (an internal error, logged
    /// once); counts then fall back to the `chunks` estimate.
    fn core(&self) -> Option<&'static BpeTable> {
        table(self.kind).and_then(|t| t.as_ref().ok())
    }
}

/// `kind`'s process-wide table, built on the first call (`None` for `chunks`).
fn table(kind: TokenizerKind) -> Option<&'static Result<BpeTable, String>> {
    match kind {
        TokenizerKind::Chunks => None,
        TokenizerKind::O200kBase => Some(shared_bpe(&O200K_BASE, Vocab::O200kBase)),
        TokenizerKind::Cl100kBase => Some(shared_bpe(&CL100K_BASE, Vocab::Cl100kBase)),
    }
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.kind)
            .finish()
    }
}

type SharedBpe = OnceLock<Result<BpeTable, String>>;

static O200K_BASE: SharedBpe = OnceLock::new();
static CL100K_BASE: SharedBpe = OnceLock::new();

/// The process-wide table in `cell`, built for `vocabulary` on first use.
fn shared_bpe(cell: &'static SharedBpe, vocabulary: Vocab) -> &'static Result<BpeTable, String> {
    cell.get_or_init(|| {
        let table = BpeTable::build(vocabulary);
        if let Err(e) = &table {
            tracing::error!(error = %e, "cannot build a BPE tokenizer table; counting by chunks");
        }
        table
    })
}

impl Tokenizer {
    /// A tokenizer of the given kind. A BPE kind's table is built by the first count that
    /// needs it and shared by every tokenizer of that kind (see [`Vocabulary::core`]).
    pub fn new(kind: TokenizerKind) -> Result<Tokenizer, TokenizerError> {
        let memo_slot = match kind {
            TokenizerKind::Chunks => return Ok(Tokenizer { kind, bpe: None }),
            TokenizerKind::O200kBase => 0,
            TokenizerKind::Cl100kBase => 1,
        };
        Ok(Tokenizer {
            kind,
            bpe: Some(Vocabulary { kind, memo_slot }),
        })
    }

    /// Builds this tokenizer's table now rather than at the first count; the error says why it
    /// cannot be built.
    pub fn load(&self) -> Result<(), TokenizerError> {
        match table(self.kind) {
            Some(Err(message)) => Err(TokenizerError::Load {
                kind: self.kind,
                message: message.clone(),
            }),
            _ => Ok(()),
        }
    }

    pub fn kind(&self) -> TokenizerKind {
        self.kind
    }

    /// Tokens in one text: BPE `encode_ordinary` length, or ceil(bytes / 4) for `chunks` (0 for
    /// the empty string).
    pub fn count_text(&self, text: &str) -> u64 {
        match &self.bpe {
            None => chunks_of(text.len()),
            Some(bpe) => bpe_count(bpe, text),
        }
    }

    /// Input estimate for a chat request's `messages`. `chunks`: ceil(bytes of all text / 4), at
    /// least 1. BPE: tokens of each text + 3 per message + 3. The text of a message is its string
    /// `content` or the `text` of each part of an array `content`, its `name`, and the
    /// `function.arguments` of its tool calls.
    pub fn chat_input_tokens(&self, messages: &Value) -> u64 {
        let messages = messages.as_array().map(Vec::as_slice).unwrap_or_default();
        match &self.bpe {
            None => {
                let mut bytes = 0usize;
                for message in messages {
                    for_each_message_text(message, |text| bytes += text.len());
                }
                chunks_of(bytes).max(1)
            }
            Some(bpe) => {
                let mut tokens = 3u64;
                for message in messages {
                    tokens += 3;
                    for_each_message_text(message, |text| tokens += bpe_count(bpe, text));
                }
                tokens
            }
        }
    }

    /// Input estimate for a Responses or Messages request, from its prompt (`instructions` /
    /// `system`) and its conversation (`input` / `messages`): every text in them, that is a
    /// string where the conversation or prompt is a string, and the `text`, `content`, `input`,
    /// `output`, `arguments` and `thinking` strings of its items and their parts. `chunks`:
    /// ceil(bytes / 4), at least 1. BPE: tokens of each text + 3 per item + 3.
    pub fn agent_input_tokens(&self, prompt: Option<&Value>, conversation: Option<&Value>) -> u64 {
        let mut items = 0u64;
        let mut bytes = 0usize;
        let mut tokens = 0u64;
        let mut add = |text: &str| match &self.bpe {
            None => bytes += text.len(),
            Some(bpe) => tokens = tokens.saturating_add(bpe_count(bpe, text)),
        };
        for value in [prompt, conversation].into_iter().flatten() {
            match value {
                Value::String(text) => add(text),
                Value::Array(list) => {
                    for item in list {
                        items += 1;
                        for_each_item_text(item, &mut add);
                    }
                }
                _ => {}
            }
        }
        match &self.bpe {
            None => chunks_of(bytes).max(1),
            Some(_) => tokens
                .saturating_add(items.saturating_mul(3))
                .saturating_add(3),
        }
    }

    /// Input tokens of an embeddings request's `input`: a string, an array of strings, an array
    /// of token ids (one token each), or an array of such arrays. Strings are counted one by one
    /// with [`count_text`](Self::count_text). At least 1.
    pub fn embeddings_input_tokens(&self, input: &Value) -> u64 {
        self.embeddings_value_tokens(input).max(1)
    }

    fn embeddings_value_tokens(&self, value: &Value) -> u64 {
        match value {
            Value::String(text) => self.count_text(text),
            Value::Number(_) => 1,
            Value::Array(items) => items
                .iter()
                .map(|item| self.embeddings_value_tokens(item))
                .sum(),
            _ => 0,
        }
    }

    /// Output tokens in one stream chunk, summed over its choices. `chunks`: one per choice delta
    /// with output (role-only and finish-only deltas count 0). BPE: the tokens of its texts, at
    /// least one for a delta with output that is not text.
    pub fn chunk_output_tokens(&self, chunk: &ChunkView<'_>) -> u64 {
        match &self.bpe {
            None => chunk.choices().filter(|c| c.has_output()).count() as u64,
            // A delta whose output is not text (e.g. `audio`) counts one token.
            Some(bpe) => chunk
                .choices()
                .map(|c| {
                    let tokens: u64 = c.texts().map(|text| bpe_count(bpe, text)).sum();
                    tokens.max(u64::from(c.other))
                })
                .fold(0u64, u64::saturating_add),
        }
    }

    /// Output tokens of one streamed delta text of the Responses or Messages format: `chunks`
    /// counts one per delta that carries text, BPE the tokens of the text.
    pub fn delta_tokens(&self, text: &str) -> u64 {
        match &self.bpe {
            None => u64::from(!text.is_empty()),
            Some(bpe) => bpe_count(bpe, text),
        }
    }

    /// Output tokens of a non-stream response whose upstream reported no usage. BPE: tokens of
    /// each text. `chunks`: ceil(total bytes / 4), so at least 1 when any text is non-empty.
    pub fn completion_output_tokens(&self, texts: &[&str]) -> u64 {
        match &self.bpe {
            None => chunks_of(texts.iter().map(|t| t.len()).sum()),
            Some(bpe) => texts.iter().map(|text| bpe_count(bpe, text)).sum(),
        }
    }
}

/// ceil(bytes / 4).
fn chunks_of(bytes: usize) -> u64 {
    bytes.div_ceil(4) as u64
}

/// Calls `f` with each text of one chat message (see [`Tokenizer::chat_input_tokens`]).
fn for_each_message_text<'a>(message: &'a Value, mut f: impl FnMut(&'a str)) {
    match message.get("content") {
        Some(Value::String(text)) => f(text),
        Some(Value::Array(parts)) => {
            for part in parts {
                if let Some(text) = part.get("text").and_then(Value::as_str) {
                    f(text);
                }
            }
        }
        _ => {}
    }
    if let Some(name) = message.get("name").and_then(Value::as_str) {
        f(name);
    }
    if let Some(calls) = message.get("tool_calls").and_then(Value::as_array) {
        for call in calls {
            if let Some(args) = call.pointer("/function/arguments").and_then(Value::as_str) {
                f(args);
            }
        }
    }
}

/// Calls `f` with each text of one Responses or Messages item (see
/// [`Tokenizer::agent_input_tokens`]): a string item itself, else the strings under the text
/// keys of the item and of the parts nested in it.
fn for_each_item_text(item: &Value, f: &mut impl FnMut(&str)) {
    const TEXT_KEYS: [&str; 6] = [
        "text",
        "content",
        "input",
        "output",
        "arguments",
        "thinking",
    ];
    match item {
        Value::String(text) => f(text),
        Value::Array(parts) => parts.iter().for_each(|p| for_each_item_text(p, f)),
        Value::Object(fields) => {
            for (key, value) in fields {
                if TEXT_KEYS.contains(&key.as_str()) {
                    for_each_item_text(value, f);
                }
            }
        }
        _ => {}
    }
}

/// Texts up to this length have their count memoised per thread.
const MEMO_MAX_TEXT_BYTES: usize = 32;
/// Entries per thread and vocabulary before the memo starts over.
const MEMO_CAPACITY: usize = 4096;

type Memo = std::collections::HashMap<Box<str>, u32>;

thread_local! {
    /// Streamed deltas are mostly one common token (" the", ","), and BPE encoding is ~20 times
    /// dearer than a lookup, so short texts' counts are memoised. One memo per vocabulary.
    static MEMO: std::cell::RefCell<[Memo; 2]> = std::cell::RefCell::new([Memo::new(), Memo::new()]);
}

/// BPE token count of `text`, cutting runs longer than [`MAX_RUN_BYTES`] (see the module doc).
fn bpe_count(bpe: &Vocabulary, text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    if text.len() <= MEMO_MAX_TEXT_BYTES {
        return memoised_count(bpe, text);
    }
    let Some(bpe) = bpe.core() else {
        return chunks_of(text.len());
    };
    if text.len() <= MAX_RUN_BYTES {
        return encode_len(bpe, text);
    }
    let mut tokens = 0;
    let mut segment_start = 0;
    let mut run_start = 0;
    let mut run_is_space = None;
    for (i, c) in text.char_indices() {
        let is_space = c.is_whitespace();
        if run_is_space != Some(is_space) {
            run_is_space = Some(is_space);
            run_start = i;
        } else if i - run_start >= MAX_RUN_BYTES {
            tokens += encode_len(bpe, &text[segment_start..i]);
            segment_start = i;
            run_start = i;
        }
    }
    tokens + encode_len(bpe, &text[segment_start..])
}

fn memoised_count(vocabulary: &Vocabulary, text: &str) -> u64 {
    let slot = vocabulary.memo_slot;
    let cached = MEMO.with(|memo| memo.borrow()[slot].get(text).copied());
    if let Some(count) = cached {
        return u64::from(count);
    }
    let Some(core) = vocabulary.core() else {
        return chunks_of(text.len());
    };
    let count = encode_len(core, text);
    MEMO.with(|memo| {
        let memo = &mut memo.borrow_mut()[slot];
        if memo.len() >= MEMO_CAPACITY {
            memo.clear();
        }
        memo.insert(text.into(), u32::try_from(count).unwrap_or(u32::MAX));
    });
    count
}

fn encode_len(bpe: &BpeTable, text: &str) -> u64 {
    // Should the split regex give up on a text (its backtracking limit), count that text with
    // the `chunks` estimate rather than fail the request.
    bpe.count(text).unwrap_or_else(|| chunks_of(text.len()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::metering::chunk::parse_chunk;
    use serde_json::json;

    fn chunks() -> Tokenizer {
        Tokenizer::new(TokenizerKind::Chunks).unwrap()
    }

    fn o200k() -> Tokenizer {
        Tokenizer::new(TokenizerKind::O200kBase).unwrap()
    }

    fn cl100k() -> Tokenizer {
        Tokenizer::new(TokenizerKind::Cl100kBase).unwrap()
    }

    fn ordinary(kind: TokenizerKind, text: &str) -> u64 {
        // tiktoken-rs's own singletons: independent of the tables under test.
        let bpe = match kind {
            TokenizerKind::O200kBase => tiktoken_rs::o200k_base_singleton(),
            TokenizerKind::Cl100kBase => tiktoken_rs::cl100k_base_singleton(),
            TokenizerKind::Chunks => unreachable!(),
        };
        let bpe = bpe.lock();
        bpe.encode_ordinary(text).len() as u64
    }

    #[test]
    fn bpe_tables_load_on_demand_and_count_the_same() {
        let t = o200k();
        t.load().unwrap();
        assert_eq!(
            t.count_text("Say something about load testing."),
            ordinary(
                TokenizerKind::O200kBase,
                "Say something about load testing."
            )
        );
        chunks().load().unwrap();
    }

    #[test]
    fn kind_names_match_config() {
        for (kind, name) in [
            (TokenizerKind::O200kBase, "\"o200k_base\""),
            (TokenizerKind::Cl100kBase, "\"cl100k_base\""),
            (TokenizerKind::Chunks, "\"chunks\""),
        ] {
            assert_eq!(serde_json::to_string(&kind).unwrap(), name);
            assert_eq!(serde_json::from_str::<TokenizerKind>(name).unwrap(), kind);
            assert_eq!(format!("\"{kind}\""), name);
        }
        assert_eq!(o200k().kind(), TokenizerKind::O200kBase);
    }

    #[test]
    fn chunks_count_text() {
        let t = chunks();
        assert_eq!(t.count_text(""), 0);
        assert_eq!(t.count_text("a"), 1);
        assert_eq!(t.count_text("abcd"), 1);
        assert_eq!(t.count_text("abcde"), 2);
        assert_eq!(t.count_text("héllo"), 2); // 6 bytes
        assert_eq!(t.count_text("🌍"), 1); // 4 bytes
    }

    #[test]
    fn tiktoken_known_counts() {
        assert_eq!(o200k().count_text("hello world"), 2);
        assert_eq!(cl100k().count_text("hello world"), 2);
        assert_eq!(o200k().count_text(""), 0);
        for text in [
            "The quick brown fox jumps over the lazy dog.",
            "Ünïcödé 🌍 text, with   spaces\n\nand newlines\tand <|endoftext|> too",
            "fn main() { println!(\"{}\", 1 + 2); }",
        ] {
            assert_eq!(
                o200k().count_text(text),
                ordinary(TokenizerKind::O200kBase, text)
            );
            assert_eq!(
                cl100k().count_text(text),
                ordinary(TokenizerKind::Cl100kBase, text)
            );
        }
    }

    #[test]
    fn long_ordinary_text_is_counted_exactly() {
        let text = "Metering counts tokens as they stream. ".repeat(200);
        assert!(text.len() > MAX_RUN_BYTES);
        assert_eq!(
            o200k().count_text(&text),
            ordinary(TokenizerKind::O200kBase, &text)
        );
    }

    #[test]
    fn pathological_runs_are_fast_and_close() {
        let t = o200k();
        let start = std::time::Instant::now();
        let letters = "a".repeat(200_000);
        let spaces = " ".repeat(200_000);
        let n_letters = t.count_text(&letters);
        let n_spaces = t.count_text(&spaces);
        assert!(start.elapsed() < std::time::Duration::from_secs(20));
        assert!(n_letters > 0 && n_letters <= 200_000 / 2);
        assert!(n_spaces > 0 && n_spaces <= 200_000 / 2);
    }

    fn messages() -> Value {
        json!([
            {"role": "system", "content": "Be brief."},                       // 9 bytes
            {"role": "user", "name": "ann", "content": [                      // 3 bytes
                {"type": "text", "text": "Hello there"},                      // 11 bytes
                {"type": "image_url", "image_url": {"url": "data:xyz"}}
            ]},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "lookup", "arguments": "{\"q\":\"x\"}"}} // 9 bytes
            ]},
            {"role": "tool", "tool_call_id": "c1", "content": "42"}           // 2 bytes
        ])
    }

    #[test]
    fn chat_input_chunks() {
        // 9 + 3 + 11 + 9 + 2 = 34 bytes -> ceil(34 / 4) = 9.
        assert_eq!(chunks().chat_input_tokens(&messages()), 9);
        assert_eq!(chunks().chat_input_tokens(&json!([])), 1);
        assert_eq!(
            chunks().chat_input_tokens(&json!([{"role": "user", "content": ""}])),
            1
        );
        assert_eq!(chunks().chat_input_tokens(&json!("not an array")), 1);
    }

    #[test]
    fn chat_input_tiktoken() {
        for kind in [TokenizerKind::O200kBase, TokenizerKind::Cl100kBase] {
            let t = Tokenizer::new(kind).unwrap();
            let texts = ["Be brief.", "Hello there", "ann", "{\"q\":\"x\"}", "42"];
            let text_tokens: u64 = texts.iter().map(|s| ordinary(kind, s)).sum();
            assert_eq!(
                t.chat_input_tokens(&messages()),
                text_tokens + 3 * 4 + 3,
                "{kind}"
            );
            // "hello world" is 2 tokens: 2 + 3 + 3.
            assert_eq!(
                t.chat_input_tokens(&json!([{"role": "user", "content": "hello world"}])),
                8
            );
            assert_eq!(t.chat_input_tokens(&json!([])), 3);
        }
    }

    #[test]
    fn embeddings_input() {
        let c = chunks();
        assert_eq!(c.embeddings_input_tokens(&json!("abcdefghi")), 3);
        assert_eq!(c.embeddings_input_tokens(&json!(["abcde", "ab"])), 3); // 2 + 1
        assert_eq!(c.embeddings_input_tokens(&json!([1, 2, 3, 4, 5])), 5);
        assert_eq!(c.embeddings_input_tokens(&json!([[1, 2], [3, 4, 5]])), 5);
        assert_eq!(c.embeddings_input_tokens(&json!("")), 1);
        assert_eq!(c.embeddings_input_tokens(&json!([])), 1);
        let o = o200k();
        assert_eq!(o.embeddings_input_tokens(&json!("hello world")), 2);
        assert_eq!(
            o.embeddings_input_tokens(&json!(["hello world", "hello world"])),
            4
        );
        assert_eq!(o.embeddings_input_tokens(&json!([[1, 2], [3]])), 3);
    }

    #[test]
    fn chunk_output_counts() {
        let content = parse_chunk(
            r#"{"choices":[{"index":0,"delta":{"content":"hello world"}},{"index":1,"delta":{"content":" hi"}}]}"#,
        )
        .unwrap();
        let role_only =
            parse_chunk(r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#)
                .unwrap();
        let finish_only =
            parse_chunk(r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#).unwrap();
        let mixed = parse_chunk(
            r#"{"choices":[{"index":0,"delta":{"reasoning_content":"hello world","tool_calls":[{"function":{"arguments":"hello world"}}]}},{"index":1,"delta":{"refusal":"hello world"}}]}"#,
        )
        .unwrap();
        let usage =
            parse_chunk(r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}"#)
                .unwrap();

        let c = chunks();
        assert_eq!(c.chunk_output_tokens(&content), 2);
        assert_eq!(c.chunk_output_tokens(&role_only), 0);
        assert_eq!(c.chunk_output_tokens(&finish_only), 0);
        assert_eq!(c.chunk_output_tokens(&mixed), 2); // one per choice delta
        assert_eq!(c.chunk_output_tokens(&usage), 0);

        for t in [o200k(), cl100k()] {
            let hi = ordinary(t.kind(), " hi");
            assert_eq!(t.chunk_output_tokens(&content), 2 + hi);
            assert_eq!(t.chunk_output_tokens(&role_only), 0);
            assert_eq!(t.chunk_output_tokens(&finish_only), 0);
            assert_eq!(t.chunk_output_tokens(&mixed), 6);
        }
    }

    #[test]
    fn completion_output_counts() {
        let c = chunks();
        assert_eq!(c.completion_output_tokens(&[]), 0);
        assert_eq!(c.completion_output_tokens(&[""]), 0);
        assert_eq!(c.completion_output_tokens(&["a"]), 1);
        assert_eq!(c.completion_output_tokens(&["abc", "de"]), 2); // 5 bytes
        assert_eq!(c.completion_output_tokens(&["abcd", "abcd"]), 2);
        let o = o200k();
        assert_eq!(
            o.completion_output_tokens(&["hello world", "hello world"]),
            4
        );
        assert_eq!(o.completion_output_tokens(&[]), 0);
    }

    #[test]
    fn memo_keeps_vocabularies_apart() {
        // Texts whose counts differ between the vocabularies, counted repeatedly in turn.
        let texts = [
            "こんにちは世界",
            " Привет",
            "\u{1F600}\u{1F600}",
            "ababababab",
        ];
        let differs = texts.iter().any(|t| {
            ordinary(TokenizerKind::O200kBase, t) != ordinary(TokenizerKind::Cl100kBase, t)
        });
        assert!(differs);
        for _ in 0..3 {
            for text in texts {
                for t in [o200k(), cl100k()] {
                    assert_eq!(t.count_text(text), ordinary(t.kind(), text), "{text}");
                }
            }
        }
    }

    /// Texts of every kind a prompt or a reply holds, plus seeded random ones.
    fn corpus() -> Vec<String> {
        use rand::{Rng, SeedableRng};
        let mut texts: Vec<String> = [
            "The quick brown fox jumps over the lazy dog.",
            "I'm sure you'RE right; they'll say we'd've known. DON'T SHOUT",
            "こんにちは世界、今日はいい天気ですね。中文文本测试，标点符号！",
            "한국어 텍스트와 Ελληνικά και русский текст, العربية, हिन्दी देवनागरी",
            "Emoji: 👩‍👩‍👧‍👦 🏳️‍🌈 👍🏽 🇫🇷🇩🇪 ❤️‍🔥 🤖🚀✨",
            "e\u{301}te\u{301} cafe\u{301} n\u{303}",
            "fn main() {\n    let x: Vec<u8> = vec![1, 2, 3];\n    println!(\"{x:?}\");\n}\n",
            "def f(a, b):\r\n\treturn a ** b  # comment\r\n",
            "<div class=\"x\">&amp; <br/></div> https://example.com/a/b?c=d&e=f#g",
            "   leading and trailing   ",
            "tabs\t\tand\n\n\nnewlines\r\n\r\n  \n \t \u{a0}\u{3000}x",
            "\n",
            " ",
            "          ",
            "1234567890 3.14159 1,000,000 -42 0x1F 1e-9 ٣٤٥ ²³",
            "pneumonoultramicroscopicsilicovolcanoconiosis Donaudampfschifffahrtsgesellschaft",
            "<|endoftext|> <|fim_prefix|> special-token text counts as plain text",
            "CamelCaseIdentifiers and snake_case_names and SCREAMING_CASE and mIxEd",
            "!!!???... --- === *** /// \\\\ ||| ~~~ ```rust``` $$$ %%%",
            "\u{0}\u{1}\u{7f} control \u{feff} bom \u{200b} zero width",
        ]
        .iter()
        .map(|t| t.to_string())
        .collect();
        // Runs of one kind, around and beyond MAX_RUN_BYTES.
        for n in [255, 256, 257, 600] {
            texts.push("a".repeat(n));
            texts.push(" ".repeat(n) + "x");
            texts.push("ab1 ".repeat(n / 4));
            texts.push("語".repeat(n / 3));
        }
        let palette: [&[char]; 6] = [
            &[
                'a', 'Z', 'e', 's', 't', '\'', '.', ',', '-', '_', '/', '(', '{',
            ],
            &[' ', ' ', '\n', '\r', '\t', '\u{a0}', '\u{3000}'],
            &['0', '1', '7', '9', '٣', '²'],
            &['é', 'ß', 'Ä', 'ñ', 'ø', 'Ω', 'ж', 'Я'],
            &['中', '文', 'あ', 'カ', '한', '\u{301}', '\u{94d}'],
            &['😀', '👍', '\u{1f3fd}', '\u{200d}', '🚀', '\u{fe0f}'],
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(18);
        for _ in 0..400 {
            let len = rng.gen_range(0..120);
            let text: String = (0..len)
                .map(|_| match rng.gen_range(0..8) {
                    // Any scalar value at all: the split regex must agree on every class.
                    0 => rng.gen::<char>(),
                    k => {
                        let class = palette[(k - 1) % palette.len()];
                        class[rng.gen_range(0..class.len())]
                    }
                })
                .collect();
            texts.push(text);
        }
        texts
    }

    #[test]
    fn compact_table_counts_as_tiktoken_does() {
        for kind in [TokenizerKind::O200kBase, TokenizerKind::Cl100kBase] {
            let t = Tokenizer::new(kind).unwrap();
            let table = t.bpe.as_ref().unwrap().core().unwrap();
            for text in corpus() {
                assert_eq!(
                    table.count(&text),
                    Some(ordinary(kind, &text)),
                    "{kind}: {text:?}"
                );
                if text.len() <= MAX_RUN_BYTES {
                    assert_eq!(
                        t.count_text(&text),
                        ordinary(kind, &text),
                        "{kind}: {text:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn long_runs_are_counted_in_max_run_pieces() {
        // 600 letters: pieces of 256, 256 and 88 bytes, each counted on its own.
        for t in [o200k(), cl100k()] {
            let kind = t.kind();
            let expected = 2 * ordinary(kind, &"a".repeat(256)) + ordinary(kind, &"a".repeat(88));
            assert_eq!(t.count_text(&"a".repeat(600)), expected, "{kind}");
            // A run that is cut starts a new piece mid-text; what precedes it stays whole.
            let text = format!("Hello, world.{}", " ".repeat(300));
            let expected = ordinary(kind, &format!("Hello, world.{}", " ".repeat(256)))
                + ordinary(kind, &" ".repeat(44));
            assert_eq!(t.count_text(&text), expected, "{kind}");
        }
    }

    #[test]
    fn compact_table_is_small() {
        let table = o200k().bpe.unwrap().core().unwrap();
        let mib = table.table_bytes() as f64 / (1024.0 * 1024.0);
        assert!(mib < 6.0, "o200k_base table holds {mib:.1} MiB");
    }

    #[test]
    fn clones_share_the_table() {
        let a = o200k();
        let b = o200k();
        assert!(std::ptr::eq(
            a.bpe.as_ref().unwrap().core().unwrap(),
            b.bpe.as_ref().unwrap().core().unwrap()
        ));
    }
}
