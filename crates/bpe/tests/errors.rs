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
    let good = tiny_tokenizer().to_json();
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

#[test]
fn gguf_without_a_bpe_tokenizer() {
    use kiln_gguf::{GgufArray, GgufValue, GgufWriter};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spm.gguf");
    let mut w = GgufWriter::new();
    w.add_metadata("tokenizer.ggml.model", GgufValue::String("llama".into()))
        .unwrap();
    w.add_metadata(
        "tokenizer.ggml.tokens",
        GgufValue::Array(GgufArray::String(vec!["a".into()])),
    )
    .unwrap();
    w.write(&path).unwrap();
    let err = Tokenizer::from_file(&path).unwrap_err();
    assert!(err.to_string().contains("\"llama\""), "{err}");
}
