//! The `torch` module against real PyTorch.
//!
//! - `fixtures/torch/` (written by `scripts/make_torch_fixtures.py` with real torch, see its
//!   docstring): a nanoGPT `ckpt.pt`, a Hugging Face GPT-2-style `pytorch_model.bin` with tied
//!   and viewed storages, every dtype, the legacy format and a protocol-4 pickle. `expected.json`
//!   holds what `torch.load` returned for each, in the encoding of
//!   `scripts/check_torch_export.py`; the Rust reader must give the same, through `load`,
//!   `load_mmap` and a rewrite by the Rust writer.
//! - What the Rust writer writes is loaded by real PyTorch (`torch.load(weights_only=True)`,
//!   with and without `mmap=True`) through `scripts/check_torch_export.py`, when a Python with
//!   torch is available (`KILN_TORCH_PYTHON`, or `python3` if it imports torch); otherwise the
//!   test says so on stderr and checks the Rust round trip only.

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_gguf::torch::{self, DType, Dict, Key, Storage, Tensor, Value};
use serde_json::{Value as Json, json};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch")
}

fn expected() -> Json {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn float(x: f64) -> Json {
    if x.is_nan() {
        json!("nan")
    } else if x.is_infinite() {
        json!(if x > 0.0 { "inf" } else { "-inf" })
    } else {
        json!(x)
    }
}

/// The summary `scripts/check_torch_export.py` makes of a loaded checkpoint, made in Rust.
#[derive(Default)]
struct Summarizer {
    storages: Vec<Storage>,
}

impl Summarizer {
    fn value(&mut self, v: &Value) -> Json {
        match v {
            Value::None => Json::Null,
            Value::Bool(b) => json!({ "bool": b }),
            Value::Int(i) => json!({ "int": i }),
            Value::Float(f) => json!({ "float": float(*f) }),
            Value::Str(s) => json!({ "str": s }),
            Value::Bytes(b) => {
                let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
                json!({ "bytes": hex })
            }
            Value::Tuple(items) => {
                json!({ "tuple": items.iter().map(|v| self.value(v)).collect::<Vec<_>>() })
            }
            Value::List(items) => {
                json!({ "list": items.iter().map(|v| self.value(v)).collect::<Vec<_>>() })
            }
            Value::Dict(d) => {
                let entries: Vec<Json> = d
                    .iter()
                    .map(|(k, v)| {
                        let key = match k {
                            Key::Str(s) => json!(s),
                            Key::Int(i) => json!(i),
                        };
                        json!([key, self.value(v)])
                    })
                    .collect();
                json!({ "dict": entries })
            }
            Value::Tensor(t) => json!({ "tensor": self.tensor(t) }),
        }
    }

    fn tensor(&mut self, t: &Tensor) -> Json {
        let storage = if t.storage().is_empty() {
            Json::Null
        } else {
            let id = match self.storages.iter().position(|s| s.same(t.storage())) {
                Some(id) => id,
                None => {
                    self.storages.push(t.storage().clone());
                    self.storages.len() - 1
                }
            };
            json!(id)
        };
        let values = t.to_f64_vec();
        let mut out = json!({
            "dtype": t.dtype().name(),
            "shape": t.shape(),
            "stride": t.stride(),
            "offset": t.storage_offset(),
            "storage": storage,
            "storage_bytes": t.storage().len(),
            "requires_grad": t.requires_grad(),
            "numel": t.numel(),
        });
        let obj = out.as_object_mut().unwrap();
        if values.len() <= 64 {
            obj.insert("values".into(), values.iter().map(|&v| float(v)).collect());
        } else {
            obj.insert(
                "head".into(),
                values[..16].iter().map(|&v| float(v)).collect(),
            );
            obj.insert("sum".into(), float(neumaier_sum(values.iter().copied())));
            obj.insert(
                "abs_sum".into(),
                float(neumaier_sum(values.iter().map(|v| v.abs()))),
            );
        }
        out
    }
}

fn summarize(v: &Value) -> Json {
    Summarizer::default().value(v)
}

/// Compensated summation (Python's `math.fsum` is exact; this is within an ulp or so).
fn neumaier_sum(values: impl Iterator<Item = f64>) -> f64 {
    let (mut sum, mut c) = (0.0f64, 0.0f64);
    for v in values {
        let t = sum + v;
        c += if sum.abs() >= v.abs() {
            (sum - t) + v
        } else {
            (v - t) + sum
        };
        sum = t;
    }
    sum + c
}

/// Asserts that two summaries agree: exactly, except floats within 2 ulp (serde_json's float
/// parsing is not always correctly rounded) and sums within a relative 1e-12.
fn assert_same(expected: &Json, actual: &Json, path: &str) {
    match (expected, actual) {
        (Json::Object(e), Json::Object(a)) => {
            let mut ek: Vec<_> = e.keys().collect();
            let mut ak: Vec<_> = a.keys().collect();
            ek.sort();
            ak.sort();
            assert_eq!(ek, ak, "keys at {path}");
            for (k, ev) in e {
                let p = format!("{path}.{k}");
                if (k == "sum" || k == "abs_sum")
                    && let (Some(x), Some(y)) = (ev.as_f64(), a[k].as_f64())
                {
                    assert!((x - y).abs() <= 1e-12 * x.abs().max(1.0), "{p}: {x} vs {y}");
                    continue;
                }
                assert_same(ev, &a[k], &p);
            }
        }
        (Json::Array(e), Json::Array(a)) => {
            assert_eq!(e.len(), a.len(), "length at {path}");
            for (i, (ev, av)) in e.iter().zip(a).enumerate() {
                assert_same(ev, av, &format!("{path}[{i}]"));
            }
        }
        (Json::Number(e), Json::Number(a)) => {
            match (e.as_i64(), a.as_i64(), e.as_u64(), a.as_u64()) {
                (Some(x), Some(y), ..) => assert_eq!(x, y, "at {path}"),
                (_, _, Some(x), Some(y)) => assert_eq!(x, y, "at {path}"),
                _ => {
                    let (x, y) = (e.as_f64().unwrap(), a.as_f64().unwrap());
                    assert!(
                        (x - y).abs() <= 2.0 * f64::EPSILON * x.abs(),
                        "at {path}: {x} vs {y}"
                    );
                }
            }
        }
        _ => assert_eq!(expected, actual, "at {path}"),
    }
}

fn fixture_names() -> Vec<String> {
    expected()["files"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

#[test]
fn the_reader_sees_what_torch_loaded() {
    let expected = expected();
    let files = expected["files"].as_object().unwrap();
    assert_eq!(files.len(), 5);
    for (name, want) in files {
        let path = fixtures().join(name);
        for (how, value) in [
            ("load", torch::load(&path)),
            ("load_mmap", torch::load_mmap(&path)),
            (
                "from_bytes",
                torch::from_bytes(std::fs::read(&path).unwrap()),
            ),
        ] {
            let value = value.unwrap_or_else(|e| panic!("{how}: {e}"));
            assert_same(
                &want["summary"],
                &summarize(&value),
                &format!("{name} ({how})"),
            );
        }
    }
}

#[test]
fn fixtures_survive_a_rewrite_by_the_writer() {
    for name in fixture_names() {
        let value = torch::load(fixtures().join(&name)).unwrap();
        let rewritten = torch::from_bytes(torch::to_bytes(&value).unwrap()).unwrap();
        assert_eq!(rewritten, value, "{name}");
        // Layout too: storages stay shared, views stay views.
        assert_eq!(summarize(&rewritten), summarize(&value), "{name}");
    }
}

fn tensor<'a>(v: &'a Value, key: &str) -> &'a Tensor {
    v.get(key)
        .and_then(Value::as_tensor)
        .unwrap_or_else(|| panic!("no tensor {key}"))
}

#[test]
fn nanogpt_checkpoint() {
    let ckpt = torch::load(fixtures().join("nanogpt/ckpt.pt")).unwrap();
    let keys: Vec<String> = ckpt
        .as_dict()
        .unwrap()
        .keys()
        .map(|k| k.to_string())
        .collect();
    assert_eq!(
        keys,
        [
            "model",
            "optimizer",
            "model_args",
            "iter_num",
            "best_val_loss",
            "config"
        ]
    );

    let model = ckpt.get("model").unwrap();
    let names: Vec<String> = model
        .as_dict()
        .unwrap()
        .keys()
        .map(|k| k.to_string())
        .collect();
    assert!(
        names.iter().all(|k| k.starts_with("_orig_mod.")),
        "{names:?}"
    );
    assert_eq!(names.len(), 17);
    let wte = tensor(model, "_orig_mod.transformer.wte.weight");
    let lm_head = tensor(model, "_orig_mod.lm_head.weight");
    assert!(
        wte.storage().same(lm_head.storage()),
        "tied weights share a storage"
    );
    assert_eq!((wte.dtype(), wte.shape()), (DType::F32, &[16, 8][..]));
    assert_eq!(
        tensor(model, "_orig_mod.transformer.h.0.attn.c_attn.weight").shape(),
        [24, 8]
    );

    let args = ckpt.get("model_args").unwrap();
    let int = |k: &str| args.get(k).and_then(Value::as_int).unwrap();
    assert_eq!(
        [
            int("n_layer"),
            int("n_head"),
            int("n_embd"),
            int("block_size"),
            int("vocab_size")
        ],
        [1, 2, 8, 8, 16]
    );
    assert_eq!(args.get("bias"), Some(&Value::Bool(true)));
    assert_eq!(args.get("dropout"), Some(&Value::Float(0.0)));
    assert_eq!(ckpt.get("iter_num"), Some(&Value::Int(250)));
    let loss = tensor(&ckpt, "best_val_loss");
    assert_eq!((loss.dtype(), loss.shape().len()), (DType::F32, 0));
    assert!(
        loss.to_f32_vec()[0] > 2.0,
        "cross-entropy of an untrained 16-token model"
    );
    let config = ckpt.get("config").unwrap();
    assert_eq!(
        config.get("dataset").and_then(Value::as_str),
        Some("shakespeare_char")
    );
    assert_eq!(config.get("compile"), Some(&Value::Bool(true)));
    assert_eq!(
        config.get("learning_rate").and_then(Value::as_float),
        Some(1e-3)
    );
    assert_eq!(config.as_dict().unwrap().len(), 33);

    // AdamW after one step: per-parameter state keyed by index, two parameter groups.
    let optimizer = ckpt.get("optimizer").unwrap();
    let groups = optimizer
        .get("param_groups")
        .and_then(Value::as_seq)
        .unwrap();
    assert_eq!(groups.len(), 2);
    assert_eq!(groups[0].get("weight_decay"), Some(&Value::Float(0.1)));
    assert_eq!(groups[1].get("weight_decay"), Some(&Value::Float(0.0)));
    assert_eq!(
        groups[0].get("betas"),
        Some(&Value::Tuple(vec![Value::Float(0.9), Value::Float(0.99)]))
    );
    let params: Vec<i64> = groups
        .iter()
        .flat_map(|g| g.get("params").and_then(Value::as_seq).unwrap())
        .map(|p| p.as_int().unwrap())
        .collect();
    assert_eq!(
        params,
        (0..16).collect::<Vec<_>>(),
        "16 parameters (lm_head is tied to wte)"
    );
    let state = optimizer.get("state").and_then(Value::as_dict).unwrap();
    assert_eq!(state.len(), 16);
    let model_shapes: Vec<&[usize]> = model
        .tensors()
        .into_iter()
        .map(|(_, t)| t.shape())
        .collect();
    for (key, s) in state.iter() {
        assert!(matches!(key, Key::Int(0..16)));
        assert_eq!(tensor(s, "step").to_f32_vec(), [1.0]);
        let (m, v) = (tensor(s, "exp_avg"), tensor(s, "exp_avg_sq"));
        assert_eq!(m.shape(), v.shape());
        assert!(model_shapes.contains(&m.shape()));
        assert!(v.to_f32_vec().iter().all(|&x| x >= 0.0));
    }
}

#[test]
fn gpt2_state_dict_with_shared_storages_and_views() {
    let sd = torch::load(fixtures().join("gpt2/pytorch_model.bin")).unwrap();
    let wte = tensor(&sd, "transformer.wte.weight");
    assert!(wte.storage().same(tensor(&sd, "lm_head.weight").storage()));
    assert_eq!(
        tensor(&sd, "transformer.h.0.attn.c_attn.weight").shape(),
        [8, 24],
        "Conv1D layout"
    );

    let wte_t = tensor(&sd, "extra.wte_t");
    assert!(wte_t.storage().same(wte.storage()) && !wte_t.is_contiguous());
    let (w, t) = (wte.to_vec::<f32>().unwrap(), wte_t.to_vec::<f32>().unwrap());
    for i in 0..16 {
        for j in 0..8 {
            assert_eq!(t[j * 16 + i], w[i * 8 + j]);
        }
    }
    let wpe = tensor(&sd, "transformer.wpe.weight")
        .to_vec::<f32>()
        .unwrap();
    let rows = tensor(&sd, "extra.wpe_rows");
    assert_eq!(
        (rows.storage_offset(), rows.to_vec::<f32>().unwrap()),
        (16, wpe[16..40].to_vec())
    );
    let strided = tensor(&sd, "extra.wpe_strided");
    assert_eq!(
        (strided.shape(), strided.stride()),
        (&[7, 3][..], &[8, 3][..])
    );
    let want: Vec<f32> = (1..8)
        .flat_map(|r| [0, 3, 6].map(|c| wpe[r * 8 + c]))
        .collect();
    assert_eq!(strided.to_vec::<f32>().unwrap(), want);

    let mask = tensor(&sd, "transformer.h.1.attn.bias");
    assert_eq!(
        (mask.dtype(), mask.shape()),
        (DType::Bool, &[1, 1, 8, 8][..])
    );
    let mask = mask.to_vec::<bool>().unwrap();
    assert!(
        (0..64).all(|k| mask[k] == (k % 8 <= k / 8)),
        "lower-triangular"
    );
    assert_eq!(
        tensor(&sd, "transformer.h.0.attn.masked_bias").to_f32_vec(),
        [-1e4]
    );
}

/// A Python with torch: `KILN_TORCH_PYTHON`, else `python3` if it imports torch.
fn torch_python() -> Option<String> {
    if let Ok(python) = std::env::var("KILN_TORCH_PYTHON") {
        return Some(python);
    }
    let ok = Command::new("python3")
        .args(["-c", "import torch"])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then(|| "python3".to_owned())
}

/// Values for torch to load: every dtype, views, sharing, every plain value kind.
fn written_values() -> Vec<(String, Value)> {
    let w = Tensor::from_slice(
        [3, 4],
        &(0..12).map(|i| i as f32 * 0.5 - 2.0).collect::<Vec<_>>(),
    )
    .unwrap();
    let s = w.storage().clone();
    let h: Vec<half::f16> = [1.0f32, -2.5, 65504.0, 6e-8]
        .map(half::f16::from_f32)
        .to_vec();
    let b: Vec<half::bf16> = [1.0f32, -3e38, 1e-38].map(half::bf16::from_f32).to_vec();
    let tensors: Dict = [
        ("w", Value::from(w)),
        (
            "w_t",
            Tensor::view(s.clone(), DType::F32, [4, 3], [1, 4], 0)
                .unwrap()
                .into(),
        ),
        (
            "col",
            Tensor::view(s.clone(), DType::F32, [3], [4], 1)
                .unwrap()
                .into(),
        ),
        (
            "broadcast",
            Tensor::view(s, DType::F32, [2, 3], [0, 1], 9)
                .unwrap()
                .into(),
        ),
        ("f16", Tensor::from_slice([2, 2], &h).unwrap().into()),
        ("bf16", Tensor::from_slice([3], &b).unwrap().into()),
        (
            "f64",
            Tensor::from_slice([2], &[std::f64::consts::E, f64::NEG_INFINITY])
                .unwrap()
                .into(),
        ),
        (
            "specials",
            Tensor::from_slice([3], &[f32::NAN, f32::INFINITY, -0.0])
                .unwrap()
                .into(),
        ),
        (
            "i64",
            Tensor::from_slice([2], &[i64::MIN, 1 << 40])
                .unwrap()
                .into(),
        ),
        (
            "i32",
            Tensor::from_slice([2], &[i32::MAX, -5]).unwrap().into(),
        ),
        ("i16", Tensor::from_slice([1], &[-7i16]).unwrap().into()),
        ("i8", Tensor::from_slice([2], &[-128i8, 3]).unwrap().into()),
        ("u8", Tensor::from_slice([2], &[200u8, 3]).unwrap().into()),
        (
            "bool",
            Tensor::from_slice([3], &[true, false, true])
                .unwrap()
                .into(),
        ),
        ("scalar", Tensor::from_slice([], &[-1.5f64]).unwrap().into()),
        (
            "empty",
            Tensor::new(DType::I64, [2, 0], Vec::new()).unwrap().into(),
        ),
        (
            "big",
            Tensor::from_slice(
                [10, 10],
                &(0..100).map(|i| i as f32 / 3.0).collect::<Vec<_>>(),
            )
            .unwrap()
            .into(),
        ),
        (
            "param",
            Tensor::from_slice([2], &[0.5f32, 1.0])
                .unwrap()
                .with_requires_grad(true)
                .into(),
        ),
    ]
    .into_iter()
    .collect();
    let state: Dict = [(0i64, Value::from("zero")), (-7, Value::List(vec![]))]
        .into_iter()
        .collect();
    let plain: Dict = [
        ("tensors", Value::Dict(tensors)),
        ("iter_num", 5000i64.into()),
        (
            "floats",
            Value::List(
                [0.1, -0.0, 1e300, f64::NAN, f64::INFINITY]
                    .map(Value::Float)
                    .to_vec(),
            ),
        ),
        (
            "ints",
            Value::List(
                [
                    0,
                    255,
                    256,
                    65536,
                    -1,
                    i64::from(i32::MIN) - 1,
                    i64::MIN,
                    i64::MAX,
                ]
                .map(Value::Int)
                .to_vec(),
            ),
        ),
        ("text", "nanoGPT \u{2713} \u{1d11e}".into()),
        ("bytes", Value::Bytes((0..=255).collect())),
        ("state", Value::Dict(state)),
        (
            "tuples",
            Value::Tuple(vec![
                Value::Tuple(vec![]),
                Value::Tuple(vec![Value::None; 5]),
                true.into(),
            ]),
        ),
        ("many", Value::List((0..2100i64).map(Value::Int).collect())),
    ]
    .into_iter()
    .collect();
    let mut values = vec![("plain.pt".to_owned(), Value::Dict(plain))];
    for name in fixture_names() {
        let value = torch::load(fixtures().join(&name)).unwrap();
        values.push((format!("resaved_{}", name.replace('/', "_")), value));
    }
    values
}

#[test]
fn torch_loads_what_kiln_writes() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for (name, value) in written_values() {
        let path = dir.path().join(&name);
        torch::save(&path, &value).unwrap();
        // (Summaries, not `==`: NaN floats are in there.)
        assert_same(
            &summarize(&value),
            &summarize(&torch::load(&path).unwrap()),
            &name,
        );
        assert_same(
            &summarize(&value),
            &summarize(&torch::load_mmap(&path).unwrap()),
            &name,
        );
        files.push((path, value));
    }
    let Some(python) = torch_python() else {
        eprintln!(
            "torch_loads_what_kiln_writes: no Python with torch (set KILN_TORCH_PYTHON or install \
             torch for python3); checked the Rust round trip only"
        );
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/check_torch_export.py");
    for (path, value) in files {
        let out = Command::new(&python)
            .arg(&script)
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "torch.load(weights_only=True) rejects {}:\n{}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let seen: Json = serde_json::from_slice(&out.stdout).unwrap();
        assert_same(&summarize(&value), &seen, &path.display().to_string());
    }
    eprintln!("torch_loads_what_kiln_writes: checked with {python}");
}
