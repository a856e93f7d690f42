//! Writing GGUF v3 files: metadata and tensors in insertion order, each tensor aligned.

use std::io::{self, Write};
use std::path::Path;

use crate::reader::{align_up, check_alignment, tensor_byte_size};
use crate::value::*;
use crate::{
    ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_WRITE_VERSION, GgmlType, GgufError,
    GgufValue,
};

// Writer

/// A tensor queued in a [`GgufWriter`].
#[derive(Clone, Debug)]
pub(crate) struct PendingTensor {
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

pub(crate) fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u64(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// Appends a value's payload (without its type id).
pub(crate) fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
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
pub(crate) fn put_le<T: Copy, const N: usize>(out: &mut Vec<u8>, v: &[T], f: fn(T) -> [u8; N]) {
    out.reserve(v.len() * N);
    v.iter().for_each(|&x| out.extend_from_slice(&f(x)));
}

/// Appends an array: element type, count, elements.
pub(crate) fn put_array(out: &mut Vec<u8>, a: &GgufArray) {
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
pub(crate) fn padding(len: u64, alignment: u64) -> u64 {
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

    /// Writes the file to `path` atomically ([`crate::atomic`]).
    pub fn write(&self, path: impl AsRef<Path>) -> Result<(), GgufError> {
        let path = path.as_ref();
        crate::atomic::write_with(path, |mut w| self.write_to(&mut w)).map_err(|source| {
            GgufError::Io {
                path: path.to_owned(),
                source,
            }
        })
    }
}
