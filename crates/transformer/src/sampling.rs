//! Turning one row of logits into the next token.
//!
//! This is Kiln's counterpart of llama.cpp's sampler chain and vLLM's `SamplingParams`. A
//! [`Sampler`] owns a validated [`SamplingParams`], a small seeded random number generator and
//! scratch buffers that are reused across calls. Each call to [`Sampler::sample`] runs:
//!
//! 1. **repetition penalty** (CTRL / llama.cpp rule) over the last `repetition_window` tokens of
//!    the history: every distinct token id there has its logit divided by the penalty if it is
//!    positive and multiplied by it otherwise;
//! 2. **greedy** selection (argmax, lowest id on ties) if `temperature == 0`;
//! 3. **temperature** scaling of the logits;
//! 4. **top-k**: keep the `k` highest logits;
//! 5. **top-p** (nucleus): keep the smallest set of most probable tokens whose cumulative
//!    probability is at least `p` (always at least one token);
//! 6. a draw from the renormalized distribution with the seeded generator.
//!
//! Top-k and top-p see the temperature-scaled distribution, as in Hugging Face's logits
//! processors and vLLM (llama.cpp's default chain applies the temperature last instead).
//!
//! # Non-finite logits
//!
//! `NaN` logits never panic: they are treated as `-inf`, i.e. the token is masked out. A `-inf`
//! logit is the usual way to forbid a token. If every logit is `NaN` or `-inf`, there is nothing
//! to sample and [`SamplingError::NoFiniteLogits`] is returned. If some logits are `+inf`, those
//! tokens share all the probability mass equally (greedy picks the lowest such id).
//!
//! # Reproducibility
//!
//! The generator is a SplitMix64 stream written out here (no external RNG crate), so results are
//! the same on every platform and every version of the dependencies. Every successful
//! [`Sampler::sample`] call (greedy ones included) advances it by exactly one draw; a call that
//! returns an error does not advance it. Candidate ordering is a total order (logit descending,
//! then token id ascending), so the outcome never depends on how the standard library's sort or
//! selection algorithms break ties.
//!
//! ```
//! # use kiln_transformer::sampling::{Sampler, SamplingParams};
//! let params = SamplingParams { temperature: 0.8, top_k: Some(40), top_p: Some(0.95), seed: 7, ..Default::default() };
//! let mut sampler = Sampler::new(params)?;
//! let logits = [0.1_f32, 2.0, -1.0, 0.5];
//! let token = sampler.sample(&logits, &[1, 3])?;
//! assert!((token as usize) < logits.len());
//! # Ok::<(), kiln_transformer::sampling::SamplingError>(())
//! ```

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

/// How far below `p` the cumulative probability may fall and still count as reaching it, so that
/// rounding in the softmax does not pull an extra token into the nucleus when the probabilities
/// add up to exactly `p` (e.g. `0.5 + 0.3` for `p = 0.8`).
const TOP_P_EPSILON: f64 = 1e-6;

/// How many candidates the top-p stage first partially selects before falling back to larger
/// selections (and finally a full sort); keeps top-p on a ~50k vocabulary far from a full sort.
const TOP_P_FIRST_SELECTION: usize = 256;

/// Parameters of the sampling chain, validated by [`SamplingParams::validate`].
///
/// Missing fields take their [`Default`] values when deserializing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature, finite and `>= 0`; `0` means greedy (argmax, ties go to the lowest id).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens; `None` or `Some(0)` disables it.
    pub top_k: Option<usize>,
    /// Nucleus sampling threshold in `(0, 1]`; `None` or `Some(1.0)` disables it.
    pub top_p: Option<f32>,
    /// Repetition penalty, finite and `> 0`; `1.0` disables it. For each distinct token id in the
    /// penalty window, a positive logit is divided by it and a non-positive one multiplied by it.
    pub repetition_penalty: f32,
    /// How many of the most recent history tokens the penalty looks at (llama.cpp's
    /// `penalty_last_n`); `0` disables the penalty, `usize::MAX` covers the whole history.
    pub repetition_window: usize,
    /// Seed of the sampler's random number generator.
    pub seed: u64,
}

impl Default for SamplingParams {
    /// Temperature 1, no top-k or top-p, no repetition penalty (window 64), seed 0.
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            repetition_window: 64,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding: temperature 0, everything else at its default.
    #[must_use]
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Checks every parameter.
    ///
    /// # Errors
    ///
    /// [`SamplingError::InvalidParameter`] for the first field out of range: `temperature` not
    /// finite or negative, `top_p` outside `(0, 1]`, `repetition_penalty` not finite or `<= 0`.
    pub fn validate(&self) -> Result<(), SamplingError> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(SamplingError::InvalidParameter {
                name: "temperature",
                value: self.temperature.to_string(),
                reason: "must be finite and >= 0 (0 means greedy)",
            });
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(SamplingError::InvalidParameter {
                name: "top_p",
                value: p.to_string(),
                reason: "must be in (0, 1]",
            });
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return Err(SamplingError::InvalidParameter {
                name: "repetition_penalty",
                value: self.repetition_penalty.to_string(),
                reason: "must be finite and > 0 (1 means off)",
            });
        }
        Ok(())
    }

    /// Whether sampling is greedy (temperature 0).
    fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// The effective top-k bound, if it restricts anything.
    fn effective_top_k(&self) -> Option<usize> {
        self.top_k.filter(|&k| k > 0)
    }

    /// The effective top-p threshold, if it restricts anything.
    fn effective_top_p(&self) -> Option<f32> {
        self.top_p.filter(|&p| p < 1.0)
    }

    /// Whether the repetition penalty changes anything.
    fn penalty_active(&self) -> bool {
        self.repetition_penalty != 1.0 && self.repetition_window > 0
    }
}

/// Errors of the sampling chain.
#[derive(Debug, thiserror::Error)]
pub enum SamplingError {
    /// A [`SamplingParams`] field is out of range.
    #[error("invalid sampling parameter `{name}` = {value}: {reason}")]
    InvalidParameter {
        /// The field's name.
        name: &'static str,
        /// The offending value, formatted.
        value: String,
        /// What the field must satisfy.
        reason: &'static str,
    },
    /// The logits row is empty.
    #[error("cannot sample from an empty logits row")]
    EmptyLogits,
    /// Every logit is `NaN` or `-inf` (after the repetition penalty), so no token can be chosen.
    #[error("every logit is NaN or -inf; no token can be sampled")]
    NoFiniteLogits,
    /// The logits row has more entries than `u32` token ids can address.
    #[error("logits row has {len} entries, more than u32 token ids can address")]
    VocabularyTooLarge {
        /// The row's length.
        len: usize,
    },
}

/// One token under consideration: its id, its (penalized) logit and, once computed, its
/// unnormalized probability.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    id: u32,
    logit: f32,
    weight: f32,
}

/// Total order used for every sort and selection: higher logit first, then lower id first.
///
/// Logits reaching this are never `NaN` and `-0.0` has been normalized to `0.0`, so `total_cmp`
/// agrees with numeric order.
fn by_logit_desc(a: &Candidate, b: &Candidate) -> Ordering {
    b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id))
}

/// SplitMix64 (Steele, Lea & Flood 2014): a tiny, well-mixed 64-bit generator with a fixed,
/// platform-independent output stream for each seed.
#[derive(Clone, Debug)]
struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Turns logits rows into tokens according to a fixed [`SamplingParams`].
///
/// Holds the generator state and scratch buffers; after the first call on a given vocabulary
/// size, [`Sampler::sample`] does not allocate (the penalty-window buffer grows only while the
/// window is still filling up).
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
    /// Candidates, first in token-id order, then filtered and (partially) sorted.
    candidates: Vec<Candidate>,
    /// Distinct token ids of the penalty window.
    window_ids: Vec<u32>,
}

impl Sampler {
    /// Validates `params` and creates a sampler seeded with `params.seed`.
    ///
    /// # Errors
    ///
    /// [`SamplingError::InvalidParameter`] if [`SamplingParams::validate`] rejects `params`.
    pub fn new(params: SamplingParams) -> Result<Self, SamplingError> {
        params.validate()?;
        Ok(Self {
            rng: SplitMix64::new(params.seed),
            params,
            candidates: Vec::new(),
            window_ids: Vec::new(),
        })
    }

    /// The parameters this sampler was built with.
    #[must_use]
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits` (one row, vocabulary-sized) given the tokens so far
    /// (prompt + generated) for the repetition penalty.
    ///
    /// History ids outside the vocabulary are ignored. See the module documentation for the
    /// order of the stages and the handling of non-finite logits.
    ///
    /// # Errors
    ///
    /// [`SamplingError::EmptyLogits`] for an empty row, [`SamplingError::NoFiniteLogits`] if
    /// every logit is `NaN` or `-inf` after the penalty, [`SamplingError::VocabularyTooLarge`] if
    /// the row has more than `u32::MAX + 1` entries. A failed call does not advance the generator.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> Result<u32, SamplingError> {
        let max = self.prepare(logits, history)?;
        if self.params.is_greedy() {
            // Keep the "one draw per call" invariant even when the draw is not needed.
            self.rng.next_u64();
            return Ok(self
                .candidates
                .iter()
                .find(|c| c.logit == max)
                .map_or(0, |c| c.id));
        }
        let total = self.filter(max);
        let target = self.rng.next_f64() * total;
        let mut cumulative = 0.0_f64;
        for c in &self.candidates {
            cumulative += f64::from(c.weight);
            if cumulative > target {
                return Ok(c.id);
            }
        }
        // Rounding left `target` at or past the running sum: take the last token that has any
        // probability. The most likely candidate always has weight 1, so one exists.
        Ok(self
            .candidates
            .iter()
            .rev()
            .find(|c| c.weight > 0.0)
            .map_or(self.candidates[0].id, |c| c.id))
    }

    /// Fills `candidates` with every token in id order, `NaN` replaced by `-inf` and the
    /// repetition penalty applied; returns the largest logit, which is never `-inf`.
    fn prepare(&mut self, logits: &[f32], history: &[u32]) -> Result<f32, SamplingError> {
        if logits.is_empty() {
            return Err(SamplingError::EmptyLogits);
        }
        if u32::try_from(logits.len() - 1).is_err() {
            return Err(SamplingError::VocabularyTooLarge { len: logits.len() });
        }
        // `NaN` becomes `-inf`; adding 0.0 turns -0.0 into 0.0 so that the total order used for
        // sorting agrees with numeric order.
        self.candidates.clear();
        self.candidates
            .extend(logits.iter().zip(0u32..).map(|(&logit, id)| Candidate {
                id,
                logit: if logit.is_nan() {
                    f32::NEG_INFINITY
                } else {
                    logit + 0.0
                },
                weight: 0.0,
            }));

        if self.params.penalty_active() {
            let penalty = self.params.repetition_penalty;
            let start = history.len().saturating_sub(self.params.repetition_window);
            self.window_ids.clear();
            self.window_ids.extend_from_slice(&history[start..]);
            self.window_ids.sort_unstable();
            self.window_ids.dedup();
            for &id in &self.window_ids {
                if let Some(c) = self.candidates.get_mut(id as usize) {
                    let penalized = if c.logit > 0.0 {
                        c.logit / penalty
                    } else {
                        c.logit * penalty
                    };
                    // A tiny negative logit can underflow to -0.0.
                    c.logit = penalized + 0.0;
                }
            }
        }

        let max = self
            .candidates
            .iter()
            .fold(f32::NEG_INFINITY, |m, c| m.max(c.logit));
        if max == f32::NEG_INFINITY {
            return Err(SamplingError::NoFiniteLogits);
        }
        Ok(max)
    }

    /// Applies temperature, top-k and top-p to the prepared candidates (largest logit `max`),
    /// leaving only the survivors with their unnormalized probabilities in `weight`; returns the
    /// sum of those weights. Survivors are sorted by [`by_logit_desc`] whenever top-k or top-p
    /// was applied, and in id order otherwise.
    fn filter(&mut self, mut max: f32) -> f64 {
        let cands = &mut self.candidates;
        if max == f32::INFINITY {
            // +inf tokens take all the mass, shared equally.
            cands.retain(|c| c.logit == f32::INFINITY);
            for c in cands.iter_mut() {
                c.logit = 0.0;
            }
            max = 0.0;
        } else {
            cands.retain(|c| c.logit > f32::NEG_INFINITY);
        }

        let mut sorted = false;
        if let Some(k) = self.params.effective_top_k()
            && k < cands.len()
        {
            cands.select_nth_unstable_by(k - 1, by_logit_desc);
            cands.truncate(k);
            cands.sort_unstable_by(by_logit_desc);
            sorted = true;
        }

        // Dividing the (non-positive) difference, rather than multiplying by 1/t, keeps tiny
        // temperatures exact: the maximum gets exp(0) = 1 and everything else underflows to 0.
        let temperature = self.params.temperature;
        let mut total = 0.0_f64;
        for c in cands.iter_mut() {
            c.weight = ((c.logit - max) / temperature).exp();
            total += f64::from(c.weight);
        }

        if let Some(p) = self.params.effective_top_p() {
            let target = (f64::from(p) - TOP_P_EPSILON).max(0.0) * total;
            let keep = if sorted {
                nucleus_len(cands, target).unwrap_or(cands.len())
            } else {
                let n = cands.len();
                let mut m = TOP_P_FIRST_SELECTION;
                loop {
                    if m >= n {
                        cands.sort_unstable_by(by_logit_desc);
                        break nucleus_len(cands, target).unwrap_or(n);
                    }
                    cands.select_nth_unstable_by(m - 1, by_logit_desc);
                    cands[..m].sort_unstable_by(by_logit_desc);
                    if let Some(keep) = nucleus_len(&cands[..m], target) {
                        break keep;
                    }
                    m = m.saturating_mul(4);
                }
            };
            cands.truncate(keep);
            total = cands.iter().map(|c| f64::from(c.weight)).sum();
        }
        total
    }
}

/// Length of the shortest prefix of `sorted` whose weights add up to at least `target`, or `None`
/// if the whole slice falls short. Never `Some(0)`.
fn nucleus_len(sorted: &[Candidate], target: f64) -> Option<usize> {
    let mut cumulative = 0.0_f64;
    for (i, c) in sorted.iter().enumerate() {
        cumulative += f64::from(c.weight);
        if cumulative >= target {
            return Some(i + 1);
        }
    }
    None
}

/// Replaces `xs` by its softmax, subtracting the maximum first for numerical stability.
///
/// `NaN` entries are treated as `-inf` (probability 0). If some entries are `+inf`, they share
/// the mass equally. If no entry is above `-inf` (or `xs` is empty), every entry becomes 0, as
/// there is no distribution to return.
pub fn softmax_in_place(xs: &mut [f32]) {
    let max = xs
        .iter()
        .copied()
        .filter(|x| !x.is_nan())
        .fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        xs.fill(0.0);
        return;
    }
    let mut sum = 0.0_f64;
    for x in xs.iter_mut() {
        *x = if x.is_nan() {
            0.0
        } else if max == f32::INFINITY {
            if *x == f32::INFINITY { 1.0 } else { 0.0 }
        } else {
            (*x - max).exp()
        };
        sum += f64::from(*x);
    }
    // The maximum contributed exp(0) = 1, so `sum >= 1`.
    let inv = (1.0 / sum) as f32;
    for x in xs.iter_mut() {
        *x *= inv;
    }
}

/// Index of the first maximum of `xs`, ignoring `NaN`s; `None` if `xs` is empty or all `NaN`.
#[must_use]
pub fn argmax(xs: &[f32]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &x) in xs.iter().enumerate() {
        if x.is_nan() {
            continue;
        }
        match best {
            Some((_, b)) if x <= b => {}
            _ => best = Some((i, x)),
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(params: SamplingParams) -> Sampler {
        Sampler::new(params).expect("valid params")
    }

    fn ln_probs(probs: &[f32]) -> Vec<f32> {
        probs.iter().map(|p| p.ln()).collect()
    }

    /// Samples `n` times and returns per-token frequencies.
    fn frequencies(s: &mut Sampler, logits: &[f32], n: usize) -> Vec<f64> {
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..n {
            counts[s.sample(logits, &[]).unwrap() as usize] += 1;
        }
        counts.into_iter().map(|c| c as f64 / n as f64).collect()
    }

    /// Deterministic pseudo-random logits for tests.
    fn test_logits(seed: u64, n: usize) -> Vec<f32> {
        let mut rng = SplitMix64::new(seed);
        (0..n)
            .map(|_| (rng.next_f64() * 20.0 - 10.0) as f32)
            .collect()
    }

    #[test]
    fn defaults_and_greedy_constructor() {
        let d = SamplingParams::default();
        assert_eq!(d.temperature, 1.0);
        assert_eq!(d.top_k, None);
        assert_eq!(d.top_p, None);
        assert_eq!(d.repetition_penalty, 1.0);
        assert_eq!(d.repetition_window, 64);
        assert_eq!(d.seed, 0);
        assert!(d.validate().is_ok());
        let g = SamplingParams::greedy();
        assert_eq!(g.temperature, 0.0);
        assert_eq!(
            SamplingParams {
                temperature: 1.0,
                ..g.clone()
            },
            d
        );
        assert_eq!(sampler(g.clone()).params(), &g);
    }

    #[test]
    fn greedy_picks_argmax() {
        let mut s = sampler(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, -2.0, 2.9], &[]).unwrap(), 1);
        assert_eq!(s.sample(&[-5.0, -4.0, -6.0], &[]).unwrap(), 1);
        assert_eq!(s.sample(&[7.0], &[]).unwrap(), 0);
    }

    #[test]
    fn greedy_ties_go_to_lowest_id() {
        let mut s = sampler(SamplingParams::greedy());
        assert_eq!(s.sample(&[1.0, 5.0, 5.0, 5.0], &[]).unwrap(), 1);
        assert_eq!(s.sample(&[2.0, 2.0], &[]).unwrap(), 0);
        // -0.0 and 0.0 are equal.
        assert_eq!(s.sample(&[-1.0, -0.0, 0.0], &[]).unwrap(), 1);
        assert_eq!(s.sample(&[-1.0, 0.0, -0.0], &[]).unwrap(), 1);
    }

    #[test]
    fn very_low_temperature_is_greedy() {
        for temperature in [1e-3_f32, 1e-6, 1e-30, f32::MIN_POSITIVE, 1e-45] {
            let mut s = sampler(SamplingParams {
                temperature,
                seed: 3,
                ..Default::default()
            });
            for trial in 0..50 {
                let logits = test_logits(trial, 100);
                let expected = argmax(&logits).unwrap() as u32;
                assert_eq!(s.sample(&logits, &[]).unwrap(), expected, "t={temperature}");
            }
        }
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = sampler(SamplingParams {
            top_k: Some(1),
            seed: 11,
            ..Default::default()
        });
        for trial in 0..100 {
            let logits = test_logits(trial, 500);
            assert_eq!(
                s.sample(&logits, &[]).unwrap(),
                argmax(&logits).unwrap() as u32
            );
        }
        // Ties: the lowest id wins, as in greedy.
        assert_eq!(s.sample(&[1.0, 4.0, 4.0], &[]).unwrap(), 1);
    }

    #[test]
    fn tiny_top_p_is_greedy() {
        for top_k in [None, Some(10)] {
            let mut s = sampler(SamplingParams {
                top_p: Some(1e-6),
                top_k,
                seed: 5,
                ..Default::default()
            });
            for trial in 0..100 {
                let logits = test_logits(trial + 1000, 2000);
                assert_eq!(
                    s.sample(&logits, &[]).unwrap(),
                    argmax(&logits).unwrap() as u32
                );
            }
        }
    }

    #[test]
    fn top_k_restricts_support_and_renormalizes() {
        let probs = [0.1_f32, 0.3, 0.05, 0.25, 0.2, 0.1];
        let logits = ln_probs(&probs);
        let mut s = sampler(SamplingParams {
            top_k: Some(3),
            seed: 42,
            ..Default::default()
        });
        let freq = frequencies(&mut s, &logits, 2000);
        let kept = 0.3 + 0.25 + 0.2;
        let expected = [0.0, 0.3 / kept, 0.0, 0.25 / kept, 0.2 / kept, 0.0];
        for (id, (&f, &e)) in freq.iter().zip(&expected).enumerate() {
            if e == 0.0 {
                assert_eq!(f, 0.0, "id {id} outside the top 3 was sampled");
            } else {
                assert!((f - e).abs() < 0.05, "id {id}: freq {f} vs {e}");
            }
        }
    }

    #[test]
    fn top_k_zero_or_large_is_disabled() {
        let logits = [0.0_f32, 0.5, 1.0];
        let base = frequencies(&mut sampler(SamplingParams::default()), &logits, 500);
        for top_k in [Some(0), Some(3), Some(1000)] {
            let mut s = sampler(SamplingParams {
                top_k,
                ..Default::default()
            });
            assert_eq!(frequencies(&mut s, &logits, 500), base, "{top_k:?}");
        }
    }

    #[test]
    fn top_p_keeps_smallest_nucleus() {
        let logits = ln_probs(&[0.5, 0.3, 0.15, 0.05]);
        let support = |p: f32| {
            let mut s = sampler(SamplingParams {
                top_p: Some(p),
                seed: 9,
                ..Default::default()
            });
            let freq = frequencies(&mut s, &logits, 2000);
            freq.iter().map(|&f| f > 0.0).collect::<Vec<_>>()
        };
        assert_eq!(support(0.8), [true, true, false, false]);
        assert_eq!(support(0.81), [true, true, true, false]);
        assert_eq!(support(0.5), [true, false, false, false]);
        assert_eq!(support(0.51), [true, true, false, false]);
        assert_eq!(support(1.0), [true, true, true, true]);
    }

    #[test]
    fn top_p_frequencies_are_renormalized() {
        let logits = ln_probs(&[0.5, 0.3, 0.15, 0.05]);
        let mut s = sampler(SamplingParams {
            top_p: Some(0.9),
            seed: 1,
            ..Default::default()
        });
        let freq = frequencies(&mut s, &logits, 4000);
        for (f, e) in freq.iter().zip([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]) {
            assert!((f - e).abs() < 0.05, "{freq:?}");
        }
    }

    /// Reference implementation of the filtering stages: full sort, then the textbook rules.
    fn reference_support(logits: &[f32], params: &SamplingParams) -> Vec<u32> {
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        order.sort_by(|&a, &b| {
            logits[b as usize]
                .partial_cmp(&logits[a as usize])
                .unwrap()
                .then(a.cmp(&b))
        });
        if let Some(k) = params.top_k.filter(|&k| k > 0) {
            order.truncate(k);
        }
        if let Some(p) = params.top_p {
            let max = logits[order[0] as usize];
            let w: Vec<f64> = order
                .iter()
                .map(|&i| ((f64::from(logits[i as usize]) - f64::from(max)) / 1.0).exp())
                .collect();
            let total: f64 = w.iter().sum();
            let mut cum = 0.0;
            let mut keep = order.len();
            for (i, x) in w.iter().enumerate() {
                cum += x / total;
                if cum >= f64::from(p) - TOP_P_EPSILON {
                    keep = i + 1;
                    break;
                }
            }
            order.truncate(keep);
        }
        order.sort_unstable();
        order
    }

    #[test]
    fn filtering_matches_full_sort_reference_on_large_vocab() {
        let vocab = 50_000;
        // (top_k, top_p, logit scale, round logits to create ties). The scale moves the nucleus
        // from ~100 tokens (first partial selection) through ~1000 (a second, larger selection)
        // to tens of thousands (full sort).
        let cases = [
            (Some(40), None, 1.0, false),
            (Some(1), None, 1.0, false),
            (Some(1000), Some(0.9), 1.0, false),
            (Some(300), None, 1.0, true),
            (None, Some(0.05), 1.0, false),
            (None, Some(0.3), 1.0, false),
            (None, Some(0.3), 1.0, true),
            (None, Some(0.9), 0.2, false),
            (None, Some(0.999), 1.0, false),
            (None, Some(0.3), 0.2, true),
        ];
        for (trial, (top_k, top_p, scale, ties)) in cases.into_iter().enumerate() {
            let params = SamplingParams {
                top_k,
                top_p,
                ..Default::default()
            };
            let mut s = sampler(params.clone());
            let logits: Vec<f32> = test_logits(trial as u64, vocab)
                .iter()
                .map(|x| {
                    if ties {
                        (x * 10.0).round() / 10.0
                    } else {
                        x * scale
                    }
                })
                .collect();
            let max = s.prepare(&logits, &[]).unwrap();
            s.filter(max);
            let mut got: Vec<u32> = s.candidates.iter().map(|c| c.id).collect();
            got.sort_unstable();
            let expected = reference_support(&logits, &params);
            assert_eq!(got.len(), expected.len(), "{top_k:?} {top_p:?}");
            assert_eq!(got, expected, "{top_k:?} {top_p:?}");
        }
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative() {
        let mut s = sampler(SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        });
        s.prepare(&[4.0, -3.0, 0.0, 1.0, -1.0], &[0, 1, 2]).unwrap();
        let got: Vec<f32> = s.candidates.iter().map(|c| c.logit).collect();
        assert_eq!(got, [2.0, -6.0, 0.0, 1.0, -1.0]);

        // Penalty < 1 works the other way round (encourages repeats).
        let mut s = sampler(SamplingParams {
            repetition_penalty: 0.5,
            ..Default::default()
        });
        s.prepare(&[4.0, -3.0], &[0, 1]).unwrap();
        let got: Vec<f32> = s.candidates.iter().map(|c| c.logit).collect();
        assert_eq!(got, [8.0, -1.5]);
    }

    #[test]
    fn repetition_penalty_applies_once_per_distinct_id() {
        let mut s = sampler(SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        });
        s.prepare(&[8.0, -1.0, 3.0], &[0, 0, 0, 1, 1, 0]).unwrap();
        let got: Vec<f32> = s.candidates.iter().map(|c| c.logit).collect();
        assert_eq!(got, [4.0, -2.0, 3.0]);
    }

    #[test]
    fn repetition_penalty_only_within_window() {
        let mut s = sampler(SamplingParams {
            repetition_penalty: 2.0,
            repetition_window: 3,
            ..Default::default()
        });
        // Only the last three tokens (2, 3, 3) count.
        s.prepare(&[4.0, 4.0, 4.0, 4.0], &[0, 1, 2, 3, 3]).unwrap();
        let got: Vec<f32> = s.candidates.iter().map(|c| c.logit).collect();
        assert_eq!(got, [4.0, 4.0, 2.0, 2.0]);

        // Window 0 disables the penalty; a window longer than the history covers all of it.
        for (window, expected) in [(0, [4.0, 4.0]), (usize::MAX, [2.0, 2.0])] {
            let mut s = sampler(SamplingParams {
                repetition_penalty: 2.0,
                repetition_window: window,
                ..Default::default()
            });
            s.prepare(&[4.0, 4.0], &[0, 1]).unwrap();
            let got: Vec<f32> = s.candidates.iter().map(|c| c.logit).collect();
            assert_eq!(got, expected, "window {window}");
        }
    }

    #[test]
    fn repetition_penalty_changes_greedy_choice() {
        let mut s = sampler(SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(&[2.0, 1.5, -1.0], &[0]).unwrap(), 1);
        assert_eq!(s.sample(&[-1.0, -1.5], &[0]).unwrap(), 1);
        // Out-of-vocabulary history ids are ignored.
        assert_eq!(s.sample(&[2.0, 1.5], &[7, u32::MAX]).unwrap(), 0);
    }

    #[test]
    fn same_seed_same_sequence_different_seed_different_sequence() {
        let run = |seed: u64| {
            let mut s = sampler(SamplingParams {
                top_k: Some(20),
                top_p: Some(0.95),
                repetition_penalty: 1.3,
                seed,
                ..Default::default()
            });
            let mut history = Vec::new();
            for step in 0..50 {
                let logits: Vec<f32> = test_logits(step, 64).iter().map(|x| x * 0.3).collect();
                let t = s.sample(&logits, &history).unwrap();
                history.push(t);
            }
            history
        };
        assert_eq!(run(123), run(123));
        assert_ne!(run(123), run(124));
        assert_ne!(run(0), run(1));
    }

    #[test]
    fn clone_continues_the_same_stream() {
        let logits = [0.0_f32; 16];
        let mut a = sampler(SamplingParams {
            seed: 77,
            ..Default::default()
        });
        a.sample(&logits, &[]).unwrap();
        let mut b = a.clone();
        for _ in 0..20 {
            assert_eq!(
                a.sample(&logits, &[]).unwrap(),
                b.sample(&logits, &[]).unwrap()
            );
        }
    }

    #[test]
    fn rng_stream_is_pinned() {
        // SplitMix64 reference values for seed 0; pins the stream across platforms/versions.
        let mut rng = SplitMix64::new(0);
        assert_eq!(rng.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(rng.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(rng.next_u64(), 0x06C4_5D18_8009_454F);
        for _ in 0..1000 {
            let u = rng.next_f64();
            assert!((0.0..1.0).contains(&u));
        }
    }

    #[test]
    fn invalid_params_are_rejected() {
        let bad = [
            (
                "temperature",
                SamplingParams {
                    temperature: -0.1,
                    ..Default::default()
                },
            ),
            (
                "temperature",
                SamplingParams {
                    temperature: f32::NAN,
                    ..Default::default()
                },
            ),
            (
                "temperature",
                SamplingParams {
                    temperature: f32::INFINITY,
                    ..Default::default()
                },
            ),
            (
                "top_p",
                SamplingParams {
                    top_p: Some(0.0),
                    ..Default::default()
                },
            ),
            (
                "top_p",
                SamplingParams {
                    top_p: Some(1.01),
                    ..Default::default()
                },
            ),
            (
                "top_p",
                SamplingParams {
                    top_p: Some(-0.5),
                    ..Default::default()
                },
            ),
            (
                "top_p",
                SamplingParams {
                    top_p: Some(f32::NAN),
                    ..Default::default()
                },
            ),
            (
                "repetition_penalty",
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..Default::default()
                },
            ),
            (
                "repetition_penalty",
                SamplingParams {
                    repetition_penalty: -1.0,
                    ..Default::default()
                },
            ),
            (
                "repetition_penalty",
                SamplingParams {
                    repetition_penalty: f32::NAN,
                    ..Default::default()
                },
            ),
        ];
        for (field, params) in bad {
            match Sampler::new(params.clone()) {
                Err(SamplingError::InvalidParameter { name, .. }) => {
                    assert_eq!(name, field, "{params:?}")
                }
                other => panic!("{params:?} gave {other:?}"),
            }
            assert!(params.validate().is_err());
        }
        let err = SamplingParams {
            top_p: Some(0.0),
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid sampling parameter `top_p` = 0: must be in (0, 1]"
        );
        // Boundary values that are valid.
        for params in [
            SamplingParams {
                top_p: Some(1.0),
                ..Default::default()
            },
            SamplingParams {
                top_k: Some(0),
                ..Default::default()
            },
            SamplingParams {
                repetition_penalty: 1e-3,
                repetition_window: 0,
                ..Default::default()
            },
        ] {
            assert!(Sampler::new(params).is_ok());
        }
    }

    #[test]
    fn empty_logits_is_an_error() {
        for params in [SamplingParams::default(), SamplingParams::greedy()] {
            let mut s = sampler(params);
            assert!(matches!(
                s.sample(&[], &[1, 2]),
                Err(SamplingError::EmptyLogits)
            ));
        }
    }

    #[test]
    fn nan_logits_are_masked_not_panicking() {
        let logits = [f32::NAN, 1.0, f32::NAN, 0.5, f32::NAN];
        for params in [
            SamplingParams::default(),
            SamplingParams::greedy(),
            SamplingParams {
                top_k: Some(2),
                top_p: Some(0.9),
                repetition_penalty: 1.5,
                ..Default::default()
            },
        ] {
            let mut s = sampler(params);
            for _ in 0..200 {
                let t = s.sample(&logits, &[0, 1, 2]).unwrap();
                assert!(t == 1 || t == 3, "sampled NaN token {t}");
            }
        }
    }

    #[test]
    fn all_masked_logits_is_an_error_and_consumes_no_draw() {
        let mut s = sampler(SamplingParams::default());
        let fresh = s.clone();
        for logits in [
            vec![f32::NAN; 4],
            vec![f32::NEG_INFINITY; 3],
            vec![f32::NAN, f32::NEG_INFINITY],
        ] {
            assert!(matches!(
                s.sample(&logits, &[]),
                Err(SamplingError::NoFiniteLogits)
            ));
        }
        assert_eq!(s.rng.state, fresh.rng.state);
        let mut g = sampler(SamplingParams::greedy());
        assert!(matches!(
            g.sample(&[f32::NAN], &[]),
            Err(SamplingError::NoFiniteLogits)
        ));
    }

    #[test]
    fn infinite_logits() {
        // -inf masks a token; +inf tokens share all the mass.
        let mut s = sampler(SamplingParams {
            seed: 4,
            ..Default::default()
        });
        let freq = frequencies(
            &mut s,
            &[f32::NEG_INFINITY, 100.0, f32::INFINITY, 3.0, f32::INFINITY],
            2000,
        );
        assert_eq!(freq[0] + freq[1] + freq[3], 0.0);
        assert!((freq[2] - 0.5).abs() < 0.05 && (freq[4] - 0.5).abs() < 0.05);
        let mut g = sampler(SamplingParams::greedy());
        assert_eq!(
            g.sample(&[1.0, f32::INFINITY, f32::INFINITY], &[]).unwrap(),
            1
        );
        assert_eq!(g.sample(&[f32::NEG_INFINITY, -1e30], &[]).unwrap(), 1);
    }

    #[test]
    fn temperature_one_matches_softmax() {
        let logits = [1.0_f32, 2.0, 3.0];
        let mut probs = logits;
        softmax_in_place(&mut probs);
        let mut s = sampler(SamplingParams {
            seed: 2024,
            ..Default::default()
        });
        let freq = frequencies(&mut s, &logits, 10_000);
        for (f, p) in freq.iter().zip(probs) {
            assert!((f - f64::from(p)).abs() < 0.02, "{freq:?} vs {probs:?}");
        }
    }

    #[test]
    fn high_temperature_flattens_distribution() {
        let logits = [1.0_f32, 2.0, 3.0];
        let mut s = sampler(SamplingParams {
            temperature: 1e6,
            seed: 8,
            ..Default::default()
        });
        let freq = frequencies(&mut s, &logits, 6000);
        for f in freq {
            assert!((f - 1.0 / 3.0).abs() < 0.03);
        }
    }

    #[test]
    fn softmax_is_stable_and_normalized() {
        let mut xs = [1000.0_f32, 1001.0, 1002.0];
        softmax_in_place(&mut xs);
        let mut ys = [0.0_f32, 1.0, 2.0];
        softmax_in_place(&mut ys);
        for (x, y) in xs.iter().zip(&ys) {
            assert!((x - y).abs() < 1e-6);
        }
        assert!((ys.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((ys[2] - 0.665_240_94).abs() < 1e-6);

        let mut zs = [-1e30_f32, 0.0, f32::NAN, f32::NEG_INFINITY];
        softmax_in_place(&mut zs);
        assert_eq!(zs, [0.0, 1.0, 0.0, 0.0]);

        let mut inf = [f32::INFINITY, 1.0, f32::INFINITY];
        softmax_in_place(&mut inf);
        assert_eq!(inf, [0.5, 0.0, 0.5]);

        let mut none = [f32::NAN, f32::NEG_INFINITY];
        softmax_in_place(&mut none);
        assert_eq!(none, [0.0, 0.0]);
        softmax_in_place(&mut []);
    }

    #[test]
    fn argmax_takes_first_max_and_skips_nan() {
        assert_eq!(argmax(&[]), None);
        assert_eq!(argmax(&[f32::NAN]), None);
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), Some(1));
        assert_eq!(argmax(&[f32::NAN, -1.0, f32::NAN, 0.0]), Some(3));
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), Some(0));
        assert_eq!(argmax(&[-0.0, 0.0]), Some(0));
    }

    #[test]
    fn no_reallocation_after_first_call() {
        let logits = test_logits(5, 50_000);
        let mut s = sampler(SamplingParams {
            top_p: Some(0.95),
            repetition_penalty: 1.1,
            ..Default::default()
        });
        let history: Vec<u32> = (0..200).collect();
        s.sample(&logits, &history).unwrap();
        let (cp, wp) = (s.candidates.as_ptr(), s.window_ids.as_ptr());
        for _ in 0..20 {
            s.sample(&logits, &history).unwrap();
        }
        assert_eq!(s.candidates.as_ptr(), cp);
        assert_eq!(s.window_ids.as_ptr(), wp);
    }
}
