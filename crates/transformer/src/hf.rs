//! Hugging Face checkpoints: `config.json` + `model.safetensors` for GPT-2 (`model_type: "gpt2"`)
//! and Llama (`model_type: "llama"`, also SmolLM2), mapped onto Kiln's parameters.
//!
//! GPT-2's `Conv1D` weights are already `[in, out]`; Llama's `nn.Linear` weights are `[out, in]` and
//! are transposed. HF Llama checkpoints rotate half-split pairs, so they run with
//! [`RopePairing::HalfSplit`] (GGUF files hold the same weights permuted for interleaved pairs).

use std::path::Path;

use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::config::{MlpKind, ModelConfig, NormKind, PositionEncoding, RopePairing};
use crate::error::{ModelError, Result};
use crate::weights::{LlamaBlock, NamedTensor, Source, llama_block, transpose};

fn st_error(path: &Path, reason: impl ToString) -> ModelError {
    ModelError::Safetensors {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

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
                tied_embeddings: true,
                dropout: 0.0,
            }
        }
        "llama" => {
            let heads = int("num_attention_heads")?;
            ModelConfig {
                architecture: "llama".into(),
                vocab_size: int("vocab_size")?,
                context_length: int("max_position_embeddings")?,
                n_layers: int("num_hidden_layers")?,
                n_heads: heads,
                n_kv_heads: int("num_key_value_heads").unwrap_or(heads),
                d_model: int("hidden_size")?,
                d_ff: int("intermediate_size")?,
                position: PositionEncoding::Rope {
                    theta: float("rope_theta", 10_000.0) as f32,
                    pairing: RopePairing::HalfSplit,
                },
                norm: NormKind::RmsNorm {
                    eps: float("rms_norm_eps", 1e-6),
                },
                mlp: MlpKind::SwiGlu,
                bias: false,
                tied_embeddings: json
                    .get("tie_word_embeddings")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
                dropout: 0.0,
            }
        }
        other => return Err(ModelError::UnknownArchitecture(other.to_owned())),
    };
    config.validate()?;
    Ok(config)
}

/// A safetensors file read into memory.
struct Checkpoint<'a> {
    st: SafeTensors<'a>,
    path: &'a Path,
    prefix: &'static str,
}

impl Checkpoint<'_> {
    /// The tensor `name` (tried with and without the checkpoint's prefix) as f32, shape-checked.
    fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let full = format!("{}{name}", self.prefix);
        let view = self
            .st
            .tensor(&full)
            .or_else(|_| self.st.tensor(name))
            .map_err(|_| ModelError::MissingTensor {
                name: full.clone(),
                file: self.path.display().to_string(),
            })?;
        if view.shape() != shape {
            return Err(ModelError::ShapeMismatch {
                name: full,
                expected: shape.to_vec(),
                found: view.shape().to_vec(),
            });
        }
        let bytes = view.data();
        let bad = |reason: String| ModelError::BadTensor {
            name: full.clone(),
            reason,
        };
        match view.dtype() {
            Dtype::F32 => Ok(bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()),
            Dtype::F16 => Ok(bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect()),
            Dtype::BF16 => Ok(bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect()),
            other => Err(bad(format!(
                "unsupported dtype {other:?} (F32, F16, BF16 are)"
            ))),
        }
    }
}

/// Every Kiln parameter of `config`, read from an HF `model.safetensors`.
pub(crate) fn tensors_from_hf(file: &Path, config: &ModelConfig) -> Result<Vec<NamedTensor>> {
    let bytes = std::fs::read(file).map_err(|e| ModelError::io(file, e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| st_error(file, e))?;
    let has = |n: &str| st.names().contains(&n);
    let (d, ff, v) = (config.d_model, config.d_ff, config.vocab_size);
    let mut out = Vec::new();
    if config.architecture == "gpt2" {
        let ck = Checkpoint {
            prefix: if has("transformer.wte.weight") {
                "transformer."
            } else {
                ""
            },
            st,
            path: file,
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
    let ck = Checkpoint {
        prefix: "",
        st,
        path: file,
    };
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
    out.push(NamedTensor::new(
        "norm_f.weight",
        "model.norm.weight",
        vec![d],
        ck.get("model.norm.weight", &[d])?,
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
    for i in 0..config.n_layers {
        let get = |s: &str, shape: &[usize]| -> Result<Source> {
            let name = format!("model.layers.{i}.{s}.weight");
            let data = ck.get(&name, shape)?;
            Ok(Source { name, data })
        };
        let block = LlamaBlock {
            attn_norm: get("input_layernorm", &[d])?,
            q: get("self_attn.q_proj", &[q_out, d])?,
            k: get("self_attn.k_proj", &[kv_out, d])?,
            v: get("self_attn.v_proj", &[kv_out, d])?,
            o: get("self_attn.o_proj", &[d, q_out])?,
            ffn_norm: get("post_attention_layernorm", &[d])?,
            gate: get("mlp.gate_proj", &[ff, d])?,
            up: get("mlp.up_proj", &[ff, d])?,
            down: get("mlp.down_proj", &[d, ff])?,
        };
        out.extend(llama_block(i, block, config));
    }
    Ok(out)
}
