//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong in `kiln-bpe`, each with a message that says what and where.
#[derive(Debug, thiserror::Error)]
pub enum BpeError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A tokenizer file is not valid JSON or not the expected shape.
    #[error("corrupt tokenizer file {}: {source}", path.display())]
    Json {
        /// The file (empty when parsed from a string).
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A tokenizer uses a component Kiln does not implement.
    #[error("unsupported tokenizer: {0}")]
    Unsupported(String),
    /// A GGUF file's tokenizer is of a kind Kiln does not read (e.g. `tokenizer.ggml.model = "bert"`).
    #[error("unsupported GGUF tokenizer: {key} = {value:?}: {reason}")]
    UnsupportedGguf {
        /// The metadata key.
        key: &'static str,
        /// Its value in the file.
        value: String,
        /// Why it is not supported.
        reason: &'static str,
    },
    /// A vocabulary entry is malformed.
    #[error("invalid token {token:?} (id {id}): {reason}")]
    InvalidToken {
        /// The token as written in the file.
        token: String,
        /// Its id.
        id: u32,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A merge rule is malformed or refers to unknown tokens.
    #[error("merge #{index} {merge:?}: {reason}")]
    BadMerge {
        /// Position of the merge in the list (0-based).
        index: usize,
        /// The merge as written.
        merge: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A token id is not in the vocabulary.
    #[error("token id {id} is out of range (vocabulary size {vocab_size})")]
    IdOutOfRange {
        /// The id.
        id: u64,
        /// The vocabulary size.
        vocab_size: usize,
    },
    /// The requested vocabulary cannot even hold the byte alphabet and the special tokens.
    #[error(
        "vocab size {requested} is too small: byte-level BPE needs at least {minimum} (256 bytes + special tokens)"
    )]
    VocabTooSmall {
        /// What was asked for.
        requested: usize,
        /// The smallest possible size.
        minimum: usize,
    },
    /// Training was given no text.
    #[error("the training corpus is empty")]
    EmptyCorpus,
    /// A custom pre-tokenizer regex does not compile.
    #[error("invalid pre-tokenizer regex: {0}")]
    Regex(#[from] Box<fancy_regex::Error>),
    /// A GGUF file could not be read.
    #[error(transparent)]
    Gguf(#[from] kiln_gguf::GgufError),
    /// A token shard could not be read or written.
    #[error(transparent)]
    Shard(#[from] crate::shard::ShardError),
    /// A caller-supplied argument is out of range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl BpeError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        BpeError::Io {
            path: path.into(),
            source,
        }
    }
}

/// `Result` with [`BpeError`].
pub type Result<T, E = BpeError> = std::result::Result<T, E>;
