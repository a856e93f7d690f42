//! Errors of quantization.

/// Why a model or matrix could not be quantized.
#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    /// A kernel refused the weights (their shape).
    #[error(transparent)]
    Kernel(#[from] kiln_kernels::KernelError),
    /// A weight could not be read back from the backend as f32.
    #[error("reading weight `{name}` as f32: {reason}")]
    Read {
        /// The layer.
        name: String,
        /// What went wrong.
        reason: String,
    },
    /// A weight holds NaN or infinity.
    #[error("weight `{0}` holds non-finite values")]
    NonFinite(String),
    /// `--type` names no scheme Kiln writes.
    #[error("unknown quantization type `{name}` (known: {known})")]
    UnknownScheme {
        /// What was asked for.
        name: String,
        /// The schemes there are.
        known: String,
    },
    /// The source GGUF file could not be read, or the output written.
    #[error(transparent)]
    Gguf(#[from] kiln_gguf::GgufError),
    /// A tensor could not be decoded or encoded.
    #[error("tensor `{name}`: {source}")]
    Block {
        /// The tensor.
        name: String,
        /// What the codec said.
        source: kiln_gguf::blocks::BlockError,
    },
    /// GPTQ could not quantize a tensor.
    #[error("GPTQ on tensor `{name}`: {source}")]
    Gptq {
        /// The tensor.
        name: String,
        /// What went wrong.
        source: crate::gptq::GptqError,
    },
    /// The model could not be loaded or run.
    #[error(transparent)]
    Model(#[from] kiln_transformer::ModelError),
    /// Calibration needs more text than it was given.
    #[error("calibration text gave {found} tokens; at least {needed} are needed ({why})")]
    CalibrationTooShort {
        /// Tokens needed.
        needed: usize,
        /// Tokens given.
        found: usize,
        /// Why that many.
        why: String,
    },
    /// Something about the input makes the request impossible.
    #[error("{0}")]
    Invalid(String),
}
