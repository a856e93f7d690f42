//! Run and checkpoint directories where a model is expected: `kiln train`'s output stands for
//! the model of its newest checkpoint.

use std::path::{Path, PathBuf};

use kiln::trainer::checkpoint;
use kiln::transformer::TorchMetadata;

/// The model `path` names: a run directory's newest checkpoint's model, a checkpoint
/// directory's model, or `path` itself.
pub fn model_path(path: &Path) -> anyhow::Result<PathBuf> {
    Ok(training_metadata(path)?.0)
}

/// The model directory `path` stands for and the training metadata of the checkpoint it belongs
/// to: a run directory gives its newest checkpoint; a checkpoint directory (`trainer_state.json`
/// beside `model/`) or the `model/` inside one gives that checkpoint; anything else has none.
pub fn training_metadata(path: &Path) -> anyhow::Result<(PathBuf, TorchMetadata)> {
    let checkpoint_dir = if checkpoint::checkpoints_dir(path).is_dir() {
        Some(checkpoint::latest_checkpoint(path)?)
    } else if path.join("trainer_state.json").is_file() {
        Some(path.to_owned())
    } else {
        path.parent()
            .filter(|p| p.join("trainer_state.json").is_file())
            .map(ToOwned::to_owned)
    };
    let Some(dir) = checkpoint_dir else {
        return Ok((path.to_owned(), TorchMetadata::default()));
    };
    let state = checkpoint::load_state(&dir)?;
    let metadata = TorchMetadata {
        iter_num: state.step,
        best_val_loss: state.val_loss,
        config: Some(serde_json::to_value(&state.config)?),
    };
    Ok((dir.join("model"), metadata))
}
