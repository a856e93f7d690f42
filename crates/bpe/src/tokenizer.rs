//! The byte-level BPE tokenizer: vocabulary, ranked merges, added (special) tokens, encode, decode.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;

use aho_corasick::{AhoCorasick, MatchKind};
use rayon::prelude::*;
use rustc_hash::FxHashMap;

use crate::cache::{MAX_CACHED_PIECE, PieceCache};
use crate::error::{BpeError, Result};
use crate::pretokenize::{PreTokenizer, Split};
use crate::spm::SentencePiece;

/// A token matched verbatim in the text before BPE runs (e.g. `<|endoftext|>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddedToken {
    /// Its id.
    pub id: u32,
    /// Its text.
    pub content: String,
    /// Special tokens (control tokens) are only recognized with [`SpecialTokens::Parse`];
    /// non-special added tokens are always recognized, as in HF `tokenizers`.
    pub special: bool,
}

/// Whether special-token text in the input becomes the special token or is encoded as plain text.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SpecialTokens {
    /// Encode `<|endoftext|>` and friends as ordinary text (safe for untrusted input).
    #[default]
    AsText,
    /// Turn special-token text into the special token's id.
    Parse,
}

/// Token ids with the byte range of the input each one covers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Encoding {
    /// The token ids.
    pub ids: Vec<u32>,
    /// `offsets[i]` is the half-open byte range of the input that `ids[i]` stands for.
    pub offsets: Vec<(usize, usize)>,
}

#[derive(Clone, Copy)]
struct Merge {
    rank: u32,
    result: u32,
}

const NO_RANK: u32 = u32::MAX;
/// Marks a byte with no single-byte token.
const NO_TOKEN: u32 = u32::MAX;

/// Everything a tokenizer is made of, as read from a file or produced by training.
#[derive(Clone, Debug)]
pub struct TokenizerParts {
    /// The BPE vocabulary: each token's bytes and id.
    pub vocab: Vec<(Vec<u8>, u32)>,
    /// Merge rules in priority order: the two tokens' bytes.
    pub merges: Vec<(Vec<u8>, Vec<u8>)>,
    /// Tokens matched verbatim before BPE.
    pub added: Vec<AddedToken>,
    /// How text is split before BPE.
    pub pre_tokenizer: PreTokenizer,
    /// Emit a piece that is itself a vocabulary entry directly, skipping merges (HF `ignore_merges`).
    pub ignore_merges: bool,
    /// Beginning-of-sequence token, if the format names one.
    pub bos_id: Option<u32>,
    /// End-of-sequence / end-of-text token, if the format names one.
    pub eos_id: Option<u32>,
}

/// A tokenizer: byte-level BPE, or a SentencePiece-style vocabulary read from a GGUF file. Cheap
/// to share across threads (`&Tokenizer` is `Sync`).
pub struct Tokenizer {
    /// Bytes of every id (BPE tokens and added tokens); `None` for ids the files leave unused.
    tokens: Vec<Option<Box<[u8]>>>,
    bpe_ids: FxHashMap<Box<[u8]>, u32>,
    byte_ids: [u32; 256],
    has_missing_bytes: bool,
    merges: FxHashMap<u64, Merge>,
    parts: TokenizerParts,
    /// Matches every added token.
    all_added: Option<AhoCorasick>,
    /// Matches only the non-special added tokens.
    plain_added: Option<AhoCorasick>,
    cache: PieceCache,
    /// The SentencePiece-style model, when the vocabulary is not byte-level BPE.
    spm: Option<Arc<SentencePiece>>,
}

impl Clone for Tokenizer {
    fn clone(&self) -> Self {
        Self {
            tokens: self.tokens.clone(),
            bpe_ids: self.bpe_ids.clone(),
            byte_ids: self.byte_ids,
            has_missing_bytes: self.has_missing_bytes,
            merges: self.merges.clone(),
            parts: self.parts.clone(),
            all_added: self.all_added.clone(),
            plain_added: self.plain_added.clone(),
            cache: PieceCache::new(),
            spm: self.spm.clone(),
        }
    }
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("merges", &self.parts.merges.len())
            .field("added", &self.parts.added)
            .field("pre_tokenizer", &self.parts.pre_tokenizer)
            .finish()
    }
}

fn pair_key(a: u32, b: u32) -> u64 {
    (u64::from(a) << 32) | u64::from(b)
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

impl Tokenizer {
    /// Builds a tokenizer, checking that the vocabulary covers all 256 bytes, that ids and token
    /// bytes are unique, and that every merge joins two known tokens into a known token.
    pub fn from_parts(parts: TokenizerParts) -> Result<Self> {
        let max_id = parts
            .vocab
            .iter()
            .map(|(_, id)| *id)
            .chain(parts.added.iter().map(|t| t.id))
            .max()
            .map_or(0, |m| m as usize + 1);
        let mut tokens: Vec<Option<Box<[u8]>>> = vec![None; max_id];
        let mut bpe_ids = FxHashMap::default();
        bpe_ids.reserve(parts.vocab.len());
        for (bytes, id) in &parts.vocab {
            let slot = &mut tokens[*id as usize];
            if slot.is_some() {
                return Err(BpeError::InvalidToken {
                    token: lossy(bytes),
                    id: *id,
                    reason: "two tokens share this id",
                });
            }
            *slot = Some(bytes.clone().into_boxed_slice());
            if bpe_ids
                .insert(bytes.clone().into_boxed_slice(), *id)
                .is_some()
            {
                return Err(BpeError::InvalidToken {
                    token: lossy(bytes),
                    id: *id,
                    reason: "the same bytes appear under two ids",
                });
            }
        }
        // A vocabulary may lack some single bytes (SmolLM2's lacks the ones UTF-8 text never
        // contains); like HF `tokenizers` and llama.cpp, encoding then drops those bytes.
        let mut byte_ids = [NO_TOKEN; 256];
        for b in 0..=255u8 {
            if let Some(&id) = bpe_ids.get(&[b][..]) {
                byte_ids[usize::from(b)] = id;
            }
        }
        let has_missing_bytes = byte_ids.contains(&NO_TOKEN);
        let mut merges = FxHashMap::default();
        merges.reserve(parts.merges.len());
        for (rank, (left, right)) in parts.merges.iter().enumerate() {
            let bad = |reason| BpeError::BadMerge {
                index: rank,
                merge: format!("{} {}", lossy(left), lossy(right)),
                reason,
            };
            let a = *bpe_ids
                .get(left.as_slice())
                .ok_or_else(|| bad("left token is not in the vocabulary"))?;
            let b = *bpe_ids
                .get(right.as_slice())
                .ok_or_else(|| bad("right token is not in the vocabulary"))?;
            let joined = [left.as_slice(), right.as_slice()].concat();
            let result = *bpe_ids
                .get(joined.as_slice())
                .ok_or_else(|| bad("merged token is not in the vocabulary"))?;
            merges.entry(pair_key(a, b)).or_insert(Merge {
                rank: rank as u32,
                result,
            });
        }
        for t in &parts.added {
            if t.content.is_empty() {
                return Err(BpeError::InvalidToken {
                    token: String::new(),
                    id: t.id,
                    reason: "added tokens cannot be empty",
                });
            }
            tokens[t.id as usize] = Some(t.content.as_bytes().into());
        }
        for id in [parts.bos_id, parts.eos_id].into_iter().flatten() {
            if tokens.get(id as usize).is_none_or(Option::is_none) {
                return Err(BpeError::IdOutOfRange {
                    id: u64::from(id),
                    vocab_size: tokens.len(),
                });
            }
        }
        Ok(Self {
            all_added: added_matcher(&parts.added, true)?,
            plain_added: added_matcher(&parts.added, false)?,
            tokens,
            bpe_ids,
            byte_ids,
            has_missing_bytes,
            merges,
            parts,
            cache: PieceCache::new(),
            spm: None,
        })
    }

    /// Builds a tokenizer around a SentencePiece-style model; `pieces[id]` is what `id` decodes to.
    pub(crate) fn from_sentencepiece(
        model: SentencePiece,
        pieces: Vec<Vec<u8>>,
        added: Vec<AddedToken>,
        bos_id: Option<u32>,
        eos_id: Option<u32>,
    ) -> Result<Self> {
        let parts = TokenizerParts {
            vocab: Vec::new(),
            merges: Vec::new(),
            added,
            pre_tokenizer: PreTokenizer::with_split(Split::None),
            ignore_merges: false,
            bos_id,
            eos_id,
        };
        let tokens = pieces
            .into_iter()
            .map(|p| Some(p.into_boxed_slice()))
            .collect();
        Ok(Self {
            all_added: added_matcher(&parts.added, true)?,
            plain_added: added_matcher(&parts.added, false)?,
            tokens,
            bpe_ids: FxHashMap::default(),
            byte_ids: [NO_TOKEN; 256],
            has_missing_bytes: false,
            merges: FxHashMap::default(),
            parts,
            cache: PieceCache::new(),
            spm: Some(Arc::new(model)),
        })
    }

    /// Adds ids that decode to the given bytes but that encoding never produces (vocabulary
    /// entries no merge or pre-tokenized word can reach).
    pub(crate) fn with_decode_only(mut self, tokens: Vec<(u32, Vec<u8>)>) -> Self {
        for (id, bytes) in tokens {
            let id = id as usize;
            if self.tokens.len() <= id {
                self.tokens.resize(id + 1, None);
            }
            self.tokens[id].get_or_insert_with(|| bytes.into_boxed_slice());
        }
        self
    }

    /// Whether this is a SentencePiece-style vocabulary (tokens with `▁`, byte fallback) rather
    /// than byte-level BPE.
    pub fn is_sentencepiece(&self) -> bool {
        self.spm.is_some()
    }

    /// The parts this tokenizer was built from (vocabulary, merges, added tokens, pre-tokenizer);
    /// for a SentencePiece-style vocabulary only the added tokens and special ids.
    pub fn parts(&self) -> &TokenizerParts {
        &self.parts
    }

    /// Number of ids (one past the largest id).
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The pre-tokenizer.
    pub fn pre_tokenizer(&self) -> &PreTokenizer {
        &self.parts.pre_tokenizer
    }

    /// The added tokens, special ones included.
    pub fn added_tokens(&self) -> &[AddedToken] {
        &self.parts.added
    }

    /// The bytes a token id stands for.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.tokens.get(id as usize)?.as_deref()
    }

    /// The id of a BPE token given its bytes, or of an added token given its text.
    pub fn token_id(&self, bytes: &[u8]) -> Option<u32> {
        self.parts
            .added
            .iter()
            .find(|t| t.content.as_bytes() == bytes)
            .map(|t| t.id)
            .or_else(|| match &self.spm {
                Some(spm) => spm.id_of(&crate::spm::escape(bytes)),
                None => self.bpe_ids.get(bytes).copied(),
            })
    }

    /// Beginning-of-sequence id, if the tokenizer defines one.
    pub fn bos_id(&self) -> Option<u32> {
        self.parts.bos_id
    }

    /// End-of-sequence id as the format names it (for chat models often `<|im_end|>`).
    pub fn eos_id(&self) -> Option<u32> {
        self.parts.eos_id
    }

    /// The document separator for token shards: the `<|endoftext|>` special token if there is one,
    /// else the format's end-of-sequence token.
    pub fn eot_id(&self) -> Option<u32> {
        self.parts
            .added
            .iter()
            .find(|t| t.content == "<|endoftext|>")
            .map(|t| t.id)
            .or(self.parts.eos_id)
    }

    /// Encodes text; special-token text is encoded as plain text.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.encode_bytes(text.as_bytes(), SpecialTokens::AsText)
    }

    /// Encodes text, turning special-token text (e.g. `<|endoftext|>`) into special-token ids.
    pub fn encode_with_special(&self, text: &str) -> Vec<u32> {
        self.encode_bytes(text.as_bytes(), SpecialTokens::Parse)
    }

    /// Encodes any bytes (invalid UTF-8 included): `decode_bytes(encode_bytes(b)) == b` whenever the
    /// vocabulary has all 256 byte tokens (see [`Tokenizer::unencodable_bytes`]).
    pub fn encode_bytes(&self, bytes: &[u8], specials: SpecialTokens) -> Vec<u32> {
        let mut ids = Vec::with_capacity(bytes.len() / 3 + 1);
        self.encode_into(bytes, specials, &mut ids, None);
        ids
    }

    /// Encodes and reports, for each token, the byte range of the input it covers.
    pub fn encode_with_offsets(&self, bytes: &[u8], specials: SpecialTokens) -> Encoding {
        let mut enc = Encoding::default();
        self.encode_into(bytes, specials, &mut enc.ids, Some(&mut enc.offsets));
        enc
    }

    /// Encodes many texts in parallel (rayon's thread pool); the output order matches the input.
    pub fn encode_batch<S: AsRef<str> + Sync>(
        &self,
        texts: &[S],
        specials: SpecialTokens,
    ) -> Vec<Vec<u32>> {
        texts
            .par_iter()
            .map(|t| self.encode_bytes(t.as_ref().as_bytes(), specials))
            .collect()
    }

    /// Appends the ids of `bytes` to `ids` (and their byte ranges to `offsets`).
    pub fn encode_into(
        &self,
        bytes: &[u8],
        specials: SpecialTokens,
        ids: &mut Vec<u32>,
        mut offsets: Option<&mut Vec<(usize, usize)>>,
    ) {
        let matcher = match specials {
            SpecialTokens::Parse => self.all_added.as_ref(),
            SpecialTokens::AsText => self.plain_added.as_ref(),
        };
        let Some(matcher) = matcher else {
            self.encode_ordinary(bytes, 0, ids, offsets);
            return;
        };
        let mut last = 0;
        for m in matcher.find_iter(bytes) {
            self.encode_ordinary(&bytes[last..m.start()], last, ids, offsets.as_deref_mut());
            let token = &self.parts.added[self.added_index(m.pattern().as_usize(), specials)];
            ids.push(token.id);
            if let Some(o) = offsets.as_deref_mut() {
                o.push((m.start(), m.end()));
            }
            last = m.end();
        }
        self.encode_ordinary(&bytes[last..], last, ids, offsets);
    }

    /// Maps a matcher pattern index back to the added token it came from.
    fn added_index(&self, pattern: usize, specials: SpecialTokens) -> usize {
        match specials {
            SpecialTokens::Parse => pattern,
            SpecialTokens::AsText => self
                .parts
                .added
                .iter()
                .enumerate()
                .filter(|(_, t)| !t.special)
                .nth(pattern)
                .map_or(0, |(i, _)| i),
        }
    }

    /// Encodes text containing no added tokens; `base` is its offset in the caller's input.
    fn encode_ordinary(
        &self,
        bytes: &[u8],
        base: usize,
        ids: &mut Vec<u32>,
        offsets: Option<&mut Vec<(usize, usize)>>,
    ) {
        if bytes.is_empty() {
            return;
        }
        if let Some(spm) = &self.spm {
            let first = ids.len();
            spm.encode(bytes, ids);
            if let Some(offsets) = offsets {
                // Each token covers as many input bytes as it decodes to (the added space first).
                let mut pos = 0usize;
                let shift = usize::from(spm.add_space_prefix);
                for &id in &ids[first..] {
                    let len = self.token_bytes(id).map_or(0, <[u8]>::len);
                    let map = |p: usize| base + p.saturating_sub(shift).min(bytes.len());
                    offsets.push((map(pos), map(pos + len)));
                    pos += len;
                }
            }
            return;
        }
        let pre = &self.parts.pre_tokenizer;
        let prefixed;
        let (text, shift) = if pre.add_prefix_space && bytes[0] != b' ' {
            prefixed = [b" ", bytes].concat();
            (prefixed.as_slice(), 1)
        } else {
            (bytes, 0)
        };
        let mut ends = Vec::with_capacity(text.len() / 4 + 1);
        pre.split_into(text, &mut ends);
        let mut start = 0;
        match offsets {
            None => {
                for &end in &ends {
                    self.bpe_piece(&text[start..end], ids);
                    start = end;
                }
            }
            Some(offsets) => {
                for &end in &ends {
                    let first = ids.len();
                    self.bpe_piece(&text[start..end], ids);
                    self.piece_offsets(&text[start..end], &ids[first..], |s, e| {
                        let map = |p: usize| base + (start + p).saturating_sub(shift);
                        offsets.push((map(s), map(e)));
                    });
                    start = end;
                }
            }
        }
    }

    /// Reports the byte range of `piece` each of its tokens covers (skipping dropped bytes).
    fn piece_offsets(&self, piece: &[u8], ids: &[u32], mut push: impl FnMut(usize, usize)) {
        let mut pos = 0;
        for &id in ids {
            let len = self.tokens[id as usize].as_deref().map_or(0, <[u8]>::len);
            if !self.has_missing_bytes {
                push(pos, pos + len);
                pos += len;
                continue;
            }
            while pos < piece.len() && self.byte_ids[usize::from(piece[pos])] == NO_TOKEN {
                pos += 1;
            }
            let s = pos;
            let mut need = len;
            while need > 0 && pos < piece.len() {
                if self.byte_ids[usize::from(piece[pos])] != NO_TOKEN {
                    need -= 1;
                }
                pos += 1;
            }
            push(s, pos);
        }
    }

    /// Bytes this vocabulary has no token for (dropped when encoding); empty for a complete
    /// byte-level vocabulary, which then round-trips any input exactly.
    pub fn unencodable_bytes(&self) -> Vec<u8> {
        if let Some(spm) = &self.spm {
            return (0..=255u8).filter(|&b| !spm.has_byte_token(b)).collect();
        }
        (0..=255u8)
            .filter(|&b| self.byte_ids[usize::from(b)] == NO_TOKEN)
            .collect()
    }

    /// BPE on one piece, through the cache.
    fn bpe_piece(&self, piece: &[u8], out: &mut Vec<u32>) {
        if self.parts.ignore_merges
            && let Some(&id) = self.bpe_ids.get(piece)
        {
            out.push(id);
            return;
        }
        if self.has_missing_bytes
            && piece
                .iter()
                .any(|&b| self.byte_ids[usize::from(b)] == NO_TOKEN)
        {
            let kept: Vec<u8> = piece
                .iter()
                .copied()
                .filter(|&b| self.byte_ids[usize::from(b)] != NO_TOKEN)
                .collect();
            if !kept.is_empty() {
                self.bpe_piece(&kept, out);
            }
            return;
        }
        if let [b] = piece {
            out.push(self.byte_ids[usize::from(*b)]);
            return;
        }
        let cacheable = piece.len() <= MAX_CACHED_PIECE;
        if cacheable && self.cache.get_into(piece, out) {
            return;
        }
        let start = out.len();
        if piece.len() <= 128 {
            self.merge_small(piece, out);
        } else {
            self.merge_large(piece, out);
        }
        if cacheable {
            self.cache.insert(piece, &out[start..]);
        }
    }

    #[inline]
    fn merge_of(&self, a: u32, b: u32) -> Merge {
        self.merges.get(&pair_key(a, b)).copied().unwrap_or(Merge {
            rank: NO_RANK,
            result: 0,
        })
    }

    /// Quadratic merge loop: lowest rank first, leftmost on ties. Fastest for short pieces.
    fn merge_small(&self, piece: &[u8], out: &mut Vec<u32>) {
        let mut symbols: Vec<u32> = piece
            .iter()
            .map(|&b| self.byte_ids[usize::from(b)])
            .collect();
        let mut pairs: Vec<Merge> = symbols
            .windows(2)
            .map(|w| self.merge_of(w[0], w[1]))
            .collect();
        loop {
            let mut best = NO_RANK;
            let mut at = 0;
            for (i, m) in pairs.iter().enumerate() {
                if m.rank < best {
                    best = m.rank;
                    at = i;
                }
            }
            if best == NO_RANK {
                break;
            }
            symbols[at] = pairs[at].result;
            symbols.remove(at + 1);
            pairs.remove(at);
            if at < pairs.len() {
                pairs[at] = self.merge_of(symbols[at], symbols[at + 1]);
            }
            if at > 0 {
                pairs[at - 1] = self.merge_of(symbols[at - 1], symbols[at]);
            }
        }
        out.extend_from_slice(&symbols);
    }

    /// Heap-driven merge over a linked list: O(n log n), for long pieces (runs of spaces, no split).
    fn merge_large(&self, piece: &[u8], out: &mut Vec<u32>) {
        const NONE: u32 = u32::MAX;
        let n = piece.len();
        let mut id: Vec<u32> = piece
            .iter()
            .map(|&b| self.byte_ids[usize::from(b)])
            .collect();
        let mut next: Vec<u32> = (1..=n as u32).collect();
        next[n - 1] = NONE;
        let mut prev: Vec<u32> = (0..n as u32).map(|i| i.wrapping_sub(1)).collect();
        prev[0] = NONE;
        let mut alive = vec![true; n];
        let mut heap = BinaryHeap::with_capacity(n);
        for i in 0..n - 1 {
            let m = self.merge_of(id[i], id[i + 1]);
            if m.rank != NO_RANK {
                heap.push(Reverse((m.rank, i as u32)));
            }
        }
        while let Some(Reverse((rank, pos))) = heap.pop() {
            let p = pos as usize;
            if !alive[p] || next[p] == NONE {
                continue;
            }
            let q = next[p] as usize;
            let m = self.merge_of(id[p], id[q]);
            if m.rank != rank {
                continue;
            }
            id[p] = m.result;
            alive[q] = false;
            next[p] = next[q];
            if next[q] != NONE {
                prev[next[q] as usize] = pos;
            }
            if prev[p] != NONE {
                let l = prev[p] as usize;
                let m = self.merge_of(id[l], id[p]);
                if m.rank != NO_RANK {
                    heap.push(Reverse((m.rank, l as u32)));
                }
            }
            if next[p] != NONE {
                let m = self.merge_of(id[p], id[next[p] as usize]);
                if m.rank != NO_RANK {
                    heap.push(Reverse((m.rank, pos)));
                }
            }
        }
        let mut i = 0u32;
        while i != NONE {
            out.push(id[i as usize]);
            i = next[i as usize];
        }
    }

    /// The exact bytes the ids stand for (special tokens as their text).
    /// A SentencePiece vocabulary that adds a space before the text drops the first token's
    /// leading space again, as llama.cpp's detokenizer does.
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for (i, &id) in ids.iter().enumerate() {
            out.extend_from_slice(self.piece(id, i == 0)?);
        }
        Ok(out)
    }

    /// The bytes of `id` in decoded text; `first` when it is the first token of the text.
    fn piece(&self, id: u32, first: bool) -> Result<&[u8]> {
        let bytes = self.token_bytes(id).ok_or(BpeError::IdOutOfRange {
            id: u64::from(id),
            vocab_size: self.vocab_size(),
        })?;
        let strip = first && self.spm.as_ref().is_some_and(|s| s.add_space_prefix);
        Ok(match bytes {
            [b' ', rest @ ..] if strip => rest,
            _ => bytes,
        })
    }

    /// Decodes to a string; byte sequences that are not valid UTF-8 become U+FFFD, as in HF `tokenizers`.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        Ok(lossy(&self.decode_bytes(ids)?))
    }
}

/// Turns a stream of token ids into UTF-8-safe text pieces: bytes of a character split across
/// tokens are held back until the character is complete.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
    started: bool,
}

impl StreamDecoder {
    /// A decoder with nothing pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one token; returns the text that is now complete (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        self.pending
            .extend_from_slice(tokenizer.piece(id, !self.started)?);
        self.started = true;
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            // An incomplete character at the end waits; an invalid sequence is flushed lossily.
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => self.pending.len(),
        };
        let text = lossy(&self.pending[..valid]);
        self.pending.drain(..valid);
        Ok(text)
    }

    /// Whatever is still pending, lossily (call at the end of the stream).
    pub fn finish(&mut self) -> String {
        let text = lossy(&self.pending);
        self.pending.clear();
        text
    }
}

/// An Aho-Corasick matcher over the added tokens (only the non-special ones unless `special_too`).
fn added_matcher(added: &[AddedToken], special_too: bool) -> Result<Option<AhoCorasick>> {
    let patterns: Vec<&str> = added
        .iter()
        .filter(|t| special_too || !t.special)
        .map(|t| t.content.as_str())
        .collect();
    if patterns.is_empty() {
        return Ok(None);
    }
    AhoCorasick::builder()
        .match_kind(MatchKind::LeftmostLongest)
        .build(patterns)
        .map(Some)
        .map_err(|e| BpeError::Unsupported(format!("added tokens: {e}")))
}
