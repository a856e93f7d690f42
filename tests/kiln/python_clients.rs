//! Real Python clients against Kiln's artifacts: HF `tokenizers` (the Python package) loads the
//! tokenizer.json files `kiln tokenizer train` writes and agrees with `kiln tokenizer encode`.
//!
//! Skipped with a note when `python3` or the package is missing, unless `KILN_REQUIRE_PYTHON=1`
//! (set by `.ci/run`, which installs it).

use crate::common;

use common::python_has;

use std::path::Path;
use std::process::Command;

#[test]
fn python_hf_tokenizers_loads_kiln_tokenizers() {
    if !python_has("tokenizers") {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.txt");
    // Kiln's own sources: a corpus every checkout has.
    let mut text = String::new();
    for f in [
        "src/cli/tokenizer.rs",
        "src/cli/data.rs",
        "README.md",
        "docs/architecture.md",
    ] {
        text.push_str(&std::fs::read_to_string(root.join(f)).unwrap_or_default());
    }
    std::fs::write(&corpus, text).unwrap();
    let out = Command::new("python3")
        .arg(root.join("tests/python/check_hf_compat.py"))
        .arg(env!("CARGO_BIN_EXE_kiln"))
        .arg(&corpus)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
