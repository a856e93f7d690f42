//! Character-level vocabularies, as nanoGPT's `data/*/prepare.py` writes them to `meta.pkl`
//! (`itos`: id → character, `stoi`: character → id): one token per character, no merges.
//!
//! Built as a BPE tokenizer whose pre-tokenizer isolates every character and which emits a
//! piece that is itself a vocabulary entry directly (`ignore_merges`), so a multi-byte character
//! in the vocabulary is one token, as in nanoGPT. Characters outside the vocabulary have no id
//! (nanoGPT raises a `KeyError`); like any byte-level vocabulary lacking some bytes, they are
//! dropped, and [`Tokenizer::unencodable_bytes`] lists the bytes concerned.

use std::path::Path;

use kiln_gguf::torch::{self, Value};

use crate::error::{BpeError, Result};
use crate::pretokenize::{PreTokenizer, RegexSplit, Split};
use crate::tokenizer::{Tokenizer, TokenizerParts};

/// Every character as its own piece (`.` with `s`: newlines too).
const ONE_CHARACTER: &str = "(?s).";

impl Tokenizer {
    /// A character-level tokenizer: `chars[i]` is the character of id `i`.
    pub fn from_chars<S: AsRef<str>>(chars: &[S]) -> Result<Self> {
        let mut vocab = Vec::with_capacity(chars.len());
        for (id, c) in chars.iter().enumerate() {
            let c = c.as_ref();
            if c.chars().count() != 1 {
                return Err(BpeError::InvalidToken {
                    token: c.to_owned(),
                    id: id as u32,
                    reason: "a character vocabulary entry must be exactly one character",
                });
            }
            vocab.push((c.as_bytes().to_vec(), id as u32));
        }
        let split = RegexSplit::new(ONE_CHARACTER)?;
        Tokenizer::from_parts(TokenizerParts {
            vocab,
            merges: Vec::new(),
            added: Vec::new(),
            pre_tokenizer: PreTokenizer::with_split(Split::Regex(std::sync::Arc::new(split))),
            ignore_merges: true,
            bos_id: None,
            eos_id: None,
        })
    }

    /// The character vocabulary of a nanoGPT `meta.pkl` (`itos`, a dict from id to character),
    /// read with the restricted unpickler of [`kiln_gguf::torch`] (nothing imported or called).
    pub fn from_nanogpt_meta(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bad = |reason: String| BpeError::Unsupported(format!("{}: {reason}", path.display()));
        let meta = torch::load_pickle(path).map_err(|e| bad(e.to_string()))?;
        let itos = meta
            .get("itos")
            .and_then(Value::as_dict)
            .ok_or_else(|| bad("no `itos` dict (nanoGPT's id-to-character table)".into()))?;
        let mut chars = vec![None; itos.len()];
        for (key, value) in itos.iter() {
            let id = match key {
                torch::Key::Int(i) => usize::try_from(*i).ok().filter(|&i| i < chars.len()),
                _ => None,
            }
            .ok_or_else(|| {
                bad(format!(
                    "`itos` key {key} is not an id below {}",
                    itos.len()
                ))
            })?;
            let c = value
                .as_str()
                .ok_or_else(|| bad(format!("`itos[{id}]` is not a string")))?;
            chars[id] = Some(c.to_owned());
        }
        let chars: Vec<String> = chars
            .into_iter()
            .enumerate()
            .map(|(id, c)| c.ok_or_else(|| bad(format!("`itos` has no id {id}"))))
            .collect::<Result<_>>()?;
        Tokenizer::from_chars(&chars)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_token_per_character_multi_byte_ones_included() {
        let chars = ["\n", " ", "a", "b", "é", "ß"];
        let tok = Tokenizer::from_chars(&chars).unwrap();
        assert_eq!(tok.vocab_size(), 6);
        let ids = tok.encode("ab é\nßa");
        assert_eq!(ids, [2, 3, 1, 4, 0, 5, 2]);
        assert_eq!(tok.decode(&ids).unwrap(), "ab é\nßa");
        // A character outside the vocabulary has no id and is dropped.
        assert_eq!(tok.encode("axb"), [2, 3]);
        // Entries of more than one character are refused.
        assert!(Tokenizer::from_chars(&["a", "ab"]).is_err());
        // The tokenizer.json round trip keeps the behaviour.
        let back = Tokenizer::from_json_str(&tok.to_json().unwrap()).unwrap();
        assert_eq!(back.encode("ab é\nßa"), ids);
    }
}
