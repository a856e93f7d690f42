//! # kiln-trainer
//!
//! The training loop for Kiln's Transformers, generic over Burn's autodiff backends: token shards
//! → forward → cross-entropy → backward → global-norm clipping → AdamW with nanoGPT's parameter
//! groups and learning-rate schedule, gradient accumulation, periodic evaluation, JSON-lines
//! metrics, checkpoints that hold the model directory plus the exact model, optimizer and trainer
//! state, exact resume, and recovery from non-finite steps. Mixed precision ([`precision`]): bf16 or
//! f16 forward and backward with f32 master weights and optimizer state, and dynamic loss scaling
//! for f16. A pre-flight memory estimate ([`memory`]) stops a run that would not fit before it starts.
//! Activation checkpointing is the caller's choice of backend (`Autodiff<_, BalancedCheckpointing>`).
//!
//! Data-parallel training plugs in through two seams without touching the loop
//! ([`Trainer::builder`]): [`parallel::GradientSync`] (gradients and global numbers across ranks)
//! and [`optimizer::OptimizerStep`] (the update and its checkpointed state); the batch
//! [`sampler`] gives each rank its rows of the single-process batch. [`Trainer::run`] stops
//! cleanly, with a checkpoint, when its stop flag is raised.
//!
//! ```
//! use burn::backend::{Autodiff, Flex};
//! use kiln_bpe::prepare::{PrepareConfig, prepare_bytes};
//! use kiln_trainer::{ModelSpec, TrainConfig, Trainer};
//! use kiln_transformer::ModelConfig;
//!
//! let dir = tempfile::tempdir()?;
//! let corpus = dir.path().join("corpus.txt");
//! std::fs::write(&corpus, "to be, or not to be: that is the question.\n".repeat(40))?;
//! // One token per byte; writes data/{train,val}.bin and data/tokenizer.json.
//! prepare_bytes(&[corpus], &dir.path().join("data"), &PrepareConfig::default())?;
//! let config = TrainConfig {
//!     model: ModelSpec::Full(ModelConfig {
//!         n_layers: 1, d_model: 32, n_heads: 2, n_kv_heads: 2, d_ff: 64, context_length: 16,
//!         ..ModelConfig::shakespeare_char(257)
//!     }),
//!     data_dir: dir.path().join("data"),
//!     micro_batch: 4,
//!     seq_len: 16,
//!     max_steps: 3,
//!     ..TrainConfig::default()
//! };
//! let mut trainer = Trainer::<Autodiff<Flex>>::new(config, dir.path().join("run"), Default::default())?;
//! let val_loss = trainer.train()?; // evaluates, then writes checkpoints/step-3/
//! assert!(val_loss.is_finite());
//! assert!(dir.path().join("run/checkpoints/step-3/model/model.safetensors").exists());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

pub mod adamw;
mod builder;
pub mod checkpoint;
mod config;
pub mod data;
pub mod distill;
mod error;
mod eval;
pub mod memory;
pub mod optimizer;
pub mod parallel;
pub mod perplexity;
pub mod precision;
pub mod run_loop;
pub mod sampler;
pub mod schedule;
mod trainer;

pub use builder::{
    BoxedOptimizer, OptimizerFactory, TrainerBuilder, init_model, initial_model, open_shards,
    prepare_new_run, resolve,
};
pub use config::{ModelSpec, Precision, TrainConfig};
pub use distill::DistillConfig;
pub use error::{Result, TrainError};
pub use eval::{evaluate, evaluate_share};
pub use perplexity::{Perplexity, PerplexitySettings, perplexity};
pub use run_loop::TrainingRun;
pub use trainer::{ModelStateBytes, StepReport, TrainOutcome, Trainer, parameter_bytes};
