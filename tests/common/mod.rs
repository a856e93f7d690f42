//! Helpers shared by the integration tests: reference data from `../shared` and Python clients,
//! both optional locally and required in CI.

#![allow(dead_code)] // each test binary uses its own subset

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
