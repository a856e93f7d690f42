//! The pickle writer: a [`Value`] as the protocol-2 pickle `torch.save` writes, using only the
//! opcodes and globals `torch.load(weights_only=True)` accepts.
//!
//! A tensor is pickled as
//! `torch._utils._rebuild_tensor_v2(persistent_load(('storage', torch.FloatStorage, key, 'cpu',
//! numel)), offset, size, stride, requires_grad, collections.OrderedDict())`; its storage
//! becomes the record `data/<key>`. Tensors viewing the same [`Storage`] with the same dtype
//! share one record (as PyTorch does); others get one record each.

use std::borrow::Cow;
use std::collections::HashMap;

use super::error::TorchError;
use super::unpickle::MAX_DEPTH;
use super::value::{DType, Key, Tensor, Value, contiguous_strides};

/// Items per APPENDS / SETITEMS batch (as Python's pickler).
const BATCH: usize = 1000;

/// A pickled checkpoint: `data.pkl` and the storages' records in key order.
pub(crate) struct Pickled<'v> {
    pub pickle: Vec<u8>,
    pub storages: Vec<(String, Cow<'v, [u8]>)>,
}

/// Pickles `value` (protocol 2).
pub(crate) fn pickle(value: &Value) -> Result<Pickled<'_>, TorchError> {
    let mut p = Pickler {
        out: vec![0x80, 2],
        globals: HashMap::new(),
        storages: Vec::new(),
        shared: HashMap::new(),
    };
    p.value(value, 0)?;
    p.out.push(b'.');
    Ok(Pickled {
        pickle: p.out,
        storages: p.storages,
    })
}

struct Pickler<'v> {
    out: Vec<u8>,
    /// Memo index of each global written.
    globals: HashMap<(&'static str, &'static str), u32>,
    storages: Vec<(String, Cow<'v, [u8]>)>,
    /// Record key of each shared storage (by identity and dtype).
    shared: HashMap<((usize, usize, usize), DType), String>,
}

impl<'v> Pickler<'v> {
    fn int(&mut self, v: i64) {
        match v {
            0..=0xff => self.out.extend_from_slice(&[b'K', v as u8]),
            0x100..=0xffff => {
                self.out.push(b'M');
                self.out.extend_from_slice(&(v as u16).to_le_bytes());
            }
            _ if i32::try_from(v).is_ok() => {
                self.out.push(b'J');
                self.out.extend_from_slice(&(v as i32).to_le_bytes());
            }
            _ => {
                // LONG1: minimal little-endian two's complement.
                let bytes = v.to_le_bytes();
                let mut n = 8;
                while n > 1 {
                    let (top, next) = (bytes[n - 1], bytes[n - 2]);
                    if (top == 0 && next & 0x80 == 0) || (top == 0xff && next & 0x80 != 0) {
                        n -= 1;
                    } else {
                        break;
                    }
                }
                self.out.extend_from_slice(&[0x8a, n as u8]);
                self.out.extend_from_slice(&bytes[..n]);
            }
        }
    }

    fn index(&mut self, v: usize) -> Result<(), TorchError> {
        let v =
            i64::try_from(v).map_err(|_| TorchError::limit("tensor index", i64::MAX as usize))?;
        self.int(v);
        Ok(())
    }

    fn str(&mut self, s: &str) -> Result<(), TorchError> {
        // BINUNICODE (the weights_only loader has no SHORT_BINUNICODE / BINUNICODE8).
        let n = u32::try_from(s.len())
            .map_err(|_| TorchError::limit("string length", u32::MAX as usize))?;
        self.out.push(b'X');
        self.out.extend_from_slice(&n.to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
        Ok(())
    }

    /// GLOBAL, memoized: written once, then fetched with BINGET.
    fn global(&mut self, module: &'static str, name: &'static str) {
        if let Some(&i) = self.globals.get(&(module, name)) {
            self.get(i);
            return;
        }
        self.out.push(b'c');
        self.out.extend_from_slice(module.as_bytes());
        self.out.push(b'\n');
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(b'\n');
        let i = self.globals.len() as u32;
        self.globals.insert((module, name), i);
        if i < 256 {
            self.out.extend_from_slice(&[b'q', i as u8]);
        } else {
            self.out.push(b'r');
            self.out.extend_from_slice(&i.to_le_bytes());
        }
    }

    fn get(&mut self, i: u32) {
        if i < 256 {
            self.out.extend_from_slice(&[b'h', i as u8]);
        } else {
            self.out.push(b'j');
            self.out.extend_from_slice(&i.to_le_bytes());
        }
    }

    fn tuple_end(&mut self, n: usize) {
        match n {
            0 => self.out.push(b')'),
            1 => self.out.push(0x85),
            2 => self.out.push(0x86),
            3 => self.out.push(0x87),
            _ => self.out.push(b't'),
        }
    }

    fn value(&mut self, v: &'v Value, depth: usize) -> Result<(), TorchError> {
        if depth > MAX_DEPTH {
            return Err(TorchError::limit("nesting depth", MAX_DEPTH));
        }
        match v {
            Value::None => self.out.push(b'N'),
            Value::Bool(b) => self.out.push(if *b { 0x88 } else { 0x89 }),
            Value::Int(i) => self.int(*i),
            Value::Float(f) => {
                self.out.push(b'G');
                self.out.extend_from_slice(&f.to_be_bytes());
            }
            Value::Str(s) => self.str(s)?,
            Value::Bytes(b) => {
                // Python's protocol-2 form of bytes: _codecs.encode(latin-1 text, 'latin1').
                self.global("_codecs", "encode");
                let text: String = b.iter().map(|&c| char::from(c)).collect();
                self.str(&text)?;
                self.str("latin1")?;
                self.out.extend_from_slice(&[0x86, b'R']);
            }
            Value::List(items) => {
                self.out.push(b']');
                for chunk in items.chunks(BATCH) {
                    if let [item] = chunk {
                        self.value(item, depth + 1)?;
                        self.out.push(b'a');
                    } else {
                        self.out.push(b'(');
                        for item in chunk {
                            self.value(item, depth + 1)?;
                        }
                        self.out.push(b'e');
                    }
                }
            }
            Value::Tuple(items) => {
                if items.len() > 3 {
                    self.out.push(b'(');
                }
                for item in items {
                    self.value(item, depth + 1)?;
                }
                self.tuple_end(items.len());
            }
            Value::Dict(dict) => {
                self.out.push(b'}');
                let entries: Vec<_> = dict.iter().collect();
                for chunk in entries.chunks(BATCH) {
                    if chunk.len() > 1 {
                        self.out.push(b'(');
                    }
                    for (k, v) in chunk {
                        match k {
                            Key::Str(s) => self.str(s)?,
                            Key::Int(i) => self.int(*i),
                        }
                        self.value(v, depth + 1)?;
                    }
                    self.out.push(if chunk.len() > 1 { b'u' } else { b's' });
                }
            }
            Value::Tensor(t) => self.tensor(t)?,
        }
        Ok(())
    }

    fn tensor(&mut self, t: &'v Tensor) -> Result<(), TorchError> {
        let dtype = t.dtype();
        let storage = t.storage();
        let (key, numel, offset, stride) = if storage.len().is_multiple_of(dtype.size()) {
            let id = (storage.identity(), dtype);
            let key = match self.shared.get(&id) {
                Some(key) => key.clone(),
                None => {
                    let key = self.storages.len().to_string();
                    self.storages
                        .push((key.clone(), Cow::Borrowed(storage.bytes())));
                    self.shared.insert(id, key.clone());
                    key
                }
            };
            let stride = t.stride().to_vec();
            (
                key,
                storage.len() / dtype.size(),
                t.storage_offset(),
                stride,
            )
        } else {
            let key = self.storages.len().to_string();
            self.storages.push((key.clone(), t.contiguous_bytes()));
            (key, t.numel(), 0, contiguous_strides(t.shape()))
        };

        self.global("torch._utils", "_rebuild_tensor_v2");
        self.out.extend_from_slice(b"((");
        self.str("storage")?;
        self.global("torch", dtype.storage_class());
        self.str(&key)?;
        self.str("cpu")?;
        self.index(numel)?;
        self.out.extend_from_slice(b"tQ"); // TUPLE, BINPERSID
        self.index(offset)?;
        for dims in [t.shape(), &stride[..]] {
            if dims.len() > 3 {
                self.out.push(b'(');
            }
            for &d in dims {
                self.index(d)?;
            }
            self.tuple_end(dims.len());
        }
        self.out.push(if t.requires_grad() { 0x88 } else { 0x89 });
        self.global("collections", "OrderedDict");
        self.out.extend_from_slice(b")R"); // OrderedDict(): no backward hooks
        self.out.extend_from_slice(b"tR"); // TUPLE, REDUCE
        Ok(())
    }
}
