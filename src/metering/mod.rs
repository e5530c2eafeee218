//! Metering: the incremental SSE parser, the chunk reader, tokenizers, the per-request meter and
//! the metered stream that ties them to the wallet hold.

pub mod chunk;
pub mod meter;
pub mod sse;
pub mod stream;
pub mod tokenizer;
