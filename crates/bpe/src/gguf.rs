//! GGUF (v2/v3) container reader and a minimal writer.
//!
//! GGUF is the single-file model format of llama.cpp / ggml: a header, typed
//! metadata key/value pairs, tensor descriptors and an aligned tensor data
//! section, all little-endian. [`GgufFile::open`] memory-maps a file, parses
//! and validates the header (every tensor known, aligned and in bounds) and
//! then hands out tensor bytes straight from the map. [`GgufWriter`] writes
//! v3 files (used by tests and for exporting models).
//!
//! Malformed, truncated or hostile input never panics and never triggers an
//! allocation larger than the input: every length and count is checked
//! against the bytes that remain before anything is allocated.

use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;

/// The four magic bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// The GGUF version [`GgufWriter`] writes.
pub const GGUF_WRITE_VERSION: u32 = 3;
/// Data-section alignment used when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Metadata key (type UINT32) that overrides the data-section alignment.
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// Most dimensions a tensor may have (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;
/// Deepest nesting of metadata arrays the reader accepts (an array of scalars is depth 1).
pub const MAX_ARRAY_DEPTH: usize = 16;

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

// ---------------------------------------------------------------------------
// Metadata values
// ---------------------------------------------------------------------------

const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;
const T_I64: u32 = 11;
const T_F64: u32 = 12;

/// GGUF spec name of a value type id (`"?"` if unknown).
fn value_type_name(ty: u32) -> &'static str {
    match ty {
        T_U8 => "UINT8",
        T_I8 => "INT8",
        T_U16 => "UINT16",
        T_I16 => "INT16",
        T_U32 => "UINT32",
        T_I32 => "INT32",
        T_F32 => "FLOAT32",
        T_BOOL => "BOOL",
        T_STRING => "STRING",
        T_ARRAY => "ARRAY",
        T_U64 => "UINT64",
        T_I64 => "INT64",
        T_F64 => "FLOAT64",
        _ => "?",
    }
}

/// Smallest encoded size of one value of type `ty` (None if unknown).
fn min_value_size(ty: u32) -> Option<u64> {
    Some(match ty {
        T_U8 | T_I8 | T_BOOL => 1,
        T_U16 | T_I16 => 2,
        T_U32 | T_I32 | T_F32 => 4,
        T_U64 | T_I64 | T_F64 => 8,
        T_STRING => 8,
        T_ARRAY => 12,
        _ => return None,
    })
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    /// UINT8.
    U8(u8),
    /// INT8.
    I8(i8),
    /// UINT16.
    U16(u16),
    /// INT16.
    I16(i16),
    /// UINT32.
    U32(u32),
    /// INT32.
    I32(i32),
    /// FLOAT32.
    F32(f32),
    /// BOOL.
    Bool(bool),
    /// STRING (UTF-8).
    String(String),
    /// ARRAY (homogeneous, typed).
    Array(GgufArray),
    /// UINT64.
    U64(u64),
    /// INT64.
    I64(i64),
    /// FLOAT64.
    F64(f64),
}

impl GgufValue {
    /// GGUF type id of this value.
    fn type_id(&self) -> u32 {
        match self {
            Self::U8(_) => T_U8,
            Self::I8(_) => T_I8,
            Self::U16(_) => T_U16,
            Self::I16(_) => T_I16,
            Self::U32(_) => T_U32,
            Self::I32(_) => T_I32,
            Self::F32(_) => T_F32,
            Self::Bool(_) => T_BOOL,
            Self::String(_) => T_STRING,
            Self::Array(_) => T_ARRAY,
            Self::U64(_) => T_U64,
            Self::I64(_) => T_I64,
            Self::F64(_) => T_F64,
        }
    }

    /// GGUF type name, e.g. `"UINT32"`, `"STRING"`, `"ARRAY<INT32>"`.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Array(a) => a.type_name(),
            v => value_type_name(v.type_id()),
        }
    }

    /// The value as `u64` if it is an integer (of any width/sign) that fits.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as `i64` if it is an integer (of any width/sign) that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => i64::try_from(v).ok(),
            Self::I8(v) => Some(v.into()),
            Self::I16(v) => Some(v.into()),
            Self::I32(v) => Some(v.into()),
            Self::I64(v) => Some(v),
            _ => None,
        }
    }

    /// The value as `f64` if it is a FLOAT32 or FLOAT64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            _ => None,
        }
    }

    /// The string if this is a STRING.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    /// The flag if this is a BOOL.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The array if this is an ARRAY.
    pub fn as_array(&self) -> Option<&GgufArray> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }

    /// True if this value is an integer of any width or sign.
    fn is_integer(&self) -> bool {
        matches!(
            self,
            Self::U8(_)
                | Self::I8(_)
                | Self::U16(_)
                | Self::I16(_)
                | Self::U32(_)
                | Self::I32(_)
                | Self::U64(_)
                | Self::I64(_)
        )
    }

    /// The value formatted for error messages (integers and floats only).
    fn display_scalar(&self) -> String {
        match *self {
            Self::U8(v) => v.to_string(),
            Self::I8(v) => v.to_string(),
            Self::U16(v) => v.to_string(),
            Self::I16(v) => v.to_string(),
            Self::U32(v) => v.to_string(),
            Self::I32(v) => v.to_string(),
            Self::U64(v) => v.to_string(),
            Self::I64(v) => v.to_string(),
            Self::F32(v) => v.to_string(),
            Self::F64(v) => v.to_string(),
            _ => self.type_name().to_owned(),
        }
    }
}

/// A metadata array: one typed vector per element type, so large token and
/// merge lists load as a single allocation of `String`s or integers.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufArray {
    /// Array of UINT8.
    U8(Vec<u8>),
    /// Array of INT8.
    I8(Vec<i8>),
    /// Array of UINT16.
    U16(Vec<u16>),
    /// Array of INT16.
    I16(Vec<i16>),
    /// Array of UINT32.
    U32(Vec<u32>),
    /// Array of INT32.
    I32(Vec<i32>),
    /// Array of FLOAT32.
    F32(Vec<f32>),
    /// Array of BOOL.
    Bool(Vec<bool>),
    /// Array of STRING.
    String(Vec<String>),
    /// Array of arrays (each inner array has its own element type).
    Array(Vec<GgufArray>),
    /// Array of UINT64.
    U64(Vec<u64>),
    /// Array of INT64.
    I64(Vec<i64>),
    /// Array of FLOAT64.
    F64(Vec<f64>),
}

impl GgufArray {
    /// GGUF type id of the elements.
    fn elem_type_id(&self) -> u32 {
        match self {
            Self::U8(_) => T_U8,
            Self::I8(_) => T_I8,
            Self::U16(_) => T_U16,
            Self::I16(_) => T_I16,
            Self::U32(_) => T_U32,
            Self::I32(_) => T_I32,
            Self::F32(_) => T_F32,
            Self::Bool(_) => T_BOOL,
            Self::String(_) => T_STRING,
            Self::Array(_) => T_ARRAY,
            Self::U64(_) => T_U64,
            Self::I64(_) => T_I64,
            Self::F64(_) => T_F64,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Self::U8(v) => v.len(),
            Self::I8(v) => v.len(),
            Self::U16(v) => v.len(),
            Self::I16(v) => v.len(),
            Self::U32(v) => v.len(),
            Self::I32(v) => v.len(),
            Self::F32(v) => v.len(),
            Self::Bool(v) => v.len(),
            Self::String(v) => v.len(),
            Self::Array(v) => v.len(),
            Self::U64(v) => v.len(),
            Self::I64(v) => v.len(),
            Self::F64(v) => v.len(),
        }
    }

    /// True if the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// GGUF type name of the elements, e.g. `"STRING"`.
    pub fn elem_type_name(&self) -> &'static str {
        value_type_name(self.elem_type_id())
    }

    /// GGUF type name of the whole array, e.g. `"ARRAY<STRING>"`.
    pub fn type_name(&self) -> &'static str {
        match self.elem_type_id() {
            T_U8 => "ARRAY<UINT8>",
            T_I8 => "ARRAY<INT8>",
            T_U16 => "ARRAY<UINT16>",
            T_I16 => "ARRAY<INT16>",
            T_U32 => "ARRAY<UINT32>",
            T_I32 => "ARRAY<INT32>",
            T_F32 => "ARRAY<FLOAT32>",
            T_BOOL => "ARRAY<BOOL>",
            T_STRING => "ARRAY<STRING>",
            T_ARRAY => "ARRAY<ARRAY>",
            T_U64 => "ARRAY<UINT64>",
            T_I64 => "ARRAY<INT64>",
            _ => "ARRAY<FLOAT64>",
        }
    }

    /// Element `index` as a standalone value (cloned), or None if out of range.
    pub fn get(&self, index: usize) -> Option<GgufValue> {
        Some(match self {
            Self::U8(v) => GgufValue::U8(*v.get(index)?),
            Self::I8(v) => GgufValue::I8(*v.get(index)?),
            Self::U16(v) => GgufValue::U16(*v.get(index)?),
            Self::I16(v) => GgufValue::I16(*v.get(index)?),
            Self::U32(v) => GgufValue::U32(*v.get(index)?),
            Self::I32(v) => GgufValue::I32(*v.get(index)?),
            Self::F32(v) => GgufValue::F32(*v.get(index)?),
            Self::Bool(v) => GgufValue::Bool(*v.get(index)?),
            Self::String(v) => GgufValue::String(v.get(index)?.clone()),
            Self::Array(v) => GgufValue::Array(v.get(index)?.clone()),
            Self::U64(v) => GgufValue::U64(*v.get(index)?),
            Self::I64(v) => GgufValue::I64(*v.get(index)?),
            Self::F64(v) => GgufValue::F64(*v.get(index)?),
        })
    }

    /// The elements if this is an array of STRING.
    pub fn as_strings(&self) -> Option<&[String]> {
        match self {
            Self::String(v) => Some(v),
            _ => None,
        }
    }

    /// The elements if this is an array of INT32.
    pub fn as_i32s(&self) -> Option<&[i32]> {
        match self {
            Self::I32(v) => Some(v),
            _ => None,
        }
    }

    /// The elements if this is an array of UINT32.
    pub fn as_u32s(&self) -> Option<&[u32]> {
        match self {
            Self::U32(v) => Some(v),
            _ => None,
        }
    }

    /// The elements if this is an array of FLOAT32.
    pub fn as_f32s(&self) -> Option<&[f32]> {
        match self {
            Self::F32(v) => Some(v),
            _ => None,
        }
    }

    /// The inner arrays if this is an array of ARRAY.
    pub fn as_arrays(&self) -> Option<&[GgufArray]> {
        match self {
            Self::Array(v) => Some(v),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------
// ggml tensor types
// ---------------------------------------------------------------------------

/// A ggml tensor element type, as stored in GGUF tensor infos.
#[allow(non_camel_case_types, clippy::upper_case_acronyms)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// 4-bit quantized, 32-element blocks with a scale.
    Q4_0,
    /// 4-bit quantized, 32-element blocks with a scale and minimum.
    Q4_1,
    /// 5-bit quantized, 32-element blocks with a scale.
    Q5_0,
    /// 5-bit quantized, 32-element blocks with a scale and minimum.
    Q5_1,
    /// 8-bit quantized, 32-element blocks with a scale.
    Q8_0,
    /// 8-bit quantized, 32-element blocks with a scale and sum.
    Q8_1,
    /// 2-bit k-quant (256-element super-blocks).
    Q2_K,
    /// 3-bit k-quant.
    Q3_K,
    /// 4-bit k-quant.
    Q4_K,
    /// 5-bit k-quant.
    Q5_K,
    /// 6-bit k-quant.
    Q6_K,
    /// 8-bit k-quant (intermediate type).
    Q8_K,
    /// 2.06-bit importance quant.
    IQ2_XXS,
    /// 2.31-bit importance quant.
    IQ2_XS,
    /// 3.06-bit importance quant.
    IQ3_XXS,
    /// 1.56-bit importance quant.
    IQ1_S,
    /// 4-bit non-linear quant, 32-element blocks.
    IQ4_NL,
    /// 3.44-bit importance quant.
    IQ3_S,
    /// 2.5-bit importance quant.
    IQ2_S,
    /// 4.25-bit non-linear quant.
    IQ4_XS,
    /// 8-bit integer.
    I8,
    /// 16-bit integer.
    I16,
    /// 32-bit integer.
    I32,
    /// 64-bit integer.
    I64,
    /// 64-bit float.
    F64,
    /// 1.75-bit importance quant.
    IQ1_M,
    /// bfloat16.
    BF16,
}

impl GgmlType {
    /// Every known type, in id order.
    pub const ALL: [GgmlType; 29] = [
        Self::F32,
        Self::F16,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::Q8_1,
        Self::Q2_K,
        Self::Q3_K,
        Self::Q4_K,
        Self::Q5_K,
        Self::Q6_K,
        Self::Q8_K,
        Self::IQ2_XXS,
        Self::IQ2_XS,
        Self::IQ3_XXS,
        Self::IQ1_S,
        Self::IQ4_NL,
        Self::IQ3_S,
        Self::IQ2_S,
        Self::IQ4_XS,
        Self::I8,
        Self::I16,
        Self::I32,
        Self::I64,
        Self::F64,
        Self::IQ1_M,
        Self::BF16,
    ];

    /// (id, name, elements per block, bytes per block).
    fn info(self) -> (u32, &'static str, usize, usize) {
        match self {
            Self::F32 => (0, "F32", 1, 4),
            Self::F16 => (1, "F16", 1, 2),
            Self::Q4_0 => (2, "Q4_0", 32, 18),
            Self::Q4_1 => (3, "Q4_1", 32, 20),
            Self::Q5_0 => (6, "Q5_0", 32, 22),
            Self::Q5_1 => (7, "Q5_1", 32, 24),
            Self::Q8_0 => (8, "Q8_0", 32, 34),
            Self::Q8_1 => (9, "Q8_1", 32, 36),
            Self::Q2_K => (10, "Q2_K", 256, 84),
            Self::Q3_K => (11, "Q3_K", 256, 110),
            Self::Q4_K => (12, "Q4_K", 256, 144),
            Self::Q5_K => (13, "Q5_K", 256, 176),
            Self::Q6_K => (14, "Q6_K", 256, 210),
            Self::Q8_K => (15, "Q8_K", 256, 292),
            Self::IQ2_XXS => (16, "IQ2_XXS", 256, 66),
            Self::IQ2_XS => (17, "IQ2_XS", 256, 74),
            Self::IQ3_XXS => (18, "IQ3_XXS", 256, 98),
            Self::IQ1_S => (19, "IQ1_S", 256, 50),
            Self::IQ4_NL => (20, "IQ4_NL", 32, 18),
            Self::IQ3_S => (21, "IQ3_S", 256, 110),
            Self::IQ2_S => (22, "IQ2_S", 256, 82),
            Self::IQ4_XS => (23, "IQ4_XS", 256, 136),
            Self::I8 => (24, "I8", 1, 1),
            Self::I16 => (25, "I16", 1, 2),
            Self::I32 => (26, "I32", 1, 4),
            Self::I64 => (27, "I64", 1, 8),
            Self::F64 => (28, "F64", 1, 8),
            Self::IQ1_M => (29, "IQ1_M", 256, 56),
            Self::BF16 => (30, "BF16", 1, 2),
        }
    }

    /// The type with ggml id `id`, or None if unknown.
    pub fn from_u32(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.id() == id)
    }

    /// The ggml type id.
    pub fn id(self) -> u32 {
        self.info().0
    }

    /// The ggml name, e.g. `"Q4_1"`.
    pub fn name(&self) -> &'static str {
        self.info().1
    }

    /// Elements per block (1 for plain types).
    pub fn block_size(&self) -> usize {
        self.info().2
    }

    /// Bytes per block, or None if unknown (every current variant is sized).
    pub fn type_size(&self) -> Option<usize> {
        Some(self.info().3)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

// ---------------------------------------------------------------------------
// Tensor infos
// ---------------------------------------------------------------------------

/// One tensor's descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name, e.g. `"blk.0.attn_q.weight"`.
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the innermost (fastest-varying).
    pub dims: Vec<u64>,
    /// Element type.
    pub ty: GgmlType,
    /// Absolute byte offset of the tensor's data in the file.
    pub offset: u64,
}

impl TensorInfo {
    /// Number of elements (product of dims; saturates at `u64::MAX`, which a validated file never reaches).
    pub fn n_elements(&self) -> u64 {
        checked_product(&self.dims).unwrap_or(u64::MAX)
    }

    /// Size of the tensor's data in bytes.
    pub fn byte_size(&self) -> Result<u64, GgufError> {
        tensor_byte_size(&self.name, &self.dims, self.ty)
    }

    /// Row-major shape, outermost first (the dims reversed).
    pub fn shape(&self) -> Vec<usize> {
        self.dims
            .iter()
            .rev()
            .map(|&d| usize::try_from(d).unwrap_or(usize::MAX))
            .collect()
    }
}

fn checked_product(dims: &[u64]) -> Option<u64> {
    dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
}

/// Validates `dims` for type `ty` and returns the data size in bytes.
fn tensor_byte_size(name: &str, dims: &[u64], ty: GgmlType) -> Result<u64, GgufError> {
    let shape_err = |reason: String| GgufError::InvalidShape {
        tensor: name.to_owned(),
        reason,
    };
    if dims.len() > MAX_DIMS {
        return Err(shape_err(format!(
            "{} dimensions (ggml supports at most {MAX_DIMS})",
            dims.len()
        )));
    }
    if let Some(d) = dims.iter().find(|&&d| d > i64::MAX as u64) {
        return Err(shape_err(format!("dimension {d} exceeds i64::MAX")));
    }
    let Some(type_size) = ty.type_size() else {
        return Err(GgufError::UnknownTensorSize {
            tensor: name.to_owned(),
            ty,
        });
    };
    let block = ty.block_size() as u64;
    let ne0 = dims.first().copied().unwrap_or(1);
    if block == 0 || !ne0.is_multiple_of(block) {
        return Err(shape_err(format!(
            "innermost dimension {ne0} is not a multiple of the {ty} block size {block}"
        )));
    }
    let n = checked_product(dims)
        .ok_or_else(|| shape_err(format!("element count of {dims:?} overflows u64")))?;
    (n / block)
        .checked_mul(type_size as u64)
        .ok_or_else(|| shape_err(format!("byte size of {dims:?} {ty} overflows u64")))
}

fn align_up(x: u64, alignment: u64) -> Option<u64> {
    x.checked_next_multiple_of(alignment)
}

fn check_alignment(value: &GgufValue) -> Result<u64, GgufError> {
    let GgufValue::U32(a) = *value else {
        return Err(GgufError::WrongType {
            key: ALIGNMENT_KEY.to_owned(),
            expected: "UINT32",
            found: value.type_name(),
        });
    };
    let a = u64::from(a);
    if a.is_power_of_two() {
        Ok(a)
    } else {
        Err(GgufError::InvalidAlignment(a))
    }
}

// ---------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------

/// Lazily-built description of what is being read, for error messages only.
type What<'w> = &'w dyn Fn() -> String;

/// Bounds-checked little-endian reader over a byte slice.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn offset(&self) -> u64 {
        self.pos as u64
    }

    fn remaining(&self) -> u64 {
        self.buf.len().saturating_sub(self.pos) as u64
    }

    fn truncated(&self, what: What<'_>) -> GgufError {
        GgufError::Truncated {
            what: what(),
            offset: self.offset(),
        }
    }

    /// Takes `n` bytes or fails without moving.
    fn take(&mut self, n: u64, what: What<'_>) -> Result<&'a [u8], GgufError> {
        let bytes = usize::try_from(n)
            .ok()
            .and_then(|n| self.pos.checked_add(n))
            .and_then(|end| self.buf.get(self.pos..end));
        match bytes {
            Some(b) => {
                self.pos += b.len();
                Ok(b)
            }
            None => Err(self.truncated(what)),
        }
    }

    fn array<const N: usize>(&mut self, what: What<'_>) -> Result<[u8; N], GgufError> {
        let arr = self
            .buf
            .get(self.pos..)
            .and_then(|rest| rest.first_chunk::<N>())
            .copied();
        match arr {
            Some(a) => {
                self.pos += N;
                Ok(a)
            }
            None => Err(self.truncated(what)),
        }
    }

    fn u32(&mut self, what: What<'_>) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: What<'_>) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// Reads a GGUF string (u64 length + UTF-8 bytes) borrowed from the buffer.
    fn str(&mut self, what: What<'_>) -> Result<&'a str, GgufError> {
        let len = self.u64(&|| format!("length of {}", what()))?;
        let start = self.offset();
        let bytes = self.take(len, &|| format!("{} ({len}-byte string)", what()))?;
        std::str::from_utf8(bytes).map_err(|_| GgufError::InvalidUtf8 {
            what: what(),
            offset: start,
        })
    }

    /// Reads a u64 count and checks that `count` items of at least `min_size`
    /// bytes each fit in the remaining bytes, so it is safe to allocate for.
    fn count(&mut self, min_size: u64, what: What<'_>) -> Result<usize, GgufError> {
        let count_offset = self.offset();
        let n = self.u64(&|| format!("count of {}", what()))?;
        let fits = n
            .checked_mul(min_size)
            .is_some_and(|need| need <= self.remaining());
        match usize::try_from(n) {
            Ok(n) if fits => Ok(n),
            _ => Err(GgufError::Truncated {
                what: format!("{n} {}", what()),
                offset: count_offset,
            }),
        }
    }
}

/// Decodes consecutive little-endian `N`-byte values.
fn decode<const N: usize, T>(raw: &[u8], f: fn([u8; N]) -> T) -> Vec<T> {
    let (chunks, _) = raw.as_chunks::<N>();
    chunks.iter().map(|&c| f(c)).collect()
}

fn read_bool(c: &mut Cursor<'_>, what: What<'_>) -> Result<bool, GgufError> {
    let offset = c.offset();
    match c.array::<1>(what)? {
        [0] => Ok(false),
        [1] => Ok(true),
        [byte] => Err(GgufError::InvalidBool {
            what: what(),
            byte,
            offset,
        }),
    }
}

/// Reads a value whose type id (`ty`, read at `ty_offset`) precedes it.
fn read_value(
    c: &mut Cursor<'_>,
    ty: u32,
    ty_offset: u64,
    what: What<'_>,
) -> Result<GgufValue, GgufError> {
    Ok(match ty {
        T_U8 => GgufValue::U8(u8::from_le_bytes(c.array(what)?)),
        T_I8 => GgufValue::I8(i8::from_le_bytes(c.array(what)?)),
        T_U16 => GgufValue::U16(u16::from_le_bytes(c.array(what)?)),
        T_I16 => GgufValue::I16(i16::from_le_bytes(c.array(what)?)),
        T_U32 => GgufValue::U32(u32::from_le_bytes(c.array(what)?)),
        T_I32 => GgufValue::I32(i32::from_le_bytes(c.array(what)?)),
        T_F32 => GgufValue::F32(f32::from_le_bytes(c.array(what)?)),
        T_BOOL => GgufValue::Bool(read_bool(c, what)?),
        T_STRING => GgufValue::String(c.str(what)?.to_owned()),
        T_ARRAY => GgufValue::Array(read_array(c, 1, what)?),
        T_U64 => GgufValue::U64(u64::from_le_bytes(c.array(what)?)),
        T_I64 => GgufValue::I64(i64::from_le_bytes(c.array(what)?)),
        T_F64 => GgufValue::F64(f64::from_le_bytes(c.array(what)?)),
        _ => {
            return Err(GgufError::UnknownValueType {
                ty,
                what: what(),
                offset: ty_offset,
            });
        }
    })
}

/// Reads an array (element type, count, elements) at nesting `depth` (1 = outermost).
fn read_array(c: &mut Cursor<'_>, depth: usize, what: What<'_>) -> Result<GgufArray, GgufError> {
    let ty_offset = c.offset();
    if depth > MAX_ARRAY_DEPTH {
        return Err(GgufError::NestingTooDeep {
            what: what(),
            offset: ty_offset,
        });
    }
    let ty = c.u32(&|| format!("array element type of {}", what()))?;
    let Some(min_size) = min_value_size(ty) else {
        return Err(GgufError::UnknownValueType {
            ty,
            what: format!("array element type of {}", what()),
            offset: ty_offset,
        });
    };
    let elems = &|| format!("{} array elements of {}", value_type_name(ty), what());
    let n = c.count(min_size, elems)?;
    // For fixed-size types `min_size` is exact; `count` already checked the total fits.
    let mut fixed = || c.take(n as u64 * min_size, elems);
    Ok(match ty {
        T_U8 => GgufArray::U8(fixed()?.to_vec()),
        T_I8 => GgufArray::I8(decode(fixed()?, i8::from_le_bytes)),
        T_U16 => GgufArray::U16(decode(fixed()?, u16::from_le_bytes)),
        T_I16 => GgufArray::I16(decode(fixed()?, i16::from_le_bytes)),
        T_U32 => GgufArray::U32(decode(fixed()?, u32::from_le_bytes)),
        T_I32 => GgufArray::I32(decode(fixed()?, i32::from_le_bytes)),
        T_F32 => GgufArray::F32(decode(fixed()?, f32::from_le_bytes)),
        T_U64 => GgufArray::U64(decode(fixed()?, u64::from_le_bytes)),
        T_I64 => GgufArray::I64(decode(fixed()?, i64::from_le_bytes)),
        T_F64 => GgufArray::F64(decode(fixed()?, f64::from_le_bytes)),
        T_BOOL => {
            let start = c.offset();
            let raw = c.take(n as u64, elems)?;
            let mut out = Vec::with_capacity(n);
            for (i, &byte) in raw.iter().enumerate() {
                match byte {
                    0 => out.push(false),
                    1 => out.push(true),
                    _ => {
                        return Err(GgufError::InvalidBool {
                            what: format!("element {i} of {}", what()),
                            byte,
                            offset: start + i as u64,
                        });
                    }
                }
            }
            GgufArray::Bool(out)
        }
        T_STRING => {
            let mut out = Vec::with_capacity(n);
            for i in 0..n {
                out.push(c.str(&|| format!("element {i} of {}", what()))?.to_owned());
            }
            GgufArray::String(out)
        }
        _ => {
            // T_ARRAY: each element carries its own element type and count.
            let mut out = Vec::with_capacity(n);
            for i in 0..n {
                out.push(read_array(c, depth + 1, &|| {
                    format!("element {i} of {}", what())
                })?);
            }
            GgufArray::Array(out)
        }
    })
}

/// Everything parsed from a file's header.
struct Header {
    version: u32,
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<TensorInfo>,
    alignment: u64,
    data_offset: u64,
}

/// Smallest encoded metadata pair: empty key, type id, 1-byte value.
const MIN_KV_SIZE: u64 = 8 + 4 + 1;
/// Smallest encoded tensor info: empty name, n_dims = 0, type id, offset.
const MIN_TENSOR_INFO_SIZE: u64 = 8 + 4 + 4 + 8;

/// Parses and validates the header of the GGUF file `buf`.
fn parse_header(buf: &[u8]) -> Result<Header, GgufError> {
    let mut c = Cursor { buf, pos: 0 };
    let magic = c.array::<4>(&|| "magic bytes".to_owned())?;
    if magic != GGUF_MAGIC {
        return Err(GgufError::BadMagic { found: magic });
    }
    let version = c.u32(&|| "version".to_owned())?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::UnsupportedVersion(version));
    }
    let n_tensors_offset = c.offset();
    let n_tensors_raw = c.u64(&|| "tensor count".to_owned())?;
    let n_kv = c.count(MIN_KV_SIZE, &|| "metadata key/value pairs".to_owned())?;

    let mut metadata = Vec::with_capacity(n_kv);
    let mut seen = HashSet::with_capacity(n_kv);
    for i in 0..n_kv {
        let key = c.str(&|| format!("key of metadata pair {i}"))?;
        if !seen.insert(key) {
            return Err(GgufError::DuplicateKey(key.to_owned()));
        }
        let what = &|| format!("metadata key `{key}`");
        let ty_offset = c.offset();
        let ty = c.u32(&|| format!("value type of metadata key `{key}`"))?;
        let value = read_value(&mut c, ty, ty_offset, what)?;
        metadata.push((key.to_owned(), value));
    }

    let alignment = match metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
        Some((_, v)) => check_alignment(v)?,
        None => DEFAULT_ALIGNMENT,
    };

    // The tensor count precedes the metadata, so check it against what is left now.
    let n_tensors = usize::try_from(n_tensors_raw)
        .ok()
        .filter(|_| {
            n_tensors_raw
                .checked_mul(MIN_TENSOR_INFO_SIZE)
                .is_some_and(|need| need <= c.remaining())
        })
        .ok_or_else(|| GgufError::Truncated {
            what: format!("{n_tensors_raw} tensor infos"),
            offset: n_tensors_offset,
        })?;

    let mut raw = Vec::with_capacity(n_tensors);
    let mut names = HashSet::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let name = c.str(&|| format!("name of tensor {i}"))?;
        if !names.insert(name) {
            return Err(GgufError::DuplicateTensor(name.to_owned()));
        }
        let n_dims = c.u32(&|| format!("dimension count of tensor `{name}`"))?;
        if n_dims as usize > MAX_DIMS {
            return Err(GgufError::InvalidShape {
                tensor: name.to_owned(),
                reason: format!("{n_dims} dimensions (ggml supports at most {MAX_DIMS})"),
            });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            dims.push(c.u64(&|| format!("dimension {d} of tensor `{name}`"))?);
        }
        let ty_id = c.u32(&|| format!("type of tensor `{name}`"))?;
        let ty = GgmlType::from_u32(ty_id).ok_or_else(|| GgufError::UnknownTensorType {
            tensor: name.to_owned(),
            ty: ty_id,
        })?;
        let offset = c.u64(&|| format!("data offset of tensor `{name}`"))?;
        raw.push(TensorInfo {
            name: name.to_owned(),
            dims,
            ty,
            offset,
        });
    }

    let data_offset =
        align_up(c.offset(), alignment).ok_or(GgufError::InvalidAlignment(alignment))?;
    let file_len = buf.len() as u64;
    let tensors = raw
        .into_iter()
        .map(|mut t| {
            if !t.offset.is_multiple_of(alignment) {
                return Err(GgufError::Misaligned {
                    tensor: t.name,
                    offset: t.offset,
                    alignment,
                });
            }
            let len = t.byte_size()?;
            let start = data_offset.checked_add(t.offset);
            match start.and_then(|s| s.checked_add(len)) {
                Some(end) if end <= file_len => {}
                _ => {
                    return Err(GgufError::TensorOutOfBounds {
                        tensor: t.name,
                        start: data_offset.saturating_add(t.offset),
                        len,
                        file_len,
                    });
                }
            }
            t.offset += data_offset;
            Ok(t)
        })
        .collect::<Result<Vec<_>, _>>()?;

    Ok(Header {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    })
}

// ---------------------------------------------------------------------------
// GgufFile
// ---------------------------------------------------------------------------

/// The bytes a [`GgufFile`] reads from.
enum Backing {
    Mmap(Mmap),
    Owned(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Mmap(m) => m,
            Self::Owned(v) => v,
        }
    }
}

/// An opened, validated GGUF file: metadata and tensor infos parsed, tensor data mapped.
pub struct GgufFile {
    /// GGUF version (2 or 3).
    pub version: u32,
    /// Metadata pairs in file order (keys are unique).
    pub metadata: Vec<(String, GgufValue)>,
    /// Tensor infos in file order (names are unique; offsets absolute).
    pub tensors: Vec<TensorInfo>,
    /// Data-section alignment in bytes.
    pub alignment: u64,
    /// Absolute byte offset of the tensor data section.
    pub data_offset: u64,
    data: Backing,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("metadata_len", &self.metadata.len())
            .field("tensors_len", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .field("file_len", &self.data.bytes().len())
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps and parses the GGUF file at `path`, validating that every
    /// tensor has a known type and is aligned and in bounds.
    ///
    /// The file must not be modified while the returned value is alive.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref();
        let io_err = |source| GgufError::Io {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(io_err)?;
        // SAFETY: the map is read-only; as documented above, the caller must not
        // modify or truncate the file while it is mapped.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io_err)?;
        Self::from_backing(Backing::Mmap(mmap))
    }

    /// Parses a GGUF file held in memory (same validation as [`GgufFile::open`]).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, GgufError> {
        Self::from_backing(Backing::Owned(bytes))
    }

    fn from_backing(data: Backing) -> Result<Self, GgufError> {
        let h = parse_header(data.bytes())?;
        Ok(Self {
            version: h.version,
            metadata: h.metadata,
            tensors: h.tensors,
            alignment: h.alignment,
            data_offset: h.data_offset,
            data,
        })
    }

    /// The whole file's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.data.bytes()
    }

    /// The value of metadata key `key`, if present.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata
            .iter()
            .find_map(|(k, v)| (k == key).then_some(v))
    }

    /// The value of `key`, or [`GgufError::MissingKey`].
    pub fn require(&self, key: &str) -> Result<&GgufValue, GgufError> {
        self.get(key)
            .ok_or_else(|| GgufError::MissingKey(key.to_owned()))
    }

    fn typed<'s, T>(
        &'s self,
        key: &str,
        expected: &'static str,
        f: impl FnOnce(&'s GgufValue) -> Option<T>,
    ) -> Result<T, GgufError> {
        let v = self.require(key)?;
        f(v).ok_or_else(|| GgufError::WrongType {
            key: key.to_owned(),
            expected,
            found: v.type_name(),
        })
    }

    /// An integer key converted with `conv`; non-integers give `WrongType`, misfits `OutOfRange`.
    fn integer<T>(
        &self,
        key: &str,
        expected: &'static str,
        conv: impl FnOnce(&GgufValue) -> Option<T>,
    ) -> Result<T, GgufError> {
        let v = self.require(key)?;
        if !v.is_integer() {
            return Err(GgufError::WrongType {
                key: key.to_owned(),
                expected: "an integer",
                found: v.type_name(),
            });
        }
        conv(v).ok_or_else(|| GgufError::OutOfRange {
            key: key.to_owned(),
            value: v.display_scalar(),
            expected,
        })
    }

    /// A STRING value.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        self.typed(key, "STRING", GgufValue::as_str)
    }

    /// A BOOL value.
    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        self.typed(key, "BOOL", GgufValue::as_bool)
    }

    /// An integer value of any width/sign that fits in `u64`.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.integer(key, "u64", GgufValue::as_u64)
    }

    /// An integer value of any width/sign that fits in `u32`.
    pub fn get_u32(&self, key: &str) -> Result<u32, GgufError> {
        self.integer(key, "u32", |v| {
            v.as_u64().and_then(|x| u32::try_from(x).ok())
        })
    }

    /// An integer value of any width/sign that fits in `i64`.
    pub fn get_i64(&self, key: &str) -> Result<i64, GgufError> {
        self.integer(key, "i64", GgufValue::as_i64)
    }

    /// A FLOAT32 or FLOAT64 value as `f32` (FLOAT64 is rounded).
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        self.typed(key, "FLOAT32 or FLOAT64", |v| v.as_f64().map(|x| x as f32))
    }

    /// A FLOAT32 or FLOAT64 value as `f64`.
    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        self.typed(key, "FLOAT32 or FLOAT64", GgufValue::as_f64)
    }

    /// An ARRAY value of any element type.
    pub fn get_array(&self, key: &str) -> Result<&GgufArray, GgufError> {
        self.typed(key, "ARRAY", GgufValue::as_array)
    }

    /// An ARRAY of STRING.
    pub fn get_string_array(&self, key: &str) -> Result<&[String], GgufError> {
        self.typed(key, "ARRAY<STRING>", |v| v.as_array()?.as_strings())
    }

    /// An ARRAY of INT32.
    pub fn get_i32_array(&self, key: &str) -> Result<&[i32], GgufError> {
        self.typed(key, "ARRAY<INT32>", |v| v.as_array()?.as_i32s())
    }

    /// An ARRAY of UINT32.
    pub fn get_u32_array(&self, key: &str) -> Result<&[u32], GgufError> {
        self.typed(key, "ARRAY<UINT32>", |v| v.as_array()?.as_u32s())
    }

    /// An ARRAY of FLOAT32.
    pub fn get_f32_array(&self, key: &str) -> Result<&[f32], GgufError> {
        self.typed(key, "ARRAY<FLOAT32>", |v| v.as_array()?.as_f32s())
    }

    /// The tensor named `name`, if present.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor of this file (bounds were validated at open).
    ///
    /// An info that does not describe bytes of this file (e.g. from another
    /// file) yields an empty slice rather than a panic.
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        let range = info.byte_size().ok().and_then(|len| {
            let start = usize::try_from(info.offset).ok()?;
            let end = start.checked_add(usize::try_from(len).ok()?)?;
            self.data.bytes().get(start..end)
        });
        range.unwrap_or(&[])
    }
}

// ---------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------

/// A tensor queued in a [`GgufWriter`].
#[derive(Clone, Debug)]
struct PendingTensor {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    data: Vec<u8>,
}

/// Builds a GGUF v3 file from metadata and raw tensor bytes.
///
/// Tensors are laid out in insertion order, each padded to the alignment
/// (32, or `general.alignment` if set as a UINT32).
#[derive(Clone, Debug)]
pub struct GgufWriter {
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<PendingTensor>,
    alignment: u64,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u64(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// Appends a value's payload (without its type id).
fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(u8::from(*x)),
        GgufValue::String(s) => put_str(out, s),
        GgufValue::Array(a) => put_array(out, a),
        GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

/// Appends fixed-size values encoded with `f`.
fn put_le<T: Copy, const N: usize>(out: &mut Vec<u8>, v: &[T], f: fn(T) -> [u8; N]) {
    out.reserve(v.len() * N);
    v.iter().for_each(|&x| out.extend_from_slice(&f(x)));
}

/// Appends an array: element type, count, elements.
fn put_array(out: &mut Vec<u8>, a: &GgufArray) {
    put_u32(out, a.elem_type_id());
    put_u64(out, a.len() as u64);
    match a {
        GgufArray::U8(v) => out.extend_from_slice(v),
        GgufArray::I8(v) => put_le(out, v, i8::to_le_bytes),
        GgufArray::U16(v) => put_le(out, v, u16::to_le_bytes),
        GgufArray::I16(v) => put_le(out, v, i16::to_le_bytes),
        GgufArray::U32(v) => put_le(out, v, u32::to_le_bytes),
        GgufArray::I32(v) => put_le(out, v, i32::to_le_bytes),
        GgufArray::F32(v) => put_le(out, v, f32::to_le_bytes),
        GgufArray::Bool(v) => put_le(out, v, |x| [u8::from(x)]),
        GgufArray::String(v) => v.iter().for_each(|s| put_str(out, s)),
        GgufArray::Array(v) => v.iter().for_each(|inner| put_array(out, inner)),
        GgufArray::U64(v) => put_le(out, v, u64::to_le_bytes),
        GgufArray::I64(v) => put_le(out, v, i64::to_le_bytes),
        GgufArray::F64(v) => put_le(out, v, f64::to_le_bytes),
    }
}

/// Zero bytes needed after `len` bytes to reach a multiple of `alignment`.
fn padding(len: u64, alignment: u64) -> u64 {
    align_up(len, alignment).map_or(0, |a| a - len)
}

impl GgufWriter {
    /// An empty writer (alignment 32).
    pub fn new() -> Self {
        Self {
            metadata: Vec::new(),
            tensors: Vec::new(),
            alignment: DEFAULT_ALIGNMENT,
        }
    }

    /// Adds a metadata pair. Fails on a duplicate key, or if `general.alignment`
    /// is not a UINT32 power of two.
    pub fn add_metadata(
        &mut self,
        key: impl Into<String>,
        value: GgufValue,
    ) -> Result<&mut Self, GgufError> {
        let key = key.into();
        if self.metadata.iter().any(|(k, _)| *k == key) {
            return Err(GgufError::DuplicateKey(key));
        }
        if key == ALIGNMENT_KEY {
            self.alignment = check_alignment(&value)?;
        }
        self.metadata.push((key, value));
        Ok(self)
    }

    /// Adds a tensor with dims in ggml order (innermost first) and its raw
    /// bytes. Fails on a duplicate name or if `data` has the wrong length.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        ty: GgmlType,
        data: Vec<u8>,
    ) -> Result<&mut Self, GgufError> {
        let name = name.into();
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(GgufError::DuplicateTensor(name));
        }
        let expected = tensor_byte_size(&name, dims, ty)?;
        if expected != data.len() as u64 {
            return Err(GgufError::TensorSizeMismatch {
                tensor: name,
                expected,
                found: data.len() as u64,
            });
        }
        self.tensors.push(PendingTensor {
            name,
            dims: dims.to_vec(),
            ty,
            data,
        });
        Ok(self)
    }

    /// Header, metadata, tensor infos and padding up to the data section.
    fn encode_header(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&GGUF_MAGIC);
        put_u32(&mut out, GGUF_WRITE_VERSION);
        put_u64(&mut out, self.tensors.len() as u64);
        put_u64(&mut out, self.metadata.len() as u64);
        for (key, value) in &self.metadata {
            put_str(&mut out, key);
            put_u32(&mut out, value.type_id());
            put_value(&mut out, value);
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            put_u32(&mut out, t.dims.len() as u32);
            t.dims.iter().for_each(|&d| put_u64(&mut out, d));
            put_u32(&mut out, t.ty.id());
            put_u64(&mut out, offset);
            let len = t.data.len() as u64;
            offset += len + padding(len, self.alignment);
        }
        let pad = padding(out.len() as u64, self.alignment);
        out.resize(out.len() + pad as usize, 0);
        out
    }

    /// Writes the complete file to `w`.
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        w.write_all(&self.encode_header())?;
        const ZEROS: [u8; 256] = [0; 256];
        for t in &self.tensors {
            w.write_all(&t.data)?;
            let mut pad = padding(t.data.len() as u64, self.alignment);
            while pad > 0 {
                let n = pad.min(ZEROS.len() as u64);
                w.write_all(ZEROS.get(..n as usize).unwrap_or_default())?;
                pad -= n;
            }
        }
        Ok(())
    }

    /// The complete file as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.encode_header();
        for t in &self.tensors {
            out.extend_from_slice(&t.data);
            let pad = padding(out.len() as u64, self.alignment);
            out.resize(out.len() + pad as usize, 0);
        }
        out
    }

    /// Writes the file to a temporary sibling of `path`, syncs it and renames it into place.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<(), GgufError> {
        let path = path.as_ref();
        let Some(file_name) = path.file_name() else {
            return Err(GgufError::Io {
                path: path.to_owned(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"),
            });
        };
        let tmp = path.with_file_name(format!(
            ".{}.tmp{}",
            file_name.to_string_lossy(),
            std::process::id()
        ));
        let write_tmp = || -> io::Result<()> {
            let mut w = BufWriter::new(File::create(&tmp)?);
            self.write_to(&mut w)?;
            let file = w.into_inner().map_err(io::IntoInnerError::into_error)?;
            file.sync_all()
        };
        if let Err(source) = write_tmp() {
            let _ = std::fs::remove_file(&tmp);
            return Err(GgufError::Io { path: tmp, source });
        }
        std::fs::rename(&tmp, path).map_err(|source| {
            let _ = std::fs::remove_file(&tmp);
            GgufError::Io {
                path: path.to_owned(),
                source,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REAL_FILE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    );

    /// Hand-assembles (possibly malformed) GGUF bytes.
    #[derive(Default)]
    struct Raw(Vec<u8>);

    impl Raw {
        fn header(version: u32, n_tensors: u64, n_kv: u64) -> Self {
            let mut r = Self::default();
            r.bytes(b"GGUF").u32(version).u64(n_tensors).u64(n_kv);
            r
        }
        fn bytes(&mut self, b: &[u8]) -> &mut Self {
            self.0.extend_from_slice(b);
            self
        }
        fn u32(&mut self, v: u32) -> &mut Self {
            self.bytes(&v.to_le_bytes())
        }
        fn u64(&mut self, v: u64) -> &mut Self {
            self.bytes(&v.to_le_bytes())
        }
        fn str(&mut self, s: &str) -> &mut Self {
            self.u64(s.len() as u64).bytes(s.as_bytes())
        }
        fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> &mut Self {
            self.str(name).u32(dims.len() as u32);
            dims.iter().for_each(|&d| {
                self.u64(d);
            });
            self.u32(ty).u64(offset)
        }
        fn pad_to(&mut self, alignment: usize) -> &mut Self {
            while !self.0.len().is_multiple_of(alignment) {
                self.0.push(0);
            }
            self
        }
        fn parse(&self) -> Result<GgufFile, GgufError> {
            GgufFile::from_bytes(self.0.clone())
        }
    }

    fn s(v: &str) -> GgufValue {
        GgufValue::String(v.to_owned())
    }

    fn all_values() -> Vec<(String, GgufValue)> {
        use GgufArray as A;
        use GgufValue as V;
        vec![
            ("general.architecture".into(), s("llama")),
            ("u8".into(), V::U8(200)),
            ("i8".into(), V::I8(-100)),
            ("u16".into(), V::U16(60_000)),
            ("i16".into(), V::I16(-30_000)),
            ("u32".into(), V::U32(4_000_000_000)),
            ("i32".into(), V::I32(-2_000_000_000)),
            ("f32".into(), V::F32(1.5e-5)),
            ("bool.true".into(), V::Bool(true)),
            ("bool.false".into(), V::Bool(false)),
            ("str.empty".into(), s("")),
            ("str.unicode".into(), s("héllo 世界 🦀\n\t\"")),
            ("u64".into(), V::U64(u64::MAX)),
            ("i64".into(), V::I64(i64::MIN)),
            ("f64".into(), V::F64(-2.5e300)),
            ("ключ ✓".into(), V::U8(1)),
            ("".into(), s("empty key")),
            ("arr.u8".into(), V::Array(A::U8(vec![0, 1, 255]))),
            ("arr.i8".into(), V::Array(A::I8(vec![-128, 0, 127]))),
            ("arr.u16".into(), V::Array(A::U16(vec![1, 65_535]))),
            ("arr.i16".into(), V::Array(A::I16(vec![-1, 32_767]))),
            ("arr.u32".into(), V::Array(A::U32(vec![7, u32::MAX]))),
            ("arr.i32".into(), V::Array(A::I32(vec![-7, 1, i32::MAX]))),
            (
                "arr.f32".into(),
                V::Array(A::F32(vec![0.0, -1.25, f32::INFINITY])),
            ),
            (
                "arr.bool".into(),
                V::Array(A::Bool(vec![true, false, true])),
            ),
            (
                "arr.str".into(),
                V::Array(A::String(vec!["".into(), "Ġthe".into(), "日本".into()])),
            ),
            ("arr.u64".into(), V::Array(A::U64(vec![u64::MAX, 0]))),
            ("arr.i64".into(), V::Array(A::I64(vec![i64::MIN, 5]))),
            (
                "arr.f64".into(),
                V::Array(A::F64(vec![std::f64::consts::PI])),
            ),
            ("arr.empty".into(), V::Array(A::U8(vec![]))),
            (
                "arr.nested".into(),
                V::Array(A::Array(vec![
                    A::I32(vec![1, 2]),
                    A::String(vec!["a".into()]),
                    A::Array(vec![A::Bool(vec![false]), A::F64(vec![])]),
                    A::U8(vec![]),
                ])),
            ),
        ]
    }

    /// (name, dims, type, data). The last tensor is a multiple of 32 bytes so the
    /// file ends exactly at its end (no trailing padding).
    fn sample_tensors() -> Vec<(&'static str, Vec<u64>, GgmlType, Vec<u8>)> {
        let ramp = |n: usize| (0..n).map(|i| (i * 7 % 251) as u8).collect::<Vec<u8>>();
        vec![
            ("a.f32", vec![8], GgmlType::F32, ramp(32)),
            ("b.q4_1", vec![64, 2], GgmlType::Q4_1, ramp(80)),
            ("c.f16", vec![3, 2], GgmlType::F16, ramp(12)),
            ("d.q8_0", vec![32, 1, 1, 1], GgmlType::Q8_0, ramp(34)),
            ("e.scalar", vec![], GgmlType::I32, ramp(4)),
            ("z.last", vec![4, 2], GgmlType::F32, ramp(32)),
        ]
    }

    fn sample_writer() -> GgufWriter {
        let mut w = GgufWriter::new();
        for (k, v) in all_values() {
            w.add_metadata(k, v).unwrap();
        }
        for (name, dims, ty, data) in sample_tensors() {
            w.add_tensor(name, &dims, ty, data).unwrap();
        }
        w
    }

    fn check_sample(f: &GgufFile) {
        assert_eq!(f.version, 3);
        assert_eq!(f.alignment, 32);
        assert_eq!(f.data_offset % 32, 0);
        assert_eq!(f.metadata, all_values());
        assert_eq!(f.tensors.len(), sample_tensors().len());
        for ((name, dims, ty, data), t) in sample_tensors().into_iter().zip(&f.tensors) {
            assert_eq!(t.name, name);
            assert_eq!(t.dims, dims);
            assert_eq!(t.ty, ty);
            assert!((t.offset - f.data_offset).is_multiple_of(32), "{name}");
            assert_eq!(f.tensor_data(t), &data[..], "{name}");
            assert_eq!(f.tensor(name), Some(t));
        }
        let last = f.tensors.last().unwrap();
        assert_eq!(last.offset + 32, f.as_bytes().len() as u64);
    }

    #[test]
    fn round_trip_in_memory_and_on_disk() {
        let w = sample_writer();
        let bytes = w.to_bytes();
        check_sample(&GgufFile::from_bytes(bytes.clone()).unwrap());

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sample.gguf");
        w.write(&path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        check_sample(&GgufFile::open(&path).unwrap());
        // Only the final file remains (the temp file was renamed).
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        let mut streamed = Vec::new();
        w.write_to(&mut streamed).unwrap();
        assert_eq!(streamed, bytes);
    }

    #[test]
    fn getters() {
        let f = GgufFile::from_bytes(sample_writer().to_bytes()).unwrap();
        assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(f.get_str("str.empty").unwrap(), "");
        assert_eq!(f.get_u64("u8").unwrap(), 200);
        assert_eq!(f.get_u64("u64").unwrap(), u64::MAX);
        assert_eq!(f.get_u32("u32").unwrap(), 4_000_000_000);
        assert_eq!(f.get_i64("i8").unwrap(), -100);
        assert_eq!(f.get_i64("u32").unwrap(), 4_000_000_000);
        assert_eq!(f.get_f32("f32").unwrap(), 1.5e-5);
        assert_eq!(f.get_f64("f64").unwrap(), -2.5e300);
        assert!(f.get_bool("bool.true").unwrap());
        assert_eq!(f.get_string_array("arr.str").unwrap()[1], "Ġthe");
        assert_eq!(f.get_i32_array("arr.i32").unwrap(), &[-7, 1, i32::MAX]);
        assert_eq!(f.get_u32_array("arr.u32").unwrap(), &[7, u32::MAX]);
        assert_eq!(f.get_f32_array("arr.f32").unwrap()[1], -1.25);
        assert_eq!(f.get_array("arr.nested").unwrap().len(), 4);
        assert_eq!(f.get("arr.u8").unwrap().type_name(), "ARRAY<UINT8>");
        assert_eq!(f.get("f64").unwrap().type_name(), "FLOAT64");
        let nested = f.get_array("arr.nested").unwrap();
        assert_eq!(
            nested.get(0),
            Some(GgufValue::Array(GgufArray::I32(vec![1, 2])))
        );
        assert_eq!(nested.get(9), None);
        assert_eq!(nested.as_arrays().unwrap()[1].elem_type_name(), "STRING");

        assert!(matches!(f.get_str("nope"), Err(GgufError::MissingKey(k)) if k == "nope"));
        assert!(matches!(
            f.get_str("u32"),
            Err(GgufError::WrongType {
                expected: "STRING",
                found: "UINT32",
                ..
            })
        ));
        assert!(matches!(
            f.get_u64("str.empty"),
            Err(GgufError::WrongType {
                found: "STRING",
                ..
            })
        ));
        assert!(matches!(f.get_u64("i8"), Err(GgufError::OutOfRange { .. })));
        assert!(matches!(
            f.get_u32("u64"),
            Err(GgufError::OutOfRange { .. })
        ));
        assert!(matches!(
            f.get_i64("u64"),
            Err(GgufError::OutOfRange { .. })
        ));
        let err = f.get_i32_array("arr.u32").unwrap_err();
        assert!(matches!(
            err,
            GgufError::WrongType {
                expected: "ARRAY<INT32>",
                found: "ARRAY<UINT32>",
                ..
            }
        ));
        assert_eq!(
            err.to_string(),
            "metadata key `arr.u32` has type ARRAY<UINT32>, expected ARRAY<INT32>"
        );
        assert!(f.get_f32("u32").is_err());
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample_writer().to_bytes();
        for len in 0..bytes.len() {
            let res = GgufFile::from_bytes(bytes[..len].to_vec());
            assert!(res.is_err(), "prefix of {len}/{} bytes parsed", bytes.len());
        }
        assert!(GgufFile::from_bytes(bytes).is_ok());
    }

    #[test]
    fn random_corruption_never_panics() {
        let bytes = sample_writer().to_bytes();
        let header_len = GgufFile::from_bytes(bytes.clone()).unwrap().data_offset as usize;
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut ok = 0;
        for _ in 0..3000 {
            let mut b = bytes.clone();
            for _ in 0..1 + next() % 4 {
                let i = (next() % header_len as u64) as usize;
                b[i] = match next() % 4 {
                    0 => 0xff,
                    1 => 0,
                    _ => next() as u8,
                };
            }
            if let Ok(f) = GgufFile::from_bytes(b) {
                ok += 1;
                for t in &f.tensors {
                    assert_eq!(f.tensor_data(t).len() as u64, t.byte_size().unwrap());
                }
            }
        }
        assert!(ok < 3000);
    }

    #[test]
    fn bad_magic() {
        let mut r = Raw::default();
        r.bytes(b"GGUX").u32(3).u64(0).u64(0);
        assert!(matches!(r.parse(), Err(GgufError::BadMagic { found }) if &found == b"GGUX"));
    }

    #[test]
    fn version_1_rejected_and_version_2_accepted() {
        let r = Raw::header(1, 0, 0);
        assert!(matches!(r.parse(), Err(GgufError::UnsupportedVersion(1))));
        assert!(matches!(
            Raw::header(4, 0, 0).parse(),
            Err(GgufError::UnsupportedVersion(4))
        ));
        let mut v2 = sample_writer().to_bytes();
        v2[4] = 2;
        assert_eq!(GgufFile::from_bytes(v2).unwrap().version, 2);
        let empty = Raw::header(3, 0, 0).parse().unwrap();
        assert!(empty.metadata.is_empty() && empty.tensors.is_empty());
    }

    #[test]
    fn unknown_value_type() {
        let mut r = Raw::header(3, 0, 1);
        r.str("k").u32(13).u32(0);
        let err = r.parse().unwrap_err();
        assert!(
            matches!(
                &err,
                GgufError::UnknownValueType {
                    ty: 13,
                    offset: 33,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("`k`"));

        let mut r = Raw::header(3, 0, 1);
        r.str("arr").u32(T_ARRAY).u32(99).u64(0);
        assert!(matches!(
            r.parse(),
            Err(GgufError::UnknownValueType { ty: 99, .. })
        ));
    }

    #[test]
    fn huge_lengths_are_truncation_errors() {
        // Key length u64::MAX.
        let mut r = Raw::header(3, 0, 1);
        r.u64(u64::MAX).bytes(&[0; 64]);
        assert!(matches!(
            r.parse(),
            Err(GgufError::Truncated { offset: 32, .. })
        ));
        // A count too large for the remaining bytes is reported at the count itself.
        let r = Raw::header(3, 0, 1);
        assert!(matches!(
            r.parse(),
            Err(GgufError::Truncated { offset: 16, .. })
        ));
        // String value length u64::MAX.
        let mut r = Raw::header(3, 0, 1);
        r.str("k").u32(T_STRING).u64(u64::MAX).bytes(b"xyz");
        let err = r.parse().unwrap_err();
        assert!(matches!(err, GgufError::Truncated { .. }));
        assert!(err.to_string().contains("`k`"), "{err}");
        // Array counts far beyond the data, for every element type.
        for ty in 0..=12 {
            for count in [u64::MAX, u64::MAX / 2, 1 << 40, 100] {
                let mut r = Raw::header(3, 0, 1);
                r.str("arr").u32(T_ARRAY).u32(ty).u64(count).bytes(&[0; 64]);
                assert!(
                    matches!(r.parse(), Err(GgufError::Truncated { .. })),
                    "type {ty} count {count}"
                );
            }
        }
        // Metadata and tensor counts.
        assert!(matches!(
            Raw::header(3, 0, u64::MAX).parse(),
            Err(GgufError::Truncated { .. })
        ));
        assert!(matches!(
            Raw::header(3, u64::MAX, 0).parse(),
            Err(GgufError::Truncated { .. })
        ));
        assert!(matches!(
            Raw::header(3, 1 << 60, 0).parse(),
            Err(GgufError::Truncated { .. })
        ));
    }

    #[test]
    fn invalid_utf8_and_bool() {
        let mut r = Raw::header(3, 0, 1);
        r.u64(2).bytes(&[0xff, 0xfe]).u32(T_U8).bytes(&[0]);
        assert!(matches!(
            r.parse(),
            Err(GgufError::InvalidUtf8 { offset: 32, .. })
        ));
        let mut r = Raw::header(3, 0, 1);
        r.str("b").u32(T_BOOL).bytes(&[2]);
        assert!(matches!(
            r.parse(),
            Err(GgufError::InvalidBool { byte: 2, .. })
        ));
        let mut r = Raw::header(3, 0, 1);
        r.str("b").u32(T_ARRAY).u32(T_BOOL).u64(3).bytes(&[1, 0, 7]);
        assert!(matches!(
            r.parse(),
            Err(GgufError::InvalidBool { byte: 7, .. })
        ));
    }

    #[test]
    fn nesting_depth_is_limited() {
        let nested = |levels: usize| {
            let mut r = Raw::header(3, 0, 1);
            r.str("deep").u32(T_ARRAY);
            for _ in 0..levels {
                r.u32(T_ARRAY).u64(1);
            }
            r.u32(T_U8).u64(0);
            r
        };
        assert!(nested(MAX_ARRAY_DEPTH - 1).parse().is_ok());
        assert!(matches!(
            nested(MAX_ARRAY_DEPTH).parse(),
            Err(GgufError::NestingTooDeep { .. })
        ));
        assert!(matches!(
            nested(10_000).parse(),
            Err(GgufError::NestingTooDeep { .. })
        ));
    }

    #[test]
    fn duplicates() {
        let mut r = Raw::header(3, 0, 2);
        r.str("k")
            .u32(T_U8)
            .bytes(&[1])
            .str("k")
            .u32(T_U8)
            .bytes(&[2]);
        assert!(matches!(r.parse(), Err(GgufError::DuplicateKey(k)) if k == "k"));
        let mut r = Raw::header(3, 2, 0);
        r.tensor("t", &[1], 0, 0)
            .tensor("t", &[1], 0, 32)
            .pad_to(32)
            .bytes(&[0; 64]);
        assert!(matches!(r.parse(), Err(GgufError::DuplicateTensor(t)) if t == "t"));
        let mut w = GgufWriter::new();
        w.add_metadata("k", GgufValue::U8(1)).unwrap();
        assert!(matches!(
            w.add_metadata("k", GgufValue::U8(1)),
            Err(GgufError::DuplicateKey(_))
        ));
        w.add_tensor("t", &[1], GgmlType::I8, vec![0]).unwrap();
        assert!(matches!(
            w.add_tensor("t", &[1], GgmlType::I8, vec![0]),
            Err(GgufError::DuplicateTensor(_))
        ));
    }

    #[test]
    fn misaligned_tensor() {
        let mut r = Raw::header(3, 1, 0);
        r.tensor("w", &[4], 0, 4).pad_to(32).bytes(&[0; 64]);
        let err = r.parse().unwrap_err();
        assert!(
            matches!(&err, GgufError::Misaligned { tensor, offset: 4, alignment: 32 } if tensor == "w"),
            "{err}"
        );
    }

    #[test]
    fn tensor_out_of_bounds() {
        let mut r = Raw::header(3, 1, 0);
        r.tensor("w", &[100], 0, 0).pad_to(32).bytes(&[0; 16]);
        let err = r.parse().unwrap_err();
        assert!(
            matches!(&err, GgufError::TensorOutOfBounds { tensor, len: 400, .. } if tensor == "w"),
            "{err}"
        );
        // Offsets near u64::MAX must not overflow.
        let mut r = Raw::header(3, 1, 0);
        r.tensor("w", &[1], 0, u64::MAX - 31)
            .pad_to(32)
            .bytes(&[0; 32]);
        assert!(matches!(
            r.parse(),
            Err(GgufError::TensorOutOfBounds { .. })
        ));
        // No data section at all.
        let mut r = Raw::header(3, 1, 0);
        r.tensor("w", &[1], 0, 0);
        assert!(matches!(
            r.parse(),
            Err(GgufError::TensorOutOfBounds { .. })
        ));
    }

    #[test]
    fn bad_tensor_types_and_shapes() {
        let mut r = Raw::header(3, 1, 0);
        r.tensor("w", &[32], 4, 0).pad_to(32).bytes(&[0; 64]);
        assert!(matches!(
            r.parse(),
            Err(GgufError::UnknownTensorType { ty: 4, .. })
        ));
        let mut r = Raw::header(3, 1, 0);
        r.tensor("w", &[33], GgmlType::Q4_0.id(), 0)
            .pad_to(32)
            .bytes(&[0; 64]);
        assert!(matches!(r.parse(), Err(GgufError::InvalidShape { .. })));
        let mut r = Raw::header(3, 1, 0);
        r.tensor("w", &[1, 1, 1, 1, 1], 0, 0)
            .pad_to(32)
            .bytes(&[0; 64]);
        assert!(matches!(r.parse(), Err(GgufError::InvalidShape { .. })));
        let mut r = Raw::header(3, 1, 0);
        r.tensor("w", &[1 << 32, 1 << 32], 0, 0)
            .pad_to(32)
            .bytes(&[0; 64]);
        assert!(matches!(r.parse(), Err(GgufError::InvalidShape { .. })));
        let mut r = Raw::header(3, 1, 0);
        r.str("w").u32(u32::MAX).bytes(&[0; 64]);
        assert!(matches!(r.parse(), Err(GgufError::InvalidShape { .. })));
    }

    #[test]
    fn custom_alignment() {
        let mut w = sample_writer();
        w.add_metadata(ALIGNMENT_KEY, GgufValue::U32(64)).unwrap();
        let f = GgufFile::from_bytes(w.to_bytes()).unwrap();
        assert_eq!(f.alignment, 64);
        assert_eq!(f.data_offset % 64, 0);
        assert!(
            f.tensors
                .iter()
                .all(|t| (t.offset - f.data_offset).is_multiple_of(64))
        );
        assert_eq!(f.tensor_data(&f.tensors[1]), &sample_tensors()[1].3[..]);

        // Padding larger than the writer's zero buffer, streamed and in memory.
        let mut w = sample_writer();
        w.add_metadata(ALIGNMENT_KEY, GgufValue::U32(1024)).unwrap();
        let mut streamed = Vec::new();
        w.write_to(&mut streamed).unwrap();
        assert_eq!(streamed, w.to_bytes());
        let f = GgufFile::from_bytes(streamed).unwrap();
        assert_eq!((f.alignment, f.data_offset % 1024), (1024, 0));
        assert_eq!(f.tensor_data(&f.tensors[3]), &sample_tensors()[3].3[..]);

        let mut w = GgufWriter::new();
        assert!(matches!(
            w.add_metadata(ALIGNMENT_KEY, GgufValue::U32(0)),
            Err(GgufError::InvalidAlignment(0))
        ));
        assert!(matches!(
            w.add_metadata(ALIGNMENT_KEY, GgufValue::U64(32)),
            Err(GgufError::WrongType { .. })
        ));
        let mut r = Raw::header(3, 0, 1);
        r.str(ALIGNMENT_KEY).u32(T_U32).u32(48);
        assert!(matches!(r.parse(), Err(GgufError::InvalidAlignment(48))));
        let mut r = Raw::header(3, 0, 1);
        r.str(ALIGNMENT_KEY).u32(T_STRING).str("32");
        assert!(matches!(
            r.parse(),
            Err(GgufError::WrongType {
                found: "STRING",
                ..
            })
        ));
    }

    #[test]
    fn writer_rejects_wrong_data_size() {
        let mut w = GgufWriter::new();
        assert!(matches!(
            w.add_tensor("t", &[32, 2], GgmlType::Q8_0, vec![0; 67]),
            Err(GgufError::TensorSizeMismatch {
                expected: 68,
                found: 67,
                ..
            })
        ));
        assert!(matches!(
            w.add_tensor("t", &[31], GgmlType::Q8_0, vec![0; 34]),
            Err(GgufError::InvalidShape { .. })
        ));
    }

    #[test]
    fn ggml_type_table() {
        for t in GgmlType::ALL {
            assert_eq!(GgmlType::from_u32(t.id()), Some(t));
            assert_eq!(t.to_string(), t.name());
            assert!(t.block_size() > 0 && t.type_size().is_some());
        }
        for id in [4, 5, 31, 34, 39, u32::MAX] {
            assert_eq!(GgmlType::from_u32(id), None);
        }
        assert_eq!(GgmlType::from_u32(3), Some(GgmlType::Q4_1));
        assert_eq!(GgmlType::Q4_1.name(), "Q4_1");
        assert_eq!(
            (GgmlType::Q6_K.block_size(), GgmlType::Q6_K.type_size()),
            (256, Some(210))
        );
        assert_eq!(GgmlType::BF16.id(), 30);
    }

    #[test]
    fn tensor_info_geometry() {
        let t = TensorInfo {
            name: "w".into(),
            dims: vec![576, 1536],
            ty: GgmlType::Q4_1,
            offset: 0,
        };
        assert_eq!(t.n_elements(), 576 * 1536);
        assert_eq!(t.shape(), vec![1536, 576]);
        assert_eq!(t.byte_size().unwrap(), 576 / 32 * 20 * 1536);
        let huge = TensorInfo {
            dims: vec![u64::MAX, 2],
            ..t
        };
        assert_eq!(huge.n_elements(), u64::MAX);
        assert!(huge.byte_size().is_err());
        // An info that is not from this file never panics.
        let f = GgufFile::from_bytes(Raw::header(3, 0, 0).0).unwrap();
        assert!(f.tensor_data(&huge).is_empty());
    }

    #[test]
    fn open_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.gguf");
        assert!(
            matches!(GgufFile::open(&missing), Err(GgufError::Io { path, .. }) if path == missing)
        );
        let empty = dir.path().join("empty.gguf");
        std::fs::write(&empty, b"").unwrap();
        assert!(matches!(
            GgufFile::open(&empty),
            Err(GgufError::Truncated { offset: 0, .. })
        ));
        assert!(matches!(
            GgufWriter::new().write(dir.path().join("no_such_dir").join("x.gguf")),
            Err(GgufError::Io { .. })
        ));
    }

    #[test]
    fn real_file() {
        let path = Path::new(REAL_FILE);
        if !path.exists() {
            eprintln!(
                "note: {} not found, skipping real-file test",
                path.display()
            );
            return;
        }
        let start = std::time::Instant::now();
        let f = GgufFile::open(path).unwrap();
        eprintln!("opened {} in {:?}", path.display(), start.elapsed());
        assert_eq!(f.version, 3);
        assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(f.get_u64("llama.block_count").unwrap(), 30);
        assert_eq!(f.get_u64("llama.embedding_length").unwrap(), 576);
        assert_eq!(f.get_str("tokenizer.ggml.model").unwrap(), "gpt2");
        assert_eq!(
            f.get_string_array("tokenizer.ggml.tokens").unwrap().len(),
            49152
        );
        assert_eq!(
            f.get_i32_array("tokenizer.ggml.token_type").unwrap().len(),
            49152
        );
        assert_eq!(
            f.get_string_array("tokenizer.ggml.merges").unwrap().len(),
            48900
        );
        assert_eq!(
            f.get_f32("llama.attention.layer_norm_rms_epsilon").unwrap(),
            1e-5
        );
        let emb = f.tensor("token_embd.weight").unwrap();
        assert_eq!(emb.ty, GgmlType::Q8_0);
        assert_eq!(emb.dims, vec![576, 49152]);
        assert_eq!(emb.shape(), vec![49152, 576]);
        assert_eq!(f.tensor_data(emb).len(), 49152 * 576 / 32 * 34);
        assert!(f.tensors.iter().any(|t| t.ty == GgmlType::Q4_1));
        assert_eq!(f.tensors.len(), 272);
    }
}
