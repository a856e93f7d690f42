//! llama.cpp's GPT-2 tokenizer tests: every input of `golden.inp` must encode to the ids in `golden.out`.

mod common;

use kiln_bpe::Tokenizer;

fn check(tok: &Tokenizer, cases: &[(String, Vec<u32>)]) {
    let mut failures = Vec::new();
    for (text, want) in cases {
        let got = tok.encode(text);
        if &got != want {
            failures.push(format!("{text:?}: got {got:?}, want {want:?}"));
        }
        assert_eq!(tok.decode(&got).unwrap(), *text, "round trip of {text:?}");
    }
    assert!(
        failures.is_empty(),
        "{} golden mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn gpt2_golden_from_every_format() {
    let Some(dir) = common::shared("tokenizers/gpt2") else {
        return;
    };
    let inp = std::fs::read_to_string(dir.join("golden.inp")).unwrap();
    let out = std::fs::read_to_string(dir.join("golden.out")).unwrap();
    let cases = common::llama_cases(&inp, &out);
    assert_eq!(cases.len(), 47, "llama.cpp ships 47 GPT-2 cases");
    check(
        &Tokenizer::from_file(dir.join("tokenizer.json")).unwrap(),
        &cases,
    );
    check(
        &Tokenizer::from_vocab_merges(dir.join("vocab.json"), dir.join("merges.txt")).unwrap(),
        &cases,
    );
}
