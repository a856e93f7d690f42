//! `kiln data …`

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args as ClapArgs, Subcommand};
use kiln::bpe::Tokenizer;
use kiln::bpe::prepare::{PrepareConfig, PrepareReport, prepare};

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Tokenize text files into DIR/train.bin and DIR/val.bin (llm.c's token shard format).
    Prepare(PrepareArgs),
}

#[derive(Debug, ClapArgs)]
pub struct PrepareArgs {
    /// A tokenizer.json, a .gguf model, or a tokenizer directory.
    #[arg(long, short, value_name = "T")]
    pub tokenizer: PathBuf,
    /// Output directory.
    #[arg(long, short, value_name = "DIR")]
    pub output: PathBuf,
    /// Fraction of the corpus, taken from its end, that becomes val.bin.
    #[arg(long, default_value_t = 0.1, value_name = "F")]
    pub val_fraction: f64,
    /// Text files; each is one document.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Prepare(args) => {
            let tok = Tokenizer::from_file(&args.tokenizer)
                .with_context(|| format!("loading tokenizer {}", args.tokenizer.display()))?;
            let report = prepare_shards(&tok, &args.files, &args.output, args.val_fraction)?;
            print_report(&report);
            Ok(())
        }
    }
}

/// Writes the shards with a progress bar; shared with `kiln quickstart`.
pub fn prepare_shards(
    tok: &Tokenizer,
    files: &[PathBuf],
    output: &std::path::Path,
    val_fraction: f64,
) -> anyhow::Result<PrepareReport> {
    let cfg = PrepareConfig {
        val_fraction,
        show_progress: super::interactive(),
        ..PrepareConfig::default()
    };
    let report = prepare(tok, files, output, &cfg)?;
    if report.separator.is_none() && files.len() > 1 {
        eprintln!(
            "warning: the tokenizer has no end-of-text token, so documents are not separated"
        );
    }
    if val_fraction > 0.0 && report.val_tokens == 0 {
        eprintln!("warning: val.bin is empty (the corpus is too small for a {val_fraction} split)");
    }
    Ok(report)
}

/// Prints a one-paragraph summary of the shards.
pub fn print_report(r: &PrepareReport) {
    let tokens = r.train_tokens + r.val_tokens;
    println!(
        "{} documents, {:.2} MB -> {} tokens ({:.2} bytes/token, {:?}) in {:.2}s ({:.1} MB/s)",
        r.documents,
        r.bytes as f64 / 1e6,
        tokens,
        r.bytes as f64 / tokens.max(1) as f64,
        r.width,
        r.seconds,
        r.bytes as f64 / 1e6 / r.seconds.max(1e-9)
    );
    println!("  {}: {} tokens", r.train_path.display(), r.train_tokens);
    println!("  {}: {} tokens", r.val_path.display(), r.val_tokens);
}
