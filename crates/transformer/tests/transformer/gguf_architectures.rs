//! The Llama family's other GGUF layouts — `qwen2` (Q/K/V biases), `phi3` (fused projections, a
//! sliding window), Mistral (written as `llama`, SentencePiece vocabulary) and `gemma` (GeGLU,
//! scaled embeddings) — made by the `gguf` Python package with random weights
//! (`scripts/make_gguf_arch_fixtures.py`), against a numpy forward pass that llama.cpp itself
//! agreed with when the fixtures were made (to 4e-6; Gemma to 1.3e-3, ggml's GELU being an f16
//! table).

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use kiln_gguf::blocks::{dequantize_to_vec, quantize};
use kiln_gguf::{GgmlType, GgufFile, GgufWriter};
use kiln_transformer::{
    ModelError, Transformer, load_gguf, load_gguf_quantized, load_model, save_onnx,
};

type B = Flex;

const ARCHITECTURES: [&str; 4] = ["qwen2", "phi3", "mistral", "gemma"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/gguf")
        .join(name)
}

fn expected(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture("expected.json")).unwrap();
    serde_json::from_str::<serde_json::Value>(&text).unwrap()[name].clone()
}

fn ids_of(e: &serde_json::Value) -> Vec<i64> {
    e["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect()
}

fn logits(model: &Transformer<B>, ids: &[i64]) -> Vec<f32> {
    let input = Tensor::<B, 2, Int>::from_data(
        TensorData::new(ids.to_vec(), [1, ids.len()]),
        &Default::default(),
    );
    model.forward(input).unwrap().into_data().to_vec().unwrap()
}

fn argmax_rows(values: &[f32], vocab: usize) -> Vec<usize> {
    values
        .chunks_exact(vocab)
        .map(|row| {
            row.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0
        })
        .collect()
}

#[test]
fn each_architecture_gives_the_reference_logits() {
    for name in ARCHITECTURES {
        let e = expected(name);
        let loaded = load_gguf::<B>(fixture(&format!("{name}.gguf")), &Default::default()).unwrap();
        let config = loaded.model.config();
        assert_eq!(
            config.context_length as u64,
            e["context_length"].as_u64().unwrap(),
            "{name}: a sliding window bounds the context"
        );
        assert_eq!(config.qkv_bias, name == "qwen2", "{name}");
        let want: Vec<f32> = e["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let got = logits(&loaded.model, &ids_of(&e));
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(worst < 1e-4, "{name}: largest logit difference {worst}");
        // The file's tokenizer (byte-level BPE with qwen2's pre-tokenizer, or SentencePiece).
        let tokenizer = loaded.tokenizer.unwrap();
        let text = "the cat ünï\n";
        assert_eq!(
            tokenizer.decode(&tokenizer.encode(text)).unwrap(),
            text,
            "{name}"
        );
    }
}

/// `source` rewritten with each matrix stored as `choose(row length)` says (`None`: as it is).
pub(crate) fn requantized(source: &Path, out: &Path, choose: impl Fn(u64) -> Option<GgmlType>) {
    let file = GgufFile::open(source).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in &file.metadata {
        w.add_metadata(k.clone(), v.clone()).unwrap();
    }
    for t in &file.tensors {
        let data = file.tensor_data(t);
        let n = t.n_elements() as usize;
        let (to, bytes) = match t.dims[..] {
            [cols, _] if let Some(to) = choose(cols) => {
                let values = dequantize_to_vec(t.ty, data, n).unwrap();
                (to, quantize(to, &values).unwrap())
            }
            _ => (t.ty, data.to_vec()),
        };
        w.add_tensor(t.name.clone(), &t.dims, to, bytes).unwrap();
    }
    w.write(out).unwrap();
}

#[test]
fn quantized_files_run_from_their_blocks_like_their_f32_weights() {
    let dir = tempfile::tempdir().unwrap();
    // Q8_0 read in place, Q5_0 from its own kernels.
    for (name, ty) in ARCHITECTURES
        .into_iter()
        .flat_map(|name| [GgmlType::Q8_0, GgmlType::Q5_0].map(|ty| (name, ty)))
    {
        let e = expected(name);
        let (ids, vocab) = (ids_of(&e), e["vocab"].as_u64().unwrap() as usize);
        let path = dir.path().join(format!("{name}.{ty}.gguf"));
        // Every matrix whose rows are whole 32-value blocks.
        requantized(&fixture(&format!("{name}.gguf")), &path, |cols| {
            cols.is_multiple_of(32).then_some(ty)
        });
        let device = Default::default();
        let reference = logits(&load_gguf::<B>(&path, &device).unwrap().model, &ids);
        let native = load_gguf_quantized::<B>(&path, &device).unwrap();
        assert!(
            native.model.tied_head_kernel.is_some() || native.model.lm_head.is_some(),
            "{name} {ty}"
        );
        let got = logits(&native.model, &ids);
        // The kernels round activations to 8 bits: close, and the same choices.
        let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = got
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            worst < 0.03 * scale,
            "{name} {ty}: {worst} against logits up to {scale}"
        );
        let (a, b) = (argmax_rows(&got, vocab), argmax_rows(&reference, vocab));
        let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
        assert!(same + 1 >= a.len(), "{name} {ty}: top-1 {same}/{}", a.len());
    }
}

#[test]
fn qwen2_exports_to_onnx_with_its_biases_and_unknown_architectures_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let device = Default::default();
    let qwen2 = load_model::<B>(fixture("qwen2.gguf"), &device).unwrap();
    save_onnx(&qwen2.model, &dir.path().join("qwen2.onnx"), false).unwrap();
    assert!(
        std::fs::metadata(dir.path().join("qwen2.onnx"))
            .unwrap()
            .len()
            > 80_000
    );

    // Gemma's GeGLU has no ONNX graph here: refused, not written wrong.
    let gemma = load_model::<B>(fixture("gemma.gguf"), &device).unwrap();
    let path = dir.path().join("gemma.onnx");
    let err = save_onnx(&gemma.model, &path, false).unwrap_err();
    assert!(matches!(err, ModelError::Unsupported(_)), "{err}");
    assert!(!path.exists());

    // The same file claiming an architecture Kiln does not run.
    let file = GgufFile::open(fixture("qwen2.gguf")).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in &file.metadata {
        let v = if k == "general.architecture" {
            kiln_gguf::GgufValue::String("gemma2".into())
        } else {
            v.clone()
        };
        w.add_metadata(k.replace("qwen2.", "gemma2."), v).unwrap();
    }
    for t in &file.tensors {
        w.add_tensor(t.name.clone(), &t.dims, t.ty, file.tensor_data(t).to_vec())
            .unwrap();
    }
    let path = dir.path().join("gemma2.gguf");
    w.write(&path).unwrap();
    let err = load_model::<B>(&path, &device).unwrap_err();
    assert!(
        matches!(&err, ModelError::UnknownArchitecture { name, .. } if name == "gemma2"),
        "{err}"
    );
    assert!(err.to_string().contains("qwen2, phi3, gemma"), "{err}");
}
