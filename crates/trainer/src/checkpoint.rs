//! Checkpoints: `RUN_DIR/checkpoints/step-<N>/` holding the model directory (`model/`), the exact
//! model and optimizer state, and the trainer state. Written to a staging directory and renamed, so
//! a crash mid-write leaves the previous checkpoints intact; only the newest `keep` are kept.
//!
//! Writing is in three parts so that the ranks of a data-parallel run can share it: rank 0
//! [`begin`]s the staging directory, every rank's [`OptimizerStep::save`] writes its state into it,
//! and rank 0 writes the model and trainer state ([`write_model_and_state`]) and [`commit`]s.
//! [`save_checkpoint`] does all of it for one process.

use std::path::{Path, PathBuf};

use burn::module::{AutodiffModule, Module};
use burn::record::{
    FullPrecisionSettings, NamedMpkBytesRecorder, NamedMpkFileRecorder, Record, Recorder,
};
use burn::tensor::backend::{AutodiffBackend, Backend};
use kiln_bpe::Tokenizer;
use kiln_gguf::atomic;
use kiln_transformer::{Transformer, save_model_dir};
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::error::{Result, TrainError};
use crate::optimizer::{GroupedAdamW, OptimizerRecord, OptimizerStep, SortedOptimizerRecord};
use crate::precision::LossScaler;

/// Where a run is and how it got there: enough, with the model and optimizer state, to continue
/// exactly where it stopped.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    /// Multiplier on the scheduled learning rate (halved by each divergence recovery).
    pub lr_scale: f64,
    /// Training tokens consumed.
    pub tokens_seen: u64,
    /// Most recent validation loss.
    pub val_loss: Option<f64>,
    /// The loss scale and its growth count (f16; scale 1 otherwise).
    #[serde(default)]
    pub loss_scaler: LossScaler,
    /// The run's configuration (training metadata).
    pub config: TrainConfig,
    /// Data-parallel ranks that trained it (each at `config.micro_batch`).
    #[serde(default = "one_rank")]
    pub world_size: usize,
}

fn one_rank() -> usize {
    1
}

fn recorder() -> NamedMpkFileRecorder<FullPrecisionSettings> {
    NamedMpkFileRecorder::new()
}

fn ck_error(path: &Path, reason: impl ToString) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// `RUN_DIR/checkpoints`.
pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// Completed checkpoints of a run, oldest first, with their step.
pub fn list_checkpoints(run_dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(checkpoints_dir(run_dir))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            e.path()
                .join("trainer_state.json")
                .exists()
                .then(|| (step, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// The staging directory of the checkpoint for `step` (the same name on every rank).
pub fn staging_dir(run_dir: &Path, step: u64) -> PathBuf {
    checkpoints_dir(run_dir).join(format!(".step-{step}.tmp"))
}

/// Creates an empty staging directory for the checkpoint of `step` (removing a stale one left by
/// a crash); returns it.
pub fn begin(run_dir: &Path, step: u64) -> Result<PathBuf> {
    let root = checkpoints_dir(run_dir);
    std::fs::create_dir_all(&root).map_err(|e| TrainError::io(&root, e))?;
    let tmp = staging_dir(run_dir, step);
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    Ok(tmp)
}

/// Writes the model directory, the exact model state and the trainer state into `staging`.
pub fn write_model_and_state<B: AutodiffBackend>(
    staging: &Path,
    model: &Transformer<B>,
    state: &TrainerState,
    tokenizer: Option<&Tokenizer>,
) -> Result<()> {
    save_model_dir(&model.valid(), tokenizer, None, staging.join("model"))?;
    write_record(model.clone().into_record(), &staging.join("model_state"))?;
    write_state(staging, state)
}

/// Writes the trainer state (`trainer_state.json`, which marks a checkpoint complete) into
/// `staging`.
pub fn write_state(staging: &Path, state: &TrainerState) -> Result<()> {
    let json = serde_json::to_string_pretty(state)
        .map_err(|e| ck_error(staging, format!("serializing the trainer state: {e}")))?;
    let path = staging.join("trainer_state.json");
    atomic::write(&path, json.as_bytes()).map_err(|e| TrainError::io(&path, e))
}

/// Writes `record` as `path` + `.mpk` (Burn's named MessagePack, full precision) through the
/// atomic writer.
fn write_record<B: Backend, R: Record<B>>(record: R, path: &Path) -> Result<()> {
    let bytes = NamedMpkBytesRecorder::<FullPrecisionSettings>::default()
        .record(record, ())
        .map_err(|e| ck_error(path, e))?;
    let path = path.with_extension("mpk");
    atomic::write(&path, &bytes).map_err(|e| TrainError::io(&path, e))
}

/// `RUN_DIR/checkpoints/step-<step>`.
pub fn checkpoint_dir(run_dir: &Path, step: u64) -> PathBuf {
    checkpoints_dir(run_dir).join(format!("step-{step}"))
}

/// Renames `staging` to the checkpoint of `step` (replacing one of the same step) and removes all
/// but the newest `keep` checkpoints; returns the checkpoint's directory.
pub fn commit(run_dir: &Path, staging: &Path, step: u64, keep: usize) -> Result<PathBuf> {
    let dir = checkpoint_dir(run_dir, step);
    atomic::publish_dir(staging, &dir).map_err(|e| TrainError::io(&dir, e))?;
    let all = list_checkpoints(run_dir);
    for (_, old) in all.iter().take(all.len().saturating_sub(keep.max(1))) {
        let _ = std::fs::remove_dir_all(old);
    }
    Ok(dir)
}

/// Saves a checkpoint of a single-process run for `state.step`; returns its directory.
pub fn save_checkpoint<B: AutodiffBackend>(
    run_dir: &Path,
    model: &Transformer<B>,
    optimizer: &dyn OptimizerStep<B, Transformer<B>>,
    state: &TrainerState,
    tokenizer: Option<&Tokenizer>,
    keep: usize,
) -> Result<PathBuf> {
    let tmp = begin(run_dir, state.step)?;
    let written = optimizer
        .save(&tmp)
        .and_then(|()| write_model_and_state(&tmp, model, state, tokenizer));
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    commit(run_dir, &tmp, state.step, keep)
}

/// The directory of a run's newest completed checkpoint (what `--resume` continues from).
pub fn latest_checkpoint(run_dir: &Path) -> Result<PathBuf> {
    list_checkpoints(run_dir)
        .pop()
        .map(|(_, dir)| dir)
        .ok_or_else(|| TrainError::Checkpoint {
            path: checkpoints_dir(run_dir),
            reason: "no completed checkpoint to resume from".into(),
        })
}

/// The trainer state of a run's newest completed checkpoint.
pub fn latest_state(run_dir: &Path) -> Result<TrainerState> {
    load_state(&latest_checkpoint(run_dir)?)
}

/// Reads a checkpoint's trainer state.
pub fn load_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| ck_error(dir, e))
}

/// Restores the exact model state (weights and parameter ids) saved in `dir`.
pub fn load_model_state<B: AutodiffBackend>(
    dir: &Path,
    model: Transformer<B>,
    device: &B::Device,
) -> Result<Transformer<B>> {
    let record = recorder()
        .load(dir.join("model_state"), device)
        .map_err(|e| ck_error(dir, e))?;
    Ok(model.load_record(record))
}

/// Restores the optimizer state saved in `dir` (create `optimizer` from the restored model first).
pub fn load_optimizer_state<B: AutodiffBackend>(
    dir: &Path,
    optimizer: GroupedAdamW<B, Transformer<B>>,
    device: &B::Device,
) -> Result<GroupedAdamW<B, Transformer<B>>> {
    Ok(optimizer.load_record(load_optimizer_record(dir, device)?))
}

/// Writes [`GroupedAdamW`]'s state as `dir/optimizer.mpk`.
pub fn save_optimizer_record<B: AutodiffBackend, M: AutodiffModule<B>>(
    dir: &Path,
    record: OptimizerRecord<B, M>,
) -> Result<()> {
    write_record(record.into_sorted(), &dir.join("optimizer"))
}

/// Reads the [`GroupedAdamW`] state in `dir/optimizer.mpk`.
pub fn load_optimizer_record<B: AutodiffBackend, M: AutodiffModule<B>>(
    dir: &Path,
    device: &B::Device,
) -> Result<OptimizerRecord<B, M>> {
    let stored: SortedOptimizerRecord<B> = recorder()
        .load(dir.join("optimizer"), device)
        .map_err(|e| ck_error(dir, e))?;
    Ok(OptimizerRecord::from_sorted(stored))
}
