//! Incremental Server-Sent Events parser: the first step of metering an upstream stream.
//!
//! The upstream body arrives as arbitrary network chunks. [`SseParser`] finds event boundaries,
//! decodes each event's `data` (and `event`) field, and hands back the event's exact bytes in
//! [`SseEvent::raw`] so the metered stream can forward events it does not rewrite byte for byte,
//! without re-serialising them. When a chunk holds whole events, `raw` is a zero-copy slice of
//! that chunk.
//!
//! Parsing follows the WHATWG event-stream rules: lines end in `\r\n`, `\n` or `\r`; a line
//! starting with `:` is a comment; `field: value` drops one optional space after the colon; a
//! line without a colon is a field with an empty value; several `data` lines are joined with
//! `\n`; a blank line ends the event. Every byte is scanned once, however the stream is split.
//!
//! Differences from a browser's `EventSource`, chosen for a gateway:
//! - comment-only blocks (`: keep-alive\n\n`) are returned as events with `data: None`, so they
//!   can be forwarded; blank lines that precede any field or comment are kept in the `raw` of the
//!   event that follows;
//! - `id` and `retry` are recognised but only carried in `raw`;
//! - invalid UTF-8 in a `data` or `event` value is an error for that event
//!   ([`SseError::InvalidUtf8`]), and an event larger than the configured limit is an error
//!   ([`SseError::EventTooLarge`]) instead of unbounded buffering. After either error the parser
//!   skips to the next event and can go on.
//!
//! A `\r` at the very end of the received bytes is held until the next byte shows whether it is
//! a `\r\n` (or until [`SseParser::finish`]), so a `\r\n` split across chunks parses exactly as
//! if it were not split. The cost falls only on streams that end lines with a bare `\r`: their
//! events are returned when the following chunk arrives.

use bytes::{Buf, Bytes, BytesMut};

/// Default limit on one event's size in bytes (1 MiB).
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1 << 20;

/// Why an event could not be parsed. Both errors concern one event; the parser skips it and
/// the next call goes on with the following event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    /// The event is larger than the parser's limit; its bytes were discarded.
    #[error("upstream event stream sent an event larger than {limit} bytes")]
    EventTooLarge { limit: usize },
    /// A `data` or `event` value is not valid UTF-8.
    #[error("upstream event stream sent an event that is not valid UTF-8")]
    InvalidUtf8,
}

/// One complete event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The exact bytes of this event, from its first line (comments and blank lines that precede
    /// it included) through the blank line that ended it: forward these verbatim.
    pub raw: Bytes,
    /// The `data` lines joined with `\n`; `None` when the event has no `data` field (a comment
    /// or keep-alive block).
    pub data: Option<String>,
    /// The last `event` field, if any.
    pub event: Option<String>,
}

impl SseEvent {
    /// True for the OpenAI end-of-stream sentinel `data: [DONE]`.
    pub fn is_done(&self) -> bool {
        self.data.as_deref().map(str::trim) == Some("[DONE]")
    }
}

/// Bytes received but not yet returned as events. A single network chunk is kept as it came
/// (so events are zero-copy slices of it); bytes are copied into an owned buffer only when an
/// event spans chunks.
#[derive(Debug, Default)]
enum Buffer {
    #[default]
    Empty,
    Shared(Bytes),
    Owned(BytesMut),
}

impl Buffer {
    fn as_slice(&self) -> &[u8] {
        match self {
            Buffer::Empty => &[],
            Buffer::Shared(b) => b,
            Buffer::Owned(b) => b,
        }
    }

    fn len(&self) -> usize {
        self.as_slice().len()
    }

    fn push(&mut self, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        match self {
            Buffer::Empty => *self = Buffer::Shared(chunk),
            Buffer::Shared(head) => {
                let mut owned = BytesMut::with_capacity(head.len() + chunk.len());
                owned.extend_from_slice(head);
                owned.extend_from_slice(&chunk);
                *self = Buffer::Owned(owned);
            }
            Buffer::Owned(owned) => owned.extend_from_slice(&chunk),
        }
    }

    /// Removes and returns the first `n` bytes (`n <= len`).
    fn take_front(&mut self, n: usize) -> Bytes {
        let taken = match self {
            Buffer::Empty => Bytes::new(),
            Buffer::Shared(b) if n >= b.len() => std::mem::take(b),
            Buffer::Shared(b) => b.split_to(n),
            Buffer::Owned(b) if n >= b.len() => b.split().freeze(),
            Buffer::Owned(b) => b.split_to(n).freeze(),
        };
        if self.len() == 0 {
            // An empty buffer takes the next chunk as it is, without copying.
            *self = Buffer::Empty;
        }
        taken
    }

    /// Drops the first `n` bytes (`n <= len`).
    fn drop_front(&mut self, n: usize) {
        match self {
            Buffer::Empty => {}
            Buffer::Shared(b) => b.advance(n.min(b.len())),
            Buffer::Owned(b) => b.advance(n.min(b.len())),
        }
        if self.len() == 0 {
            *self = Buffer::Empty;
        }
    }
}

/// The fields of the event being read.
#[derive(Debug, Default)]
struct EventFields {
    data: Option<String>,
    event: Option<String>,
    /// A field or comment line has been read: a blank line now ends an event.
    started: bool,
    invalid_utf8: bool,
}

impl EventFields {
    /// Applies one complete, non-blank line (without its line ending).
    fn apply_line(&mut self, line: &[u8]) {
        self.started = true;
        if line.first() == Some(&b':') {
            return; // comment
        }
        let (name, value) = match memchr::memchr(b':', line) {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &[][..]),
        };
        match name {
            b"data" => match std::str::from_utf8(value) {
                Ok(text) => match &mut self.data {
                    Some(data) => {
                        data.push('\n');
                        data.push_str(text);
                    }
                    None => self.data = Some(text.to_owned()),
                },
                Err(_) => self.invalid_utf8 = true,
            },
            b"event" => match std::str::from_utf8(value) {
                Ok(text) => self.event = Some(text.to_owned()),
                Err(_) => self.invalid_utf8 = true,
            },
            // `id` and `retry` travel in `raw`; unknown fields are ignored, as the spec says.
            _ => {}
        }
    }
}

/// Incremental SSE parser. Feed it network chunks with [`push`](Self::push), then call
/// [`next_event`](Self::next_event) until it returns `Ok(None)`; at end of stream call
/// [`finish`](Self::finish) until it returns `Ok(None)`.
#[derive(Debug)]
pub struct SseParser {
    /// Unreturned bytes; offset 0 is the start of the event being read.
    buf: Buffer,
    /// Offset of the first byte of the line being read.
    line_start: usize,
    /// Offset where the search for the next line ending resumes; `[line_start, scan_pos)` holds
    /// no line ending.
    scan_pos: usize,
    fields: EventFields,
    /// Skipping the rest of an event that was too large (its bytes are dropped as they come).
    discarding: bool,
    /// While discarding: bytes of the current line were already dropped, so it is not blank.
    discarded_partial_line: bool,
    max_event_bytes: usize,
}

impl Default for SseParser {
    fn default() -> Self {
        Self::new()
    }
}

impl SseParser {
    /// A parser with the default event size limit of 1 MiB.
    pub fn new() -> Self {
        Self::with_max_event_bytes(DEFAULT_MAX_EVENT_BYTES)
    }

    /// A parser that refuses events larger than `n` bytes (their `raw` length).
    pub fn with_max_event_bytes(n: usize) -> Self {
        SseParser {
            buf: Buffer::Empty,
            line_start: 0,
            scan_pos: 0,
            fields: EventFields::default(),
            discarding: false,
            discarded_partial_line: false,
            max_event_bytes: n,
        }
    }

    /// The event size limit in bytes.
    pub fn max_event_bytes(&self) -> usize {
        self.max_event_bytes
    }

    /// Appends a network chunk. Cheap: the chunk is kept as it is unless an unfinished event
    /// from an earlier chunk has to be joined with it.
    pub fn push(&mut self, bytes: Bytes) {
        self.buf.push(bytes);
    }

    /// Bytes received and not yet returned as (or discarded with) an event.
    pub fn buffered_bytes(&self) -> usize {
        self.buf.len()
    }

    /// The next complete event, if the received bytes hold one. An error concerns one event,
    /// which is skipped: calling again goes on with the next one.
    pub fn next_event(&mut self) -> Result<Option<SseEvent>, SseError> {
        loop {
            let bytes = self.buf.as_slice();
            let Some(found) = memchr::memchr2(b'\n', b'\r', &bytes[self.scan_pos..]) else {
                self.scan_pos = bytes.len();
                return self.incomplete();
            };
            let end = self.scan_pos + found;
            let ending = if bytes[end] == b'\r' {
                match bytes.get(end + 1) {
                    Some(b'\n') => 2,
                    Some(_) => 1,
                    None => {
                        // Hold the `\r` until the next byte tells whether a `\n` follows.
                        self.scan_pos = end;
                        return self.incomplete();
                    }
                }
            } else {
                1
            };
            let next = end + ending;
            let blank = end == self.line_start && !self.discarded_partial_line;
            self.discarded_partial_line = false;

            if self.discarding {
                self.buf.drop_front(next);
                self.line_start = 0;
                self.scan_pos = 0;
                if blank {
                    self.discarding = false;
                }
                continue;
            }
            if !blank {
                self.fields.apply_line(&bytes[self.line_start..end]);
                self.line_start = next;
                self.scan_pos = next;
                continue;
            }
            self.line_start = next;
            self.scan_pos = next;
            if self.fields.started {
                return self.dispatch(next);
            }
            // A blank line before any field: kept in the raw bytes of the event that follows.
        }
    }

    /// At end of stream: the next complete event if any is left, else the trailing bytes as a
    /// last event (its unterminated last line included), else `None`. Call until `Ok(None)`.
    /// Afterwards the parser is empty and may be reused.
    pub fn finish(&mut self) -> Result<Option<SseEvent>, SseError> {
        if let Some(event) = self.next_event()? {
            return Ok(Some(event));
        }
        let len = self.buf.len();
        if self.discarding {
            self.buf.drop_front(len);
            self.reset_after_event();
            return Ok(None);
        }
        if len == 0 {
            return Ok(None);
        }
        // What is left after the last line ending: an unterminated line, possibly ending in the
        // held `\r` that now terminates it.
        let tail = &self.buf.as_slice()[self.line_start..len];
        let line = tail.strip_suffix(b"\r").unwrap_or(tail);
        if !line.is_empty() {
            self.fields.apply_line(line);
        }
        self.dispatch(len)
    }

    /// Returns the event that ends at offset `end` (exclusive) and resets for the next one.
    fn dispatch(&mut self, end: usize) -> Result<Option<SseEvent>, SseError> {
        let raw = self.buf.take_front(end);
        let fields = std::mem::take(&mut self.fields);
        self.line_start = 0;
        self.scan_pos = 0;
        if raw.len() > self.max_event_bytes {
            return Err(SseError::EventTooLarge {
                limit: self.max_event_bytes,
            });
        }
        if fields.invalid_utf8 {
            return Err(SseError::InvalidUtf8);
        }
        Ok(Some(SseEvent {
            raw,
            data: fields.data,
            event: fields.event,
        }))
    }

    /// No complete line ending after `scan_pos`: enforce the size limit on what is held.
    fn incomplete(&mut self) -> Result<Option<SseEvent>, SseError> {
        if self.discarding {
            self.drop_scanned();
            return Ok(None);
        }
        if self.buf.len() <= self.max_event_bytes {
            return Ok(None);
        }
        // The event being read is already too large: drop it and skip the rest of it.
        self.fields = EventFields::default();
        self.discarding = true;
        self.drop_scanned();
        Err(SseError::EventTooLarge {
            limit: self.max_event_bytes,
        })
    }

    /// While discarding: drops the bytes scanned so far (not a held `\r`), remembering whether
    /// the current line had bytes, so that it is not taken for a blank line later.
    fn drop_scanned(&mut self) {
        if self.scan_pos > self.line_start {
            self.discarded_partial_line = true;
        }
        self.buf.drop_front(self.scan_pos);
        self.line_start = 0;
        self.scan_pos = 0;
    }

    fn reset_after_event(&mut self) {
        self.fields = EventFields::default();
        self.line_start = 0;
        self.scan_pos = 0;
        self.discarding = false;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Parses `input` pushed as the given pieces, draining after each push and at the end.
    fn parse_pieces(pieces: &[&[u8]], max: usize) -> Vec<Result<SseEvent, SseError>> {
        let mut parser = SseParser::with_max_event_bytes(max);
        let mut out = Vec::new();
        let drain = |parser: &mut SseParser, out: &mut Vec<_>, at_end: bool| loop {
            let next = if at_end {
                parser.finish()
            } else {
                parser.next_event()
            };
            match next {
                Ok(Some(ev)) => out.push(Ok(ev)),
                Ok(None) => break,
                Err(e) => out.push(Err(e)),
            }
        };
        for piece in pieces {
            parser.push(Bytes::copy_from_slice(piece));
            drain(&mut parser, &mut out, false);
        }
        drain(&mut parser, &mut out, true);
        assert_eq!(parser.buffered_bytes(), 0);
        out
    }

    fn events(input: &[u8]) -> Vec<SseEvent> {
        parse_pieces(&[input], DEFAULT_MAX_EVENT_BYTES)
            .into_iter()
            .map(|r| r.unwrap())
            .collect()
    }

    fn bytewise(input: &[u8]) -> Vec<SseEvent> {
        let pieces: Vec<&[u8]> = input.chunks(1).collect();
        parse_pieces(&pieces, DEFAULT_MAX_EVENT_BYTES)
            .into_iter()
            .map(|r| r.unwrap())
            .collect()
    }

    fn datas(evs: &[SseEvent]) -> Vec<Option<&str>> {
        evs.iter().map(|e| e.data.as_deref()).collect()
    }

    fn concat_raw(evs: &[SseEvent]) -> Vec<u8> {
        evs.iter().flat_map(|e| e.raw.iter().copied()).collect()
    }

    #[test]
    fn single_event_is_zero_copy_slice_of_chunk() {
        let chunk = Bytes::from_static(b"data: {\"a\":1}\n\ndata: x\n\n");
        let mut p = SseParser::new();
        p.push(chunk.clone());
        let ev = p.next_event().unwrap().unwrap();
        assert_eq!(ev.data.as_deref(), Some("{\"a\":1}"));
        assert_eq!(&ev.raw[..], b"data: {\"a\":1}\n\n");
        // Same allocation as the pushed chunk.
        assert_eq!(ev.raw.as_ptr(), chunk.as_ptr());
        let ev2 = p.next_event().unwrap().unwrap();
        assert_eq!(ev2.data.as_deref(), Some("x"));
        assert!(p.next_event().unwrap().is_none());
        assert_eq!(p.buffered_bytes(), 0);
    }

    #[test]
    fn line_endings_lf_crlf_cr() {
        for input in [
            &b"data: a\n\ndata: b\n\n"[..],
            b"data: a\r\n\r\ndata: b\r\n\r\n",
            b"data: a\r\rdata: b\r\r",
            b"data: a\r\n\ndata: b\n\r\n",
        ] {
            let evs = events(input);
            assert_eq!(datas(&evs), vec![Some("a"), Some("b")], "{input:?}");
            assert_eq!(concat_raw(&evs), input);
            let evs = bytewise(input);
            assert_eq!(datas(&evs), vec![Some("a"), Some("b")], "{input:?}");
            assert_eq!(concat_raw(&evs), input);
        }
    }

    #[test]
    fn crlf_split_between_cr_and_lf() {
        let evs = parse_pieces(&[b"data: a\r\n\r", b"\ndata: b\r", b"\n\r\n"], 1 << 20);
        let evs: Vec<_> = evs.into_iter().map(|r| r.unwrap()).collect();
        assert_eq!(datas(&evs), vec![Some("a"), Some("b")]);
        assert_eq!(&evs[0].raw[..], b"data: a\r\n\r\n");
        assert_eq!(&evs[1].raw[..], b"data: b\r\n\r\n");
    }

    #[test]
    fn trailing_cr_is_held_until_the_next_byte_or_finish() {
        let mut p = SseParser::new();
        p.push(Bytes::from_static(b"data: a\r\r"));
        assert!(p.next_event().unwrap().is_none());
        p.push(Bytes::from_static(b"data: b\r\r"));
        assert_eq!(p.next_event().unwrap().unwrap().raw, &b"data: a\r\r"[..]);
        assert!(p.next_event().unwrap().is_none());
        assert_eq!(p.finish().unwrap().unwrap().raw, &b"data: b\r\r"[..]);
        assert!(p.finish().unwrap().is_none());
    }

    #[test]
    fn split_mid_line_and_mid_utf8_char() {
        let input = "data: héllo 🌍 wörld\n\n".as_bytes();
        for cut in 0..input.len() {
            let evs = parse_pieces(&[&input[..cut], &input[cut..]], 1 << 20);
            assert_eq!(evs.len(), 1);
            assert_eq!(
                evs[0].as_ref().unwrap().data.as_deref(),
                Some("héllo 🌍 wörld")
            );
        }
    }

    #[test]
    fn comments_and_keep_alives() {
        let input = b": keep-alive\n\n\n\n: hi\ndata: x\n\n";
        let evs = events(input);
        assert_eq!(evs.len(), 2);
        assert_eq!(evs[0].data, None);
        assert_eq!(&evs[0].raw[..], b": keep-alive\n\n");
        // Blank lines before the next field are part of the next event's raw.
        assert_eq!(&evs[1].raw[..], b"\n\n: hi\ndata: x\n\n");
        assert_eq!(evs[1].data.as_deref(), Some("x"));
        assert!(!evs[0].is_done());
    }

    #[test]
    fn multi_line_data_is_joined_with_newline() {
        let evs = events(b"data: first\ndata:second\ndata:  third\ndata\ndata:\n\n");
        assert_eq!(evs[0].data.as_deref(), Some("first\nsecond\n third\n\n"));
    }

    #[test]
    fn event_id_retry_and_unknown_fields() {
        let evs = events(b"event: ping\nid: 7\nretry: 1000\nfoo: bar\ndata: d\n\nevent:done\n\n");
        assert_eq!(evs.len(), 2);
        assert_eq!(evs[0].event.as_deref(), Some("ping"));
        assert_eq!(evs[0].data.as_deref(), Some("d"));
        assert_eq!(evs[1].event.as_deref(), Some("done"));
        assert_eq!(evs[1].data, None);
    }

    #[test]
    fn field_without_colon_and_optional_space() {
        let evs = events(b"data\n\ndata:x\n\ndata: x\n\ndata:  x\n\n");
        assert_eq!(
            datas(&evs),
            vec![Some(""), Some("x"), Some("x"), Some(" x")]
        );
    }

    #[test]
    fn done_sentinel() {
        let evs = events(b"data: [DONE]\n\n");
        assert!(evs[0].is_done());
        assert!(!events(b"data: [DONE]x\n\n")[0].is_done());
    }

    #[test]
    fn trailing_event_without_blank_line_at_finish() {
        let mut p = SseParser::new();
        p.push(Bytes::from_static(b"data: a\n\ndata: b"));
        assert_eq!(p.next_event().unwrap().unwrap().data.as_deref(), Some("a"));
        assert!(p.next_event().unwrap().is_none());
        let last = p.finish().unwrap().unwrap();
        assert_eq!(last.data.as_deref(), Some("b"));
        assert_eq!(&last.raw[..], b"data: b");
        assert!(p.finish().unwrap().is_none());
        // finish also drains complete events that were not fetched yet.
        p.push(Bytes::from_static(b"data: c\n\ndata: d\n"));
        assert_eq!(p.finish().unwrap().unwrap().data.as_deref(), Some("c"));
        assert_eq!(p.finish().unwrap().unwrap().data.as_deref(), Some("d"));
        assert!(p.finish().unwrap().is_none());
    }

    #[test]
    fn invalid_utf8_is_an_error_for_that_event_only() {
        let input: &[u8] = b"data: ok\n\ndata: \xff\xfe\n\ndata: next\n\n";
        let out = parse_pieces(&[input], 1 << 20);
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].as_ref().unwrap().data.as_deref(), Some("ok"));
        assert_eq!(out[1], Err(SseError::InvalidUtf8));
        assert_eq!(out[2].as_ref().unwrap().data.as_deref(), Some("next"));
        let pieces: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(parse_pieces(&pieces, 1 << 20), out);
    }

    #[test]
    fn too_large_event_is_an_error_and_parsing_resumes() {
        let big = format!("data: {}\n\n", "x".repeat(100));
        let input = format!("data: a\n\n{big}data: b\n\n");
        // In one piece: the oversized event is complete when seen.
        let out = parse_pieces(&[input.as_bytes()], 64);
        assert_eq!(out.len(), 3, "{out:?}");
        assert_eq!(out[1], Err(SseError::EventTooLarge { limit: 64 }));
        assert_eq!(out[2].as_ref().unwrap().data.as_deref(), Some("b"));
        // Byte by byte: detected while buffering, never more than the limit plus one chunk held.
        let mut p = SseParser::with_max_event_bytes(64);
        let mut got = Vec::new();
        for b in input.as_bytes() {
            p.push(Bytes::copy_from_slice(&[*b]));
            assert!(p.buffered_bytes() <= 65);
            loop {
                match p.next_event() {
                    Ok(Some(ev)) => got.push(Ok(ev.data)),
                    Ok(None) => break,
                    Err(e) => got.push(Err(e)),
                }
            }
        }
        assert_eq!(
            got,
            vec![
                Ok(Some("a".to_owned())),
                Err(SseError::EventTooLarge { limit: 64 }),
                Ok(Some("b".to_owned())),
            ]
        );
    }

    #[test]
    fn too_large_event_with_split_line_endings_while_discarding() {
        let input = format!(
            "data: {}\r\ndata: y\r\n\r\ndata: b\r\n\r\n",
            "x".repeat(100)
        );
        for size in [1, 2, 3, 7, 50] {
            let pieces: Vec<&[u8]> = input.as_bytes().chunks(size).collect();
            let out = parse_pieces(&pieces, 64);
            assert_eq!(out.len(), 2, "size {size}: {out:?}");
            assert_eq!(out[0], Err(SseError::EventTooLarge { limit: 64 }));
            assert_eq!(out[1].as_ref().unwrap().data.as_deref(), Some("b"));
        }
    }

    #[test]
    fn finish_returns_trailing_blank_lines_and_cr() {
        let evs = bytewise(b"data: a\r\r\n\n");
        assert_eq!(concat_raw(&evs), b"data: a\r\r\n\n");
        assert_eq!(datas(&evs), vec![Some("a"), None]);
        assert_eq!(&evs[1].raw[..], b"\n");
        let evs = bytewise(b"data: a\r\n\r\n");
        assert_eq!(evs.len(), 1);
        let evs = bytewise(b"data: a\r");
        assert_eq!(datas(&evs), vec![Some("a")]);
        assert_eq!(concat_raw(&evs), b"data: a\r");
        assert!(events(b"").is_empty());
    }

    // ---- property: any split parses like the whole ----

    #[derive(Debug, Clone)]
    enum Line {
        Data(String),
        Event(String),
        Id(String),
        Comment(String),
        NoColon,
    }

    fn text() -> impl Strategy<Value = String> {
        // Includes multi-byte characters and colons; no line breaks.
        proptest::string::string_regex("[a-zA-Z0-9 :{}\",é✓🌍\\[\\]]{0,24}")
            .unwrap_or_else(|_| unreachable!())
    }

    fn line() -> impl Strategy<Value = Line> {
        prop_oneof![
            4 => text().prop_map(Line::Data),
            1 => text().prop_map(Line::Event),
            1 => text().prop_map(Line::Id),
            1 => text().prop_map(Line::Comment),
            1 => Just(Line::NoColon),
        ]
    }

    fn ending() -> impl Strategy<Value = &'static str> {
        prop_oneof![Just("\n"), Just("\r\n"), Just("\r")]
    }

    fn stream() -> impl Strategy<Value = Vec<u8>> {
        let block = (
            proptest::collection::vec((line(), ending()), 1..4),
            ending(),
            proptest::collection::vec(ending(), 0..2),
        );
        (proptest::collection::vec(block, 0..8), any::<bool>()).prop_map(|(blocks, trailing)| {
            let mut out = String::new();
            for (lines, end, extra_blank) in blocks {
                for (l, e) in lines {
                    match l {
                        Line::Data(t) => out.push_str(&format!("data: {t}")),
                        Line::Event(t) => out.push_str(&format!("event:{t}")),
                        Line::Id(t) => out.push_str(&format!("id: {t}")),
                        Line::Comment(t) => out.push_str(&format!(":{t}")),
                        Line::NoColon => out.push_str("data"),
                    }
                    out.push_str(e);
                }
                out.push_str(end);
                for e in extra_blank {
                    out.push_str(e);
                }
            }
            if trailing {
                out.push_str("data: tail");
            }
            out.into_bytes()
        })
    }

    fn split_at(input: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        cuts.sort_unstable();
        let mut pieces = Vec::new();
        let mut start = 0;
        for c in cuts {
            pieces.push(input[start..c].to_vec());
            start = c;
        }
        pieces.push(input[start..].to_vec());
        pieces
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn any_split_parses_like_one_piece(
            input in stream(),
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
        ) {
            let whole: Vec<SseEvent> = events(&input);
            prop_assert_eq!(concat_raw(&whole), input.clone());
            let pieces = split_at(&input, &cuts);
            let refs: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
            let split: Vec<SseEvent> = parse_pieces(&refs, DEFAULT_MAX_EVENT_BYTES)
                .into_iter()
                .map(|r| r.unwrap())
                .collect();
            // Same events, raw bytes included, however the stream is split.
            prop_assert_eq!(&split, &whole);
            let one_by_one = bytewise(&input);
            prop_assert_eq!(&one_by_one, &whole);
        }
    }
}
