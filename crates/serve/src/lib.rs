//! # kiln-serve
//!
//! An OpenAI-compatible HTTP server for Kiln models (`kiln serve --model M`): `/v1/models`,
//! `/v1/completions` and `/v1/chat/completions` (whole or streamed as server-sent events),
//! `/health` and Prometheus `/metrics`. A scheduler thread owns the model and runs continuous
//! batching: requests join the running batch at the next step and leave it when done, each with
//! its own sampling parameters and KV-cache row.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use burn::backend::Flex;
//! use kiln_serve::{ServeConfig, serve};
//!
//! let loaded = kiln_transformer::load_model::<Flex>("model.gguf", &Default::default())?;
//! let config = ServeConfig { port: 8000, model_name: "smollm2".into(), ..ServeConfig::default() };
//! serve(loaded, config, |addr| println!("listening on http://{addr}"))?;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod api;
pub mod engine;
mod error;
pub mod metrics;
mod server;

pub use engine::{Engine, EngineConfig, EngineError, EngineHandle};
pub use error::{ApiError, ServeError};
pub use server::{ServeConfig, serve};
