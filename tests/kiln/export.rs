//! `kiln export onnx`: onnxruntime runs the file and gives Kiln's logits (within 1e-4 of the
//! largest logit) for a
//! GPT-2-style and a Llama-style model (grouped-query attention, RoPE, SwiGLU), a Qwen2 GGUF (Q/K/V
//! biases) and SmolLM2-135M, and with `--kv-cache` its greedy decoding through past/present key-values gives
//! Kiln's tokens (`scripts/check_onnx_export.py`, which also runs `onnx.checker`).
//!
//! Needs a Python with `onnx`, `onnxruntime` and `numpy` (`KILN_ONNX_PYTHON`, or `python3` if it
//! imports them; required when `KILN_REQUIRE_PYTHON=1`).

use crate::common;

use std::path::Path;
use std::process::Command;

use burn::backend::Flex;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use kiln::transformer::{
    MlpKind, ModelConfig, NormKind, PositionEncoding, RopePairing, Transformer, load_model,
    save_model_dir,
};

type B = Flex;

fn onnx_python() -> Option<String> {
    if let Ok(python) = std::env::var("KILN_ONNX_PYTHON") {
        return Some(python);
    }
    common::python_has("onnxruntime").then(|| "python3".to_owned())
}

/// Kiln's logits for `ids` (`[batch, seq]`) and its greedy continuation of the first row.
fn reference(model: &Transformer<B>, ids: &[Vec<i64>], steps: usize) -> serde_json::Value {
    let device = Default::default();
    let (batch, seq) = (ids.len(), ids[0].len());
    let flat: Vec<i64> = ids.concat();
    let input = Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [batch, seq]), &device);
    let logits: Vec<f32> = model
        .forward(input)
        .unwrap()
        .into_data()
        .convert::<f32>()
        .into_vec()
        .unwrap();
    let mut row = ids[0].clone();
    let mut greedy = Vec::new();
    for _ in 0..steps {
        let n = row.len();
        let input = Tensor::<B, 2, Int>::from_data(TensorData::new(row.clone(), [1, n]), &device);
        let last: Vec<f32> = model
            .forward(input)
            .unwrap()
            .slice([0..1, n - 1..n])
            .into_data()
            .convert::<f32>()
            .into_vec()
            .unwrap();
        let next = last
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as i64)
            .unwrap();
        greedy.push(next);
        row.push(next);
    }
    serde_json::json!({"input_ids": ids, "logits": logits, "greedy_ids": greedy})
}

/// Exports `model_path` with the CLI and checks the file against Kiln's numbers: logits within
/// 1e-4 of the largest logit's magnitude (at least 1e-4 absolute), the same greedy tokens.
fn check(python: &str, model_path: &Path, model: &Transformer<B>, dir: &Path) {
    let vocab = model.config().vocab_size as i64;
    let ids: Vec<Vec<i64>> = (0..2)
        .map(|r| (0..7).map(|i| (i * 37 + r * 11 + 3) % vocab).collect())
        .collect();
    let reference_path = dir.join("reference.json");
    let reference = reference(model, &ids, 8);
    let largest = reference["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap().abs())
        .fold(1.0, f64::max);
    let tol = 1e-4 * largest;
    std::fs::write(&reference_path, reference.to_string()).unwrap();
    let onnx = dir.join("model.onnx");
    common::run_kiln(&[
        "export",
        "onnx",
        "--model",
        model_path.to_str().unwrap(),
        "--output",
        onnx.to_str().unwrap(),
        "--kv-cache",
    ]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/check_onnx_export.py");
    let out = Command::new(python)
        .arg(&script)
        .arg(&onnx)
        .args(["--reference", reference_path.to_str().unwrap()])
        .args(["--kv-cache", "--steps", "8", "--tol", &tol.to_string()])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{}: {text}", model_path.display());
    assert!(text.contains("greedy"), "{text}");
    eprintln!("{}:\n{text}", model_path.display());
}

fn random_model(config: ModelConfig, dir: &Path) -> Transformer<B> {
    B::seed(&Default::default(), 5);
    let model = Transformer::<B>::new(config, &Default::default()).unwrap();
    save_model_dir(&model, None, None, dir).unwrap();
    // Reload, so that the reference runs on exactly the weights the export reads.
    load_model::<B>(dir, &Default::default()).unwrap().model
}

#[test]
fn onnxruntime_gives_kilns_logits_and_greedy_tokens() {
    let Some(python) = onnx_python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let gpt2 = ModelConfig {
        architecture: "gpt2".into(),
        vocab_size: 300,
        context_length: 32,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 4,
        d_model: 64,
        d_ff: 256,
        position: PositionEncoding::Learned,
        norm: NormKind::LayerNorm { eps: 1e-5 },
        mlp: MlpKind::GeluTanh,
        bias: true,
        qkv_bias: false,
        tied_embeddings: true,
        scale_embeddings: false,
        dropout: 0.0,
    };
    let llama = ModelConfig {
        architecture: "llama".into(),
        n_heads: 6,
        n_kv_heads: 2,
        d_model: 96,
        position: PositionEncoding::Rope {
            theta: 10_000.0,
            pairing: RopePairing::HalfSplit,
        },
        norm: NormKind::RmsNorm { eps: 1e-5 },
        mlp: MlpKind::SwiGlu,
        bias: false,
        tied_embeddings: false,
        ..gpt2.clone()
    };
    for (name, config) in [("gpt2", gpt2), ("llama", llama)] {
        let dir = tmp.path().join(name);
        let model_dir = dir.join("model");
        let model = random_model(config, &model_dir);
        check(&python, &model_dir, &model, &dir);
    }
    // Qwen2's Q/K/V biases (a GGUF fixture checked against llama.cpp).
    let qwen2 =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/transformer/tests/data/gguf/qwen2.gguf");
    let model = load_model::<B>(&qwen2, &Default::default()).unwrap().model;
    let dir = tmp.path().join("qwen2");
    std::fs::create_dir_all(&dir).unwrap();
    check(&python, &qwen2, &model, &dir);
    if let Some(gguf) = common::shared("models/SmolLM2-135M-Instruct.Q4_1.gguf") {
        let model = load_model::<B>(&gguf, &Default::default()).unwrap().model;
        let dir = tmp.path().join("smollm2");
        std::fs::create_dir_all(&dir).unwrap();
        check(&python, &gguf, &model, &dir);
    }
}
