//! # kiln-bpe
//!
//! Byte-level BPE for Kiln, the first stage of the pipeline: train a vocabulary from raw text, load
//! the tokenizers people already have (HF `tokenizer.json`, GPT-2 `vocab.json` + `merges.txt`, the
//! tokenizer inside a GGUF model), encode and decode losslessly, and turn a corpus into llm.c-format
//! token shards that the trainer samples from.
//!
//! ```no_run
//! use kiln_bpe::{BpeTrainer, TrainerConfig};
//!
//! let mut trainer = BpeTrainer::new(TrainerConfig { vocab_size: 4096, ..Default::default() })?;
//! trainer.feed(b"the quick brown fox jumps over the lazy dog");
//! let tok = trainer.finish()?;
//! let ids = tok.encode("the lazy fox");
//! assert_eq!(tok.decode(&ids)?, "the lazy fox");
//! tok.save("tokenizer.json")?;
//! # Ok::<(), kiln_bpe::BpeError>(())
//! ```

#![warn(missing_docs)]

pub mod byte_level;
mod cache;
mod char_vocab;
pub mod corpus;
mod error;
mod gguf_metadata;
mod gguf_tokenizer;
mod hf_json;
mod llama_pre;
mod llama_regex;
pub mod prepare;
pub mod pretokenize;
pub mod shard;
mod spm;
mod tokenizer;
mod trainer;

use std::path::Path;

pub use error::{BpeError, Result};
pub use pretokenize::{PreTokenizer, Split};
pub use shard::{ShardError, ShardWriter, TokenShard, TokenWidth};
pub use tokenizer::{
    AddedToken, Encoding, SpecialTokens, StreamDecoder, Tokenizer, TokenizerParts,
};
pub use trainer::{BpeTrainer, TrainerConfig};

impl Tokenizer {
    /// Loads a tokenizer from a path: a GGUF model (by its magic bytes), an HF `tokenizer.json`, a
    /// nanoGPT character vocabulary (`meta.pkl`), or a directory holding `tokenizer.json` or
    /// `vocab.json` + `merges.txt`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if path.is_dir() {
            let json = path.join("tokenizer.json");
            if json.exists() {
                return Self::from_file(json);
            }
            return hf_json::from_vocab_merges(&path.join("vocab.json"), &path.join("merges.txt"));
        }
        if path.extension().is_some_and(|e| e == "pkl") {
            return Self::from_nanogpt_meta(path);
        }
        let mut magic = [0u8; 4];
        let mut file = std::fs::File::open(path).map_err(|e| BpeError::io(path, e))?;
        if std::io::Read::read_exact(&mut file, &mut magic).is_ok() && &magic == b"GGUF" {
            return Self::from_gguf(path);
        }
        let text = std::fs::read_to_string(path).map_err(|e| BpeError::io(path, e))?;
        hf_json::from_json(&text, path)
    }

    /// Parses an HF `tokenizer.json` document.
    pub fn from_json_str(json: &str) -> Result<Self> {
        hf_json::from_json(json, Path::new("<string>"))
    }

    /// Loads GPT-2-style `vocab.json` + `merges.txt`.
    pub fn from_vocab_merges(vocab: impl AsRef<Path>, merges: impl AsRef<Path>) -> Result<Self> {
        hf_json::from_vocab_merges(vocab.as_ref(), merges.as_ref())
    }

    /// Loads the tokenizer embedded in a GGUF model as llama.cpp reads it: byte-level BPE
    /// (`tokenizer.ggml.model == "gpt2"`, with every `tokenizer.ggml.pre` type llama.cpp knows),
    /// SentencePiece (`"llama"`) or SPM-style BPE (`"gemma4"`). Other models are a
    /// [`BpeError::UnsupportedGguf`].
    pub fn from_gguf(path: impl AsRef<Path>) -> Result<Self> {
        let file = kiln_gguf::GgufFile::open(path)?;
        gguf_tokenizer::from_gguf(&file)
    }

    /// This tokenizer as an HF `tokenizer.json` document (byte-level BPE only; a SentencePiece
    /// vocabulary read from a GGUF file is [`BpeError::Unsupported`]).
    pub fn to_json(&self) -> Result<String> {
        if self.is_sentencepiece() {
            return Err(BpeError::Unsupported(
                "writing a SentencePiece-style GGUF vocabulary as tokenizer.json".into(),
            ));
        }
        Ok(hf_json::to_json(self))
    }

    /// Writes `tokenizer.json` atomically (temp file + rename).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        kiln_gguf::atomic::write(path, self.to_json()?.as_bytes())
            .map_err(|e| BpeError::io(path, e))
    }
}
