//! Perplexity of quantized models, round to nearest against GPTQ, from one f32 reference: the
//! table in `docs/quantize.md`. Calibrates once, then writes each variant to a temporary GGUF and
//! scores it by llama.cpp's perplexity protocol.
//!
//! ```text
//! kiln quantize -m ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf -t f32 -o ref.gguf
//! cargo run --release --example quantize_quality -- --model ref.gguf \
//!     --calibration ../shared/data/wikitext-2/valid.txt --eval ../shared/data/wikitext-2/test.txt \
//!     --types q4_0,q4_k_m --chunks 16
//! ```

use std::path::PathBuf;

use clap::Parser;
use kiln::backend::DefaultBackend as B;
use kiln::gguf::GgufFile;
use kiln::quantize::gptq::GptqSettings;
use kiln::quantize::{FileOptions, Scheme, collect_hessians, quantize_file};
use kiln::trainer::{PerplexitySettings, perplexity};
use kiln::transformer::load_model;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: kiln::Allocator = kiln::Allocator;

/// Round to nearest against GPTQ, by perplexity.
#[derive(Debug, Parser)]
struct Args {
    /// The reference GGUF (e.g. `kiln quantize -t f32` of a model).
    #[arg(long, short)]
    model: PathBuf,
    /// Calibration text.
    #[arg(long)]
    calibration: PathBuf,
    /// Text to score.
    #[arg(long)]
    eval: PathBuf,
    /// Calibration tokens.
    #[arg(long, default_value_t = 8192)]
    calibration_tokens: usize,
    /// Windows of 512 tokens to score.
    #[arg(long, default_value_t = 16)]
    chunks: usize,
    /// Types to compare.
    #[arg(long, value_delimiter = ',', default_value = "q4_0")]
    types: Vec<Scheme>,
    /// GPTQ dampings to try.
    #[arg(long, value_delimiter = ',', default_value = "0.01")]
    damp: Vec<f64>,
    /// Also try GPTQ with act_order.
    #[arg(long)]
    act_order: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let device = Default::default();
    let mut loaded = load_model::<B>(&args.model, &device)?;
    let tokenizer = loaded.require_tokenizer()?.clone();
    let mut cal = tokenizer.encode(&std::fs::read_to_string(&args.calibration)?);
    cal.truncate(args.calibration_tokens / 512 * 512);
    let eval = tokenizer.encode(&std::fs::read_to_string(&args.eval)?);
    let settings = PerplexitySettings {
        max_windows: Some(args.chunks),
        ..PerplexitySettings::default()
    };
    let started = std::time::Instant::now();
    let hessians = collect_hessians(&mut loaded.model, &cal, 512, |_, _| {})?;
    eprintln!(
        "calibrated on {} tokens in {:.1} s",
        cal.len(),
        started.elapsed().as_secs_f64()
    );
    let reference = perplexity(&loaded.model, &eval, &settings, |_, _, _| {})?;
    println!("| type | method | bits/weight | perplexity |");
    println!("|---|---|---|---|");
    println!(
        "| f32 | reference | 32 | {:.4} ± {:.4} |",
        reference.perplexity, reference.std_error
    );
    drop(loaded);
    let source = GgufFile::open(&args.model)?;
    let dir = tempfile::tempdir()?;
    for scheme in &args.types {
        let mut variants = vec![("round to nearest".to_owned(), FileOptions::default())];
        for &damp in &args.damp {
            for act_order in [false, true] {
                if act_order && !args.act_order {
                    continue;
                }
                variants.push((
                    format!(
                        "GPTQ damp {damp}{}",
                        if act_order { ", act_order" } else { "" }
                    ),
                    FileOptions {
                        hessians: hessians.clone(),
                        gptq: GptqSettings {
                            damp,
                            act_order,
                            ..GptqSettings::default()
                        },
                    },
                ));
            }
        }
        for (label, options) in variants {
            let (writer, report) = quantize_file(&source, *scheme, &options, |_, _, _| {})?;
            let path = dir.path().join("variant.gguf");
            writer.write(&path)?;
            let model = load_model::<B>(&path, &device)?.model;
            let ppl = perplexity(&model, &eval, &settings, |_, _, _| {})?;
            println!(
                "| {scheme} | {label} | {:.2} | {:.4} ± {:.4} |",
                report.bits_per_weight(),
                ppl.perplexity,
                ppl.std_error
            );
        }
    }
    Ok(())
}
