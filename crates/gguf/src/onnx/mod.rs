//! ONNX export of Kiln's decoder-only Transformers, with no Burn and no protobuf library.
//!
//! [`ModelSpec`] describes the structure (it mirrors `kiln_transformer::ModelConfig`),
//! [`Weights`] holds named `f32` tensors (Kiln's parameter paths and layouts), and [`build`]
//! turns them into a [`ModelProto`]: an opset-17 ONNX graph that onnxruntime runs and
//! TensorRT's ONNX parser reads. [`to_bytes`] and [`save`] encode it (the file is written
//! atomically through [`crate::atomic`]).
//!
//! The graph has one input `input_ids` (`int64 [batch, sequence]`) and one output `logits`
//! (`float [batch, sequence, vocab]`); batch and sequence are dynamic axes, and the causal mask
//! is built in the graph. With [`ExportOptions::kv_cache`] it follows the protocol of Hugging
//! Face Optimum and onnxruntime-genai: inputs `attention_mask` (`int64 [batch,
//! total_sequence]`), `position_ids` (`int64 [batch, sequence]`) and `past_key_values.{i}.key`
//! / `.value` (`float [batch, n_kv_heads, past_sequence, head_dim]`), outputs
//! `present.{i}.key` / `.value` (`float [batch, n_kv_heads, total_sequence, head_dim]`), the past
//! with the new tokens' keys and values appended. The first step passes a past of length 0.
//!
//! Protobuf messages are limited to 2 GiB; a larger model is refused with
//! [`OnnxError::TooLarge`] (ONNX's external-data format is not written yet).
//!
//! ```
//! use kiln_gguf::onnx::{self, ExportOptions, Mlp, ModelSpec, Norm, Position, Weights};
//!
//! let spec = ModelSpec {
//!     architecture: "gpt2".into(),
//!     vocab_size: 16, context_length: 8, n_layers: 1, n_heads: 2, n_kv_heads: 2,
//!     d_model: 8, d_ff: 32, position: Position::Learned, norm: Norm::LayerNorm { eps: 1e-5 },
//!     mlp: Mlp::GeluTanh, bias: true, qkv_bias: false, tied_embeddings: true,
//! };
//! let mut weights = Weights::new();
//! for (name, shape) in spec.weight_shapes() {
//!     let n = shape.iter().product();
//!     weights.insert(name, shape, vec![0.01; n])?;
//! }
//! let model = onnx::build(&spec, weights, &ExportOptions::default())?;
//! assert_eq!(model.graph.outputs[0].name, "logits");
//! let bytes = model.to_bytes()?;
//! assert_eq!(bytes.len() as u64, model.encoded_len());
//! # Ok::<(), kiln_gguf::onnx::OnnxError>(())
//! ```

mod error;
mod graph;
pub mod proto;
mod spec;
#[cfg(test)]
mod tests;

use std::path::Path;

pub use error::OnnxError;
pub use graph::{
    ATTENTION_MASK, INPUT_IDS, IR_VERSION, LOGITS, OPSET, POSITION_IDS, build, past_name,
    present_name,
};
pub use proto::ModelProto;
pub use spec::{
    ExportOptions, MAX_DIM, Mlp, ModelSpec, Norm, Position, RopePairing, Weight, Weights,
};

/// The ONNX file of `spec` with `weights`, as bytes.
pub fn to_bytes(
    spec: &ModelSpec,
    weights: Weights,
    options: &ExportOptions,
) -> Result<Vec<u8>, OnnxError> {
    build(spec, weights, options)?.to_bytes()
}

/// Writes the ONNX file of `spec` with `weights` to `path` atomically (temp file, fsync,
/// rename). A model that cannot be built or is too large leaves no file behind.
pub fn save(
    path: impl AsRef<Path>,
    spec: &ModelSpec,
    weights: Weights,
    options: &ExportOptions,
) -> Result<(), OnnxError> {
    build(spec, weights, options)?.save(path)
}
