//! Writes the compact BPE counting tables (`src/metering/bpe.rs`) from the vocabularies
//! tiktoken-rs ships, into `OUT_DIR`, where the library embeds them. The gateway then never
//! builds tiktoken-rs's own tables, which keep each vocabulary several times over (about
//! 55 MiB resident for `o200k_base`).

use std::path::PathBuf;

#[path = "src/metering/bpe_index.rs"]
mod bpe_index;

/// Name and number of ordinary tokens (ranks `0..n`; the special tokens above them are not
/// counted as such) of each vocabulary.
const VOCABULARIES: [(&str, u32); 2] = [("o200k_base", 199_998), ("cl100k_base", 100_256)];

/// tiktoken-rs's own table for `name`.
fn core(name: &str) -> Result<tiktoken_rs::CoreBPE, String> {
    let core = match name {
        "o200k_base" => tiktoken_rs::o200k_base(),
        _ => tiktoken_rs::cl100k_base(),
    };
    core.map_err(|e| format!("{name}: {e}"))
}

fn main() -> Result<(), String> {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/metering/bpe_index.rs");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);
    for (name, ranks) in VOCABULARIES {
        let core = core(name)?;
        // tiktoken-rs has no accessor for one token's bytes; decoding a one-token list gives
        // them.
        let tokens: Vec<Vec<u8>> = (0..ranks)
            .map(|rank| {
                core._decode_native_and_split(vec![rank])
                    .next()
                    .ok_or_else(|| format!("{name}: no bytes for rank {rank}"))
            })
            .collect::<Result<_, _>>()?;
        let index = bpe_index::index(&tokens).map_err(|e| format!("{name}: {e}"))?;
        for (part, bytes) in [
            ("arena", &index.arena),
            ("ends", &index.ends),
            ("slots", &index.slots),
        ] {
            let path = out.join(format!("{name}.{part}"));
            std::fs::write(&path, bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    Ok(())
}
