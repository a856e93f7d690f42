//! Serve a model over Kiln's OpenAI-compatible HTTP API (continuous batching), through the
//! library: `kiln::transformer::load_model` and `kiln::serve::serve`.
//!
//! ```text
//! cargo run --release --example serve -- --model ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf
//! cargo run --release --example serve -- --model runs/quickstart/run/checkpoints/step-1000/model --port 8080
//! cargo run --release --example serve -- --model MODEL --once    # one request to itself, then exit
//! ```
//! `--model` takes a GGUF file or a Kiln model directory (`kiln quickstart` leaves one at
//! `runs/quickstart/run/checkpoints/step-1000/model`). The server listens on 127.0.0.1:PORT until
//! Ctrl-C. Then, from another terminal:
//!
//! ```text
//! curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
//!     -d '{"model": "kiln", "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 32}'
//! ```
//! or with the `openai` Python package:
//!
//! ```python
//! from openai import OpenAI
//! client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
//! answer = client.completions.create(model="kiln", prompt="The capital of France is", max_tokens=8)
//! print(answer.choices[0].text)
//! ```
//! `kiln serve` is the same server with every setting as a flag (`--help`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use kiln::backend::DefaultBackend as B;
use kiln::serve::{EngineConfig, ServeConfig, serve};
use kiln::transformer::load_model;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: kiln::Allocator = kiln::Allocator;

/// Serve a model over an OpenAI-compatible HTTP API on 127.0.0.1.
#[derive(Debug, Parser)]
struct Args {
    /// A .gguf model or a Kiln model directory (config.json + model.safetensors + tokenizer.json).
    #[arg(long, short, value_name = "PATH")]
    model: PathBuf,
    /// Port on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// The model's name in the API.
    #[arg(long, default_value = "kiln", value_name = "NAME")]
    name: String,
    /// Most requests generating at once.
    #[arg(long, default_value_t = 4, value_name = "N")]
    max_batch_size: usize,
    /// Send one completion request (PROMPT, MAX_TOKENS) to the server, print the answer, exit.
    #[arg(long)]
    once: bool,
    /// With --once: the prompt.
    #[arg(long, default_value = "The capital of France is", value_name = "TEXT")]
    prompt: String,
    /// With --once: most tokens to generate.
    #[arg(long, default_value_t = 8, value_name = "N")]
    max_tokens: usize,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let loaded = load_model::<B>(&args.model, &Default::default())?;
    eprintln!(
        "loaded {} ({:.1}M parameters)",
        args.model.display(),
        loaded.model.config().num_params() as f64 / 1e6
    );
    let config = ServeConfig {
        port: args.port,
        model_name: args.name.clone(),
        engine: EngineConfig {
            max_batch_size: args.max_batch_size,
            ..EngineConfig::default()
        },
        ..ServeConfig::default()
    };
    let once = args.once.then(|| {
        serde_json::json!({
            "model": args.name,
            "prompt": args.prompt,
            "max_tokens": args.max_tokens,
            "temperature": 0,
        })
        .to_string()
    });
    serve(loaded, config, move |addr| {
        println!("listening on http://{addr}");
        eprintln!("OpenAI base URL: http://{addr}/v1 (Ctrl-C stops)");
        if let Some(body) = once {
            // The server runs on this thread from here on: ask from another one, then exit.
            std::thread::spawn(move || {
                let code = match post(addr, "/v1/completions", &body) {
                    Ok((200, answer)) => {
                        println!("{answer}");
                        0
                    }
                    Ok((status, answer)) => {
                        eprintln!("error: HTTP {status}: {answer}");
                        1
                    }
                    Err(e) => {
                        eprintln!("error: request to {addr} failed: {e}");
                        1
                    }
                };
                std::process::exit(code);
            });
        }
    })?;
    Ok(())
}

/// One JSON POST over HTTP/1.1 (`Connection: close`): the status and the body.
fn post(addr: SocketAddr, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(600)))?;
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_owned()))
}
