//! The `kiln` command line as other tools use it: the contract in its `--help`.

use crate::common;

use common::{TEXT, shared, tokenizer_and_shards};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn kiln(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kiln runs");
    // A command that fails before reading its input closes the pipe early: that is not an error here.
    let _ = child.stdin.take().unwrap().write_all(stdin);
    child.wait_with_output().unwrap()
}

fn ok(out: &Output) -> &[u8] {
    assert!(
        out.status.success(),
        "kiln failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    &out.stdout
}

#[test]
fn train_encode_decode_prepare() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.txt");
    std::fs::write(&corpus, TEXT.repeat(50)).unwrap();
    let tok = dir.path().join("tokenizer.json");
    let t = tok.to_str().unwrap();
    ok(&kiln(
        &[
            "tokenizer",
            "train",
            "--vocab-size",
            "300",
            "--special",
            "<|endoftext|>",
            "--special",
            "<|pad|>",
            "--output",
            t,
            corpus.to_str().unwrap(),
        ],
        b"",
    ));
    let ids = String::from_utf8(
        ok(&kiln(
            &["tokenizer", "encode", "--tokenizer", t],
            TEXT.as_bytes(),
        ))
        .to_vec(),
    )
    .unwrap();
    assert!(
        ids.trim().split(' ').all(|w| w.parse::<u32>().is_ok()),
        "{ids}"
    );
    let back = ok(&kiln(
        &["tokenizer", "decode", "--tokenizer", t],
        ids.as_bytes(),
    ))
    .to_vec();
    assert_eq!(back, TEXT.as_bytes());
    // With --special, the special token's text becomes its id (0: the first special).
    let special = String::from_utf8(
        ok(&kiln(
            &["tokenizer", "encode", "--special", "-t", t],
            b"<|endoftext|>",
        ))
        .to_vec(),
    )
    .unwrap();
    assert_eq!(special.trim(), "0");

    let shards = dir.path().join("shards");
    let out = kiln(
        &[
            "data",
            "prepare",
            "--tokenizer",
            t,
            "--output",
            shards.to_str().unwrap(),
            "--val-fraction",
            "0.2",
            corpus.to_str().unwrap(),
        ],
        b"",
    );
    ok(&out);
    let train = std::fs::metadata(shards.join("train.bin")).unwrap().len();
    let val = std::fs::metadata(shards.join("val.bin")).unwrap().len();
    assert!(train > val && val > 1024, "{train} {val}");
}

#[test]
fn encodes_with_a_gguf_model() {
    let Some(model) = shared("models/SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let out = kiln(
        &[
            "tokenizer",
            "encode",
            "--tokenizer",
            model.to_str().unwrap(),
        ],
        b"In 2024",
    );
    let ids = String::from_utf8(ok(&out).to_vec()).unwrap();
    assert_eq!(
        ids.split_whitespace().count(),
        1 + 1 + 4,
        "'In', ' ', then one token per digit: {ids}"
    );
}

#[test]
fn clear_errors_and_exit_codes() {
    let out = kiln(
        &["tokenizer", "encode", "--tokenizer", "/nonexistent.json"],
        b"x",
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent.json"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("c.txt");
    std::fs::write(&corpus, "a b c").unwrap();
    let t = dir.path().join("t.json");
    let out = kiln(
        &[
            "tokenizer",
            "train",
            "--vocab-size",
            "10",
            "-o",
            t.to_str().unwrap(),
            corpus.to_str().unwrap(),
        ],
        b"",
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("too small"),
        "{out:?}"
    );
    assert!(!t.exists());

    ok(&kiln(
        &[
            "tokenizer",
            "train",
            "--vocab-size",
            "260",
            "-o",
            t.to_str().unwrap(),
            corpus.to_str().unwrap(),
        ],
        b"",
    ));
    let out = kiln(
        &["tokenizer", "decode", "-t", t.to_str().unwrap()],
        b"1 2 banana",
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("\"banana\""),
        "{out:?}"
    );
    let out = kiln(
        &["tokenizer", "decode", "-t", t.to_str().unwrap()],
        b"999999",
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("out of range"),
        "{out:?}"
    );

    let help = kiln(&["--help"], b"");
    assert!(String::from_utf8_lossy(ok(&help)).contains("tokenizer"));
}

#[test]
fn train_resume_eval_generate() {
    let (dir, data, run) = tokenizer_and_shards();
    let p = |x: &Path| x.to_str().unwrap().to_owned();
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/configs/tiny.toml");
    let out = kiln(
        &[
            "train",
            "--config",
            &p(&config),
            "--data",
            &p(&data),
            "--out",
            &p(&run),
            "--max-steps",
            "12",
            "--peak-flops",
            "3.1e11",
        ],
        b"",
    );
    let stdout = String::from_utf8(ok(&out).to_vec()).unwrap();
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let mfu: Vec<f64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["mfu"].as_f64())
        .collect();
    assert!(
        !mfu.is_empty() && mfu.iter().all(|&m| m > 0.0 && m < 1.0),
        "MFU against the given peak in every step record: {metrics}"
    );
    let last = stdout.lines().last().unwrap();
    assert!(last.starts_with("final val_loss "), "{stdout}");
    let first: f64 = last["final val_loss ".len()..].parse().unwrap();
    assert!(first.is_finite() && first < (512f64).ln(), "{first}");
    assert!(
        run.join("checkpoints/step-10/model/model.safetensors")
            .exists()
    );
    assert!(run.join("checkpoints/step-12/trainer_state.json").exists());

    let out = kiln(&["train", "--resume", &p(&run), "--max-steps", "16"], b"");
    assert!(String::from_utf8_lossy(ok(&out)).contains("final val_loss"));
    let state =
        std::fs::read_to_string(run.join("checkpoints/step-16/trainer_state.json")).unwrap();
    assert!(state.contains("\"step\": 16"), "{state}");

    let model = run.join("checkpoints/step-16/model");
    let out = kiln(&["eval", "--model", &p(&model), "--data", &p(&data)], b"");
    assert!(String::from_utf8_lossy(ok(&out)).starts_with("val_loss "));
    let out = kiln(
        &[
            "generate",
            "--model",
            &p(&model),
            "--prompt",
            "Byte",
            "--max-tokens",
            "5",
            "--seed",
            "3",
        ],
        b"",
    );
    ok(&out);

    // `kiln distill`: a student from the same config, taught by the trained model; its config
    // records the teacher, so `--resume` continues the distillation.
    let student = dir.path().join("student");
    let out = kiln(
        &[
            "distill",
            "--student-config",
            &p(&config),
            "--teacher",
            &p(&model),
            "--temperature",
            "2",
            "--alpha",
            "0.5",
            "--data",
            &p(&data),
            "--out",
            &p(&student),
            "--max-steps",
            "10",
        ],
        b"",
    );
    assert!(String::from_utf8_lossy(ok(&out)).contains("final val_loss"));
    let saved = std::fs::read_to_string(student.join("config.toml")).unwrap();
    assert!(
        saved.contains("[distill]") && saved.contains("alpha = 0.5"),
        "{saved}"
    );
    let out = kiln(
        &["distill", "--resume", &p(&student), "--max-steps", "12"],
        b"",
    );
    assert!(String::from_utf8_lossy(ok(&out)).contains("final val_loss"));
    let err = kiln(&["distill", "--config", &p(&config)], b"");
    assert!(String::from_utf8_lossy(&err.stderr).contains("needs --teacher"));

    let err = kiln(
        &["train", "--config", &p(&config), "--peak-flops", "0"],
        b"",
    );
    assert_eq!(err.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&err.stderr).contains("positive number of FLOP/s"));

    let err = kiln(&["train", "--resume", &p(&dir.path().join("none"))], b"");
    assert_eq!(err.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&err.stderr).contains("no completed checkpoint"));
}

/// Waits (up to two minutes) until `metrics.jsonl` in `run` logs a training step after `after`.
fn wait_for_step_after(run: &Path, after: u64, child: &mut std::process::Child) -> u64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let logged = std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v.get("loss").is_some())
            .filter_map(|v| v["step"].as_u64())
            .max();
        if let Some(step) = logged.filter(|&s| s >= after) {
            return step;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "kiln train ended before logging a step"
        );
        assert!(std::time::Instant::now() < deadline, "no step logged");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Sends `signal` to `child` and returns its exit status and stderr.
fn stop_with(signal: &str, child: std::process::Child) -> (Option<i32>, String) {
    let killed = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The step `kiln train` says it stopped after, checked against its checkpoint.
fn stopped_step(stderr: &str, signal: &str, run: &Path) -> u64 {
    let line = stderr
        .lines()
        .find(|l| l.starts_with(&format!("{signal}: stopped after step ")))
        .unwrap_or_else(|| panic!("no stop message: {stderr}"));
    let step: u64 = line
        .split_whitespace()
        .nth(4)
        .and_then(|s| s.trim_end_matches(';').parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    let resume = format!("resume with: kiln train --resume {}", run.display());
    assert!(stderr.lines().any(|l| l == resume), "{stderr}");
    let state =
        std::fs::read_to_string(run.join(format!("checkpoints/step-{step}/trainer_state.json")))
            .unwrap_or_else(|e| panic!("checkpoint of step {step}: {e}; {stderr}"));
    assert!(state.contains(&format!("\"step\": {step}")), "{state}");
    step
}

#[test]
fn train_stops_cleanly_on_sigterm_and_sigint_and_resumes() {
    let (dir, data, run) = tokenizer_and_shards();
    let p = |x: &Path| x.to_str().unwrap().to_owned();
    let config = dir.path().join("config.toml");
    let tiny = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/configs/tiny.toml"),
    )
    .unwrap();
    // Log every step, no evaluations or checkpoints on the way, far more steps than the test waits.
    let tiny = tiny
        .replace("log_interval = 5", "log_interval = 1")
        .replace("eval_interval = 10", "eval_interval = 0")
        .replace("checkpoint_interval = 10", "checkpoint_interval = 0");
    std::fs::write(&config, tiny).unwrap();
    let spawn = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };

    // SIGTERM: the step in progress finishes, a checkpoint at that step, the resume command, 143.
    let mut child = spawn(&[
        "train",
        "--config",
        &p(&config),
        "--data",
        &p(&data),
        "--out",
        &p(&run),
        "--max-steps",
        "100000",
    ]);
    let logged = wait_for_step_after(&run, 2, &mut child);
    let (status, stderr) = stop_with("TERM", child);
    assert_eq!(status, Some(143), "{stderr}");
    let step = stopped_step(&stderr, "SIGTERM", &run);
    assert!(step > logged && step < 100000, "{step} after {logged}");

    // SIGINT while resumed: the same, with 130.
    let mut child = spawn(&["train", "--resume", &p(&run)]);
    let logged = wait_for_step_after(&run, step + 2, &mut child);
    let (status, stderr) = stop_with("INT", child);
    assert_eq!(status, Some(130), "{stderr}");
    let step = stopped_step(&stderr, "SIGINT", &run);
    assert!(step > logged, "{step} after {logged}");

    // The printed command continues to max_steps (here a nearer one).
    let out = kiln(
        &[
            "train",
            "--resume",
            &p(&run),
            "--max-steps",
            &(step + 3).to_string(),
        ],
        b"",
    );
    assert!(String::from_utf8_lossy(ok(&out)).contains("final val_loss"));
    let state = std::fs::read_to_string(
        run.join(format!("checkpoints/step-{}/trainer_state.json", step + 3)),
    )
    .unwrap();
    assert!(
        state.contains(&format!("\"step\": {}", step + 3)),
        "{state}"
    );
}
