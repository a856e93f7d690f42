//! The loop every training run shares: stop requests, steps, logging with tokens/s and MFU,
//! periodic evaluation and checkpoints, and the final evaluation and checkpoint. What a step is
//! (one process, data parallel, or a tensor/pipeline-parallel rank in `kiln-distributed`) sits
//! behind [`TrainingRun`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use kiln_transformer::ModelConfig;
use serde_json::json;

use crate::checkpoint::TrainerState;
use crate::config::TrainConfig;
use crate::error::{Result, TrainError};
use crate::trainer::{StepReport, TrainOutcome};

/// A training run as [`run`] drives it. Every rank of a multi-process run calls each method at
/// the same point (the collective ones meet there).
pub trait TrainingRun {
    /// The run's settings.
    fn config(&self) -> &TrainConfig;
    /// The model's structure.
    fn model_config(&self) -> &ModelConfig;
    /// Where the run stands.
    fn state(&self) -> &TrainerState;
    /// Where the run stands, to record a validation loss.
    fn state_mut(&mut self) -> &mut TrainerState;
    /// The run directory (`metrics.jsonl`, checkpoints).
    fn run_dir(&self) -> &Path;
    /// Whether this rank writes the run's files and draws its progress.
    fn is_rank0(&self) -> bool;
    /// Devices the run's work is spread over (for the MFU per device).
    fn devices(&self) -> usize;
    /// Training tokens per optimizer step, all ranks together.
    fn tokens_per_step(&self) -> u64;
    /// Whether to draw a progress bar.
    fn show_progress(&self) -> bool;
    /// Whether any rank was asked to stop.
    fn stop_requested(&mut self) -> Result<bool>;
    /// One optimizer step.
    fn step(&mut self) -> Result<StepReport>;
    /// Logs the model-state memory of every rank (after the first step).
    fn report_memory(&mut self) -> Result<()>;
    /// Mean validation loss over the first `max_batches` batches (all when 0).
    fn evaluate_batches(&mut self, max_batches: usize) -> Result<f64>;
    /// Writes a checkpoint of the current state; returns its directory.
    fn save_checkpoint(&mut self) -> Result<PathBuf>;
}

/// Appends `line` to `RUN_DIR/metrics.jsonl`.
pub fn append_metrics(run_dir: &Path, line: &serde_json::Value) -> Result<()> {
    let path = run_dir.join("metrics.jsonl");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| TrainError::io(&path, e))?;
    writeln!(f, "{line}").map_err(|e| TrainError::io(&path, e))
}

fn metrics<R: TrainingRun + ?Sized>(run: &R, line: serde_json::Value) -> Result<()> {
    if run.is_rank0() {
        append_metrics(run.run_dir(), &line)?;
    }
    Ok(())
}

/// Trains to `max_steps` or until a stop is requested, evaluating and checkpointing on schedule.
/// Finished: the validation loss over the whole split (and a final checkpoint). Stopped: the
/// step in progress completes, a checkpoint is written, and the outcome says where.
pub fn run<R: TrainingRun + ?Sized>(run: &mut R) -> Result<TrainOutcome> {
    let config = run.config().clone();
    let total = config.max_steps;
    let bar = if run.show_progress() && run.is_rank0() {
        let bar = ProgressBar::new(total);
        if let Ok(style) =
            ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed} < {eta}]")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_position(run.state().step);
        bar
    } else {
        ProgressBar::hidden()
    };
    let flops_per_token = run.model_config().flops_per_token(config.seq_len);
    let mut window = Instant::now();
    let mut window_tokens = 0u64;
    let mut reported = false;
    while run.state().step < total {
        if run.stop_requested()? {
            bar.finish_and_clear();
            let step = run.state().step;
            let checkpoint = run.save_checkpoint()?;
            metrics(
                run,
                json!({"step": step, "interrupted": true,
                "checkpoint": checkpoint.display().to_string()}),
            )?;
            return Ok(TrainOutcome::Interrupted { step, checkpoint });
        }
        let report = run.step()?;
        if !reported {
            // After the first step: gradients and optimizer state exist.
            run.report_memory()?;
            reported = true;
        }
        window_tokens += run.tokens_per_step();
        let step = report.step + 1;
        if config.log_interval > 0 && (step % config.log_interval == 0 || step == total) {
            let secs = window.elapsed().as_secs_f64().max(1e-9);
            let tps = window_tokens as f64 / secs;
            // MFU per device: the devices share the tokens.
            let per_device = tps / run.devices() as f64;
            let mfu = config.peak_flops.map(|p| per_device * flops_per_token / p);
            let mfu_note = mfu.map_or(String::new(), |m| format!(" MFU {:.1}%", 100.0 * m));
            bar.set_message(format!(
                "loss {:.4} lr {:.2e} {:.0} tok/s{mfu_note}",
                report.loss, report.lr, tps
            ));
            let tokens_seen = run.state().tokens_seen;
            metrics(
                run,
                json!({"step": report.step, "loss": report.loss, "lr": report.lr, "grad_norm": report.grad_norm,
                "tokens_per_s": tps, "mfu": mfu, "tokens_seen": tokens_seen}),
            )?;
            window = Instant::now();
            window_tokens = 0;
        }
        bar.set_position(step);
        if config.eval_interval > 0 && step % config.eval_interval == 0 && step < total {
            let val = run.evaluate_batches(config.eval_batches)?;
            run.state_mut().val_loss = Some(val);
            let line = format!("step {step}: val loss {val:.4} (ppl {:.2})", val.exp());
            if run.is_rank0() {
                if bar.is_hidden() {
                    eprintln!("{line}");
                } else {
                    bar.println(line);
                }
            }
            metrics(
                run,
                json!({"step": step, "val_loss": val, "val_ppl": val.exp()}),
            )?;
        }
        if config.checkpoint_interval > 0 && step % config.checkpoint_interval == 0 && step < total
        {
            run.save_checkpoint()?;
        }
    }
    bar.finish_and_clear();
    let val = run.evaluate_batches(0)?;
    run.state_mut().val_loss = Some(val);
    let step = run.state().step;
    metrics(
        run,
        json!({"step": step, "val_loss": val, "val_ppl": val.exp()}),
    )?;
    run.save_checkpoint()?;
    Ok(TrainOutcome::Finished { val_loss: val })
}
