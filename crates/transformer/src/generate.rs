//! Autoregressive generation: prefill the prompt in one pass, then one token per step through the
//! KV cache, sampling each token, stopping on stop ids, stop strings or the token limit, and
//! streaming UTF-8-safe text as it goes.

use std::time::{Duration, Instant};

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use kiln_bpe::{StreamDecoder, Tokenizer};

use crate::cache::KvCache;
use crate::error::{ModelError, Result};
use crate::model::{Logits, Transformer};
use crate::sampling::{Sampler, SamplingParams};

/// What to generate and when to stop.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateParams {
    /// Most tokens to generate.
    pub max_new_tokens: usize,
    /// How each token is picked.
    pub sampling: SamplingParams,
    /// Token ids that end generation (not included in the output).
    pub stop_ids: Vec<u32>,
    /// Strings that end generation (not included in the output).
    pub stop_strings: Vec<String>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            sampling: SamplingParams::default(),
            stop_ids: Vec::new(),
            stop_strings: Vec::new(),
        }
    }
}

/// Why generation ended (OpenAI's `finish_reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop id or stop string was produced.
    Stop,
    /// The token limit (or the context) was reached.
    Length,
}

impl FinishReason {
    /// `"stop"` or `"length"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// One step of output: the token(s) consumed and the text that is now safe to show.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    /// Tokens generated in this step (empty for the final flush).
    pub ids: Vec<u32>,
    /// Text released by this step (may be empty while a character or a possible stop string is incomplete).
    pub text: String,
}

/// Timing and counts of a generation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationStats {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens (stop tokens excluded).
    pub generated_tokens: usize,
    /// Time of the prompt's forward pass.
    pub prefill: Duration,
    /// Time of all single-token steps.
    pub decode: Duration,
}

impl GenerationStats {
    /// Prompt tokens per second.
    pub fn prefill_tokens_per_second(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill.as_secs_f64().max(1e-9)
    }

    /// Generated tokens per second (decode steps only).
    pub fn decode_tokens_per_second(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode.as_secs_f64().max(1e-9)
    }
}

/// A finished generation.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// Generated ids (stop tokens excluded).
    pub ids: Vec<u32>,
    /// Generated text (stop strings excluded).
    pub text: String,
    /// Why it ended.
    pub finish: FinishReason,
    /// Counts and timings.
    pub stats: GenerationStats,
}

/// The model-free half of generating one sequence: picks each next token from the logits the
/// caller computed, applies the stop rules, and releases text as it becomes safe to show.
///
/// [`Generator`] pairs it with a model and a private KV cache; a serving engine keeps one per
/// request and computes the logits of many sequences in one batched step.
#[derive(Debug)]
pub struct Sequence {
    params: GenerateParams,
    sampler: Sampler,
    history: Vec<u32>,
    prompt_len: usize,
    decoder: StreamDecoder,
    held: String,
    text: String,
    /// The last sampled token, not yet fed to the model.
    pending: Option<u32>,
    finish: Option<FinishReason>,
}

impl Sequence {
    /// Checks `prompt` against the model (`vocab_size` tokens, `context` positions) and prepares
    /// to continue it.
    pub fn new(
        prompt: &[u32],
        params: GenerateParams,
        vocab_size: usize,
        context: usize,
    ) -> Result<Self> {
        if prompt.is_empty() {
            return Err(ModelError::InvalidArgument(
                "the prompt has no tokens".into(),
            ));
        }
        if prompt.len() >= context {
            return Err(ModelError::ContextOverflow {
                needed: prompt.len() + 1,
                limit: context,
            });
        }
        if let Some(&bad) = prompt.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(ModelError::InvalidArgument(format!(
                "prompt token {bad} is outside the vocabulary"
            )));
        }
        Ok(Self {
            sampler: Sampler::new(params.sampling.clone())?,
            history: prompt.to_vec(),
            prompt_len: prompt.len(),
            decoder: StreamDecoder::new(),
            held: String::new(),
            text: String::new(),
            pending: None,
            finish: None,
            params,
        })
    }

    /// The prompt's tokens.
    pub fn prompt(&self) -> &[u32] {
        &self.history[..self.prompt_len]
    }

    /// Tokens generated so far (stop tokens excluded).
    pub fn generated(&self) -> &[u32] {
        &self.history[self.prompt_len..]
    }

    /// Text released so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The token to feed the model next (the last one sampled), if generation goes on.
    pub fn pending(&self) -> Option<u32> {
        self.pending.filter(|_| self.finish.is_none())
    }

    /// Why generation ended, once it has.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    /// Picks the next token from `logits` (the model's output after the prompt, or after the
    /// [`pending`](Self::pending) token) and returns the text that is now safe to show. `Ok(None)`
    /// once generation has ended.
    pub fn accept(&mut self, tokenizer: &Tokenizer, logits: &[f32]) -> Result<Option<Piece>> {
        if self.finish.is_some() {
            return Ok(None);
        }
        self.pending = None;
        if self.generated().len() >= self.params.max_new_tokens {
            return Ok(self.end(FinishReason::Length, Vec::new()));
        }
        let id = self.sampler.sample(logits, &self.history)?;
        if self.params.stop_ids.contains(&id) {
            return Ok(self.end(FinishReason::Stop, Vec::new()));
        }
        self.history.push(id);
        self.pending = Some(id);
        self.held.push_str(&self.decoder.push(tokenizer, id)?);
        if let Some(at) = earliest_stop(&self.held, &self.params.stop_strings) {
            self.held.truncate(at);
            return Ok(self.end(FinishReason::Stop, vec![id]));
        }
        if self.generated().len() >= self.params.max_new_tokens {
            return Ok(self.end(FinishReason::Length, vec![id]));
        }
        let keep = longest_stop_prefix_suffix(&self.held, &self.params.stop_strings);
        let release = self.held.len() - keep;
        let text: String = self.held.drain(..release).collect();
        self.text.push_str(&text);
        Ok(Some(Piece {
            ids: vec![id],
            text,
        }))
    }

    /// Ends generation (say, when the context is full), releasing whatever text was held back.
    pub fn end(&mut self, reason: FinishReason, ids: Vec<u32>) -> Option<Piece> {
        if self.finish.is_some() {
            return None;
        }
        self.finish = Some(reason);
        let mut text = std::mem::take(&mut self.held);
        if reason == FinishReason::Length {
            text.push_str(&self.decoder.finish());
        }
        self.text.push_str(&text);
        (!text.is_empty() || !ids.is_empty()).then_some(Piece { ids, text })
    }
}

/// A streaming generator: call [`Generator::next_piece`] (or iterate) until it returns `None`.
pub struct Generator<'a, B: Backend> {
    model: &'a Transformer<B>,
    tokenizer: &'a Tokenizer,
    sequence: Sequence,
    cache: KvCache<B>,
    started: bool,
    stats: GenerationStats,
}

impl<'a, B: Backend> Generator<'a, B> {
    /// Prepares to continue `prompt` (token ids); nothing runs until the first piece is asked for.
    pub fn new(
        model: &'a Transformer<B>,
        tokenizer: &'a Tokenizer,
        prompt: &[u32],
        params: GenerateParams,
    ) -> Result<Self> {
        let config = model.config();
        let capacity = (prompt.len() + params.max_new_tokens).min(config.context_length);
        let sequence = Sequence::new(prompt, params, config.vocab_size, config.context_length)?;
        let device = model.tok_emb.weight.device();
        Ok(Self {
            cache: KvCache::new(config, 1, capacity, &device)?,
            model,
            tokenizer,
            sequence,
            started: false,
            stats: GenerationStats {
                prompt_tokens: prompt.len(),
                ..GenerationStats::default()
            },
        })
    }

    /// Why generation ended, once it has.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.sequence.finish_reason()
    }

    /// Counts and timings so far.
    pub fn stats(&self) -> &GenerationStats {
        &self.stats
    }

    fn forward(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        let device = self.model.tok_emb.weight.device();
        let input = token_rows::<B>(&[ids], &device);
        let logits = self
            .model
            .forward_cached(input, &mut self.cache, None, Logits::Last)?;
        logits_rows(logits).map(|mut rows| rows.swap_remove(0))
    }

    /// Generates the next token; `Ok(None)` once generation has ended.
    pub fn next_piece(&mut self) -> Result<Option<Piece>> {
        if self.sequence.finish_reason().is_some() {
            return Ok(None);
        }
        let logits = if !self.started {
            self.started = true;
            let t = Instant::now();
            let prompt = self.sequence.prompt().to_vec();
            let logits = self.forward(&prompt)?;
            self.stats.prefill = t.elapsed();
            logits
        } else {
            let Some(last) = self.sequence.pending() else {
                return Ok(None);
            };
            if self.cache.lens()[0] >= self.cache.capacity() {
                return Ok(self.sequence.end(FinishReason::Length, Vec::new()));
            }
            let t = Instant::now();
            let logits = self.forward(&[last])?;
            self.stats.decode += t.elapsed();
            logits
        };
        let piece = self.sequence.accept(self.tokenizer, &logits)?;
        self.stats.generated_tokens = self.sequence.generated().len();
        Ok(piece)
    }

    /// Runs to the end and returns everything generated.
    pub fn run(mut self) -> Result<Generation> {
        while self.next_piece()?.is_some() {}
        Ok(Generation {
            ids: self.sequence.generated().to_vec(),
            text: self.sequence.text().to_owned(),
            finish: self
                .sequence
                .finish_reason()
                .unwrap_or(FinishReason::Length),
            stats: self.stats,
        })
    }
}

impl<B: Backend> Iterator for Generator<'_, B> {
    type Item = Result<Piece>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_piece().transpose()
    }
}

/// Token rows of equal length as a `[rows, len]` tensor.
pub fn token_rows<B: Backend>(rows: &[&[u32]], device: &B::Device) -> Tensor<B, 2, Int> {
    let len = rows.first().map_or(0, |r| r.len());
    let flat: Vec<i64> = rows
        .iter()
        .flat_map(|r| r.iter().map(|&i| i64::from(i)))
        .collect();
    Tensor::from_data(TensorData::new(flat, [rows.len(), len]), device)
}

/// `[rows, 1, vocab]` logits as one `Vec` per row.
pub fn logits_rows<B: Backend>(logits: Tensor<B, 3>) -> Result<Vec<Vec<f32>>> {
    let [rows, _, vocab] = logits.dims();
    let flat = logits
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| ModelError::InvalidArgument(format!("reading logits: {e:?}")))?;
    if flat.len() != rows * vocab {
        return Err(ModelError::InvalidArgument(format!(
            "expected {rows}×{vocab} logits, got {}",
            flat.len()
        )));
    }
    Ok(flat.chunks_exact(vocab).map(<[f32]>::to_vec).collect())
}

/// Byte offset of the earliest complete stop string in `text`.
fn earliest_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}

/// Length of the longest suffix of `text` that starts some stop string (held back until resolved).
fn longest_stop_prefix_suffix(text: &str, stops: &[String]) -> usize {
    let mut keep = 0;
    for stop in stops {
        for (i, _) in stop.char_indices().skip(1) {
            if i > keep && text.ends_with(&stop[..i]) {
                keep = i;
            }
        }
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_string_helpers() {
        let stops = vec!["<|im_end|>".to_owned(), "\n\n".to_owned()];
        assert_eq!(earliest_stop("ab\n\ncd<|im_end|>", &stops), Some(2));
        assert_eq!(earliest_stop("abc", &stops), None);
        assert_eq!(longest_stop_prefix_suffix("hello <|im", &stops), 4);
        assert_eq!(longest_stop_prefix_suffix("hello\n", &stops), 1);
        assert_eq!(longest_stop_prefix_suffix("hello", &stops), 0);
    }
}
