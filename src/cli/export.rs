//! `kiln export`: a model in the formats other runtimes read.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args as ClapArgs, Subcommand};
use kiln::backend::DefaultBackend;
use kiln::transformer::{load_model, save_onnx};

#[derive(Debug, Subcommand)]
pub enum Command {
    /// An ONNX file (opset 17, dynamic batch and sequence axes) for onnxruntime, TensorRT's
    /// ONNX parser (`trtexec --onnx=model.onnx`) and other runtimes; see docs/onnx.md.
    Onnx(OnnxArgs),
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
    }
}

fn onnx(args: OnnxArgs) -> anyhow::Result<()> {
    let device = Default::default();
    let loaded = load_model::<DefaultBackend>(&args.model, &device)
        .with_context(|| format!("loading {}", args.model.display()))?;
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
