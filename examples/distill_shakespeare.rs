//! Knowledge distillation on tinyshakespeare (the table in `docs/quantize.md`): a 6×384 teacher
//! (nanoGPT's Shakespeare GPU model) trained for `--teacher-steps`, then a 4×128 student (the CPU
//! recipe's model) trained for `--student-steps` from scratch and by distillation from the
//! teacher (T = 2, α = 0.5), for several seeds; prints each run's validation loss on the whole
//! validation split.
//!
//! ```text
//! cargo run --release --example distill_shakespeare -- [--teacher-steps 800] [--student-steps 500] \
//!     [--seeds 1,2,3] [--out runs/distill]
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Parser;
use kiln::backend::TrainBackend;
use kiln::bpe::prepare::{PrepareConfig, prepare_bytes};
use kiln::trainer::checkpoint::latest_checkpoint;
use kiln::trainer::{DistillConfig, ModelSpec, TrainConfig, Trainer};
use kiln::transformer::ModelConfig;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: kiln::Allocator = kiln::Allocator;

/// Distill a 6×384 Shakespeare teacher into a 4×128 student; compare with training from scratch.
#[derive(Debug, Parser)]
struct Args {
    /// The training text (default: ../shared/data/tinyshakespeare.txt).
    #[arg(value_name = "CORPUS")]
    corpus: Option<PathBuf>,
    /// Teacher training steps (batch 12 × 64 characters).
    #[arg(long, default_value_t = 800)]
    teacher_steps: u64,
    /// Student training steps, both ways.
    #[arg(long, default_value_t = 500)]
    student_steps: u64,
    /// Student seeds.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    seeds: Vec<u64>,
    /// Distillation temperature.
    #[arg(long, default_value_t = 2.0)]
    temperature: f64,
    /// Weight of the teacher's term.
    #[arg(long, default_value_t = 0.5)]
    alpha: f64,
    /// Output directory.
    #[arg(long, default_value = "runs/distill")]
    out: PathBuf,
}

fn recipe(model: ModelConfig, data: &Path, steps: u64, seed: u64) -> TrainConfig {
    TrainConfig {
        model: ModelSpec::Full(ModelConfig {
            dropout: 0.0,
            ..model
        }),
        data_dir: data.join("data"),
        tokenizer: Some(data.join("tokenizer.json")),
        micro_batch: 12,
        seq_len: 64,
        max_steps: steps,
        lr: 1e-3,
        min_lr: 1e-4,
        warmup_steps: 100.min(steps / 5),
        beta2: 0.99,
        weight_decay: 0.1,
        grad_clip: 1.0,
        eval_interval: 0,
        eval_batches: 0,
        checkpoint_interval: 0,
        log_interval: 100,
        seed,
        ..TrainConfig::default()
    }
}

fn train(config: TrainConfig, run: &Path) -> Result<(f64, f64), Box<dyn std::error::Error>> {
    let started = Instant::now();
    let mut trainer = Trainer::<TrainBackend>::new(config, run, Default::default())?
        .with_progress(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let val = trainer.train()?;
    Ok((val, started.elapsed().as_secs_f64()))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let corpus = args.corpus.clone().unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/tinyshakespeare.txt")
    });
    let out = args.out.clone();
    let (tok, _) = prepare_bytes(
        std::slice::from_ref(&corpus),
        &out.join("data"),
        &PrepareConfig::default(),
    )?;
    tok.save(out.join("tokenizer.json"))?;

    let teacher_run = out.join("teacher");
    let (teacher_val, secs) = train(
        recipe(
            ModelConfig::shakespeare_char(257),
            &out,
            args.teacher_steps,
            1337,
        ),
        &teacher_run,
    )?;
    let teacher = latest_checkpoint(&teacher_run)?.join("model");
    eprintln!(
        "teacher 6×384: val loss {teacher_val:.4} after {} steps ({secs:.0} s)",
        args.teacher_steps
    );

    println!(
        "| student 4×128, {} steps | seed | val loss | time (s) |",
        args.student_steps
    );
    println!("|---|---|---|---|");
    println!(
        "| teacher 6×384, {} steps | 1337 | {teacher_val:.4} | {secs:.0} |",
        args.teacher_steps
    );
    let (mut scratch_sum, mut distill_sum) = (0.0, 0.0);
    for &seed in &args.seeds {
        let student = ModelConfig::shakespeare_char_cpu(257);
        let (scratch, s1) = train(
            recipe(student.clone(), &out, args.student_steps, seed),
            &out.join(format!("scratch-{seed}")),
        )?;
        let distilled_config = TrainConfig {
            distill: Some(DistillConfig {
                teacher: teacher.clone(),
                temperature: args.temperature,
                alpha: args.alpha,
            }),
            ..recipe(student, &out, args.student_steps, seed)
        };
        let (distilled, s2) = train(distilled_config, &out.join(format!("distilled-{seed}")))?;
        println!("| from scratch | {seed} | {scratch:.4} | {s1:.0} |");
        println!(
            "| distilled (T = {}, α = {}) | {seed} | {distilled:.4} | {s2:.0} |",
            args.temperature, args.alpha
        );
        scratch_sum += scratch;
        distill_sum += distilled;
    }
    let n = args.seeds.len().max(1) as f64;
    println!(
        "| mean: from scratch / distilled | | {:.4} / {:.4} | |",
        scratch_sum / n,
        distill_sum / n
    );
    Ok(())
}
