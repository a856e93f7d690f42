//! Training a byte-level BPE vocabulary: count pre-tokenized words, then merge the most frequent
//! adjacent pair again and again, updating pair counts incrementally.

use std::collections::BinaryHeap;
use std::path::PathBuf;

use aho_corasick::AhoCorasick;
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use rustc_hash::{FxHashMap, FxHashSet};

use crate::byte_level;
use crate::corpus::{ChunkReader, DEFAULT_CHUNK_BYTES, total_bytes};
use crate::error::{BpeError, Result};
use crate::pretokenize::PreTokenizer;
use crate::tokenizer::{AddedToken, Tokenizer, TokenizerParts};

/// Settings for [`BpeTrainer`].
#[derive(Clone, Debug)]
pub struct TrainerConfig {
    /// Final vocabulary size: special tokens + 256 bytes + merges.
    pub vocab_size: usize,
    /// A pair must occur at least this often to be merged.
    pub min_frequency: u64,
    /// Special tokens, given the first ids in order; their text is never merged into other tokens.
    pub special_tokens: Vec<String>,
    /// How text is split into words before counting.
    pub pre_tokenizer: PreTokenizer,
    /// Draw progress bars on stderr.
    pub show_progress: bool,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        Self {
            vocab_size: 8192,
            min_frequency: 2,
            special_tokens: vec!["<|endoftext|>".to_owned()],
            pre_tokenizer: PreTokenizer::gpt2(),
            show_progress: false,
        }
    }
}

/// Byte-level BPE trainer. Word counting streams the corpus in parallel with bounded memory;
/// the merge loop keeps pair counts and a lazy max-heap, touching only words that contain the pair.
#[derive(Debug)]
pub struct BpeTrainer {
    config: TrainerConfig,
    specials: Option<AhoCorasick>,
    words: FxHashMap<Box<[u8]>, u64>,
}

impl BpeTrainer {
    /// A trainer with the given settings; checks that the vocabulary can hold bytes and specials.
    pub fn new(config: TrainerConfig) -> Result<Self> {
        let minimum = 256 + config.special_tokens.len();
        if config.vocab_size < minimum {
            return Err(BpeError::VocabTooSmall {
                requested: config.vocab_size,
                minimum,
            });
        }
        if config.special_tokens.iter().any(String::is_empty) {
            return Err(BpeError::InvalidArgument(
                "special tokens cannot be empty".into(),
            ));
        }
        let specials = if config.special_tokens.is_empty() {
            None
        } else {
            Some(
                AhoCorasick::builder()
                    .match_kind(aho_corasick::MatchKind::LeftmostLongest)
                    .build(&config.special_tokens)
                    .map_err(|e| BpeError::InvalidArgument(format!("special tokens: {e}")))?,
            )
        };
        Ok(Self {
            config,
            specials,
            words: FxHashMap::default(),
        })
    }

    /// Counts the words of one text (call as often as needed before [`BpeTrainer::finish`]).
    pub fn feed(&mut self, text: &[u8]) {
        let counts = self.count(text);
        merge_counts(&mut self.words, counts);
    }

    /// Counts the words of many texts in parallel.
    pub fn feed_batch<S: AsRef<[u8]> + Sync>(&mut self, texts: &[S]) {
        let counts = texts.par_iter().map(|t| self.count(t.as_ref())).reduce(
            FxHashMap::default,
            |mut a, b| {
                merge_counts(&mut a, b);
                a
            },
        );
        merge_counts(&mut self.words, counts);
    }

    /// Streams files through the word counter, a few chunks at a time.
    pub fn feed_files(&mut self, files: &[PathBuf]) -> Result<()> {
        let total = total_bytes(files)?;
        let bar = progress(self.config.show_progress, total, "counting words");
        let mut reader = ChunkReader::new(files.to_vec(), DEFAULT_CHUNK_BYTES);
        let group = 2 * rayon::current_num_threads().max(1);
        loop {
            let mut chunks = Vec::with_capacity(group);
            while chunks.len() < group {
                match reader.next_chunk()? {
                    Some(c) => chunks.push(c.bytes),
                    None => break,
                }
            }
            if chunks.is_empty() {
                break;
            }
            bar.inc(chunks.iter().map(|c| c.len() as u64).sum());
            self.feed_batch(&chunks);
        }
        bar.finish_and_clear();
        Ok(())
    }

    /// Number of distinct words counted so far.
    pub fn distinct_words(&self) -> usize {
        self.words.len()
    }

    fn count(&self, text: &[u8]) -> FxHashMap<Box<[u8]>, u64> {
        let mut counts: FxHashMap<Box<[u8]>, u64> = FxHashMap::default();
        let mut ends = Vec::new();
        let mut count_segment = |segment: &[u8]| {
            ends.clear();
            self.config.pre_tokenizer.split_into(segment, &mut ends);
            let mut start = 0;
            for &end in &ends {
                let word = &segment[start..end];
                start = end;
                if let Some(c) = counts.get_mut(word) {
                    *c += 1;
                } else {
                    counts.insert(word.into(), 1);
                }
            }
        };
        match &self.specials {
            None => count_segment(text),
            Some(ac) => {
                let mut last = 0;
                for m in ac.find_iter(text) {
                    count_segment(&text[last..m.start()]);
                    last = m.end();
                }
                count_segment(&text[last..]);
            }
        }
        counts
    }

    /// Runs the merges and builds the tokenizer. Ids: special tokens first, then the 256 bytes
    /// (in GPT-2's order), then one id per new token in merge order.
    pub fn finish(self) -> Result<Tokenizer> {
        if self.words.is_empty() {
            return Err(BpeError::EmptyCorpus);
        }
        let cfg = &self.config;
        let added: Vec<AddedToken> = cfg
            .special_tokens
            .iter()
            .enumerate()
            .map(|(i, s)| AddedToken {
                id: i as u32,
                content: s.clone(),
                special: true,
            })
            .collect();
        let first_byte_id = added.len() as u32;
        let mut byte_id = [0u32; 256];
        let mut vocab: Vec<Vec<u8>> = Vec::with_capacity(cfg.vocab_size);
        for (i, b) in byte_level::gpt2_byte_order().enumerate() {
            byte_id[usize::from(b)] = i as u32;
            vocab.push(vec![b]);
        }

        let mut words: Vec<Vec<u32>> = Vec::with_capacity(self.words.len());
        let mut counts: Vec<u64> = Vec::with_capacity(self.words.len());
        for (word, count) in self.words {
            if word.len() > 1 {
                words.push(word.iter().map(|&b| byte_id[usize::from(b)]).collect());
                counts.push(count);
            }
        }
        let merges = merge_loop(&mut vocab, &mut words, &counts, cfg);

        let parts = TokenizerParts {
            vocab: vocab
                .into_iter()
                .enumerate()
                .map(|(i, bytes)| (bytes, first_byte_id + i as u32))
                .collect(),
            merges,
            eos_id: added
                .iter()
                .find(|t| t.content == "<|endoftext|>")
                .map(|t| t.id),
            added,
            pre_tokenizer: cfg.pre_tokenizer.clone(),
            ignore_merges: false,
            bos_id: None,
        };
        Tokenizer::from_parts(parts)
    }
}

fn merge_counts(into: &mut FxHashMap<Box<[u8]>, u64>, from: FxHashMap<Box<[u8]>, u64>) {
    if into.is_empty() {
        *into = from;
        return;
    }
    for (word, c) in from {
        *into.entry(word).or_insert(0) += c;
    }
}

fn progress(show: bool, len: u64, what: &'static str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) =
        ProgressStyle::with_template("{msg:>16} [{bar:30}] {percent:>3}% {elapsed} (eta {eta})")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what);
    bar
}

type Pair = (u32, u32);

/// The merge loop over word symbol sequences (ids local to `vocab`). Returns the merges as bytes.
fn merge_loop(
    vocab: &mut Vec<Vec<u8>>,
    words: &mut [Vec<u32>],
    counts: &[u64],
    cfg: &TrainerConfig,
) -> Vec<(Vec<u8>, Vec<u8>)> {
    let target = cfg.vocab_size - cfg.special_tokens.len();
    let mut by_bytes: FxHashMap<Vec<u8>, u32> = vocab
        .iter()
        .enumerate()
        .map(|(i, b)| (b.clone(), i as u32))
        .collect();
    let mut pair_counts: FxHashMap<Pair, i64> = FxHashMap::default();
    let mut pair_words: FxHashMap<Pair, Vec<u32>> = FxHashMap::default();
    for (w, word) in words.iter().enumerate() {
        for p in word.windows(2) {
            let pair = (p[0], p[1]);
            *pair_counts.entry(pair).or_insert(0) += counts[w] as i64;
            pair_words.entry(pair).or_default().push(w as u32);
        }
    }
    // Max-heap on (count, smallest pair first); entries go stale and are re-checked on pop.
    let mut heap: BinaryHeap<(i64, std::cmp::Reverse<Pair>)> = pair_counts
        .iter()
        .map(|(&p, &c)| (c, std::cmp::Reverse(p)))
        .collect();
    let bar = progress(
        cfg.show_progress,
        (target.saturating_sub(vocab.len())) as u64,
        "merging",
    );
    let mut merges = Vec::new();
    let mut seen_at: Vec<u32> = vec![u32::MAX; words.len()];
    let mut touched: FxHashSet<Pair> = FxHashSet::default();

    while vocab.len() < target {
        let Some((count, std::cmp::Reverse(pair))) = heap.pop() else {
            break;
        };
        let current = pair_counts.get(&pair).copied().unwrap_or(0);
        if current != count {
            if current > 0 {
                heap.push((current, std::cmp::Reverse(pair)));
            }
            continue;
        }
        if count < cfg.min_frequency.max(1) as i64 {
            break;
        }
        let (a, b) = pair;
        let joined = [vocab[a as usize].as_slice(), vocab[b as usize].as_slice()].concat();
        merges.push((vocab[a as usize].clone(), vocab[b as usize].clone()));
        let new_id = match by_bytes.get(&joined) {
            Some(&id) => id,
            None => {
                let id = vocab.len() as u32;
                by_bytes.insert(joined.clone(), id);
                vocab.push(joined);
                bar.inc(1);
                id
            }
        };
        let merge_index = merges.len() as u32;
        touched.clear();
        let occurrences = pair_words.remove(&pair).unwrap_or_default();
        for w in occurrences {
            if std::mem::replace(&mut seen_at[w as usize], merge_index) == merge_index {
                continue;
            }
            let c = counts[w as usize] as i64;
            let word = &mut words[w as usize];
            let mut out = Vec::with_capacity(word.len());
            let mut i = 0;
            let mut changed = false;
            while i < word.len() {
                if i + 1 < word.len() && word[i] == a && word[i + 1] == b {
                    changed = true;
                    if let Some(&prev) = out.last() {
                        bump(&mut pair_counts, &mut touched, (prev, a), -c);
                        bump(&mut pair_counts, &mut touched, (prev, new_id), c);
                        pair_words.entry((prev, new_id)).or_default().push(w);
                    }
                    if let Some(&next) = word.get(i + 2) {
                        // If `next` starts another occurrence, that occurrence's `prev` update
                        // cancels the (new_id, next) count added here.
                        bump(&mut pair_counts, &mut touched, (b, next), -c);
                        bump(&mut pair_counts, &mut touched, (new_id, next), c);
                        pair_words.entry((new_id, next)).or_default().push(w);
                    }
                    out.push(new_id);
                    i += 2;
                } else {
                    out.push(word[i]);
                    i += 1;
                }
            }
            if changed {
                *word = out;
            }
        }
        pair_counts.remove(&pair);
        for p in touched.drain() {
            if let Some(&c) = pair_counts.get(&p)
                && c > 0
            {
                heap.push((c, std::cmp::Reverse(p)));
            }
        }
    }
    bar.finish_and_clear();
    merges
}

fn bump(counts: &mut FxHashMap<Pair, i64>, touched: &mut FxHashSet<Pair>, pair: Pair, delta: i64) {
    *counts.entry(pair).or_insert(0) += delta;
    touched.insert(pair);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_frequent_pair_merges_first() {
        let cfg = TrainerConfig {
            vocab_size: 256 + 1 + 3,
            min_frequency: 1,
            ..TrainerConfig::default()
        };
        let mut t = BpeTrainer::new(cfg).unwrap();
        t.feed(b"aaab aaab aaab abab cd");
        let tok = t.finish().unwrap();
        let merges = &tok.parts().merges;
        assert_eq!(merges.len(), 3);
        // " a" occurs 4 times, "aa" 6 times (words "aaab" ×3 → 2 each).
        assert_eq!(merges[0], (b"a".to_vec(), b"a".to_vec()));
        let ids = tok.encode(" aaab");
        assert_eq!(tok.decode(&ids).unwrap(), " aaab");
    }

    #[test]
    fn pair_counts_stay_exact_through_overlaps() {
        // "aaaa" exercises the overlapping-merge bookkeeping: after (a,a) the word is [aa, aa].
        let cfg = TrainerConfig {
            vocab_size: 256 + 1 + 2,
            min_frequency: 1,
            pre_tokenizer: PreTokenizer::with_split(crate::Split::None),
            ..TrainerConfig::default()
        };
        let mut t = BpeTrainer::new(cfg).unwrap();
        t.feed(b"aaaa");
        let tok = t.finish().unwrap();
        let merges = &tok.parts().merges;
        assert_eq!(merges[1], (b"aa".to_vec(), b"aa".to_vec()));
        assert_eq!(tok.encode("aaaa").len(), 1);
    }

    #[test]
    fn errors() {
        let small = TrainerConfig {
            vocab_size: 100,
            ..TrainerConfig::default()
        };
        assert!(matches!(
            BpeTrainer::new(small),
            Err(BpeError::VocabTooSmall { minimum: 257, .. })
        ));
        let t = BpeTrainer::new(TrainerConfig::default()).unwrap();
        assert!(matches!(t.finish(), Err(BpeError::EmptyCorpus)));
    }
}
