//! Metering: the incremental SSE parser, the event readers of the three streamed formats (chat
//! chunks in `chunk.rs`, all three in `wire.rs`), tokenizers, the per-request meter and the
//! metered stream that ties them to the wallet hold.

mod bpe;
mod bpe_index;
pub mod chunk;
pub mod meter;
pub mod sse;
pub mod stream;
pub mod tokenizer;
pub mod wire;
