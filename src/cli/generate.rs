//! `kiln generate`: continue a prompt (or answer it, with `--chat`); only the continuation goes to
//! stdout, streamed as it is produced; diagnostics and timings go to stderr.

use std::io::Write;

use clap::Args as ClapArgs;
use kiln::transformer::chat::ChatMessage;
use kiln::transformer::sampling::SamplingParams;
use kiln::transformer::{GenerateParams, Generator};

#[derive(Debug, ClapArgs)]
pub struct Args {
    #[command(flatten)]
    pub model: crate::cli::ModelArgs,
    /// The prompt.
    #[arg(long, short, value_name = "TEXT")]
    pub prompt: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128, value_name = "N")]
    pub max_tokens: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P.
    #[arg(long, default_value_t = 0.95, value_name = "P")]
    pub top_p: f32,
    /// Keep only the K most likely tokens (0 = all).
    #[arg(long, default_value_t = 40, value_name = "K")]
    pub top_k: usize,
    /// Penalize tokens seen in the last 64 (1.0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Random seed (default: from the clock).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when this string is produced (repeatable).
    #[arg(long = "stop", value_name = "TEXT")]
    pub stop: Vec<String>,
    /// Wrap the prompt in the model's chat template (ChatML if it has none).
    #[arg(long)]
    pub chat: bool,
    /// With --chat: a system message.
    #[arg(long, value_name = "TEXT")]
    pub system: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let loaded = args.model.load()?;
    let tokenizer = loaded.require_tokenizer()?;

    let mut prompt = if args.chat {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage::system(system.clone()));
        }
        messages.push(ChatMessage::user(args.prompt.clone()));
        loaded.chat_prompt(&loaded.template()?, &messages)?
    } else {
        loaded.text_prompt(&args.prompt)?
    };
    prompt.stop_strings.extend(args.stop.iter().cloned());

    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: (args.top_k > 0).then_some(args.top_k),
        top_p: (args.top_p < 1.0).then_some(args.top_p),
        repetition_penalty: args.repetition_penalty,
        seed: args.seed.unwrap_or_else(clock_seed),
        ..SamplingParams::default()
    };
    let params = GenerateParams {
        max_new_tokens: args.max_tokens,
        sampling,
        stop_ids: prompt.stop_ids,
        stop_strings: prompt.stop_strings,
    };
    let mut generator = Generator::new(&loaded.model, tokenizer, &prompt.ids, params)?;
    let mut out = std::io::stdout().lock();
    while let Some(piece) = generator.next_piece()? {
        out.write_all(piece.text.as_bytes())?;
        out.flush()?;
    }
    writeln!(out)?;
    let stats = generator.stats();
    eprintln!(
        "prompt {} tokens at {:.1} tok/s, generated {} tokens at {:.1} tok/s, finish: {}",
        stats.prompt_tokens,
        stats.prefill_tokens_per_second(),
        stats.generated_tokens,
        stats.decode_tokens_per_second(),
        generator.finish_reason().map_or("length", |f| f.as_str()),
    );
    Ok(())
}

fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
