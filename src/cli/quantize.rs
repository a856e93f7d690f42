//! `kiln quantize`: a model as a GGUF file in one of llama.cpp's quantization types, by round to
//! nearest or, with calibration text, by GPTQ. Sources other than GGUF files go through
//! `kiln_transformer::gguf_writer` first.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args as ClapArgs;
use kiln::backend::DefaultBackend;
use kiln::gguf::GgufFile;
use kiln::quantize::{FileOptions, Scheme, collect_hessians, quantize_file};
use kiln::transformer::{gguf_writer, load_model};

#[derive(Debug, ClapArgs)]
#[command(
    after_help = "Types: f32 (dequantize: a reference to quantize from), f16, q8_0, q4_0, \
    q4_1, q5_0, q5_1, q4_k, q5_k, q6_k, and llama.cpp's mixes q4_k_s, q4_k_m, q5_k_s, q5_k_m. \
    Tensor choices follow llama-quantize (docs/quantize.md). With --calibration, the attention and \
    MLP weights are quantized by GPTQ on that text instead of round to nearest."
)]
pub struct Args {
    /// The model: a .gguf file (any type Kiln reads, including llama.cpp's quantized ones), or a
    /// Llama-family or GPT-2-style model in any other form Kiln loads (a `kiln train` run or
    /// checkpoint directory, a Kiln or Hugging Face model directory, .pt), written as an f32 GGUF
    /// file first.
    #[arg(long, short, value_name = "M")]
    pub model: PathBuf,
    /// The quantization type or mix.
    #[arg(long = "type", short = 't', value_name = "T")]
    pub scheme: Scheme,
    /// The GGUF file to write (atomically; nothing is written on error).
    #[arg(long, short, value_name = "OUT.gguf")]
    pub output: PathBuf,
    /// Text files to calibrate on: GPTQ for every attention and MLP weight.
    #[arg(long, value_name = "FILE", num_args = 1..)]
    pub calibration: Vec<PathBuf>,
    /// Calibration tokens to use (whole windows of --calibration-ctx).
    #[arg(long, default_value_t = 8192, value_name = "N")]
    pub calibration_tokens: usize,
    /// Tokens per calibration window.
    #[arg(long, default_value_t = 512, value_name = "T")]
    pub calibration_ctx: usize,
    /// GPTQ's damping, as a fraction of the Hessian's mean diagonal.
    #[arg(long, default_value_t = 0.1, value_name = "F")]
    pub damp: f64,
    /// GPTQ in plain column order with each block's scales fixed as the sweep reaches it, instead
    /// of act-order (largest inputs first, scales fixed up front).
    #[arg(long)]
    pub no_act_order: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // A run or checkpoint directory stands for its (newest) checkpoint's model.
    let args = Args {
        model: super::run_dir::model_path(&args.model)?,
        ..args
    };
    if is_gguf(&args.model) {
        let source = GgufFile::open(&args.model)
            .with_context(|| format!("reading {}", args.model.display()))?;
        return quantize(&args, &source);
    }
    // Any other model Kiln loads becomes an f32 GGUF file first (beside the output, removed after).
    let device = Default::default();
    let loaded = load_model::<DefaultBackend>(&args.model, &device)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let tokenizer = loaded.require_tokenizer()?;
    let staging = args.output.with_extension("f32.gguf.partial");
    let name = args
        .model
        .file_name()
        .map_or_else(|| "model".to_owned(), |n| n.to_string_lossy().into_owned());
    let result = gguf_writer(
        &loaded.model,
        tokenizer,
        loaded.chat_template.as_deref(),
        &name,
    )
    .map_err(anyhow::Error::from)
    .and_then(|w| Ok(w.write(&staging)?))
    .and_then(|()| Ok(GgufFile::open(&staging)?))
    .and_then(|source| quantize(&args, &source));
    let _ = std::fs::remove_file(&staging);
    result
}

/// Whether `path` is a GGUF file (by its magic bytes).
fn is_gguf(path: &std::path::Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok_and(|()| &magic == b"GGUF")
}

/// Quantizes `source` (a GGUF file) as `args` ask and writes the output.
fn quantize(args: &Args, source: &GgufFile) -> anyhow::Result<()> {
    let mut options = FileOptions::default();
    options.gptq.damp = args.damp;
    options.gptq.act_order = !args.no_act_order;
    if !args.calibration.is_empty() {
        options.hessians = calibrate(args)?;
        // Calibration names every tensor layout a projection may have; keep the file's.
        options
            .hessians
            .retain(|name, _| source.tensor(name).is_some());
    }
    let bar = super::progress_bar(
        source.tensors.len() as u64,
        "quantizing {bar:30} {pos}/{len} tensors {msg} [{elapsed} < {eta}]",
    );
    let (writer, report) = quantize_file(source, args.scheme, &options, |done, _, name| {
        bar.set_position(done as u64);
        bar.set_message(name.to_owned());
    })?;
    bar.finish_and_clear();
    writer
        .write(&args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;
    let gptq = report.tensors.iter().filter(|t| t.gptq).count();
    eprintln!(
        "wrote {} ({}: {:.1} MB, {:.2} bits per weight; tensors: {}{})",
        args.output.display(),
        args.scheme,
        report.bytes() as f64 / 1e6,
        report.bits_per_weight(),
        report.type_counts(),
        if gptq > 0 {
            format!("; {gptq} by GPTQ")
        } else {
            String::new()
        }
    );
    Ok(())
}

/// Input statistics of every linear weight over the calibration text.
fn calibrate(
    args: &Args,
) -> anyhow::Result<std::collections::HashMap<String, kiln::quantize::gptq::Hessian>> {
    let device = Default::default();
    let mut loaded = load_model::<DefaultBackend>(&args.model, &device)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let tokenizer = loaded.require_tokenizer()?.clone();
    let mut tokens = Vec::new();
    for file in &args.calibration {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        tokens.extend(tokenizer.encode(&text));
        if tokens.len() >= args.calibration_tokens {
            break;
        }
    }
    let ctx = args.calibration_ctx.max(1);
    let wanted = (args.calibration_tokens / ctx).max(1) * ctx;
    tokens.truncate(wanted);
    let bar = super::progress_bar(
        tokens.len() as u64,
        "calibrating {bar:30} {pos}/{len} tokens [{elapsed} < {eta}]",
    );
    let hessians = collect_hessians(&mut loaded.model, &tokens, ctx, |done, _| {
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    eprintln!(
        "calibrated on {} tokens ({} windows of {ctx})",
        tokens.len() / ctx * ctx,
        tokens.len() / ctx
    );
    Ok(hessians)
}
