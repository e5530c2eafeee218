//! Hot path of a metered stream: SSE parsing, chunk parsing and token counting per token.
//!
//! `sse_parse` reports bytes/s for a 64-token stream of ~170-byte events, pushed one event per
//! network chunk and in 1 KiB splits. `meter_per_token` reports the time per streamed token of
//! parse event + read it with the format's event reader + count tokens, the same code the
//! metered stream runs, for the three streamed formats (chat chunks, OpenAI Responses events,
//! Anthropic Messages events) and the `chunks` and `o200k_base` tokenizers.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tollgate::metering::{
    sse::SseParser,
    tokenizer::{Tokenizer, TokenizerKind},
    wire::{EventReader, Wire},
};

const TOKENS: usize = 64;

const WORDS: [&str; 16] = [
    " The", " gateway", " meters", " every", " token", " as", " it", " streams", ",", " and",
    " charges", " the", " wallet", " that", " pays", ".",
];

/// A 64-token stream in `wire`'s format, one event per token between its opening and closing
/// events, as the providers send them.
fn wire_events(wire: Wire) -> Vec<Bytes> {
    let word = |i: usize| WORDS[i % WORDS.len()];
    match wire {
        Wire::Chat => stream_events(),
        Wire::Responses => {
            let mut events = vec![Bytes::from_static(
                b"event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_7aB3\",\"object\":\"response\",\"status\":\"in_progress\",\"model\":\"gpt-4.1-mini\",\"output\":[]}}\n\n",
            )];
            events.extend((0..TOKENS).map(|i| {
                Bytes::from(format!(
                    "event: response.output_text.delta\ndata: {{\"type\":\"response.output_text.delta\",\"sequence_number\":{},\"item_id\":\"msg_7aB3\",\"output_index\":0,\"content_index\":0,\"delta\":\"{}\"}}\n\n",
                    i + 1,
                    word(i)
                ))
            }));
            events.push(Bytes::from(format!(
                "event: response.completed\ndata: {{\"type\":\"response.completed\",\"sequence_number\":{},\"response\":{{\"id\":\"resp_7aB3\",\"status\":\"completed\",\"output\":[],\"usage\":{{\"input_tokens\":9,\"output_tokens\":{TOKENS}}}}}}}\n\n",
                TOKENS + 1
            )));
            events
        }
        Wire::Messages => {
            let mut events = vec![Bytes::from_static(
                b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_7aB3\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4\",\"content\":[],\"usage\":{\"input_tokens\":9,\"output_tokens\":1}}}\n\n",
            )];
            events.extend((0..TOKENS).map(|i| {
                Bytes::from(format!(
                    "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"{}\"}}}}\n\n",
                    word(i)
                ))
            }));
            events.push(Bytes::from(format!(
                "event: message_delta\ndata: {{\"type\":\"message_delta\",\"delta\":{{\"stop_reason\":\"end_turn\"}},\"usage\":{{\"output_tokens\":{TOKENS}}}}}\n\nevent: message_stop\ndata: {{\"type\":\"message_stop\"}}\n\n"
            )));
            events
        }
    }
}

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

/// What the metered stream does per upstream chunk: parse events, read each with the format's
/// event reader (which counts its tokens). Returns the tokens counted.
fn meter_stream(wire: Wire, tokenizer: &Tokenizer, chunks: &[Bytes]) -> u64 {
    let mut parser = SseParser::new();
    let mut reader = EventReader::new(wire);
    let mut tokens = 0;
    for chunk in chunks {
        parser.push(chunk.clone());
        while let Ok(Some(event)) = parser.next_event() {
            tokens += reader.read(&event, tokenizer).tokens;
        }
    }
    tokens
}

fn meter_per_token(c: &mut Criterion) {
    let mut group = c.benchmark_group("meter_per_token");
    group.throughput(Throughput::Elements(TOKENS as u64));
    for (wire, name) in [
        (Wire::Chat, "chat"),
        (Wire::Responses, "responses"),
        (Wire::Messages, "messages"),
    ] {
        let events = wire_events(wire);
        for kind in [TokenizerKind::Chunks, TokenizerKind::O200kBase] {
            let Ok(tokenizer) = Tokenizer::new(kind) else {
                continue;
            };
            // Every format counts the same 64 tokens.
            if kind == TokenizerKind::Chunks {
                assert_eq!(
                    meter_stream(wire, &tokenizer, &events),
                    TOKENS as u64,
                    "{name}"
                );
            }
            group.bench_function(format!("{name}/{}", kind.as_str()), |b| {
                b.iter(|| meter_stream(wire, &tokenizer, black_box(&events)))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, sse_parse, meter_per_token);
criterion_main!(benches);
