//! A byte-level BPE tokenizer as GGUF metadata (`tokenizer.ggml.*`), the inverse of reading one
//! ([`Tokenizer::from_gguf`]): what llama.cpp needs to run a model Kiln writes.

use kiln_gguf::{GgufArray, GgufValue};

use crate::byte_level::encode_bytes;
use crate::error::{BpeError, Result};
use crate::llama_pre::llama_pre;
use crate::pretokenize::Split;
use crate::tokenizer::Tokenizer;

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// llama.cpp pre-tokenizer names tried, in order, for a tokenizer whose split is one custom regex.
const SINGLE_REGEX_NAMES: [&str; 8] = [
    "qwen2",
    "qwen35",
    "deepseek-v3",
    "gpt-4o",
    "tekken",
    "bloom",
    "chatglm-bpe",
    "olmo",
];

impl Tokenizer {
    /// The name of llama.cpp's pre-tokenizer (`tokenizer.ggml.pre`) that splits text as this
    /// tokenizer does, if there is one.
    pub fn llama_pre_name(&self) -> Option<String> {
        let pre = self.pre_tokenizer();
        if pre.add_prefix_space {
            return None;
        }
        match (&pre.split, pre.individual_digits) {
            (Split::Llama(split), false) => Some(split.name().to_owned()),
            (Split::Gpt2, false) => Some("gpt-2".into()),
            // Digits one by one, then GPT-2's regex: StarCoder's and SmolLM's.
            (Split::Gpt2, true) => Some("smollm".into()),
            (Split::Cl100k, false) => Some("llama-bpe".into()),
            (Split::Regex(_), false) => {
                let pattern = pre.split.pattern()?;
                SINGLE_REGEX_NAMES
                    .iter()
                    .find(|name| {
                        llama_pre(name).is_ok_and(|p| match &p.pre_tokenizer.split {
                            Split::Llama(split) if !p.raw_utf8 && !p.ignore_merges => {
                                split.patterns().eq(std::iter::once(pattern))
                            }
                            _ => false,
                        })
                    })
                    .map(|name| (*name).to_owned())
            }
            _ => None,
        }
    }

    /// This tokenizer as GGUF metadata for a model of `vocab_size` embeddings:
    /// `tokenizer.ggml.model = "gpt2"`, the pre-tokenizer's name, every token's text (GPT-2's
    /// byte-to-character mapping) and type, the merges, the special ids. Ids past the tokenizer's
    /// own (a model padded to a round vocabulary, as nanoGPT pads GPT-2's 50,257 to 50,304) are
    /// unused placeholder tokens, since llama.cpp needs one token per embedding. Byte-level BPE
    /// only; [`BpeError::Unsupported`] for SentencePiece vocabularies and for splits llama.cpp has
    /// no name for, [`BpeError::InvalidArgument`] for more tokens than embeddings.
    pub fn gguf_metadata(&self, vocab_size: usize) -> Result<Vec<(String, GgufValue)>> {
        if self.vocab_size() > vocab_size {
            return Err(BpeError::InvalidArgument(format!(
                "the tokenizer has {} tokens but the model only {vocab_size} embeddings",
                self.vocab_size()
            )));
        }
        if self.is_sentencepiece() {
            return Err(BpeError::Unsupported(
                "writing a SentencePiece vocabulary to GGUF".into(),
            ));
        }
        let pre = self.llama_pre_name().ok_or_else(|| {
            BpeError::Unsupported(format!(
                "no llama.cpp pre-tokenizer splits text as this one does ({:?})",
                self.pre_tokenizer().split
            ))
        })?;
        let size = vocab_size;
        let mut tokens = vec![String::new(); size];
        let mut types = vec![UNUSED; size];
        for (bytes, id) in &self.parts().vocab {
            tokens[*id as usize] = encode_bytes(bytes);
            types[*id as usize] = NORMAL;
        }
        for added in self.added_tokens() {
            tokens[added.id as usize] = added.content.clone();
            types[added.id as usize] = if added.special { CONTROL } else { USER_DEFINED };
        }
        // Unused ids still need a distinct text for llama.cpp's token table.
        for (id, token) in tokens.iter_mut().enumerate() {
            if token.is_empty() {
                *token = format!("[UNUSED_{id}]");
            }
        }
        let merges = self
            .parts()
            .merges
            .iter()
            .map(|(a, b)| format!("{} {}", encode_bytes(a), encode_bytes(b)))
            .collect();
        let mut out = vec![
            (
                "tokenizer.ggml.model".to_owned(),
                GgufValue::String("gpt2".into()),
            ),
            ("tokenizer.ggml.pre".to_owned(), GgufValue::String(pre)),
            (
                "tokenizer.ggml.tokens".to_owned(),
                GgufValue::Array(GgufArray::String(tokens)),
            ),
            (
                "tokenizer.ggml.token_type".to_owned(),
                GgufValue::Array(GgufArray::I32(types)),
            ),
            (
                "tokenizer.ggml.merges".to_owned(),
                GgufValue::Array(GgufArray::String(merges)),
            ),
        ];
        for (key, id) in [
            ("tokenizer.ggml.bos_token_id", self.bos_id()),
            ("tokenizer.ggml.eos_token_id", self.eos_id()),
        ] {
            if let Some(id) = id {
                out.push((key.to_owned(), GgufValue::U32(id)));
            }
        }
        Ok(out)
    }
}
