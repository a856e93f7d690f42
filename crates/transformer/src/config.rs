//! [`ModelConfig`]: the structure of a decoder-only Transformer, saved as `config.json` beside
//! every set of weights.

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// How token positions enter the model.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PositionEncoding {
    /// A learned position embedding added to the token embedding (GPT-2).
    Learned,
    /// Rotary position embedding applied to queries and keys (Llama).
    Rope {
        /// Base of the rotation frequencies (10,000 for Llama 2, 100,000 for SmolLM2).
        theta: f32,
        /// Which dimensions are rotated together.
        pairing: RopePairing,
    },
}

/// Which head dimensions RoPE rotates as a pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RopePairing {
    /// Adjacent dimensions `(2i, 2i+1)` — GGUF / llama.cpp's layout and Meta's original code.
    Interleaved,
    /// Dimension `i` with `i + head_dim/2` — Hugging Face `transformers`' layout.
    HalfSplit,
}

/// The normalization layer.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum NormKind {
    /// LayerNorm (mean and variance; with a bias when the model has biases).
    LayerNorm {
        /// Added to the variance.
        eps: f64,
    },
    /// RMSNorm (no mean subtraction, no bias).
    RmsNorm {
        /// Added to the mean square.
        eps: f64,
    },
}

/// The feed-forward block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MlpKind {
    /// `down(gelu(up(x)))` with GELU's tanh approximation (GPT-2's `gelu_new`).
    GeluTanh,
    /// `down(gelu(up(x)))` with the exact erf GELU (PyTorch's `nn.GELU()`, nanoGPT).
    Gelu,
    /// `down(silu(gate(x)) * up(x))` (Llama).
    SwiGlu,
    /// `down(gelu_tanh(gate(x)) * up(x))` (Gemma's GeGLU).
    GeGlu,
}

/// The structure of a decoder-only Transformer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Model family, informational (`"gpt2"`, `"llama"`, …).
    pub architecture: String,
    /// Number of token ids.
    pub vocab_size: usize,
    /// Longest sequence the model supports.
    pub context_length: usize,
    /// Number of Transformer blocks.
    pub n_layers: usize,
    /// Attention (query) heads.
    pub n_heads: usize,
    /// Key/value heads: `n_heads` for multi-head attention, fewer for GQA, 1 for MQA.
    pub n_kv_heads: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Hidden width of the MLP.
    pub d_ff: usize,
    /// Position encoding.
    pub position: PositionEncoding,
    /// Normalization.
    pub norm: NormKind,
    /// Feed-forward block.
    pub mlp: MlpKind,
    /// Whether linear layers (and LayerNorm) carry biases.
    pub bias: bool,
    /// Whether the query, key and value projections carry biases when the others do not (Qwen2).
    #[serde(default)]
    pub qkv_bias: bool,
    /// Whether the output projection reuses the token embedding.
    pub tied_embeddings: bool,
    /// Multiply the token embeddings by √d_model before the first block (Gemma).
    #[serde(default)]
    pub scale_embeddings: bool,
    /// Dropout probability during training.
    pub dropout: f64,
}

impl MlpKind {
    /// Whether the block has a gate (`act(gate(x)) · up(x)`).
    pub fn gated(self) -> bool {
        matches!(self, MlpKind::SwiGlu | MlpKind::GeGlu)
    }
}

impl ModelConfig {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads.max(1)
    }

    /// An error unless `t` tokens fit the context window.
    pub(crate) fn check_context(&self, t: usize) -> Result<()> {
        if t > self.context_length {
            return Err(ModelError::ContextOverflow {
                needed: t,
                limit: self.context_length,
            });
        }
        Ok(())
    }

    /// Checks the numbers fit together; every loader and `init` calls this.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(ModelError::InvalidConfig(msg));
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("context_length", self.context_length),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("d_model", self.d_model),
            ("d_ff", self.d_ff),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if !self.d_model.is_multiple_of(self.n_heads) {
            return bad(format!(
                "d_model {} is not a multiple of n_heads {}",
                self.d_model, self.n_heads
            ));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!(
                "n_heads {} is not a multiple of n_kv_heads {}",
                self.n_heads, self.n_kv_heads
            ));
        }
        if matches!(self.position, PositionEncoding::Rope { .. })
            && !self.head_dim().is_multiple_of(2)
        {
            return bad(format!(
                "RoPE needs an even head dimension, got {}",
                self.head_dim()
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout {} must be in [0, 1)", self.dropout));
        }
        Ok(())
    }

    /// Number of parameters (a tied output projection counted once).
    pub fn num_params(&self) -> usize {
        let (d, h) = (self.d_model, self.head_dim());
        let b = usize::from(self.bias);
        let qkv = d * (self.n_heads + 2 * self.n_kv_heads) * h
            + usize::from(self.bias || self.qkv_bias) * (self.n_heads + 2 * self.n_kv_heads) * h;
        let proj = self.n_heads * h * d + b * d;
        let mlp = match self.mlp {
            MlpKind::SwiGlu | MlpKind::GeGlu => 3 * d * self.d_ff + b * (2 * self.d_ff + d),
            _ => 2 * d * self.d_ff + b * (self.d_ff + d),
        };
        let norm = match self.norm {
            NormKind::LayerNorm { .. } => d * (1 + b),
            NormKind::RmsNorm { .. } => d,
        };
        let block = qkv + proj + mlp + 2 * norm;
        let embed = self.vocab_size * d;
        let pos = match self.position {
            PositionEncoding::Learned => self.context_length * d,
            PositionEncoding::Rope { .. } => 0,
        };
        let head = if self.tied_embeddings {
            0
        } else {
            self.vocab_size * d
        };
        embed + pos + self.n_layers * block + norm + head
    }

    /// Training FLOPs per token at sequence length `seq_len`, llm.c's estimate `6N + 6·L·C·T`.
    pub fn flops_per_token(&self, seq_len: usize) -> f64 {
        6.0 * self.num_params() as f64 + 6.0 * (self.n_layers * self.d_model * seq_len) as f64
    }

    /// nanoGPT's character-level Shakespeare model (6 layers, 6 heads, width 384, context 256).
    pub fn shakespeare_char(vocab_size: usize) -> Self {
        Self {
            architecture: "gpt2".into(),
            vocab_size,
            context_length: 256,
            n_layers: 6,
            n_heads: 6,
            n_kv_heads: 6,
            d_model: 384,
            d_ff: 4 * 384,
            position: PositionEncoding::Learned,
            norm: NormKind::LayerNorm { eps: 1e-5 },
            mlp: MlpKind::Gelu,
            bias: false,
            qkv_bias: false,
            tied_embeddings: true,
            scale_embeddings: false,
            dropout: 0.2,
        }
    }

    /// nanoGPT's CPU Shakespeare recipe (4 layers, 4 heads, width 128, context 64, no dropout).
    pub fn shakespeare_char_cpu(vocab_size: usize) -> Self {
        Self {
            context_length: 64,
            n_layers: 4,
            n_heads: 4,
            n_kv_heads: 4,
            d_model: 128,
            d_ff: 4 * 128,
            dropout: 0.0,
            ..Self::shakespeare_char(vocab_size)
        }
    }

    /// GPT-2 small (124M).
    pub fn gpt2_124m() -> Self {
        Self {
            architecture: "gpt2".into(),
            vocab_size: 50257,
            context_length: 1024,
            n_layers: 12,
            n_heads: 12,
            n_kv_heads: 12,
            d_model: 768,
            d_ff: 3072,
            position: PositionEncoding::Learned,
            norm: NormKind::LayerNorm { eps: 1e-5 },
            mlp: MlpKind::GeluTanh,
            bias: true,
            qkv_bias: false,
            tied_embeddings: true,
            scale_embeddings: false,
            dropout: 0.0,
        }
    }

    /// GPT-2 medium (350M).
    pub fn gpt2_350m() -> Self {
        Self {
            n_layers: 24,
            n_heads: 16,
            n_kv_heads: 16,
            d_model: 1024,
            d_ff: 4096,
            ..Self::gpt2_124m()
        }
    }

    /// SmolLM2-135M (Llama architecture: 30 layers, width 576, 9 heads / 3 KV heads, RoPE θ=1e5).
    pub fn smollm2_135m() -> Self {
        Self {
            architecture: "llama".into(),
            vocab_size: 49152,
            context_length: 8192,
            n_layers: 30,
            n_heads: 9,
            n_kv_heads: 3,
            d_model: 576,
            d_ff: 1536,
            position: PositionEncoding::Rope {
                theta: 100_000.0,
                pairing: RopePairing::HalfSplit,
            },
            norm: NormKind::RmsNorm { eps: 1e-5 },
            mlp: MlpKind::SwiGlu,
            bias: false,
            qkv_bias: false,
            tied_embeddings: true,
            scale_embeddings: false,
            dropout: 0.0,
        }
    }

    /// A preset by name: `shakespeare-char`, `shakespeare-char-cpu`, `gpt2`, `gpt2-medium`, `smollm2-135m`.
    pub fn preset(name: &str, vocab_size: Option<usize>) -> Result<Self> {
        let v = vocab_size.unwrap_or(50257);
        Ok(match name {
            "shakespeare-char" => Self::shakespeare_char(v),
            "shakespeare-char-cpu" => Self::shakespeare_char_cpu(v),
            "gpt2" | "gpt2-124m" => Self::gpt2_124m(),
            "gpt2-medium" | "gpt2-350m" => Self::gpt2_350m(),
            "smollm2-135m" => Self::smollm2_135m(),
            other => {
                return Err(ModelError::InvalidConfig(format!(
                    "unknown preset {other:?} (shakespeare-char, shakespeare-char-cpu, gpt2, gpt2-medium, smollm2-135m)"
                )));
            }
        })
    }

    /// Reads `config.json`.
    pub fn load(path: impl AsRef<std::path::Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let config: Self = serde_json::from_str(&text).map_err(|e| ModelError::Json {
            path: path.to_owned(),
            source: e,
        })?;
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_counts_match_the_published_models() {
        // GPT-2 small: 124,439,808 parameters (HF `GPT2Model`, tied head).
        assert_eq!(ModelConfig::gpt2_124m().num_params(), 124_439_808);
        // GPT-2 medium: 354,823,168.
        assert_eq!(ModelConfig::gpt2_350m().num_params(), 354_823_168);
        // SmolLM2-135M: 134,515,008 (HF `num_parameters()`).
        assert_eq!(ModelConfig::smollm2_135m().num_params(), 134_515_008);
    }

    #[test]
    fn validation_names_the_problem() {
        let mut c = ModelConfig::gpt2_124m();
        c.n_heads = 7;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("multiple of n_heads")
        );
        let json = serde_json::to_string(&ModelConfig::smollm2_135m()).unwrap();
        assert!(json.contains("\"half_split\""));
        let back: ModelConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, ModelConfig::smollm2_135m());
    }
}
