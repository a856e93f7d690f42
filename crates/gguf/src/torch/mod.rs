//! PyTorch checkpoints: the files `torch.save` writes (`.pt`, `.pth`, `.bin` such as
//! `pytorch_model.bin`), read and written without Python.
//!
//! The format (PyTorch >= 1.6) is a zip archive of stored (uncompressed) entries under one
//! folder: `data.pkl`, a pickle of the saved object whose tensors refer to storages by key, one
//! `data/<key>` record of raw little-endian bytes per storage, and small `version` /
//! `byteorder` records. The older non-zip format (`_use_new_zipfile_serialization=False`: a
//! stream of pickles followed by the storages) is read too.
//!
//! Reading uses a **restricted unpickler**: it never imports or calls anything, and it resolves
//! only an allow-list of globals, the ones a checkpoint of tensors and plain values needs
//! (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2` and friends, `torch.Size`, the
//! storage classes, `_codecs.encode` for bytes), all within what
//! `torch.load(weights_only=True)` accepts. Any other global (`os.system`, `builtins.eval`, a
//! model class) is refused with [`TorchError::DisallowedGlobal`] naming it. Hostile or corrupt
//! input never panics and never makes the reader allocate much beyond the input's size.
//!
//! Loaded tensors are views into the file's bytes (no copy), keep PyTorch's layout (storage
//! offset, strides, storages shared between tensors, e.g. tied embeddings) and are materialized
//! on access ([`Tensor::contiguous_bytes`], [`Tensor::to_vec`], [`Tensor::to_f32_vec`]).
//!
//! Writing produces what `torch.save` produces (pickle protocol 2, 64-byte aligned records) and
//! uses only what `torch.load(path, weights_only=True)` — and `mmap=True` — accepts. Files are
//! written atomically ([`crate::atomic`]).
//!
//! ```
//! use kiln_gguf::torch::{self, Dict, Tensor, Value};
//!
//! let mut state = Dict::new();
//! state.insert("wte.weight", Tensor::from_slice([2, 3], &[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0])?);
//! let mut ckpt = Dict::new();
//! ckpt.insert("model", state);
//! ckpt.insert("iter_num", 250i64);
//! let bytes = torch::to_bytes(&Value::Dict(ckpt))?;
//!
//! let back = torch::from_bytes(bytes)?;
//! assert_eq!(back.get("iter_num").and_then(Value::as_int), Some(250));
//! let (path, w) = &back.tensors()[0];
//! assert_eq!((path.as_str(), w.shape()), ("model.wte.weight", &[2, 3][..]));
//! assert_eq!(w.to_vec::<f32>()?, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
//! # Ok::<(), kiln_gguf::torch::TorchError>(())
//! ```

mod error;
mod pickle;
mod read;
#[cfg(test)]
mod tests;
mod unpickle;
mod value;
mod write;
mod zip;

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

pub use error::TorchError;
pub use value::{
    DTYPES, DType, Dict, Element, Key, MAX_TENSOR_DIMS, Storage, Tensor, Value, contiguous_strides,
};

use value::Buffer;

/// Reads the checkpoint at `path` into memory and parses it.
pub fn load(path: impl AsRef<Path>) -> Result<Value, TorchError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| TorchError::Io(e).in_file(path))?;
    read::read(Arc::new(Buffer::Owned(bytes))).map_err(|e| e.in_file(path))
}

/// Memory-maps the checkpoint at `path` and parses it; tensors view the mapping, so their bytes
/// are read from disk on access.
///
/// The file must not be modified while the returned value (or a tensor from it) is alive.
pub fn load_mmap(path: impl AsRef<Path>) -> Result<Value, TorchError> {
    let path = path.as_ref();
    let map = std::fs::File::open(path).and_then(|f| {
        // SAFETY: the mapping is read-only; as documented, the caller keeps the file unchanged
        // while it is in use (the same contract as `GgufFile::open`).
        unsafe { memmap2::Mmap::map(&f) }
    });
    let map = map.map_err(|e| TorchError::Io(e).in_file(path))?;
    read::read(Arc::new(Buffer::Mapped(map))).map_err(|e| e.in_file(path))
}

/// Reads a plain pickle file holding no tensors, such as nanoGPT's `meta.pkl` (its character
/// vocabulary), with the checkpoint reader's allow-list: nothing is imported or called.
pub fn load_pickle(path: impl AsRef<Path>) -> Result<Value, TorchError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| TorchError::Io(e).in_file(path))?;
    read::read_plain(&bytes).map_err(|e| e.in_file(path))
}

/// Parses a checkpoint held in memory (zip or legacy format).
pub fn from_bytes(bytes: Vec<u8>) -> Result<Value, TorchError> {
    read::read(Arc::new(Buffer::Owned(bytes)))
}

/// The checkpoint file `torch.save(value)` would write, as bytes.
pub fn to_bytes(value: &Value) -> Result<Vec<u8>, TorchError> {
    let mut out = Vec::new();
    write_to(&mut out, value)?;
    Ok(out)
}

/// Writes the checkpoint of `value` to a byte stream.
pub fn write_to(out: &mut dyn Write, value: &Value) -> Result<(), TorchError> {
    let pickled = pickle::pickle(value)?;
    write::write_archive(out, &pickled, u64::from(u32::MAX))?;
    Ok(())
}

/// Writes the checkpoint of `value` to `path` atomically (temp file, fsync, rename): readers see
/// the old file or the new one, never a torn one.
pub fn save(path: impl AsRef<Path>, value: &Value) -> Result<(), TorchError> {
    let path = path.as_ref();
    // Pickle first: a value that cannot be written leaves no file behind.
    let pickled = pickle::pickle(value).map_err(|e| e.in_file(path))?;
    crate::atomic::write_with(path, |w| {
        write::write_archive(w, &pickled, u64::from(u32::MAX))
    })
    .map_err(|e| TorchError::Io(e).in_file(path))
}
