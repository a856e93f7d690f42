//! Unit tests of the reader and writer on hand-assembled and real files.

use super::*;
use crate::value::*;
use std::path::Path;

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
        ("f.q2_k", vec![256], GgmlType::Q2_K, ramp(84)),
        ("g.q3_k", vec![256], GgmlType::Q3_K, ramp(110)),
        ("h.q4_k", vec![256], GgmlType::Q4_K, ramp(144)),
        ("i.q5_k", vec![256], GgmlType::Q5_K, ramp(176)),
        ("j.q6_k", vec![256], GgmlType::Q6_K, ramp(210)),
        ("k.q8_k", vec![256], GgmlType::Q8_K, ramp(292)),
        ("l.iq4_nl", vec![32, 2], GgmlType::IQ4_NL, ramp(36)),
        ("m.iq4_xs", vec![256], GgmlType::IQ4_XS, ramp(136)),
        ("n.iq2_xxs", vec![256], GgmlType::IQ2_XXS, ramp(66)),
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
        // Every tensor of a decodable type decodes; the others are a typed error.
        let decoded = blocks::dequantize_to_vec(ty, f.tensor_data(t), t.n_elements() as usize);
        match decoded {
            Ok(v) => assert_eq!(v.len() as u64, t.n_elements(), "{name}"),
            Err(e) => {
                assert!(!blocks::DECODABLE.contains(&ty), "{name}: {e}");
                assert!(
                    matches!(e, blocks::BlockError::Unsupported { .. }),
                    "{name}: {e}"
                );
            }
        }
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
                let data = f.tensor_data(t);
                assert_eq!(data.len() as u64, t.byte_size().unwrap());
                // Decoding whatever the corrupted header now says never panics either: a
                // decodable type with a consistent shape decodes, anything else is an error.
                if let Ok(n) = usize::try_from(t.n_elements()) {
                    let decoded = blocks::dequantize_to_vec(t.ty, data, n);
                    assert_eq!(
                        decoded.is_ok(),
                        blocks::DECODABLE.contains(&t.ty),
                        "{}",
                        t.ty
                    );
                }
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
    assert!(matches!(GgufFile::open(&missing), Err(GgufError::Io { path, .. }) if path == missing));
    let empty = dir.path().join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    assert!(matches!(
        GgufFile::open(&empty),
        Err(GgufError::Truncated { offset: 0, .. })
    ));
    // Missing directories are created; a file where a directory should be is an error.
    let nested = dir.path().join("new_dir").join("x.gguf");
    GgufWriter::new().write(&nested).unwrap();
    assert!(GgufFile::open(&nested).is_ok());
    let under_a_file = empty.join("x.gguf");
    assert!(matches!(
        GgufWriter::new().write(&under_a_file),
        Err(GgufError::Io { path, .. }) if path == under_a_file
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

#[test]
fn quantized_tensors_round_trip_through_a_file() {
    // Two rows of 512: every encodable type, reference and importance-weighted, written by the
    // writer, read back and decoded, equals decoding the encoder's bytes directly.
    let x: Vec<f32> = (0..1024)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
        .collect();
    let w: Vec<f32> = (0..512).map(|i| 1.0 + (i % 5) as f32).collect();
    let mut writer = GgufWriter::new();
    let mut expected = Vec::new();
    for ty in blocks::ENCODABLE {
        for (suffix, importance) in [("rtn", None), ("imatrix", Some(&w[..]))] {
            let bytes = blocks::quantize_weighted(ty, &x, 512, importance).unwrap();
            let name = format!("{}.{suffix}", ty.name());
            writer
                .add_tensor(name.clone(), &[512, 2], ty, bytes.clone())
                .unwrap();
            expected.push((
                name,
                ty,
                blocks::dequantize_to_vec(ty, &bytes, 1024).unwrap(),
            ));
        }
    }
    let f = GgufFile::from_bytes(writer.to_bytes()).unwrap();
    for (name, ty, values) in expected {
        let t = f.tensor(&name).unwrap();
        assert_eq!(t.ty, ty);
        let mut out = vec![0.0f32; 1024];
        blocks::dequantize(t.ty, f.tensor_data(t), &mut out).unwrap();
        assert_eq!(out, values, "{name}");
    }
}
