//! Distributed training on ranks that are threads of this process: data parallelism and ZeRO
//! ([`data_parallel`], [`zero3_gather`]) and tensor and pipeline parallelism ([`model_parallel`]),
//! each against the single-device run, and the point-to-point transfers under them ([`p2p`]). One test binary, so that they link once.

use std::sync::Mutex;

use kiln_transformer::{MlpKind, ModelConfig, NormKind, PositionEncoding, RopePairing};

mod data_parallel;
mod model_parallel;
mod p2p;
mod zero3_gather;

/// Burn's CPU random generator and its collective server are process-wide: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// A tiny GPT-2-style model: learned positions, LayerNorm, GELU, biases, tied embeddings.
fn tiny_gpt(n_layers: usize, n_heads: usize, d_model: usize, d_ff: usize) -> ModelConfig {
    ModelConfig {
        vocab_size: 61,
        context_length: 16,
        n_layers,
        n_heads,
        n_kv_heads: n_heads,
        d_model,
        d_ff,
        bias: true,
        dropout: 0.0,
        ..ModelConfig::shakespeare_char_cpu(61)
    }
}

/// `gpt` made Llama-style: RoPE, RMSNorm, SwiGLU, 4 query heads sharing 2 key/value heads, no
/// biases, an untied head.
fn tiny_llama(gpt: ModelConfig) -> ModelConfig {
    ModelConfig {
        architecture: "llama".into(),
        position: PositionEncoding::Rope {
            theta: 10_000.0,
            pairing: RopePairing::HalfSplit,
        },
        norm: NormKind::RmsNorm { eps: 1e-5 },
        mlp: MlpKind::SwiGlu,
        n_heads: 4,
        n_kv_heads: 2,
        bias: false,
        tied_embeddings: false,
        ..gpt
    }
}
