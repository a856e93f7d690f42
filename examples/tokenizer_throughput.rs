//! Kiln's side of the tokenizer speed comparison, measured exactly as
//! `../shared/peers/tokenizer_peer.py` measures HF `tokenizers` and `tiktoken`: one warm-up, then the
//! median of `--runs` runs, documents split on blank lines, one output line per measurement.
//!
//! ```text
//! cargo run --release --example tokenizer_throughput -- encode CORPUS [--tok DIR] [--runs 3]
//! cargo run --release --example tokenizer_throughput -- train CORPUS [--vocab 8192] [--runs 3]
//! cargo run --release --example tokenizer_throughput -- --help
//! ```
//! `scripts/bench_tokenizer.sh` runs both sides and prints the ratios.

use std::path::PathBuf;
use std::time::Instant;

use clap::{Parser, Subcommand};
use kiln::bpe::{BpeTrainer, SpecialTokens, Tokenizer, TrainerConfig};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: kiln::Allocator = kiln::Allocator;

/// Tokenizer speed, measured as `../shared/peers/tokenizer_peer.py` measures its peers.
#[derive(Debug, Parser)]
struct Args {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Encode CORPUS with a tokenizer: one thread, one thread with a cold piece cache, and a batch
    /// on every thread.
    Encode {
        /// The text, split into documents on blank lines.
        #[arg(value_name = "CORPUS")]
        corpus: PathBuf,
        /// Directory holding the tokenizer.json (default: ../shared/tokenizers/gpt2).
        #[arg(long, value_name = "DIR")]
        tok: Option<PathBuf>,
        /// Timed runs after one warm-up; the median is printed.
        #[arg(long, default_value_t = 3, value_name = "N")]
        runs: usize,
    },
    /// Train a byte-level BPE tokenizer on CORPUS.
    Train {
        /// The training text.
        #[arg(value_name = "CORPUS")]
        corpus: PathBuf,
        /// Vocabulary size.
        #[arg(long, default_value_t = 8192, value_name = "N")]
        vocab: usize,
        /// Timed runs after one warm-up; the median is printed.
        #[arg(long, default_value_t = 3, value_name = "N")]
        runs: usize,
    },
}

fn median_seconds(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut xs: Vec<f64> = (0..runs.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    match Args::parse().task {
        Task::Encode { corpus, tok, runs } => {
            let mb = std::fs::metadata(&corpus)?.len() as f64 / 1e6;
            let tok_dir = tok.unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/tokenizers/gpt2")
            });
            let tok = Tokenizer::from_file(tok_dir.join("tokenizer.json"))?;
            let text = std::fs::read_to_string(&corpus)?;
            let docs: Vec<&str> = text.split("\n\n").filter(|d| !d.is_empty()).collect();
            let mut n_tokens = 0;
            let s = median_seconds(runs, || {
                n_tokens = docs.iter().map(|d| tok.encode(d).len()).sum::<usize>();
            });
            println!(
                "peer=kiln task=encode_1thread corpus_mb={mb:.2} docs={} seconds={s:.4} mb_per_s={:.2}",
                docs.len(),
                mb / s
            );
            // Cold: a fresh tokenizer each run, so no piece is cached yet.
            let mut fresh = Vec::new();
            let s = median_seconds(runs, || {
                let cold = tok.clone();
                n_tokens = docs.iter().map(|d| cold.encode(d).len()).sum::<usize>();
                fresh.push(cold);
            });
            println!(
                "peer=kiln task=encode_1thread_cold corpus_mb={mb:.2} docs={} seconds={s:.4} mb_per_s={:.2}",
                docs.len(),
                mb / s
            );
            let threads = rayon::current_num_threads();
            let s = median_seconds(runs, || {
                tok.encode_batch(&docs, SpecialTokens::AsText);
            });
            println!(
                "peer=kiln task=encode_batch_{threads}threads corpus_mb={mb:.2} docs={} seconds={s:.4} mb_per_s={:.2}",
                docs.len(),
                mb / s
            );
            println!("tokens kiln={n_tokens}");
        }
        Task::Train {
            corpus,
            vocab,
            runs,
        } => {
            let mb = std::fs::metadata(&corpus)?.len() as f64 / 1e6;
            let s = median_seconds(runs, || {
                let mut trainer = BpeTrainer::new(TrainerConfig {
                    vocab_size: vocab,
                    ..TrainerConfig::default()
                })
                .expect("valid trainer config");
                trainer
                    .feed_files(std::slice::from_ref(&corpus))
                    .expect("readable corpus");
                trainer.finish().expect("non-empty corpus");
            });
            println!(
                "peer=kiln task=train vocab={vocab} corpus_mb={mb:.2} seconds={s:.3} mb_per_s={:.2}",
                mb / s
            );
        }
    }
    Ok(())
}
