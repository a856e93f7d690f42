//! Helpers shared by the integration tests: reference data from `../shared` and Python clients,
//! both optional locally and required in CI.

#![allow(dead_code)] // not every helper is used in every configuration

use std::path::{Path, PathBuf};
use std::process::Command;

/// `../shared/<rel>`, or `None` (with a note) when it is missing; missing is an error when
/// `KILN_REQUIRE_SHARED=1` (set by `.ci/run`).
pub fn shared(rel: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared")
        .join(rel);
    if p.exists() {
        return Some(p);
    }
    assert!(
        std::env::var("KILN_REQUIRE_SHARED").as_deref() != Ok("1"),
        "{} missing",
        p.display()
    );
    eprintln!("note: {} missing; skipping", p.display());
    None
}

/// Whether `python3` can import `module`; a missing module is an error when
/// `KILN_REQUIRE_PYTHON=1` (set by `.ci/run`, which installs the test clients).
pub fn python_has(module: &str) -> bool {
    let ok = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("KILN_REQUIRE_PYTHON").as_deref() != Ok("1"),
            "python3 with `{module}` is required (KILN_REQUIRE_PYTHON=1)"
        );
        eprintln!("note: python3 with `{module}` not found; skipping");
    }
    ok
}

/// Runs the `kiln` binary with `args`; panics with its stderr when it fails.
pub fn run_kiln(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("kiln runs");
    assert!(
        out.status.success(),
        "kiln {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Byte-level BPE text (multilingual, emoji, combining marks, whitespace runs).
pub const TEXT: &str =
    "Byte-level BPE: 中文, emoji 🦀, e\u{301}, tabs\t\tand   spaces.\n<|endoftext|> stays text.\n";

/// A 512-token tokenizer trained on [`TEXT`] and its shards: (temp dir, data dir, run dir path).
pub fn tokenizer_and_shards() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.txt");
    std::fs::write(&corpus, TEXT.repeat(200)).unwrap();
    let tok = dir.path().join("tokenizer.json");
    let data = dir.path().join("data");
    let run = dir.path().join("run");
    let p = |x: &Path| x.to_str().unwrap().to_owned();
    run_kiln(&[
        "tokenizer",
        "train",
        "--vocab-size",
        "512",
        "-o",
        &p(&tok),
        &p(&corpus),
    ]);
    run_kiln(&[
        "data",
        "prepare",
        "-t",
        &p(&tok),
        "-o",
        &p(&data),
        &p(&corpus),
    ]);
    (dir, data, run)
}
