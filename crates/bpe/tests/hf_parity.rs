//! Kiln's encoder against Hugging Face `tokenizers` (the same library Python's `tokenizers` wraps):
//! identical ids on real corpora and hard strings, for GPT-2, SmolLM2 and tokenizers Kiln trains.

mod common;

use std::path::Path;

use kiln_bpe::{BpeTrainer, PreTokenizer, SpecialTokens, Split, Tokenizer, TrainerConfig};
use tokenizers::Tokenizer as HfTokenizer;

fn docs(path: &Path, limit: usize) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    text.split("\n\n")
        .filter(|d| !d.is_empty())
        .take(limit)
        .map(str::to_owned)
        .collect()
}

fn assert_same_ids(kiln: &Tokenizer, hf: &HfTokenizer, texts: &[String], specials: SpecialTokens) {
    let batch = kiln.encode_batch(texts, specials);
    for (text, ours) in texts.iter().zip(&batch) {
        let theirs = hf.encode(text.as_str(), false).unwrap();
        assert_eq!(ours, theirs.get_ids(), "ids differ on {text:?}");
        assert_eq!(
            &kiln.encode_bytes(text.as_bytes(), specials),
            ours,
            "batch differs from single on {text:?}"
        );
        assert_eq!(kiln.decode(ours).unwrap(), *text, "round trip of {text:?}");
    }
}

fn hard_strings() -> Vec<String> {
    common::HARD_STRINGS
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
}

#[test]
fn gpt2_matches_hf_on_real_text() {
    let Some(dir) = common::shared("tokenizers/gpt2") else {
        return;
    };
    let Some(shakespeare) = common::shared("data/tinyshakespeare.txt") else {
        return;
    };
    let Some(wiki) = common::shared("data/wikitext-2/valid.txt") else {
        return;
    };
    let kiln = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let hf = HfTokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let mut texts = docs(&shakespeare, usize::MAX);
    texts.extend(docs(&wiki, 3000));
    texts.extend(hard_strings());
    // HF recognizes special tokens in the text by default: compare in that mode.
    assert_same_ids(&kiln, &hf, &texts, SpecialTokens::Parse);
}

#[test]
fn offsets_cover_exactly_the_token_bytes() {
    let Some(dir) = common::shared("tokenizers/gpt2") else {
        return;
    };
    let kiln = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let hf = HfTokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    for text in common::HARD_STRINGS {
        let enc = kiln.encode_with_offsets(text.as_bytes(), SpecialTokens::Parse);
        let mut pos = 0;
        for (&id, &(s, e)) in enc.ids.iter().zip(&enc.offsets) {
            assert_eq!(s, pos, "offsets are contiguous in {text:?}");
            assert_eq!(&text.as_bytes()[s..e], kiln.token_bytes(id).unwrap());
            pos = e;
        }
        assert_eq!(pos, text.len());
        if text.is_ascii() {
            let theirs = hf.encode(*text, false).unwrap();
            assert_eq!(
                enc.offsets,
                theirs.get_offsets(),
                "offsets differ from HF on {text:?}"
            );
        }
    }
}

#[test]
fn smollm2_gguf_tokenizer_matches_reference() {
    let Some(gguf) = common::shared("models/SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let Some(dir) = common::shared("tokenizers/smollm2") else {
        return;
    };
    let Some(wiki) = common::shared("data/wikitext-2/test.txt") else {
        return;
    };
    let kiln = Tokenizer::from_file(&gguf).unwrap();
    // The reference: HF's BPE from SmolLM2's vocab + merges, with SmolLM2's pre-tokenizer
    // (digits isolated one by one, then GPT-2's byte-level regex).
    let model = tokenizers::models::bpe::BPE::from_file(
        dir.join("vocab.json").to_str().unwrap(),
        dir.join("merges.txt").to_str().unwrap(),
    )
    .build()
    .unwrap();
    let mut hf = HfTokenizer::new(model);
    hf.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::sequence::Sequence::new(
        vec![
            tokenizers::pre_tokenizers::digits::Digits::new(true).into(),
            tokenizers::pre_tokenizers::byte_level::ByteLevel::new(false, true, true).into(),
        ],
    )));
    let mut texts = docs(&wiki, 2000);
    texts.extend(hard_strings().into_iter().filter(|s| !s.contains("<|")));
    texts.push("In 2024, 1234567 apples cost $3.50".into());
    assert_same_ids(&kiln, &hf, &texts, SpecialTokens::AsText);
    // Digits split one by one.
    let ids = kiln.encode("2024");
    assert_eq!(ids.len(), 4);
    // ChatML control tokens are special tokens.
    let chat = kiln.encode_with_special("<|im_start|>user\nHi<|im_end|>");
    assert_eq!(kiln.token_bytes(chat[0]).unwrap(), b"<|im_start|>");
    assert_eq!(
        kiln.decode(&chat).unwrap(),
        "<|im_start|>user\nHi<|im_end|>"
    );
    assert!(kiln.eot_id().is_some());
}

fn train(corpus: &Path, vocab_size: usize, split: Split) -> Tokenizer {
    let mut trainer = BpeTrainer::new(TrainerConfig {
        vocab_size,
        pre_tokenizer: PreTokenizer::with_split(split),
        ..TrainerConfig::default()
    })
    .unwrap();
    trainer.feed_files(&[corpus.to_owned()]).unwrap();
    trainer.finish().unwrap()
}

#[test]
fn trained_tokenizers_load_in_hf_with_identical_ids() {
    let Some(shakespeare) = common::shared("data/tinyshakespeare.txt") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut texts = docs(&shakespeare, 2000);
    texts.extend(hard_strings());
    for (name, split) in [
        ("gpt2", Split::Gpt2),
        ("cl100k", Split::Cl100k),
        ("none", Split::None),
    ] {
        let tok = train(&shakespeare, 1024, split);
        assert_eq!(tok.vocab_size(), 1024, "{name}");
        let path = dir.path().join(format!("{name}.json"));
        tok.save(&path).unwrap();
        let hf = HfTokenizer::from_file(&path).unwrap();
        assert_same_ids(&tok, &hf, &texts, SpecialTokens::Parse);
        // And Kiln reloads its own file to the same tokenizer.
        let again = Tokenizer::from_file(&path).unwrap();
        assert_eq!(again.encode(&texts[0]), tok.encode(&texts[0]));
        assert_eq!(again.to_json().unwrap(), tok.to_json().unwrap());
    }
}

#[test]
fn any_bytes_round_trip() {
    let Some(dir) = common::shared("tokenizers/gpt2") else {
        return;
    };
    let tok = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for len in 0..400 {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                // Bias towards spaces, letters and UTF-8 lead/continuation bytes.
                [
                    b' ',
                    b'a',
                    b'\n',
                    0xE4,
                    0xB8,
                    0xF0,
                    0x9F,
                    (state >> 32) as u8,
                ][(state % 8) as usize]
            })
            .collect();
        for specials in [SpecialTokens::AsText, SpecialTokens::Parse] {
            let ids = tok.encode_bytes(&bytes, specials);
            assert_eq!(tok.decode_bytes(&ids).unwrap(), bytes);
        }
    }
}

/// Kiln's trainer makes the same merges, in the same order, with the same ids, as HF's
/// `BpeTrainer` configured as `../shared/peers/tokenizer_peer.py` configures it.
#[test]
fn trainer_reproduces_hf_merges_and_vocab() {
    use tokenizers::models::TrainerWrapper;
    use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;

    let Some(shakespeare) = common::shared("data/tinyshakespeare.txt") else {
        return;
    };
    let vocab_size = 2048;
    let ours = train(&shakespeare, vocab_size, Split::Gpt2);

    let mut hf = HfTokenizer::new(BPE::default());
    hf.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .special_tokens(vec![tokenizers::AddedToken::from("<|endoftext|>", true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .show_progress(false)
        .build()
        .into();
    hf.train_from_files(
        &mut trainer,
        vec![shakespeare.to_string_lossy().into_owned()],
    )
    .unwrap();
    let theirs: serde_json::Value = serde_json::from_str(&hf.to_string(false).unwrap()).unwrap();
    let mine: serde_json::Value = serde_json::from_str(&ours.to_json().unwrap()).unwrap();
    assert_eq!(mine["model"]["merges"], theirs["model"]["merges"]);
    assert_eq!(mine["model"]["vocab"], theirs["model"]["vocab"]);
}
