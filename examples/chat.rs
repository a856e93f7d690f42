//! Talk to a chat model in the terminal, streaming its answers.
//!
//! ```text
//! cargo run --release --example chat                       # SmolLM2-135M-Instruct from ../shared/models
//! cargo run --release --example chat -- MODEL.gguf [--system "You are a pirate."] [--temperature 0.7]
//! cargo run --release --example chat -- --help
//! ```
//! Type a message and press Enter; an empty line or Ctrl-D quits, `/reset` starts over. The whole
//! conversation is re-rendered with the model's chat template (ChatML if it has none) each turn.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use clap::Parser;
use kiln::backend::DefaultBackend as B;
use kiln::bpe::SpecialTokens;
use kiln::transformer::chat::{ChatMessage, ChatTemplate};
use kiln::transformer::sampling::SamplingParams;
use kiln::transformer::{GenerateParams, Generator, load_model};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: kiln::Allocator = kiln::Allocator;

const DEFAULT_MODEL: &str = "../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Talk to a chat model in the terminal, streaming its answers.
#[derive(Debug, Parser)]
struct Args {
    /// A chat model: .gguf file or model directory (default: SmolLM2-135M-Instruct from
    /// ../shared/models).
    #[arg(value_name = "MODEL", env = "KILN_MODEL")]
    model: Option<PathBuf>,
    /// A system message at the start of the conversation.
    #[arg(long, value_name = "TEXT")]
    system: Option<String>,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let model_path = args
        .model
        .clone()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_MODEL));
    let temperature = args.temperature;
    let device = Default::default();
    eprintln!("loading {} ...", model_path.display());
    let loaded = load_model::<B>(&model_path, &device)?;
    let tok = loaded
        .tokenizer
        .as_ref()
        .ok_or("the model has no tokenizer")?;
    let template = match &loaded.chat_template {
        Some(source) => ChatTemplate::new(source)?,
        None => ChatTemplate::chatml(),
    };
    let end_of_turn = template.end_of_turn();
    let mut stop_ids: Vec<u32> = tok.eos_id().into_iter().chain(tok.eot_id()).collect();
    if let Some(id) = end_of_turn
        .as_deref()
        .and_then(|s| tok.token_id(s.as_bytes()))
    {
        stop_ids.push(id);
    }
    let system: Vec<ChatMessage> = args.system.map(ChatMessage::system).into_iter().collect();
    let mut history = system.clone();
    let context = loaded.model.config().context_length.min(2048);
    eprintln!("ready: type a message (empty line quits, /reset starts over)");
    let stdin = std::io::stdin();
    let mut seed = 0u64;
    loop {
        eprint!("\n> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if line.trim() == "/reset" {
            history = system.clone();
            continue;
        }
        history.push(ChatMessage::user(line.trim()));
        let prompt = template.render(&history, true)?;
        let mut ids = tok.encode_bytes(prompt.as_bytes(), SpecialTokens::Parse);
        while ids.len() + 64 > context && history.len() > system.len() + 1 {
            history.remove(system.len());
            ids = tok.encode_bytes(
                template.render(&history, true)?.as_bytes(),
                SpecialTokens::Parse,
            );
        }
        seed += 1;
        let params = GenerateParams {
            max_new_tokens: (context - ids.len().min(context)).min(512),
            sampling: SamplingParams {
                temperature,
                top_p: Some(0.9),
                repetition_penalty: 1.1,
                seed,
                ..SamplingParams::default()
            },
            stop_ids: stop_ids.clone(),
            stop_strings: end_of_turn.iter().cloned().collect(),
        };
        let mut generator = Generator::new(&loaded.model, tok, &ids, params)?;
        let mut answer = String::new();
        let mut out = std::io::stdout().lock();
        while let Some(piece) = generator.next_piece()? {
            out.write_all(piece.text.as_bytes())?;
            out.flush()?;
            answer.push_str(&piece.text);
        }
        writeln!(out)?;
        let stats = generator.stats();
        eprintln!(
            "[{} tokens, {:.1} tok/s]",
            stats.generated_tokens,
            stats.decode_tokens_per_second()
        );
        history.push(ChatMessage::assistant(answer.trim()));
    }
    Ok(())
}
