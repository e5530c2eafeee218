//! Hot path of a metered stream: SSE parsing, chunk parsing and token counting per token.
//!
//! `sse_parse` reports bytes/s for a 64-token stream of ~170-byte events, pushed one event per
//! network chunk and in 1 KiB splits. `meter_per_token` reports the time per streamed token of
//! parse event + parse chunk + count tokens, for the `chunks` and `o200k_base` tokenizers.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tollgate::metering::{
    chunk::parse_chunk,
    sse::SseParser,
    tokenizer::{Tokenizer, TokenizerKind},
};

const TOKENS: usize = 64;

const WORDS: [&str; 16] = [
    " The", " gateway", " meters", " every", " token", " as", " it", " streams", ",", " and",
    " charges", " the", " wallet", " that", " pays", ".",
];

/// One OpenAI `chat.completion.chunk` event per token, then `data: [DONE]`.
fn stream_events() -> Vec<Bytes> {
    let mut events: Vec<Bytes> = (0..TOKENS)
        .map(|i| {
            let word = WORDS[i % WORDS.len()];
            Bytes::from(format!(
                "data: {{\"id\":\"chatcmpl-7aB3\",\"object\":\"chat.completion.chunk\",\"created\":1718000000,\"model\":\"gpt-4o-mini\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{word}\"}},\"finish_reason\":null}}]}}\n\n"
            ))
        })
        .collect();
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    events
}

fn split_every(events: &[Bytes], size: usize) -> Vec<Bytes> {
    let whole: Vec<u8> = events.iter().flat_map(|e| e.iter().copied()).collect();
    whole.chunks(size).map(Bytes::copy_from_slice).collect()
}

/// Pushes every chunk, draining events after each; returns the number of events.
fn parse_all(chunks: &[Bytes]) -> usize {
    let mut parser = SseParser::new();
    let mut n = 0;
    for chunk in chunks {
        parser.push(chunk.clone());
        while let Ok(Some(event)) = parser.next_event() {
            n += black_box(event).raw.len().min(1);
        }
    }
    n
}

fn sse_parse(c: &mut Criterion) {
    let events = stream_events();
    let total: usize = events.iter().map(Bytes::len).sum();
    let split = split_every(&events, 1024);
    let mut group = c.benchmark_group("sse_parse");
    group.throughput(Throughput::Bytes(total as u64));
    group.bench_function("one_event_per_chunk", |b| {
        b.iter(|| parse_all(black_box(&events)))
    });
    group.bench_function("1KiB_splits", |b| b.iter(|| parse_all(black_box(&split))));
    group.finish();
}

/// What the metered stream does per upstream chunk: parse events, read the chunk, count.
fn meter_stream(tokenizer: &Tokenizer, chunks: &[Bytes]) -> u64 {
    let mut parser = SseParser::new();
    let mut tokens = 0;
    for chunk in chunks {
        parser.push(chunk.clone());
        while let Ok(Some(event)) = parser.next_event() {
            if event.is_done() {
                continue;
            }
            let Some(data) = event.data.as_deref() else {
                continue;
            };
            if let Ok(view) = parse_chunk(data) {
                tokens += tokenizer.chunk_output_tokens(&view);
            }
        }
    }
    tokens
}

fn meter_per_token(c: &mut Criterion) {
    let events = stream_events();
    let mut group = c.benchmark_group("meter_per_token");
    group.throughput(Throughput::Elements(TOKENS as u64));
    for kind in [TokenizerKind::Chunks, TokenizerKind::O200kBase] {
        let Ok(tokenizer) = Tokenizer::new(kind) else {
            continue;
        };
        group.bench_function(kind.as_str(), |b| {
            b.iter(|| meter_stream(&tokenizer, black_box(&events)))
        });
    }
    group.finish();
}

criterion_group!(benches, sse_parse, meter_per_token);
criterion_main!(benches);
