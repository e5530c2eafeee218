//! Arbitrary bytes, split arbitrarily, through the SSE parser and the chunk reader: no panic,
//! and every split yields the same events (and errors) as the whole input at once.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tollgate::metering::chunk::parse_chunk;
use tollgate::metering::sse::{SseError, SseEvent, SseParser};
use tollgate::metering::tokenizer::{Tokenizer, TokenizerKind};

/// Small, so that the too-large path is reached often.
const MAX_EVENT_BYTES: usize = 512;

fn drain(p: &mut SseParser, out: &mut Vec<Result<SseEvent, SseError>>) {
    loop {
        match p.next_event() {
            Ok(Some(ev)) => out.push(Ok(ev)),
            Ok(None) => return,
            Err(e) => out.push(Err(e)),
        }
    }
}

fn finish(mut p: SseParser, out: &mut Vec<Result<SseEvent, SseError>>) {
    loop {
        match p.finish() {
            Ok(Some(ev)) => out.push(Ok(ev)),
            Ok(None) => return,
            Err(e) => out.push(Err(e)),
        }
    }
}

fn parse(input: &[u8], sizes: impl Iterator<Item = usize>) -> Vec<Result<SseEvent, SseError>> {
    let mut p = SseParser::with_max_event_bytes(MAX_EVENT_BYTES);
    let mut out = Vec::new();
    let mut rest = input;
    for n in sizes {
        if rest.is_empty() {
            break;
        }
        let (head, tail) = rest.split_at(n.clamp(1, rest.len()));
        p.push(Bytes::copy_from_slice(head));
        drain(&mut p, &mut out);
        rest = tail;
    }
    if !rest.is_empty() {
        p.push(Bytes::copy_from_slice(rest));
        drain(&mut p, &mut out);
    }
    finish(p, &mut out);
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, input)) = data.split_first() else {
        return;
    };
    let whole = parse(input, std::iter::once(input.len()));
    // Split sizes from a small generator seeded by the first byte: 1..=64 bytes each.
    let mut state = u32::from(seed) | 1;
    let sizes = std::iter::from_fn(move || {
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        Some((state >> 16) as usize % 64 + 1)
    });
    let split = parse(input, sizes);
    let bytewise = parse(input, std::iter::repeat(1));
    assert_eq!(whole, split, "a split changed the events");
    assert_eq!(whole, bytewise, "byte-by-byte changed the events");

    let tokenizer = Tokenizer::new(TokenizerKind::Chunks).expect("chunks tokenizer");
    for ev in whole.iter().flatten() {
        assert!(ev.raw.len() <= MAX_EVENT_BYTES, "an event over the limit");
        if let Some(data) = &ev.data {
            if let Ok(chunk) = parse_chunk(data) {
                let _ = tokenizer.chunk_output_tokens(&chunk);
                let _ = chunk.usage();
                let _ = chunk.model();
                let _ = chunk.is_error();
                for choice in chunk.choices() {
                    let _ = choice.texts().count();
                    let _ = choice.tool_arguments().count();
                }
                // The chunk reader accepts nothing that is not JSON.
                assert!(serde_json::from_str::<serde_json::Value>(data).is_ok());
            }
        }
    }
});
