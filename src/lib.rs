//! # Kiln
//!
//! From raw text to a trained, quantized, served language model, on the
//! [Burn](https://burn.dev) deep-learning framework. This crate re-exports the pipeline's crates
//! and holds the `kiln` command line, the examples and the benchmarks.
//!
//! | stage | crate |
//! |---|---|
//! | GGUF reader / writer, GGML block codecs, crash-safe writes | [`gguf`] (`kiln-gguf`) |
//! | fused CPU kernels, quantized linear kernels | [`kernels`] (`kiln-kernels`) |
//! | tokenizer training, encoding, token shards | [`bpe`] (`kiln-bpe`) |
//! | GPT-2 / Llama models, weights, generation | [`transformer`] (`kiln-transformer`) |
//! | training loop, checkpoints, resume | [`trainer`] (`kiln-trainer`) |
//! | int8 weights and CPU kernels for decoding | [`quantize`] (`kiln-quantize`) |
//! | OpenAI-compatible server, continuous batching | [`serve`] (`kiln-serve`) |
//!
//! See `docs/architecture.md` for the whole pipeline.

pub use kiln_bpe as bpe;
pub use kiln_distributed as distributed;
pub use kiln_gguf as gguf;
pub use kiln_kernels as kernels;
pub use kiln_quantize as quantize;
pub use kiln_serve as serve;
pub use kiln_trainer as trainer;
pub use kiln_transformer as transformer;

#[cfg(feature = "mimalloc")]
pub use allocator::{Allocator, PURGE_DELAY_MS};

#[cfg(feature = "mimalloc")]
mod allocator;
pub mod backend;
