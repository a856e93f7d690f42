//! Reading: a memory-mapped file parsed and validated up front, tensor bytes handed out from the map.

use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::path::Path;

use memmap2::Mmap;

use crate::value::*;
use crate::{
    ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC, GgmlType, GgufError, MAX_ARRAY_DEPTH, MAX_DIMS,
};

// Tensor infos

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

pub(crate) fn checked_product(dims: &[u64]) -> Option<u64> {
    dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
}

/// Validates `dims` for type `ty` and returns the data size in bytes.
pub(crate) fn tensor_byte_size(name: &str, dims: &[u64], ty: GgmlType) -> Result<u64, GgufError> {
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

pub(crate) fn align_up(x: u64, alignment: u64) -> Option<u64> {
    x.checked_next_multiple_of(alignment)
}

pub(crate) fn check_alignment(value: &GgufValue) -> Result<u64, GgufError> {
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

// Parsing

/// Lazily-built description of what is being read, for error messages only.
pub(crate) type What<'w> = &'w dyn Fn() -> String;

/// Bounds-checked little-endian reader over a byte slice.
pub(crate) struct Cursor<'a> {
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
pub(crate) fn decode<const N: usize, T>(raw: &[u8], f: fn([u8; N]) -> T) -> Vec<T> {
    let (chunks, _) = raw.as_chunks::<N>();
    chunks.iter().map(|&c| f(c)).collect()
}

pub(crate) fn read_bool(c: &mut Cursor<'_>, what: What<'_>) -> Result<bool, GgufError> {
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
pub(crate) fn read_value(
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
pub(crate) fn read_array(
    c: &mut Cursor<'_>,
    depth: usize,
    what: What<'_>,
) -> Result<GgufArray, GgufError> {
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
pub(crate) struct Header {
    version: u32,
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<TensorInfo>,
    alignment: u64,
    data_offset: u64,
}

/// Smallest encoded metadata pair: empty key, type id, 1-byte value.
pub(crate) const MIN_KV_SIZE: u64 = 8 + 4 + 1;
/// Smallest encoded tensor info: empty name, n_dims = 0, type id, offset.
pub(crate) const MIN_TENSOR_INFO_SIZE: u64 = 8 + 4 + 4 + 8;

/// Parses and validates the header of the GGUF file `buf`.
pub(crate) fn parse_header(buf: &[u8]) -> Result<Header, GgufError> {
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

// GgufFile

/// The bytes a [`GgufFile`] reads from.
pub(crate) enum Backing {
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

/// The whole file's bytes (tensor offsets in [`TensorInfo`] index them), so that an
/// `Arc<GgufFile>` can lend its memory-mapped tensor data to kernels without a copy.
impl AsRef<[u8]> for GgufFile {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
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
