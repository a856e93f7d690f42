//! Kiln models as GGUF files llama.cpp runs: the Llama family's architectures (`llama`, `qwen2`
//! for Q/K/V biases, `gemma` for GeGLU with scaled embeddings) and `gpt2` (`gguf_gpt2`) in
//! llama.cpp's tensor names and layouts, f32 weights, the hyperparameters, the tokenizer and the chat template. The file is
//! what `kiln quantize` starts from for models that are not GGUF files already.
//!
//! The inverse of [`load_gguf`](crate::load_gguf): `llama`'s Q and K rows are permuted back to
//! llama.cpp's interleaved RoPE order (a model that already rotates interleaved pairs keeps its
//! order), Q/K/V are unfused, linear weights are written `[out, in]`.

use std::path::Path;

use burn::tensor::backend::Backend;
use kiln_bpe::Tokenizer;
use kiln_gguf::{GgmlType, GgufValue, GgufWriter};

use crate::config::{MlpKind, ModelConfig, NormKind, PositionEncoding, RopePairing};
use crate::error::{ModelError, Result};
use crate::gguf_gpt2::write_gpt2;
use crate::model::Transformer;
use crate::onnx_export::onnx_weights;
use crate::weights::transpose;

/// The GGUF architecture `config` is written as, or why it cannot be.
fn architecture(config: &ModelConfig) -> Result<&'static str> {
    let unsupported = |why: &str| {
        Err(ModelError::Unsupported(format!(
            "GGUF export of this {} model: {why}",
            config.architecture
        )))
    };
    let PositionEncoding::Rope { pairing, .. } = config.position else {
        let gpt2_like = matches!(config.norm, NormKind::LayerNorm { .. })
            && matches!(config.mlp, MlpKind::Gelu | MlpKind::GeluTanh)
            && config.n_kv_heads == config.n_heads
            && !config.qkv_bias
            && !config.scale_embeddings;
        return if gpt2_like {
            Ok("gpt2")
        } else {
            unsupported("learned positions without GPT-2's LayerNorm, GELU and full heads")
        };
    };
    if !matches!(config.norm, NormKind::RmsNorm { .. }) || config.bias {
        return unsupported("only RMSNorm models without biases (the Llama family) are written");
    }
    match (config.mlp, config.qkv_bias, config.scale_embeddings) {
        (MlpKind::SwiGlu, false, false) => Ok("llama"),
        // llama.cpp's NEOX rotation for these is Kiln's half-split pairing.
        (MlpKind::SwiGlu, true, false) if pairing == RopePairing::HalfSplit => Ok("qwen2"),
        (MlpKind::GeGlu, false, true) if pairing == RopePairing::HalfSplit => Ok("gemma"),
        _ => unsupported("no llama.cpp architecture has this combination of options"),
    }
}

/// Rows of a `[heads·head_dim, d]` projection from Kiln's half-split order to llama.cpp's
/// interleaved one (`convert_hf_to_gguf.py`'s permutation; the inverse of
/// [`interleaved_to_half_split`]).
fn half_split_to_interleaved(rows: Vec<f32>, head_dim: usize, d: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = vec![0.0; rows.len()];
    for (head, block) in rows.chunks_exact(head_dim * d).enumerate() {
        let base = head * head_dim * d;
        for (r, row) in block.chunks_exact(d).enumerate() {
            let to = if r < half { 2 * r } else { 2 * (r - half) + 1 };
            out[base + to * d..base + (to + 1) * d].copy_from_slice(row);
        }
    }
    out
}

/// `model` (with its tokenizer and chat template) as a GGUF file in f32, ready to write
/// ([`GgufWriter::write`] is atomic) or to quantize.
pub fn gguf_writer<B: Backend>(
    model: &Transformer<B>,
    tokenizer: &Tokenizer,
    chat_template: Option<&str>,
    name: &str,
) -> Result<GgufWriter> {
    let config = model.config();
    let arch = architecture(config)?;
    let vocab = config.vocab_size;
    let gguf_error = |e: kiln_gguf::GgufError| ModelError::Gguf(e);
    let mut w = GgufWriter::new();
    let mut metadata = vec![
        (
            "general.architecture".to_owned(),
            GgufValue::String(arch.into()),
        ),
        ("general.name".to_owned(), GgufValue::String(name.into())),
        ("general.file_type".to_owned(), GgufValue::U32(0)),
    ];
    metadata.extend(tokenizer.gguf_metadata(vocab)?);
    if let Some(template) = chat_template {
        metadata.push((
            "tokenizer.chat_template".into(),
            GgufValue::String(template.into()),
        ));
    }
    for (k, v) in metadata {
        w.add_metadata(k, v).map_err(gguf_error)?;
    }
    let weights = onnx_weights(model)?;
    if arch == "gpt2" {
        write_gpt2(&mut w, config, &|name| {
            weights.get(name).map(|w| w.data.as_slice())
        })?;
        return Ok(w);
    }
    let (PositionEncoding::Rope { theta, pairing }, NormKind::RmsNorm { eps }) =
        (config.position, config.norm)
    else {
        unreachable!("architecture() accepts only rotary RMSNorm models besides gpt2");
    };
    let (d, ff, hd) = (config.d_model, config.d_ff, config.head_dim());
    let (q_out, kv_out) = (config.n_heads * hd, config.n_kv_heads * hd);
    let key = |k: &str| format!("{arch}.{k}");
    let u32_of = |v: usize| GgufValue::U32(v as u32);
    let hyperparameters = vec![
        (key("context_length"), u32_of(config.context_length)),
        (key("embedding_length"), u32_of(d)),
        (key("block_count"), u32_of(config.n_layers)),
        (key("feed_forward_length"), u32_of(ff)),
        (key("attention.head_count"), u32_of(config.n_heads)),
        (key("attention.head_count_kv"), u32_of(config.n_kv_heads)),
        (
            key("attention.layer_norm_rms_epsilon"),
            GgufValue::F32(eps as f32),
        ),
        (key("rope.freq_base"), GgufValue::F32(theta)),
        (key("rope.dimension_count"), u32_of(hd)),
        (key("vocab_size"), u32_of(vocab)),
    ];
    for (k, v) in hyperparameters {
        w.add_metadata(k, v).map_err(gguf_error)?;
    }
    let get = |name: &str| -> Result<&[f32]> {
        weights
            .get(name)
            .map(|w| w.data.as_slice())
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_owned(),
                file: "the model".into(),
            })
    };
    let mut add = |name: String, rows: usize, cols: usize, data: Vec<f32>| -> Result<()> {
        let dims: Vec<u64> = if rows == 1 {
            vec![cols as u64]
        } else {
            vec![cols as u64, rows as u64]
        };
        let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        w.add_tensor(name, &dims, GgmlType::F32, bytes)
            .map_err(gguf_error)?;
        Ok(())
    };
    add(
        "token_embd.weight".into(),
        vocab,
        d,
        get("tok_emb.weight")?.to_vec(),
    )?;
    add(
        "output_norm.weight".into(),
        1,
        d,
        get("norm_f.weight")?.to_vec(),
    )?;
    if !config.tied_embeddings {
        add(
            "output.weight".into(),
            vocab,
            d,
            transpose(get("lm_head.weight")?, d, vocab),
        )?;
    }
    // `llama` files hold Q and K in interleaved order unless the model already rotates that way.
    let reorder = arch == "llama" && pairing == RopePairing::HalfSplit;
    for i in 0..config.n_layers {
        let kiln = |s: &str| format!("blocks.{i}.{s}");
        let gguf = |s: &str, kind: &str| format!("blk.{i}.{s}.{kind}");
        // `[d, q + 2kv]` → `[q + 2kv, d]`, then cut into Q, K, V rows.
        let qkv = transpose(get(&kiln("attn.qkv.weight"))?, d, q_out + 2 * kv_out);
        let (q, rest) = qkv.split_at(q_out * d);
        let (k, v) = rest.split_at(kv_out * d);
        let (mut q, mut k) = (q.to_vec(), k.to_vec());
        if reorder {
            q = half_split_to_interleaved(q, hd, d);
            k = half_split_to_interleaved(k, hd, d);
        }
        add(
            gguf("attn_norm", "weight"),
            1,
            d,
            get(&kiln("norm1.weight"))?.to_vec(),
        )?;
        add(gguf("attn_q", "weight"), q_out, d, q)?;
        add(gguf("attn_k", "weight"), kv_out, d, k)?;
        add(gguf("attn_v", "weight"), kv_out, d, v.to_vec())?;
        if config.qkv_bias {
            let bias = get(&kiln("attn.qkv.bias"))?;
            add(gguf("attn_q", "bias"), 1, q_out, bias[..q_out].to_vec())?;
            add(
                gguf("attn_k", "bias"),
                1,
                kv_out,
                bias[q_out..q_out + kv_out].to_vec(),
            )?;
            add(
                gguf("attn_v", "bias"),
                1,
                kv_out,
                bias[q_out + kv_out..].to_vec(),
            )?;
        }
        add(
            gguf("attn_output", "weight"),
            d,
            q_out,
            transpose(get(&kiln("attn.proj.weight"))?, q_out, d),
        )?;
        add(
            gguf("ffn_norm", "weight"),
            1,
            d,
            get(&kiln("norm2.weight"))?.to_vec(),
        )?;
        add(
            gguf("ffn_gate", "weight"),
            ff,
            d,
            transpose(get(&kiln("mlp.gate.weight"))?, d, ff),
        )?;
        add(
            gguf("ffn_up", "weight"),
            ff,
            d,
            transpose(get(&kiln("mlp.up.weight"))?, d, ff),
        )?;
        add(
            gguf("ffn_down", "weight"),
            d,
            ff,
            transpose(get(&kiln("mlp.down.weight"))?, ff, d),
        )?;
    }
    Ok(w)
}

/// Writes `model` as an f32 GGUF file at `path` (see [`gguf_writer`]), atomically.
pub fn save_gguf<B: Backend>(
    model: &Transformer<B>,
    tokenizer: &Tokenizer,
    chat_template: Option<&str>,
    path: impl AsRef<Path>,
) -> Result<()> {
    let path = path.as_ref();
    let name = path
        .file_stem()
        .map_or_else(|| "model".to_owned(), |s| s.to_string_lossy().into_owned());
    gguf_writer(model, tokenizer, chat_template, &name)?
        .write(path)
        .map_err(ModelError::Gguf)
}
