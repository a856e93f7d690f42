//! Command-line definitions and dispatch.

mod corpus;
mod data;
mod eval;
mod export;
mod generate;
mod quantize;
mod quickstart;
mod run_dir;
mod serve;
mod stop;
mod tokenizer;
mod train;

use clap::{Parser, Subcommand};

/// Kiln: from raw text to a trained, quantized, served language model, on Burn.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Worker threads for parallel work (default: all cores).
    #[arg(long, global = true, value_name = "N")]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the pipeline end to end on a corpus (default: the Rust sources of Kiln's dependencies).
    Quickstart(quickstart::Args),
    /// Train, inspect and apply byte-level BPE tokenizers.
    #[command(subcommand)]
    Tokenizer(tokenizer::Command),
    /// Turn corpora into token shards for training.
    #[command(subcommand)]
    Data(data::Command),
    /// Train a model on token shards (or resume a run).
    Train(train::TrainArgs),
    /// Knowledge distillation: train a student config on token shards with a teacher model's soft
    /// targets (`kiln train` with --teacher; checkpoints, resume and metrics as in training).
    Distill(train::TrainArgs),
    /// Validation loss on DIR/val.bin, or perplexity on a text file (llama.cpp's protocol).
    Eval(eval::Args),
    /// Generate text with a model (.gguf, .pt, a model directory).
    Generate(generate::Args),
    /// Serve a model over an OpenAI-compatible HTTP API, with continuous batching.
    Serve(serve::Args),
    /// Quantize a model to one of llama.cpp's GGUF types (q8_0 … q4_k_m), optionally by GPTQ.
    Quantize(quantize::Args),
    /// Write a model in a format other runtimes read (ONNX, PyTorch .pt, GGUF).
    #[command(subcommand)]
    Export(export::Command),
    /// Show the build: version, compiled backend, and a smoke test on its default device.
    Info,
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(n) = cli.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build_global()?;
    }
    match cli.command {
        Command::Quickstart(args) => quickstart::run(args),
        Command::Tokenizer(cmd) => tokenizer::run(cmd),
        Command::Data(cmd) => data::run(cmd),
        Command::Generate(args) => generate::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Export(cmd) => export::run(cmd),
        Command::Quantize(args) => quantize::run(args),
        Command::Train(args) => train::run(args),
        Command::Distill(args) => {
            if args.teacher.is_none() && args.resume.is_none() {
                anyhow::bail!("kiln distill needs --teacher M (or --resume RUN_DIR)");
            }
            train::run(args)
        }
        Command::Eval(args) => eval::run(args),
        Command::Info => {
            println!("kiln {}", env!("CARGO_PKG_VERSION"));
            println!("backend: {}", kiln::backend::BACKEND_NAME);
            println!("smoke test (sum of 1..=4): {}", kiln::backend::smoke_test());
            println!("threads: {}", rayon::current_num_threads());
            Ok(())
        }
    }
}

/// How the model holds its weights (`--quantize`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Quantize {
    /// A GGUF file with quantized weights runs from its own blocks (`native`); anything else
    /// with f32 weights (`none`).
    Auto,
    /// f32 weights.
    None,
    /// f32 weights, plus int8 copies (a scale per block of 32) for token-by-token decoding.
    Int8,
    /// The GGUF file's own quantized blocks, memory-mapped, as the only copy of the weights:
    /// 8-bit activations and integer dot products for prefill and decoding (Q4_0, Q4_1, Q5_0 and
    /// Q8_0 natively, Q4_K transcoded exactly; other types converted to Q8_0 once at load).
    Native,
}

/// The model `generate`, `serve` and `eval` run, and how it holds its weights.
#[derive(Debug, clap::Args)]
pub struct ModelArgs {
    /// A .gguf model, a PyTorch checkpoint (nanoGPT's ckpt.pt, pytorch_model.bin), a Kiln model
    /// directory, a `kiln train` run or checkpoint directory (its newest checkpoint's model), or a
    /// Hugging Face checkpoint directory.
    #[arg(long, short, value_name = "M")]
    pub model: std::path::PathBuf,
    /// The tokenizer, for a model stored without one or to replace its own: tokenizer.json, a
    /// .gguf, nanoGPT's meta.pkl, or a directory with tokenizer.json or vocab.json + merges.txt
    /// (nanoGPT's GPT-2 checkpoints need GPT-2's).
    #[arg(long, value_name = "T")]
    pub tokenizer: Option<std::path::PathBuf>,
    /// Weights in memory: `auto` runs a quantized GGUF file from its own blocks (a fraction of
    /// f32's memory, integer kernels on the CPU) and everything else in f32.
    #[arg(long, value_enum, default_value_t = Quantize::Auto)]
    pub quantize: Quantize,
}

impl ModelArgs {
    /// Loads the model on the default backend as `--quantize` asks, and reports it on stderr.
    pub fn load(
        &self,
    ) -> anyhow::Result<kiln::transformer::LoadedModel<kiln::backend::DefaultBackend>> {
        use anyhow::Context;
        let (path, how) = (&run_dir::model_path(&self.model)?, self.quantize);
        let started = std::time::Instant::now();
        let native = match how {
            Quantize::Native => true,
            Quantize::Auto => {
                path.is_file()
                    && kiln::gguf::GgufFile::open(path)
                        .is_ok_and(|f| kiln::transformer::gguf_is_quantized(&f))
            }
            Quantize::None | Quantize::Int8 => false,
        };
        let device = Default::default();
        let mut loaded = if native {
            kiln::transformer::load_gguf_quantized(path, &device)
        } else {
            kiln::transformer::load_model(path, &device)
        }
        .with_context(|| format!("loading {}", path.display()))?;
        let weights = if native {
            "quantized blocks from the file"
        } else if how == Quantize::Int8 {
            let report = kiln::quantize::quantize_for_decoding(&mut loaded.model)?;
            eprintln!(
                "int8 decoding weights: {} layers, {:.0} MB (f32: {:.0} MB)",
                report.layers,
                report.int8_bytes as f64 / 1e6,
                report.f32_bytes as f64 / 1e6
            );
            "f32 + int8"
        } else {
            "f32"
        };
        if let Some(path) = &self.tokenizer {
            let tokenizer = kiln::bpe::Tokenizer::from_file(path)
                .with_context(|| format!("loading the tokenizer {}", path.display()))?;
            let vocab = loaded.model.config().vocab_size;
            anyhow::ensure!(
                tokenizer.vocab_size() <= vocab,
                "{} has {} tokens but the model only {vocab} embeddings",
                path.display(),
                tokenizer.vocab_size()
            );
            loaded.tokenizer = Some(tokenizer);
        }
        let config = loaded.model.config();
        eprintln!(
            "loaded {} ({} layers, width {}, {:.1}M parameters, {weights}) in {:.2}s on {}",
            path.display(),
            config.n_layers,
            config.d_model,
            config.num_params() as f64 / 1e6,
            started.elapsed().as_secs_f64(),
            kiln::backend::BACKEND_NAME,
        );
        Ok(loaded)
    }
}

/// A progress bar over `len` steps drawn with `template` (indicatif's syntax), hidden when stderr
/// is not a terminal.
fn progress_bar(len: u64, template: &str) -> indicatif::ProgressBar {
    if !interactive() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar
}

/// Whether progress bars should be drawn (stderr is a terminal).
fn interactive() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}
