//! `kiln export`: a model in the formats other runtimes read (ONNX, PyTorch, GGUF).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args as ClapArgs, Subcommand};
use kiln::backend::DefaultBackend;
use kiln::transformer::{load_model, save_gguf, save_nanogpt, save_onnx};

use super::run_dir::{model_path, training_metadata};

#[derive(Debug, Subcommand)]
pub enum Command {
    /// An ONNX file (opset 17, dynamic batch and sequence axes) for onnxruntime, TensorRT's
    /// ONNX parser (`trtexec --onnx=model.onnx`) and other runtimes; see docs/onnx.md.
    Onnx(OnnxArgs),
    /// A PyTorch checkpoint in nanoGPT's layout (`model`, `model_args`, `iter_num`,
    /// `best_val_loss`, `config`), which `torch.load(path, weights_only=True)` reads and nanoGPT's
    /// `GPT(GPTConfig(**ckpt["model_args"]))` loads strictly; see docs/transformer.md.
    Pt(PtArgs),
    /// An f32 GGUF file llama.cpp runs (architectures llama, qwen2, gemma, gpt2), with the
    /// tokenizer and chat template; `kiln quantize` makes the quantized types.
    Gguf(GgufArgs),
}

#[derive(Debug, ClapArgs)]
pub struct GgufArgs {
    /// The model: a training run or checkpoint directory (its model), a Kiln or Hugging Face model
    /// directory, a .pt or .gguf file, with a byte-level BPE tokenizer.
    #[arg(long, short, value_name = "M")]
    pub model: PathBuf,
    /// The .gguf file to write (atomically).
    #[arg(long, short, value_name = "FILE")]
    pub output: PathBuf,
}

#[derive(Debug, ClapArgs)]
pub struct PtArgs {
    /// The model: a training run directory (its newest checkpoint), a checkpoint directory, a
    /// model directory, a .gguf or .pt file. A checkpoint's step, validation loss and training
    /// config become the file's `iter_num`, `best_val_loss` and `config`.
    #[arg(long, short, value_name = "M")]
    pub model: PathBuf,
    /// The .pt file to write (atomically; nothing is written on error).
    #[arg(long, short, value_name = "FILE")]
    pub output: PathBuf,
}

#[derive(Debug, ClapArgs)]
pub struct OnnxArgs {
    /// The model: a .gguf file, a Kiln model directory or a Hugging Face safetensors directory
    /// (quantized weights are written dequantized, in f32).
    #[arg(long, short, value_name = "M")]
    pub model: PathBuf,
    /// The ONNX file to write.
    #[arg(long, short, value_name = "FILE")]
    pub output: PathBuf,
    /// Add past/present key-value inputs and outputs (`past_key_values.{i}.key`, `present.{i}.key`,
    /// with `attention_mask` and `position_ids`) for incremental decoding, as Hugging Face Optimum
    /// names them.
    #[arg(long)]
    pub kv_cache: bool,
}

pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Onnx(args) => onnx(args),
        Command::Pt(args) => pt(args),
        Command::Gguf(args) => gguf(args),
    }
}

fn gguf(args: GgufArgs) -> anyhow::Result<()> {
    // A run or checkpoint directory stands for its (newest) checkpoint's model.
    let (model_path, _) = training_metadata(&args.model)?;
    let device = Default::default();
    let loaded = load_model::<DefaultBackend>(&model_path, &device)
        .with_context(|| format!("loading {}", model_path.display()))?;
    save_gguf(
        &loaded.model,
        loaded.require_tokenizer()?,
        loaded.chat_template.as_deref(),
        &args.output,
    )
    .with_context(|| format!("writing {}", args.output.display()))?;
    let bytes = std::fs::metadata(&args.output).map_or(0, |m| m.len());
    eprintln!(
        "wrote {} ({:.1} MB, f32, {})",
        args.output.display(),
        bytes as f64 / 1e6,
        loaded.model.config().architecture
    );
    Ok(())
}

fn pt(args: PtArgs) -> anyhow::Result<()> {
    let (model_path, metadata) = training_metadata(&args.model)?;
    let device = Default::default();
    let loaded = load_model::<DefaultBackend>(&model_path, &device)
        .with_context(|| format!("loading {}", model_path.display()))?;
    save_nanogpt(&loaded.model, &metadata, &args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;
    let bytes = std::fs::metadata(&args.output).map_or(0, |m| m.len());
    eprintln!(
        "wrote {} ({:.1} MB, nanoGPT layout, iter_num {}{})",
        args.output.display(),
        bytes as f64 / 1e6,
        metadata.iter_num,
        metadata
            .best_val_loss
            .map_or_else(String::new, |l| format!(", val loss {l:.4}"))
    );
    Ok(())
}

fn onnx(args: OnnxArgs) -> anyhow::Result<()> {
    let path = model_path(&args.model)?;
    let device = Default::default();
    let loaded = load_model::<DefaultBackend>(&path, &device)
        .with_context(|| format!("loading {}", path.display()))?;
    save_onnx(&loaded.model, &args.output, args.kv_cache)
        .with_context(|| format!("writing {}", args.output.display()))?;
    let bytes = std::fs::metadata(&args.output).map_or(0, |m| m.len());
    eprintln!(
        "wrote {} ({:.1} MB, {} layers{})",
        args.output.display(),
        bytes as f64 / 1e6,
        loaded.model.config().n_layers,
        if args.kv_cache { ", with KV cache" } else { "" }
    );
    Ok(())
}
