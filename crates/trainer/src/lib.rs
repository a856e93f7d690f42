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

mod builder;
pub mod checkpoint;
mod config;
pub mod data;
mod error;
mod eval;
pub mod memory;
pub mod optimizer;
pub mod parallel;
pub mod precision;
pub mod sampler;
pub mod schedule;
mod trainer;

pub use builder::{BoxedOptimizer, OptimizerFactory, TrainerBuilder};
pub use config::{ModelSpec, Precision, TrainConfig};
pub use error::{Result, TrainError};
pub use eval::{evaluate, evaluate_share};
pub use trainer::{StepReport, TrainOutcome, Trainer};
