//! Kiln's side of the generation speed comparison with llama.cpp (`scripts/bench_generate.sh`):
//! a prompt of `--prompt-tokens` tokens, then `--new-tokens` greedy tokens, one sequence.
//!
//! ```text
//! cargo run --release --example generate_bench -- MODEL.gguf [--prompt-tokens 128] [--new-tokens 128] [--runs 3] [--ids-out ids.json] [--int8 | --native]
//! cargo run --release --example generate_bench -- --help
//! ```
//! Prefill is timed as the prompt's forward pass (logits of the last position); decode as the
//! single-token steps after it. Prints medians over `--runs`, one line per measurement. `--int8`
//! decodes with int8 weights (`kiln-quantize`), prefill keeping the f32 weights; `--native` runs
//! a quantized GGUF file from its own blocks.

use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::{Int, Tensor, TensorData};
use clap::Parser;
use kiln::backend::DefaultBackend as B;
use kiln::transformer::{KvCache, Logits, load_gguf_quantized, load_model};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: kiln::Allocator = kiln::Allocator;

const TEXT: &str = "The history of natural language processing generally started in the 1950s, although work can be \
found from earlier periods. In 1950, Alan Turing published an article titled Computing Machinery and Intelligence \
which proposed what is now called the Turing test as a criterion of intelligence. ";

/// Prefill and greedy decode speed of one sequence (Kiln's side of `scripts/bench_generate.sh`).
#[derive(Debug, Parser)]
struct Args {
    /// A .gguf model or a model directory.
    #[arg(value_name = "MODEL")]
    model: PathBuf,
    /// Prompt length in tokens (a fixed English text, repeated).
    #[arg(long, default_value_t = 128, value_name = "N")]
    prompt_tokens: usize,
    /// Greedy tokens decoded after the prompt.
    #[arg(long, default_value_t = 128, value_name = "N")]
    new_tokens: usize,
    /// Timed runs; the medians are printed.
    #[arg(long, default_value_t = 3, value_name = "N")]
    runs: usize,
    /// KV-cache capacity in tokens (default and minimum: prompt + new tokens).
    #[arg(long, value_name = "N")]
    capacity: Option<usize>,
    /// Write the prompt's token ids (a JSON list) to this file, for the peer to use the same ones.
    #[arg(long, value_name = "FILE")]
    ids_out: Option<PathBuf>,
    /// Decode with int8 weights (kiln-quantize); prefill keeps the f32 weights.
    #[arg(long, conflicts_with = "native")]
    int8: bool,
    /// Run a quantized GGUF file from its own blocks (no f32 weights; 8-bit activations and
    /// integer kernels for prefill and decode), as `kiln generate` does by default.
    #[arg(long)]
    native: bool,
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let (n_prompt, n_new, runs) = (args.prompt_tokens, args.new_tokens, args.runs);
    let capacity = args
        .capacity
        .unwrap_or(n_prompt + n_new)
        .max(n_prompt + n_new);
    let device = Default::default();
    let mut loaded = if args.native {
        load_gguf_quantized::<B>(&args.model, &device)?
    } else {
        load_model::<B>(&args.model, &device)?
    };
    if args.int8 {
        kiln::quantize::quantize_for_decoding(&mut loaded.model)?;
    }
    let peer = match (args.int8, args.native) {
        (true, _) => "kiln-int8",
        (_, true) => "kiln-native",
        _ => "kiln",
    };
    let tok = loaded
        .tokenizer
        .as_ref()
        .ok_or("the model has no tokenizer")?;
    let model = &loaded.model;
    let mut ids = Vec::new();
    while ids.len() < n_prompt {
        ids.extend(tok.encode(TEXT));
    }
    ids.truncate(n_prompt);
    if let Some(path) = &args.ids_out {
        std::fs::write(path, format!("{ids:?}"))?;
    }
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    let mut generated = Vec::new();
    for _ in 0..runs.max(1) {
        let mut cache = KvCache::<B>::new(model.config(), 1, capacity, &device)?;
        let input = Tensor::<B, 2, Int>::from_data(
            TensorData::new(ids.iter().map(|&i| i64::from(i)).collect(), [1, ids.len()]),
            &device,
        );
        let t = Instant::now();
        let logits: Vec<f32> = model
            .forward_cached(input, &mut cache, None, Logits::Last)?
            .into_data()
            .to_vec()?;
        prefill.push(t.elapsed().as_secs_f64());
        let argmax = |v: &[f32]| {
            v.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(i, _)| i as u32)
        };
        let mut next = argmax(&logits);
        generated.clear();
        let t = Instant::now();
        for _ in 0..n_new {
            generated.push(next);
            let input = Tensor::<B, 2, Int>::from_data(
                TensorData::new(vec![i64::from(next)], [1, 1]),
                &device,
            );
            let logits: Vec<f32> = model
                .forward_cached(input, &mut cache, None, Logits::Last)?
                .into_data()
                .to_vec()?;
            next = argmax(&logits);
        }
        decode.push(t.elapsed().as_secs_f64());
    }
    let (p, d) = (median(prefill), median(decode));
    println!(
        "peer={peer} task=prefill tokens={n_prompt} seconds={p:.3} tok_per_s={:.1}",
        n_prompt as f64 / p
    );
    println!(
        "peer={peer} task=decode tokens={n_new} seconds={d:.3} tok_per_s={:.1}",
        n_new as f64 / d
    );
    eprintln!(
        "continuation: {:?}",
        tok.decode(&generated[..generated.len().min(24)])?
    );
    Ok(())
}
