//! Reading a checkpoint: the zip format (PyTorch >= 1.6) and the legacy pickle-stream format,
//! from bytes in memory or a memory-mapped file.

use std::collections::HashMap;
use std::sync::Arc;

use rayon::prelude::*;

use super::error::TorchError;
use super::unpickle::{Arena, Obj, Pid, StorageSlot, Unpickler, no_persistent_ids};
use super::value::{Buffer, Storage, Value};
use super::zip::{self, Entry};

/// The magic number a legacy checkpoint's first pickle holds (0x1950a86a20f9469cfc6c), as
/// LONG1 bytes.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
/// The legacy format's protocol version.
const LEGACY_PROTOCOL: i64 = 1001;

/// The memory budget for the value of a pickle of `len` bytes (see [`Arena::to_value`]): ample
/// for real checkpoints (a few times the pickle's size: memoized strings repeat), bounded for
/// hostile ones (a memo bomb expands a few bytes into exponentially many objects).
fn budget(len: usize) -> usize {
    (64usize << 20).saturating_add(len.saturating_mul(32))
}

/// Parses a checkpoint held in `buf`.
pub(crate) fn read(buf: Arc<Buffer>) -> Result<Value, TorchError> {
    let data: &[u8] = &buf;
    // A local header, or the end records of an archive without entries.
    let zip_signatures: [&[u8]; 3] = [b"PK\x03\x04", b"PK\x05\x06", b"PK\x06\x06"];
    if zip_signatures.iter().any(|sig| data.starts_with(sig)) {
        read_zip(&buf)
    } else if data.first() == Some(&0x80) {
        read_legacy(&buf)
    } else if data.get(257..262) == Some(b"ustar") {
        Err(TorchError::UnsupportedFormat(
            "the tar format of PyTorch before 0.1.10".into(),
        ))
    } else {
        let head = &data[..data.len().min(8)];
        Err(TorchError::NotACheckpoint(format!(
            "starts with {head:02x?}, neither a zip archive nor a pickle"
        )))
    }
}

fn read_zip(buf: &Arc<Buffer>) -> Result<Value, TorchError> {
    let data: &[u8] = buf;
    let entries = zip::read_entries(data)?;
    // Like PyTorch: the archive's folder is that of the first entry.
    let first = entries
        .first()
        .ok_or_else(|| TorchError::MissingRecord("data.pkl (the archive is empty)".into()))?;
    let prefix = match first.name.find('/') {
        Some(i) => first.name[..=i].to_owned(),
        None => {
            return Err(TorchError::NotACheckpoint(format!(
                "zip entry `{}` is not inside a folder",
                first.name
            )));
        }
    };
    entries.par_iter().try_for_each(|e| e.verify(data))?;
    let records: HashMap<&str, &Entry> = entries.iter().map(|e| (e.name.as_str(), e)).collect();
    let record = |name: &str| records.get(format!("{prefix}{name}").as_str()).copied();

    if let Some(order) = record("byteorder") {
        let order = order.data(data);
        if order != b"little" {
            return Err(TorchError::UnsupportedByteOrder(
                String::from_utf8_lossy(order).into_owned(),
            ));
        }
    }
    let pkl = match record("data.pkl") {
        Some(pkl) => pkl,
        None if record("constants.pkl").is_some() => {
            return Err(TorchError::UnsupportedFormat(
                "a TorchScript archive (torch.jit.save), not a torch.save checkpoint".into(),
            ));
        }
        None => return Err(TorchError::MissingRecord(format!("{prefix}data.pkl"))),
    };

    let mut cache: HashMap<String, Obj> = HashMap::new();
    let mut persistent = |arena: &mut Arena, pid: &Obj, at: usize| -> Result<Obj, TorchError> {
        let pid = Pid::parse(arena, pid, at)?;
        if pid.is_view {
            return Err(TorchError::malformed(
                at,
                "storage views in a zip checkpoint",
            ));
        }
        if let Some(obj) = cache.get(&pid.key) {
            return Ok(obj.clone());
        }
        let name = format!("{prefix}data/{}", pid.key);
        let entry = records
            .get(name.as_str())
            .ok_or_else(|| TorchError::StorageMissing {
                key: pid.key.clone(),
                record: name.clone(),
            })?;
        check_size(&pid, entry.len)?;
        let storage = Storage::slice(buf, entry.start, entry.len);
        let obj = arena.add_storage(StorageSlot {
            key: pid.key.clone(),
            dtype: pid.dtype,
            numel: pid.numel,
            data: Some(storage),
        });
        cache.insert(pid.key, obj.clone());
        Ok(obj)
    };
    let mut up = Unpickler::new(pkl.data(data));
    let obj = up.load(&mut persistent)?;
    up.arena.to_value(&obj, budget(pkl.len))
}

/// Parses a plain pickle of values without tensors (nanoGPT's `meta.pkl`, for instance), with
/// the same allow-list of globals as a checkpoint.
pub(crate) fn read_plain(data: &[u8]) -> Result<Value, TorchError> {
    let mut up = Unpickler::new(data);
    let obj = up.load(&mut no_persistent_ids)?;
    up.arena.to_value(&obj, budget(data.len()))
}

fn check_size(pid: &Pid, found: usize) -> Result<(), TorchError> {
    let expected = pid.numel.checked_mul(pid.dtype.size());
    if expected == Some(found) {
        return Ok(());
    }
    Err(TorchError::StorageSizeMismatch {
        key: pid.key.clone(),
        dtype: pid.dtype,
        numel: pid.numel as u64,
        expected: expected.map_or(u64::MAX, |e| e as u64),
        found: found as u64,
    })
}

/// The legacy format: pickles of the magic number, the protocol version and the system info,
/// the object (whose storages are persistent ids), the list of storage keys; then each storage
/// as an `i64` element count and its bytes.
fn read_legacy(buf: &Arc<Buffer>) -> Result<Value, TorchError> {
    let data: &[u8] = buf;
    let mut up = Unpickler::new(data);
    let magic = up.load(&mut no_persistent_ids);
    if !matches!(&magic, Ok(Obj::BigInt(b)) if **b == LEGACY_MAGIC) {
        return Err(TorchError::NotACheckpoint(
            "a pickle without PyTorch's magic number".into(),
        ));
    }
    match up.load(&mut no_persistent_ids)? {
        Obj::Int(LEGACY_PROTOCOL) => {}
        other => {
            return Err(TorchError::UnsupportedFormat(format!(
                "legacy protocol version {other:?} (expected {LEGACY_PROTOCOL})"
            )));
        }
    }
    let sys_info = up.load(&mut no_persistent_ids)?;
    if !matches!(
        up.arena.dict_get(&sys_info, "little_endian"),
        Some(Obj::Bool(true))
    ) {
        return Err(TorchError::UnsupportedByteOrder(
            "big (legacy sys_info)".into(),
        ));
    }

    let main_start = up.position();
    let mut slots: HashMap<String, Obj> = HashMap::new();
    let mut persistent = |arena: &mut Arena, pid: &Obj, at: usize| -> Result<Obj, TorchError> {
        let pid = Pid::parse(arena, pid, at)?;
        if pid.is_view {
            return Err(TorchError::UnsupportedFormat(
                "legacy storage views (view_metadata)".into(),
            ));
        }
        if let Some(obj) = slots.get(&pid.key) {
            return Ok(obj.clone());
        }
        let obj = arena.add_storage(StorageSlot {
            key: pid.key.clone(),
            dtype: pid.dtype,
            numel: pid.numel,
            data: None,
        });
        slots.insert(pid.key, obj.clone());
        Ok(obj)
    };
    let obj = up.load(&mut persistent)?;
    let pickle_len = up.position() - main_start;
    let keys_obj = up.load(&mut no_persistent_ids)?;
    let keys: Vec<String> = up
        .arena
        .seq(&keys_obj)
        .ok_or_else(|| TorchError::malformed(up.position(), "storage key list is not a list"))?
        .iter()
        .map(|k| match k {
            Obj::Str(s) => Ok(s.to_string()),
            _ => Err(TorchError::malformed(
                up.position(),
                "storage key is not a str",
            )),
        })
        .collect::<Result<_, _>>()?;

    let mut pos = up.position();
    for key in keys {
        let Some(Obj::Storage(slot)) = slots.get(&key).cloned() else {
            return Err(TorchError::malformed(
                pos,
                format!("storage `{key}` is listed but no tensor uses it"),
            ));
        };
        let count = data.get(pos..pos + 8).ok_or_else(|| {
            TorchError::truncated(format!("element count of storage `{key}`"), pos)
        })?;
        let count = u64::from_le_bytes(count.try_into().expect("8 bytes"));
        let slot = &mut up.arena.storages[slot];
        if count != slot.numel as u64 {
            return Err(TorchError::StorageSizeMismatch {
                key,
                dtype: slot.dtype,
                numel: slot.numel as u64,
                expected: (slot.numel as u64).saturating_mul(slot.dtype.size() as u64),
                found: count.saturating_mul(slot.dtype.size() as u64),
            });
        }
        let start = pos + 8;
        let len = match slot.numel.checked_mul(slot.dtype.size()) {
            Some(len) if len <= data.len() - start => len,
            _ => {
                return Err(TorchError::truncated(
                    format!("data of storage `{key}`"),
                    start,
                ));
            }
        };
        slot.data = Some(Storage::slice(buf, start, len));
        pos = start + len;
    }
    up.arena.to_value(&obj, budget(pickle_len))
}
