//! Int8 decoding weights (`kiln-quantize`) on a model, before and after: the quantization report,
//! then the greedy continuation of a prompt and its decoding speed with f32 and with int8 weights.
//!
//! ```text
//! cargo run --release --example quantize -- --model ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf
//! cargo run --release --example quantize -- --model runs/quickstart/run/checkpoints/step-1000/model \
//!     --prompt "fn main() {" --max-tokens 64
//! ```
//! `--model` takes a GGUF file or a Kiln model directory. Int8 weights are used for token-by-token
//! decoding only (prefill keeps f32), so the prompt speed stays the same; greedy text may differ
//! after a few tokens, since int8 rounds the weights.

use std::path::PathBuf;

use clap::Parser;
use kiln::backend::DefaultBackend as B;
use kiln::transformer::sampling::SamplingParams;
use kiln::transformer::{GenerateParams, Generation, Generator, Transformer, load_model};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: kiln::Allocator = kiln::Allocator;

/// Quantize a model's weights to int8 for decoding; compare text and speed before and after.
#[derive(Debug, Parser)]
struct Args {
    /// A .gguf model or a Kiln model directory (config.json + model.safetensors + tokenizer.json).
    #[arg(long, short, value_name = "PATH")]
    model: PathBuf,
    /// The prompt to continue.
    #[arg(
        long,
        short,
        default_value = "The capital of France is",
        value_name = "TEXT"
    )]
    prompt: String,
    /// Tokens to generate (greedy), each time.
    #[arg(long, default_value_t = 32, value_name = "N")]
    max_tokens: usize,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let mut loaded = load_model::<B>(&args.model, &Default::default())?;
    let tok = loaded.require_tokenizer()?.clone();
    let prompt = loaded.text_prompt(&args.prompt)?;
    let config = loaded.model.config();
    println!(
        "model: {} ({} layers, width {}, {:.1}M parameters)",
        args.model.display(),
        config.n_layers,
        config.d_model,
        config.num_params() as f64 / 1e6
    );

    let greedy = |model: &Transformer<B>| -> Result<Generation, Box<dyn std::error::Error>> {
        let params = GenerateParams {
            max_new_tokens: args.max_tokens,
            sampling: SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
            stop_ids: prompt.stop_ids.clone(),
            stop_strings: prompt.stop_strings.clone(),
        };
        Ok(Generator::new(model, &tok, &prompt.ids, params)?.run()?)
    };
    let before = greedy(&loaded.model)?;
    show("f32", &before);

    // The one call into kiln-quantize: int8 kernels beside the f32 weights of every linear layer.
    let report = kiln::quantize::quantize_for_decoding(&mut loaded.model)?;
    println!(
        "quantized {} layers: {:.1} MB of f32 weights -> {:.1} MB int8 ({:.2}x smaller)",
        report.layers,
        report.f32_bytes as f64 / 1e6,
        report.int8_bytes as f64 / 1e6,
        report.f32_bytes as f64 / report.int8_bytes.max(1) as f64
    );

    let after = greedy(&loaded.model)?;
    show("int8", &after);
    let same = before
        .ids
        .iter()
        .zip(&after.ids)
        .take_while(|(a, b)| a == b)
        .count();
    println!(
        "same greedy tokens: {same} of {}; decode speed int8 / f32: {:.2}x",
        before.ids.len().max(after.ids.len()),
        after.stats.decode_tokens_per_second() / before.stats.decode_tokens_per_second().max(1e-9)
    );
    Ok(())
}

fn show(label: &str, generation: &Generation) {
    let stats = &generation.stats;
    println!(
        "{label}: {:?} ({} tokens; prompt {:.1} tok/s, decode {:.1} tok/s)",
        generation.text,
        stats.generated_tokens,
        stats.prefill_tokens_per_second(),
        stats.decode_tokens_per_second()
    );
}
