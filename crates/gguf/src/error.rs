//! The crate's error type: what went wrong reading or writing a GGUF file, and where.

use std::io;
use std::path::PathBuf;

use crate::{ALIGNMENT_KEY, GgmlType, MAX_ARRAY_DEPTH};

/// Everything that can go wrong reading or writing a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// Opening, mapping, writing or renaming a file failed.
    #[error("GGUF I/O error on {}: {source}", path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The file does not start with `GGUF`.
    #[error("not a GGUF file: magic bytes are {found:02x?}, expected \"GGUF\" [47, 47, 55, 46]")]
    BadMagic {
        /// The first four bytes of the file.
        found: [u8; 4],
    },
    /// The header's version is not 2 or 3.
    #[error(
        "unsupported GGUF version {0}: only versions 2 and 3 are supported \
         (version 1 used 32-bit counts; a huge number suggests a big-endian file)"
    )]
    UnsupportedVersion(u32),
    /// Something extends past the end of the data (also reported for absurd lengths/counts).
    #[error("truncated GGUF: {what} at byte offset {offset} runs past the end of the file")]
    Truncated {
        /// What was being read.
        what: String,
        /// Byte offset where it starts.
        offset: u64,
    },
    /// A string is not valid UTF-8.
    #[error("invalid UTF-8 in {what} at byte offset {offset}")]
    InvalidUtf8 {
        /// Which string.
        what: String,
        /// Byte offset of the string's bytes.
        offset: u64,
    },
    /// A BOOL byte is neither 0 nor 1.
    #[error("invalid BOOL byte {byte:#04x} in {what} at byte offset {offset} (expected 0 or 1)")]
    InvalidBool {
        /// Which value.
        what: String,
        /// The offending byte.
        byte: u8,
        /// Its byte offset.
        offset: u64,
    },
    /// A metadata value (or array element) type id is not one of 0..=12.
    #[error("unknown metadata value type {ty} in {what} at byte offset {offset}")]
    UnknownValueType {
        /// The type id found.
        ty: u32,
        /// Which value.
        what: String,
        /// Byte offset of the type id.
        offset: u64,
    },
    /// Metadata arrays are nested deeper than [`MAX_ARRAY_DEPTH`].
    #[error(
        "metadata arrays nested deeper than {MAX_ARRAY_DEPTH} levels in {what} at byte offset {offset}"
    )]
    NestingTooDeep {
        /// Which value.
        what: String,
        /// Byte offset of the too-deep array.
        offset: u64,
    },
    /// The same metadata key appears twice.
    #[error("duplicate metadata key `{0}`")]
    DuplicateKey(String),
    /// The same tensor name appears twice.
    #[error("duplicate tensor name `{0}`")]
    DuplicateTensor(String),
    /// A tensor's ggml type id is not known.
    #[error("tensor `{tensor}` has unknown ggml type id {ty}")]
    UnknownTensorType {
        /// The tensor.
        tensor: String,
        /// The type id found.
        ty: u32,
    },
    /// A tensor's dimensions are unusable (too many, too large, not a whole number of blocks).
    #[error("tensor `{tensor}` has an invalid shape: {reason}")]
    InvalidShape {
        /// The tensor.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// A tensor's type has no known byte size.
    #[error("tensor `{tensor}` has type {ty} whose byte size is unknown")]
    UnknownTensorSize {
        /// The tensor.
        tensor: String,
        /// Its type.
        ty: GgmlType,
    },
    /// A tensor's offset is not a multiple of the alignment.
    #[error(
        "tensor `{tensor}`: offset {offset} (relative to the data section) \
         is not a multiple of the alignment {alignment}"
    )]
    Misaligned {
        /// The tensor.
        tensor: String,
        /// Its offset relative to the data section.
        offset: u64,
        /// The file's alignment.
        alignment: u64,
    },
    /// A tensor's bytes extend past the end of the file.
    #[error(
        "tensor `{tensor}`: {len} bytes at byte offset {start} extend past the end of the {file_len}-byte file"
    )]
    TensorOutOfBounds {
        /// The tensor.
        tensor: String,
        /// Absolute byte offset of its data (saturated on overflow).
        start: u64,
        /// Its size in bytes.
        len: u64,
        /// The file's size in bytes.
        file_len: u64,
    },
    /// `general.alignment` is zero or not a power of two.
    #[error("invalid `{ALIGNMENT_KEY}` {0}: must be a non-zero power of two")]
    InvalidAlignment(u64),
    /// A required metadata key is absent.
    #[error("metadata key `{0}` not found")]
    MissingKey(String),
    /// A metadata value has a different type than requested.
    #[error("metadata key `{key}` has type {found}, expected {expected}")]
    WrongType {
        /// The key.
        key: String,
        /// The type asked for.
        expected: &'static str,
        /// The type present.
        found: &'static str,
    },
    /// A metadata integer does not fit the requested integer type.
    #[error("metadata key `{key}`: value {value} does not fit in {expected}")]
    OutOfRange {
        /// The key.
        key: String,
        /// The value, formatted.
        value: String,
        /// The type asked for.
        expected: &'static str,
    },
    /// Writer: the tensor data length does not match its shape and type.
    #[error("tensor `{tensor}`: got {found} bytes of data, but its shape and type need {expected}")]
    TensorSizeMismatch {
        /// The tensor.
        tensor: String,
        /// Bytes needed.
        expected: u64,
        /// Bytes given.
        found: u64,
    },
}
