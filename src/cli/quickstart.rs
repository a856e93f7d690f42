//! `kiln quickstart`: the pipeline end to end on a corpus that needs no download: tokenizer, token
//! shards, a small GPT trained for a few minutes, a checkpoint, a sample.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use burn::module::AutodiffModule;
use clap::Args as ClapArgs;
use kiln::backend::TrainBackend;
use kiln::bpe::Tokenizer;
use kiln::trainer::{ModelSpec, TrainConfig, Trainer};
use kiln::transformer::sampling::SamplingParams;
use kiln::transformer::{GenerateParams, Generator, ModelConfig};

use super::corpus::{Corpus, default_corpus};
use super::data::{prepare_shards, print_report};
use super::tokenizer::{PreTokenizerChoice, TrainArgs, train_tokenizer};

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Output directory for the run.
    #[arg(long, default_value = "runs/quickstart", value_name = "DIR")]
    pub out: PathBuf,
    /// Tokenizer vocabulary size.
    #[arg(long, default_value_t = 4096, value_name = "N")]
    pub vocab_size: usize,
    /// Optimizer steps for the GPT (0 = stop after the data).
    #[arg(long, default_value_t = 1000, value_name = "N")]
    pub steps: u64,
    /// With no FILE: how much of the default corpus to use, in MB.
    #[arg(long, default_value_t = 8.0, value_name = "MB")]
    pub corpus_mb: f64,
    /// Text files to use instead of the default corpus (the Rust sources of Kiln and of the
    /// packages its default build compiles, read from the checkout's Cargo.lock and the cargo
    /// registry; the file list goes to DIR/corpus.txt).
    #[arg(value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let files = if args.files.is_empty() {
        let corpus = default_corpus((args.corpus_mb * 1e6) as u64)?;
        report_corpus(&corpus, &args.out.join("corpus.txt"))?;
        corpus.files
    } else {
        args.files.clone()
    };

    eprintln!(
        "[1/3] training a {}-token byte-level BPE tokenizer",
        args.vocab_size
    );
    let tok = train_tokenizer(&TrainArgs {
        vocab_size: args.vocab_size,
        min_frequency: 2,
        special: Vec::new(),
        pre_tokenizer: PreTokenizerChoice::Gpt2,
        individual_digits: false,
        output: args.out.join("tokenizer.json"),
        files: files.clone(),
    })?;

    eprintln!("[2/3] tokenizing the corpus into shards");
    let report = prepare_shards(&tok, &files, &args.out.join("data"), 0.1)?;
    print_report(&report);
    show_sample(&tok)?;
    println!("tokenizer: {}", args.out.join("tokenizer.json").display());
    if args.steps > 0 {
        train_gpt(&args, &tok)?;
    }
    Ok(())
}

/// Trains a small GPT on the shards, then samples from it.
fn train_gpt(args: &Args, tok: &Tokenizer) -> anyhow::Result<()> {
    let model = ModelConfig {
        vocab_size: tok.vocab_size(),
        context_length: 128,
        n_layers: 4,
        n_heads: 4,
        n_kv_heads: 4,
        d_model: 128,
        d_ff: 512,
        dropout: 0.0,
        ..ModelConfig::shakespeare_char_cpu(tok.vocab_size())
    };
    eprintln!(
        "[3/3] training a {:.1}M-parameter GPT for {} steps (Ctrl-C is safe: checkpoints are atomic)",
        model.num_params() as f64 / 1e6,
        args.steps
    );
    let config = TrainConfig {
        model: ModelSpec::Full(model),
        data_dir: args.out.join("data"),
        tokenizer: Some(args.out.join("tokenizer.json")),
        micro_batch: 16,
        seq_len: 128,
        max_steps: args.steps,
        lr: 3e-3,
        min_lr: 3e-4,
        warmup_steps: (args.steps / 20).max(1),
        eval_interval: (args.steps / 4).max(1),
        eval_batches: 10,
        checkpoint_interval: 0,
        log_interval: 10,
        ..TrainConfig::default()
    };
    let run_dir = args.out.join("run");
    let mut trainer = Trainer::<TrainBackend>::new(config, &run_dir, Default::default())?
        .with_progress(super::interactive());
    eprintln!("step 0: val loss {:.4}", trainer.evaluate()?);
    let val = trainer.train()?;
    let Some(model) = trainer.model().map(|m| m.valid()) else {
        bail!("the trainer lost its model");
    };
    let prompt = tok.encode("fn main() {");
    let params = GenerateParams {
        max_new_tokens: 60,
        sampling: SamplingParams {
            temperature: 0.8,
            top_k: Some(40),
            seed: 7,
            ..SamplingParams::default()
        },
        stop_ids: tok.eot_id().into_iter().collect(),
        stop_strings: Vec::new(),
    };
    let sample = Generator::new(&model, tok, &prompt, params)?.run()?;
    println!("sample: {:?}", format!("fn main() {{{}", sample.text));
    if let Some((step, dir)) = kiln::trainer::checkpoint::list_checkpoints(&run_dir).pop() {
        println!("checkpoint (step {step}): {}", dir.display());
    }
    println!("final val_loss {val:.4}");
    Ok(())
}

/// Says which default corpus was used, and lists its files in `list`.
fn report_corpus(corpus: &Corpus, list: &Path) -> anyhow::Result<()> {
    let mut text = String::new();
    for f in &corpus.files {
        text.push_str(&f.to_string_lossy());
        text.push('\n');
    }
    std::fs::write(list, text).with_context(|| format!("writing {}", list.display()))?;
    eprintln!(
        "corpus: {} Rust files, {:.1} MB, from {} of the {} packages Kiln's default build compiles \
         (its own sources and theirs in {}; list: {}); pass FILE... to use your own text",
        corpus.files.len(),
        corpus.bytes as f64 / 1e6,
        corpus.used_packages,
        corpus.packages,
        corpus.registry.display(),
        list.display(),
    );
    if !corpus.missing.is_empty() {
        eprintln!(
            "note: {} of them are not in the registry (skipped): {}",
            corpus.missing.len(),
            corpus.missing.join(", ")
        );
    }
    Ok(())
}

fn show_sample(tok: &Tokenizer) -> anyhow::Result<()> {
    let sample = "fn main() { println!(\"Hello, Kiln! 你好 🦀\"); }";
    let ids = tok.encode(sample);
    let pieces: Vec<String> = ids
        .iter()
        .map(|&id| printable(tok.token_bytes(id).unwrap_or_default()))
        .collect();
    println!("sample: {sample:?} -> {} tokens {pieces:?}", ids.len());
    if tok.decode(&ids)? != sample {
        bail!("round trip of the sample failed");
    }
    Ok(())
}

/// A token's bytes as text, with bytes that are not whole UTF-8 characters shown as `\xNN`.
fn printable(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_owned(),
        Err(_) => bytes.iter().map(|b| format!("\\x{b:02X}")).collect(),
    }
}
