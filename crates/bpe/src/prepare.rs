//! Turning a corpus into `train.bin` / `val.bin` token shards (llm.c's format).
//!
//! `out_dir/tokenizer.json` records the tokenizer the ids come from. Each input file is a document; every document starts with the end-of-text token (as llm.c's
//! data scripts do) when the tokenizer has one. The split is nanoGPT's: the last `val_fraction` of
//! the corpus bytes, cut at the first line boundary after that point, is validation. The corpus is
//! streamed in chunks, so memory stays bounded whatever its size.

use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;

use crate::corpus::{ChunkReader, DEFAULT_CHUNK_BYTES, total_bytes};
use crate::error::{BpeError, Result};
use crate::shard::{ShardWriter, TokenWidth};
use crate::tokenizer::{SpecialTokens, Tokenizer};
use crate::trainer::{BpeTrainer, TrainerConfig};

/// Settings for [`prepare`].
#[derive(Clone, Debug)]
pub struct PrepareConfig {
    /// Fraction of the corpus (by bytes, from the end) that goes to `val.bin`; in `[0, 1)`.
    pub val_fraction: f64,
    /// Chunk size for streaming.
    pub chunk_bytes: usize,
    /// Draw a progress bar on stderr.
    pub show_progress: bool,
}

impl Default for PrepareConfig {
    fn default() -> Self {
        Self {
            val_fraction: 0.1,
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            show_progress: false,
        }
    }
}

/// What [`prepare`] wrote.
#[derive(Clone, Debug)]
pub struct PrepareReport {
    /// Path of the training shard.
    pub train_path: PathBuf,
    /// Path of the validation shard.
    pub val_path: PathBuf,
    /// Tokens in `train.bin`.
    pub train_tokens: u64,
    /// Tokens in `val.bin`.
    pub val_tokens: u64,
    /// Bytes of text read.
    pub bytes: u64,
    /// Number of documents (files).
    pub documents: usize,
    /// Token width on disk.
    pub width: TokenWidth,
    /// The token written before each document, if the tokenizer has an end-of-text token.
    pub separator: Option<u32>,
    /// Wall time.
    pub seconds: f64,
}

/// Character-level shards, as nanoGPT's `shakespeare_char`: trains a byte-level tokenizer with
/// no merges (the 256 byte tokens and `<|endoftext|>`: one token per character of ASCII text) on
/// `files`, then [`prepare`]s them with it. Returns the tokenizer and the report.
pub fn prepare_bytes(
    files: &[PathBuf],
    out_dir: &Path,
    cfg: &PrepareConfig,
) -> Result<(Tokenizer, PrepareReport)> {
    let config = TrainerConfig::default();
    let mut trainer = BpeTrainer::new(TrainerConfig {
        vocab_size: 256 + config.special_tokens.len(),
        ..config
    })?;
    trainer.feed_files(files)?;
    let tok = trainer.finish()?;
    let report = prepare(&tok, files, out_dir, cfg)?;
    Ok((tok, report))
}

/// Tokenizes `files` into `out_dir/train.bin` and `out_dir/val.bin`.
pub fn prepare(
    tok: &Tokenizer,
    files: &[PathBuf],
    out_dir: &Path,
    cfg: &PrepareConfig,
) -> Result<PrepareReport> {
    if !(0.0..1.0).contains(&cfg.val_fraction) {
        return Err(BpeError::InvalidArgument(format!(
            "val fraction {} must be in [0, 1)",
            cfg.val_fraction
        )));
    }
    if files.is_empty() {
        return Err(BpeError::EmptyCorpus);
    }
    let total = total_bytes(files)?;
    if total == 0 {
        return Err(BpeError::EmptyCorpus);
    }
    let started = Instant::now();
    std::fs::create_dir_all(out_dir).map_err(|e| BpeError::io(out_dir, e))?;
    let width = TokenWidth::for_vocab(tok.vocab_size());
    let train_path = out_dir.join("train.bin");
    let val_path = out_dir.join("val.bin");
    let mut train = ShardWriter::create(&train_path, width)?;
    let mut val = ShardWriter::create(&val_path, width)?;
    let separator = tok.eot_id();
    // The shards' ids only mean something with their tokenizer: keep it beside them.
    tok.save(out_dir.join("tokenizer.json"))?;

    let mut reader = ChunkReader::new(files.to_vec(), cfg.chunk_bytes);
    if cfg.val_fraction > 0.0 {
        reader = reader.split_at((total as f64 * (1.0 - cfg.val_fraction)).round() as u64);
    }
    let bar = if cfg.show_progress {
        let bar = ProgressBar::new(total);
        if let Ok(style) = ProgressStyle::with_template(
            "tokenizing [{bar:30}] {percent:>3}% {bytes}/{total_bytes} {bytes_per_sec} (eta {eta})",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    } else {
        ProgressBar::hidden()
    };
    let group = 2 * rayon::current_num_threads().max(1);
    loop {
        let mut chunks = Vec::with_capacity(group);
        while chunks.len() < group {
            match reader.next_chunk()? {
                Some(c) => chunks.push(c),
                None => break,
            }
        }
        if chunks.is_empty() {
            break;
        }
        let encoded: Vec<Vec<u32>> = chunks
            .par_iter()
            .map(|c| tok.encode_bytes(&c.bytes, SpecialTokens::AsText))
            .collect();
        for (chunk, ids) in chunks.iter().zip(&encoded) {
            let writer = if chunk.after_split {
                &mut val
            } else {
                &mut train
            };
            if chunk.doc_start
                && let Some(eot) = separator
            {
                writer.write_tokens(&[eot])?;
            }
            writer.write_tokens(ids)?;
            bar.inc(chunk.bytes.len() as u64);
        }
    }
    bar.finish_and_clear();
    Ok(PrepareReport {
        train_tokens: train.finish()?,
        val_tokens: val.finish()?,
        train_path,
        val_path,
        bytes: total,
        documents: files.len(),
        width,
        separator,
        seconds: started.elapsed().as_secs_f64(),
    })
}
