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

pub mod checkpoint;
mod config;
pub mod data;
mod error;
pub mod memory;
pub mod optimizer;
pub mod precision;
pub mod schedule;
mod trainer;

pub use config::{ModelSpec, Precision, TrainConfig};
pub use error::{Result, TrainError};
pub use trainer::{StepReport, Trainer, evaluate};
