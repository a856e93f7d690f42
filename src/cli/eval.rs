//! `kiln eval`: validation loss on a token shard, or perplexity on a text file by llama.cpp's
//! protocol.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args as ClapArgs;
use kiln::bpe::TokenShard;
use kiln::gguf::GgufFile;
use kiln::trainer::perplexity::perplexity_windows;
use kiln::trainer::{PerplexitySettings, evaluate, perplexity};

#[derive(Debug, ClapArgs)]
#[command(group = clap::ArgGroup::new("what").required(true).args(["data", "perplexity"]))]
pub struct Args {
    #[command(flatten)]
    pub model: crate::cli::ModelArgs,
    /// Token shards directory: the validation loss of DIR/val.bin.
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// A text file: its perplexity by llama.cpp's protocol (non-overlapping windows of --ctx
    /// tokens, each scored on its second half), ± the standard error.
    #[arg(long, value_name = "FILE")]
    pub perplexity: Option<PathBuf>,
    /// Tokens per perplexity window.
    #[arg(long, default_value_t = 512, value_name = "T")]
    pub ctx: usize,
    /// Score only the first N perplexity windows (llama.cpp's --chunks).
    #[arg(long, value_name = "N")]
    pub chunks: Option<usize>,
    /// Tokens per validation window (--data; default: the model's context, at most 256).
    #[arg(long, value_name = "T")]
    pub seq_len: Option<usize>,
    /// Windows per batch.
    #[arg(long, value_name = "B")]
    pub batch: Option<usize>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let device = Default::default();
    let loaded = args.model.load()?;
    if let Some(text_path) = &args.perplexity {
        let tokenizer = loaded.require_tokenizer()?;
        let text = std::fs::read_to_string(text_path)
            .with_context(|| format!("reading {}", text_path.display()))?;
        let tokens = tokenizer.encode(&text);
        let settings = PerplexitySettings {
            ctx: args.ctx,
            batch: args.batch.unwrap_or(1).max(1),
            max_windows: args.chunks,
            bos: if adds_bos(&args.model.model) {
                tokenizer.bos_id()
            } else {
                None
            },
        };
        let windows = perplexity_windows(tokens.len(), &settings);
        let bar = super::progress_bar(
            windows as u64,
            "{bar:30} {pos}/{len} windows {msg} [{elapsed} < {eta}]",
        );
        let result = perplexity(&loaded.model, &tokens, &settings, |done, _, so_far| {
            bar.set_position(done as u64);
            bar.set_message(format!("ppl {:.4}", so_far.perplexity));
        })?;
        bar.finish_and_clear();
        println!(
            "perplexity {:.4} ± {:.5} ({} windows of {}, {} tokens scored, mean NLL {:.5})",
            result.perplexity,
            result.std_error,
            result.windows,
            settings.ctx,
            result.tokens,
            result.mean_nll
        );
        return Ok(());
    }
    let Some(data) = &args.data else {
        anyhow::bail!("give --data DIR or --perplexity FILE");
    };
    let val = TokenShard::open(data.join("val.bin"))?;
    let seq = args
        .seq_len
        .unwrap_or(loaded.model.config().context_length.min(256));
    let batch = args.batch.unwrap_or(8).max(1);
    let loss = evaluate(&loaded.model, &val, batch, seq, 0, &device)?;
    println!(
        "val_loss {loss:.4} perplexity {:.3} ({} tokens)",
        loss.exp(),
        val.len()
    );
    Ok(())
}

/// Whether the model's tokenizer starts every sequence with BOS (GGUF's
/// `tokenizer.ggml.add_bos_token`, as llama.cpp reads it; other formats: no).
fn adds_bos(model: &std::path::Path) -> bool {
    if !model.is_file() {
        return false;
    }
    GgufFile::open(model)
        .ok()
        .and_then(|f| f.get_bool("tokenizer.ggml.add_bos_token").ok())
        .unwrap_or(false)
}
