//! `kiln serve`: an OpenAI-compatible HTTP server for a model, with continuous batching.

use std::time::Duration;

use clap::Args as ClapArgs;
use kiln::serve::{EngineConfig, ServeConfig, serve};

#[derive(Debug, ClapArgs)]
pub struct Args {
    #[command(flatten)]
    pub model: crate::cli::ModelArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// The model's name in the API (default: the file or directory name).
    #[arg(long, value_name = "NAME")]
    pub served_model_name: Option<String>,
    /// Require `Authorization: Bearer KEY` on /v1 requests.
    #[arg(long, env = "KILN_API_KEY", value_name = "KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Most requests generating at once (1 serves one request at a time).
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub max_batch_size: usize,
    /// Most requests waiting for a slot; more get 429.
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub max_queue: usize,
    /// Tokens per sequence, prompt + completion (default: the model's context, at most 4096).
    #[arg(long, value_name = "N")]
    pub ctx_size: Option<usize>,
    /// Prompt tokens read per scheduler step, shared by the prompts being read.
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub prefill_chunk: usize,
    /// Seconds a request may run before it ends with a timeout error.
    #[arg(long, default_value_t = 600, value_name = "S")]
    pub request_timeout: u64,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 2 << 20, value_name = "BYTES")]
    pub max_body_bytes: usize,
    /// After SIGINT/SIGTERM, seconds in-flight requests may run before they are cancelled.
    #[arg(long, default_value_t = 30, value_name = "S")]
    pub shutdown_timeout: u64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let loaded = args.model.load()?;
    let config = loaded.model.config();
    let context = args
        .ctx_size
        .unwrap_or(config.context_length.min(4096))
        .min(config.context_length);
    let name = args.served_model_name.clone().unwrap_or_else(|| {
        args.model
            .model
            .file_stem()
            .map_or("kiln".into(), |s| s.to_string_lossy().into_owned())
    });
    let serve_config = ServeConfig {
        host: args.host,
        port: args.port,
        model_name: name.clone(),
        api_key: args.api_key,
        max_body_bytes: args.max_body_bytes,
        shutdown_timeout: Duration::from_secs(args.shutdown_timeout),
        engine: EngineConfig {
            max_batch_size: args.max_batch_size,
            max_queue: args.max_queue,
            context,
            prefill_chunk: args.prefill_chunk,
            request_timeout: Duration::from_secs(args.request_timeout),
        },
    };
    let batch = args.max_batch_size;
    serve(loaded, serve_config, |addr| {
        // The first stdout line says where to connect (scripts and tests read it).
        println!("listening on http://{addr}");
        eprintln!(
            "serving `{name}` (context {context}, batch up to {batch}); OpenAI base URL: http://{addr}/v1"
        );
    })?;
    eprintln!("server stopped");
    Ok(())
}
