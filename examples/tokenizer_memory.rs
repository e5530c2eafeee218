//! Resident memory of a BPE vocabulary: RSS before and after the first `o200k_base` count.
//!
//! `cargo run --release --example tokenizer_memory -- compact` counts with the gateway's own
//! table; `-- tiktoken` keeps tiktoken-rs's `CoreBPE` instead (what the gateway did before).
//! Run each in its own process: RSS is read from /proc/self/statm (Linux).

use tollgate::metering::tokenizer::{Tokenizer, TokenizerKind};

const TEXT: &str =
    "Say something about load testing: how many streams, how long, and what to watch.";

fn rss_mib() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: f64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0.0);
    pages * 4096.0 / (1024.0 * 1024.0)
}

fn main() {
    let mode = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "compact".to_owned());
    let before = rss_mib();
    let tokens = match mode.as_str() {
        "tiktoken" => match tiktoken_rs::o200k_base() {
            Ok(core) => {
                let tokens = core.encode_ordinary(TEXT).len() as u64;
                // Kept resident, as a process-wide table is.
                std::mem::forget(core);
                tokens
            }
            Err(e) => {
                eprintln!("cannot build o200k_base: {e}");
                std::process::exit(1);
            }
        },
        _ => match Tokenizer::new(TokenizerKind::O200kBase) {
            Ok(t) => t.count_text(TEXT),
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        },
    };
    let after = rss_mib();
    println!(
        "{mode}: {tokens} tokens; RSS {before:.1} MiB before the first count, {after:.1} MiB after (+{:.1} MiB)",
        after - before
    );
}
