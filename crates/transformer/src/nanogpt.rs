//! nanoGPT's checkpoints, read and written: the `ckpt.pt` its `train.py` saves, a dict of
//! `model` (the state dict, keys prefixed `_orig_mod.` when the model was `torch.compile`d),
//! `model_args` (the `GPTConfig` fields), `iter_num`, `best_val_loss` and `config` (the run's
//! settings): the structure, the weights and the training metadata in one file.
//!
//! nanoGPT's `GPT` is GPT-2 with the exact (erf) GELU, LayerNorm ε = 1e-5 with an optional bias,
//! learned positions, a 4× MLP and the LM head tied to the token embedding. Its `nn.Linear`
//! weights are `[out, in]`; Kiln's are `[in, out]`, so every linear weight is transposed on the
//! way in and out.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use kiln_gguf::torch::{self, Dict, Value};

use crate::config::{MlpKind, ModelConfig, NormKind, PositionEncoding};
use crate::error::{ModelError, Result};
use crate::model::Transformer;
use crate::onnx_export::onnx_weights;
use crate::tensor_files::{TensorFiles, torch_error};
use crate::weights::{NamedTensor, transpose};

/// The state-dict prefix `torch.compile` adds.
const COMPILED_PREFIX: &str = "_orig_mod.";

/// Whether a loaded checkpoint is nanoGPT's (`model_args` beside `model`).
pub(crate) fn is_nanogpt(value: &Value) -> bool {
    value.get("model_args").is_some() && value.get("model").is_some()
}

/// The model structure nanoGPT's `model_args` describe.
pub(crate) fn config_from_model_args(args: &Value, path: &Path) -> Result<ModelConfig> {
    let bad = |reason: String| {
        ModelError::InvalidConfig(format!("{}: model_args {reason}", path.display()))
    };
    let int = |key: &str| -> Result<usize> {
        args.get(key)
            .and_then(Value::as_int)
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| bad(format!("has no non-negative integer {key:?}")))
    };
    let d = int("n_embd")?;
    let heads = int("n_head")?;
    let bias = match args.get("bias") {
        None => true, // GPTConfig's default
        Some(v) => v
            .as_bool()
            .ok_or_else(|| bad("has a `bias` that is not a bool".into()))?,
    };
    let config = ModelConfig {
        architecture: "gpt2".into(),
        vocab_size: int("vocab_size")?,
        context_length: int("block_size")?,
        n_layers: int("n_layer")?,
        n_heads: heads,
        n_kv_heads: heads,
        d_model: d,
        d_ff: 4 * d,
        position: PositionEncoding::Learned,
        norm: NormKind::LayerNorm { eps: 1e-5 },
        mlp: MlpKind::Gelu,
        bias,
        qkv_bias: false,
        tied_embeddings: true,
        scale_embeddings: false,
        dropout: args.get("dropout").and_then(Value::as_float).unwrap_or(0.0),
    };
    config.validate()?;
    Ok(config)
}

/// The tensors of a nanoGPT checkpoint's `model` state dict (`_orig_mod.` prefixes dropped).
pub(crate) fn state_dict(value: &Value, path: &Path) -> Result<TensorFiles> {
    let model = value.get("model").unwrap_or(&Value::None);
    TensorFiles::from_state_dict(model, COMPILED_PREFIX, path)
}

/// One nanoGPT name for one Kiln parameter, and whether the weight is an `nn.Linear` one
/// (stored `[out, in]`, transposed against Kiln's `[in, out]`).
struct Mapping {
    kiln: String,
    nanogpt: String,
    linear: bool,
}

/// Every parameter of `config` with its nanoGPT name, in nanoGPT's state-dict order.
fn mappings(config: &ModelConfig) -> Vec<Mapping> {
    let map = |kiln: String, nanogpt: String, linear| Mapping {
        kiln,
        nanogpt,
        linear,
    };
    let mut out = vec![
        map(
            "tok_emb.weight".into(),
            "transformer.wte.weight".into(),
            false,
        ),
        map(
            "pos_emb.weight".into(),
            "transformer.wpe.weight".into(),
            false,
        ),
    ];
    let suffixes: &[&str] = if config.bias {
        &["weight", "bias"]
    } else {
        &["weight"]
    };
    for i in 0..config.n_layers {
        let parts = [
            ("norm1", "ln_1", false),
            ("attn.qkv", "attn.c_attn", true),
            ("attn.proj", "attn.c_proj", true),
            ("norm2", "ln_2", false),
            ("mlp.up", "mlp.c_fc", true),
            ("mlp.down", "mlp.c_proj", true),
        ];
        for (kiln, nanogpt, linear) in parts {
            for suffix in suffixes {
                out.push(map(
                    format!("blocks.{i}.{kiln}.{suffix}"),
                    format!("transformer.h.{i}.{nanogpt}.{suffix}"),
                    linear && *suffix == "weight",
                ));
            }
        }
    }
    for suffix in suffixes {
        out.push(map(
            format!("norm_f.{suffix}"),
            format!("transformer.ln_f.{suffix}"),
            false,
        ));
    }
    out
}

/// The shape of Kiln parameter `name` in `config` (`[in, out]` for linear weights).
fn kiln_shape(name: &str, config: &ModelConfig) -> Vec<usize> {
    let (d, ff) = (config.d_model, config.d_ff);
    let last = name.rsplit('.').nth(1).unwrap_or_default();
    let is_bias = name.ends_with(".bias");
    match (name, last, is_bias) {
        ("tok_emb.weight", ..) => vec![config.vocab_size, d],
        ("pos_emb.weight", ..) => vec![config.context_length, d],
        (_, "qkv", false) => vec![d, 3 * d],
        (_, "qkv", true) => vec![3 * d],
        (_, "up", false) => vec![d, ff],
        (_, "up", true) => vec![ff],
        (_, "down", false) => vec![ff, d],
        (_, "proj", false) => vec![d, d],
        _ => vec![d],
    }
}

/// Every Kiln parameter of `config`, read from a nanoGPT state dict.
pub(crate) fn tensors_from_nanogpt(
    files: &TensorFiles,
    config: &ModelConfig,
) -> Result<Vec<NamedTensor>> {
    mappings(config)
        .into_iter()
        .map(|m| {
            let shape = kiln_shape(&m.kiln, config);
            let data = if m.linear {
                let (inp, out) = (shape[0], shape[1]);
                transpose(&files.get(&m.nanogpt, &[out, inp])?, out, inp)
            } else {
                files.get(&m.nanogpt, &shape)?
            };
            Ok(NamedTensor::new(m.kiln, &m.nanogpt, shape, data))
        })
        .collect()
}

/// Where nanoGPT keeps the tokenizer of a checkpoint: a `meta.pkl` (character vocabulary) or
/// `tokenizer.json` beside it, else `data/<config.dataset>/meta.pkl` under the working directory
/// or the checkpoint's parent (nanoGPT's `sample.py` runs from the repository root, with
/// checkpoints in `out-*/`). `None` means nanoGPT's default, GPT-2's BPE, which Kiln does not
/// bundle: pass it with `--tokenizer`.
pub(crate) fn tokenizer_path(value: &Value, path: &Path) -> Option<PathBuf> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut candidates = vec![dir.join("meta.pkl"), dir.join("tokenizer.json")];
    if let Some(dataset) = value
        .get("config")
        .and_then(|c| c.get("dataset"))
        .and_then(Value::as_str)
        .filter(|d| !d.is_empty() && !d.contains(['/', '\\']) && !d.starts_with('.'))
    {
        let meta = PathBuf::from("data").join(dataset).join("meta.pkl");
        candidates.push(meta.clone());
        if let Some(root) = dir.parent() {
            candidates.push(root.join(&meta));
        }
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// The training metadata written beside the weights in a nanoGPT checkpoint.
#[derive(Clone, Debug, Default)]
pub struct TorchMetadata {
    /// Optimizer steps taken (`iter_num`).
    pub iter_num: u64,
    /// Best (or latest) validation loss (`best_val_loss`).
    pub best_val_loss: Option<f64>,
    /// The run's settings (`config`), any JSON object (Kiln's training config, for instance).
    pub config: Option<serde_json::Value>,
}

/// Why `config` is not a model nanoGPT's `GPT` can hold, if it is not.
fn nanogpt_mismatch(config: &ModelConfig) -> Option<String> {
    let d = config.d_model;
    let mut why = Vec::new();
    if config.position != PositionEncoding::Learned {
        why.push("rotary positions (nanoGPT learns a position embedding)".to_owned());
    }
    if !matches!(config.norm, NormKind::LayerNorm { eps } if (eps - 1e-5).abs() < 1e-12) {
        why.push("a norm other than LayerNorm with ε = 1e-5".into());
    }
    match config.mlp {
        MlpKind::Gelu => {}
        MlpKind::GeluTanh => why.push(
            "the tanh GELU (GPT-2's gelu_new; nanoGPT's nn.GELU() is exact, so logits would differ)"
                .into(),
        ),
        MlpKind::SwiGlu | MlpKind::GeGlu => why.push("a gated MLP".into()),
    }
    if config.d_ff != 4 * d {
        why.push(format!(
            "an MLP width of {} (nanoGPT's is 4 × {d})",
            config.d_ff
        ));
    }
    if config.n_kv_heads != config.n_heads {
        why.push("grouped-query attention".into());
    }
    if config.qkv_bias || config.scale_embeddings {
        why.push("Q/K/V biases or scaled embeddings".into());
    }
    if !config.tied_embeddings {
        why.push("an LM head apart from the token embedding (nanoGPT ties them)".into());
    }
    (!why.is_empty()).then(|| why.join(", "))
}

/// Writes `model` as a nanoGPT checkpoint at `path`, atomically: what `torch.save` writes, which
/// `torch.load(path, weights_only=True)` reads and from which nanoGPT's
/// `GPT(GPTConfig(**ckpt["model_args"]))` loads `ckpt["model"]` strictly. The LM head shares the
/// token embedding's storage, as in nanoGPT's own checkpoints.
///
/// Only models nanoGPT's `GPT` can hold are written (GPT-2 structure with the exact GELU, tied
/// head); others are a [`ModelError::Unsupported`] saying why.
pub fn save_nanogpt<B: Backend>(
    model: &Transformer<B>,
    metadata: &TorchMetadata,
    path: impl AsRef<Path>,
) -> Result<()> {
    let path = path.as_ref();
    let config = model.config();
    if let Some(why) = nanogpt_mismatch(config) {
        return Err(ModelError::Unsupported(format!(
            "nanoGPT's GPT cannot hold this {} model: {why}; export it with `kiln export onnx` or \
             use its model directory",
            config.architecture
        )));
    }
    let weights = onnx_weights(model)?;
    let to_torch = |e: torch::TorchError| torch_error(path, e);
    let mut state = Dict::new();
    let mut embedding = None;
    for m in mappings(config) {
        let weight = weights
            .get(&m.kiln)
            .ok_or_else(|| ModelError::MissingTensor {
                name: m.kiln.clone(),
                file: "the model".into(),
            })?;
        let (shape, values) = (&weight.shape, &weight.data);
        let tensor = if m.linear {
            let (inp, out) = (shape[0], shape[1]);
            torch::Tensor::from_slice([out, inp], &transpose(values, inp, out))
        } else {
            torch::Tensor::from_slice(shape.to_vec(), values)
        }
        .map_err(to_torch)?
        .with_requires_grad(true);
        if m.kiln == "tok_emb.weight" {
            embedding = Some(tensor.clone());
        }
        state.insert(m.nanogpt.as_str(), tensor);
    }
    // `lm_head.weight` is the embedding itself (nanoGPT ties `wte.weight = lm_head.weight`).
    if let Some(wte) = embedding {
        state.insert("lm_head.weight", wte);
    }
    let model_args: Dict = [
        ("n_layer", Value::Int(config.n_layers as i64)),
        ("n_head", Value::Int(config.n_heads as i64)),
        ("n_embd", Value::Int(config.d_model as i64)),
        ("block_size", Value::Int(config.context_length as i64)),
        ("bias", Value::Bool(config.bias)),
        ("vocab_size", Value::Int(config.vocab_size as i64)),
        ("dropout", Value::Float(config.dropout)),
    ]
    .into_iter()
    .collect();
    let mut ckpt = Dict::new();
    ckpt.insert("model", state);
    ckpt.insert("model_args", model_args);
    ckpt.insert("iter_num", Value::Int(metadata.iter_num as i64));
    ckpt.insert(
        "best_val_loss",
        metadata.best_val_loss.map_or(Value::None, Value::Float),
    );
    ckpt.insert(
        "config",
        metadata
            .config
            .as_ref()
            .map_or_else(|| Value::Dict(Dict::new()), json_to_value),
    );
    torch::save(path, &Value::Dict(ckpt)).map_err(to_torch)
}

/// A JSON value as the Python value `json.loads` would give.
fn json_to_value(json: &serde_json::Value) -> Value {
    use serde_json::Value as J;
    match json {
        J::Null => Value::None,
        J::Bool(b) => Value::Bool(*b),
        J::Number(n) => n
            .as_i64()
            .map_or_else(|| Value::Float(n.as_f64().unwrap_or(f64::NAN)), Value::Int),
        J::String(s) => Value::Str(s.clone()),
        J::Array(items) => Value::List(items.iter().map(json_to_value).collect()),
        J::Object(map) => Value::Dict(
            map.iter()
                .map(|(k, v)| (k.as_str(), json_to_value(v)))
                .collect(),
        ),
    }
}
