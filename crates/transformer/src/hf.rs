//! Hugging Face checkpoints: `config.json` and the weights (`model.safetensors`, shards listed by
//! `model.safetensors.index.json`, `pytorch_model.bin` or its shards) for GPT-2
//! (`model_type: "gpt2"`) and the Llama family (`llama`, also SmolLM2; `mistral`; `qwen2`, with
//! its Q/K/V biases; `phi3`, with its fused projections), mapped onto Kiln's parameters.
//!
//! GPT-2's `Conv1D` weights are already `[in, out]`; Llama's `nn.Linear` weights are `[out, in]` and
//! are transposed. HF Llama checkpoints rotate half-split pairs, so they run with
//! [`RopePairing::HalfSplit`] (GGUF files hold the same weights permuted for interleaved pairs).

use std::path::Path;

use serde_json::Value;

use crate::config::{MlpKind, ModelConfig, NormKind, PositionEncoding, RopePairing};
use crate::error::{ModelError, Result};
use crate::tensor_files::TensorFiles;
use crate::weights::{LlamaBlock, NamedTensor, Source, llama_block, split_rows, transpose};

/// Whether `dir/config.json` is a Hugging Face config (it names a `model_type`).
pub(crate) fn is_hf_dir(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .is_some_and(|v| v.get("model_type").is_some())
}

/// The model structure an HF `config.json` describes.
pub fn config_from_hf(json: &Value) -> Result<ModelConfig> {
    let int = |k: &str| -> Result<usize> {
        json.get(k)
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| ModelError::InvalidConfig(format!("config.json has no integer {k:?}")))
    };
    let float = |k: &str, default: f64| json.get(k).and_then(Value::as_f64).unwrap_or(default);
    let model_type = json
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let config = match model_type {
        "gpt2" => {
            let d = int("n_embd")?;
            ModelConfig {
                architecture: "gpt2".into(),
                vocab_size: int("vocab_size")?,
                context_length: int("n_positions")?,
                n_layers: int("n_layer")?,
                n_heads: int("n_head")?,
                n_kv_heads: int("n_head")?,
                d_model: d,
                d_ff: json
                    .get("n_inner")
                    .and_then(Value::as_u64)
                    .map_or(4 * d, |v| v as usize),
                position: PositionEncoding::Learned,
                norm: NormKind::LayerNorm {
                    eps: float("layer_norm_epsilon", 1e-5),
                },
                mlp: match json.get("activation_function").and_then(Value::as_str) {
                    Some("gelu") => MlpKind::Gelu,
                    _ => MlpKind::GeluTanh,
                },
                bias: true,
                qkv_bias: false,
                tied_embeddings: true,
                scale_embeddings: false,
                dropout: 0.0,
            }
        }
        "llama" | "mistral" | "qwen2" | "phi3" | "gemma" => {
            let heads = int("num_attention_heads")?;
            check_llama_options(json, heads)?;
            let gemma = model_type == "gemma";
            if gemma {
                let act = json
                    .get("hidden_activation")
                    .or_else(|| json.get("hidden_act"))
                    .and_then(Value::as_str)
                    .unwrap_or("gelu_pytorch_tanh");
                // Gemma's `gelu` has always run as the tanh approximation in transformers.
                if !matches!(act, "gelu_pytorch_tanh" | "gelu") {
                    return Err(ModelError::InvalidConfig(format!(
                        "config.json: Gemma activation {act:?} is not supported by Kiln"
                    )));
                }
            }
            let mut context_length = int("max_position_embeddings")?;
            // Sliding-window attention equals full attention over a context no longer than the
            // window (Qwen2 applies its window only with `use_sliding_window`).
            let windowed = model_type != "qwen2"
                || json.get("use_sliding_window").and_then(Value::as_bool) == Some(true);
            if let Some(window) = json.get("sliding_window").and_then(Value::as_u64)
                && windowed
                && window > 0
            {
                context_length = context_length.min(window as usize);
            }
            ModelConfig {
                architecture: model_type.into(),
                vocab_size: int("vocab_size")?,
                context_length,
                n_layers: int("num_hidden_layers")?,
                n_heads: heads,
                n_kv_heads: int("num_key_value_heads").unwrap_or(heads),
                d_model: int("hidden_size")?,
                d_ff: int("intermediate_size")?,
                position: PositionEncoding::Rope {
                    theta: rope_theta(json) as f32,
                    pairing: RopePairing::HalfSplit,
                },
                norm: NormKind::RmsNorm {
                    eps: float("rms_norm_eps", 1e-6),
                },
                mlp: if gemma {
                    MlpKind::GeGlu
                } else {
                    MlpKind::SwiGlu
                },
                bias: false,
                qkv_bias: model_type == "qwen2",
                tied_embeddings: json
                    .get("tie_word_embeddings")
                    .and_then(Value::as_bool)
                    .unwrap_or(gemma),
                scale_embeddings: gemma,
                dropout: 0.0,
            }
        }
        other => {
            return Err(ModelError::UnknownArchitecture {
                name: other.to_owned(),
                supported: "gpt2, llama, mistral, qwen2, phi3, gemma Hugging Face checkpoints",
            });
        }
    };
    config.validate()?;
    Ok(config)
}

/// RoPE's base: `rope_theta` (transformers 4) or `rope_parameters.rope_theta` (transformers 5);
/// Llama's 10,000 when neither is given.
fn rope_theta(json: &Value) -> f64 {
    json.get("rope_theta")
        .or_else(|| json.get("rope_parameters")?.get("rope_theta"))
        .and_then(Value::as_f64)
        .unwrap_or(10_000.0)
}

/// Refuses Llama options Kiln's model does not implement, rather than running them wrongly:
/// RoPE scaling (Llama 3.1's `llama3`, YaRN, ...), biases, a head width other than
/// `hidden_size / num_attention_heads`.
fn check_llama_options(json: &Value, heads: usize) -> Result<()> {
    let unsupported = |what: String| {
        ModelError::InvalidConfig(format!(
            "config.json: {what} is not supported by Kiln's Llama"
        ))
    };
    for key in ["rope_scaling", "rope_parameters"] {
        let kind = json
            .get(key)
            .and_then(|v| v.get("rope_type").or_else(|| v.get("type")))
            .and_then(Value::as_str);
        if let Some(kind) = kind.filter(|k| *k != "default") {
            return Err(unsupported(format!("RoPE scaling {kind:?} ({key})")));
        }
    }
    if let Some(factor) = json.get("partial_rotary_factor").and_then(Value::as_f64)
        && factor != 1.0
    {
        return Err(unsupported(format!("partial_rotary_factor {factor}")));
    }
    for key in ["attention_bias", "mlp_bias"] {
        if json.get(key).and_then(Value::as_bool) == Some(true) {
            return Err(unsupported(format!("`{key}: true`")));
        }
    }
    let hidden = json.get("hidden_size").and_then(Value::as_u64).unwrap_or(0) as usize;
    if let Some(head_dim) = json.get("head_dim").and_then(Value::as_u64)
        && heads > 0
        && head_dim as usize != hidden / heads
    {
        return Err(unsupported(format!(
            "head_dim {head_dim} apart from hidden_size / num_attention_heads = {}",
            hidden / heads
        )));
    }
    Ok(())
}

/// A checkpoint's tensors under a name prefix (GPT-2's `transformer.`, present in
/// `GPT2LMHeadModel` checkpoints and absent in `GPT2Model` ones).
struct Checkpoint<'a> {
    files: &'a TensorFiles,
    prefix: &'static str,
}

impl Checkpoint<'_> {
    /// The tensor `name` (with the checkpoint's prefix) as f32, shape-checked.
    fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.files.get(&format!("{}{name}", self.prefix), shape)
    }
}

/// Every Kiln parameter of `config`, read from a Hugging Face checkpoint's tensors.
pub(crate) fn tensors_from_hf(
    files: &TensorFiles,
    config: &ModelConfig,
) -> Result<Vec<NamedTensor>> {
    let (d, ff, v) = (config.d_model, config.d_ff, config.vocab_size);
    let mut out = Vec::new();
    if config.architecture == "gpt2" {
        let ck = Checkpoint {
            prefix: if files.contains("transformer.wte.weight") {
                "transformer."
            } else {
                ""
            },
            files,
        };
        out.push(NamedTensor::new(
            "tok_emb.weight",
            "wte.weight",
            vec![v, d],
            ck.get("wte.weight", &[v, d])?,
        ));
        let ctx = config.context_length;
        out.push(NamedTensor::new(
            "pos_emb.weight",
            "wpe.weight",
            vec![ctx, d],
            ck.get("wpe.weight", &[ctx, d])?,
        ));
        for (ours, theirs) in [
            ("norm_f.weight", "ln_f.weight"),
            ("norm_f.bias", "ln_f.bias"),
        ] {
            out.push(NamedTensor::new(
                ours,
                theirs,
                vec![d],
                ck.get(theirs, &[d])?,
            ));
        }
        for i in 0..config.n_layers {
            let map: [(&str, &str, Vec<usize>); 12] = [
                ("norm1.weight", "ln_1.weight", vec![d]),
                ("norm1.bias", "ln_1.bias", vec![d]),
                ("attn.qkv.weight", "attn.c_attn.weight", vec![d, 3 * d]),
                ("attn.qkv.bias", "attn.c_attn.bias", vec![3 * d]),
                ("attn.proj.weight", "attn.c_proj.weight", vec![d, d]),
                ("attn.proj.bias", "attn.c_proj.bias", vec![d]),
                ("norm2.weight", "ln_2.weight", vec![d]),
                ("norm2.bias", "ln_2.bias", vec![d]),
                ("mlp.up.weight", "mlp.c_fc.weight", vec![d, ff]),
                ("mlp.up.bias", "mlp.c_fc.bias", vec![ff]),
                ("mlp.down.weight", "mlp.c_proj.weight", vec![ff, d]),
                ("mlp.down.bias", "mlp.c_proj.bias", vec![d]),
            ];
            for (ours, theirs, shape) in map {
                let name = format!("h.{i}.{theirs}");
                let data = ck.get(&name, &shape)?;
                out.push(NamedTensor::new(
                    format!("blocks.{i}.{ours}"),
                    &name,
                    shape,
                    data,
                ));
            }
        }
        return Ok(out);
    }
    let ck = Checkpoint { prefix: "", files };
    let (q_out, kv_out) = (
        config.n_heads * config.head_dim(),
        config.n_kv_heads * config.head_dim(),
    );
    out.push(NamedTensor::new(
        "tok_emb.weight",
        "model.embed_tokens.weight",
        vec![v, d],
        ck.get("model.embed_tokens.weight", &[v, d])?,
    ));
    // Gemma's RMSNorm multiplies by `1 + weight`; Kiln's (like llama.cpp's files) by the weight.
    let one_plus = config.architecture == "gemma";
    let norm = |mut source: Source| {
        if one_plus {
            source.data.iter_mut().for_each(|w| *w += 1.0);
        }
        source
    };
    let final_norm = norm(Source {
        name: "model.norm.weight".into(),
        data: ck.get("model.norm.weight", &[d])?,
    });
    out.push(NamedTensor::new(
        "norm_f.weight",
        &final_norm.name,
        vec![d],
        final_norm.data,
    ));
    if !config.tied_embeddings {
        let w = ck.get("lm_head.weight", &[v, d])?;
        out.push(NamedTensor::new(
            "lm_head.weight",
            "lm_head.weight",
            vec![d, v],
            transpose(&w, v, d),
        ));
    }
    // Phi-3 fuses Q, K, V in `qkv_proj` and gate, up in `gate_up_proj` (gate first).
    let fused = config.architecture == "phi3";
    for i in 0..config.n_layers {
        let name = |s: &str, kind: &str| format!("model.layers.{i}.{s}.{kind}");
        let get = |s: &str, shape: &[usize]| -> Result<Source> {
            let name = name(s, "weight");
            let data = ck.get(&name, shape)?;
            Ok(Source { name, data })
        };
        let [q, k, v] = if fused {
            split_rows(
                get("self_attn.qkv_proj", &[q_out + 2 * kv_out, d])?,
                [q_out, kv_out, kv_out],
                d,
            )
        } else {
            [
                get("self_attn.q_proj", &[q_out, d])?,
                get("self_attn.k_proj", &[kv_out, d])?,
                get("self_attn.v_proj", &[kv_out, d])?,
            ]
        };
        let [gate, up] = if fused {
            split_rows(get("mlp.gate_up_proj", &[2 * ff, d])?, [ff, ff], d)
        } else {
            [
                get("mlp.gate_proj", &[ff, d])?,
                get("mlp.up_proj", &[ff, d])?,
            ]
        };
        let block = LlamaBlock {
            attn_norm: norm(get("input_layernorm", &[d])?),
            q,
            k,
            v,
            o: get("self_attn.o_proj", &[d, q_out])?,
            ffn_norm: norm(get("post_attention_layernorm", &[d])?),
            gate,
            up,
            down: get("mlp.down_proj", &[d, ff])?,
        };
        out.extend(llama_block(i, block, config));
        if config.qkv_bias {
            let mut bias = Vec::with_capacity(q_out + 2 * kv_out);
            for (s, n) in [("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)] {
                bias.extend(ck.get(&name(&format!("self_attn.{s}"), "bias"), &[n])?);
            }
            out.push(NamedTensor::new(
                format!("blocks.{i}.attn.qkv.bias"),
                &name("self_attn.q_proj", "bias"),
                vec![q_out + 2 * kv_out],
                bias,
            ));
        }
    }
    Ok(out)
}
