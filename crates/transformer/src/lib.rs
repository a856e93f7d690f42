//! # kiln-transformer
//!
//! One decoder-only Transformer definition for the GPT-2 and Llama families, generic over Burn's
//! `Backend` (compiled for CPU, WGPU and CUDA): token embedding, causal self-attention
//! `softmax(QKᵀ/√d_k)·V` with grouped-query heads, learned or rotary positions, pre-norm residual
//! blocks with LayerNorm or RMSNorm, GELU MLP or SwiGLU, and output logits. Plus a KV cache for
//! generation, loaders for GGUF and safetensors weights, and Kiln's own model directory.

mod attention;
mod block;
mod cache;
pub mod chat;
mod config;
pub mod dequant;
mod error;
pub mod fused;
mod generate;
mod gguf_model;
mod hf;
mod linear;
mod load;
mod mlp;
mod model;
mod model_dir;
mod norm;
mod rope;
pub mod sampling;
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
pub use gguf_model::config_from_gguf;
pub use hf::config_from_hf;
pub use linear::{KERNEL_MAX_ROWS, Kernel, LinearKernel};
pub use load::{LoadedModel, Prompt, load_gguf, load_model};
pub use mlp::Mlp;
pub use model::{Logits, Transformer};
pub use model_dir::{load_model_dir, save_model_dir};
pub use norm::Norm;
