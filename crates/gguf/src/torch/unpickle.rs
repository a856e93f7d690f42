//! A restricted unpickler: Python's pickle virtual machine (the opcodes of protocols 2–5 that
//! PyTorch and Python emit for checkpoints) with an allow-list of globals instead of imports.
//!
//! Objects live in an arena and refer to each other by index, so shared and mutated containers
//! behave as in Python (a memoized dict filled after it was memoized is filled everywhere) and no
//! object graph a hostile pickle builds (deep, cyclic or exponentially shared) can overflow the
//! stack when dropped. [`Arena::to_value`] turns the result into a [`Value`] with a depth limit
//! and a size budget.
//!
//! Allowed globals (anything else is a [`TorchError::DisallowedGlobal`] naming it):
//! `collections.OrderedDict`, `torch._utils._rebuild_tensor`, `_rebuild_tensor_v2`,
//! `_rebuild_parameter`, `_rebuild_parameter_with_state`, `torch.Size`, `_codecs.encode` (how
//! Python pickles `bytes` at protocol 2) and the storage classes of the supported dtypes
//! (`torch.FloatStorage`, ...). All are in the set `torch.load(weights_only=True)` allows.

use std::collections::HashMap;
use std::rc::Rc;

use super::error::TorchError;
use super::value::{DType, Dict, Key, MAX_TENSOR_DIMS, Storage, Tensor, Value, check_view};

/// Deepest nesting of containers [`Arena::to_value`] accepts.
pub(crate) const MAX_DEPTH: usize = 256;
/// Longest GLOBAL module or name line.
const MAX_LINE: usize = 1024;

/// The globals a checkpoint may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Global {
    OrderedDict,
    RebuildTensor,
    RebuildTensorV2,
    RebuildParameter,
    RebuildParameterWithState,
    Size,
    Encode,
    Storage(DType),
}

impl Global {
    fn resolve(module: &str, name: &str, offset: usize) -> Result<Global, TorchError> {
        Ok(match (module, name) {
            ("collections", "OrderedDict") => Global::OrderedDict,
            ("torch._utils", "_rebuild_tensor") => Global::RebuildTensor,
            ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
            ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
            ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
            ("torch", "Size") => Global::Size,
            ("_codecs", "encode") => Global::Encode,
            ("torch", storage) if storage.ends_with("Storage") => {
                match DType::from_storage_class(storage) {
                    Some(dtype) => Global::Storage(dtype),
                    None => return Err(TorchError::UnsupportedStorage(storage.to_owned())),
                }
            }
            _ => {
                return Err(TorchError::DisallowedGlobal {
                    module: module.to_owned(),
                    name: name.to_owned(),
                    offset: offset as u64,
                });
            }
        })
    }

    fn name(self) -> String {
        match self {
            Global::OrderedDict => "collections.OrderedDict".into(),
            Global::RebuildTensor => "torch._utils._rebuild_tensor".into(),
            Global::RebuildTensorV2 => "torch._utils._rebuild_tensor_v2".into(),
            Global::RebuildParameter => "torch._utils._rebuild_parameter".into(),
            Global::RebuildParameterWithState => {
                "torch._utils._rebuild_parameter_with_state".into()
            }
            Global::Size => "torch.Size".into(),
            Global::Encode => "_codecs.encode".into(),
            Global::Storage(d) => format!("torch.{}", d.storage_class()),
        }
    }
}

/// An object on the pickle machine's stack or in its memo. Containers, tensors and storages are
/// indices into the [`Arena`].
#[derive(Debug, Clone)]
pub(crate) enum Obj {
    None,
    Bool(bool),
    Int(i64),
    /// An integer beyond `i64`: its little-endian two's-complement bytes.
    BigInt(Rc<[u8]>),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    List(usize),
    Tuple(usize),
    Dict(usize),
    Global(Global),
    Storage(usize),
    Tensor(usize),
}

impl Obj {
    fn kind(&self) -> &'static str {
        match self {
            Obj::None => "None",
            Obj::Bool(_) => "bool",
            Obj::Int(_) | Obj::BigInt(_) => "int",
            Obj::Float(_) => "float",
            Obj::Str(_) => "str",
            Obj::Bytes(_) => "bytes",
            Obj::List(_) => "list",
            Obj::Tuple(_) => "tuple",
            Obj::Dict(_) => "dict",
            Obj::Global(_) => "global",
            Obj::Storage(_) => "storage",
            Obj::Tensor(_) => "tensor",
        }
    }
}

/// A storage a persistent id named: its dtype and element count, and its bytes once known (the
/// legacy format stores them after the pickle).
#[derive(Debug)]
pub(crate) struct StorageSlot {
    pub key: String,
    pub dtype: DType,
    pub numel: usize,
    pub data: Option<Storage>,
}

#[derive(Debug, Clone)]
struct TensorObj {
    storage: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
    offset: usize,
    requires_grad: bool,
}

#[derive(Debug, Default)]
struct DictObj {
    items: Vec<(Obj, Obj)>,
    /// Made by `collections.OrderedDict` (which alone accepts BUILD).
    ordered: bool,
}

/// Every container, storage and tensor the pickles of one file create.
#[derive(Debug, Default)]
pub(crate) struct Arena {
    lists: Vec<Vec<Obj>>,
    tuples: Vec<Vec<Obj>>,
    dicts: Vec<DictObj>,
    pub storages: Vec<StorageSlot>,
    tensors: Vec<TensorObj>,
}

impl Arena {
    fn tuple(&mut self, items: Vec<Obj>) -> Obj {
        self.tuples.push(items);
        Obj::Tuple(self.tuples.len() - 1)
    }

    fn list(&mut self, items: Vec<Obj>) -> Obj {
        self.lists.push(items);
        Obj::List(self.lists.len() - 1)
    }

    fn dict(&mut self, items: Vec<(Obj, Obj)>, ordered: bool) -> Obj {
        self.dicts.push(DictObj { items, ordered });
        Obj::Dict(self.dicts.len() - 1)
    }

    /// Registers a storage; returns its object.
    pub fn add_storage(&mut self, slot: StorageSlot) -> Obj {
        self.storages.push(slot);
        Obj::Storage(self.storages.len() - 1)
    }

    /// The items of a tuple (or list), if `obj` is one.
    pub fn seq(&self, obj: &Obj) -> Option<&[Obj]> {
        match *obj {
            Obj::Tuple(i) => Some(&self.tuples[i]),
            Obj::List(i) => Some(&self.lists[i]),
            _ => None,
        }
    }

    /// The `str` value of a `str` key in a dict object.
    pub fn dict_get(&self, obj: &Obj, key: &str) -> Option<&Obj> {
        let Obj::Dict(i) = *obj else { return None };
        self.dicts[i]
            .items
            .iter()
            .rev()
            .find(|(k, _)| matches!(k, Obj::Str(s) if &**s == key))
            .map(|(_, v)| v)
    }

    /// Converts `obj` into a [`Value`]: at most [`MAX_DEPTH`] levels deep and about `budget`
    /// bytes of memory (each value counts its size, strings their length, dict entries their
    /// key twice: in the entries and in the index).
    pub fn to_value(&self, obj: &Obj, budget: usize) -> Result<Value, TorchError> {
        let mut left = budget;
        self.convert(obj, 0, &mut left, budget)
    }

    fn convert(
        &self,
        obj: &Obj,
        depth: usize,
        left: &mut usize,
        budget: usize,
    ) -> Result<Value, TorchError> {
        if depth > MAX_DEPTH {
            return Err(TorchError::limit(
                "nesting depth (or a cyclic structure)",
                MAX_DEPTH,
            ));
        }
        let cost = size_of::<Value>()
            + match obj {
                Obj::Str(s) => s.len(),
                Obj::Bytes(b) => b.len(),
                _ => 0,
            };
        charge(left, cost, budget)?;
        let mut seq = |items: &[Obj]| -> Result<Vec<Value>, TorchError> {
            items
                .iter()
                .map(|o| self.convert(o, depth + 1, left, budget))
                .collect()
        };
        Ok(match obj {
            Obj::None => Value::None,
            Obj::Bool(b) => Value::Bool(*b),
            Obj::Int(i) => Value::Int(*i),
            Obj::BigInt(b) => return Err(TorchError::IntegerTooLarge { bytes: b.len() }),
            Obj::Float(f) => Value::Float(*f),
            Obj::Str(s) => Value::Str(s.to_string()),
            Obj::Bytes(b) => Value::Bytes(b.to_vec()),
            Obj::List(i) => Value::List(seq(&self.lists[*i])?),
            Obj::Tuple(i) => Value::Tuple(seq(&self.tuples[*i])?),
            Obj::Dict(i) => {
                let mut dict = Dict::new();
                for (k, v) in &self.dicts[*i].items {
                    let key_len = if let Obj::Str(s) = k { s.len() } else { 0 };
                    charge(left, 2 * (size_of::<Key>() + key_len) + 16, budget)?;
                    let key = match k {
                        Obj::Str(s) => Key::Str(s.to_string()),
                        Obj::Int(i) => Key::Int(*i),
                        other => {
                            return Err(TorchError::UnsupportedValue(format!(
                                "a dict key of type {} (only str and int keys are supported)",
                                other.kind()
                            )));
                        }
                    };
                    dict.insert(key, self.convert(v, depth + 1, left, budget)?);
                }
                Value::Dict(dict)
            }
            Obj::Tensor(i) => {
                let t = &self.tensors[*i];
                let slot = &self.storages[t.storage];
                let data = slot
                    .data
                    .clone()
                    .ok_or_else(|| TorchError::StorageMissing {
                        key: slot.key.clone(),
                        record: "its data".into(),
                    })?;
                let tensor = Tensor::view(
                    data,
                    slot.dtype,
                    t.shape.clone(),
                    t.stride.clone(),
                    t.offset,
                )?;
                Value::Tensor(tensor.with_requires_grad(t.requires_grad))
            }
            Obj::Storage(i) => {
                return Err(TorchError::UnsupportedValue(format!(
                    "a bare storage (`{}`) outside a tensor",
                    self.storages[*i].key
                )));
            }
            Obj::Global(g) => {
                return Err(TorchError::UnsupportedValue(format!(
                    "the global `{}` as a value",
                    g.name()
                )));
            }
        })
    }
}

fn charge(left: &mut usize, cost: usize, budget: usize) -> Result<(), TorchError> {
    *left = left
        .checked_sub(cost)
        .ok_or_else(|| TorchError::limit("decoded size in bytes", budget))?;
    Ok(())
}

/// A persistent id, as the zip and legacy formats write it: `('storage', torch.XStorage, key,
/// location, numel)`, plus the legacy format's view metadata.
pub(crate) struct Pid {
    pub dtype: DType,
    pub key: String,
    pub numel: usize,
    /// The legacy format's `view_metadata` is not None.
    pub is_view: bool,
}

impl Pid {
    /// Parses a persistent id object.
    pub fn parse(arena: &Arena, pid: &Obj, offset: usize) -> Result<Pid, TorchError> {
        let bad = |why: &str| TorchError::malformed(offset, format!("persistent id: {why}"));
        let items = match pid {
            Obj::Tuple(i) => &arena.tuples[*i],
            other => return Err(bad(&format!("a {} instead of a tuple", other.kind()))),
        };
        let (typename, rest) = items.split_first().ok_or_else(|| bad("empty tuple"))?;
        let is_storage = match typename {
            Obj::Str(s) => &**s == "storage",
            Obj::Bytes(b) => &**b == b"storage",
            _ => false,
        };
        if !is_storage {
            return Err(bad("only 'storage' persistent ids are supported"));
        }
        let (dtype, key, numel, view) = match rest {
            [Obj::Global(Global::Storage(d)), key, _location, Obj::Int(n)] => (*d, key, *n, None),
            [
                Obj::Global(Global::Storage(d)),
                key,
                _location,
                Obj::Int(n),
                view,
            ] => (*d, key, *n, Some(view)),
            _ => {
                return Err(bad(
                    "expected ('storage', storage type, key, location, numel)",
                ));
            }
        };
        let key = match key {
            Obj::Str(s) => s.to_string(),
            Obj::Int(i) => i.to_string(),
            _ => return Err(bad("the key is not a str")),
        };
        let numel = usize::try_from(numel).map_err(|_| bad("negative element count"))?;
        Ok(Pid {
            dtype,
            key,
            numel,
            is_view: !matches!(view, None | Some(Obj::None)),
        })
    }
}

/// Resolves a persistent id to a storage object.
pub(crate) type PersistentLoad<'a> =
    dyn FnMut(&mut Arena, &Obj, usize) -> Result<Obj, TorchError> + 'a;

/// A persistent-load callback for pickles that must not have any.
pub(crate) fn no_persistent_ids(_: &mut Arena, _: &Obj, offset: usize) -> Result<Obj, TorchError> {
    Err(TorchError::malformed(offset, "unexpected persistent id"))
}

/// Runs pickles from a byte slice, one [`load`](Self::load) per pickle.
pub(crate) struct Unpickler<'d> {
    data: &'d [u8],
    pos: usize,
    pub arena: Arena,
}

mod op {
    pub const MARK: u8 = b'(';
    pub const STOP: u8 = b'.';
    pub const POP: u8 = b'0';
    pub const POP_MARK: u8 = b'1';
    pub const DUP: u8 = b'2';
    pub const BINFLOAT: u8 = b'G';
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const BININT2: u8 = b'M';
    pub const NONE: u8 = b'N';
    pub const BINPERSID: u8 = b'Q';
    pub const REDUCE: u8 = b'R';
    pub const BINSTRING: u8 = b'T';
    pub const SHORT_BINSTRING: u8 = b'U';
    pub const BINUNICODE: u8 = b'X';
    pub const APPEND: u8 = b'a';
    pub const BUILD: u8 = b'b';
    pub const GLOBAL: u8 = b'c';
    pub const DICT: u8 = b'd';
    pub const EMPTY_DICT: u8 = b'}';
    pub const APPENDS: u8 = b'e';
    pub const BINGET: u8 = b'h';
    pub const LONG_BINGET: u8 = b'j';
    pub const LIST: u8 = b'l';
    pub const EMPTY_LIST: u8 = b']';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const SETITEM: u8 = b's';
    pub const TUPLE: u8 = b't';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const SETITEMS: u8 = b'u';
    pub const PROTO: u8 = 0x80;
    pub const NEWOBJ: u8 = 0x81;
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const LONG1: u8 = 0x8a;
    pub const LONG4: u8 = 0x8b;
    pub const BINBYTES: u8 = b'B';
    pub const SHORT_BINBYTES: u8 = b'C';
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE8: u8 = 0x8d;
    pub const BINBYTES8: u8 = 0x8e;
    pub const STACK_GLOBAL: u8 = 0x93;
    pub const MEMOIZE: u8 = 0x94;
    pub const FRAME: u8 = 0x95;
}

/// `pickletools`' name of a real opcode this reader does not implement.
fn unsupported_name(opcode: u8) -> Option<&'static str> {
    Some(match opcode {
        b'F' => "FLOAT",
        b'I' => "INT",
        b'L' => "LONG",
        b'P' => "PERSID",
        b'S' => "STRING",
        b'V' => "UNICODE",
        b'g' => "GET",
        b'i' => "INST",
        b'o' => "OBJ",
        b'p' => "PUT",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => return None,
    })
}

/// Decodes a little-endian two's-complement integer (LONG1 / LONG4).
fn decode_long(bytes: &[u8]) -> Obj {
    if bytes.is_empty() {
        return Obj::Int(0);
    }
    if bytes.len() <= 8 {
        let fill = if bytes[bytes.len() - 1] & 0x80 != 0 {
            0xff
        } else {
            0
        };
        let mut b = [fill; 8];
        b[..bytes.len()].copy_from_slice(bytes);
        return Obj::Int(i64::from_le_bytes(b));
    }
    // Longer encodings may still fit once redundant sign bytes are dropped.
    let sign = if bytes[bytes.len() - 1] & 0x80 != 0 {
        0xff
    } else {
        0
    };
    let significant = bytes.iter().rposition(|&b| b != sign).map_or(0, |p| p + 1);
    if significant < 8 || (significant == 8 && (bytes[7] & 0x80 != 0) == (sign == 0xff)) {
        return decode_long(&bytes[..8]);
    }
    Obj::BigInt(bytes.into())
}

impl<'d> Unpickler<'d> {
    /// An unpickler at the start of `data`.
    pub fn new(data: &'d [u8]) -> Self {
        Unpickler {
            data,
            pos: 0,
            arena: Arena::default(),
        }
    }

    /// Offset just past the last pickle loaded.
    pub fn position(&self) -> usize {
        self.pos
    }

    fn take(&mut self, n: usize, what: &str, at: usize) -> Result<&'d [u8], TorchError> {
        let bytes = self
            .pos
            .checked_add(n)
            .and_then(|end| self.data.get(self.pos..end))
            .ok_or_else(|| TorchError::truncated(format!("pickle {what}"), at))?;
        self.pos += n;
        Ok(bytes)
    }

    fn fixed<const N: usize>(&mut self, what: &str, at: usize) -> Result<[u8; N], TorchError> {
        Ok(self.take(N, what, at)?.try_into().expect("N bytes"))
    }

    fn len_u64(&mut self, what: &str, at: usize) -> Result<usize, TorchError> {
        let n = u64::from_le_bytes(self.fixed(what, at)?);
        // A length beyond the data cannot be satisfied; `take` reports it as truncation.
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    fn line(&mut self, at: usize) -> Result<&'d str, TorchError> {
        let rest = &self.data[self.pos..];
        let end = rest
            .iter()
            .take(MAX_LINE + 1)
            .position(|&b| b == b'\n')
            .ok_or_else(|| {
                if rest.len() <= MAX_LINE {
                    TorchError::truncated("pickle GLOBAL line", at)
                } else {
                    TorchError::limit("GLOBAL line length", MAX_LINE)
                }
            })?;
        self.pos += end + 1;
        std::str::from_utf8(&rest[..end]).map_err(|_| TorchError::InvalidUtf8 { offset: at as u64 })
    }

    fn string(bytes: &[u8], at: usize) -> Result<Obj, TorchError> {
        std::str::from_utf8(bytes)
            .map(|s| Obj::Str(s.into()))
            .map_err(|_| TorchError::InvalidUtf8 { offset: at as u64 })
    }

    /// Runs one pickle from the current position through its STOP; returns the object.
    pub fn load(&mut self, persistent: &mut PersistentLoad<'_>) -> Result<Obj, TorchError> {
        let mut stack: Vec<Obj> = Vec::new();
        let mut marks: Vec<usize> = Vec::new();
        let mut memo: HashMap<u32, Obj> = HashMap::new();
        loop {
            let at = self.pos;
            let [opcode] = self.fixed::<1>("opcode", at)?;
            let underflow = || TorchError::malformed(at, "stack underflow");
            macro_rules! pop {
                () => {{
                    if marks.last().is_some_and(|&m| m >= stack.len()) {
                        return Err(TorchError::malformed(at, "pop past a MARK"));
                    }
                    stack.pop().ok_or_else(underflow)?
                }};
            }
            macro_rules! pop_mark {
                () => {{
                    let m = marks
                        .pop()
                        .ok_or_else(|| TorchError::malformed(at, "no MARK on the stack"))?;
                    stack.split_off(m)
                }};
            }
            macro_rules! top {
                () => {{
                    if marks.last().is_some_and(|&m| m >= stack.len()) {
                        return Err(underflow());
                    }
                    stack.last().ok_or_else(underflow)?
                }};
            }
            match opcode {
                op::PROTO => {
                    let [v] = self.fixed("protocol", at)?;
                    if v > 5 {
                        return Err(TorchError::malformed(
                            at,
                            format!("pickle protocol {v} (at most 5)"),
                        ));
                    }
                }
                op::FRAME => {
                    self.fixed::<8>("frame length", at)?;
                }
                op::STOP => return Ok(pop!()),
                op::MARK => marks.push(stack.len()),
                op::POP => {
                    if marks.last() == Some(&stack.len()) {
                        marks.pop();
                    } else {
                        pop!();
                    }
                }
                op::POP_MARK => {
                    let _ = pop_mark!();
                }
                op::DUP => {
                    let v = top!().clone();
                    stack.push(v);
                }
                op::NONE => stack.push(Obj::None),
                op::NEWTRUE => stack.push(Obj::Bool(true)),
                op::NEWFALSE => stack.push(Obj::Bool(false)),
                op::BININT => stack.push(Obj::Int(i64::from(i32::from_le_bytes(
                    self.fixed("BININT", at)?,
                )))),
                op::BININT1 => stack.push(Obj::Int(i64::from(self.fixed::<1>("BININT1", at)?[0]))),
                op::BININT2 => stack.push(Obj::Int(i64::from(u16::from_le_bytes(
                    self.fixed("BININT2", at)?,
                )))),
                op::LONG1 => {
                    let [n] = self.fixed("LONG1 length", at)?;
                    stack.push(decode_long(self.take(usize::from(n), "LONG1", at)?));
                }
                op::LONG4 => {
                    let n = i32::from_le_bytes(self.fixed("LONG4 length", at)?);
                    let n = usize::try_from(n)
                        .map_err(|_| TorchError::malformed(at, "negative LONG4 length"))?;
                    stack.push(decode_long(self.take(n, "LONG4", at)?));
                }
                op::BINFLOAT => {
                    stack.push(Obj::Float(f64::from_be_bytes(self.fixed("BINFLOAT", at)?)))
                }
                op::SHORT_BINUNICODE => {
                    let [n] = self.fixed("string length", at)?;
                    stack.push(Self::string(self.take(usize::from(n), "string", at)?, at)?);
                }
                op::BINUNICODE => {
                    let n = u32::from_le_bytes(self.fixed("string length", at)?);
                    stack.push(Self::string(self.take(n as usize, "string", at)?, at)?);
                }
                op::BINUNICODE8 => {
                    let n = self.len_u64("string length", at)?;
                    stack.push(Self::string(self.take(n, "string", at)?, at)?);
                }
                // Python 2 `str`: text when it is UTF-8 (what torch.load's default ASCII
                // decoding gives), bytes otherwise.
                op::SHORT_BINSTRING | op::BINSTRING => {
                    let n = if opcode == op::SHORT_BINSTRING {
                        usize::from(self.fixed::<1>("string length", at)?[0])
                    } else {
                        let n = i32::from_le_bytes(self.fixed("string length", at)?);
                        usize::try_from(n)
                            .map_err(|_| TorchError::malformed(at, "negative string length"))?
                    };
                    let bytes = self.take(n, "string", at)?;
                    stack
                        .push(Self::string(bytes, at).unwrap_or_else(|_| Obj::Bytes(bytes.into())));
                }
                op::SHORT_BINBYTES => {
                    let [n] = self.fixed("bytes length", at)?;
                    stack.push(Obj::Bytes(self.take(usize::from(n), "bytes", at)?.into()));
                }
                op::BINBYTES => {
                    let n = u32::from_le_bytes(self.fixed("bytes length", at)?);
                    stack.push(Obj::Bytes(self.take(n as usize, "bytes", at)?.into()));
                }
                op::BINBYTES8 => {
                    let n = self.len_u64("bytes length", at)?;
                    stack.push(Obj::Bytes(self.take(n, "bytes", at)?.into()));
                }
                op::EMPTY_TUPLE => {
                    let t = self.arena.tuple(Vec::new());
                    stack.push(t);
                }
                op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                    let n = usize::from(opcode - op::TUPLE1 + 1);
                    let floor = marks.last().copied().unwrap_or(0);
                    if stack.len() < floor + n {
                        return Err(underflow());
                    }
                    let items = stack.split_off(stack.len() - n);
                    let t = self.arena.tuple(items);
                    stack.push(t);
                }
                op::TUPLE => {
                    let items = pop_mark!();
                    let t = self.arena.tuple(items);
                    stack.push(t);
                }
                op::EMPTY_LIST => {
                    let l = self.arena.list(Vec::new());
                    stack.push(l);
                }
                op::LIST => {
                    let items = pop_mark!();
                    let l = self.arena.list(items);
                    stack.push(l);
                }
                op::EMPTY_DICT => {
                    let d = self.arena.dict(Vec::new(), false);
                    stack.push(d);
                }
                op::DICT => {
                    let items = pop_mark!();
                    let pairs = self.pairs(items, at)?;
                    let d = self.arena.dict(pairs, false);
                    stack.push(d);
                }
                op::APPEND => {
                    let v = pop!();
                    let target = top!().clone();
                    self.list_mut(&target, at)?.push(v);
                }
                op::APPENDS => {
                    let items = pop_mark!();
                    let target = top!().clone();
                    self.list_mut(&target, at)?.extend(items);
                }
                op::SETITEM => {
                    let v = pop!();
                    let k = pop!();
                    let target = top!().clone();
                    self.dict_mut(&target, at)?.items.push((k, v));
                }
                op::SETITEMS => {
                    let items = pop_mark!();
                    let pairs = self.pairs(items, at)?;
                    let target = top!().clone();
                    self.dict_mut(&target, at)?.items.extend(pairs);
                }
                op::BINPUT => {
                    let [i] = self.fixed("memo index", at)?;
                    memo.insert(u32::from(i), top!().clone());
                }
                op::LONG_BINPUT => {
                    let i = u32::from_le_bytes(self.fixed("memo index", at)?);
                    memo.insert(i, top!().clone());
                }
                op::MEMOIZE => {
                    let i = u32::try_from(memo.len())
                        .map_err(|_| TorchError::limit("memo size", u32::MAX as usize))?;
                    memo.insert(i, top!().clone());
                }
                op::BINGET | op::LONG_BINGET => {
                    let i = if opcode == op::BINGET {
                        u32::from(self.fixed::<1>("memo index", at)?[0])
                    } else {
                        u32::from_le_bytes(self.fixed("memo index", at)?)
                    };
                    let v = memo
                        .get(&i)
                        .ok_or_else(|| {
                            TorchError::malformed(at, format!("memo entry {i} is not set"))
                        })?
                        .clone();
                    stack.push(v);
                }
                op::GLOBAL => {
                    let module = self.line(at)?;
                    let name = self.line(at)?;
                    stack.push(Obj::Global(Global::resolve(module, name, at)?));
                }
                op::STACK_GLOBAL => {
                    let name = pop!();
                    let module = pop!();
                    let (Obj::Str(module), Obj::Str(name)) = (module, name) else {
                        return Err(TorchError::malformed(at, "STACK_GLOBAL needs two strings"));
                    };
                    stack.push(Obj::Global(Global::resolve(&module, &name, at)?));
                }
                op::REDUCE | op::NEWOBJ => {
                    let args = pop!();
                    let func = pop!();
                    let args = match args {
                        // Every allowed callable takes at most 7 arguments; refusing longer
                        // tuples up front also keeps a memoized huge tuple from being copied
                        // once per call.
                        Obj::Tuple(i) if self.arena.tuples[i].len() > 8 => {
                            return Err(TorchError::malformed(at, "more than 8 call arguments"));
                        }
                        Obj::Tuple(i) => self.arena.tuples[i].clone(),
                        other => {
                            return Err(TorchError::malformed(
                                at,
                                format!("call arguments are a {}, not a tuple", other.kind()),
                            ));
                        }
                    };
                    let result = self.call(&func, &args, opcode == op::NEWOBJ, at)?;
                    stack.push(result);
                }
                op::BUILD => {
                    let _state = pop!();
                    match top!() {
                        // An OrderedDict's state is its instance `__dict__` (a state dict's
                        // `_metadata`): not part of the value model, dropped.
                        Obj::Dict(i) if self.arena.dicts[*i].ordered => {}
                        other => {
                            return Err(TorchError::malformed(
                                at,
                                format!(
                                    "BUILD is only supported on an OrderedDict, not a {}",
                                    other.kind()
                                ),
                            ));
                        }
                    }
                }
                op::BINPERSID => {
                    let pid = pop!();
                    let storage = persistent(&mut self.arena, &pid, at)?;
                    stack.push(storage);
                }
                other => {
                    return Err(TorchError::UnknownOpcode {
                        opcode: other,
                        name: unsupported_name(other),
                        offset: at as u64,
                    });
                }
            }
        }
    }

    fn pairs(&self, items: Vec<Obj>, at: usize) -> Result<Vec<(Obj, Obj)>, TorchError> {
        if !items.len().is_multiple_of(2) {
            return Err(TorchError::malformed(at, "odd number of items for a dict"));
        }
        let mut it = items.into_iter();
        Ok(std::iter::from_fn(|| Some((it.next()?, it.next()?))).collect())
    }

    fn list_mut(&mut self, target: &Obj, at: usize) -> Result<&mut Vec<Obj>, TorchError> {
        match *target {
            Obj::List(i) => Ok(&mut self.arena.lists[i]),
            ref other => Err(TorchError::malformed(
                at,
                format!("APPEND to a {}", other.kind()),
            )),
        }
    }

    fn dict_mut(&mut self, target: &Obj, at: usize) -> Result<&mut DictObj, TorchError> {
        match *target {
            Obj::Dict(i) => Ok(&mut self.arena.dicts[i]),
            ref other => Err(TorchError::malformed(
                at,
                format!("SETITEM on a {}", other.kind()),
            )),
        }
    }

    /// REDUCE / NEWOBJ: calls an allowed global.
    fn call(
        &mut self,
        func: &Obj,
        args: &[Obj],
        newobj: bool,
        at: usize,
    ) -> Result<Obj, TorchError> {
        let Obj::Global(g) = *func else {
            return Err(TorchError::malformed(
                at,
                format!("call of a {}", func.kind()),
            ));
        };
        let bad_args = || TorchError::malformed(at, format!("bad arguments for {}", g.name()));
        Ok(match (g, args) {
            (Global::OrderedDict, []) => self.arena.dict(Vec::new(), true),
            (Global::Size, [shape]) => {
                let items = self.arena.seq(shape).ok_or_else(bad_args)?;
                if items.len() > MAX_TENSOR_DIMS {
                    return Err(TorchError::limit("torch.Size dimensions", MAX_TENSOR_DIMS));
                }
                let items = items.to_vec();
                self.arena.tuple(items)
            }
            _ if newobj => {
                return Err(TorchError::malformed(
                    at,
                    format!("NEWOBJ of {} is not supported", g.name()),
                ));
            }
            (Global::Encode, [Obj::Str(s), rest @ ..]) => {
                let encoding = match rest {
                    [] => "utf-8",
                    [Obj::Str(e)] => e,
                    _ => return Err(bad_args()),
                };
                let bytes = match encoding.to_ascii_lowercase().replace('_', "-").as_str() {
                    "latin1" | "latin-1" | "iso-8859-1" => s
                        .chars()
                        .map(|c| u8::try_from(u32::from(c)).map_err(|_| bad_args()))
                        .collect::<Result<Vec<u8>, _>>()?,
                    "utf-8" | "utf8" => s.as_bytes().to_vec(),
                    _ => return Err(bad_args()),
                };
                Obj::Bytes(bytes.into())
            }
            (
                Global::RebuildTensorV2,
                [storage, offset, size, stride, requires_grad, _hooks, ..],
            ) if args.len() <= 7 => {
                self.tensor(storage, offset, size, stride, requires_grad, at)?
            }
            (Global::RebuildTensor, [storage, offset, size, stride]) => {
                self.tensor(storage, offset, size, stride, &Obj::Bool(false), at)?
            }
            (Global::RebuildParameter, [Obj::Tensor(t), Obj::Bool(rg), _hooks])
            | (Global::RebuildParameterWithState, [Obj::Tensor(t), Obj::Bool(rg), _hooks, _]) => {
                let mut tensor = self.arena.tensors[*t].clone();
                tensor.requires_grad = *rg;
                self.arena.tensors.push(tensor);
                Obj::Tensor(self.arena.tensors.len() - 1)
            }
            _ => return Err(bad_args()),
        })
    }

    fn usizes(&self, obj: &Obj, what: &str, at: usize) -> Result<Vec<usize>, TorchError> {
        let items = self
            .arena
            .seq(obj)
            .ok_or_else(|| TorchError::malformed(at, format!("tensor {what} is not a tuple")))?;
        if items.len() > MAX_TENSOR_DIMS {
            return Err(TorchError::limit("tensor dimensions", MAX_TENSOR_DIMS));
        }
        items
            .iter()
            .map(|o| match o {
                Obj::Int(i) => usize::try_from(*i).ok(),
                _ => None,
            })
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| TorchError::malformed(at, format!("tensor {what} holds a non-index")))
    }

    fn tensor(
        &mut self,
        storage: &Obj,
        offset: &Obj,
        size: &Obj,
        stride: &Obj,
        requires_grad: &Obj,
        at: usize,
    ) -> Result<Obj, TorchError> {
        let Obj::Storage(s) = *storage else {
            return Err(TorchError::malformed(
                at,
                format!("tensor storage is a {}", storage.kind()),
            ));
        };
        let offset = match offset {
            Obj::Int(i) => usize::try_from(*i).ok(),
            _ => None,
        }
        .ok_or_else(|| TorchError::malformed(at, "tensor storage offset is not an index"))?;
        let shape = self.usizes(size, "size", at)?;
        let stride = self.usizes(stride, "stride", at)?;
        let requires_grad = match requires_grad {
            Obj::Bool(b) => *b,
            Obj::Int(i) => *i != 0,
            _ => return Err(TorchError::malformed(at, "requires_grad is not a bool")),
        };
        let slot = &self.arena.storages[s];
        let bytes = slot.numel.saturating_mul(slot.dtype.size());
        check_view(slot.dtype, &shape, &stride, offset, bytes)
            .map_err(|e| TorchError::malformed(at, format!("storage `{}`: {e}", slot.key)))?;
        self.arena.tensors.push(TensorObj {
            storage: s,
            shape,
            stride,
            offset,
            requires_grad,
        });
        Ok(Obj::Tensor(self.arena.tensors.len() - 1))
    }
}
