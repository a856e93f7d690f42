//! A SentencePiece-style BPE `tokenizer.json` (byte fallback, `▁` for spaces, `Prepend` +
//! `Replace` normalizer: the form `transformers` gives Llama 2, Mistral, Phi-3 and Gemma), made
//! and run by Hugging Face `tokenizers` (`scripts/make_hf_spm_fixture.py`), against its ids.

use std::path::Path;

use kiln_bpe::{SpecialTokens, Tokenizer};

#[test]
fn sentencepiece_style_tokenizer_json_encodes_as_hf_tokenizers_does() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/hf_spm");
    let tok = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    assert!(tok.is_sentencepiece());
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    for case in cases.as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        // HF matches added tokens (`<s>`, `</s>`) in the text.
        let ids = tok.encode_bytes(text.as_bytes(), SpecialTokens::Parse);
        assert_eq!(ids, want, "{text:?}");
        if !text.contains("<s>") && !text.is_empty() {
            assert_eq!(tok.decode(&ids).unwrap(), text, "{text:?}");
        }
    }
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(1), Some(2)));
}
