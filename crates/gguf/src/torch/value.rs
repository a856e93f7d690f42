//! The value model: what a checkpoint holds. Python's dict (ordered, `str` or `int` keys), list,
//! tuple, str, bytes, int, float, bool and None, and tensors: a [`DType`], a shape, strides and
//! an offset into a [`Storage`] that several tensors may share.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use super::error::TorchError;

/// Most dimensions a tensor may have (PyTorch's own limit is 64 as well).
pub const MAX_TENSOR_DIMS: usize = 64;

/// A tensor element type, named as in safetensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// `torch.float32` (`FloatStorage`).
    F32,
    /// `torch.float16` (`HalfStorage`).
    F16,
    /// `torch.bfloat16` (`BFloat16Storage`).
    BF16,
    /// `torch.float64` (`DoubleStorage`).
    F64,
    /// `torch.int64` (`LongStorage`).
    I64,
    /// `torch.int32` (`IntStorage`).
    I32,
    /// `torch.int16` (`ShortStorage`).
    I16,
    /// `torch.int8` (`CharStorage`).
    I8,
    /// `torch.uint8` (`ByteStorage`).
    U8,
    /// `torch.bool` (`BoolStorage`), one byte per element, 0 or 1.
    Bool,
}

/// Every [`DType`].
pub const DTYPES: [DType; 10] = [
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::F64,
    DType::I64,
    DType::I32,
    DType::I16,
    DType::I8,
    DType::U8,
    DType::Bool,
];

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// The safetensors-style name (`F32`, `BF16`, `BOOL`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F64 => "F64",
            DType::I64 => "I64",
            DType::I32 => "I32",
            DType::I16 => "I16",
            DType::I8 => "I8",
            DType::U8 => "U8",
            DType::Bool => "BOOL",
        }
    }

    /// Whether it is a floating-point type.
    pub const fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16 | DType::F64)
    }

    /// The legacy storage class PyTorch pickles for it (`FloatStorage`, ...), under `torch`.
    pub const fn storage_class(self) -> &'static str {
        match self {
            DType::F32 => "FloatStorage",
            DType::F16 => "HalfStorage",
            DType::BF16 => "BFloat16Storage",
            DType::F64 => "DoubleStorage",
            DType::I64 => "LongStorage",
            DType::I32 => "IntStorage",
            DType::I16 => "ShortStorage",
            DType::I8 => "CharStorage",
            DType::U8 => "ByteStorage",
            DType::Bool => "BoolStorage",
        }
    }

    /// The dtype of a storage class name (`FloatStorage` -> `F32`).
    pub fn from_storage_class(name: &str) -> Option<DType> {
        DTYPES.into_iter().find(|d| d.storage_class() == name)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The bytes behind storages: owned, or a memory-mapped file.
#[derive(Debug)]
pub(crate) enum Buffer {
    Owned(Vec<u8>),
    Mapped(memmap2::Mmap),
}

impl Deref for Buffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Buffer::Owned(v) => v,
            Buffer::Mapped(m) => m,
        }
    }
}

/// A tensor storage: untyped little-endian bytes, cheap to clone and shared by every tensor that
/// views it. A loaded storage is a slice of the checkpoint's bytes (no copy).
#[derive(Clone)]
pub struct Storage {
    buf: Arc<Buffer>,
    start: usize,
    len: usize,
}

impl Storage {
    /// A storage owning `bytes`.
    pub fn from_vec(bytes: Vec<u8>) -> Storage {
        let len = bytes.len();
        Storage {
            buf: Arc::new(Buffer::Owned(bytes)),
            start: 0,
            len,
        }
    }

    /// `buf[start..start + len]`; the caller has checked the range.
    pub(crate) fn slice(buf: &Arc<Buffer>, start: usize, len: usize) -> Storage {
        debug_assert!(start + len <= buf.len());
        Storage {
            buf: Arc::clone(buf),
            start,
            len,
        }
    }

    /// The storage's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `self` and `other` are the same storage (not merely equal bytes).
    pub fn same(&self, other: &Storage) -> bool {
        Arc::ptr_eq(&self.buf, &other.buf) && self.start == other.start && self.len == other.len
    }

    /// An identity for hashing: equal for [`same`](Self::same) storages.
    pub(crate) fn identity(&self) -> (usize, usize, usize) {
        (
            Arc::as_ptr(&self.buf) as *const u8 as usize,
            self.start,
            self.len,
        )
    }
}

impl fmt::Debug for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Storage").field("len", &self.len).finish()
    }
}

mod sealed {
    pub trait Sealed {}
}

/// A Rust type that is the element type of a [`DType`]: `f32`, `f64`, `half::f16`, `half::bf16`,
/// `i64`, `i32`, `i16`, `i8`, `u8`, `bool`.
pub trait Element: Copy + sealed::Sealed {
    /// Its dtype.
    const DTYPE: DType;
    /// Reads one element from `DTYPE.size()` little-endian bytes.
    fn from_le(bytes: &[u8]) -> Self;
    /// Appends its little-endian bytes.
    fn put_le(self, out: &mut Vec<u8>);
}

macro_rules! element {
    ($t:ty, $d:ident) => {
        impl sealed::Sealed for $t {}
        impl Element for $t {
            const DTYPE: DType = DType::$d;
            fn from_le(bytes: &[u8]) -> Self {
                <$t>::from_le_bytes(bytes.try_into().expect("element size"))
            }
            fn put_le(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    };
}
element!(f32, F32);
element!(f64, F64);
element!(half::f16, F16);
element!(half::bf16, BF16);
element!(i64, I64);
element!(i32, I32);
element!(i16, I16);
element!(i8, I8);
element!(u8, U8);

impl sealed::Sealed for bool {}
impl Element for bool {
    const DTYPE: DType = DType::Bool;
    fn from_le(bytes: &[u8]) -> Self {
        bytes[0] != 0
    }
    fn put_le(self, out: &mut Vec<u8>) {
        out.push(u8::from(self));
    }
}

/// Row-major (contiguous) strides of `shape`, in elements.
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![0; shape.len()];
    let mut step = 1usize;
    for (s, &n) in strides.iter_mut().zip(shape).rev() {
        *s = step;
        step = step.saturating_mul(n.max(1));
    }
    strides
}

/// A tensor: a view (shape, strides and offset in elements) into a [`Storage`] of one
/// [`DType`]. Views need not be contiguous; [`contiguous_bytes`](Self::contiguous_bytes)
/// materializes them.
#[derive(Clone)]
pub struct Tensor {
    dtype: DType,
    shape: Vec<usize>,
    stride: Vec<usize>,
    offset: usize,
    storage: Storage,
    requires_grad: bool,
}

impl Tensor {
    /// A contiguous tensor owning `data` (`numel * dtype.size()` little-endian bytes).
    pub fn new(
        dtype: DType,
        shape: impl Into<Vec<usize>>,
        data: Vec<u8>,
    ) -> Result<Tensor, TorchError> {
        let shape = shape.into();
        let stride = contiguous_strides(&shape);
        let numel = checked_numel(&shape)?;
        let expected = numel.checked_mul(dtype.size());
        if expected != Some(data.len()) {
            return Err(TorchError::InvalidTensor(format!(
                "shape {shape:?} of {dtype} needs {} bytes, got {}",
                expected.map_or_else(|| "too many".to_owned(), |n| n.to_string()),
                data.len()
            )));
        }
        Tensor::view(Storage::from_vec(data), dtype, shape, stride, 0)
    }

    /// A contiguous tensor of `values`.
    pub fn from_slice<T: Element>(
        shape: impl Into<Vec<usize>>,
        values: &[T],
    ) -> Result<Tensor, TorchError> {
        let mut data = Vec::with_capacity(std::mem::size_of_val(values));
        for &v in values {
            v.put_le(&mut data);
        }
        Tensor::new(T::DTYPE, shape, data)
    }

    /// A view into `storage`: element `[i0, i1, ...]` is element `offset + Σ ik * stride[k]` of
    /// the storage read as `dtype`. Fails unless every element lies inside the storage.
    pub fn view(
        storage: Storage,
        dtype: DType,
        shape: impl Into<Vec<usize>>,
        stride: impl Into<Vec<usize>>,
        offset: usize,
    ) -> Result<Tensor, TorchError> {
        let (shape, stride) = (shape.into(), stride.into());
        check_view(dtype, &shape, &stride, offset, storage.len())?;
        Ok(Tensor {
            dtype,
            shape,
            stride,
            offset,
            storage,
            requires_grad: false,
        })
    }

    /// Sets the `requires_grad` flag written to (and read from) the checkpoint.
    pub fn with_requires_grad(mut self, requires_grad: bool) -> Tensor {
        self.requires_grad = requires_grad;
        self
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The size of each dimension (empty for a 0-dim scalar).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The stride of each dimension, in elements.
    pub fn stride(&self) -> &[usize] {
        &self.stride
    }

    /// Offset of the first element in the storage, in elements.
    pub fn storage_offset(&self) -> usize {
        self.offset
    }

    /// The storage viewed (possibly shared with other tensors).
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// Whether it was saved as a parameter requiring gradients.
    pub fn requires_grad(&self) -> bool {
        self.requires_grad
    }

    /// The number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether its elements are laid out row-major without gaps (dimensions of size 1 may have
    /// any stride).
    pub fn is_contiguous(&self) -> bool {
        let mut expected = 1usize;
        for (&n, &s) in self.shape.iter().zip(&self.stride).rev() {
            if n == 0 {
                return true;
            }
            if n != 1 && s != expected {
                return false;
            }
            expected *= n;
        }
        true
    }

    /// The elements in row-major order as little-endian bytes: borrowed from the storage when
    /// the view is contiguous, gathered into a new buffer otherwise.
    pub fn contiguous_bytes(&self) -> Cow<'_, [u8]> {
        let size = self.dtype.size();
        let numel = self.numel();
        let bytes = self.storage.bytes();
        if numel == 0 {
            return Cow::Borrowed(&[]);
        }
        if self.is_contiguous() {
            let start = self.offset * size;
            return Cow::Borrowed(&bytes[start..start + numel * size]);
        }
        let mut out = Vec::with_capacity(numel * size);
        let dims = self.shape.len();
        let (inner_n, inner_s) = (self.shape[dims - 1], self.stride[dims - 1]);
        let mut index = vec![0usize; dims - 1];
        loop {
            let base = self.offset
                + index
                    .iter()
                    .zip(&self.stride)
                    .map(|(i, s)| i * s)
                    .sum::<usize>();
            if inner_s == 1 {
                out.extend_from_slice(&bytes[base * size..(base + inner_n) * size]);
            } else {
                for j in 0..inner_n {
                    let e = (base + j * inner_s) * size;
                    out.extend_from_slice(&bytes[e..e + size]);
                }
            }
            // Odometer over the outer dimensions.
            let mut d = dims - 1;
            loop {
                if d == 0 {
                    return Cow::Owned(out);
                }
                d -= 1;
                index[d] += 1;
                if index[d] < self.shape[d] {
                    break;
                }
                index[d] = 0;
            }
        }
    }

    /// The elements in row-major order; `T` must be the tensor's element type.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>, TorchError> {
        if T::DTYPE != self.dtype {
            return Err(TorchError::DtypeMismatch {
                expected: T::DTYPE,
                found: self.dtype,
            });
        }
        let size = self.dtype.size();
        Ok(self
            .contiguous_bytes()
            .chunks_exact(size)
            .map(T::from_le)
            .collect())
    }

    /// The elements in row-major order as `f64` (exact for every dtype but `I64` beyond 2^53;
    /// `Bool` gives 0 or 1).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        let bytes = self.contiguous_bytes();
        let size = self.dtype.size();
        let chunks = bytes.chunks_exact(size);
        fn el<T: Element>(b: &[u8]) -> T {
            T::from_le(b)
        }
        match self.dtype {
            DType::F32 => chunks.map(|b| f64::from(el::<f32>(b))).collect(),
            DType::F16 => chunks.map(|b| el::<half::f16>(b).to_f64()).collect(),
            DType::BF16 => chunks.map(|b| el::<half::bf16>(b).to_f64()).collect(),
            DType::F64 => chunks.map(el::<f64>).collect(),
            DType::I64 => chunks.map(|b| el::<i64>(b) as f64).collect(),
            DType::I32 => chunks.map(|b| f64::from(el::<i32>(b))).collect(),
            DType::I16 => chunks.map(|b| f64::from(el::<i16>(b))).collect(),
            DType::I8 => chunks.map(|b| f64::from(el::<i8>(b))).collect(),
            DType::U8 => chunks.map(|b| f64::from(b[0])).collect(),
            DType::Bool => chunks.map(|b| f64::from(u8::from(b[0] != 0))).collect(),
        }
    }

    /// The elements in row-major order converted to `f32` (rounded for `F64` and large ints).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self.dtype {
            DType::F32 => self.to_vec::<f32>().expect("dtype checked"),
            _ => self.to_f64_vec().into_iter().map(|v| v as f32).collect(),
        }
    }
}

/// Equal dtype, shape, `requires_grad` and elements (bytewise), whatever the storage layout.
impl PartialEq for Tensor {
    fn eq(&self, other: &Tensor) -> bool {
        self.dtype == other.dtype
            && self.shape == other.shape
            && self.requires_grad == other.requires_grad
            && self.contiguous_bytes() == other.contiguous_bytes()
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tensor")
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("stride", &self.stride)
            .field("offset", &self.offset)
            .field("storage_bytes", &self.storage.len())
            .field("requires_grad", &self.requires_grad)
            .finish()
    }
}

fn checked_numel(shape: &[usize]) -> Result<usize, TorchError> {
    if shape.len() > MAX_TENSOR_DIMS {
        return Err(TorchError::InvalidTensor(format!(
            "{} dimensions (at most {MAX_TENSOR_DIMS})",
            shape.len()
        )));
    }
    shape
        .iter()
        .try_fold(1usize, |acc, &n| acc.checked_mul(n))
        .ok_or_else(|| TorchError::InvalidTensor(format!("shape {shape:?} overflows")))
}

/// Checks that a view lies inside a storage of `storage_bytes` bytes.
pub(crate) fn check_view(
    dtype: DType,
    shape: &[usize],
    stride: &[usize],
    offset: usize,
    storage_bytes: usize,
) -> Result<(), TorchError> {
    if shape.len() != stride.len() {
        return Err(TorchError::InvalidTensor(format!(
            "shape {shape:?} and stride {stride:?} differ in length"
        )));
    }
    if checked_numel(shape)? == 0 {
        return Ok(());
    }
    let last = shape.iter().zip(stride).try_fold(offset, |acc, (&n, &s)| {
        (n - 1).checked_mul(s)?.checked_add(acc)
    });
    let end = last
        .and_then(|l| l.checked_add(1))
        .and_then(|e| e.checked_mul(dtype.size()));
    match end {
        Some(end) if end <= storage_bytes => Ok(()),
        _ => Err(TorchError::InvalidTensor(format!(
            "view (shape {shape:?}, stride {stride:?}, offset {offset}) of {dtype} \
             reaches past its {storage_bytes}-byte storage"
        ))),
    }
}

/// A dict key: Python `str` or `int`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    /// A string key.
    Str(String),
    /// An integer key (optimizer state is keyed by parameter index).
    Int(i64),
}

impl From<&str> for Key {
    fn from(s: &str) -> Key {
        Key::Str(s.to_owned())
    }
}

impl From<String> for Key {
    fn from(s: String) -> Key {
        Key::Str(s)
    }
}

impl From<i64> for Key {
    fn from(i: i64) -> Key {
        Key::Int(i)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Str(s) => f.write_str(s),
            Key::Int(i) => write!(f, "{i}"),
        }
    }
}

/// An insertion-ordered dict (Python `dict` / `collections.OrderedDict`). Inserting an existing
/// key replaces its value in place, as Python does.
#[derive(Clone, Default)]
pub struct Dict {
    entries: Vec<(Key, Value)>,
    index: HashMap<Key, usize>,
}

impl Dict {
    /// An empty dict.
    pub fn new() -> Dict {
        Dict::default()
    }

    /// Inserts or replaces; returns the previous value.
    pub fn insert(&mut self, key: impl Into<Key>, value: impl Into<Value>) -> Option<Value> {
        let (key, value) = (key.into(), value.into());
        match self.index.get(&key) {
            Some(&i) => Some(std::mem::replace(&mut self.entries[i].1, value)),
            None => {
                self.index.insert(key.clone(), self.entries.len());
                self.entries.push((key, value));
                None
            }
        }
    }

    /// The value of `key`.
    pub fn get(&self, key: impl Into<Key>) -> Option<&Value> {
        self.index.get(&key.into()).map(|&i| &self.entries[i].1)
    }

    /// The number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&Key, &Value)> {
        self.entries.iter().map(|(k, v)| (k, v))
    }

    /// The keys in insertion order.
    pub fn keys(&self) -> impl Iterator<Item = &Key> {
        self.entries.iter().map(|(k, _)| k)
    }
}

impl PartialEq for Dict {
    fn eq(&self, other: &Dict) -> bool {
        self.entries == other.entries
    }
}

impl fmt::Debug for Dict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<K: Into<Key>, V: Into<Value>> FromIterator<(K, V)> for Dict {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Dict {
        let mut dict = Dict::new();
        for (k, v) in iter {
            dict.insert(k, v);
        }
        dict
    }
}

impl IntoIterator for Dict {
    type Item = (Key, Value);
    type IntoIter = std::vec::IntoIter<(Key, Value)>;
    fn into_iter(self) -> Self::IntoIter {
        self.entries.into_iter()
    }
}

/// A value in a checkpoint.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Value {
    /// `None`.
    #[default]
    None,
    /// `bool`.
    Bool(bool),
    /// `int` (within `i64`).
    Int(i64),
    /// `float`.
    Float(f64),
    /// `str`.
    Str(String),
    /// `bytes`.
    Bytes(Vec<u8>),
    /// `list`.
    List(Vec<Value>),
    /// `tuple`.
    Tuple(Vec<Value>),
    /// `dict` or `collections.OrderedDict`.
    Dict(Dict),
    /// `torch.Tensor` (or `nn.Parameter`).
    Tensor(Tensor),
}

impl Value {
    /// The dict, if it is one.
    pub fn as_dict(&self) -> Option<&Dict> {
        match self {
            Value::Dict(d) => Some(d),
            _ => None,
        }
    }

    /// The tensor, if it is one.
    pub fn as_tensor(&self) -> Option<&Tensor> {
        match self {
            Value::Tensor(t) => Some(t),
            _ => None,
        }
    }

    /// The integer, if it is one.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The float (or integer, converted), if it is one.
    pub fn as_float(&self) -> Option<f64> {
        match self {
            Value::Float(f) => Some(*f),
            Value::Int(i) => Some(*i as f64),
            _ => None,
        }
    }

    /// The bool, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The items of a list or tuple.
    pub fn as_seq(&self) -> Option<&[Value]> {
        match self {
            Value::List(v) | Value::Tuple(v) => Some(v),
            _ => None,
        }
    }

    /// `self[key]` for a dict.
    pub fn get(&self, key: impl Into<Key>) -> Option<&Value> {
        self.as_dict()?.get(key)
    }

    /// Every tensor inside, depth first in order, with its path: dict keys and list/tuple
    /// indices joined by `.` (`model._orig_mod.lm_head.weight`, `optimizer.state.0.exp_avg`).
    pub fn tensors(&self) -> Vec<(String, &Tensor)> {
        fn walk<'a>(v: &'a Value, path: &mut String, out: &mut Vec<(String, &'a Tensor)>) {
            let mut child = |path: &mut String, name: &dyn fmt::Display, v: &'a Value| {
                let len = path.len();
                if len > 0 {
                    path.push('.');
                }
                path.push_str(&name.to_string());
                walk(v, path, out);
                path.truncate(len);
            };
            match v {
                Value::Tensor(t) => out.push((path.clone(), t)),
                Value::Dict(d) => d.iter().for_each(|(k, v)| child(path, k, v)),
                Value::List(items) | Value::Tuple(items) => items
                    .iter()
                    .enumerate()
                    .for_each(|(i, v)| child(path, &i, v)),
                _ => {}
            }
        }
        let mut out = Vec::new();
        walk(self, &mut String::new(), &mut out);
        out
    }
}

macro_rules! value_from {
    ($t:ty, $conv:expr) => {
        impl From<$t> for Value {
            fn from(x: $t) -> Value {
                let conv: fn($t) -> Value = $conv;
                conv(x)
            }
        }
    };
}
value_from!(bool, Value::Bool);
value_from!(i64, Value::Int);
value_from!(i32, |x| Value::Int(i64::from(x)));
value_from!(f64, Value::Float);
value_from!(&str, |x| Value::Str(x.to_owned()));
value_from!(String, Value::Str);
value_from!(Vec<Value>, Value::List);
value_from!(Dict, Value::Dict);
value_from!(Tensor, Value::Tensor);
