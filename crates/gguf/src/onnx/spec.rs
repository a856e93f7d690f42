//! What to export: the structure of a decoder-only Transformer ([`ModelSpec`]), its weights by
//! name ([`Weights`]) and the export options ([`ExportOptions`]).
//!
//! The spec mirrors `kiln_transformer::ModelConfig` field for field, and weights carry Kiln's
//! parameter paths and layouts (a linear layer's weight is `[d_in, d_out]`), so a Kiln model maps
//! onto it without renaming or transposing anything.

use std::collections::BTreeMap;

use super::error::OnnxError;

/// The largest size [`ModelSpec::validate`] accepts for any dimension (2³² − 1), so products of
/// two fit in 64 bits.
pub const MAX_DIM: usize = u32::MAX as usize;

/// How token positions enter the model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Position {
    /// A learned position embedding `pos_emb.weight` `[context_length, d_model]` added to the
    /// token embedding (GPT-2).
    Learned,
    /// Rotary position embedding of queries and keys (Llama).
    Rope {
        /// Base of the rotation frequencies: dimension pair `k` turns by `pos · θ^(-2k/head_dim)`.
        theta: f32,
        /// Which head dimensions are rotated together.
        pairing: RopePairing,
    },
}

/// Which head dimensions RoPE rotates as a pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopePairing {
    /// Adjacent dimensions `(2k, 2k+1)`: GGUF / llama.cpp's layout and Meta's original code.
    Interleaved,
    /// Dimension `k` with `k + head_dim/2`: Hugging Face `transformers`' layout (Kiln's layout
    /// for every Llama it loads, GGUF included: its loader un-permutes GGUF's q/k rows).
    HalfSplit,
}

/// The normalization layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Norm {
    /// LayerNorm: `(x - mean) / sqrt(var + eps) · weight (+ bias)`, exported as ONNX
    /// `LayerNormalization` (opset 17). It has a bias when [`ModelSpec::bias`] is set.
    LayerNorm {
        /// Added to the variance.
        eps: f64,
    },
    /// RMSNorm: `x · 1/sqrt(mean(x²) + eps) · weight`, exported as primitive ops
    /// (`SimplifiedLayerNormalization` is an onnxruntime contrib op, not standard ONNX).
    RmsNorm {
        /// Added to the mean square.
        eps: f64,
    },
}

/// The feed-forward block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mlp {
    /// `down(gelu(up(x)))`, GELU's tanh approximation (GPT-2's `gelu_new`).
    GeluTanh,
    /// `down(gelu(up(x)))`, the exact erf GELU (nanoGPT).
    Gelu,
    /// `down(silu(gate(x)) · up(x))` (Llama).
    SwiGlu,
}

/// The structure of a decoder-only, pre-norm Transformer, as Kiln defines it:
/// `x = tok_emb[ids] (+ pos_emb[pos])`; per block `x += proj(attn(norm1(x)))`,
/// `x += mlp(norm2(x))`; `logits = norm_f(x) · head`, where `head` is `tok_emb`ᵀ when tied and
/// `lm_head.weight` otherwise. Attention is causal, scaled by `1/√head_dim`, with `n_kv_heads`
/// key/value heads each shared by `n_heads / n_kv_heads` consecutive query heads.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    /// Model family, informational (`"gpt2"`, `"llama"`); recorded in the file's metadata.
    pub architecture: String,
    /// Number of token ids.
    pub vocab_size: usize,
    /// Longest sequence: rows of the position embedding, or of the RoPE tables the file holds.
    pub context_length: usize,
    /// Number of Transformer blocks.
    pub n_layers: usize,
    /// Attention (query) heads.
    pub n_heads: usize,
    /// Key/value heads (`n_heads` for multi-head attention, fewer for grouped-query).
    pub n_kv_heads: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Hidden width of the MLP.
    pub d_ff: usize,
    /// Position encoding.
    pub position: Position,
    /// Normalization.
    pub norm: Norm,
    /// Feed-forward block.
    pub mlp: Mlp,
    /// Biases on every linear layer (except an untied `lm_head`) and on LayerNorm (GPT-2).
    pub bias: bool,
    /// A bias on the fused query/key/value projection even when `bias` is false (Qwen2).
    pub qkv_bias: bool,
    /// Whether the output projection is the token embedding, transposed.
    pub tied_embeddings: bool,
}

impl ModelSpec {
    /// Width of one attention head (`d_model / n_heads`).
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads.max(1)
    }

    /// Checks the numbers fit together.
    pub fn validate(&self) -> Result<(), OnnxError> {
        let bad = |msg: String| Err(OnnxError::InvalidSpec(msg));
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
            if v > MAX_DIM {
                return bad(format!("{name} {v} is larger than {MAX_DIM}"));
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
        match (self.position, self.norm) {
            (Position::Rope { theta, .. }, _) if !(theta.is_finite() && theta > 0.0) => {
                return bad(format!("RoPE theta {theta} must be positive and finite"));
            }
            (Position::Rope { .. }, _) if !self.head_dim().is_multiple_of(2) => {
                return bad(format!(
                    "RoPE needs an even head dimension, got {}",
                    self.head_dim()
                ));
            }
            (_, Norm::LayerNorm { eps } | Norm::RmsNorm { eps })
                if !(eps.is_finite() && eps >= 0.0) =>
            {
                return bad(format!("norm eps {eps} must be non-negative and finite"));
            }
            _ => {}
        }
        Ok(())
    }

    /// Every weight the architecture needs, with its shape, in graph order. The names are
    /// Kiln's parameter paths.
    pub fn weight_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (d, ff, v) = (self.d_model, self.d_ff, self.vocab_size);
        let h = self.head_dim();
        let qkv = (self.n_heads + 2 * self.n_kv_heads) * h;
        let mut out = vec![("tok_emb.weight".to_owned(), vec![v, d])];
        if self.position == Position::Learned {
            out.push(("pos_emb.weight".into(), vec![self.context_length, d]));
        }
        let norm_bias = self.bias && matches!(self.norm, Norm::LayerNorm { .. });
        let mut push = |name: String, shape: Vec<usize>, present: bool| {
            if present {
                out.push((name, shape));
            }
        };
        let norm = |push: &mut dyn FnMut(String, Vec<usize>, bool), prefix: &str| {
            push(format!("{prefix}.weight"), vec![d], true);
            push(format!("{prefix}.bias"), vec![d], norm_bias);
        };
        let linear = |push: &mut dyn FnMut(String, Vec<usize>, bool),
                      prefix: &str,
                      d_in: usize,
                      d_out: usize,
                      bias: bool| {
            push(format!("{prefix}.weight"), vec![d_in, d_out], true);
            push(format!("{prefix}.bias"), vec![d_out], bias);
        };
        for i in 0..self.n_layers {
            let p = format!("blocks.{i}");
            norm(&mut push, &format!("{p}.norm1"));
            linear(
                &mut push,
                &format!("{p}.attn.qkv"),
                d,
                qkv,
                self.bias || self.qkv_bias,
            );
            linear(
                &mut push,
                &format!("{p}.attn.proj"),
                self.n_heads * h,
                d,
                self.bias,
            );
            norm(&mut push, &format!("{p}.norm2"));
            if self.mlp == Mlp::SwiGlu {
                linear(&mut push, &format!("{p}.mlp.gate"), d, ff, self.bias);
            }
            linear(&mut push, &format!("{p}.mlp.up"), d, ff, self.bias);
            linear(&mut push, &format!("{p}.mlp.down"), ff, d, self.bias);
        }
        norm(&mut push, "norm_f");
        push("lm_head.weight".into(), vec![d, v], !self.tied_embeddings);
        out
    }
}

/// One weight: its shape and row-major `f32` values.
#[derive(Clone, Debug, PartialEq)]
pub struct Weight {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values, row-major.
    pub data: Vec<f32>,
}

/// The weights of a model by name (Kiln's parameter paths, e.g. `blocks.0.mlp.up.weight`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Weights {
    map: BTreeMap<String, Weight>,
}

impl Weights {
    /// No weights yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a weight; an error if `data` does not fill `shape` or the name is taken.
    pub fn insert(
        &mut self,
        name: impl Into<String>,
        shape: impl Into<Vec<usize>>,
        data: Vec<f32>,
    ) -> Result<(), OnnxError> {
        let (name, shape) = (name.into(), shape.into());
        let expected = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .unwrap_or(usize::MAX);
        if expected != data.len() {
            return Err(OnnxError::DataLength {
                name,
                shape,
                expected,
                found: data.len(),
            });
        }
        if self.map.contains_key(&name) {
            return Err(OnnxError::DuplicateWeight(name));
        }
        self.map.insert(name, Weight { shape, data });
        Ok(())
    }

    /// The weight called `name`.
    pub fn get(&self, name: &str) -> Option<&Weight> {
        self.map.get(name)
    }

    /// Removes and returns the weight called `name`.
    pub fn remove(&mut self, name: &str) -> Option<Weight> {
        self.map.remove(name)
    }

    /// Names in sorted order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(String::as_str)
    }

    /// Number of weights.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// How to export.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ExportOptions {
    /// Add past key/value inputs and present key/value outputs for incremental decoding (with
    /// `attention_mask` and `position_ids` inputs), as Hugging Face Optimum and
    /// onnxruntime-genai name them.
    pub kv_cache: bool,
    /// `producer_version` recorded in the file (e.g. Kiln's version).
    pub producer_version: String,
}
