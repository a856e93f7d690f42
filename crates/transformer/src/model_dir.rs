//! Kiln's model directory — the unit the trainer saves and everything else loads:
//!
//! ```text
//! model/
//!   config.json          ModelConfig (structure)
//!   model.safetensors    weights, named by Kiln's parameter paths ([in, out] linear layout)
//!   tokenizer.json       HF tokenizer (optional)
//!   chat_template.jinja  chat template (optional)
//! ```
//! Written to a sibling temp directory and renamed into place ([`kiln_gguf::atomic`]), so a crash
//! leaves the previous directory intact; identical models give byte-identical files.

use std::path::Path;

use burn::tensor::backend::Backend;
use burn_store::{ModuleSnapshot, SafetensorsStore};
use kiln_bpe::Tokenizer;
use kiln_gguf::atomic::{self, AtomicDir};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::model::Transformer;

fn st_error(path: &Path, reason: impl ToString) -> ModelError {
    ModelError::Safetensors {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// Writes `model`'s weights to `path` as safetensors: tensors sorted by name and one fixed
/// metadata entry (`format: pt`, what Hugging Face `transformers` looks for), so identical weights
/// give byte-identical files. The file is synced but not renamed: write it inside an
/// [`AtomicDir`].
pub(crate) fn write_safetensors<B: Backend>(model: &Transformer<B>, path: &Path) -> Result<()> {
    let mut store = SafetensorsStore::from_file(path)
        .clear_metadata()
        .metadata("format", "pt");
    model.save_into(&mut store).map_err(|e| st_error(path, e))?;
    atomic::sync_file(path).map_err(|e| ModelError::io(path, e))
}

/// Saves `model` (and optionally its tokenizer and chat template) as a Kiln model directory,
/// atomically: assembled under a temp name, every file synced, then renamed into place.
pub fn save_model_dir<B: Backend>(
    model: &Transformer<B>,
    tokenizer: Option<&Tokenizer>,
    chat_template: Option<&str>,
    dir: impl AsRef<Path>,
) -> Result<()> {
    let dir = dir.as_ref();
    let staging = AtomicDir::create(dir).map_err(|e| ModelError::io(dir, e))?;
    let tmp = staging.path();
    let config = serde_json::to_string_pretty(model.config())
        .map_err(|e| ModelError::InvalidConfig(format!("serializing config.json: {e}")))?;
    let path = tmp.join("config.json");
    atomic::write(&path, config.as_bytes()).map_err(|e| ModelError::io(&path, e))?;
    write_safetensors(model, &tmp.join("model.safetensors"))?;
    if let Some(tok) = tokenizer {
        tok.save(tmp.join("tokenizer.json"))?;
    }
    if let Some(template) = chat_template {
        let path = tmp.join("chat_template.jinja");
        atomic::write(&path, template.as_bytes()).map_err(|e| ModelError::io(&path, e))?;
    }
    staging.commit().map_err(|e| ModelError::io(dir, e))
}

/// Loads the weights of a Kiln model directory onto `device`.
pub fn load_model_dir<B: Backend>(
    dir: impl AsRef<Path>,
    device: &B::Device,
) -> Result<Transformer<B>> {
    let dir = dir.as_ref();
    let config = ModelConfig::load(dir.join("config.json"))?;
    let weights = dir.join("model.safetensors");
    if !weights.exists() {
        return Err(ModelError::io(
            &weights,
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ));
    }
    let mut model = config.init::<B>(device)?;
    let mut store = SafetensorsStore::from_file(&weights);
    let result = model
        .load_from(&mut store)
        .map_err(|e| st_error(&weights, e))?;
    if let Some(err) = result.errors.first() {
        return Err(st_error(&weights, err));
    }
    if let Some((path, _)) = result.missing.first() {
        return Err(ModelError::MissingTensor {
            name: path.clone(),
            file: weights.display().to_string(),
        });
    }
    Ok(model)
}
