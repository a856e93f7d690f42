//! llama.cpp's GPT-2 tokenizer tests: every input of `golden.inp` must encode to the ids in `golden.out`.

mod common;

use kiln_bpe::Tokenizer;

fn cases(inp: &str, out: &str) -> Vec<(String, Vec<u32>)> {
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
    let cases = cases(&inp, &out);
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
