//! # kiln-trainer
//!
//! The training loop for Kiln's Transformers, generic over Burn's autodiff backends: token shards
//! → forward → cross-entropy → backward → global-norm clipping → AdamW with nanoGPT's parameter
//! groups and learning-rate schedule, gradient accumulation, periodic evaluation, JSON-lines
//! metrics, checkpoints that hold the model directory plus the exact model, optimizer and trainer
//! state, exact resume, and recovery from non-finite steps.

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
