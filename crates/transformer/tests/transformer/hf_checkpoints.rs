//! Hugging Face checkpoints (GPT-2 and Llama names and layouts) against an independent numpy
//! implementation of the same models (`tests/python/hf_reference.py`, run here through python3).

use std::path::Path;
use std::process::Command;

use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use kiln_transformer::load_model;

type B = Flex;

fn python_ready() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import numpy, safetensors"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("KILN_REQUIRE_PYTHON").as_deref() != Ok("1"),
            "python3 with numpy and safetensors is required (KILN_REQUIRE_PYTHON=1)"
        );
        eprintln!("note: python3 with numpy + safetensors not found; skipping");
    }
    ok
}

fn check(arch: &str) {
    if !python_ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/hf_reference.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(dir.path())
        .arg(arch)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("expected.json")).unwrap())
            .unwrap();
    let ids: Vec<i64> = expected["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    let want: Vec<f32> = expected["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();

    let device = Default::default();
    let loaded = load_model::<B>(dir.path(), &device).unwrap();
    assert_eq!(loaded.model.config().architecture, arch);
    let n = ids.len();
    let input = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, n]), &device);
    let got: Vec<f32> = loaded
        .model
        .forward(input)
        .unwrap()
        .into_data()
        .to_vec()
        .unwrap();
    assert_eq!(got.len(), want.len());
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "{arch}: largest logit difference {worst}");
}

#[test]
fn gpt2_checkpoint_matches_numpy_reference() {
    check("gpt2");
}

#[test]
fn llama_checkpoint_matches_numpy_reference() {
    check("llama");
}
