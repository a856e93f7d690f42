//! The tokenizer embedded in a GGUF model (`tokenizer.ggml.*` keys), read as llama.cpp reads it:
//! - `model == "gpt2"`: byte-level BPE with the pre-tokenizer of `tokenizer.ggml.pre` (see
//!   [`crate::llama_pre`]; a missing `pre` is llama.cpp's `default`);
//! - `model == "gemma4"`: BPE over raw UTF-8 with `▁` for spaces and `<0xXX>` byte fallback;
//! - `model == "llama"`: SentencePiece (merging by token score, byte fallback, a space before the
//!   text).
//!
//! Any other model (`bert`, `t5`, `rwkv`, ...) or pre-tokenizer name is a
//! [`BpeError::UnsupportedGguf`] naming the key and its value.

use kiln_gguf::GgufFile;

use crate::byte_level;
use crate::error::{BpeError, Result};
use crate::hf_json::merge_from_line;
use crate::llama_pre::{LlamaPre, llama_pre};
use crate::spm::{self, Merging, SentencePiece};
use crate::tokenizer::{AddedToken, Tokenizer, TokenizerParts};

/// llama.cpp token types (`tokenizer.ggml.token_type`).
const TOKEN_TYPE_UNKNOWN: i32 = 2;
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;
const TOKEN_TYPE_UNUSED: i32 = 5;
const TOKEN_TYPE_BYTE: i32 = 6;

const MODEL_KEY: &str = "tokenizer.ggml.model";
const PRE_KEY: &str = "tokenizer.ggml.pre";

/// Builds the tokenizer from a parsed GGUF file.
pub(crate) fn from_gguf(file: &GgufFile) -> Result<Tokenizer> {
    let model = file.get_str(MODEL_KEY)?;
    match model {
        "gpt2" => {
            let pre = match file.get(PRE_KEY) {
                Some(_) => file.get_str(PRE_KEY)?,
                None => "default",
            };
            let pre = llama_pre(pre).map_err(|_| unsupported_pre(pre))?;
            if pre.raw_utf8 {
                return raw_utf8_bpe(file, pre);
            }
            byte_level_bpe(file, pre)
        }
        // llama.cpp reads a Gemma 4 vocabulary with the `gemma4` pre-tokenizer whatever `pre` says.
        "gemma4" => raw_utf8_bpe(file, llama_pre("gemma4")?),
        "llama" => sentencepiece(file),
        other => Err(BpeError::UnsupportedGguf {
            key: MODEL_KEY,
            value: other.to_owned(),
            reason: match other {
                "bert" => "WordPiece (WPM) vocabularies are not supported",
                "t5" => "Unigram (UGM) vocabularies are not supported",
                "rwkv" => "RWKV's trie tokenizer is not supported",
                "plamo2" => "PLaMo-2's tokenizer is not supported",
                "no_vocab" | "none" => "the file has no vocabulary",
                _ => "not a tokenizer model Kiln knows",
            },
        }),
    }
}

fn unsupported_pre(value: &str) -> BpeError {
    BpeError::UnsupportedGguf {
        key: PRE_KEY,
        value: value.to_owned(),
        reason: "not a pre-tokenizer type llama.cpp knows",
    }
}

/// The parts every vocabulary has: token texts and types, the special-token ids.
struct Vocab<'a> {
    tokens: &'a [String],
    types: &'a [i32],
    bos_id: Option<u32>,
    eos_id: Option<u32>,
}

impl<'a> Vocab<'a> {
    fn read(file: &'a GgufFile) -> Result<Self> {
        let tokens = file.get_string_array("tokenizer.ggml.tokens")?;
        let types: &[i32] = match file.get("tokenizer.ggml.token_type") {
            Some(_) => file.get_i32_array("tokenizer.ggml.token_type")?,
            None => &[],
        };
        // As llama.cpp: an id outside the vocabulary is ignored.
        let id_of = |key: &str| {
            file.get(key)
                .and_then(|v| v.as_u64())
                .and_then(|i| u32::try_from(i).ok())
                .filter(|&i| (i as usize) < tokens.len())
        };
        Ok(Self {
            tokens,
            types,
            bos_id: id_of("tokenizer.ggml.bos_token_id"),
            eos_id: id_of("tokenizer.ggml.eos_token_id"),
        })
    }

    fn token_type(&self, id: usize) -> i32 {
        self.types.get(id).copied().unwrap_or(1)
    }

    /// Control, unknown and user-defined tokens: matched in the text before the model runs
    /// (control and unknown ones only when parsing special tokens), as llama.cpp does.
    fn added(&self) -> Vec<AddedToken> {
        (0..self.tokens.len())
            .filter_map(|i| {
                let ty = self.token_type(i);
                let special = ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_UNKNOWN;
                (special || ty == TOKEN_TYPE_USER_DEFINED).then(|| AddedToken {
                    id: i as u32,
                    content: self.tokens[i].clone(),
                    special,
                })
            })
            .filter(|t| !t.content.is_empty())
            .collect()
    }
}

/// `tokenizer.ggml.merges` split at the first space after the first character, as llama.cpp does.
fn raw_merges(file: &GgufFile) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let merges = file.get_string_array("tokenizer.ggml.merges")?;
    Ok(merges
        .iter()
        .map(|m| {
            let first_len = m.chars().next().map_or(0, char::len_utf8);
            match m[first_len..].find(' ') {
                Some(p) => (
                    m.as_bytes()[..first_len + p].to_vec(),
                    m.as_bytes()[first_len + p + 1..].to_vec(),
                ),
                None => (Vec::new(), Vec::new()),
            }
        })
        .collect())
}

fn byte_level_bpe(file: &GgufFile, pre: LlamaPre) -> Result<Tokenizer> {
    let vocab_info = Vocab::read(file)?;
    let added = vocab_info.added();
    let merges_raw = file.get_string_array("tokenizer.ggml.merges")?;
    let mut vocab = Vec::with_capacity(vocab_info.tokens.len());
    // Tokens stored as raw text rather than byte-level strings (Command-R's emoji, for one): no
    // byte-level word can ever equal them, so llama.cpp never produces them; they decode to their
    // text.
    let mut raw = Vec::new();
    for (i, token) in vocab_info.tokens.iter().enumerate() {
        let ty = vocab_info.token_type(i);
        let is_added = matches!(
            ty,
            TOKEN_TYPE_CONTROL | TOKEN_TYPE_UNKNOWN | TOKEN_TYPE_USER_DEFINED
        );
        if is_added || token.is_empty() {
            continue;
        }
        match byte_level::decode_str(token) {
            Some(bytes) => vocab.push((bytes, i as u32)),
            None => raw.push((i as u32, token.as_bytes().to_vec())),
        }
    }
    let mut merges = Vec::with_capacity(merges_raw.len());
    for (index, m) in merges_raw.iter().enumerate() {
        merges.push(merge_from_line(index, m)?);
    }
    Ok(Tokenizer::from_parts(TokenizerParts {
        vocab,
        merges,
        added,
        pre_tokenizer: pre.pre_tokenizer,
        ignore_merges: pre.ignore_merges,
        bos_id: vocab_info.bos_id,
        eos_id: vocab_info.eos_id,
    })?
    .with_decode_only(raw))
}

/// What each id decodes to in a `▁`-escaped vocabulary, following llama.cpp's `token_to_piece`.
fn escaped_pieces(vocab: &Vocab) -> Vec<Vec<u8>> {
    vocab
        .tokens
        .iter()
        .enumerate()
        .map(|(i, t)| match vocab.token_type(i) {
            TOKEN_TYPE_CONTROL | TOKEN_TYPE_UNKNOWN | TOKEN_TYPE_USER_DEFINED => {
                t.as_bytes().to_vec()
            }
            TOKEN_TYPE_BYTE => spm::byte_token_value(t).map_or_else(Vec::new, |b| vec![b]),
            TOKEN_TYPE_UNUSED => Vec::new(),
            _ => spm::unescape(t),
        })
        .collect()
}

fn raw_utf8_bpe(file: &GgufFile, pre: LlamaPre) -> Result<Tokenizer> {
    let vocab = Vocab::read(file)?;
    let (pieces, merges) = spm::intern_merges(&raw_merges(file)?);
    let model = SentencePiece::new(
        vocab.tokens,
        Merging::Ranks {
            merges,
            pieces,
            split: pre.pre_tokenizer,
            ignore_merges: pre.ignore_merges,
            newline_words: true,
        },
        false,
        pre.escape_whitespace,
    );
    Tokenizer::from_sentencepiece(
        model,
        escaped_pieces(&vocab),
        vocab.added(),
        vocab.bos_id,
        vocab.eos_id,
    )
}

fn sentencepiece(file: &GgufFile) -> Result<Tokenizer> {
    let vocab = Vocab::read(file)?;
    let scores: Vec<f32> = match file.get("tokenizer.ggml.scores") {
        None => vec![0.0; vocab.tokens.len()],
        Some(v) => match v.as_array() {
            Some(a) if a.as_f32s().is_some() => a.as_f32s().unwrap_or_default().to_vec(),
            Some(a) if a.as_i32s().is_some() => a
                .as_i32s()
                .unwrap_or_default()
                .iter()
                .map(|&s| s as f32)
                .collect(),
            _ => {
                return Err(BpeError::UnsupportedGguf {
                    key: "tokenizer.ggml.scores",
                    value: format!("{v:?}").chars().take(80).collect(),
                    reason: "scores must be an array of f32 or i32",
                });
            }
        },
    };
    let add_space_prefix = match file.get("tokenizer.ggml.add_space_prefix") {
        Some(_) => file.get_bool("tokenizer.ggml.add_space_prefix")?,
        None => true,
    };
    let model = SentencePiece::new(
        vocab.tokens,
        Merging::Scores(scores),
        add_space_prefix,
        true,
    );
    Tokenizer::from_sentencepiece(
        model,
        escaped_pieces(&vocab),
        vocab.added(),
        vocab
            .bos_id
            .or(Some(1))
            .filter(|&i| (i as usize) < vocab.tokens.len()),
        vocab
            .eos_id
            .or(Some(2))
            .filter(|&i| (i as usize) < vocab.tokens.len()),
    )
}
