//! Causal self-attention `softmax(QKᵀ/√d_k)·V` with grouped-query heads, RoPE and a KV cache.

use std::sync::Arc;

use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::backend::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, Tensor};

use crate::cache::{CacheSlots, LayerKv};
use crate::config::{ModelConfig, RopePairing};
use crate::linear::{INIT_STD, Projection};
use crate::parallel::TensorParallel;
use crate::rope::RopeAngles;

/// Multi-head causal self-attention with a fused QKV projection.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// `[d_model, (n_heads + 2·n_kv_heads)·head_dim]`: queries, then keys, then values.
    pub qkv: Projection<B>,
    /// `[n_heads·head_dim, d_model]` output projection.
    pub proj: Projection<B>,
    /// Dropout on the output projection (training only; the block applies it).
    pub dropout: Dropout,
    /// Query heads.
    #[module(skip)]
    pub n_heads: usize,
    /// Key/value heads.
    #[module(skip)]
    pub n_kv_heads: usize,
    /// Width of one head.
    #[module(skip)]
    pub head_dim: usize,
    /// Keys and values rounded to f16 as they are computed, as llama.cpp's default (F16) KV cache
    /// holds them: set for models run from a GGUF file's quantized blocks, whose 8-bit activations
    /// already compute as llama.cpp does, so that their logits track llama.cpp's on the same file.
    /// Only where the host kernels run (Flex): on a GPU such a model computes with its weights
    /// dequantized, in the backend's float type.
    #[module(skip)]
    pub kv_f16: bool,
}

/// Per-forward inputs shared by every layer.
pub(crate) struct AttentionContext<B: Backend> {
    /// RoPE angles, for rotary models.
    pub rope: Option<(RopeAngles<B>, RopePairing)>,
    /// Explicit mask (`true` = hidden), `[batch, heads, q, k]`; when `None`, plain causal masking.
    pub mask: Option<Tensor<B, 4, Bool>>,
    /// Where each row's new keys go in the cache, if a cache is used.
    pub cache: Option<CacheSlots>,
    /// The tensor-parallel group's operators, when this rank holds some of every layer's heads.
    pub tensor_parallel: Option<Arc<dyn TensorParallel<B>>>,
}

impl<B: Backend> Attention<B> {
    /// A freshly initialized layer (nanoGPT init; the output projection scaled by 1/√(2·layers)).
    pub fn new(config: &ModelConfig, device: &B::Device) -> Self {
        let h = config.head_dim();
        let width = (config.n_heads + 2 * config.n_kv_heads) * h;
        let residual_std = INIT_STD / (2.0 * config.n_layers as f64).sqrt();
        Self {
            qkv: Projection::new(
                config.d_model,
                width,
                config.bias || config.qkv_bias,
                INIT_STD,
                device,
            ),
            proj: Projection::new(
                config.n_heads * h,
                config.d_model,
                config.bias,
                residual_std,
                device,
            ),
            dropout: DropoutConfig::new(config.dropout).init(),
            n_heads: config.n_heads,
            n_kv_heads: config.n_kv_heads,
            head_dim: h,
            kv_f16: false,
        }
    }

    /// `x`: `[batch, seq, d_model]` → `[batch, seq, d_model]`, the output projection before
    /// dropout (a partial sum under tensor parallelism).
    pub(crate) fn forward(
        &self,
        x: Tensor<B, 3>,
        ctx: &AttentionContext<B>,
        mut kv: Option<&mut LayerKv<B>>,
    ) -> Tensor<B, 3> {
        let [b, t, _] = x.dims();
        let (h, kvh, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let qkv = self.qkv.forward(x);
        let round_kv = self.kv_f16 && kiln_kernels::runs_host_kernels::<B>();
        if t > 1
            && !round_kv
            && ctx.rope.is_none()
            && ctx.mask.is_none()
            && ctx.cache.is_none()
            && let Some(y) = kiln_kernels::fused::ops::<B>()
                .and_then(|fused| fused.causal_attention_packed(&qkv, h, kvh))
        {
            // Plain causal attention (GPT-2 in training and evaluation): the kernel reads the
            // heads in place and its backward pass returns the projection's gradient whole.
            return self.proj.forward(y);
        }
        // Heads first, then the slices: slicing the last dimension and then splitting it into
        // heads would copy each slice (a reshape of a strided view), in both passes.
        let qkv = qkv.reshape([b, t, h + 2 * kvh, d]);
        let split = |from: usize, heads: usize| {
            qkv.clone()
                .slice([0..b, 0..t, from..from + heads, 0..d])
                .swap_dims(1, 2)
        };
        let (mut q, mut k, mut v) = (split(0, h), split(h, kvh), split(h + kvh, kvh));
        if let Some((angles, pairing)) = &ctx.rope {
            q = angles.apply(q, *pairing);
            k = angles.apply(k, *pairing);
        }
        if round_kv {
            let rounded = |x: Tensor<B, 4>| {
                let dtype = x.dtype();
                x.cast(DType::F16).cast(dtype)
            };
            k = rounded(k);
            v = rounded(v);
        }
        if t == 1
            && ctx.mask.is_none()
            && let (Some(layer), Some(slots)) = (kv.as_deref_mut(), &ctx.cache)
            && let [row] = slots.rows[..]
            && let Some(fused) = kiln_kernels::fused::ops::<B>()
        {
            // One sequence decoding: attention reads the cache's blocks in place.
            layer.store(k.clone(), v.clone(), slots);
            let (keys, values) = layer.blocks(row, slots.keys_len);
            let q1 = q.clone().reshape([b, kvh, h / kvh, d]);
            let y = fused.decode_attention(&q1, &keys, &values, Some(&[slots.keys_len]));
            if let Some(y) = y {
                return self.proj.forward(y.reshape([b, t, h * d]));
            }
        }
        if t > 1
            && ctx.mask.is_none()
            && let Some(slots) = &ctx.cache
            && slots.starts.iter().all(|&s| s == 0)
            && let Some(y) =
                kiln_kernels::fused::ops::<B>().and_then(|f| f.causal_attention(&q, &k, &v))
        {
            // A prompt's first pass: its keys are all there is, so the fused causal attention
            // reads them as they are (no copy per query head), and the cache only stores them.
            if let Some(layer) = kv {
                layer.store(k, v, slots);
            }
            return self.proj.forward(y.swap_dims(1, 2).reshape([b, t, h * d]));
        }
        let (k, v) = match (kv, &ctx.cache) {
            (Some(layer), Some(slots)) => layer.write(k, v, slots),
            _ => (k, v),
        };
        let y = if t == 1 {
            // One new token per row: fold each KV head's group of query heads into the query axis
            // instead of copying the keys and values once per query head.
            let rep = h / kvh;
            let q = q.reshape([b, kvh, rep, d]);
            // Rows of different lengths see their own keys: the first `start + 1` (`ragged_mask`).
            let keys: Option<Vec<usize>> = match (&ctx.mask, &ctx.cache) {
                (None, _) => None,
                (Some(_), Some(slots)) => Some(slots.starts.iter().map(|s| s + 1).collect()),
                (Some(_), None) => Some(Vec::new()),
            };
            let fused = match &keys {
                Some(keys) if keys.is_empty() => None,
                keys => kiln_kernels::fused::ops::<B>().and_then(|f| {
                    f.decode_attention(
                        &q,
                        std::slice::from_ref(&k),
                        std::slice::from_ref(&v),
                        keys.as_deref(),
                    )
                }),
            };
            if let Some(y) = fused {
                return self.proj.forward(y.reshape([b, t, h * d]));
            }
            let mask = ctx.mask.clone().map(|m| {
                let keys = m.dims()[3];
                m.reshape([b, kvh, rep, keys])
            });
            let options = AttentionModuleOptions {
                scale: None,
                softcap: None,
                is_causal: false,
            };
            attention(q, k, v, mask, None, options).reshape([b, t, h * d])
        } else if let Some(y) = fused_causal(ctx, &q, &k, &v) {
            y.swap_dims(1, 2).reshape([b, t, h * d])
        } else {
            let k = repeat_kv(k, h / kvh);
            let v = repeat_kv(v, h / kvh);
            let options = AttentionModuleOptions {
                scale: None,
                softcap: None,
                is_causal: ctx.mask.is_none(),
            };
            let y = attention(q, k, v, ctx.mask.clone(), None, options);
            y.swap_dims(1, 2).reshape([b, t, h * d])
        };
        self.proj.forward(y)
    }
}

/// The backend's fused causal attention, when one is installed and the pass is a plain causal one
/// (no padding mask, no cache).
fn fused_causal<B: Backend>(
    ctx: &AttentionContext<B>,
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
) -> Option<Tensor<B, 4>> {
    if ctx.mask.is_some() || ctx.cache.is_some() {
        return None;
    }
    kiln_kernels::fused::ops::<B>()?.causal_attention(q, k, v)
}

/// Repeats each key/value head `n` times so grouped-query attention lines up with the query heads.
fn repeat_kv<B: Backend>(x: Tensor<B, 4>, n: usize) -> Tensor<B, 4> {
    if n == 1 {
        return x;
    }
    let [b, kvh, t, d] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, kvh, n, t, d])
        .reshape([b, kvh * n, t, d])
}
