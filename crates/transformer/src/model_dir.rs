//! Kiln's model directory — the unit the trainer saves and everything else loads:
//!
//! ```text
//! model/
//!   config.json          ModelConfig (structure)
//!   model.safetensors    weights, named by Kiln's parameter paths ([in, out] linear layout)
//!   tokenizer.json       HF tokenizer (optional)
//!   chat_template.jinja  chat template (optional)
//! ```
//! Written to a sibling temp directory and renamed into place, so a crash leaves the previous
//! directory intact.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn_store::{ModuleSnapshot, SafetensorsStore};
use kiln_bpe::Tokenizer;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::model::Transformer;

fn sibling(dir: &Path, tag: &str) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.with_file_name(format!(".{name}.{tag}-{}", std::process::id()))
}

fn st_error(path: &Path, reason: impl ToString) -> ModelError {
    ModelError::Safetensors {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// Saves `model` (and optionally its tokenizer and chat template) as a Kiln model directory.
pub fn save_model_dir<B: Backend>(
    model: &Transformer<B>,
    tokenizer: Option<&Tokenizer>,
    chat_template: Option<&str>,
    dir: impl AsRef<Path>,
) -> Result<()> {
    let dir = dir.as_ref();
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| ModelError::io(parent, e))?;
    }
    let tmp = sibling(dir, "tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
    let written = (|| -> Result<()> {
        let config = serde_json::to_string_pretty(model.config()).unwrap_or_default();
        let path = tmp.join("config.json");
        std::fs::write(&path, config).map_err(|e| ModelError::io(&path, e))?;
        let weights = tmp.join("model.safetensors");
        let mut store = SafetensorsStore::from_file(&weights);
        model
            .save_into(&mut store)
            .map_err(|e| st_error(&weights, e))?;
        if let Some(tok) = tokenizer {
            tok.save(tmp.join("tokenizer.json"))?;
        }
        if let Some(template) = chat_template {
            let path = tmp.join("chat_template.jinja");
            std::fs::write(&path, template).map_err(|e| ModelError::io(&path, e))?;
        }
        Ok(())
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let old = sibling(dir, "old");
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(|e| ModelError::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| ModelError::io(dir, e))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
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
