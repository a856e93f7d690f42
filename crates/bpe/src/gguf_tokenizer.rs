//! The tokenizer embedded in a GGUF model (`tokenizer.ggml.*` keys, `model == "gpt2"`).

use crate::byte_level;
use crate::error::{BpeError, Result};
use crate::hf_json::merge_from_line;
use crate::pretokenize::{PreTokenizer, Split};
use crate::tokenizer::{AddedToken, Tokenizer, TokenizerParts};
use kiln_gguf::GgufFile;

/// llama.cpp token types (`tokenizer.ggml.token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Maps llama.cpp's `tokenizer.ggml.pre` names to Kiln pre-tokenizers.
pub(crate) fn pre_tokenizer_for(name: &str) -> Result<PreTokenizer> {
    let digits_then_gpt2 = PreTokenizer {
        individual_digits: true,
        ..PreTokenizer::gpt2()
    };
    Ok(match name {
        "gpt-2" | "gpt2" | "default" | "phi-2" | "jais" => PreTokenizer::gpt2(),
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            digits_then_gpt2
        }
        "llama3" | "llama-bpe" | "llama-v3" | "dbrx" | "smaug-bpe" | "falcon3" | "pixtral" => {
            PreTokenizer::with_split(Split::Cl100k)
        }
        other => {
            return Err(BpeError::Unsupported(format!(
                "GGUF pre-tokenizer {other:?} (supported: gpt-2, smollm/starcoder, llama3)"
            )));
        }
    })
}

/// Builds the tokenizer from a parsed GGUF file.
pub(crate) fn from_gguf(file: &GgufFile) -> Result<Tokenizer> {
    let model = file.get_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(BpeError::Unsupported(format!(
            "GGUF tokenizer model {model:?} (only byte-level BPE, \"gpt2\", is supported)"
        )));
    }
    let tokens = file.get_string_array("tokenizer.ggml.tokens")?;
    let merges_raw = file.get_string_array("tokenizer.ggml.merges")?;
    let types: &[i32] = match file.get("tokenizer.ggml.token_type") {
        Some(_) => file.get_i32_array("tokenizer.ggml.token_type")?,
        None => &[],
    };
    let pre = match file.get("tokenizer.ggml.pre") {
        Some(_) => pre_tokenizer_for(file.get_str("tokenizer.ggml.pre")?)?,
        None => PreTokenizer::gpt2(),
    };
    let id_of = |key: &str| {
        file.get(key)
            .and_then(|v| v.as_u64())
            .and_then(|i| u32::try_from(i).ok())
    };

    let mut vocab = Vec::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        let id = i as u32;
        let ty = types.get(i).copied().unwrap_or(1);
        if ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED {
            added.push(AddedToken {
                id,
                content: token.clone(),
                special: ty == TOKEN_TYPE_CONTROL,
            });
            continue;
        }
        let bytes = byte_level::decode_str(token).ok_or_else(|| BpeError::InvalidToken {
            token: token.clone(),
            id,
            reason: "not a byte-level token",
        })?;
        vocab.push((bytes, id));
    }
    let mut merges = Vec::with_capacity(merges_raw.len());
    for (index, m) in merges_raw.iter().enumerate() {
        merges.push(merge_from_line(index, m)?);
    }
    Tokenizer::from_parts(TokenizerParts {
        vocab,
        merges,
        added,
        pre_tokenizer: pre,
        ignore_merges: false,
        bos_id: id_of("tokenizer.ggml.bos_token_id"),
        eos_id: id_of("tokenizer.ggml.eos_token_id"),
    })
}
