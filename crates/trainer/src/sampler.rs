//! Training and validation windows from a token shard, split between data-parallel ranks.
//!
//! [`BatchSampler::batch`] draws `(batch, seq_len + 1)` random windows as a pure function of
//! `(seed, index, row)`; [`BatchSampler::sequential_windows`] walks the shard in order for
//! evaluation. Both take a [`DataRank`], and both keep one contract:
//!
//! **Rank `r` of `N` with micro-batch `b` reads exactly rows `r·b .. (r+1)·b` of the batch that a
//! single process with micro-batch `N·b` reads at the same index.** The ranks' batches are
//! disjoint, and their union (in rank order) is the single process's batch, so a data-parallel run
//! sees the same data as the single-process run at `N·b`.

use std::borrow::Borrow;
use std::ops::Range;
use std::path::PathBuf;

use kiln_bpe::{ShardError, TokenShard};

/// Errors from setting up or reading a sampler.
#[derive(Debug, thiserror::Error)]
pub enum SamplerError {
    /// A window does not fit in the shard.
    #[error(
        "token shard {}: window of {window} tokens does not fit in a shard of {tokens} tokens",
        path.display()
    )]
    WindowTooLong {
        /// Tokens per window (`seq_len + 1`).
        window: usize,
        /// Tokens in the shard.
        tokens: usize,
        /// The shard's file.
        path: PathBuf,
    },
    /// A batch would hold no tokens (`batch_size` or `seq_len` is zero).
    #[error("empty batch: batch_size {batch_size} and seq_len {seq_len} must both be non-zero")]
    EmptyBatch {
        /// Rows per batch.
        batch_size: usize,
        /// Tokens per row, not counting the extra target token.
        seq_len: usize,
    },
    /// The batch of all ranks together overflows `usize`.
    #[error(
        "batch of {batch_size} rows of {window} tokens on each of {world_size} ranks is too large"
    )]
    BatchTooLarge {
        /// Rows per batch and rank.
        batch_size: usize,
        /// Tokens per row (`seq_len + 1`).
        window: usize,
        /// Number of ranks.
        world_size: usize,
    },
    /// A rank outside `0..world_size`, or no ranks at all.
    #[error("rank {rank} of {world_size}: need world_size >= 1 and rank < world_size")]
    BadRank {
        /// The rank.
        rank: usize,
        /// The number of ranks.
        world_size: usize,
    },
    /// Reading the shard failed.
    #[error(transparent)]
    Shard(#[from] ShardError),
}

/// Which share of the data this process reads: rank `rank` of `world_size` data-parallel ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DataRank {
    rank: usize,
    world_size: usize,
}

impl DataRank {
    /// Rank `rank` of `world_size`; fails with [`SamplerError::BadRank`] unless
    /// `rank < world_size`.
    pub fn new(rank: usize, world_size: usize) -> Result<Self, SamplerError> {
        if rank >= world_size {
            return Err(SamplerError::BadRank { rank, world_size });
        }
        Ok(Self { rank, world_size })
    }

    /// The only rank of a single process (rank 0 of 1).
    pub fn single() -> Self {
        Self {
            rank: 0,
            world_size: 1,
        }
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// This rank's rows of a global batch of `world_size · batch_size` rows.
    pub fn rows(&self, batch_size: usize) -> Range<usize> {
        self.rank * batch_size..(self.rank + 1) * batch_size
    }
}

impl Default for DataRank {
    fn default() -> Self {
        Self::single()
    }
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function: a bijective 64-bit mixer.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Counter-based hash of `(seed, step, row)`.
fn counter_hash(seed: u64, step: u64, row: u64) -> u64 {
    let k = mix64(seed.wrapping_add(GOLDEN));
    let k = mix64(k ^ step.wrapping_mul(GOLDEN).wrapping_add(GOLDEN));
    mix64(k ^ row.wrapping_add(GOLDEN))
}

/// Unbiased draw from `[0, n)` (`n > 0`) via Lemire's multiply-and-reject, re-mixing `h`
/// deterministically on the rare rejections.
fn uniform_below(mut h: u64, n: u64) -> u64 {
    let mut m = u128::from(h) * u128::from(n);
    if (m as u64) < n {
        let threshold = n.wrapping_neg() % n;
        while (m as u64) < threshold {
            h = mix64(h.wrapping_add(GOLDEN));
            m = u128::from(h) * u128::from(n);
        }
    }
    (m >> 64) as u64
}

/// Serves this rank's batches of windows of `seq_len + 1` tokens from a shard.
///
/// `S` is anything that borrows a [`TokenShard`]: `&TokenShard`, `Arc<TokenShard>`, or an owned
/// `TokenShard`.
///
/// [`batch(index)`](BatchSampler::batch) is a pure function of `(seed, index)` and the rank: the
/// start of global row `g` is drawn uniformly from `[0, len - seq_len - 1]` by a counter-based
/// SplitMix64 hash of `(seed, index, g)`, and rank `r` of `N` reads global rows
/// `r·batch_size .. (r+1)·batch_size` (see the [module docs](self)). Batches are therefore
/// identical across runs, threads and resumes, whatever order they are requested in.
///
/// Rows are `seq_len + 1` tokens: inputs are `row[..seq_len]` and targets `row[1..]`.
#[derive(Debug, Clone)]
pub struct BatchSampler<S: Borrow<TokenShard>> {
    shard: S,
    batch_size: usize,
    seq_len: usize,
    seed: u64,
    rank: DataRank,
}

impl<S: Borrow<TokenShard>> BatchSampler<S> {
    /// A sampler of `batch_size` rows (this rank's share) of `seq_len + 1` tokens. Fails with
    /// [`SamplerError::EmptyBatch`] if either is zero, with [`SamplerError::WindowTooLong`] if the
    /// shard has fewer than `seq_len + 1` tokens, and with [`SamplerError::BatchTooLarge`] if the
    /// global batch overflows.
    pub fn new(
        shard: S,
        batch_size: usize,
        seq_len: usize,
        seed: u64,
        rank: DataRank,
    ) -> Result<Self, SamplerError> {
        if batch_size == 0 || seq_len == 0 {
            return Err(SamplerError::EmptyBatch {
                batch_size,
                seq_len,
            });
        }
        let s: &TokenShard = shard.borrow();
        let window = seq_len.saturating_add(1);
        if seq_len >= s.len() {
            return Err(SamplerError::WindowTooLong {
                window,
                tokens: s.len(),
                path: s.path().to_path_buf(),
            });
        }
        let world_size = rank.world_size();
        if batch_size
            .checked_mul(window)
            .and_then(|n| n.checked_mul(world_size))
            .is_none()
        {
            return Err(SamplerError::BatchTooLarge {
                batch_size,
                window,
                world_size,
            });
        }
        Ok(BatchSampler {
            shard,
            batch_size,
            seq_len,
            seed,
            rank,
        })
    }

    /// The shard being sampled.
    pub fn shard(&self) -> &TokenShard {
        self.shard.borrow()
    }

    /// Rows per batch of this rank.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Rows per batch of all ranks together: `world_size · batch_size`.
    pub fn global_batch_size(&self) -> usize {
        self.batch_size * self.rank.world_size()
    }

    /// Tokens per input sequence (rows hold one more, the last target).
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Tokens per row: `seq_len + 1`.
    pub fn window(&self) -> usize {
        self.seq_len + 1
    }

    /// The sampler's seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The rank whose share this sampler reads.
    pub fn rank(&self) -> DataRank {
        self.rank
    }

    /// Number of distinct window starts: `len - seq_len`.
    pub fn num_starts(&self) -> usize {
        self.shard().len().saturating_sub(self.seq_len)
    }

    /// Start position of this rank's `row` in batch `index`, in `[0, len - seq_len - 1]`.
    pub fn window_start(&self, index: u64, row: usize) -> usize {
        let global_row = self.rank.rows(self.batch_size).start + row;
        let h = counter_hash(self.seed, index, global_row as u64);
        // The result is < num_starts, which is a usize.
        uniform_below(h, self.num_starts() as u64) as usize
    }

    /// Batch `index`: `batch_size · (seq_len + 1)` tokens, row-major.
    pub fn batch(&self, index: u64) -> Result<Vec<u32>, SamplerError> {
        let mut out = Vec::new();
        self.batch_into(index, &mut out)?;
        Ok(out)
    }

    /// Like [`batch`](BatchSampler::batch), reusing `out`'s allocation (`out` is resized to
    /// `batch_size · (seq_len + 1)`).
    pub fn batch_into(&self, index: u64, out: &mut Vec<u32>) -> Result<(), SamplerError> {
        let window = self.window();
        out.clear();
        out.resize(self.batch_size * window, 0);
        for (row, dst) in out.chunks_exact_mut(window).enumerate() {
            // start + window <= len by construction, so this always succeeds.
            self.shard().read_into(self.window_start(index, row), dst)?;
        }
        Ok(())
    }

    /// Number of full rows a sequential pass over the whole shard yields (all ranks together):
    /// `(len - 1) / seq_len`.
    pub fn num_sequential_rows(&self) -> usize {
        self.shard().len().saturating_sub(1) / self.seq_len
    }

    /// Number of global batches of a sequential pass (the last may be partial).
    pub fn num_sequential_batches(&self) -> usize {
        self.num_sequential_rows()
            .div_ceil(self.global_batch_size())
    }

    /// This rank's share of the batches that cover the shard in order, for evaluation over a whole
    /// split.
    ///
    /// Global row `g` is tokens `g·seq_len ..= g·seq_len + seq_len`, so rows overlap by exactly
    /// the one extra target token and every input token is seen once. Only full rows are
    /// produced: a tail of fewer than `seq_len` predictable tokens is dropped. Global batch `i` is
    /// rows `i·B .. (i+1)·B` with `B` = [`global_batch_size`](Self::global_batch_size), and this
    /// rank yields its rows of it under the module's contract. The last global batch is
    /// **included** even when partial; its rows go to the first ranks, so a later rank's
    /// iterator may end one batch early (it never yields an empty batch).
    pub fn sequential_windows(&self) -> SequentialWindows<'_> {
        SequentialWindows {
            shard: self.shard(),
            batch_size: self.batch_size,
            global_batch: self.global_batch_size(),
            first_row: self.rank.rows(self.batch_size).start,
            seq_len: self.seq_len,
            next_batch: 0,
            rows: self.num_sequential_rows(),
        }
    }
}

/// Iterator over this rank's in-order batches of a shard; see
/// [`BatchSampler::sequential_windows`].
#[derive(Debug, Clone)]
pub struct SequentialWindows<'a> {
    shard: &'a TokenShard,
    batch_size: usize,
    global_batch: usize,
    first_row: usize,
    seq_len: usize,
    next_batch: usize,
    rows: usize,
}

impl SequentialWindows<'_> {
    /// Global rows of this rank in global batch `i` (empty past the end).
    fn rows_of(&self, i: usize) -> Range<usize> {
        let start = i
            .saturating_mul(self.global_batch)
            .saturating_add(self.first_row)
            .min(self.rows);
        start..start.saturating_add(self.batch_size).min(self.rows)
    }
}

impl Iterator for SequentialWindows<'_> {
    type Item = Result<Vec<u32>, SamplerError>;

    fn next(&mut self) -> Option<Self::Item> {
        let rows = self.rows_of(self.next_batch);
        if rows.is_empty() {
            return None;
        }
        self.next_batch += 1;
        let window = self.seq_len + 1;
        let mut out = vec![0u32; rows.len() * window];
        for (g, dst) in rows.zip(out.chunks_exact_mut(window)) {
            // rows = (len - 1) / seq_len keeps g·seq_len + window <= len.
            if let Err(e) = self.shard.read_into(g * self.seq_len, dst) {
                return Some(Err(e.into()));
            }
        }
        Some(Ok(out))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        // Batches left: those from next_batch whose share for this rank is non-empty.
        let mut n = self.rows.div_ceil(self.global_batch);
        if n > 0 && self.rows_of(n - 1).is_empty() {
            n -= 1;
        }
        let left = n.saturating_sub(self.next_batch);
        (left, Some(left))
    }
}

impl ExactSizeIterator for SequentialWindows<'_> {}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_bpe::{ShardWriter, TokenWidth};
    use std::path::Path;
    use std::sync::Arc;

    fn write_shard(path: &Path, width: TokenWidth, tokens: &[u32]) {
        let mut w = ShardWriter::create(path, width).unwrap();
        w.write_tokens(tokens).unwrap();
        w.finish().unwrap();
    }

    fn sample_shard(dir: &Path, n: u32, width: TokenWidth) -> TokenShard {
        let path = dir.join("s.bin");
        let toks: Vec<u32> = (0..n).map(|i| i.wrapping_mul(2654435761) % 60000).collect();
        write_shard(&path, width, &toks);
        TokenShard::open(&path).unwrap()
    }

    fn single<S: Borrow<TokenShard>>(shard: S, b: usize, seq: usize, seed: u64) -> BatchSampler<S> {
        BatchSampler::new(shard, b, seq, seed, DataRank::single()).unwrap()
    }

    #[test]
    fn sampler_is_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        let shard = sample_shard(dir.path(), 5000, TokenWidth::U16);
        let a = single(&shard, 4, 64, 1234);
        let b = single(&shard, 4, 64, 1234);
        assert_eq!(a.batch(0).unwrap().len(), 4 * 65);
        // Order of calls does not matter.
        let later = a.batch(17).unwrap();
        let first = a.batch(0).unwrap();
        assert_eq!(b.batch(0).unwrap(), first);
        assert_eq!(b.batch(17).unwrap(), later);
        assert_eq!(a.batch(17).unwrap(), later);
        // Different steps and different seeds differ.
        assert_ne!(a.batch(1).unwrap(), first);
        assert_ne!(a.batch(2).unwrap(), a.batch(1).unwrap());
        let c = single(&shard, 4, 64, 1235);
        assert_ne!(c.batch(0).unwrap(), first);
        // batch_into matches batch and reuses the buffer.
        let mut buf = vec![99; 3];
        a.batch_into(17, &mut buf).unwrap();
        assert_eq!(buf, later);
        // Same across threads and through an Arc.
        let arc = Arc::new(TokenShard::open(shard.path()).unwrap());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let arc = Arc::clone(&arc);
                std::thread::spawn(move || {
                    let s = single(arc, 4, 64, 1234);
                    (s.batch(17).unwrap(), s.batch(0).unwrap())
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), (later.clone(), first.clone()));
        }
    }

    #[test]
    fn sampler_windows_are_contiguous_slices() {
        let dir = tempfile::tempdir().unwrap();
        for width in [TokenWidth::U16, TokenWidth::U32] {
            let shard = sample_shard(dir.path(), 3000, width);
            let all = shard.to_vec();
            let s = single(&shard, 8, 31, 7);
            for step in 0..50 {
                let batch = s.batch(step).unwrap();
                assert_eq!(batch.len(), 8 * 32);
                for (row, w) in batch.chunks_exact(32).enumerate() {
                    let start = s.window_start(step, row);
                    assert!(start + 32 <= all.len());
                    assert_eq!(w, &all[start..start + 32]);
                }
            }
        }
    }

    #[test]
    fn sampler_covers_start_range() {
        let dir = tempfile::tempdir().unwrap();
        let shard = sample_shard(dir.path(), 1000, TokenWidth::U16);
        let seq = 100;
        let s = single(&shard, 16, seq, 42);
        let max_start = shard.len() - seq - 1;
        assert_eq!(s.num_starts(), max_start + 1);
        let mut hits = vec![0usize; max_start + 1];
        for step in 0..2000 {
            for row in 0..16 {
                let st = s.window_start(step, row);
                assert!(st <= max_start);
                hits[st] += 1;
            }
        }
        let min = hits.iter().position(|&h| h > 0).unwrap();
        let max = hits.iter().rposition(|&h| h > 0).unwrap();
        assert!(min <= 2, "min start {min}");
        assert!(max >= max_start - 2, "max start {max} of {max_start}");
        // Roughly uniform: 32000 draws over 900 starts, ~35.6 each.
        let mean = 32000.0 / hits.len() as f64;
        let in_band = hits
            .iter()
            .filter(|&&h| (h as f64) > mean * 0.4 && (h as f64) < mean * 1.8)
            .count();
        assert!(in_band as f64 > 0.97 * hits.len() as f64, "{in_band}");

        // The smallest shard admits exactly one start: 0.
        let tiny = sample_shard(dir.path(), 11, TokenWidth::U16);
        let t = single(&tiny, 3, 10, 5);
        assert_eq!(
            t.batch(9).unwrap(),
            [tiny.to_vec(), tiny.to_vec(), tiny.to_vec()].concat()
        );
    }

    #[test]
    fn uniform_below_edges() {
        for h in [0, 1, u64::MAX, GOLDEN] {
            assert_eq!(uniform_below(h, 1), 0);
            assert!(uniform_below(h, 3) < 3);
            assert!(uniform_below(h, u64::MAX) < u64::MAX);
        }
    }

    #[test]
    fn sampler_argument_errors() {
        let dir = tempfile::tempdir().unwrap();
        let shard = sample_shard(dir.path(), 10, TokenWidth::U16);
        let one = DataRank::single();
        let err = BatchSampler::new(&shard, 2, 10, 0, one).unwrap_err();
        assert!(
            matches!(
                err,
                SamplerError::WindowTooLong {
                    window: 11,
                    tokens: 10,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("s.bin"));
        assert!(BatchSampler::new(&shard, 2, 9, 0, one).is_ok());
        assert!(matches!(
            BatchSampler::new(&shard, 2, usize::MAX, 0, one),
            Err(SamplerError::WindowTooLong { .. })
        ));
        assert!(matches!(
            BatchSampler::new(&shard, 0, 4, 0, one),
            Err(SamplerError::EmptyBatch { .. })
        ));
        assert!(matches!(
            BatchSampler::new(&shard, 4, 0, 0, one),
            Err(SamplerError::EmptyBatch { .. })
        ));
        assert!(matches!(
            BatchSampler::new(&shard, usize::MAX, 4, 0, one),
            Err(SamplerError::BatchTooLarge { .. })
        ));
        // Fits on one rank, overflows on all of them together.
        let big = usize::MAX / 5 / 3;
        assert!(BatchSampler::new(&shard, big, 4, 0, one).is_ok());
        assert!(matches!(
            BatchSampler::new(&shard, big, 4, 0, DataRank::new(0, 4).unwrap()),
            Err(SamplerError::BatchTooLarge { world_size: 4, .. })
        ));
        let empty_path = dir.path().join("empty.bin");
        write_shard(&empty_path, TokenWidth::U16, &[]);
        let empty = TokenShard::open(&empty_path).unwrap();
        assert!(matches!(
            BatchSampler::new(&empty, 1, 1, 0, one),
            Err(SamplerError::WindowTooLong { tokens: 0, .. })
        ));
        assert!(matches!(
            DataRank::new(2, 2),
            Err(SamplerError::BadRank {
                rank: 2,
                world_size: 2
            })
        ));
        assert!(DataRank::new(0, 0).is_err());
        assert_eq!(DataRank::new(1, 3).unwrap().rows(4), 4..8);
    }

    /// The data-parallel contract: rank r of N at micro-batch b reads rows r·b..(r+1)·b of the
    /// single process's batch at N·b, for random and for sequential batches.
    #[test]
    fn ranks_split_the_single_process_batch() {
        let dir = tempfile::tempdir().unwrap();
        let shard = sample_shard(dir.path(), 4000, TokenWidth::U16);
        let seq = 24;
        for (world, b) in [(2usize, 1usize), (2, 4), (3, 3), (4, 2)] {
            let whole = single(&shard, world * b, seq, 99);
            let ranks: Vec<_> = (0..world)
                .map(|r| {
                    BatchSampler::new(&shard, b, seq, 99, DataRank::new(r, world).unwrap()).unwrap()
                })
                .collect();
            // The ranks' rows are disjoint and together are the single process's rows.
            let mut rows: Vec<usize> = ranks.iter().flat_map(|s| s.rank().rows(b)).collect();
            rows.sort_unstable();
            assert_eq!(rows, (0..world * b).collect::<Vec<_>>());
            for index in [0u64, 1, 7, 1000] {
                let parts: Vec<Vec<u32>> = ranks.iter().map(|s| s.batch(index).unwrap()).collect();
                assert_eq!(parts.concat(), whole.batch(index).unwrap(), "{world}x{b}");
                assert_ne!(parts[0], parts[1], "ranks read different windows");
            }
        }
        // Rank 0 of 1 is the single process itself.
        let one = single(&shard, 5, seq, 3);
        let also = BatchSampler::new(&shard, 5, seq, 3, DataRank::new(0, 1).unwrap()).unwrap();
        assert_eq!(one.batch(4).unwrap(), also.batch(4).unwrap());
    }

    #[test]
    fn sequential_windows_cover_shard_in_order() {
        let dir = tempfile::tempdir().unwrap();
        // (tokens, batch, seq): exact fit, partial last batch, dropped tail.
        for (n, batch, seq) in [
            (41u32, 2usize, 8usize),
            (41, 3, 8),
            (45, 3, 8),
            (2, 5, 1),
            (9, 1, 8),
            (1000, 7, 13),
        ] {
            let shard = sample_shard(dir.path(), n, TokenWidth::U32);
            let all = shard.to_vec();
            let s = single(&shard, batch, seq, 0);
            let rows_expected = (all.len() - 1) / seq;
            assert_eq!(s.num_sequential_rows(), rows_expected);
            let it = s.sequential_windows();
            assert_eq!(it.len(), s.num_sequential_batches());
            let batches: Vec<Vec<u32>> = it.map(Result::unwrap).collect();
            assert_eq!(batches.len(), rows_expected.div_ceil(batch));
            let mut inputs = Vec::new();
            let mut targets = Vec::new();
            let mut rows = 0;
            for (bi, b) in batches.iter().enumerate() {
                assert_eq!(b.len() % (seq + 1), 0);
                let r = b.len() / (seq + 1);
                if bi + 1 < batches.len() {
                    assert_eq!(r, batch);
                } else {
                    assert!(r >= 1 && r <= batch);
                }
                for w in b.chunks_exact(seq + 1) {
                    assert_eq!(w, &all[rows * seq..rows * seq + seq + 1]);
                    inputs.extend_from_slice(&w[..seq]);
                    targets.extend_from_slice(&w[1..]);
                    rows += 1;
                }
            }
            assert_eq!(rows, rows_expected);
            // Inputs are every token once, in order, up to the dropped tail.
            let covered = rows * seq;
            assert_eq!(inputs, &all[..covered]);
            assert_eq!(targets, &all[1..covered + 1]);
            assert!(all.len() - 1 - covered < seq);
            if (all.len() - 1).is_multiple_of(seq) {
                assert_eq!(covered + 1, all.len());
            }
        }
    }

    /// Validation is split like training: global batch i of the ranks at b is the single
    /// process's batch i at N·b, and every window is evaluated by exactly one rank.
    #[test]
    fn ranks_split_the_sequential_windows() {
        let dir = tempfile::tempdir().unwrap();
        // 41 tokens, seq 4: 10 rows. At 3 ranks × 2 rows the last global batch has 4 rows, so
        // rank 2 ends one batch early.
        for (n, world, b) in [(41u32, 3usize, 2usize), (41, 2, 5), (1000, 4, 3), (9, 2, 3)] {
            let shard = sample_shard(dir.path(), n, TokenWidth::U16);
            let seq = 4;
            let whole: Vec<Vec<u32>> = single(&shard, world * b, seq, 0)
                .sequential_windows()
                .map(Result::unwrap)
                .collect();
            let ranks: Vec<Vec<Vec<u32>>> = (0..world)
                .map(|r| {
                    let s = BatchSampler::new(&shard, b, seq, 0, DataRank::new(r, world).unwrap())
                        .unwrap();
                    let it = s.sequential_windows();
                    let len = it.len();
                    let batches: Vec<Vec<u32>> = it.map(Result::unwrap).collect();
                    assert_eq!(batches.len(), len, "exact size");
                    assert!(batches.iter().all(|b| !b.is_empty()));
                    batches
                })
                .collect();
            for (i, batch) in whole.iter().enumerate() {
                let parts: Vec<u32> = ranks
                    .iter()
                    .filter_map(|r| r.get(i))
                    .flatten()
                    .copied()
                    .collect();
                assert_eq!(&parts, batch, "global batch {i} ({n} tokens, {world}x{b})");
            }
            let rank_windows: usize = ranks.iter().flatten().map(|b| b.len()).sum();
            let whole_windows: usize = whole.iter().map(|b| b.len()).sum();
            assert_eq!(rank_windows, whole_windows, "no window twice");
        }
    }
}
