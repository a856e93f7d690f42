//! nanoGPT's Shakespeare-char recipe on the CPU: a character-level GPT (4 layers, 4 heads, width
//! 128, context 64) trained for 2000 steps on tinyshakespeare with batch 12, lr 1e-3 → 1e-4 cosine
//! after 100 warmup steps, β₂ 0.99, no dropout (nanoGPT's `config/train_shakespeare_char.py` with its
//! README's CPU flags). nanoGPT reports a validation loss of about 1.88 for it.
//!
//! ```text
//! cargo run --release --example shakespeare_char [-- CORPUS] [--max-steps N] [--out DIR] [--gpu-recipe]
//!                                                [--precision f32|bf16]
//!                                                [--no-embedding-decay] [--seed S] [--peak-flops F]
//! cargo run --release --example shakespeare_char -- --help
//! ```
//! `--gpu-recipe` trains nanoGPT's GPU model instead (6 layers, 6 heads, width 384, context 256,
//! batch 64, 5000 steps, dropout 0.2). Weight decay goes by rank, as in nanoGPT's
//! `configure_optimizers` (every matrix, the embedding included); `--no-embedding-decay` exempts
//! the embedding. `--peak-flops F` (the device's peak FLOP/s, e.g. 3.1e11 for this CPU's numpy
//! matrix multiply) adds MFU to the log. The corpus defaults to
//! `../shared/data/tinyshakespeare.txt`. The last line printed is `final val_loss <x>`.

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use kiln::backend::TrainBackend;
use kiln::bpe::prepare::{PrepareConfig, prepare_bytes};
use kiln::trainer::{ModelSpec, Precision, TrainConfig, Trainer};
use kiln::transformer::ModelConfig;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: kiln::Allocator = kiln::Allocator;

/// nanoGPT's Shakespeare-char recipe: a character-level GPT trained on tinyshakespeare.
#[derive(Debug, Parser)]
struct Args {
    /// The training text (default: ../shared/data/tinyshakespeare.txt).
    #[arg(value_name = "CORPUS")]
    corpus: Option<PathBuf>,
    /// Optimizer steps (default: 2000, or 5000 with --gpu-recipe).
    #[arg(long, value_name = "N")]
    max_steps: Option<u64>,
    /// Output directory: token shards, tokenizer, run.
    #[arg(long, default_value = "runs/shakespeare_char", value_name = "DIR")]
    out: PathBuf,
    /// nanoGPT's GPU model instead: 6 layers, 6 heads, width 384, context 256, batch 64, 5000
    /// steps, dropout 0.2.
    #[arg(long)]
    gpu_recipe: bool,
    /// Exempt the embedding from weight decay (default: every matrix decays, as in nanoGPT's
    /// `configure_optimizers`).
    #[arg(long)]
    no_embedding_decay: bool,
    /// Seed for initialization, data order and dropout.
    #[arg(long, default_value_t = TrainConfig::default().seed, value_name = "S")]
    seed: u64,
    /// The device's peak FLOP/s (e.g. 3.1e11 for this CPU's numpy matrix multiply): adds MFU to
    /// the log.
    #[arg(long, value_name = "F")]
    peak_flops: Option<f64>,
    /// Compute precision: `f32`, or `bf16` mixed precision (f32 master weights; on CPUs with
    /// AVX512_BF16 the linear layers multiply in bf16 and everything else stays f32).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    precision: String,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let corpus = args.corpus.clone().unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/tinyshakespeare.txt")
    });
    let gpu = args.gpu_recipe;
    let out = args.out.clone();

    // Character level: a byte-level vocabulary with no merges (tinyshakespeare is ASCII) plus
    // <|endoftext|>; the last 10% of the text is validation, as nanoGPT splits it.
    let (tok, report) = prepare_bytes(
        std::slice::from_ref(&corpus),
        &out.join("data"),
        &PrepareConfig::default(),
    )?;
    tok.save(out.join("tokenizer.json"))?;
    eprintln!(
        "{} train / {} val characters",
        report.train_tokens, report.val_tokens
    );

    let (model, micro_batch, seq_len, max_steps, eval_interval, dropout) = if gpu {
        (ModelConfig::shakespeare_char(257), 64, 256, 5000, 250, 0.2)
    } else {
        (
            ModelConfig::shakespeare_char_cpu(257),
            12,
            64,
            2000,
            500,
            0.0,
        )
    };
    let config = TrainConfig {
        model: ModelSpec::Full(ModelConfig { dropout, ..model }),
        data_dir: out.join("data"),
        tokenizer: Some(out.join("tokenizer.json")),
        micro_batch,
        seq_len,
        max_steps: args.max_steps.unwrap_or(max_steps),
        lr: 1e-3,
        min_lr: 1e-4,
        warmup_steps: 100,
        beta2: 0.99,
        weight_decay: 0.1,
        // nanoGPT's configure_optimizers decays every 2-D parameter, the embedding included.
        decay_embeddings: !args.no_embedding_decay,
        grad_clip: 1.0,
        eval_interval,
        eval_batches: 20,
        checkpoint_interval: 0,
        log_interval: 50,
        peak_flops: args.peak_flops,
        seed: args.seed,
        precision: if args.precision == "bf16" {
            Precision::Bf16
        } else {
            Precision::F32
        },
        ..TrainConfig::default()
    };
    let flops_per_token = model_flops_per_token(&config, seq_len)?;
    let peak = config.peak_flops;
    let started = Instant::now();
    let mut trainer = Trainer::<TrainBackend>::new(config, out.join("run"), Default::default())?
        .with_progress(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let val = trainer.train()?;
    let secs = started.elapsed().as_secs_f64();
    let tokens = trainer.state().tokens_seen;
    let tokens_per_s = tokens as f64 / secs;
    let mfu = peak.map_or(String::new(), |p| {
        format!(", MFU {:.1}%", 100.0 * tokens_per_s * flops_per_token / p)
    });
    eprintln!(
        "{} steps in {secs:.1}s ({tokens_per_s:.0} tokens/s, {:.1} ms/step{mfu}); val loss on the whole split {val:.4}",
        trainer.state().step,
        secs * 1e3 / trainer.state().step.max(1) as f64
    );
    println!("final val_loss {val:.4}");
    Ok(())
}

/// Training FLOPs per token of the configured model (6·N + 6·L·C·T).
fn model_flops_per_token(
    config: &TrainConfig,
    seq_len: usize,
) -> Result<f64, Box<dyn std::error::Error>> {
    Ok(config.model.resolve(Some(257))?.flops_per_token(seq_len))
}
