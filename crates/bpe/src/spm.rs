//! SentencePiece-style vocabularies: tokens are raw UTF-8 with `▁` (U+2581) for spaces, `<0xXX>`
//! tokens stand for single bytes, and text is merged from its characters up.
//!
//! Two merge rules, as in llama.cpp:
//! - [`Merging::Scores`] (`tokenizer.ggml.model == "llama"`: Llama 2, Mistral, TinyLlama, Phi-3):
//!   repeatedly join the adjacent pair whose joined text is the token with the highest score
//!   (leftmost on ties), over the whole text at once (`llm_tokenizer_spm`).
//! - [`Merging::Ranks`] (Gemma 4 and other SPM-style BPE): repeatedly apply the lowest-ranked
//!   merge, within each word of a pre-tokenizer split (`llm_tokenizer_bpe` without byte encoding).
//!
//! A final symbol that is not a token is written as its bytes' `<0xXX>` tokens (byte fallback).

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use rustc_hash::FxHashMap;

use crate::pretokenize::PreTokenizer;

/// Interned strings of a merge list → piece id.
pub(crate) type PieceTable = FxHashMap<Box<[u8]>, u32>;
/// `(left, right)` piece ids → (rank, joined piece id).
pub(crate) type MergeTable = FxHashMap<(u32, u32), (u32, u32)>;

/// How adjacent symbols are chosen for merging.
#[derive(Clone, Debug)]
pub(crate) enum Merging {
    /// By the score of the joined token (`tokenizer.ggml.scores`).
    Scores(Vec<f32>),
    /// By merge rank (`tokenizer.ggml.merges`), inside the words of `split`.
    Ranks {
        /// `(left, right)` piece ids → (rank, joined piece id). Pieces are every string that occurs
        /// in a merge, so merges whose sides are not tokens still apply, as in llama.cpp.
        merges: MergeTable,
        /// Interned merge strings → piece id.
        pieces: PieceTable,
        /// How text is split into words before merging.
        split: PreTokenizer,
        /// A word that is itself a token is that token.
        ignore_merges: bool,
        /// A word made only of newlines that is a token is that token (llama.cpp's Gemma 4 rule).
        newline_words: bool,
    },
}

/// A SentencePiece-style model: token texts, merge rule, byte fallback and space handling.
#[derive(Clone, Debug)]
pub(crate) struct SentencePiece {
    /// Every token's text (as stored in the file, `▁` for spaces) → id.
    ids: FxHashMap<Box<[u8]>, u32>,
    /// `<0xXX>` token of each byte, if the vocabulary has it.
    byte_tokens: [Option<u32>; 256],
    merging: Merging,
    /// Prepend a space to every stretch of text (llama.cpp's `add_space_prefix`); decoding drops
    /// the first token's leading space.
    pub add_space_prefix: bool,
    /// Write spaces as `▁` before merging.
    escape_whitespace: bool,
}

const ESCAPED_SPACE: &[u8] = "\u{2581}".as_bytes();

/// One symbol during merging: a stretch `start..start + len` of the text, in a linked list.
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: usize,
    next: usize,
    /// Piece id (ranked merging only).
    piece: u32,
}

const NONE: usize = usize::MAX;
const NO_PIECE: u32 = u32::MAX;

/// A candidate merge in the heap, ordered best first.
struct Candidate {
    /// Higher is better (a score, or the negated rank).
    priority: f32,
    rank: u32,
    left: usize,
    right: usize,
    size: usize,
}

impl Candidate {
    fn key(&self) -> (Reverse<u32>, Reverse<usize>) {
        (Reverse(self.rank), Reverse(self.left))
    }
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        self.priority
            .total_cmp(&other.priority)
            .then_with(|| self.key().cmp(&other.key()))
    }
}

impl SentencePiece {
    /// Builds the model from token texts (index = id).
    pub(crate) fn new(
        tokens: &[String],
        merging: Merging,
        add_space_prefix: bool,
        escape_whitespace: bool,
    ) -> Self {
        let mut ids = FxHashMap::default();
        ids.reserve(tokens.len());
        let mut byte_tokens = [None; 256];
        for (id, t) in tokens.iter().enumerate() {
            let id = id as u32;
            ids.entry(t.as_bytes().into()).or_insert(id);
            if let Some(b) = byte_token_value(t) {
                byte_tokens[usize::from(b)].get_or_insert(id);
            }
        }
        Self {
            ids,
            byte_tokens,
            merging,
            add_space_prefix,
            escape_whitespace,
        }
    }

    /// The id of a token given its text as stored (`▁` for spaces).
    pub(crate) fn id_of(&self, text: &[u8]) -> Option<u32> {
        self.ids.get(text).copied()
    }

    /// Whether byte `b` can be encoded (as part of a token or through its `<0xXX>` token).
    pub(crate) fn has_byte_token(&self, b: u8) -> bool {
        self.byte_tokens[usize::from(b)].is_some()
    }

    /// Encodes one stretch of text between added tokens, appending the ids.
    pub(crate) fn encode(&self, text: &[u8], ids: &mut Vec<u32>) {
        let mut buf = Vec::with_capacity(text.len() + 4);
        if self.add_space_prefix {
            buf.push(b' ');
        }
        buf.extend_from_slice(text);
        if self.escape_whitespace {
            buf = escape(&buf);
        }
        match &self.merging {
            Merging::Scores(scores) => self.merge_by_score(&buf, scores, ids),
            Merging::Ranks {
                split,
                ignore_merges,
                newline_words,
                ..
            } => {
                let mut ends = Vec::with_capacity(buf.len() / 4 + 1);
                split.split_into(&buf, &mut ends);
                let mut start = 0;
                for end in ends {
                    let word = &buf[start..end];
                    start = end;
                    let whole =
                        *ignore_merges || (*newline_words && word.iter().all(|&b| b == b'\n'));
                    if whole && let Some(id) = self.id_of(word) {
                        ids.push(id);
                        continue;
                    }
                    self.merge_by_rank(word, ids);
                }
            }
        }
    }

    /// The initial symbols: one per UTF-8 character, sized by its first byte as llama.cpp does.
    fn symbols(text: &[u8]) -> Vec<Symbol> {
        let mut symbols = Vec::with_capacity(text.len());
        let mut i = 0;
        while i < text.len() {
            let len = match text[i] >> 4 {
                0xC | 0xD => 2,
                0xE => 3,
                0xF => 4,
                _ => 1,
            }
            .min(text.len() - i);
            let k = symbols.len();
            symbols.push(Symbol {
                start: i,
                len,
                prev: k.wrapping_sub(1),
                next: k + 1,
                piece: NO_PIECE,
            });
            i += len;
        }
        if let Some(last) = symbols.last_mut() {
            last.next = NONE;
        }
        if let Some(first) = symbols.first_mut() {
            first.prev = NONE;
        }
        symbols
    }

    fn merge_by_score(&self, text: &[u8], scores: &[f32], ids: &mut Vec<u32>) {
        let mut symbols = Self::symbols(text);
        let mut heap = BinaryHeap::with_capacity(symbols.len());
        let candidate = |symbols: &[Symbol], left: usize, right: usize| -> Option<Candidate> {
            if left == NONE || right == NONE {
                return None;
            }
            let (l, r) = (symbols[left], symbols[right]);
            let size = l.len + r.len;
            let id = self.id_of(&text[l.start..l.start + size])?;
            Some(Candidate {
                priority: scores.get(id as usize).copied().unwrap_or(0.0),
                rank: 0,
                left,
                right,
                size,
            })
        };
        for i in 1..symbols.len() {
            heap.extend(candidate(&symbols, i - 1, i));
        }
        while let Some(c) = heap.pop() {
            let (l, r) = (symbols[c.left], symbols[c.right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != c.size {
                continue;
            }
            self.join(&mut symbols, c.left, c.right);
            let prev = symbols[c.left].prev;
            let next = symbols[c.left].next;
            heap.extend(candidate(&symbols, prev, c.left));
            heap.extend(candidate(&symbols, c.left, next));
        }
        self.emit(text, &symbols, ids);
    }

    fn merge_by_rank(&self, word: &[u8], ids: &mut Vec<u32>) {
        let Merging::Ranks { merges, pieces, .. } = &self.merging else {
            return;
        };
        let mut symbols = Self::symbols(word);
        for s in &mut symbols {
            s.piece = pieces
                .get(&word[s.start..s.start + s.len])
                .copied()
                .unwrap_or(NO_PIECE);
        }
        let mut heap = BinaryHeap::with_capacity(symbols.len());
        let candidate = |symbols: &[Symbol], left: usize, right: usize| -> Option<Candidate> {
            if left == NONE || right == NONE {
                return None;
            }
            let (l, r) = (symbols[left], symbols[right]);
            let &(rank, _) = merges.get(&(l.piece, r.piece))?;
            Some(Candidate {
                priority: 0.0,
                rank,
                left,
                right,
                size: l.len + r.len,
            })
        };
        for i in 1..symbols.len() {
            heap.extend(candidate(&symbols, i - 1, i));
        }
        while let Some(c) = heap.pop() {
            let (l, r) = (symbols[c.left], symbols[c.right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != c.size {
                continue;
            }
            let joined = merges.get(&(l.piece, r.piece)).map_or(NO_PIECE, |m| m.1);
            self.join(&mut symbols, c.left, c.right);
            symbols[c.left].piece = joined;
            let prev = symbols[c.left].prev;
            let next = symbols[c.left].next;
            heap.extend(candidate(&symbols, prev, c.left));
            heap.extend(candidate(&symbols, c.left, next));
        }
        self.emit(word, &symbols, ids);
    }

    /// Joins symbol `right` into `left`.
    fn join(&self, symbols: &mut [Symbol], left: usize, right: usize) {
        let r = symbols[right];
        symbols[left].len += r.len;
        symbols[right].len = 0;
        symbols[left].next = r.next;
        if r.next != NONE {
            symbols[r.next].prev = left;
        }
    }

    /// Writes the final symbols: a token if the text is one, else its bytes' `<0xXX>` tokens
    /// (a byte without one is dropped, where llama.cpp would fail).
    fn emit(&self, text: &[u8], symbols: &[Symbol], ids: &mut Vec<u32>) {
        let mut i = if symbols.is_empty() { NONE } else { 0 };
        while i != NONE {
            let s = symbols[i];
            let bytes = &text[s.start..s.start + s.len];
            match self.id_of(bytes) {
                Some(id) => ids.push(id),
                None => ids.extend(
                    bytes
                        .iter()
                        .filter_map(|&b| self.byte_tokens[usize::from(b)]),
                ),
            }
            i = s.next;
        }
    }
}

/// Spaces written as `▁`.
pub(crate) fn escape(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + text.len() / 4);
    for &b in text {
        if b == b' ' {
            out.extend_from_slice(ESCAPED_SPACE);
        } else {
            out.push(b);
        }
    }
    out
}

/// The byte a `<0xXX>` token stands for.
pub(crate) fn byte_token_value(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// A token's text with `▁` read back as a space.
pub(crate) fn unescape(token: &str) -> Vec<u8> {
    token.replace('\u{2581}', " ").into_bytes()
}

/// Interns every string of a merge list; returns the piece table and the merge map.
pub(crate) fn intern_merges(merges: &[(Vec<u8>, Vec<u8>)]) -> (PieceTable, MergeTable) {
    let mut pieces = PieceTable::default();
    let mut intern = |s: &[u8]| -> u32 {
        let next = pieces.len() as u32;
        *pieces.entry(s.into()).or_insert(next)
    };
    let mut map = FxHashMap::default();
    for (rank, (a, b)) in merges.iter().enumerate() {
        let (ia, ib) = (intern(a), intern(b));
        let joined = intern(&[a.as_slice(), b.as_slice()].concat());
        map.entry((ia, ib)).or_insert((rank as u32, joined));
    }
    (pieces, map)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(tokens: &[(&str, f32)]) -> SentencePiece {
        let texts: Vec<String> = tokens.iter().map(|(t, _)| (*t).to_owned()).collect();
        let scores = tokens.iter().map(|(_, s)| *s).collect();
        SentencePiece::new(&texts, Merging::Scores(scores), true, true)
    }

    #[test]
    fn highest_score_first_and_byte_fallback() {
        let m = model(&[
            ("<unk>", 0.0),
            ("<0x21>", 0.0),
            ("▁", -1.0),
            ("a", -2.0),
            ("b", -2.0),
            ("▁a", -3.0),
            ("ab", -0.5),
            ("▁ab", -4.0),
        ]);
        let mut ids = Vec::new();
        m.encode(b"ab!", &mut ids);
        // "ab" (score -0.5) wins over "▁a" (-3); then "▁ab" joins; "!" falls back to <0x21>.
        assert_eq!(ids, [7, 1]);
        ids.clear();
        m.encode(b"\xc3\xa9", &mut ids);
        assert_eq!(
            ids,
            [2],
            "é has no token and no byte tokens: dropped after ▁"
        );
    }

    #[test]
    fn byte_tokens_parse() {
        assert_eq!(byte_token_value("<0x0A>"), Some(10));
        assert_eq!(byte_token_value("<0xff>"), Some(255));
        assert_eq!(byte_token_value("<0x1>"), None);
        assert_eq!(byte_token_value("0x41"), None);
    }
}
