//! # kiln-transformer
//!
//! One decoder-only Transformer definition for the GPT-2 and Llama families, generic over Burn's
//! `Backend` (compiled for CPU, WGPU and CUDA): token embedding, causal self-attention
//! `softmax(QKᵀ/√d_k)·V` with grouped-query heads, learned or rotary positions, pre-norm residual
//! blocks with LayerNorm or RMSNorm, GELU MLP or SwiGLU, and output logits. Plus a KV cache for
//! generation, loaders for GGUF and safetensors weights, and Kiln's own model directory.
//!
//! On Burn's Flex CPU backend the model runs Kiln's fused kernels (`kiln-kernels`: attention,
//! LayerNorm, GELU, forward and backward) with no set-up; every other backend runs Burn's ops.
//! [`load_gguf_quantized`] keeps a quantized GGUF file's weights in its own blocks (memory-mapped)
//! and multiplies by them with `kiln-kernels`' integer kernels on the CPU; other backends get the
//! weights dequantized to their float type on first use.
//!
//! ```
//! use burn::backend::Flex;
//! use burn::tensor::{Int, Tensor};
//! use kiln_transformer::{ModelConfig, Transformer};
//!
//! let config = ModelConfig {
//!     n_layers: 2, d_model: 64, n_heads: 4, n_kv_heads: 4, d_ff: 256,
//!     vocab_size: 100, context_length: 32, ..ModelConfig::gpt2_124m()
//! };
//! let model = Transformer::<Flex>::new(config, &Default::default())?;
//! let tokens = Tensor::<Flex, 2, Int>::from_ints([[1, 2, 3]], &Default::default());
//! let logits = model.forward(tokens)?;
//! assert_eq!(logits.dims(), [1, 3, 100]);
//! # Ok::<(), kiln_transformer::ModelError>(())
//! ```

#![warn(missing_docs)]

mod attention;
mod block;
mod cache;
pub mod chat;
mod config;
mod error;
mod generate;
mod gguf_export;
mod gguf_gpt2;
mod gguf_model;
mod gguf_quantized;
mod hf;
mod linear;
mod load;
mod mlp;
mod model;
mod model_dir;
mod nanogpt;
mod norm;
mod onnx_export;
mod parallel;
mod rope;
pub mod sampling;
mod source;
mod stage;
mod tensor_files;
mod weights;

pub use attention::Attention;
pub use block::Block;
pub use cache::KvCache;
pub use config::{MlpKind, ModelConfig, NormKind, PositionEncoding, RopePairing};
pub use error::{ModelError, Result};
pub use generate::{
    FinishReason, GenerateParams, Generation, GenerationStats, Generator, Piece, Sequence,
    logits_rows, token_rows,
};
pub use gguf_export::{gguf_writer, save_gguf};
pub use gguf_model::config_from_gguf;
pub use gguf_quantized::{gguf_is_quantized, load_gguf_quantized};
pub use hf::config_from_hf;
pub use linear::Projection;
pub use load::{LoadedModel, ModelInfo, Prompt, inspect_model, load_gguf, load_model};
pub use mlp::Mlp;
pub use model::{Logits, Transformer};
pub use model_dir::{load_model_dir, save_model_dir};
pub use nanogpt::{TorchMetadata, save_nanogpt};
pub use norm::Norm;
pub use onnx_export::{onnx_spec, onnx_weights, save_onnx};
pub use parallel::{TensorParallel, TensorParallelSlot};
pub use source::WeightSource;
pub use stage::{Stage, StageInput};
