//! ONNX files written by `kiln_gguf::onnx` against the real `onnx` checker and onnxruntime.
//!
//! For random GPT-2-style and Llama-style models (`examples/onnx_random.rs`: learned positions,
//! LayerNorm, tanh GELU, tied head; RoPE with interleaved and half-split pairs, RMSNorm, SwiGLU,
//! grouped-query attention, Qwen2's qkv bias) `scripts/check_onnx_export.py` runs
//! `onnx.checker.check_model(full_check=True)`, compares onnxruntime's logits with an
//! independent float64 NumPy forward pass (tolerance 1e-4), and decodes greedily through the
//! KV cache against full reruns and the NumPy tokens, and a left-padded batch against unpadded
//! rows. It needs a Python with `onnx`, `onnxruntime` and `numpy` (`KILN_ONNX_PYTHON`, or
//! `python3` if it imports them); without one the test says so on stderr and passes, unless `KILN_REQUIRE_PYTHON=1` (CI).

use std::path::Path;
use std::process::Command;

#[allow(dead_code)]
#[path = "../examples/onnx_random.rs"]
mod onnx_random;

/// A Python with onnx and onnxruntime: `KILN_ONNX_PYTHON`, else `python3` if it imports them.
fn onnx_python() -> Option<String> {
    if let Ok(python) = std::env::var("KILN_ONNX_PYTHON") {
        return Some(python);
    }
    let ok = Command::new("python3")
        .args(["-c", "import onnx, onnxruntime, numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then(|| "python3".to_owned())
}

#[test]
fn onnxruntime_matches_a_numpy_reference_and_decodes_through_the_cache() {
    let Some(python) = onnx_python() else {
        assert!(
            std::env::var("KILN_REQUIRE_PYTHON").as_deref() != Ok("1"),
            "a Python with onnx and onnxruntime is required (KILN_REQUIRE_PYTHON=1)"
        );
        eprintln!(
            "onnxruntime_matches_a_numpy_reference: no Python with onnx and onnxruntime (set \
             KILN_ONNX_PYTHON or pip install onnx onnxruntime numpy); not checked"
        );
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/check_onnx_export.py");
    let dir = tempfile::tempdir().unwrap();
    for arch in ["gpt2", "nanogpt", "llama", "llama-half", "qwen2"] {
        let out = dir.path().join(arch);
        onnx_random::write_random_model(arch, &out, true).unwrap();
        for (file, kv) in [("model.onnx", false), ("model_kv.onnx", true)] {
            let mut cmd = Command::new(&python);
            cmd.arg(&script)
                .arg(out.join(file))
                .arg("--numpy-model")
                .arg(&out)
                .args(["--steps", "8", "--threads", "1"]);
            if kv {
                cmd.arg("--kv-cache");
            }
            let result = cmd.output().unwrap();
            let stdout = String::from_utf8_lossy(&result.stdout);
            assert!(
                result.status.success(),
                "{arch} {file}:\n{stdout}\n{}",
                String::from_utf8_lossy(&result.stderr)
            );
            assert!(stdout.contains("PASS"), "{arch} {file}:\n{stdout}");
        }
    }
}
