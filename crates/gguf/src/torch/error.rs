//! The error type of the [`torch`](super) module: what went wrong reading or writing a PyTorch
//! checkpoint, and where.

use std::io;
use std::path::PathBuf;

use super::value::DType;

/// Everything that can go wrong reading or writing a PyTorch checkpoint.
///
/// Errors from [`load`](super::load) and [`save`](super::save) come wrapped in
/// [`TorchError::InFile`], which names the file; [`TorchError::kind`] looks through it.
#[derive(Debug, thiserror::Error)]
pub enum TorchError {
    /// An error in a named file (the wrapped error says what).
    #[error("{}: {source}", path.display())]
    InFile {
        /// The checkpoint file.
        path: PathBuf,
        /// What went wrong in it.
        #[source]
        source: Box<TorchError>,
    },
    /// Opening, mapping, writing or renaming a file failed.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The bytes are neither a zip checkpoint nor the legacy pickle format.
    #[error("not a PyTorch checkpoint: {0}")]
    NotACheckpoint(String),
    /// A format PyTorch once wrote that this reader does not handle.
    #[error("unsupported checkpoint format: {0}")]
    UnsupportedFormat(String),
    /// Something extends past the end of the data.
    #[error("truncated checkpoint: {what} at byte offset {offset} runs past the end")]
    Truncated {
        /// What was being read.
        what: String,
        /// Byte offset where it starts (in the file, or in the pickle for pickle opcodes).
        offset: u64,
    },
    /// The zip structure is inconsistent.
    #[error("corrupt zip archive: {0}")]
    CorruptZip(String),
    /// A zip entry is compressed or encrypted (PyTorch stores entries uncompressed).
    #[error(
        "zip entry `{entry}` uses compression method {method} (only stored entries are supported)"
    )]
    Compressed {
        /// The entry's name.
        entry: String,
        /// Its compression method (8 is deflate; 99 is encryption).
        method: u16,
    },
    /// A zip entry's CRC-32 does not match its data.
    #[error(
        "zip entry `{entry}`: CRC-32 {found:#010x} does not match the recorded {expected:#010x}"
    )]
    CrcMismatch {
        /// The entry's name.
        entry: String,
        /// The CRC-32 recorded in the central directory.
        expected: u32,
        /// The CRC-32 of the data.
        found: u32,
    },
    /// A record the format requires is absent (`data.pkl`, `byteorder`, ...).
    #[error("missing record `{0}` in the checkpoint archive")]
    MissingRecord(String),
    /// The checkpoint was written on a big-endian machine.
    #[error("unsupported byte order `{0}` (only little-endian checkpoints are supported)")]
    UnsupportedByteOrder(String),
    /// A pickle opcode this reader does not implement (or that is not an opcode at all).
    #[error("unsupported pickle opcode {opcode:#04x}{} at pickle offset {offset}", name.map(|n| format!(" ({n})")).unwrap_or_default())]
    UnknownOpcode {
        /// The opcode byte.
        opcode: u8,
        /// Its name in Python's `pickletools`, when it is a real opcode.
        name: Option<&'static str>,
        /// Its offset in the pickle.
        offset: u64,
    },
    /// The pickle names a global (a class or function) outside the allow-list. Loading it with
    /// Python's unrestricted pickle could run arbitrary code.
    #[error(
        "refusing to load global `{module}.{name}` (pickle offset {offset}): only tensors, \
         storages, OrderedDict and plain values are allowed, as with torch.load(weights_only=True)"
    )]
    DisallowedGlobal {
        /// The global's module (`os`).
        module: String,
        /// Its name (`system`).
        name: String,
        /// Offset of the GLOBAL / STACK_GLOBAL opcode in the pickle.
        offset: u64,
    },
    /// The pickle is well-formed opcode by opcode but does not make sense (stack underflow,
    /// missing memo entry, an operation on the wrong kind of object, bad tensor arguments).
    #[error("malformed pickle at offset {offset}: {reason}")]
    MalformedPickle {
        /// Offset of the offending opcode.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A string in the pickle is not valid UTF-8.
    #[error("invalid UTF-8 in a pickle string at offset {offset}")]
    InvalidUtf8 {
        /// Offset of the opcode.
        offset: u64,
    },
    /// Nesting, size or count beyond what this reader accepts.
    #[error("{what} exceeds the limit of {limit}")]
    LimitExceeded {
        /// What is too deep or too large.
        what: String,
        /// The limit.
        limit: u64,
    },
    /// An integer does not fit in `i64`.
    #[error("integer with {bytes} bytes does not fit in an i64")]
    IntegerTooLarge {
        /// Its encoded length.
        bytes: usize,
    },
    /// A value of a kind the [`Value`](super::Value) model does not have.
    #[error("unsupported value in the checkpoint: {0}")]
    UnsupportedValue(String),
    /// A tensor references a storage whose record is absent.
    #[error("storage `{key}` is referenced but its record `{record}` is missing")]
    StorageMissing {
        /// The storage key (`0`, `1`, ...).
        key: String,
        /// The record looked for.
        record: String,
    },
    /// A storage record's length is not the declared element count times the dtype's size.
    #[error(
        "storage `{key}` ({dtype}, {numel} elements) should hold {expected} bytes but has {found}"
    )]
    StorageSizeMismatch {
        /// The storage key.
        key: String,
        /// Its dtype.
        dtype: DType,
        /// Its declared element count.
        numel: u64,
        /// `numel * dtype.size()` (saturated).
        expected: u64,
        /// The bytes present.
        found: u64,
    },
    /// A storage type with no [`DType`] here (complex, quantized, float8, untyped, ...).
    #[error("unsupported storage type `torch.{0}`")]
    UnsupportedStorage(String),
    /// A tensor's shape, strides and offset do not fit its storage, or its data has the wrong
    /// length.
    #[error("invalid tensor: {0}")]
    InvalidTensor(String),
    /// A tensor was read as an element type that is not its dtype.
    #[error("tensor has dtype {found}, not {expected}")]
    DtypeMismatch {
        /// The dtype asked for.
        expected: DType,
        /// The tensor's dtype.
        found: DType,
    },
}

impl TorchError {
    /// The error itself, looking through [`TorchError::InFile`].
    pub fn kind(&self) -> &TorchError {
        match self {
            TorchError::InFile { source, .. } => source.kind(),
            other => other,
        }
    }

    /// Wraps `self` with the file it happened in (once).
    pub(crate) fn in_file(self, path: impl Into<PathBuf>) -> TorchError {
        match self {
            e @ TorchError::InFile { .. } => e,
            e => TorchError::InFile {
                path: path.into(),
                source: Box::new(e),
            },
        }
    }

    pub(crate) fn malformed(offset: usize, reason: impl Into<String>) -> TorchError {
        TorchError::MalformedPickle {
            offset: offset as u64,
            reason: reason.into(),
        }
    }

    pub(crate) fn truncated(what: impl Into<String>, offset: usize) -> TorchError {
        TorchError::Truncated {
            what: what.into(),
            offset: offset as u64,
        }
    }

    pub(crate) fn limit(what: impl Into<String>, limit: usize) -> TorchError {
        TorchError::LimitExceeded {
            what: what.into(),
            limit: limit as u64,
        }
    }
}
