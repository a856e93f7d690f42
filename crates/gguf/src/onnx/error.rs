//! The error type of the [`onnx`](super) module: what is wrong with a model to export, and where.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong building or writing an ONNX file.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    /// Writing or renaming the file failed.
    #[error("ONNX I/O error on {}: {source}", path.display())]
    Io {
        /// The file being written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Writing to a stream ([`ModelProto::write_to`](super::ModelProto::write_to)) failed.
    #[error("writing the ONNX model failed: {0}")]
    Write(#[source] io::Error),
    /// The structure does not fit together (zero sizes, heads that do not divide, ...).
    #[error("invalid ONNX model spec: {0}")]
    InvalidSpec(String),
    /// A weight the architecture needs was not given.
    #[error("missing weight `{name}` (expected shape {expected:?})")]
    MissingWeight {
        /// The weight's name (Kiln's parameter path, e.g. `blocks.0.attn.qkv.weight`).
        name: String,
        /// The shape it must have.
        expected: Vec<usize>,
    },
    /// A weight has a different shape than the spec implies.
    #[error("weight `{name}` has shape {found:?}, but the spec needs {expected:?}")]
    ShapeMismatch {
        /// The weight.
        name: String,
        /// The shape the spec implies.
        expected: Vec<usize>,
        /// The shape given.
        found: Vec<usize>,
    },
    /// A weight's data does not hold as many values as its shape says.
    #[error("weight `{name}` of shape {shape:?} needs {expected} values, got {found}")]
    DataLength {
        /// The weight.
        name: String,
        /// Its declared shape.
        shape: Vec<usize>,
        /// The product of the shape.
        expected: usize,
        /// The number of values given.
        found: usize,
    },
    /// The same weight name was given twice.
    #[error("weight `{0}` given twice")]
    DuplicateWeight(String),
    /// A weight the architecture does not use (for example `lm_head.weight` with tied
    /// embeddings): the weights and the spec describe different models.
    #[error("weight `{0}` is not used by this architecture")]
    UnexpectedWeight(String),
    /// The serialized model exceeds protobuf's 2 GiB message limit. Larger models need ONNX's
    /// external-data format (weights in a side file), which this writer does not produce yet.
    #[error(
        "the ONNX model would be {bytes} bytes, over protobuf's limit of {limit} bytes; \
         models this large need ONNX external data, which is not supported yet"
    )]
    TooLarge {
        /// The encoded size.
        bytes: u64,
        /// The largest size a protobuf message may have (2³¹ − 1).
        limit: u64,
    },
}
