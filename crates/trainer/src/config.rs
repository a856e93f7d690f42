//! [`TrainConfig`]: everything a training run needs, read from a TOML file and overridable by flags.

use std::path::{Path, PathBuf};

use kiln_transformer::ModelConfig;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// Numeric precision of the forward and backward passes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// bf16 compute, f32 master weights and optimizer state.
    Bf16,
    /// f16 compute with dynamic loss scaling, f32 master weights and optimizer state.
    F16,
}

/// The model to train: a preset (with optional overrides) or a full [`ModelConfig`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ModelSpec {
    /// A named preset (`shakespeare-char`, `shakespeare-char-cpu`, `gpt2`, `gpt2-medium`, `smollm2-135m`).
    Preset {
        /// Preset name.
        preset: String,
        /// Vocabulary size (default: the tokenizer's).
        #[serde(default)]
        vocab_size: Option<usize>,
        /// Dropout override.
        #[serde(default)]
        dropout: Option<f64>,
    },
    /// Every field spelled out.
    Full(ModelConfig),
}

impl ModelSpec {
    /// The model configuration, given the tokenizer's vocabulary size.
    pub fn resolve(&self, tokenizer_vocab: Option<usize>) -> Result<ModelConfig> {
        let config = match self {
            ModelSpec::Full(c) => c.clone(),
            ModelSpec::Preset {
                preset,
                vocab_size,
                dropout,
            } => {
                let vocab = vocab_size.or(tokenizer_vocab);
                let mut c = ModelConfig::preset(preset, vocab)?;
                if let Some(v) = vocab {
                    c.vocab_size = v;
                }
                if let Some(d) = dropout {
                    c.dropout = *d;
                }
                c
            }
        };
        config.validate()?;
        Ok(config)
    }
}

/// A training run's settings. Defaults are nanoGPT's Shakespeare-char CPU recipe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// The model.
    pub model: ModelSpec,
    /// Start from the weights of this model instead of a random initialization (fine-tuning):
    /// any model Kiln loads (`.gguf`, nanoGPT's `ckpt.pt`, a Hugging Face or Kiln model
    /// directory). Its structure replaces `[model]`, and its tokenizer is used when none is
    /// given or prepared beside the data.
    pub init_from: Option<PathBuf>,
    /// Directory with `train.bin` and `val.bin` (from `kiln data prepare`).
    pub data_dir: PathBuf,
    /// Tokenizer saved with every checkpoint (default: `data_dir/tokenizer.json`, which
    /// `kiln data prepare` writes).
    pub tokenizer: Option<PathBuf>,
    /// Sequences per micro-batch.
    pub micro_batch: usize,
    /// Tokens per sequence (at most the model's context).
    pub seq_len: usize,
    /// Micro-batches per optimizer step (`micro_batches` in a pipeline-parallel config: the
    /// pipeline's M).
    #[serde(alias = "micro_batches")]
    pub grad_accum: usize,
    /// Optimizer steps to run.
    pub max_steps: u64,
    /// Peak learning rate.
    pub lr: f64,
    /// Learning rate at the end of the cosine decay.
    pub min_lr: f64,
    /// Linear warmup steps.
    pub warmup_steps: u64,
    /// Step at which the cosine reaches `min_lr` (default: `max_steps`).
    pub decay_steps: Option<u64>,
    /// AdamW β₁.
    pub beta1: f64,
    /// AdamW β₂.
    pub beta2: f64,
    /// AdamW ε.
    pub eps: f64,
    /// Decoupled weight decay, applied as nanoGPT does to every parameter of rank ≥ 2 (the
    /// matrices, embedding tables included), not to biases or norm scales.
    pub weight_decay: f64,
    /// Decay the token and position embedding tables too (default, as nanoGPT). Off exempts them
    /// (Kiln's default before the groups went by rank; runs started then keep it on resume).
    pub decay_embeddings: bool,
    /// Clip the global gradient norm to this (0 = off).
    pub grad_clip: f64,
    /// Compute precision: `f32`, or `bf16` / `f16` forward and backward with f32 master weights
    /// and optimizer state.
    pub precision: Precision,
    /// f16 only: clean steps in a row before the loss scale doubles (PyTorch's default, 2000).
    pub loss_scale_growth_interval: u64,
    /// Recompute cheap activations in the backward pass instead of keeping them (Burn's balanced
    /// checkpointing): less memory, some extra compute. `kiln train` picks the autodiff backend
    /// from this; library users choose `B` themselves.
    pub activation_checkpointing: bool,
    /// Memory budget in GB (10⁹ bytes) for the pre-flight estimate (default: the host's available
    /// memory on CPU backends, no check elsewhere).
    pub max_memory_gb: Option<f64>,
    /// Evaluate every this many steps (0 = only at the end).
    pub eval_interval: u64,
    /// Validation batches per evaluation (0 = the whole split).
    pub eval_batches: usize,
    /// Save a checkpoint every this many steps (0 = only at the end).
    pub checkpoint_interval: u64,
    /// Checkpoints to keep (oldest removed first).
    pub keep_checkpoints: usize,
    /// Seed for initialization, data order and dropout.
    pub seed: u64,
    /// Log every this many steps.
    pub log_interval: u64,
    /// Consecutive non-finite steps before reloading the last checkpoint with a lower LR.
    pub max_bad_steps: u32,
    /// Peak FLOP/s of the device, for MFU (CPU: `../shared/peers/cpu_peak.py`).
    pub peak_flops: Option<f64>,
    /// ZeRO sharding across data-parallel ranks (`kiln-distributed`): 0 = plain data parallel
    /// (every rank holds everything), 1 = shard the optimizer state, 2 = also the gradients, 3 =
    /// also the parameters. Ignored by a single process.
    pub zero_stage: u8,
    /// Tensor (model) parallelism, Megatron-LM style: each layer's matrices split over this
    /// many ranks (`kiln-distributed`; it must divide the heads, KV heads and FFN width).
    pub tensor_parallel: usize,
    /// Pipeline parallelism: the layers split into this many stages, each on its own ranks;
    /// a step runs `grad_accum` (`micro_batches`) micro-batches through them.
    pub pipeline_parallel: usize,
    /// The pipeline schedule: `"1f1b"` (at most P micro-batches of activations per stage) or
    /// `"gpipe"` (all forward passes, then all backward passes).
    pub pipeline_schedule: String,
    /// Layers per pipeline stage (default: balanced by parameter count).
    pub pipeline_stages: Option<Vec<usize>>,
    /// Knowledge distillation from a teacher model (`kiln distill`); none by default.
    pub distill: Option<crate::distill::DistillConfig>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            model: ModelSpec::Preset {
                preset: "shakespeare-char-cpu".into(),
                vocab_size: None,
                dropout: None,
            },
            init_from: None,
            data_dir: PathBuf::from("data"),
            tokenizer: None,
            micro_batch: 12,
            seq_len: 64,
            grad_accum: 1,
            max_steps: 2000,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 100,
            decay_steps: None,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
            decay_embeddings: true,
            grad_clip: 1.0,
            precision: Precision::F32,
            loss_scale_growth_interval: 2000,
            activation_checkpointing: false,
            max_memory_gb: None,
            eval_interval: 250,
            eval_batches: 0,
            checkpoint_interval: 500,
            keep_checkpoints: 2,
            seed: 1337,
            log_interval: 10,
            max_bad_steps: 3,
            peak_flops: None,
            zero_stage: 0,
            tensor_parallel: 1,
            pipeline_parallel: 1,
            pipeline_schedule: "1f1b".into(),
            pipeline_stages: None,
            distill: None,
        }
    }
}

impl TrainConfig {
    /// Reads a TOML file; relative paths in it are taken relative to the file's directory.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
        let mut config: Self = toml::from_str(&text)
            .map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        if config.data_dir.is_relative() {
            config.data_dir = base.join(&config.data_dir);
        }
        for path in [config.tokenizer.as_mut(), config.init_from.as_mut()]
            .into_iter()
            .flatten()
            .filter(|p| p.is_relative())
        {
            *path = base.join(&*path);
        }
        Ok(config)
    }

    /// The config as TOML (what a run directory records).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self)
            .map_err(|e| TrainError::Config(format!("cannot write the config as TOML: {e}")))
    }

    /// Step at which the learning rate reaches `min_lr`.
    pub fn decay_steps(&self) -> u64 {
        self.decay_steps.unwrap_or(self.max_steps)
    }

    /// Checks the numbers fit together.
    pub fn validate(&self, model: &ModelConfig) -> Result<()> {
        let bad = |m: String| Err(TrainError::Config(m));
        if self.micro_batch == 0 || self.seq_len == 0 || self.grad_accum == 0 {
            return bad("micro_batch, seq_len and grad_accum must be positive".into());
        }
        if self.seq_len > model.context_length {
            return bad(format!(
                "seq_len {} exceeds the model's context {}",
                self.seq_len, model.context_length
            ));
        }
        if !(self.lr > 0.0 && self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            return bad(format!(
                "need 0 <= min_lr <= lr and lr > 0 (lr {}, min_lr {})",
                self.lr, self.min_lr
            ));
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return bad("betas must be in [0, 1)".into());
        }
        if self.grad_clip < 0.0 || self.weight_decay < 0.0 {
            return bad("grad_clip and weight_decay must not be negative".into());
        }
        if self.zero_stage > 3 {
            return bad(format!(
                "zero_stage must be 0, 1, 2 or 3, not {}",
                self.zero_stage
            ));
        }
        if self.max_memory_gb.is_some_and(|m| m.is_nan() || m <= 0.0) {
            return bad("max_memory_gb must be positive".into());
        }
        if self.tensor_parallel == 0 || self.pipeline_parallel == 0 {
            return bad("tensor_parallel and pipeline_parallel must be at least 1".into());
        }
        if !matches!(self.pipeline_schedule.as_str(), "1f1b" | "gpipe") {
            return bad(format!(
                "pipeline_schedule must be \"1f1b\" or \"gpipe\", not {:?}",
                self.pipeline_schedule
            ));
        }
        if let Some(distill) = &self.distill {
            distill.validate()?;
            if self.model_parallel() {
                return bad(
                    "distillation with tensor or pipeline parallelism is not supported: use data \
                     parallelism (--nproc with tensor_parallel = pipeline_parallel = 1)"
                        .into(),
                );
            }
        }
        if self.model_parallel() {
            if self.zero_stage != 0 {
                return bad(format!(
                    "zero_stage {} with tensor or pipeline parallelism: ZeRO shards data-parallel \
                     replicas of the whole model; use one or the other",
                    self.zero_stage
                ));
            }
            if self.precision != Precision::F32 {
                return bad(format!(
                    "precision {} with tensor or pipeline parallelism: only f32 is supported there",
                    self.precision.name()
                ));
            }
        }
        Ok(())
    }

    /// Whether the run splits the model (tensor or pipeline parallelism).
    pub fn model_parallel(&self) -> bool {
        self.tensor_parallel > 1 || self.pipeline_parallel > 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_round_trip_and_presets() {
        let text = r#"
            data_dir = "shards"
            max_steps = 20
            [model]
            preset = "shakespeare-char-cpu"
            vocab_size = 257
        "#;
        let c: TrainConfig = toml::from_str(text).unwrap();
        assert_eq!(c.max_steps, 20);
        assert_eq!(c.micro_batch, 12);
        let m = c.model.resolve(None).unwrap();
        assert_eq!((m.n_layers, m.d_model, m.vocab_size), (4, 128, 257));
        let again: TrainConfig = toml::from_str(&c.to_toml().unwrap()).unwrap();
        assert_eq!(again, c);
        assert!(toml::from_str::<TrainConfig>("bogus = 1").is_err());
        let mut bad = c.clone();
        bad.seq_len = 1000;
        assert!(
            bad.validate(&m)
                .unwrap_err()
                .to_string()
                .contains("context")
        );
    }
}
