//! CPU per count of the BPE tokenizers: the gateway's compact table (`Tokenizer::count_text`)
//! against tiktoken-rs's `CoreBPE::encode_ordinary(text).len()`, what it counted with before,
//! on typical prompt texts (all longer than the per-thread memo's 32 bytes, so every count
//! runs the split and the merge).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tollgate::metering::tokenizer::{Tokenizer, TokenizerKind};

const TEXTS: [(&str, &str); 4] = [
    (
        "prose",
        "You are a helpful assistant for a travel company. The customer wants to fly from Lisbon \
         to Kraków in early March, prefers morning departures, travels with one checked bag and \
         asks whether a stopover in Frankfurt or Vienna is cheaper. Summarise the options in a \
         short table, then recommend one, explaining the trade-off between price and total \
         travel time in two sentences.",
    ),
    (
        "code",
        "fn settle(hold: &mut Hold, used: u64) -> Result<Settlement, WalletError> {\n    \
         let charge = used.min(hold.amount);\n    if charge > hold.available() {\n        \
         return Err(WalletError::Overdraft { wanted: charge, left: hold.available() });\n    \
         }\n    hold.release(hold.amount - charge);\n    Ok(Settlement { charged: charge, \
         refunded: hold.amount - charge })\n}\n",
    ),
    (
        "cjk",
        "東京から大阪までの新幹線の料金と所要時間を教えてください。できれば、のぞみとひかりの違いも\
         簡単に説明してほしいです。请用中文总结一下这段对话的要点，并列出三个后续问题。",
    ),
    (
        "delta",
        " the gateway meters every token as it streams, and",
    ),
];

fn counting(c: &mut Criterion) {
    for (kind, core) in [
        (TokenizerKind::O200kBase, tiktoken_rs::o200k_base()),
        (TokenizerKind::Cl100kBase, tiktoken_rs::cl100k_base()),
    ] {
        let Ok(core) = core else {
            return;
        };
        let Ok(tokenizer) = Tokenizer::new(kind) else {
            return;
        };
        let mut group = c.benchmark_group(format!("count_{kind}"));
        for (name, text) in TEXTS {
            assert_eq!(
                tokenizer.count_text(text),
                core.encode_ordinary(text).len() as u64
            );
            group.throughput(Throughput::Bytes(text.len() as u64));
            group.bench_function(format!("{name}/compact"), |b| {
                b.iter(|| tokenizer.count_text(black_box(text)))
            });
            group.bench_function(format!("{name}/tiktoken"), |b| {
                b.iter(|| core.encode_ordinary(black_box(text)).len())
            });
        }
        group.finish();
    }
}

criterion_group!(benches, counting);
criterion_main!(benches);
