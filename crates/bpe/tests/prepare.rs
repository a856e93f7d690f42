//! Corpus → token shards, checked against whole-text encoding (the trainer's sampling of them is
//! tested in kiln-trainer).

mod common;

use std::path::PathBuf;

use kiln_bpe::prepare::{PrepareConfig, prepare};
use kiln_bpe::{AddedToken, BpeTrainer, TokenShard, TokenWidth, Tokenizer, TrainerConfig};

fn corpus(dir: &std::path::Path) -> (Vec<PathBuf>, Vec<String>) {
    let docs: Vec<String> = (0..3)
        .map(|d| {
            (0..400)
                .map(|i| format!("Doc {d}, line {i}: the quick brown fox — 狐狸 🦊 jumps.\n\n  indented {i}\n"))
                .collect()
        })
        .collect();
    let files = docs
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let p = dir.join(format!("doc{i}.txt"));
            std::fs::write(&p, text).unwrap();
            p
        })
        .collect();
    (files, docs)
}

fn trained(files: &[PathBuf]) -> Tokenizer {
    let mut t = BpeTrainer::new(TrainerConfig {
        vocab_size: 600,
        ..TrainerConfig::default()
    })
    .unwrap();
    t.feed_files(files).unwrap();
    t.finish().unwrap()
}

#[test]
fn shards_hold_every_document_once_with_separators() {
    let dir = tempfile::tempdir().unwrap();
    let (files, docs) = corpus(dir.path());
    let tok = trained(&files);
    let eot = tok.eot_id().unwrap();
    // Tiny chunks force many cuts: the result must equal encoding each document whole.
    let cfg = PrepareConfig {
        val_fraction: 0.1,
        chunk_bytes: 1024,
        show_progress: false,
    };
    let out = dir.path().join("shards");
    let report = prepare(&tok, &files, &out, &cfg).unwrap();
    let train = TokenShard::open(out.join("train.bin")).unwrap();
    let val = TokenShard::open(out.join("val.bin")).unwrap();
    assert_eq!(train.width(), TokenWidth::U16);
    assert_eq!(
        (train.len() as u64, val.len() as u64),
        (report.train_tokens, report.val_tokens)
    );
    let all: Vec<u32> = [train.to_vec(), val.to_vec()].concat();
    let expected: Vec<u32> = docs
        .iter()
        .flat_map(|d| std::iter::once(eot).chain(tok.encode(d)))
        .collect();
    assert_eq!(all, expected);
    // The split is at ~90% of the bytes, on a line boundary, inside the last document.
    let val_text = tok.decode(&val.to_vec()).unwrap();
    let total: usize = docs.iter().map(String::len).sum();
    assert!(
        (val_text.len() as f64 - total as f64 * 0.1).abs() < 200.0,
        "{}",
        val_text.len()
    );
    assert!(val_text.starts_with("Doc 2") || val_text.starts_with("  indented"));
}

#[test]
fn large_vocabularies_use_u32_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let (files, docs) = corpus(dir.path());
    let mut parts = trained(&files).parts().clone();
    parts.added.push(AddedToken {
        id: 70_000,
        content: "<|big|>".into(),
        special: true,
    });
    let tok = Tokenizer::from_parts(parts).unwrap();
    let out = dir.path().join("shards32");
    let cfg = PrepareConfig {
        val_fraction: 0.0,
        ..PrepareConfig::default()
    };
    prepare(&tok, &files[..1], &out, &cfg).unwrap();
    let train = TokenShard::open(out.join("train.bin")).unwrap();
    assert_eq!(train.width(), TokenWidth::U32);
    assert_eq!(tok.decode(&train.to_vec()[1..]).unwrap(), docs[0]);
    assert!(TokenShard::open(out.join("val.bin")).unwrap().is_empty());
}

#[test]
fn shakespeare_split_matches_nanogpt() {
    let Some(path) = common::shared("data/tinyshakespeare.txt") else {
        return;
    };
    let text = std::fs::read_to_string(&path).unwrap();
    let tok =
        Tokenizer::from_file(common::shared("tokenizers/gpt2/tokenizer.json").unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let report = prepare(
        &tok,
        std::slice::from_ref(&path),
        dir.path(),
        &PrepareConfig::default(),
    )
    .unwrap();
    let val = TokenShard::open(&report.val_path).unwrap();
    // nanoGPT's split point is 90% of the characters; ours is the next line boundary after it.
    let split = (text.len() as f64 * 0.9).round() as usize;
    let val_text = tok.decode(&val.to_vec()).unwrap();
    let cut = text.len() - val_text.len();
    assert!(cut >= split && cut - split < 100 && text[..cut].ends_with('\n'));
    assert_eq!(&text[cut..], val_text);
}

#[test]
fn byte_shards_hold_one_token_per_ascii_character() {
    let dir = tempfile::tempdir().unwrap();
    let text = "Kiln turns raw text into shards:\none byte, one token, for ASCII.\n".repeat(50);
    let file = dir.path().join("input.txt");
    std::fs::write(&file, &text).unwrap();
    let cfg = PrepareConfig {
        val_fraction: 0.1,
        show_progress: false,
        ..PrepareConfig::default()
    };
    let out = dir.path().join("data");
    let (tok, report) = kiln_bpe::prepare::prepare_bytes(&[file], &out, &cfg).unwrap();
    assert_eq!(
        tok.vocab_size(),
        257,
        "256 bytes and <|endoftext|>, no merges"
    );
    assert_eq!(tok.encode(&text).len(), text.len());
    // The document separator plus one token per character, split between the two shards.
    assert_eq!(
        report.train_tokens + report.val_tokens,
        text.len() as u64 + 1
    );
    let train = TokenShard::open(out.join("train.bin")).unwrap();
    let val = TokenShard::open(out.join("val.bin")).unwrap();
    let ids: Vec<u32> = (0..train.len())
        .filter_map(|i| train.get(i))
        .chain((0..val.len()).filter_map(|i| val.get(i)))
        .filter(|&id| Some(id) != tok.eot_id())
        .collect();
    assert_eq!(tok.decode(&ids).unwrap(), text);
}
