//! Unit tests of the torch module: zip and CRC, the writer's round trip and its pickle subset,
//! refused globals, typed errors, and corrupted input (which must never panic). The fixtures
//! made with real PyTorch are checked in `tests/torch_fixtures.rs`.

use std::collections::HashMap;
use std::process::Command;

use super::pickle::pickle;
use super::write::write_archive;
use super::zip::{ZipWriter, crc32, read_entries};
use super::*;

const GPT2_FIXTURE: &[u8] = include_bytes!("../../tests/fixtures/torch/gpt2/pytorch_model.bin");
const LEGACY_FIXTURE: &[u8] = include_bytes!("../../tests/fixtures/torch/legacy.pt");

/// A checkpoint-like value with every kind of value, every dtype, views and a shared storage.
pub(super) fn sample() -> Value {
    let w = Tensor::from_slice([2, 3], &[1.0f32, -2.0, 3.5, 0.25, 5.0, -6.0]).unwrap();
    let shared = w.storage().clone();
    let w_t = Tensor::view(shared.clone(), DType::F32, [3, 2], [1, 3], 0).unwrap();
    let row = Tensor::view(shared, DType::F32, [3], [1], 3).unwrap();
    let h: Vec<half::f16> = [0.5f32, -1.5, 65504.0].map(half::f16::from_f32).to_vec();
    let b: Vec<half::bf16> = [1.0f32, -3.0e38, 0.007].map(half::bf16::from_f32).to_vec();
    let model: Dict = [
        ("w", Value::from(w)),
        ("w_t", w_t.into()),
        ("row", row.into()),
        ("f16", Tensor::from_slice([3], &h).unwrap().into()),
        ("bf16", Tensor::from_slice([3, 1], &b).unwrap().into()),
        (
            "f64",
            Tensor::from_slice([2], &[std::f64::consts::PI, -0.0])
                .unwrap()
                .into(),
        ),
        (
            "i64",
            Tensor::from_slice([3], &[i64::MIN, -1, i64::MAX])
                .unwrap()
                .into(),
        ),
        (
            "i32",
            Tensor::from_slice([2], &[i32::MIN, 7]).unwrap().into(),
        ),
        (
            "i16",
            Tensor::from_slice([2], &[-300i16, 300]).unwrap().into(),
        ),
        (
            "i8",
            Tensor::from_slice([2], &[-128i8, 127]).unwrap().into(),
        ),
        ("u8", Tensor::from_slice([2], &[0u8, 255]).unwrap().into()),
        (
            "bool",
            Tensor::from_slice([2, 2], &[true, false, false, true])
                .unwrap()
                .into(),
        ),
        ("scalar", Tensor::from_slice([], &[2.5f32]).unwrap().into()),
        (
            "empty",
            Tensor::new(DType::F32, [0, 3], Vec::new()).unwrap().into(),
        ),
        (
            "param",
            Tensor::from_slice([2], &[1.0f32, 2.0])
                .unwrap()
                .with_requires_grad(true)
                .into(),
        ),
    ]
    .into_iter()
    .collect();
    let int_keys: Dict = [(0i64, Value::from("zero")), (-3, Value::Tuple(vec![]))]
        .into_iter()
        .collect();
    let ckpt: Dict = [
        ("model", Value::Dict(model)),
        ("iter_num", 250i64.into()),
        ("best_val_loss", 1.25f64.into()),
        (
            "flags",
            Value::List(vec![true.into(), false.into(), Value::None]),
        ),
        ("betas", Value::Tuple(vec![0.9f64.into(), 0.95f64.into()])),
        (
            "four",
            Value::Tuple((1..=4).map(|i: i64| i.into()).collect()),
        ),
        ("name", "h\u{e9}llo \u{1d11e}".into()),
        ("raw", Value::Bytes(vec![0, 1, 0x7f, 0x80, 0xff])),
        ("int_keys", Value::Dict(int_keys)),
        (
            "ints",
            Value::List(
                [
                    0,
                    255,
                    256,
                    65535,
                    65536,
                    -1,
                    -129,
                    i64::from(i32::MAX),
                    i64::from(i32::MIN),
                    1 << 40,
                    i64::MIN,
                    i64::MAX,
                ]
                .map(Value::Int)
                .to_vec(),
            ),
        ),
        (
            "nested",
            Value::List(vec![
                Value::List(vec![Value::List(vec![])]),
                Value::Dict(Dict::new()),
            ]),
        ),
        ("many", Value::List((0..2500i64).map(Value::Int).collect())),
    ]
    .into_iter()
    .collect();
    Value::Dict(ckpt)
}

fn zip_of(records: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut zip = ZipWriter::with_zip64_threshold(&mut out, u64::from(u32::MAX));
    for (name, data) in records {
        zip.add(name, data).unwrap();
    }
    zip.finish().unwrap();
    out
}

/// A checkpoint whose `data.pkl` is `pkl` (plus `storages` as `archive/data/<key>`).
fn checkpoint_with_pickle(pkl: &[u8], storages: &[(&str, &[u8])]) -> Vec<u8> {
    let names: Vec<String> = storages
        .iter()
        .map(|(k, _)| format!("archive/data/{k}"))
        .collect();
    let mut records = vec![("archive/data.pkl", pkl), ("archive/version", &b"3\n"[..])];
    records.extend(
        names
            .iter()
            .map(String::as_str)
            .zip(storages.iter().map(|(_, d)| *d)),
    );
    zip_of(&records)
}

/// Records of an archive by name.
fn records_of(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    read_entries(bytes)
        .unwrap()
        .iter()
        .map(|e| (e.name.clone(), e.data(bytes).to_vec()))
        .collect()
}

#[test]
fn crc32_matches_the_standard_check_value() {
    assert_eq!(crc32(b""), 0);
    assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    // Slice-by-8 against the bitwise definition, at every length around the 8-byte blocks.
    let data: Vec<u8> = (0..100u32).map(|i| (i * 37 % 251) as u8).collect();
    for len in 0..data.len() {
        let mut crc = !0u32;
        for &b in &data[..len] {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    0xEDB8_8320 ^ (crc >> 1)
                } else {
                    crc >> 1
                };
            }
        }
        assert_eq!(crc32(&data[..len]), !crc, "length {len}");
    }
}

#[test]
fn zip_round_trip_with_and_without_zip64_fields() {
    let big: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
    let records: [(&str, &[u8]); 4] = [
        ("a/data.pkl", b"\x80\x02N."),
        ("a/empty", b""),
        ("a/data/0", &big),
        ("a/x", b"1"),
    ];
    // Thresholds: never ZIP64 (as for files under 4 GiB), ZIP64 for large entries, for
    // everything past the first entry, for every size and offset.
    for zip64_at in [u64::from(u32::MAX), 100, 1, 0] {
        let mut out = Vec::new();
        let mut zip = ZipWriter::with_zip64_threshold(&mut out, zip64_at);
        for (name, data) in records {
            zip.add(name, data).unwrap();
        }
        zip.finish().unwrap();
        let entries = read_entries(&out).unwrap();
        assert_eq!(entries.len(), records.len());
        for (e, (name, data)) in entries.iter().zip(records) {
            assert_eq!(
                (e.name.as_str(), e.data(&out)),
                (name, data),
                "zip64 threshold {zip64_at}"
            );
            assert_eq!(e.start % 64, 0, "{name} is not 64-byte aligned");
            e.verify(&out).unwrap();
        }
    }
}

#[test]
fn the_writer_round_trips_every_kind_of_value() {
    let value = sample();
    let bytes = to_bytes(&value).unwrap();
    let back = from_bytes(bytes.clone()).unwrap();
    assert_eq!(back, value);

    // Layout: PyTorch's records, in its order, every one 64-byte aligned.
    let names: Vec<String> = read_entries(&bytes)
        .unwrap()
        .iter()
        .map(|e| e.name.clone())
        .collect();
    assert_eq!(
        &names[..4],
        [
            "archive/data.pkl",
            "archive/.format_version",
            "archive/.storage_alignment",
            "archive/byteorder"
        ]
    );
    assert_eq!(names.last().unwrap(), "archive/version");
    // `w`, `w_t` and `row` share one storage: 15 tensors, 13 storage records.
    assert_eq!(
        names
            .iter()
            .filter(|n| n.starts_with("archive/data/"))
            .count(),
        13
    );

    // Through files: save (atomic), load, load_mmap.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt.pt");
    save(&path, &value).unwrap();
    assert_eq!(
        std::fs::read(&path).unwrap(),
        bytes,
        "save writes what to_bytes returns"
    );
    assert_eq!(load(&path).unwrap(), value);
    assert_eq!(load_mmap(&path).unwrap(), value);
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no temp file left"
    );
}

#[test]
fn views_and_shared_storages_survive_a_round_trip() {
    let back = from_bytes(to_bytes(&sample()).unwrap()).unwrap();
    let model = back.get("model").unwrap();
    let t = |name: &str| model.get(name).and_then(Value::as_tensor).unwrap();
    let (w, w_t, row) = (t("w"), t("w_t"), t("row"));
    assert!(w.storage().same(w_t.storage()) && w.storage().same(row.storage()));
    assert!(!w.storage().same(t("f16").storage()));
    assert_eq!((w_t.stride(), w_t.is_contiguous()), (&[1, 3][..], false));
    assert_eq!(
        w_t.to_vec::<f32>().unwrap(),
        [1.0, 0.25, -2.0, 5.0, 3.5, -6.0]
    );
    assert_eq!(
        (row.storage_offset(), row.to_vec::<f32>().unwrap()),
        (3, vec![0.25, 5.0, -6.0])
    );
    assert!(t("param").requires_grad() && !w.requires_grad());
    assert_eq!(t("scalar").shape(), &[] as &[usize]);
    assert_eq!(t("scalar").to_f32_vec(), [2.5]);
    assert_eq!((t("empty").shape(), t("empty").numel()), (&[0, 3][..], 0));
    assert_eq!(
        t("bool").to_vec::<bool>().unwrap(),
        [true, false, false, true]
    );
    assert_eq!(t("i64").to_vec::<i64>().unwrap(), [i64::MIN, -1, i64::MAX]);
    assert!(matches!(
        t("i64").to_vec::<f32>(),
        Err(TorchError::DtypeMismatch {
            expected: DType::F32,
            found: DType::I64
        })
    ));
    assert_eq!(t("bf16").to_f32_vec()[0], 1.0);
}

#[test]
fn strided_views_materialize_in_row_major_order() {
    let data: Vec<i32> = (0..24).collect();
    let base = Tensor::from_slice([2, 3, 4], &data).unwrap();
    let s = base.storage().clone();
    // x.permute(2, 0, 1)[:, :, ::2] of a (2, 3, 4) tensor, offset by one element.
    let v = Tensor::view(s.clone(), DType::I32, [4, 2, 2], [1, 12, 8], 0).unwrap();
    let mut expected = Vec::new();
    for k in 0..4 {
        for i in 0..2 {
            for j in [0, 2] {
                expected.push(i * 12 + j * 4 + k);
            }
        }
    }
    assert_eq!(v.to_vec::<i32>().unwrap(), expected);
    // Broadcast (stride 0) and out-of-bounds views.
    let b = Tensor::view(s.clone(), DType::I32, [3, 2], [0, 1], 5).unwrap();
    assert_eq!(b.to_vec::<i32>().unwrap(), [5, 6, 5, 6, 5, 6]);
    assert!(matches!(
        Tensor::view(s.clone(), DType::I32, [2], [1], 23),
        Err(TorchError::InvalidTensor(_))
    ));
    assert!(matches!(
        Tensor::view(s.clone(), DType::I64, [13], [1], 0),
        Err(TorchError::InvalidTensor(_))
    ));
    assert!(matches!(
        Tensor::view(s, DType::I32, [2, usize::MAX], [1, 1], 0),
        Err(TorchError::InvalidTensor(_))
    ));
    assert!(matches!(
        Tensor::new(DType::F32, [2], vec![0; 7]),
        Err(TorchError::InvalidTensor(_))
    ));
}

/// Walks a pickle the writer made, checking that it uses only the opcodes and globals of
/// PyTorch's weights_only unpickler (`torch/_weights_only_unpickler.py`).
fn weights_only_check(pkl: &[u8]) -> Result<(), String> {
    let allowed_globals = |g: &str| {
        matches!(
            g,
            "collections.OrderedDict" | "torch._utils._rebuild_tensor_v2" | "_codecs.encode"
        ) || g
            .strip_prefix("torch.")
            .is_some_and(|s| DType::from_storage_class(s).is_some())
    };
    let mut i = 0;
    let le32 = |b: &[u8]| u32::from_le_bytes(b[..4].try_into().unwrap()) as usize;
    while i < pkl.len() {
        let op = pkl[i];
        i += 1;
        let arg = match op {
            b'(' | b'}' | b']' | b')' | b's' | b'u' | b'a' | b'e' | b't' | 0x85 | 0x86 | 0x87
            | b'N' | 0x88 | 0x89 | b'R' | b'Q' => 0,
            b'.' => {
                return if i == pkl.len() {
                    Ok(())
                } else {
                    Err("data after STOP".into())
                };
            }
            0x80 | b'q' | b'h' | b'K' => 1,
            b'M' => 2,
            b'J' | b'r' | b'j' => 4,
            b'G' => 8,
            b'X' => 4 + le32(&pkl[i..]),
            0x8a => 1 + usize::from(pkl[i]),
            b'c' => {
                let mut lines = pkl[i..].splitn(3, |&b| b == b'\n');
                let mut line = || String::from_utf8(lines.next().unwrap().to_vec()).unwrap();
                let (module, name) = (line(), line());
                let global = format!("{module}.{name}");
                if !allowed_globals(&global) {
                    return Err(format!("global {global}"));
                }
                module.len() + name.len() + 2
            }
            other => return Err(format!("opcode {other:#04x} at {}", i - 1)),
        };
        i += arg;
    }
    Err("no STOP".into())
}

#[test]
fn the_pickle_uses_only_what_weights_only_loading_accepts() {
    let value = sample();
    let pickled = pickle(&value).unwrap();
    assert_eq!(
        &pickled.pickle[..2],
        b"\x80\x02",
        "protocol 2, as torch.save"
    );
    weights_only_check(&pickled.pickle).unwrap();
    let legacy = from_bytes(LEGACY_FIXTURE.to_vec()).unwrap();
    weights_only_check(&pickle(&legacy).unwrap().pickle).unwrap();
}

#[test]
fn hostile_globals_are_refused_by_name() {
    // `os.system('echo pwned')` the way a malicious checkpoint pickles it: GLOBAL + REDUCE.
    let os_system = b"\x80\x02cos\nsystem\nX\x0a\x00\x00\x00echo pwnedq\x00\x85R.";
    let err = from_bytes(checkpoint_with_pickle(os_system, &[])).unwrap_err();
    assert!(
        matches!(&err, TorchError::DisallowedGlobal { module, name, offset: 2 } if module == "os" && name == "system"),
        "{err:?}"
    );
    assert!(err.to_string().contains("`os.system`"), "{err}");

    // Loaded from a file, the error names the file too.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("evil.pt");
    std::fs::write(&path, checkpoint_with_pickle(os_system, &[])).unwrap();
    let err = load(&path).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("evil.pt") && msg.contains("os.system"),
        "{msg}"
    );
    assert!(matches!(err.kind(), TorchError::DisallowedGlobal { .. }));

    // Other ways in: protocol-4 STACK_GLOBAL, Python 2 builtins, the legacy format, a global
    // nested deep inside a state dict, NEWOBJ of a class.
    let cases: [(&[u8], &str); 5] = [
        (
            b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93\x8c\x011\x85R.",
            "builtins.eval",
        ),
        (
            b"\x80\x02c__builtin__\neval\nX\x01\x00\x00\x001\x85R.",
            "__builtin__.eval",
        ),
        (
            b"\x80\x02}(X\x01\x00\x00\x00a]cposix\nsystem\nae.",
            "posix.system",
        ),
        (
            b"\x80\x02cnumpy.core.multiarray\n_reconstruct\n)R.",
            "numpy.core.multiarray._reconstruct",
        ),
        (b"\x80\x02c__main__\nModel\n)\x81.", "__main__.Model"),
    ];
    for (pkl, global) in cases {
        let err = from_bytes(checkpoint_with_pickle(pkl, &[])).unwrap_err();
        assert!(
            matches!(err, TorchError::DisallowedGlobal { .. }) && err.to_string().contains(global),
            "{global}: {err}"
        );
    }
    let mut legacy = LEGACY_FIXTURE.to_vec();
    let main = legacy
        .windows(12)
        .position(|w| w == b"torch._utils")
        .unwrap();
    legacy[main..main + 12].copy_from_slice(b"subprocess\n ");
    assert!(
        matches!(from_bytes(legacy), Err(TorchError::DisallowedGlobal { module, .. }) if module == "subprocess")
    );
}

fn storage_pickle(storage_class: &str, key: &str, numel: u8, size: &[u8]) -> Vec<u8> {
    let mut p = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storage".to_vec();
    p.extend_from_slice(format!("ctorch\n{storage_class}\nX").as_bytes());
    p.extend_from_slice(&(key.len() as u32).to_le_bytes());
    p.extend_from_slice(key.as_bytes());
    p.extend_from_slice(b"X\x03\x00\x00\x00cpuK");
    p.push(numel);
    p.extend_from_slice(b"tQK\x00");
    p.extend_from_slice(size);
    p.extend_from_slice(b"\x89ccollections\nOrderedDict\n)RtR.");
    p
}

#[test]
fn errors_are_typed() {
    let err = |bytes: Vec<u8>| from_bytes(bytes).unwrap_err();
    assert!(matches!(
        err(b"hello world".to_vec()),
        TorchError::NotACheckpoint(_)
    ));
    assert!(matches!(err(Vec::new()), TorchError::NotACheckpoint(_)));
    assert!(matches!(err(zip_of(&[])), TorchError::MissingRecord(_)));
    assert!(
        matches!(err(zip_of(&[("archive/version", b"3\n")])), TorchError::MissingRecord(r) if r == "archive/data.pkl")
    );
    assert!(matches!(
        err(zip_of(&[("model/constants.pkl", b"")])),
        TorchError::UnsupportedFormat(_)
    ));
    assert!(matches!(
        err(zip_of(&[("data.pkl", b"\x80\x02N.")])),
        TorchError::NotACheckpoint(_)
    ));
    let be = zip_of(&[("a/data.pkl", b"\x80\x02N."), ("a/byteorder", b"big")]);
    assert!(matches!(err(be), TorchError::UnsupportedByteOrder(o) if o == "big"));
    assert_eq!(
        from_bytes(checkpoint_with_pickle(b"\x80\x02N.", &[])).unwrap(),
        Value::None
    );

    // Storages: present, missing, of the wrong length, of an unsupported type.
    let one_float = 1.5f32.to_le_bytes();
    let ok = storage_pickle("FloatStorage", "0", 1, b"K\x01\x85K\x01\x85");
    let t = from_bytes(checkpoint_with_pickle(&ok, &[("0", &one_float)])).unwrap();
    assert_eq!(t.as_tensor().unwrap().to_vec::<f32>().unwrap(), [1.5]);
    let int_keys = from_bytes(checkpoint_with_pickle(
        b"\x80\x02}(K\x01K\x02J\xff\xff\xff\xffN\x85u.",
        &[],
    ))
    .unwrap();
    assert_eq!(int_keys.get(1i64), Some(&Value::Int(2)));
    assert_eq!(int_keys.get(-1i64), Some(&Value::Tuple(vec![Value::None])));
    assert!(
        matches!(err(checkpoint_with_pickle(&ok, &[])), TorchError::StorageMissing { key, .. } if key == "0")
    );
    assert!(matches!(
        err(checkpoint_with_pickle(&ok, &[("0", &[0; 3])])),
        TorchError::StorageSizeMismatch {
            expected: 4,
            found: 3,
            dtype: DType::F32,
            ..
        }
    ));
    let complex = storage_pickle("ComplexFloatStorage", "0", 1, b"K\x01\x85K\x01\x85");
    assert!(
        matches!(err(checkpoint_with_pickle(&complex, &[("0", &[0; 8])])), TorchError::UnsupportedStorage(s) if s == "ComplexFloatStorage")
    );
    // A view past the end of its storage: size (2,) of a 1-element storage.
    let past = storage_pickle("FloatStorage", "0", 1, b"K\x02\x85K\x01\x85");
    assert!(matches!(
        err(checkpoint_with_pickle(&past, &[("0", &one_float)])),
        TorchError::MalformedPickle { .. }
    ));

    // Pickle-level errors.
    let pkl = |p: &[u8]| err(checkpoint_with_pickle(p, &[]));
    assert!(matches!(
        pkl(b"\x80\x02\xff."),
        TorchError::UnknownOpcode {
            opcode: 0xff,
            name: None,
            offset: 2
        }
    ));
    assert!(matches!(
        pkl(b"\x80\x02(i__main__\nX\n."),
        TorchError::UnknownOpcode {
            name: Some("INST"),
            ..
        }
    ));
    assert!(matches!(
        pkl(b"\x80\x04\x8f."),
        TorchError::UnknownOpcode {
            name: Some("EMPTY_SET"),
            ..
        }
    ));
    assert!(matches!(
        pkl(b"\x80\x02X\x02\x00\x00\x00\xff\xfe."),
        TorchError::InvalidUtf8 { offset: 2 }
    ));
    assert!(matches!(
        pkl(b"\x80\x02X\xff\xff\xff\xff"),
        TorchError::Truncated { .. }
    ));
    assert!(matches!(
        pkl(b"\x80\x04\x8d\xff\xff\xff\xff\xff\xff\xff\xff"),
        TorchError::Truncated { .. }
    ));
    assert!(matches!(pkl(b"\x80\x02N"), TorchError::Truncated { .. }));
    assert!(matches!(
        pkl(b"\x80\x02a."),
        TorchError::MalformedPickle { .. }
    ));
    assert!(matches!(
        pkl(b"\x80\x02h\x05."),
        TorchError::MalformedPickle { .. }
    ));
    assert!(matches!(
        pkl(b"\x80\x02(."),
        TorchError::MalformedPickle { .. }
    ));
    assert!(matches!(
        pkl(b"\x80\x02K\x01a."),
        TorchError::MalformedPickle { .. }
    ));
    assert!(
        matches!(pkl(b"\x80\x02}N\x85b."), TorchError::MalformedPickle { .. }),
        "BUILD on a plain dict"
    );
    assert!(matches!(
        pkl(b"\x80\x02\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x80\x00."),
        TorchError::IntegerTooLarge { bytes: 9 }
    ));
    assert!(
        matches!(pkl(b"\x80\x02}(NK\x02u."), TorchError::UnsupportedValue(_)),
        "None as a key"
    );
    assert!(
        matches!(pkl(b"\x80\x06N."), TorchError::MalformedPickle { .. }),
        "protocol 6"
    );
    // A LONG1 with redundant sign bytes still fits.
    let v = from_bytes(checkpoint_with_pickle(
        b"\x80\x02\x8a\x0a\xfe\xff\xff\xff\xff\xff\xff\xff\xff\xff.",
        &[],
    ))
    .unwrap();
    assert_eq!(v, Value::Int(-2));

    // Zip-level errors: compressed, CRC, truncated, bogus directory.
    let good = to_bytes(&sample()).unwrap();
    let entries = read_entries(&good).unwrap();
    let cd = good.windows(4).position(|w| w == b"PK\x01\x02").unwrap();
    let mut deflated = good.clone();
    deflated[cd + 10] = 8;
    assert!(matches!(
        err(deflated),
        TorchError::Compressed { method: 8, .. }
    ));
    let mut flipped = good.clone();
    flipped[entries[5].start] ^= 1;
    assert!(
        matches!(err(flipped), TorchError::CrcMismatch { entry, .. } if entry == entries[5].name)
    );
    assert!(matches!(
        err(good[..good.len() - 30].to_vec()),
        TorchError::CorruptZip(_) | TorchError::Truncated { .. }
    ));
    let mut bogus_count = good.clone();
    let eocd = good.len() - 22;
    bogus_count[eocd - 56 - 20 + 24..eocd - 56 - 20 + 40].copy_from_slice(&[0xff; 16]);
    assert!(matches!(err(bogus_count), TorchError::CorruptZip(_)));
}

#[test]
fn hostile_structures_hit_limits_not_the_stack_or_memory() {
    let pkl = |p: Vec<u8>| from_bytes(checkpoint_with_pickle(&p, &[])).unwrap_err();
    // 100 000 nested tuples: refused by depth, dropped without recursion.
    let n = 100_000;
    let mut deep = b"\x80\x02".to_vec();
    deep.extend(std::iter::repeat_n(b'(', n));
    deep.push(b')');
    deep.extend(std::iter::repeat_n(b't', n));
    deep.push(b'.');
    assert!(matches!(pkl(deep), TorchError::LimitExceeded { .. }));
    // A list that contains itself.
    assert!(matches!(
        pkl(b"\x80\x02]q\x00h\x00a.".to_vec()),
        TorchError::LimitExceeded { .. }
    ));
    // A memo bomb: list k+1 holds list k twice, 60 levels: 2^60 nodes in 600 bytes.
    let mut bomb = b"\x80\x02]q\x00".to_vec();
    for i in 0..60u8 {
        bomb.extend_from_slice(&[b'(', b'h', i, b'h', i, b'l', b'q', i + 1]);
    }
    bomb.push(b'.');
    assert!(matches!(pkl(bomb), TorchError::LimitExceeded { .. }));
    // A big string repeated through the memo.
    let mut strings = b"\x80\x02X\x00\x00\x04\x00".to_vec();
    strings.extend(std::iter::repeat_n(b'a', 1 << 18));
    strings.extend_from_slice(b"q\x00(");
    strings.extend(std::iter::repeat_n(&b"h\x00"[..], 1000).flatten());
    strings.extend_from_slice(b"l.");
    assert!(matches!(pkl(strings), TorchError::LimitExceeded { .. }));
}

/// xorshift64: deterministic pseudo-random numbers.
fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut state = seed;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

fn corrupt(bytes: &mut [u8], range: std::ops::Range<usize>, next: &mut impl FnMut() -> u64) {
    for _ in 0..1 + next() % 4 {
        let i = range.start + (next() % (range.end - range.start) as u64) as usize;
        bytes[i] = match next() % 4 {
            0 => 0xff,
            1 => 0,
            _ => next() as u8,
        };
    }
}

/// Whatever loads must be usable: every tensor materializes.
fn touch(value: &Value) {
    for (_, t) in value.tensors() {
        assert_eq!(t.contiguous_bytes().len(), t.numel() * t.dtype().size());
        assert_eq!(t.to_f64_vec().len(), t.numel());
    }
}

#[test]
fn random_corruption_never_panics() {
    let mut next = rng(0x9E37_79B9_7F4A_7C15);
    let written = to_bytes(&sample()).unwrap();
    let mut zip64 = Vec::new();
    write_archive(&mut zip64, &pickle(&sample()).unwrap(), 0).unwrap();
    let mut loaded = 0;
    for base in [&written[..], &zip64, GPT2_FIXTURE, LEGACY_FIXTURE] {
        // Raw corruption (zip structure, or anything in the legacy stream) and truncation.
        for _ in 0..1500 {
            let mut b = base.to_vec();
            let len = b.len();
            corrupt(&mut b, 0..len, &mut next);
            if let Ok(v) = from_bytes(b) {
                loaded += 1;
                touch(&v);
            }
            let cut = (next() % base.len() as u64) as usize;
            assert!(
                from_bytes(base[..cut].to_vec()).is_err(),
                "truncated at {cut}"
            );
        }
    }
    // The pickle itself, behind a valid CRC: rebuild the archive around a corrupted data.pkl.
    for base in [&written[..], GPT2_FIXTURE] {
        let records = records_of(base);
        for round in 0..1000 {
            let mut pkl = records[0].1.clone();
            assert!(records[0].0.ends_with("data.pkl"));
            if round % 3 == 0 {
                pkl.truncate((next() % pkl.len() as u64) as usize);
            } else {
                let len = pkl.len();
                corrupt(&mut pkl, 2..len, &mut next);
            }
            let mut list: Vec<(&str, &[u8])> =
                records.iter().map(|(n, d)| (n.as_str(), &d[..])).collect();
            list[0].1 = &pkl;
            if let Ok(v) = from_bytes(zip_of(&list)) {
                loaded += 1;
                touch(&v);
            }
        }
    }
    assert!(
        loaded > 0,
        "some corruptions (of tensor data or unused bytes) still load"
    );
}

#[test]
fn legacy_and_zip_files_agree_after_a_rewrite() {
    // Re-saving a legacy file writes the zip format with the same contents and sharing.
    let legacy = from_bytes(LEGACY_FIXTURE.to_vec()).unwrap();
    let rewritten = from_bytes(to_bytes(&legacy).unwrap()).unwrap();
    assert_eq!(rewritten, legacy);
    let t = |v: &Value, k: &str| v.get(k).and_then(Value::as_tensor).unwrap().clone();
    assert!(
        t(&rewritten, "w")
            .storage()
            .same(t(&rewritten, "w_t").storage())
    );
    assert!(t(&legacy, "w").storage().same(t(&legacy, "row").storage()));
}

/// A Python with torch: `KILN_TORCH_PYTHON`, else `python3` if it imports torch.
pub(super) fn torch_python() -> Option<String> {
    if let Ok(python) = std::env::var("KILN_TORCH_PYTHON") {
        return Some(python);
    }
    let ok = Command::new("python3")
        .args(["-c", "import torch"])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then(|| "python3".to_owned())
}

fn check_script() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/check_torch_export.py")
}

#[test]
fn torch_loads_archives_with_zip64_fields() {
    // Files over 4 GiB are not made in tests: the ZIP64 fields are forced on a small file, and
    // real PyTorch must read it as it reads the plain one.
    let value = sample();
    let pickled = pickle(&value).unwrap();
    let mut files = HashMap::new();
    for zip64_at in [u64::from(u32::MAX), 200, 0] {
        let mut bytes = Vec::new();
        write_archive(&mut bytes, &pickled, zip64_at).unwrap();
        assert_eq!(
            from_bytes(bytes.clone()).unwrap(),
            value,
            "zip64 threshold {zip64_at}"
        );
        files.insert(zip64_at, bytes);
    }
    let Some(python) = torch_python() else {
        eprintln!(
            "torch_loads_archives_with_zip64_fields: no Python with torch (set KILN_TORCH_PYTHON); checked the Rust reader only"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut outputs = Vec::new();
    for (zip64_at, bytes) in &files {
        let path = dir.path().join(format!("zip64_{zip64_at}.pt"));
        std::fs::write(&path, bytes).unwrap();
        let mut cmd = Command::new(&python);
        cmd.arg(check_script()).arg(&path);
        if *zip64_at != u64::from(u32::MAX) {
            // PyTorch's offset arithmetic assumes ZIP64 only past 4 GiB, as its writer does.
            cmd.arg("--no-offset-arithmetic");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "torch rejects {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        outputs.push(out.stdout);
    }
    assert!(
        outputs.windows(2).all(|w| w[0] == w[1]),
        "torch sees the same contents in every file"
    );
}

#[test]
fn plain_pickles_read_without_a_checkpoint_around_them() {
    // Python's `pickle.dumps({'vocab_size': 2, 'itos': {0: 'a', 1: '\n'}, 'stoi': {'a': 0,
    // '\n': 1}}, protocol=4)`: nanoGPT's meta.pkl, in small.
    let bytes: [u8; 73] = [
        128, 4, 149, 62, 0, 0, 0, 0, 0, 0, 0, 125, 148, 40, 140, 10, 118, 111, 99, 97, 98, 95, 115,
        105, 122, 101, 148, 75, 2, 140, 4, 105, 116, 111, 115, 148, 125, 148, 40, 75, 0, 140, 1,
        97, 148, 75, 1, 140, 1, 10, 148, 117, 140, 4, 115, 116, 111, 105, 148, 125, 148, 40, 104,
        4, 75, 0, 104, 5, 75, 1, 117, 117, 46,
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.pkl");
    std::fs::write(&path, bytes).unwrap();
    let meta = load_pickle(&path).unwrap();
    assert_eq!(meta.get("vocab_size").and_then(Value::as_int), Some(2));
    let itos = meta.get("itos").unwrap();
    assert_eq!(itos.get(0i64).and_then(Value::as_str), Some("a"));
    assert_eq!(itos.get(1i64).and_then(Value::as_str), Some("\n"));
    assert_eq!(
        meta.get("stoi")
            .and_then(|s| s.get("\n"))
            .and_then(Value::as_int),
        Some(1)
    );
    // A truncated pickle is an error naming the file.
    std::fs::write(&path, &bytes[..40]).unwrap();
    let err = load_pickle(&path).unwrap_err().to_string();
    assert!(err.contains("meta.pkl"), "{err}");
}
