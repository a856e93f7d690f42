//! llama.cpp's own tokenizer goldens: every `models/ggml-vocab-*.gguf` of llama.cpp's source tree,
//! with the cases of its `.gguf.inp` / `.gguf.out` (made by llama.cpp's `test-tokenizer-0`:
//! `add_special = false`, `parse_special = false`).
//!
//! The folder comes from `KILN_LLAMA_VOCABS` (`scripts/fetch_llama_vocabs.sh` fetches it from the
//! `llama-cpp-python` source package). Every vocabulary of a supported model must load and pass
//! every case, and decode its encodings back to the input; the others must be refused with a typed
//! error naming `tokenizer.ggml.model`.

mod common;

use std::path::Path;

use kiln_bpe::{BpeError, SpecialTokens, Tokenizer};

/// The tokenizer models Kiln reads.
const SUPPORTED: &[&str] = &["gpt2", "llama", "gemma4"];

/// Result of one vocabulary file.
struct Report {
    name: String,
    outcome: String,
    failures: Vec<String>,
}

fn check_vocab(path: &Path) -> Report {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let file = kiln_gguf::GgufFile::open(path).unwrap();
    let model = file.get_str("tokenizer.ggml.model").unwrap().to_owned();
    let loaded = Tokenizer::from_gguf(path);
    let mut failures = Vec::new();
    if !SUPPORTED.contains(&model.as_str()) {
        let outcome = match loaded {
            Err(BpeError::UnsupportedGguf { key, value, .. }) => {
                if key != "tokenizer.ggml.model" || value != model {
                    failures.push(format!("error names {key} = {value:?}"));
                }
                format!("refused ({model})")
            }
            Err(e) => {
                failures.push(format!("wrong error: {e}"));
                "wrong error".into()
            }
            Ok(_) => {
                failures.push(format!("model {model:?} loaded"));
                "loaded".into()
            }
        };
        return Report {
            name,
            outcome,
            failures,
        };
    }
    let tok = match loaded {
        Ok(t) => t,
        Err(e) => {
            return Report {
                name,
                outcome: "failed to load".into(),
                failures: vec![e.to_string()],
            };
        }
    };
    let inp = path.with_extension("gguf.inp");
    let out = path.with_extension("gguf.out");
    if !inp.exists() || !out.exists() {
        // No goldens: the vocabulary must still round-trip text.
        for text in common::HARD_STRINGS {
            let ids = tok.encode(text);
            let back = tok.decode(&ids).unwrap();
            if back != *text {
                failures.push(format!("round trip of {text:?} gave {back:?}"));
            }
        }
        return Report {
            name,
            outcome: format!("loaded ({model}, no goldens; round trips checked)"),
            failures,
        };
    }
    let cases = common::llama_cases(
        &std::fs::read_to_string(&inp).unwrap(),
        &std::fs::read_to_string(&out).unwrap(),
    );
    let mut passed = 0;
    for (text, want) in &cases {
        let got = tok.encode(text);
        if &got == want {
            passed += 1;
        } else {
            failures.push(format!("{text:?}: got {got:?}, want {want:?}"));
        }
        let back = tok.decode(&got).unwrap();
        if back != *text {
            failures.push(format!("round trip of {text:?} gave {back:?}"));
        }
        // Offsets: the same ids, each token's range inside the input, in order.
        let enc = tok.encode_with_offsets(text.as_bytes(), SpecialTokens::AsText);
        let ordered = enc.offsets.windows(2).all(|w| w[0].1 <= w[1].0);
        let inside = enc.offsets.iter().all(|&(s, e)| s <= e && e <= text.len());
        if enc.ids != got || !ordered || !inside {
            failures.push(format!("offsets of {text:?}: {:?}", enc.offsets));
        }
    }
    Report {
        name,
        outcome: format!("{passed}/{} cases ({model})", cases.len()),
        failures,
    }
}

#[test]
fn llama_cpp_vocab_goldens() {
    let Some(dir) = common::env_dir("KILN_LLAMA_VOCABS") else {
        return;
    };
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with("ggml-vocab-") && n.ends_with(".gguf")
        })
        .collect();
    paths.sort();
    assert!(
        !paths.is_empty(),
        "no ggml-vocab-*.gguf in {}",
        dir.display()
    );
    let reports: Vec<Report> = paths.iter().map(|p| check_vocab(p)).collect();
    let mut failed = 0;
    for r in &reports {
        eprintln!("{:40} {}", r.name, r.outcome);
        for f in r.failures.iter().take(10) {
            eprintln!("    {f}");
        }
        if !r.failures.is_empty() {
            failed += 1;
        }
    }
    assert_eq!(failed, 0, "{failed} vocabularies failed (see above)");
}
