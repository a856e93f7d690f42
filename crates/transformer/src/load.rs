//! Loading any supported model: a GGUF file, a PyTorch checkpoint, a Kiln model directory, or a
//! Hugging Face checkpoint.

use std::io::Read;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use kiln_bpe::{SpecialTokens, Tokenizer};
use kiln_gguf::GgufFile;

use crate::chat::{ChatMessage, ChatTemplate};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::gguf_model::{config_from_gguf, tensors_from_gguf};
use crate::hf::{config_from_hf, is_hf_dir, tensors_from_hf};
use crate::model::Transformer;
use crate::model_dir::load_model_dir;
use crate::nanogpt;
use crate::tensor_files::{TensorFiles, torch_error};
use crate::weights::{NamedTensor, apply};

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

/// A tokenized prompt and the stop rules that go with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prompt {
    /// The prompt's token ids.
    pub ids: Vec<u32>,
    /// Tokens that end generation: the tokenizer's end-of-text, plus the end-of-turn token for chats.
    pub stop_ids: Vec<u32>,
    /// Strings that end generation (the chat template's end-of-turn marker).
    pub stop_strings: Vec<String>,
}

impl<B: Backend> LoadedModel<B> {
    /// The tokenizer, or an error saying the model came without one.
    pub fn require_tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            ModelError::InvalidArgument(format!(
                "{} has no tokenizer (expected tokenizer.json beside the weights)",
                self.source.display()
            ))
        })
    }

    /// The model's chat template, or ChatML when it has none.
    pub fn template(&self) -> Result<ChatTemplate> {
        match &self.chat_template {
            Some(source) => Ok(ChatTemplate::new(source)?),
            None => Ok(ChatTemplate::chatml()),
        }
    }

    /// `text` as a plain continuation prompt (see [`Prompt::text`]).
    pub fn text_prompt(&self, text: &str) -> Result<Prompt> {
        Ok(Prompt::text(self.require_tokenizer()?, text))
    }

    /// `messages` ready for the assistant's turn (see [`Prompt::chat`]).
    pub fn chat_prompt(&self, template: &ChatTemplate, messages: &[ChatMessage]) -> Result<Prompt> {
        Prompt::chat(self.require_tokenizer()?, template, messages)
    }
}

impl Prompt {
    /// `text` as a plain continuation prompt (special-token text stays text); stops at end of text.
    pub fn text(tokenizer: &Tokenizer, text: &str) -> Self {
        Self {
            ids: tokenizer.encode(text),
            stop_ids: end_of_text_ids(tokenizer),
            stop_strings: Vec::new(),
        }
    }

    /// Token ids used as given; stops at end of text.
    pub fn ids(tokenizer: &Tokenizer, ids: Vec<u32>) -> Self {
        Self {
            ids,
            stop_ids: end_of_text_ids(tokenizer),
            stop_strings: Vec::new(),
        }
    }

    /// `messages` rendered with `template`, ready for the assistant's turn; stops at the end of
    /// that turn.
    pub fn chat(
        tokenizer: &Tokenizer,
        template: &ChatTemplate,
        messages: &[ChatMessage],
    ) -> Result<Self> {
        let text = template.render(messages, true)?;
        let mut stop_ids = end_of_text_ids(tokenizer);
        let mut stop_strings = Vec::new();
        if let Some(end) = template.end_of_turn() {
            stop_ids.extend(tokenizer.token_id(end.as_bytes()));
            stop_strings.push(end);
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        Ok(Self {
            ids: tokenizer.encode_bytes(text.as_bytes(), SpecialTokens::Parse),
            stop_ids,
            stop_strings,
        })
    }
}

/// The tokenizer's end-of-sequence and end-of-text ids.
fn end_of_text_ids(tokenizer: &Tokenizer) -> Vec<u32> {
    let mut ids: Vec<u32> = tokenizer
        .eos_id()
        .into_iter()
        .chain(tokenizer.eot_id())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// What a model file is, by its first bytes.
enum FileKind {
    Gguf,
    /// `torch.save`'s zip archive, or its legacy pickle stream.
    Torch,
    Other,
}

fn not_a_model(path: &Path) -> ModelError {
    ModelError::InvalidArgument(format!(
        "{} is neither a GGUF file, a PyTorch checkpoint (.pt, .bin) nor a model directory",
        path.display()
    ))
}

fn file_kind(path: &Path) -> FileKind {
    let mut magic = [0u8; 4];
    let read = std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic));
    match (read, magic) {
        (Err(_), _) => FileKind::Other,
        (Ok(()), m) if &m == b"GGUF" => FileKind::Gguf,
        (Ok(()), [b'P', b'K', 3, 4] | [0x80, ..]) => FileKind::Torch,
        _ => FileKind::Other,
    }
}

/// Loads `path`: a `.gguf` file, a PyTorch checkpoint (nanoGPT's `ckpt.pt`, or a Hugging Face
/// `pytorch_model.bin` with `config.json` beside it), a Kiln model directory (`config.json` +
/// `model.safetensors`), a Hugging Face model directory (GPT-2 or Llama `config.json`;
/// `model.safetensors`, sharded safetensors with their index, or `pytorch_model.bin` and its
/// shards; `tokenizer.json`; the chat template of `tokenizer_config.json`), or nanoGPT's output
/// directory (holding `ckpt.pt`).
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
        return match file_kind(path) {
            FileKind::Gguf => load_gguf(path, device),
            FileKind::Torch => load_torch(path, device),
            FileKind::Other => Err(not_a_model(path)),
        };
    }
    let nanogpt_ckpt = path.join("ckpt.pt");
    if !path.join("config.json").exists() && nanogpt_ckpt.is_file() {
        return load_torch(&nanogpt_ckpt, device);
    }
    let (tokenizer, chat_template) = tokenizer_beside(path)?;
    let model = if is_hf_dir(path) {
        let config = read_hf_config(path)?;
        let files = TensorFiles::open_hf_dir(path)?;
        with_weights(&config, tensors_from_hf(&files, &config)?, path, device)?
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

/// What a model path holds, read without its weights.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    /// The model's structure.
    pub config: ModelConfig,
    /// A file [`Tokenizer::from_file`] reads the model's tokenizer from (a GGUF file itself,
    /// `tokenizer.json`, nanoGPT's `meta.pkl`), if the model comes with one.
    pub tokenizer: Option<PathBuf>,
}

/// The structure of the model at `path` (any path [`load_model`] reads) and where its tokenizer
/// is, without reading the weights.
pub fn inspect_model(path: impl AsRef<Path>) -> Result<ModelInfo> {
    let path = path.as_ref();
    let beside = |dir: &Path| Some(dir.join("tokenizer.json")).filter(|p| p.is_file());
    if path.is_file() {
        return match file_kind(path) {
            FileKind::Gguf => {
                let file = GgufFile::open(path)?;
                Ok(ModelInfo {
                    config: config_from_gguf(&file)?,
                    tokenizer: file
                        .metadata
                        .iter()
                        .any(|(k, _)| k == "tokenizer.ggml.model")
                        .then(|| path.to_owned()),
                })
            }
            FileKind::Torch => {
                let value = kiln_gguf::torch::load_mmap(path).map_err(|e| torch_error(path, e))?;
                let dir = path.parent().unwrap_or(Path::new("."));
                if nanogpt::is_nanogpt(&value) {
                    let args = value
                        .get("model_args")
                        .unwrap_or(&kiln_gguf::torch::Value::None);
                    Ok(ModelInfo {
                        config: nanogpt::config_from_model_args(args, path)?,
                        tokenizer: nanogpt::tokenizer_path(&value, path),
                    })
                } else {
                    Ok(ModelInfo {
                        config: read_hf_config(dir)?,
                        tokenizer: beside(dir),
                    })
                }
            }
            FileKind::Other => Err(not_a_model(path)),
        };
    }
    if !path.join("config.json").exists() && path.join("ckpt.pt").is_file() {
        return inspect_model(path.join("ckpt.pt"));
    }
    let config = if is_hf_dir(path) {
        read_hf_config(path)?
    } else {
        ModelConfig::load(path.join("config.json"))?
    };
    Ok(ModelInfo {
        config,
        tokenizer: beside(path),
    })
}

/// A model of `config` holding `tensors`, read from `origin`.
fn with_weights<B: Backend>(
    config: &ModelConfig,
    tensors: Vec<NamedTensor>,
    origin: &Path,
    device: &B::Device,
) -> Result<Transformer<B>> {
    let mut model = config.init::<B>(device)?;
    apply(&mut model, tensors, &origin.display().to_string())?;
    Ok(model)
}

/// The tokenizer (`tokenizer.json`) and chat template (`chat_template.jinja`, else the
/// `chat_template` string of Hugging Face's `tokenizer_config.json`) in `dir`, where present.
fn tokenizer_beside(dir: &Path) -> Result<(Option<Tokenizer>, Option<String>)> {
    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer = if tokenizer_path.exists() {
        Some(Tokenizer::from_file(&tokenizer_path)?)
    } else {
        None
    };
    let template = std::fs::read_to_string(dir.join("chat_template.jinja"))
        .ok()
        .or_else(|| {
            let text = std::fs::read_to_string(dir.join("tokenizer_config.json")).ok()?;
            let json: serde_json::Value = serde_json::from_str(&text).ok()?;
            json.get("chat_template")?.as_str().map(str::to_owned)
        });
    Ok((tokenizer, template))
}

/// A Hugging Face `config.json`'s model structure.
fn read_hf_config(dir: &Path) -> Result<ModelConfig> {
    let config_path = dir.join("config.json");
    let text =
        std::fs::read_to_string(&config_path).map_err(|e| ModelError::io(&config_path, e))?;
    let json = serde_json::from_str(&text).map_err(|e| ModelError::Json {
        path: config_path.clone(),
        source: e,
    })?;
    config_from_hf(&json)
}

/// Loads a PyTorch checkpoint file: nanoGPT's `ckpt.pt` (structure from `model_args`, the
/// tokenizer from its `meta.pkl`), or a Hugging Face state dict (`pytorch_model.bin`) whose
/// `config.json` is in the same directory.
fn load_torch<B: Backend>(path: &Path, device: &B::Device) -> Result<LoadedModel<B>> {
    let value = kiln_gguf::torch::load_mmap(path).map_err(|e| torch_error(path, e))?;
    if nanogpt::is_nanogpt(&value) {
        let args = value
            .get("model_args")
            .unwrap_or(&kiln_gguf::torch::Value::None);
        let config = nanogpt::config_from_model_args(args, path)?;
        let files = nanogpt::state_dict(&value, path)?;
        let tensors = nanogpt::tensors_from_nanogpt(&files, &config)?;
        return Ok(LoadedModel {
            model: with_weights(&config, tensors, path, device)?,
            tokenizer: nanogpt::tokenizer_path(&value, path)
                .map(Tokenizer::from_file)
                .transpose()?,
            chat_template: None,
            source: path.to_owned(),
        });
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    if !is_hf_dir(dir) {
        return Err(ModelError::InvalidArgument(format!(
            "{}: a PyTorch checkpoint Kiln cannot place: neither nanoGPT's (`model_args` and \
             `model`) nor a Hugging Face state dict with its config.json beside it",
            path.display()
        )));
    }
    let config = read_hf_config(dir)?;
    let files = TensorFiles::from_state_dict(&value, "", path)?;
    let model = with_weights(&config, tensors_from_hf(&files, &config)?, path, device)?;
    let (tokenizer, chat_template) = tokenizer_beside(dir)?;
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
    with_gguf_tokenizer(model, path, &file)
}

/// `model` with the tokenizer and chat template of the GGUF file at `path`.
pub(crate) fn with_gguf_tokenizer<B: Backend>(
    model: Transformer<B>,
    path: &Path,
    file: &GgufFile,
) -> Result<LoadedModel<B>> {
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
