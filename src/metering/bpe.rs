//! A compact byte-pair-encoding table that only counts tokens, for the tokenizers in
//! `tokenizer.rs`.
//!
//! tiktoken-rs's `CoreBPE` keeps each vocabulary several times over (an encoder map, a decoder
//! map, a sorted token list, 128 regex copies): about 55 MiB resident for `o200k_base`, and
//! most of it stays resident even once a temporary `CoreBPE` is dropped (the allocator keeps
//! the freed small blocks). Counting needs only bytes → rank, so a [`BpeTable`] is the layout
//! of `bpe_index.rs`: every token's bytes in one arena, their end offsets by rank, and an
//! open-addressing index of ranks by the hash of their bytes, about 4.5 MiB for `o200k_base`.
//! The build script writes these tables from tiktoken-rs's shipped vocabularies and the
//! library embeds them, so they are read-only data paged in from the binary as counting
//! touches them, never built at run time.
//!
//! Text is split into pieces with the same regex tiktoken uses for the vocabulary and each
//! piece is merged the way tiktoken merges it, so the counts are tiktoken's
//! `encode_ordinary(text).len()` exactly.

use std::borrow::Cow;

use fancy_regex::Regex;

use crate::metering::bpe_index::first_slot;

/// One of the BPE vocabularies the gateway counts with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Vocabulary {
    O200kBase,
    Cl100kBase,
}

impl Vocabulary {
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

    /// The table the build script wrote: arena, ends, slots (see `bpe_index.rs`).
    fn data(self) -> [&'static [u8]; 3] {
        macro_rules! table {
            ($name:literal) => {
                [
                    include_bytes!(concat!(env!("OUT_DIR"), "/", $name, ".arena")),
                    include_bytes!(concat!(env!("OUT_DIR"), "/", $name, ".ends")),
                    include_bytes!(concat!(env!("OUT_DIR"), "/", $name, ".slots")),
                ]
            };
        }
        match self {
            Vocabulary::O200kBase => table!("o200k_base"),
            Vocabulary::Cl100kBase => table!("cl100k_base"),
        }
    }
}

/// Bytes → rank for one vocabulary (the layout of `bpe_index.rs`), and the regex that splits
/// text into pieces.
pub(crate) struct BpeTable {
    arena: Cow<'static, [u8]>,
    /// Little-endian `u32`: where each rank's bytes end in `arena`; they start where the
    /// previous rank's end.
    ends: Cow<'static, [u8]>,
    /// Little-endian `u32`: `rank + 1`, or 0 for an empty slot.
    slots: Cow<'static, [u8]>,
    /// log2 of the number of slots.
    bits: u32,
    pieces: Regex,
}

impl BpeTable {
    /// `vocabulary`'s table: the embedded data and its compiled split regex.
    pub(crate) fn build(vocabulary: Vocabulary) -> Result<BpeTable, String> {
        let [arena, ends, slots] = vocabulary.data();
        BpeTable::new(
            arena.into(),
            ends.into(),
            slots.into(),
            vocabulary.pattern(),
        )
    }

    /// Checks that the parts fit together (so that lookups stay in bounds).
    fn new(
        arena: Cow<'static, [u8]>,
        ends: Cow<'static, [u8]>,
        slots: Cow<'static, [u8]>,
        pattern: &str,
    ) -> Result<BpeTable, String> {
        let words = slots.len() / 4;
        let fits = !ends.is_empty()
            && ends.len() % 4 == 0
            && slots.len() % 4 == 0
            && words.is_power_of_two()
            && words > 1
            && words > ends.len() / 4;
        if !fits {
            return Err("the table's parts have the wrong sizes".to_owned());
        }
        let table = BpeTable {
            bits: words.trailing_zeros(),
            pieces: Regex::new(pattern).map_err(|e| e.to_string())?,
            arena,
            ends,
            slots,
        };
        let ranks = table.ends.len() / 4;
        let ordered = (0..ranks).all(|r| {
            let start = if r == 0 { 0 } else { word(&table.ends, r - 1) };
            start <= word(&table.ends, r)
        });
        let in_range = (0..words).all(|s| word(&table.slots, s) as usize <= ranks);
        if !ordered || word(&table.ends, ranks - 1) as usize != table.arena.len() || !in_range {
            return Err("the table's offsets are out of order or out of range".to_owned());
        }
        Ok(table)
    }

    /// Bytes held by the table (the regex not included).
    #[cfg(test)]
    pub(crate) fn table_bytes(&self) -> usize {
        self.arena.len() + self.ends.len() + self.slots.len()
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
        let mask = (1usize << self.bits) - 1;
        let mut slot = first_slot(bytes, self.bits);
        loop {
            let entry = word(&self.slots, slot);
            if entry == 0 {
                return None;
            }
            if self.token(entry - 1) == bytes {
                return Some(entry - 1);
            }
            slot = (slot + 1) & mask;
        }
    }

    fn token(&self, rank: u32) -> &[u8] {
        let rank = rank as usize;
        let start = if rank == 0 {
            0
        } else {
            word(&self.ends, rank - 1)
        };
        &self.arena[start as usize..word(&self.ends, rank) as usize]
    }
}

/// The `i`th little-endian `u32` of `bytes`.
fn word(bytes: &[u8], i: usize) -> u32 {
    let mut buf = [0u8; 4];
    buf.copy_from_slice(&bytes[4 * i..4 * i + 4]);
    u32::from_le_bytes(buf)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn tiny(tokens: &[&str]) -> BpeTable {
        let tokens: Vec<Vec<u8>> = tokens.iter().map(|t| t.as_bytes().to_vec()).collect();
        let index = crate::metering::bpe_index::index(&tokens).unwrap();
        let [arena, ends, slots] = [index.arena, index.ends, index.slots].map(Cow::Owned);
        BpeTable::new(arena, ends, slots, r"\S+|\s+").unwrap()
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
        assert!(crate::metering::bpe_index::index(&tokens).is_err());
        assert!(crate::metering::bpe_index::index(&[b"a".to_vec(), vec![]]).is_err());
    }
}
