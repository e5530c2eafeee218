//! A compact byte-pair-encoding table that only counts tokens, for the tokenizers in
//! `tokenizer.rs`.
//!
//! tiktoken-rs's `CoreBPE` keeps each vocabulary several times over (an encoder map, a decoder
//! map, a sorted token list, 128 regex copies): about 55 MiB resident for `o200k_base`.
//! Counting needs only bytes → rank, so a [`BpeTable`] holds every token's bytes back to back in
//! one arena, their end offsets by rank, and an open-addressing index of ranks by the hash of
//! their bytes: about 4.5 MiB for `o200k_base`. Text is split into pieces with the same regex
//! tiktoken uses for the vocabulary and each piece is merged the way tiktoken merges it, so the
//! counts are tiktoken's `encode_ordinary(text).len()` exactly.
//!
//! The vocabulary is read once from a temporary `CoreBPE` (tiktoken-rs does not expose its
//! data otherwise), which is dropped as soon as the table is built.

use std::panic::{catch_unwind, AssertUnwindSafe};

use fancy_regex::Regex;
use tiktoken_rs::CoreBPE;

/// One of the BPE vocabularies the gateway counts with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Vocabulary {
    O200kBase,
    Cl100kBase,
}

impl Vocabulary {
    /// Ordinary (non-special) tokens: ranks `0..ranks()`, as shipped with tiktoken-rs.
    fn ranks(self) -> u32 {
        match self {
            Vocabulary::O200kBase => 199_998,
            Vocabulary::Cl100kBase => 100_256,
        }
    }

    /// The regex that splits text into the pieces BPE merges within (tiktoken's, verbatim).
    fn pattern(self) -> &'static str {
        match self {
            Vocabulary::O200kBase => concat!(
                r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
                r"|\p{N}{1,3}",
                r"| ?[^\s\p{L}\p{N}]+[\r\n/]*",
                r"|\s*[\r\n]+",
                r"|\s+(?!\S)",
                r"|\s+",
            ),
            Vocabulary::Cl100kBase => concat!(
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)",
                r"|[^\r\n\p{L}\p{N}]?\p{L}+",
                r"|\p{N}{1,3}",
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*",
                r"|\s*[\r\n]+",
                r"|\s+(?!\S)",
                r"|\s+",
            ),
        }
    }

    /// tiktoken-rs's own table for this vocabulary (tens of MiB, tens of milliseconds).
    fn core(self) -> Result<CoreBPE, String> {
        let core = match self {
            Vocabulary::O200kBase => tiktoken_rs::o200k_base(),
            Vocabulary::Cl100kBase => tiktoken_rs::cl100k_base(),
        };
        core.map_err(|e| e.to_string())
    }
}

/// Bytes → rank for one vocabulary, and the regex that splits text into pieces.
pub(crate) struct BpeTable {
    /// Every token's bytes, back to back in rank order.
    arena: Box<[u8]>,
    /// `ends[r]` is where rank `r`'s bytes end in `arena`; they start where `r - 1`'s end.
    ends: Box<[u32]>,
    /// Open addressing with linear probing: `rank + 1` of a token whose bytes hash here, or 0.
    slots: Box<[u32]>,
    /// `64 - log2(slots.len())`: a hash's top bits pick its first slot.
    shift: u32,
    pieces: Regex,
}

impl BpeTable {
    /// Builds `vocabulary`'s table from tiktoken-rs's shipped data.
    ///
    /// The temporary `CoreBPE` is built on a thread of its own so that its hundreds of
    /// thousands of small allocations come from that thread's malloc arena rather than being
    /// interleaved with the long-lived table (and the caller's other allocations); once it is
    /// dropped, that arena is free as a whole and goes back to the system.
    pub(crate) fn build(vocabulary: Vocabulary) -> Result<BpeTable, String> {
        let pieces = Regex::new(vocabulary.pattern()).map_err(|e| e.to_string())?;
        let core = std::thread::scope(|scope| {
            scope
                .spawn(|| vocabulary.core())
                .join()
                .unwrap_or_else(|_| Err("building the table panicked".to_owned()))
        })?;
        let table = catch_unwind(AssertUnwindSafe(|| {
            BpeTable::from_core(&core, vocabulary.ranks(), pieces)
        }))
        .unwrap_or_else(|_| Err("reading the table panicked".to_owned()));
        drop(core);
        table
    }

    /// Copies ranks `0..ranks` out of `core`. tiktoken-rs has no accessor for one token's
    /// bytes; decoding a one-token list gives them.
    fn from_core(core: &CoreBPE, ranks: u32, pieces: Regex) -> Result<BpeTable, String> {
        let mut tokens: Vec<Vec<u8>> = Vec::with_capacity(ranks as usize);
        for rank in 0..ranks {
            let bytes = core
                ._decode_native_and_split(vec![rank])
                .next()
                .ok_or_else(|| format!("no bytes for rank {rank}"))?;
            tokens.push(bytes);
        }
        BpeTable::from_tokens(&tokens, pieces)
    }

    /// The table of `tokens` (token `r` has rank `r`); an error if two tokens have the same
    /// bytes, a token is empty, or the arena would not fit 32-bit offsets.
    fn from_tokens(tokens: &[Vec<u8>], pieces: Regex) -> Result<BpeTable, String> {
        let total: usize = tokens.iter().map(Vec::len).sum();
        if total > u32::MAX as usize || tokens.len() >= u32::MAX as usize {
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
        let bits = (tokens.len() * 2)
            .next_power_of_two()
            .trailing_zeros()
            .max(1);
        let mut table = BpeTable {
            arena: arena.into_boxed_slice(),
            ends: ends.into_boxed_slice(),
            slots: vec![0u32; 1 << bits].into_boxed_slice(),
            shift: 64 - bits,
            pieces,
        };
        for (rank, token) in tokens.iter().enumerate() {
            let mut slot = table.first_slot(token);
            while table.slots[slot] != 0 {
                if table.token(table.slots[slot] - 1) == token.as_slice() {
                    return Err(format!("rank {rank} repeats an earlier token"));
                }
                slot = (slot + 1) & (table.slots.len() - 1);
            }
            table.slots[slot] = rank as u32 + 1; // fits u32, checked above
        }
        Ok(table)
    }

    /// Heap bytes held by the table's own arrays (the regex not included).
    #[cfg(test)]
    pub(crate) fn table_bytes(&self) -> usize {
        self.arena.len() + 4 * self.ends.len() + 4 * self.slots.len()
    }

    /// Tokens in `text`: tiktoken's `encode_ordinary(text).len()`. `None` if the regex gave up
    /// on the text (its backtracking limit).
    pub(crate) fn count(&self, text: &str) -> Option<u64> {
        let mut parts = Vec::new();
        let mut tokens = 0u64;
        for piece in self.pieces.find_iter(text) {
            let piece = piece.ok()?.as_str().as_bytes();
            tokens += self.piece_tokens(piece, &mut parts) as u64;
        }
        Some(tokens)
    }

    /// Tokens in one piece of the split: 1 if the piece is a token, else the parts left by
    /// merging, lowest-ranked adjacent pair first (the leftmost of equal ranks), until no
    /// adjacent pair is a token. `parts` is scratch space.
    fn piece_tokens(&self, piece: &[u8], parts: &mut Vec<(usize, u32)>) -> usize {
        if piece.len() <= 1 || self.rank(piece).is_some() {
            return 1;
        }
        // (start, rank of the bytes from this part's start to the next-but-one part's start):
        // the rank the pair would have if this part were merged with the next.
        parts.clear();
        for i in 0..piece.len() - 1 {
            parts.push((i, self.rank_or_max(&piece[i..i + 2])));
        }
        parts.push((piece.len() - 1, u32::MAX));
        parts.push((piece.len(), u32::MAX));
        loop {
            let mut min = (u32::MAX, 0);
            for (i, &(_, rank)) in parts[..parts.len() - 1].iter().enumerate() {
                if rank < min.0 {
                    min = (rank, i);
                }
            }
            if min.0 == u32::MAX {
                break;
            }
            let i = min.1;
            // Merging parts i and i + 1 changes the pair ranks of parts i - 1 and i.
            let pair_rank = |parts: &[(usize, u32)], i: usize| match parts.get(i + 3) {
                Some(&(end, _)) => self.rank_or_max(&piece[parts[i].0..end]),
                None => u32::MAX,
            };
            if i > 0 {
                parts[i - 1].1 = pair_rank(parts, i - 1);
            }
            parts[i].1 = pair_rank(parts, i);
            parts.remove(i + 1);
        }
        parts.len() - 1
    }

    fn rank_or_max(&self, bytes: &[u8]) -> u32 {
        self.rank(bytes).unwrap_or(u32::MAX)
    }

    /// The rank of the token whose bytes are `bytes`, if there is one.
    fn rank(&self, bytes: &[u8]) -> Option<u32> {
        let mut slot = self.first_slot(bytes);
        loop {
            let entry = self.slots[slot];
            if entry == 0 {
                return None;
            }
            if self.token(entry - 1) == bytes {
                return Some(entry - 1);
            }
            slot = (slot + 1) & (self.slots.len() - 1);
        }
    }

    fn token(&self, rank: u32) -> &[u8] {
        let rank = rank as usize;
        let start = if rank == 0 { 0 } else { self.ends[rank - 1] };
        &self.arena[start as usize..self.ends[rank] as usize]
    }

    fn first_slot(&self, bytes: &[u8]) -> usize {
        (hash(bytes) >> self.shift) as usize
    }
}

/// A multiplicative hash of `bytes`, eight at a time; its top bits are the well-mixed ones.
fn hash(bytes: &[u8]) -> u64 {
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn tiny(tokens: &[&str]) -> BpeTable {
        let tokens: Vec<Vec<u8>> = tokens.iter().map(|t| t.as_bytes().to_vec()).collect();
        BpeTable::from_tokens(&tokens, Regex::new(r"\S+|\s+").unwrap()).unwrap()
    }

    #[test]
    fn merges_lowest_rank_first() {
        // Bytes a, b, c (ranks 0-2), then "ab" (3), "bc" (4), "abc" (5).
        let t = tiny(&["a", "b", "c", "ab", "bc", "abc"]);
        assert_eq!(t.rank(b"bc"), Some(4));
        assert_eq!(t.rank(b"ca"), None);
        assert_eq!(t.count("abc"), Some(1)); // a token itself
        assert_eq!(t.count("abca"), Some(2)); // ab+c -> abc, a
        assert_eq!(t.count("cab"), Some(2)); // c, ab
        assert_eq!(t.count("aaaa bb"), Some(7)); // nothing merges; the space is a piece
        assert_eq!(t.count(""), Some(0));
    }

    #[test]
    fn repeated_tokens_are_refused() {
        let tokens = vec![b"a".to_vec(), b"b".to_vec(), b"a".to_vec()];
        let refused = BpeTable::from_tokens(&tokens, Regex::new("a").unwrap());
        assert!(refused.is_err());
    }
}
