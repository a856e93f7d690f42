//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong loading, saving or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The ONNX export failed (a weight that does not fit the structure, a file too large).
    #[error(transparent)]
    Onnx(#[from] kiln_gguf::onnx::OnnxError),
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is malformed.
    #[error("{}: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The model configuration is inconsistent.
    #[error("invalid model config: {0}")]
    InvalidConfig(String),
    /// The file describes a model family Kiln does not implement.
    #[error("unsupported architecture {name:?} (Kiln runs {supported})")]
    UnknownArchitecture {
        /// The architecture the file names.
        name: String,
        /// The ones Kiln runs from this kind of file.
        supported: &'static str,
    },
    /// A weight the model needs is not in the file.
    #[error("missing tensor {name:?} in {file}")]
    MissingTensor {
        /// Tensor name as the file format spells it.
        name: String,
        /// Where it was looked for.
        file: String,
    },
    /// A weight has the wrong shape.
    #[error("tensor {name:?}: expected shape {expected:?}, found {found:?}")]
    ShapeMismatch {
        /// Tensor name.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A weight is stored in a type Kiln cannot decode.
    #[error("tensor {name:?}: {reason}")]
    BadTensor {
        /// Tensor name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A GGUF file could not be read.
    #[error(transparent)]
    Gguf(#[from] kiln_gguf::GgufError),
    /// A tensor's quantized bytes could not be decoded.
    #[error("tensor {tensor}: {source}")]
    Dequant {
        /// The tensor's name in its file.
        tensor: String,
        /// What the block codec found.
        #[source]
        source: kiln_gguf::blocks::BlockError,
    },
    /// A safetensors file could not be read or written.
    #[error("safetensors {}: {reason}", path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A PyTorch checkpoint (`.pt`, `.bin`) could not be read or written.
    #[error("{}: {source}", path.display())]
    Torch {
        /// The file.
        path: PathBuf,
        /// What the reader or writer found.
        #[source]
        source: kiln_gguf::torch::TorchError,
    },
    /// The model cannot be written in the format asked for.
    #[error("cannot export: {0}")]
    Unsupported(String),
    /// The tokenizer could not be loaded or used.
    #[error(transparent)]
    Tokenizer(#[from] kiln_bpe::BpeError),
    /// Invalid sampling parameters.
    #[error(transparent)]
    Sampling(#[from] crate::sampling::SamplingError),
    /// The chat template failed.
    #[error(transparent)]
    ChatTemplate(#[from] crate::chat::ChatTemplateError),
    /// A sequence would outgrow the model's context or the KV cache.
    #[error("sequence of {needed} tokens exceeds the limit of {limit}")]
    ContextOverflow {
        /// Tokens the operation needs.
        needed: usize,
        /// The limit.
        limit: usize,
    },
    /// A [`WeightSource`](crate::WeightSource) could not supply a weight (a failed collective).
    #[error("weights unavailable: {0}")]
    WeightSource(String),
    /// A caller-supplied argument is out of range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl ModelError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }
}

/// `Result` with [`ModelError`].
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
