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
}
