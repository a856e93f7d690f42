//! GGUF files (llama.cpp's format) of the Llama family: `llama` (also Mistral's files, which
//! llama.cpp writes as `llama`), `qwen2`, `phi3` and `gemma`; and `gpt2` (`gguf_gpt2`). Config from metadata, weights dequantized to
//! f32 and mapped onto Kiln's parameters.
//!
//! GGUF stores each linear weight as `[out, in]` (ggml dims `[in, out]`); Kiln's layout is `[in, out]`,
//! with Q, K and V fused. For `llama`, llama.cpp's converter permutes Q and K so that RoPE rotates
//! adjacent pairs; the loader undoes that permutation, so every GGUF model runs with
//! [`RopePairing::HalfSplit`] like HF checkpoints (`qwen2`, `phi3` and `gemma` use llama.cpp's NEOX
//! rotation, which is half-split already).

use kiln_gguf::blocks::dequantize_to_vec;
use kiln_gguf::{GgufFile, TensorInfo};
use rayon::prelude::*;

use crate::config::{MlpKind, ModelConfig, NormKind, PositionEncoding, RopePairing};
use crate::error::{ModelError, Result};
use crate::gguf_gpt2::{config_from_gpt2, tensors_from_gpt2};
use crate::weights::{LlamaBlock, NamedTensor, Source, llama_block, split_rows, transpose};

/// How one architecture's GGUF tensors map onto Kiln's Llama block.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GgufLayout {
    /// The MLP (GeGLU for `gemma`, else SwiGLU).
    pub mlp: MlpKind,
    /// Token embeddings scaled by √d_model (`gemma`).
    pub scale_embeddings: bool,
    /// Q and K rows are in llama.cpp's interleaved RoPE order (`llama`).
    pub permuted_qk: bool,
    /// Q, K and V in one `attn_qkv` tensor (`phi3`).
    pub fused_qkv: bool,
    /// Gate and up in one `ffn_up` tensor, gate first (`phi3`).
    pub fused_gate_up: bool,
    /// `attn_q.bias`, `attn_k.bias`, `attn_v.bias` (`qwen2`).
    pub qkv_bias: bool,
}

/// The architectures Kiln runs from GGUF files.
pub(crate) const GGUF_ARCHITECTURES: &str =
    "llama (Llama 2/3, Mistral, SmolLM2, TinyLlama), qwen2, phi3, gemma, gpt2";

impl GgufLayout {
    /// The layout of `arch`, or `None` for an architecture Kiln does not run.
    pub(crate) fn of(arch: &str) -> Option<Self> {
        let plain = Self {
            mlp: MlpKind::SwiGlu,
            scale_embeddings: false,
            permuted_qk: false,
            fused_qkv: false,
            fused_gate_up: false,
            qkv_bias: false,
        };
        match arch {
            "llama" => Some(Self {
                permuted_qk: true,
                ..plain
            }),
            "qwen2" => Some(Self {
                qkv_bias: true,
                ..plain
            }),
            "phi3" => Some(Self {
                fused_qkv: true,
                fused_gate_up: true,
                ..plain
            }),
            // llama.cpp's converter stores Gemma's norm weights with its `1 +` added.
            "gemma" => Some(Self {
                mlp: MlpKind::GeGlu,
                scale_embeddings: true,
                ..plain
            }),
            _ => None,
        }
    }

    /// The layout of `file`'s architecture.
    pub(crate) fn of_file(file: &GgufFile) -> Result<(&str, Self)> {
        let arch = file.get_str("general.architecture")?;
        let layout = Self::of(arch).ok_or_else(|| ModelError::UnknownArchitecture {
            name: arch.to_owned(),
            supported: GGUF_ARCHITECTURES,
        })?;
        Ok((arch, layout))
    }
}

/// The model structure a GGUF file describes (one of [`GGUF_ARCHITECTURES`]).
pub fn config_from_gguf(file: &GgufFile) -> Result<ModelConfig> {
    if file.get_str("general.architecture")? == "gpt2" {
        return config_from_gpt2(file);
    }
    let (arch, layout) = GgufLayout::of_file(file)?;
    let key = |k: &str| format!("{arch}.{k}");
    let optional_u64 = |k: &str| -> Result<Option<u64>> {
        match file.get(&key(k)) {
            Some(_) => Ok(Some(file.get_u64(&key(k))?)),
            None => Ok(None),
        }
    };
    let n_heads = file.get_u64(&key("attention.head_count"))? as usize;
    let d_model = file.get_u64(&key("embedding_length"))? as usize;
    let vocab_size = match file.get("tokenizer.ggml.tokens") {
        Some(_) => file.get_string_array("tokenizer.ggml.tokens")?.len(),
        None => file.get_u64(&key("vocab_size"))? as usize,
    };
    let unsupported = |what: String| {
        ModelError::InvalidConfig(format!("{arch} GGUF: {what} is not supported by Kiln"))
    };
    // RoPE variants Kiln does not implement are refused rather than run wrongly.
    if let Some(kind) = file.get(&key("rope.scaling.type")).and_then(|v| v.as_str())
        && kind != "none"
    {
        return Err(unsupported(format!("RoPE scaling {kind:?}")));
    }
    if file.tensor("rope_factors_long.weight").is_some()
        || file.tensor("rope_freqs.weight").is_some()
    {
        return Err(unsupported(
            "RoPE frequency factors (long-context RoPE)".into(),
        ));
    }
    let head_dim = d_model / n_heads.max(1);
    if let Some(rot) = optional_u64("rope.dimension_count")?
        && rot as usize != head_dim
    {
        return Err(unsupported(format!(
            "rotating {rot} of each head's {head_dim} dimensions"
        )));
    }
    for k in ["attention.key_length", "attention.value_length"] {
        if let Some(len) = optional_u64(k)?
            && len as usize != head_dim
        {
            return Err(unsupported(format!(
                "{k} {len} apart from embedding_length / head_count = {head_dim}"
            )));
        }
    }
    let mut context_length = file.get_u64(&key("context_length"))? as usize;
    // Sliding-window attention equals full attention over a context no longer than the window.
    if let Some(window) = optional_u64("attention.sliding_window")?.filter(|&w| w > 0) {
        context_length = context_length.min(window as usize);
    }
    let config = ModelConfig {
        architecture: arch.to_owned(),
        vocab_size,
        context_length,
        n_layers: file.get_u64(&key("block_count"))? as usize,
        n_heads,
        n_kv_heads: optional_u64("attention.head_count_kv")?.map_or(n_heads, |n| n as usize),
        d_model,
        d_ff: file.get_u64(&key("feed_forward_length"))? as usize,
        position: PositionEncoding::Rope {
            theta: match file.get(&key("rope.freq_base")) {
                Some(_) => file.get_f32(&key("rope.freq_base"))?,
                None => 10_000.0,
            },
            // The loader reorders `llama`'s Q and K rows so that RoPE rotates half-split pairs.
            pairing: RopePairing::HalfSplit,
        },
        norm: NormKind::RmsNorm {
            eps: f64::from(file.get_f32(&key("attention.layer_norm_rms_epsilon"))?),
        },
        mlp: layout.mlp,
        bias: false,
        qkv_bias: layout.qkv_bias,
        tied_embeddings: file.tensor("output.weight").is_none(),
        scale_embeddings: layout.scale_embeddings,
        dropout: 0.0,
    };
    config.validate()?;
    Ok(config)
}

pub(crate) fn info<'a>(file: &'a GgufFile, name: &str, source: &str) -> Result<&'a TensorInfo> {
    file.tensor(name).ok_or_else(|| ModelError::MissingTensor {
        name: name.to_owned(),
        file: source.to_owned(),
    })
}

/// Tensor `name`'s description, checked to have the `[rows, cols]` shape (row-major) the config
/// implies.
pub(crate) fn shaped<'a>(
    file: &'a GgufFile,
    name: &str,
    shape: &[usize],
    source: &str,
) -> Result<&'a TensorInfo> {
    let t = info(file, name, source)?;
    let found = t.shape();
    if found != shape {
        return Err(ModelError::ShapeMismatch {
            name: name.to_owned(),
            expected: shape.to_vec(),
            found,
        });
    }
    Ok(t)
}

/// Dequantizes one tensor; checks it has the `[rows, cols]` shape (row-major) the config implies.
pub(crate) fn load(file: &GgufFile, name: &str, shape: &[usize], source: &str) -> Result<Vec<f32>> {
    let t = shaped(file, name, shape, source)?;
    dequantize_to_vec(t.ty, file.tensor_data(t), t.n_elements() as usize).map_err(|source| {
        ModelError::Dequant {
            tensor: name.to_owned(),
            source,
        }
    })
}

/// Reorders the rows of a `[heads·head_dim, d]` Q or K projection from llama.cpp's layout (RoPE
/// rotates rows `2i` and `2i+1` of each head) to Hugging Face's (rows `i` and `i + head_dim/2`), the
/// inverse of `convert_hf_to_gguf.py`'s permutation. Attention scores are unchanged (Q and K get the
/// same permutation); the half-split rotation then runs on whole contiguous halves. A row is `d`
/// values: f32 weights, or a row's quantized blocks as bytes.
pub(crate) fn interleaved_to_half_split<T: Copy + Default>(
    rows: Vec<T>,
    head_dim: usize,
    d: usize,
) -> Vec<T> {
    let half = head_dim / 2;
    let mut out = vec![T::default(); rows.len()];
    for (head, block) in rows.chunks_exact(head_dim * d).enumerate() {
        let base = head * head_dim * d;
        for (r, row) in block.chunks_exact(d).enumerate() {
            let to = if r % 2 == 0 { r / 2 } else { half + r / 2 };
            out[base + to * d..base + (to + 1) * d].copy_from_slice(row);
        }
    }
    out
}

/// Every Kiln parameter of `config`, read from `file`.
pub(crate) fn tensors_from_gguf(
    file: &GgufFile,
    config: &ModelConfig,
    source: &str,
) -> Result<Vec<NamedTensor>> {
    if config.architecture == "gpt2" {
        return tensors_from_gpt2(file, config, source);
    }
    let (_, layout) = GgufLayout::of_file(file)?;
    let (d, ff, v) = (config.d_model, config.d_ff, config.vocab_size);
    let (q_out, kv_out) = (
        config.n_heads * config.head_dim(),
        config.n_kv_heads * config.head_dim(),
    );
    let mut out = vec![
        NamedTensor::new(
            "tok_emb.weight",
            "token_embd.weight",
            vec![v, d],
            load(file, "token_embd.weight", &[v, d], source)?,
        ),
        NamedTensor::new(
            "norm_f.weight",
            "output_norm.weight",
            vec![d],
            load(file, "output_norm.weight", &[d], source)?,
        ),
    ];
    if !config.tied_embeddings {
        let w = load(file, "output.weight", &[v, d], source)?;
        out.push(NamedTensor::new(
            "lm_head.weight",
            "output.weight",
            vec![d, v],
            transpose(&w, v, d),
        ));
    }
    let hd = config.head_dim();
    let layers: Vec<Result<Vec<NamedTensor>>> = (0..config.n_layers)
        .into_par_iter()
        .map(|i| {
            let name = |s: &str, kind: &str| format!("blk.{i}.{s}.{kind}");
            let get = |s: &str, shape: &[usize]| -> Result<Source> {
                let name = name(s, "weight");
                let data = load(file, &name, shape, source)?;
                Ok(Source { name, data })
            };
            let (mut q, mut k, v) = if layout.fused_qkv {
                let qkv = get("attn_qkv", &[q_out + 2 * kv_out, d])?;
                let [q, k, v] = split_rows(qkv, [q_out, kv_out, kv_out], d);
                (q, k, v)
            } else {
                (
                    get("attn_q", &[q_out, d])?,
                    get("attn_k", &[kv_out, d])?,
                    get("attn_v", &[kv_out, d])?,
                )
            };
            if layout.permuted_qk {
                q.data = interleaved_to_half_split(q.data, hd, d);
                k.data = interleaved_to_half_split(k.data, hd, d);
            }
            let (gate, up) = if layout.fused_gate_up {
                let [gate, up] = split_rows(get("ffn_up", &[2 * ff, d])?, [ff, ff], d);
                (gate, up)
            } else {
                (get("ffn_gate", &[ff, d])?, get("ffn_up", &[ff, d])?)
            };
            let block = LlamaBlock {
                attn_norm: get("attn_norm", &[d])?,
                q,
                k,
                v,
                o: get("attn_output", &[d, q_out])?,
                ffn_norm: get("ffn_norm", &[d])?,
                gate,
                up,
                down: get("ffn_down", &[d, ff])?,
            };
            let mut tensors = llama_block(i, block, config);
            if layout.qkv_bias {
                let mut bias = Vec::with_capacity(q_out + 2 * kv_out);
                for (s, n) in [("attn_q", q_out), ("attn_k", kv_out), ("attn_v", kv_out)] {
                    bias.extend(load(file, &name(s, "bias"), &[n], source)?);
                }
                tensors.push(NamedTensor::new(
                    format!("blocks.{i}.attn.qkv.bias"),
                    &name("attn_q", "bias"),
                    vec![q_out + 2 * kv_out],
                    bias,
                ));
            }
            Ok(tensors)
        })
        .collect();
    for layer in layers {
        out.extend(layer?);
    }
    Ok(out)
}
