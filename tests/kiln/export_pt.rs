//! PyTorch checkpoints through the CLI: `kiln export pt` writes a trained run in nanoGPT's
//! layout with its training metadata, `kiln train --init-from` fine-tunes from it, and
//! `kiln generate` runs nanoGPT's own checkpoints with their character vocabulary.
//!
//! With `KILN_TORCH_PYTHON` (a Python with torch) the exported file is also loaded by real
//! PyTorch (`weights_only=True`) into nanoGPT's `GPT` (model.py from `KILN_NANOGPT_DIR`, default
//! /tmp/nanogpt) strictly, and its logits checked against Kiln's within 1e-4
//! (`scripts/check_nanogpt_export.py`).

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use kiln::gguf::torch::{self, Value};
use kiln::transformer::load_model;

use common::run_kiln;

type B = Flex;

/// tiny.toml with nanoGPT's MLP (exact GELU), `overrides` appended at the top level.
fn config(dir: &Path, name: &str, overrides: &str) -> PathBuf {
    let tiny = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/configs/tiny.toml"),
    )
    .unwrap();
    let (top, model) = tiny.split_once("[model]").unwrap();
    let replaced = |line: &str| {
        overrides
            .lines()
            .filter_map(|o| o.split_once(" = "))
            .any(|(key, _)| line.starts_with(&format!("{key} = ")))
    };
    let kept: Vec<&str> = top.lines().filter(|l| !replaced(l)).collect();
    let text = format!(
        "{}\n{overrides}\n[model]{}",
        kept.join("\n"),
        model.replace("\"gelu_tanh\"", "\"gelu\"")
    );
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn logits_of(model_path: &Path, ids: &[i64]) -> Vec<f32> {
    let loaded = load_model::<B>(model_path, &Default::default()).unwrap();
    let input = Tensor::<B, 2, Int>::from_data(
        TensorData::new(ids.to_vec(), [1, ids.len()]),
        &Default::default(),
    );
    loaded
        .model
        .forward(input)
        .unwrap()
        .into_data()
        .to_vec()
        .unwrap()
}

fn max_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn export_pt_carries_weights_and_metadata_and_init_from_resumes_them() {
    let (dir, data, run) = common::tokenizer_and_shards();
    let p = |x: &Path| x.to_str().unwrap().to_owned();
    let train = config(dir.path(), "train.toml", "");
    run_kiln(&[
        "train",
        "--config",
        &p(&train),
        "--data",
        &p(&data),
        "--out",
        &p(&run),
        "--max-steps",
        "6",
    ]);
    let pt = dir.path().join("model.pt");
    run_kiln(&["export", "pt", "--model", &p(&run), "--output", &p(&pt)]);

    // The file: the trained weights under nanoGPT's names, and the run's metadata.
    let value = torch::load(&pt).unwrap();
    assert_eq!(value.get("iter_num").and_then(Value::as_int), Some(6));
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("checkpoints/step-6/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        value.get("best_val_loss").and_then(Value::as_float),
        state["val_loss"].as_f64()
    );
    let recorded = value.get("config").unwrap();
    assert_eq!(recorded.get("max_steps").and_then(Value::as_int), Some(6));
    assert_eq!(recorded.get("lr").and_then(Value::as_float), Some(3e-3));
    let ids: Vec<i64> = (0..24).map(|i| (i * 37 + 11) % 512).collect();
    let trained = logits_of(&run.join("checkpoints/step-6/model"), &ids);
    assert!(max_difference(&logits_of(&pt, &ids), &trained) < 1e-6);

    // A run directory stands for its newest checkpoint's model wherever a model is read:
    // `kiln quantize` makes a GPT-2 GGUF file of it with the trained logits (up to 8-bit
    // weights), and `kiln eval` scores it.
    let q8 = dir.path().join("model.q8_0.gguf");
    run_kiln(&[
        "quantize",
        "--model",
        &p(&run),
        "-t",
        "q8_0",
        "--output",
        &p(&q8),
    ]);
    let scale = trained.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let gap = max_difference(&logits_of(&q8, &ids), &trained);
    assert!(gap < 0.02 * scale, "q8_0 of the run: {gap} of {scale}");
    run_kiln(&["eval", "--model", &p(&run), "--data", &p(&data)]);

    if let Ok(python) = std::env::var("KILN_TORCH_PYTHON") {
        let reference = dir.path().join("reference.json");
        std::fs::write(
            &reference,
            serde_json::json!({"ids": ids, "logits": trained}).to_string(),
        )
        .unwrap();
        let nanogpt =
            std::env::var("KILN_NANOGPT_DIR").unwrap_or_else(|_| "/tmp/nanogpt".to_owned());
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/check_nanogpt_export.py");
        let out = Command::new(python)
            .arg(script)
            .arg(&pt)
            .args(["--reference", &p(&reference), "--nanogpt", &nanogpt])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "nanoGPT's GPT did not load the file or its logits differ: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("torch + nanoGPT: {}", String::from_utf8_lossy(&out.stdout));
    } else {
        eprintln!("note: KILN_TORCH_PYTHON unset; the real-PyTorch check is skipped");
    }

    // `--init-from` starts from the file's weights: one step at a learning rate of 1e-12 leaves
    // the model where the export left it (a random start would be far away).
    let still = config(
        dir.path(),
        "still.toml",
        "lr = 1e-12\nmin_lr = 0.0\nwarmup_steps = 0\nweight_decay = 0.0",
    );
    let tuned = dir.path().join("tuned");
    run_kiln(&[
        "train",
        "--config",
        &p(&still),
        "--data",
        &p(&data),
        "--out",
        &p(&tuned),
        "--init-from",
        &p(&pt),
        "--max-steps",
        "1",
    ]);
    let after = logits_of(&tuned.join("checkpoints/step-1/model"), &ids);
    let moved = max_difference(&after, &trained);
    assert!(
        moved < 1e-4,
        "the fine-tuning run did not start from the file ({moved})"
    );
    // The structure came from the file; the tokenizer from beside the data.
    let saved = std::fs::read_to_string(tuned.join("config.toml")).unwrap();
    assert!(
        saved.contains("init_from") && saved.contains("mlp = \"gelu\""),
        "{saved}"
    );
    assert!(
        tuned
            .join("checkpoints/step-1/model/tokenizer.json")
            .exists()
    );
}

#[test]
fn nanogpt_checkpoints_generate_and_fine_tune_with_their_character_vocabulary() {
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/transformer/tests/data/pt/nanogpt");
    let ckpt = fixture.join("ckpt.pt");
    let p = |x: &Path| x.to_str().unwrap().to_owned();
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "generate",
            "--model",
            &p(&ckpt),
            "--prompt",
            "the ",
            "--max-tokens",
            "8",
        ])
        .args(["--temperature", "0"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Eight characters, each from the vocabulary.
    let text = String::from_utf8(out.stdout).unwrap();
    let vocab = "the cat sat.\nthé mat";
    let generated = text.trim_end_matches('\n');
    assert!(
        !generated.is_empty() && generated.chars().all(|c| vocab.contains(c)),
        "{text:?}"
    );

    // Shards tokenized with meta.pkl, then a fine-tuning run from the checkpoint.
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.txt");
    std::fs::write(
        &corpus,
        "the cat sat. the mat.\nthé cat sat the mat.\n".repeat(200),
    )
    .unwrap();
    let data = dir.path().join("data");
    run_kiln(&[
        "data",
        "prepare",
        "-t",
        &p(&fixture.join("meta.pkl")),
        "-o",
        &p(&data),
        &p(&corpus),
    ]);
    let cfg = dir.path().join("tune.toml");
    std::fs::write(
        &cfg,
        "max_steps = 3\nmicro_batch = 4\nseq_len = 32\nlr = 1e-3\nmin_lr = 1e-4\n\
         warmup_steps = 1\neval_interval = 0\neval_batches = 4\ncheckpoint_interval = 0\n",
    )
    .unwrap();
    let run = dir.path().join("run");
    run_kiln(&[
        "train",
        "--config",
        &p(&cfg),
        "--data",
        &p(&data),
        "--out",
        &p(&run),
        "--init-from",
        &p(&ckpt),
    ]);
    let tuned = run.join("checkpoints/step-3/model");
    let loaded = load_model::<B>(&tuned, &Default::default()).unwrap();
    assert_eq!(loaded.model.config().d_model, 16);
    // The character vocabulary travelled with the run (tokenizer.json beside the weights).
    let tokenizer = loaded
        .tokenizer
        .expect("tokenizer saved with the checkpoint");
    assert_eq!(tokenizer.encode("thé"), [9, 6, 10]);
}
