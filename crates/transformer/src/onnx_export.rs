//! A model as an ONNX file (`kiln_gguf::onnx` writes the protobuf): the structure from
//! [`ModelConfig`], the weights under their Kiln names, optionally with past/present key-value
//! tensors for incremental decoding. See `docs/onnx.md`.

use std::path::Path;

use burn::tensor::backend::Backend;
use burn_store::ModuleSnapshot;
use kiln_gguf::onnx::{self, ExportOptions, Mlp, ModelSpec, Norm, Position, Weights};

use crate::config::{MlpKind, ModelConfig, NormKind, PositionEncoding, RopePairing};
use crate::error::{ModelError, Result};
use crate::model::Transformer;

/// The ONNX structure of a model `config` describes.
pub fn onnx_spec(config: &ModelConfig) -> ModelSpec {
    ModelSpec {
        architecture: config.architecture.clone(),
        vocab_size: config.vocab_size,
        context_length: config.context_length,
        n_layers: config.n_layers,
        n_heads: config.n_heads,
        n_kv_heads: config.n_kv_heads,
        d_model: config.d_model,
        d_ff: config.d_ff,
        position: match config.position {
            PositionEncoding::Learned => Position::Learned,
            PositionEncoding::Rope { theta, pairing } => Position::Rope {
                theta,
                pairing: match pairing {
                    RopePairing::Interleaved => onnx::RopePairing::Interleaved,
                    RopePairing::HalfSplit => onnx::RopePairing::HalfSplit,
                },
            },
        },
        norm: match config.norm {
            NormKind::LayerNorm { eps } => Norm::LayerNorm { eps },
            NormKind::RmsNorm { eps } => Norm::RmsNorm { eps },
        },
        mlp: match config.mlp {
            MlpKind::GeluTanh => Mlp::GeluTanh,
            MlpKind::Gelu => Mlp::Gelu,
            // `save_onnx` refuses GeGLU models before they get here.
            MlpKind::SwiGlu | MlpKind::GeGlu => Mlp::SwiGlu,
        },
        bias: config.bias,
        qkv_bias: config.qkv_bias,
        tied_embeddings: config.tied_embeddings,
    }
}

/// Every parameter of `model` as f32, under its Kiln name (`blocks.0.attn.qkv.weight`, ...).
pub fn onnx_weights<B: Backend>(model: &Transformer<B>) -> Result<Weights> {
    let mut weights = Weights::new();
    for snapshot in model.collect(None, None, true) {
        let name = snapshot.full_path();
        let data = snapshot
            .to_data()
            .map_err(|e| ModelError::InvalidConfig(format!("reading {name}: {e:?}")))?;
        let shape = data.shape.clone();
        let values = data
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| ModelError::InvalidConfig(format!("reading {name}: {e:?}")))?;
        weights.insert(name, shape, values)?;
    }
    Ok(weights)
}

/// Writes `model` as an ONNX file at `path` (opset 17, dynamic batch and sequence axes; with
/// `kv_cache`, past/present key-value inputs and outputs named as Hugging Face Optimum does).
pub fn save_onnx<B: Backend>(model: &Transformer<B>, path: &Path, kv_cache: bool) -> Result<()> {
    let config = model.config();
    if config.mlp == MlpKind::GeGlu || config.scale_embeddings {
        return Err(ModelError::Unsupported(format!(
            "the ONNX graph has no GeGLU MLP or embedding scaling ({} model)",
            config.architecture
        )));
    }
    let options = ExportOptions {
        kv_cache,
        producer_version: env!("CARGO_PKG_VERSION").into(),
    };
    onnx::save(
        path,
        &onnx_spec(model.config()),
        onnx_weights(model)?,
        &options,
    )?;
    Ok(())
}
