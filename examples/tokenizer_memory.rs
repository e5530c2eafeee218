//! Resident memory of a BPE vocabulary: RSS before and after the first `o200k_base` count.
//!
//! `cargo run --release --example tokenizer_memory -- compact` counts with the gateway's own
//! table; `-- tiktoken` keeps tiktoken-rs's `CoreBPE` instead (what the gateway did before).
//! An optional second argument counts the text that many times more, after the measurement,
//! so that `perf stat -e instructions` of two runs gives the instructions per count.
//! Run each in its own process. RSS is read from /proc/self/status (Linux): anonymous memory
//! (the heap) and file-backed pages (the binary, including the embedded tables).

use tollgate::metering::tokenizer::{Tokenizer, TokenizerKind};

const TEXT: &str =
    "Say something about load testing: how many streams, how long, and what to watch.";

/// (anonymous, file-backed) resident MiB of this process.
fn rss_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| -> f64 {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("RssAnon:"), field("RssFile:"))
}

fn main() {
    let mode = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "compact".to_owned());
    let repeat: u64 = std::env::args()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let before = rss_mib();
    let tokens = match mode.as_str() {
        "tiktoken" => match tiktoken_rs::o200k_base() {
            Ok(core) => {
                let tokens = core.encode_ordinary(TEXT).len() as u64;
                for _ in 0..repeat {
                    std::hint::black_box(core.encode_ordinary(std::hint::black_box(TEXT)).len());
                }
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
            Ok(t) => {
                let tokens = t.count_text(TEXT);
                for _ in 0..repeat {
                    std::hint::black_box(t.count_text(std::hint::black_box(TEXT)));
                }
                tokens
            }
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        },
    };
    let after = rss_mib();
    println!(
        "{mode}: {tokens} tokens; RSS before the first count {:.1} MiB anonymous + {:.1} MiB file, \
         after {:.1} + {:.1} MiB (+{:.1} MiB in all)",
        before.0,
        before.1,
        after.0,
        after.1,
        after.0 + after.1 - before.0 - before.1
    );
}
