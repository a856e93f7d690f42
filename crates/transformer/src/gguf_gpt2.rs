//! GGUF files of llama.cpp's `gpt2` architecture, both ways: learned positions, LayerNorm with
//! biases, Q/K/V fused in `attn_qkv`, a GELU MLP, every projection with a bias.
//!
//! llama.cpp needs every bias, so a Kiln model without biases (nanoGPT's `bias = False`, Kiln's
//! Shakespeare presets) is written with zero biases: the same function. llama.cpp computes GELU
//! with its tanh approximation; a model trained with the exact GELU is written with
//! `kiln.mlp = "gelu"`, which Kiln honours when it reads the file back (llama.cpp's logits then
//! differ by the two GELUs' difference, about 1e-3 of an activation).

use kiln_gguf::{GgmlType, GgufError, GgufFile, GgufValue, GgufWriter};

use crate::config::{MlpKind, ModelConfig, NormKind, PositionEncoding};
use crate::error::{ModelError, Result};
use crate::gguf_model::load;
use crate::weights::{NamedTensor, transpose};

/// The key recording a Kiln model's exact-GELU MLP.
const MLP_KEY: &str = "kiln.mlp";

/// Each block's norms: (Kiln's name, llama.cpp's).
const NORMS: [(&str, &str); 2] = [("norm1", "attn_norm"), ("norm2", "ffn_norm")];

/// Each block's projections: (Kiln's name, llama.cpp's, inputs, outputs) for width `d`, MLP `ff`.
fn projections(d: usize, ff: usize) -> [(&'static str, &'static str, usize, usize); 4] {
    [
        ("attn.qkv", "attn_qkv", d, 3 * d),
        ("attn.proj", "attn_output", d, d),
        ("mlp.up", "ffn_up", d, ff),
        ("mlp.down", "ffn_down", ff, d),
    ]
}

/// The model structure of a `gpt2` GGUF file.
pub(crate) fn config_from_gpt2(file: &GgufFile) -> Result<ModelConfig> {
    let key = |k: &str| format!("gpt2.{k}");
    let n_heads = file.get_u64(&key("attention.head_count"))? as usize;
    let vocab_size = match file.get("tokenizer.ggml.tokens") {
        Some(_) => file.get_string_array("tokenizer.ggml.tokens")?.len(),
        None => file.get_u64(&key("vocab_size"))? as usize,
    };
    let d_model = file.get_u64(&key("embedding_length"))? as usize;
    let config = ModelConfig {
        architecture: "gpt2".into(),
        vocab_size,
        context_length: file.get_u64(&key("context_length"))? as usize,
        n_layers: file.get_u64(&key("block_count"))? as usize,
        n_heads,
        n_kv_heads: n_heads,
        d_model,
        d_ff: match file.get(&key("feed_forward_length")) {
            Some(_) => file.get_u64(&key("feed_forward_length"))? as usize,
            None => 4 * d_model,
        },
        position: PositionEncoding::Learned,
        norm: NormKind::LayerNorm {
            eps: f64::from(file.get_f32(&key("attention.layer_norm_epsilon"))?),
        },
        mlp: match file.get(MLP_KEY).and_then(|v| v.as_str()) {
            Some("gelu") => MlpKind::Gelu,
            _ => MlpKind::GeluTanh,
        },
        bias: true,
        qkv_bias: false,
        tied_embeddings: file.tensor("output.weight").is_none(),
        scale_embeddings: false,
        dropout: 0.0,
    };
    config.validate()?;
    Ok(config)
}

/// Every Kiln parameter of a `gpt2` file's model.
pub(crate) fn tensors_from_gpt2(
    file: &GgufFile,
    config: &ModelConfig,
    source: &str,
) -> Result<Vec<NamedTensor>> {
    tensors_from_gpt2_except(file, config, source, &|_| false)
}

/// How one of a `gpt2` file's tensors becomes a Kiln parameter.
pub(crate) struct Gpt2Tensor {
    /// Kiln's parameter path.
    pub ours: String,
    /// llama.cpp's tensor name.
    pub theirs: String,
    /// Kiln's shape.
    pub shape: Vec<usize>,
    /// A projection (`[out, in]` in the file, `[in, out]` in Kiln): its `(in, out)`.
    pub linear: Option<(usize, usize)>,
}

/// Every tensor of a `gpt2` file of `config`'s shape, in order.
pub(crate) fn gpt2_tensors(config: &ModelConfig) -> Vec<Gpt2Tensor> {
    let (d, ff, v, ctx) = (
        config.d_model,
        config.d_ff,
        config.vocab_size,
        config.context_length,
    );
    let plain = |ours: String, theirs: String, shape: Vec<usize>| Gpt2Tensor {
        ours,
        theirs,
        shape,
        linear: None,
    };
    let linear = |ours: String, theirs: String, inp: usize, out: usize| Gpt2Tensor {
        ours,
        theirs,
        shape: vec![inp, out],
        linear: Some((inp, out)),
    };
    let mut tensors = vec![
        plain(
            "tok_emb.weight".into(),
            "token_embd.weight".into(),
            vec![v, d],
        ),
        plain(
            "pos_emb.weight".into(),
            "position_embd.weight".into(),
            vec![ctx, d],
        ),
        plain("norm_f.weight".into(), "output_norm.weight".into(), vec![d]),
        plain("norm_f.bias".into(), "output_norm.bias".into(), vec![d]),
    ];
    if !config.tied_embeddings {
        tensors.push(linear(
            "lm_head.weight".into(),
            "output.weight".into(),
            d,
            v,
        ));
    }
    for i in 0..config.n_layers {
        let ours = |s: &str| format!("blocks.{i}.{s}");
        let theirs = |s: &str| format!("blk.{i}.{s}");
        for (norm, name) in NORMS {
            for kind in ["weight", "bias"] {
                tensors.push(plain(
                    ours(&format!("{norm}.{kind}")),
                    theirs(&format!("{name}.{kind}")),
                    vec![d],
                ));
            }
        }
        for (kiln, gguf, inp, out) in projections(d, ff) {
            tensors.push(linear(
                ours(&format!("{kiln}.weight")),
                theirs(&format!("{gguf}.weight")),
                inp,
                out,
            ));
            tensors.push(plain(
                ours(&format!("{kiln}.bias")),
                theirs(&format!("{gguf}.bias")),
                vec![out],
            ));
        }
    }
    tensors
}

/// The Kiln parameters of a `gpt2` file's model but those whose llama.cpp name `skip` names.
pub(crate) fn tensors_from_gpt2_except(
    file: &GgufFile,
    config: &ModelConfig,
    source: &str,
    skip: &dyn Fn(&str) -> bool,
) -> Result<Vec<NamedTensor>> {
    gpt2_tensors(config)
        .into_iter()
        .filter(|t| !skip(&t.theirs))
        .map(|t| {
            let data = match t.linear {
                // `[out, in]` in the file, `[in, out]` in Kiln.
                Some((inp, out)) => {
                    transpose(&load(file, &t.theirs, &[out, inp], source)?, out, inp)
                }
                None => load(file, &t.theirs, &t.shape, source)?,
            };
            Ok(NamedTensor::new(t.ours, &t.theirs, t.shape, data))
        })
        .collect()
}

/// Writes the hyperparameters and tensors of a GPT-2-style `config` (its weights by Kiln name
/// from `get`) into `w`, as llama.cpp's `gpt2` architecture reads them.
pub(crate) fn write_gpt2<'a>(
    w: &mut GgufWriter,
    config: &ModelConfig,
    get: &dyn Fn(&str) -> Option<&'a [f32]>,
) -> Result<()> {
    let NormKind::LayerNorm { eps } = config.norm else {
        return Err(ModelError::Unsupported("gpt2 GGUF needs LayerNorm".into()));
    };
    let (d, ff, v, ctx) = (
        config.d_model,
        config.d_ff,
        config.vocab_size,
        config.context_length,
    );
    let u32_of = |n: usize| GgufValue::U32(n as u32);
    let mut metadata = vec![
        ("gpt2.context_length".to_owned(), u32_of(ctx)),
        ("gpt2.embedding_length".into(), u32_of(d)),
        ("gpt2.feed_forward_length".into(), u32_of(ff)),
        ("gpt2.block_count".into(), u32_of(config.n_layers)),
        ("gpt2.attention.head_count".into(), u32_of(config.n_heads)),
        (
            "gpt2.attention.layer_norm_epsilon".into(),
            GgufValue::F32(eps as f32),
        ),
    ];
    if config.mlp == MlpKind::Gelu {
        metadata.push((MLP_KEY.into(), GgufValue::String("gelu".into())));
    }
    let err = |e: GgufError| ModelError::Gguf(e);
    for (k, value) in metadata {
        w.add_metadata(k, value).map_err(err)?;
    }
    let need = |name: &str| -> Result<&'a [f32]> {
        get(name).ok_or_else(|| ModelError::MissingTensor {
            name: name.to_owned(),
            file: "the model".into(),
        })
    };
    // A bias the model does not have is written as zeros: llama.cpp requires every one.
    let bias = |name: &str, n: usize| -> Vec<f32> {
        get(name).map_or_else(|| vec![0.0; n], <[f32]>::to_vec)
    };
    let mut add = |name: String, dims: &[usize], data: Vec<f32>| -> Result<()> {
        let dims: Vec<u64> = dims.iter().rev().map(|&n| n as u64).collect();
        let bytes = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        w.add_tensor(name, &dims, GgmlType::F32, bytes)
            .map_err(err)?;
        Ok(())
    };
    add(
        "token_embd.weight".into(),
        &[v, d],
        need("tok_emb.weight")?.to_vec(),
    )?;
    add(
        "position_embd.weight".into(),
        &[ctx, d],
        need("pos_emb.weight")?.to_vec(),
    )?;
    add(
        "output_norm.weight".into(),
        &[d],
        need("norm_f.weight")?.to_vec(),
    )?;
    add("output_norm.bias".into(), &[d], bias("norm_f.bias", d))?;
    if !config.tied_embeddings {
        add(
            "output.weight".into(),
            &[v, d],
            transpose(need("lm_head.weight")?, d, v),
        )?;
    }
    for i in 0..config.n_layers {
        let ours = |s: &str| format!("blocks.{i}.{s}");
        let theirs = |s: &str| format!("blk.{i}.{s}");
        for (norm, name) in NORMS {
            add(
                theirs(&format!("{name}.weight")),
                &[d],
                need(&ours(&format!("{norm}.weight")))?.to_vec(),
            )?;
            add(
                theirs(&format!("{name}.bias")),
                &[d],
                bias(&ours(&format!("{norm}.bias")), d),
            )?;
        }
        for (kiln, gguf, inp, out) in projections(d, ff) {
            let weight = need(&ours(&format!("{kiln}.weight")))?;
            add(
                theirs(&format!("{gguf}.weight")),
                &[out, inp],
                transpose(weight, inp, out),
            )?;
            add(
                theirs(&format!("{gguf}.bias")),
                &[out],
                bias(&ours(&format!("{kiln}.bias")), out),
            )?;
        }
    }
    Ok(())
}
