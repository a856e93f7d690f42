//! Loading any supported model: a GGUF file, a Kiln model directory, or a Hugging Face checkpoint.

use std::io::Read;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use kiln_bpe::{SpecialTokens, Tokenizer};
use kiln_gguf::GgufFile;

use crate::chat::{ChatMessage, ChatTemplate};
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
