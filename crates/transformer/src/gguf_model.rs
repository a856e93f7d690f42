//! Llama-architecture GGUF files (llama.cpp's format): config from metadata, weights dequantized to
//! f32 and mapped onto Kiln's parameters.
//!
//! GGUF stores each linear weight as `[out, in]` (ggml dims `[in, out]`); Kiln's layout is `[in, out]`,
//! with Q, K and V fused. llama.cpp permutes Q and K so that RoPE rotates adjacent pairs; the loader
//! undoes that permutation, so GGUF models run with [`RopePairing::HalfSplit`] like HF checkpoints.

use kiln_gguf::blocks::dequantize_to_vec;
use kiln_gguf::{GgufFile, TensorInfo};
use rayon::prelude::*;

use crate::config::{MlpKind, ModelConfig, NormKind, PositionEncoding, RopePairing};
use crate::error::{ModelError, Result};
use crate::weights::{LlamaBlock, NamedTensor, Source, llama_block, transpose};

/// The model structure a GGUF file describes (`general.architecture == "llama"`).
pub fn config_from_gguf(file: &GgufFile) -> Result<ModelConfig> {
    let arch = file.get_str("general.architecture")?;
    if arch != "llama" {
        return Err(ModelError::UnknownArchitecture(arch.to_owned()));
    }
    let key = |k: &str| format!("{arch}.{k}");
    let n_heads = file.get_u64(&key("attention.head_count"))? as usize;
    let d_model = file.get_u64(&key("embedding_length"))? as usize;
    let vocab_size = match file.get("tokenizer.ggml.tokens") {
        Some(_) => file.get_string_array("tokenizer.ggml.tokens")?.len(),
        None => file.get_u64(&key("vocab_size"))? as usize,
    };
    let config = ModelConfig {
        architecture: arch.to_owned(),
        vocab_size,
        context_length: file.get_u64(&key("context_length"))? as usize,
        n_layers: file.get_u64(&key("block_count"))? as usize,
        n_heads,
        n_kv_heads: match file.get(&key("attention.head_count_kv")) {
            Some(_) => file.get_u64(&key("attention.head_count_kv"))? as usize,
            None => n_heads,
        },
        d_model,
        d_ff: file.get_u64(&key("feed_forward_length"))? as usize,
        position: PositionEncoding::Rope {
            theta: match file.get(&key("rope.freq_base")) {
                Some(_) => file.get_f32(&key("rope.freq_base"))?,
                None => 10_000.0,
            },
            // The loader reorders Q and K rows so that RoPE rotates half-split pairs (see below).
            pairing: RopePairing::HalfSplit,
        },
        norm: NormKind::RmsNorm {
            eps: f64::from(file.get_f32(&key("attention.layer_norm_rms_epsilon"))?),
        },
        mlp: MlpKind::SwiGlu,
        bias: false,
        tied_embeddings: file.tensor("output.weight").is_none(),
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
            let get = |s: &str, shape: &[usize]| -> Result<Source> {
                let name = format!("blk.{i}.{s}.weight");
                let data = load(file, &name, shape, source)?;
                Ok(Source { name, data })
            };
            let mut q = get("attn_q", &[q_out, d])?;
            q.data = interleaved_to_half_split(q.data, hd, d);
            let mut k = get("attn_k", &[kv_out, d])?;
            k.data = interleaved_to_half_split(k.data, hd, d);
            let block = LlamaBlock {
                attn_norm: get("attn_norm", &[d])?,
                q,
                k,
                v: get("attn_v", &[kv_out, d])?,
                o: get("attn_output", &[d, q_out])?,
                ffn_norm: get("ffn_norm", &[d])?,
                gate: get("ffn_gate", &[ff, d])?,
                up: get("ffn_up", &[ff, d])?,
                down: get("ffn_down", &[d, ff])?,
            };
            Ok(llama_block(i, block, config))
        })
        .collect();
    for layer in layers {
        out.extend(layer?);
    }
    Ok(out)
}
