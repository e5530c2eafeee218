//! The layout of a compact BPE counting table, shared by the build script (which writes the
//! tables from tiktoken-rs's vocabularies) and `bpe.rs` (which reads them).
//!
//! A table is three byte strings: every token's bytes back to back in rank order (the arena),
//! each rank's end offset in the arena (little-endian `u32`s), and an open-addressing index
//! with linear probing whose slots hold `rank + 1` of a token whose bytes hash there, or 0
//! (little-endian `u32`s, a power of two of them, at most half full). A hash's top bits pick
//! its first slot.

/// A multiplicative hash of `bytes`, eight at a time; its top bits are the well-mixed ones.
pub fn hash(bytes: &[u8]) -> u64 {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let mix = |h: u64, word: u64| (h.rotate_left(5) ^ word).wrapping_mul(K);
    let mut h = (bytes.len() as u64).wrapping_mul(K);
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        let mut buf = [0u8; 8];
        buf.copy_from_slice(word);
        h = mix(h, u64::from_le_bytes(buf));
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut buf = [0u8; 8];
        buf[..rest.len()].copy_from_slice(rest);
        h = mix(h, u64::from_le_bytes(buf));
    }
    h
}

/// The first slot of `bytes` in an index of `2^bits` slots.
pub fn first_slot(bytes: &[u8], bits: u32) -> usize {
    (hash(bytes) >> (64 - bits)) as usize
}

/// A table's three parts, as written to and read from the build output.
#[allow(dead_code)] // built by the build script and the tests
pub struct Index {
    pub arena: Vec<u8>,
    pub ends: Vec<u8>,
    pub slots: Vec<u8>,
}

/// The table of `tokens` (token `r` has rank `r`); an error if a token is empty, two tokens
/// have the same bytes, or the table would not fit 32-bit offsets.
#[allow(dead_code)] // used by the build script and the tests
pub fn index(tokens: &[Vec<u8>]) -> Result<Index, String> {
    let total: usize = tokens.iter().map(Vec::len).sum();
    if total > u32::MAX as usize || tokens.len() >= (u32::MAX / 4) as usize {
        return Err("the vocabulary is too large".to_owned());
    }
    let mut arena = Vec::with_capacity(total);
    let mut ends = Vec::with_capacity(tokens.len());
    for token in tokens {
        if token.is_empty() {
            return Err("the vocabulary has an empty token".to_owned());
        }
        arena.extend_from_slice(token);
        ends.push(arena.len() as u32); // total fits u32, checked above
    }
    let token = |rank: u32| {
        let rank = rank as usize;
        let start = if rank == 0 {
            0
        } else {
            ends[rank - 1] as usize
        };
        &arena[start..ends[rank] as usize]
    };
    let bits = (tokens.len() * 2)
        .next_power_of_two()
        .trailing_zeros()
        .max(1);
    let mut slots = vec![0u32; 1 << bits];
    for (rank, bytes) in tokens.iter().enumerate() {
        let mut slot = first_slot(bytes, bits);
        while slots[slot] != 0 {
            if token(slots[slot] - 1) == bytes.as_slice() {
                return Err(format!("rank {rank} repeats an earlier token"));
            }
            slot = (slot + 1) & (slots.len() - 1);
        }
        slots[slot] = rank as u32 + 1; // fits u32, checked above
    }
    let le = |words: &[u32]| words.iter().flat_map(|w| w.to_le_bytes()).collect();
    Ok(Index {
        ends: le(&ends),
        slots: le(&slots),
        arena,
    })
}
