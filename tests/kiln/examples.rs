//! The examples as a user runs them: their flags (clap: `--help`, misspelled flags are errors)
//! and the `quantize` and `serve --once` examples on SmolLM2-135M.
//!
//! `cargo test` builds the examples before it runs tests; run alone (`cargo test --test kiln
//! examples::`), these tests skip with a note when an example binary is missing. The model tests
//! need `../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf` (skipped with a note when it is
//! missing, unless `KILN_REQUIRE_SHARED=1`).

use crate::common;

use common::shared;
use std::path::PathBuf;
use std::process::{Command, Output};

const MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// `target/<profile>/examples/<name>`, built by `cargo test` beside this test's binary.
fn example(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let path = exe.parent()?.parent()?.join("examples").join(name);
    if path.is_file() {
        return Some(path);
    }
    assert!(
        std::env::var("KILN_REQUIRE_SHARED").as_deref() != Ok("1"),
        "{} missing: `cargo test` builds the examples",
        path.display()
    );
    eprintln!(
        "note: {} missing (run the whole `cargo test`); skipping",
        path.display()
    );
    None
}

fn run(exe: &PathBuf, args: &[&str]) -> Output {
    Command::new(exe).args(args).output().expect("example runs")
}

#[test]
fn examples_parse_their_flags() {
    let cases: [(&str, &[&str], &str); 6] = [
        ("shakespeare_char", &["--max-step", "5"], "--max-steps"),
        ("chat", &["--temprature", "0.5"], "--temperature"),
        (
            "generate_bench",
            &["model.gguf", "--prompt-token", "8"],
            "--prompt-tokens",
        ),
        (
            "tokenizer_throughput",
            &["encode", "c.txt", "--run", "2"],
            "--runs",
        ),
        ("serve", &["--model", "m.gguf", "--prot", "1"], "--port"),
        (
            "quantize",
            &["--model", "m.gguf", "--max-token", "4"],
            "--max-tokens",
        ),
    ];
    for (name, bad, flag) in cases {
        let Some(exe) = example(name) else { continue };
        let help = run(&exe, &["--help"]);
        let text = String::from_utf8_lossy(&help.stdout);
        assert!(help.status.success(), "{name} --help: {help:?}");
        if name != "tokenizer_throughput" {
            assert!(
                text.contains(flag),
                "{name} --help documents {flag}: {text}"
            );
        }
        let out = run(&exe, bad);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name} {bad:?}: {err}");
        assert!(
            err.contains("unexpected argument") && err.contains(flag),
            "{name} {bad:?} names the flag it meant: {err}"
        );
    }
    if let Some(exe) = example("tokenizer_throughput") {
        let out = run(&exe, &["train", "c.txt", "--tok", "dir"]);
        assert_eq!(out.status.code(), Some(2), "--tok is encode's: {out:?}");
    }
}

#[test]
fn quantize_example_reports_and_generates() {
    let (Some(model), Some(exe)) = (shared(MODEL), example("quantize")) else {
        return;
    };
    let out = run(
        &exe,
        &["--model", model.to_str().unwrap(), "--max-tokens", "4"],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    // SmolLM2-135M: 30 blocks of 5 linear layers (qkv, proj, gate, up, down), and the (tied) output projection.
    assert!(stdout.contains("quantized 151 layers"), "{stdout}");
    assert!(stdout.contains("f32: \" Paris"), "{stdout}");
    assert!(stdout.contains("int8: \""), "{stdout}");
    assert!(stdout.contains("same greedy tokens: "), "{stdout}");
}

#[test]
fn serve_example_answers_one_request() {
    let (Some(model), Some(exe)) = (shared(MODEL), example("serve")) else {
        return;
    };
    let out = run(
        &exe,
        &[
            "--model",
            model.to_str().unwrap(),
            "--port",
            "0",
            "--once",
            "--max-tokens",
            "4",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let mut lines = stdout.lines();
    assert!(
        lines
            .next()
            .unwrap_or("")
            .starts_with("listening on http://127.0.0.1:"),
        "{stdout}"
    );
    let answer: serde_json::Value = serde_json::from_str(lines.next().unwrap_or("")).unwrap();
    assert_eq!(answer["object"], "text_completion", "{answer}");
    assert_eq!(answer["usage"]["completion_tokens"], 4, "{answer}");
    let text = answer["choices"][0]["text"].as_str().unwrap();
    assert!(text.contains("Paris"), "{answer}");
}
