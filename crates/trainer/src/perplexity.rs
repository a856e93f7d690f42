//! Perplexity by llama.cpp's protocol (`llama-perplexity`): the text's tokens are cut into
//! non-overlapping windows of `ctx` tokens; each window is a fresh context (its first token
//! replaced by BOS when the tokenizer adds one), and only its second half is scored, so every
//! scored token sees at least `ctx / 2` tokens of context. The result is `exp` of the mean negative
//! log-likelihood, with the standard error llama.cpp prints beside it.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use kiln_transformer::Transformer;

use crate::error::{Result, TrainError};

/// How to score a text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PerplexitySettings {
    /// Tokens per window (llama.cpp's `--ctx-size`, 512 in its published tables).
    pub ctx: usize,
    /// Windows per forward pass.
    pub batch: usize,
    /// Score only the first this many windows (llama.cpp's `--chunks`); all when `None`.
    pub max_windows: Option<usize>,
    /// The BOS id that starts every window, when the tokenizer adds one.
    pub bos: Option<u32>,
}

impl Default for PerplexitySettings {
    fn default() -> Self {
        Self {
            ctx: 512,
            batch: 1,
            max_windows: None,
            bos: None,
        }
    }
}

/// A perplexity and how sure it is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Perplexity {
    /// `exp(mean NLL)`.
    pub perplexity: f64,
    /// Its standard error (llama.cpp's `±`: the NLL's standard error times the perplexity).
    pub std_error: f64,
    /// Mean negative log-likelihood per scored token, in nats.
    pub mean_nll: f64,
    /// Tokens scored.
    pub tokens: usize,
    /// Windows scored.
    pub windows: usize,
}

/// Running sums over scored tokens (llama.cpp accumulates `nll` and `nll²` in doubles).
#[derive(Clone, Copy, Debug, Default)]
struct NllSums {
    nll: f64,
    nll2: f64,
    count: usize,
}

impl NllSums {
    fn add(&mut self, nll: f64) {
        self.nll += nll;
        self.nll2 += nll * nll;
        self.count += 1;
    }

    fn result(&self, windows: usize) -> Perplexity {
        let n = self.count.max(1) as f64;
        let mean = self.nll / n;
        let var = self.nll2 / n - mean * mean;
        let nll_err = if var > 0.0 && self.count > 1 {
            (var / (n - 1.0)).sqrt()
        } else {
            0.0
        };
        let perplexity = mean.exp();
        Perplexity {
            perplexity,
            std_error: nll_err * perplexity,
            mean_nll: mean,
            tokens: self.count,
            windows,
        }
    }
}

/// The number of windows [`perplexity`] scores for `tokens` tokens.
pub fn perplexity_windows(tokens: usize, settings: &PerplexitySettings) -> usize {
    let all = tokens / settings.ctx.max(1);
    settings.max_windows.map_or(all, |m| m.min(all))
}

/// The perplexity of `model` on `tokens` (see the module documentation). `progress(done, total,
/// so_far)` is called after every batch of windows with the estimate so far.
pub fn perplexity<B: Backend>(
    model: &Transformer<B>,
    tokens: &[u32],
    settings: &PerplexitySettings,
    mut progress: impl FnMut(usize, usize, &Perplexity),
) -> Result<Perplexity> {
    let ctx = settings.ctx;
    if ctx < 2 {
        return Err(TrainError::Config(format!(
            "perplexity needs windows of at least 2 tokens, got --ctx {ctx}"
        )));
    }
    if ctx > model.config().context_length {
        return Err(TrainError::Config(format!(
            "--ctx {ctx} is longer than the model's context of {} tokens",
            model.config().context_length
        )));
    }
    let windows = perplexity_windows(tokens.len(), settings);
    if windows == 0 {
        return Err(TrainError::Config(format!(
            "the text has {} tokens, fewer than one window of {ctx}",
            tokens.len()
        )));
    }
    let device = model.tok_emb.weight.val().device();
    let first = ctx / 2;
    let scored = ctx - 1 - first;
    let mut sums = NllSums::default();
    let mut done = 0;
    while done < windows {
        let rows = settings.batch.max(1).min(windows - done);
        let mut inputs = Vec::with_capacity(rows * ctx);
        let mut targets = Vec::with_capacity(rows * scored);
        for w in done..done + rows {
            let window = &tokens[w * ctx..(w + 1) * ctx];
            inputs.extend(window.iter().map(|&t| i64::from(t)));
            if let Some(bos) = settings.bos {
                inputs[(w - done) * ctx] = i64::from(bos);
            }
            targets.extend(window[first + 1..].iter().map(|&t| i64::from(t)));
        }
        let inputs = Tensor::<B, 2, Int>::from_data(TensorData::new(inputs, [rows, ctx]), &device);
        let logits = model.forward(inputs)?;
        let vocab = logits.dims()[2];
        let logp = log_softmax(logits.slice([0..rows, first..ctx - 1, 0..vocab]), 2);
        let targets =
            Tensor::<B, 3, Int>::from_data(TensorData::new(targets, [rows, scored, 1]), &device);
        let picked = logp
            .gather(2, targets)
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| TrainError::Config(format!("reading log-probabilities: {e:?}")))?;
        for lp in picked {
            sums.add(-f64::from(lp));
        }
        done += rows;
        progress(done, windows, &sums.result(done));
    }
    Ok(sums.result(windows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_error_is_llama_cpps() {
        // llama.cpp: nll /= n; nll2 /= n; nll2 -= nll²; err = sqrt(nll2 / (n - 1)) · ppl.
        let mut s = NllSums::default();
        for v in [1.0, 2.0, 3.0, 4.0] {
            s.add(v);
        }
        let r = s.result(1);
        let mean: f64 = 2.5;
        let var: f64 = (1.0 + 4.0 + 9.0 + 16.0) / 4.0 - mean * mean;
        assert!((r.perplexity - mean.exp()).abs() < 1e-12);
        assert!((r.std_error - (var / 3.0).sqrt() * mean.exp()).abs() < 1e-12);
        assert_eq!(r.tokens, 4);
    }

    #[test]
    fn windows_are_whole_and_capped() {
        let s = PerplexitySettings {
            ctx: 512,
            ..Default::default()
        };
        assert_eq!(perplexity_windows(1023, &s), 1);
        assert_eq!(perplexity_windows(1024, &s), 2);
        let capped = PerplexitySettings {
            max_windows: Some(1),
            ..s
        };
        assert_eq!(perplexity_windows(5000, &capped), 1);
    }
}
