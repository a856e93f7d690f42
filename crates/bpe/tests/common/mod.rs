//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// `../shared` beside the workspace (read-only reference data), if present.
///
/// Tests that need it skip with a note when it is absent, unless `KILN_REQUIRE_SHARED=1`
/// (set by `.ci/run`), in which case its absence is a failure.
pub fn shared(rel: &str) -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared");
    let path = root.join(rel);
    if path.exists() {
        return Some(path);
    }
    if std::env::var("KILN_REQUIRE_SHARED").is_ok_and(|v| v == "1") {
        panic!("{} is missing and KILN_REQUIRE_SHARED=1", path.display());
    }
    eprintln!("note: {} not found; skipping", path.display());
    None
}

/// A directory named by environment variable `var` (reference data fetched outside the project).
///
/// Unset: the tests that need it skip with a note, unless `KILN_REQUIRE_SHARED=1`, in which case
/// that is a failure. Set to a path that is not a directory: always a failure.
pub fn env_dir(var: &str) -> Option<PathBuf> {
    match std::env::var_os(var) {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            assert!(dir.is_dir(), "{var}={} is not a directory", dir.display());
            Some(dir)
        }
        None => {
            if std::env::var("KILN_REQUIRE_SHARED").is_ok_and(|v| v == "1") {
                panic!("{var} is not set and KILN_REQUIRE_SHARED=1");
            }
            eprintln!("note: {var} is not set; skipping");
            None
        }
    }
}

/// llama.cpp's tokenizer test cases: inputs of a `.inp` file (separated by lines
/// `__ggml_vocab_test__`) with the ids of the matching `.out` line.
pub fn llama_cases(inp: &str, out: &str) -> Vec<(String, Vec<u32>)> {
    let inputs: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    let outputs: Vec<&str> = out.split('\n').collect();
    inputs
        .iter()
        .zip(&outputs)
        .map(|(i, o)| {
            let ids = o
                .split_whitespace()
                .map(|t| t.parse().expect("id"))
                .collect();
            ((*i).to_owned(), ids)
        })
        .collect()
}

/// Text samples that stress losslessness and pre-tokenization.
pub const HARD_STRINGS: &[&str] = &[
    "",
    " ",
    "  ",
    "\n",
    "\t\n \r\n",
    "Hello world",
    " Hello  World!!  ",
    "I'm sure you'll've heard they're 'quoted' ''s",
    "I'M SURE YOU'LL'VE",
    "中文分词测试：你好，世界！",
    "日本語のテキストとカタカナ",
    "emoji 🦙🦙 👩‍👩‍👧‍👦 flags 🇫🇷🇯🇵",
    "e\u{301} combining a\u{308}\u{323} marks",
    "control \u{0} \u{1} \u{7f} \u{85} chars",
    "zero\u{200b}width\u{2028}separators\u{3000}ideographic",
    "numbers 1234567890 ½ ٣٤٥ ⅷ",
    "code: fn main() { let x = vec![1, 2, 3]; }\n    indented\n\ttabbed",
    "                                                                    many spaces",
    "Ελληνικά и русский текст עברית العربية हिन्दी",
    "<|endoftext|> special text <|endoftext|>",
];
