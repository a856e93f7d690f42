//! Bad input gives a typed error with a clear message, never a panic.

mod common;

use kiln_bpe::prepare::{PrepareConfig, prepare};
use kiln_bpe::{BpeError, BpeTrainer, ShardError, TokenShard, Tokenizer, TrainerConfig};
use kiln_gguf::GgufError;

fn tiny_tokenizer() -> Tokenizer {
    let mut t = BpeTrainer::new(TrainerConfig {
        vocab_size: 300,
        ..TrainerConfig::default()
    })
    .unwrap();
    t.feed(b"hello hello world world wide web");
    t.finish().unwrap()
}

#[test]
fn unreadable_files() {
    let err = Tokenizer::from_file("/nonexistent/tokenizer.json").unwrap_err();
    assert!(matches!(err, BpeError::Io { .. }));
    assert!(
        err.to_string().contains("/nonexistent/tokenizer.json"),
        "{err}"
    );
    let mut t = BpeTrainer::new(TrainerConfig::default()).unwrap();
    assert!(matches!(
        t.feed_files(&["/nonexistent/corpus.txt".into()]),
        Err(BpeError::Io { .. })
    ));
}

#[test]
fn corrupt_tokenizer_json() {
    let good = tiny_tokenizer().to_json().unwrap();
    let cases: Vec<(String, &str)> = vec![
        ("{ not json".into(), "corrupt tokenizer file"),
        ("{}".into(), "no \"model\""),
        (
            good.replacen("\"type\": \"BPE\"", "\"type\": \"WordPiece\"", 1),
            "WordPiece",
        ),
        (
            good.replacen(
                "\"normalizer\": null",
                "\"normalizer\": {\"type\": \"NFKC\"}",
                1,
            ),
            "normalizer NFKC",
        ),
        (
            good.replacen("\"byte_fallback\": false", "\"byte_fallback\": true", 1),
            "byte_fallback",
        ),
        (
            good.replacen("\"merges\": [", "\"merges\": [[\"zz\", \"qq\"],", 1),
            "merge #0",
        ),
        (
            good.replacen("\"merges\": [", "\"merges\": [42,", 1),
            "merge #0",
        ),
        (
            good.replacen(
                "\"pre_tokenizer\": {",
                "\"pre_tokenizer\": {\"type\": \"Whitespace\"}, \"x\": {",
                1,
            ),
            "Whitespace",
        ),
    ];
    for (json, needle) in cases {
        let err = Tokenizer::from_json_str(&json).unwrap_err();
        assert!(
            err.to_string().contains(needle),
            "expected {needle:?} in {err}"
        );
    }
}

#[test]
fn ids_out_of_range() {
    let tok = tiny_tokenizer();
    let err = tok.decode(&[1, 2, 100_000]).unwrap_err();
    let size = tok.vocab_size();
    assert!(
        matches!(err, BpeError::IdOutOfRange { id: 100_000, vocab_size } if vocab_size == size),
        "{err}"
    );
    assert!(err.to_string().contains("100000"));
}

#[test]
fn trainer_arguments() {
    let err = BpeTrainer::new(TrainerConfig {
        vocab_size: 200,
        ..TrainerConfig::default()
    })
    .unwrap_err();
    assert!(err.to_string().contains("at least 257"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let mut t = BpeTrainer::new(TrainerConfig::default()).unwrap();
    t.feed_files(std::slice::from_ref(&empty)).unwrap();
    assert!(matches!(t.finish(), Err(BpeError::EmptyCorpus)));
    let tok = tiny_tokenizer();
    assert!(matches!(
        prepare(&tok, &[empty], dir.path(), &PrepareConfig::default()),
        Err(BpeError::EmptyCorpus)
    ));
}

#[test]
fn corrupt_gguf_and_shards() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("model.gguf");
    std::fs::write(&fake, b"GGUF\x03\x00\x00\x00truncated").unwrap();
    assert!(matches!(
        Tokenizer::from_file(&fake),
        Err(BpeError::Gguf(GgufError::Truncated { .. }))
    ));
    let shard = dir.path().join("train.bin");
    std::fs::write(&shard, vec![0u8; 2048]).unwrap();
    assert!(matches!(
        TokenShard::open(&shard),
        Err(ShardError::BadMagic { .. })
    ));
}

/// Writes a GGUF file holding only tokenizer metadata.
fn tokenizer_gguf(
    dir: &std::path::Path,
    entries: &[(&str, kiln_gguf::GgufValue)],
) -> std::path::PathBuf {
    let path = dir.join("vocab.gguf");
    let mut w = kiln_gguf::GgufWriter::new();
    for (key, value) in entries {
        w.add_metadata(*key, value.clone()).unwrap();
    }
    w.write(&path).unwrap();
    path
}

#[test]
fn gguf_tokenizers_kiln_does_not_read() {
    use kiln_gguf::{GgufArray, GgufValue};
    let dir = tempfile::tempdir().unwrap();
    let tokens = || GgufValue::Array(GgufArray::String(vec!["a".into(), "b".into(), "ab".into()]));
    for model in ["bert", "t5", "rwkv", "something-new"] {
        let path = tokenizer_gguf(
            dir.path(),
            &[
                ("tokenizer.ggml.model", GgufValue::String(model.into())),
                ("tokenizer.ggml.tokens", tokens()),
            ],
        );
        let err = Tokenizer::from_file(&path).unwrap_err();
        assert!(
            matches!(&err, BpeError::UnsupportedGguf { key: "tokenizer.ggml.model", value, .. } if value == model),
            "{err}"
        );
        assert!(err.to_string().contains(&format!("{model:?}")), "{err}");
    }
    let path = tokenizer_gguf(
        dir.path(),
        &[
            ("tokenizer.ggml.model", GgufValue::String("gpt2".into())),
            (
                "tokenizer.ggml.pre",
                GgufValue::String("no-such-pre".into()),
            ),
            ("tokenizer.ggml.tokens", tokens()),
            (
                "tokenizer.ggml.merges",
                GgufValue::Array(GgufArray::String(vec!["a b".into()])),
            ),
        ],
    );
    let err = Tokenizer::from_file(&path).unwrap_err();
    assert!(
        matches!(&err, BpeError::UnsupportedGguf { key: "tokenizer.ggml.pre", value, .. } if value == "no-such-pre"),
        "{err}"
    );
}
