//! Loading any supported model: a GGUF file, a Kiln model directory, or a Hugging Face checkpoint.

use std::io::Read;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use kiln_bpe::Tokenizer;
use kiln_bpe::gguf::GgufFile;

use crate::error::{ModelError, Result};
use crate::gguf_model::{config_from_gguf, tensors_from_gguf};
use crate::hf::{config_from_hf, is_hf_dir, tensors_from_hf};
use crate::model::Transformer;
use crate::model_dir::load_model_dir;
use crate::weights::apply;

/// A model with what it needs to talk: tokenizer and chat template, when the source has them.
#[derive(Debug)]
pub struct LoadedModel<B: Backend> {
    /// The network.
    pub model: Transformer<B>,
    /// The tokenizer (GGUF metadata, or `tokenizer.json` beside the weights).
    pub tokenizer: Option<Tokenizer>,
    /// The Jinja chat template (GGUF `tokenizer.chat_template`, or `chat_template.jinja`).
    pub chat_template: Option<String>,
    /// Where it came from.
    pub source: PathBuf,
}

fn is_gguf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|()| &magic == b"GGUF")
}

/// Loads `path`: a `.gguf` file (Llama architecture), a Kiln model directory (`config.json` +
/// `model.safetensors`), or an HF checkpoint directory (GPT-2 or Llama `config.json` +
/// `model.safetensors`).
pub fn load_model<B: Backend>(
    path: impl AsRef<Path>,
    device: &B::Device,
) -> Result<LoadedModel<B>> {
    let path = path.as_ref();
    if !path.exists() {
        return Err(ModelError::io(
            path,
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ));
    }
    if path.is_file() {
        if !is_gguf(path) {
            return Err(ModelError::InvalidArgument(format!(
                "{} is neither a GGUF file nor a model directory",
                path.display()
            )));
        }
        return load_gguf(path, device);
    }
    let tokenizer_path = path.join("tokenizer.json");
    let tokenizer = if tokenizer_path.exists() {
        Some(Tokenizer::from_file(&tokenizer_path)?)
    } else {
        None
    };
    let chat_template = std::fs::read_to_string(path.join("chat_template.jinja")).ok();
    let model = if is_hf_dir(path) {
        let config_path = path.join("config.json");
        let text =
            std::fs::read_to_string(&config_path).map_err(|e| ModelError::io(&config_path, e))?;
        let json = serde_json::from_str(&text).map_err(|e| ModelError::Json {
            path: config_path.clone(),
            source: e,
        })?;
        let config = config_from_hf(&json)?;
        let weights = path.join("model.safetensors");
        let tensors = tensors_from_hf(&weights, &config)?;
        let mut model = config.init::<B>(device)?;
        apply(&mut model, tensors, &weights.display().to_string())?;
        model
    } else {
        load_model_dir(path, device)?
    };
    Ok(LoadedModel {
        model,
        tokenizer,
        chat_template,
        source: path.to_owned(),
    })
}

/// Loads a Llama-architecture GGUF file: weights (dequantized to f32), tokenizer, chat template.
pub fn load_gguf<B: Backend>(path: impl AsRef<Path>, device: &B::Device) -> Result<LoadedModel<B>> {
    let path = path.as_ref();
    let file = GgufFile::open(path)?;
    let config = config_from_gguf(&file)?;
    let source = path.display().to_string();
    let tensors = tensors_from_gguf(&file, &config, &source)?;
    let mut model = config.init::<B>(device)?;
    apply(&mut model, tensors, &source)?;
    let tokenizer = Some(Tokenizer::from_gguf(path)?);
    let chat_template = file
        .get("tokenizer.chat_template")
        .and_then(|v| v.as_str())
        .map(str::to_owned);
    Ok(LoadedModel {
        model,
        tokenizer,
        chat_template,
        source: path.to_owned(),
    })
}
