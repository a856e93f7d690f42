//! The crate's error type.

use std::path::PathBuf;

/// Everything that can stop training, each with a message that says what and where.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The training config is malformed or inconsistent.
    #[error("invalid training config: {0}")]
    Config(String),
    /// A checkpoint is missing or unreadable.
    #[error("checkpoint {}: {reason}", path.display())]
    Checkpoint {
        /// The checkpoint directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The model failed.
    #[error(transparent)]
    Model(#[from] kiln_transformer::ModelError),
    /// The data or tokenizer failed.
    #[error(transparent)]
    Data(#[from] kiln_bpe::BpeError),
    /// Token shards failed.
    #[error(transparent)]
    Shard(#[from] kiln_bpe::ShardError),
    /// The batch sampler could not be set up or read its shard.
    #[error(transparent)]
    Sampler(#[from] crate::sampler::SamplerError),
    /// The background thread that prepares training batches is gone.
    #[error("the data prefetch thread stopped")]
    DataThreadStopped,
    /// An earlier step failed part-way (e.g. in the optimizer update) and took the model with it.
    #[error("the trainer has no model: an earlier step failed part-way through the update")]
    ModelUnavailable,
    /// A collective operation of the gradient synchronization (data-parallel training) failed.
    #[error("gradient synchronization failed: {0}")]
    Collective(String),
    /// [`Trainer::train`](crate::Trainer::train) was stopped by its stop flag; use
    /// [`Trainer::run`](crate::Trainer::run) to get this as an outcome rather than an error.
    #[error(
        "training was stopped at step {step}; checkpoint {} (resume the run to continue)",
        checkpoint.display()
    )]
    Interrupted {
        /// Optimizer steps completed.
        step: u64,
        /// The checkpoint written on the way out.
        checkpoint: PathBuf,
    },
    /// The run is estimated not to fit in memory.
    #[error(
        "this run needs about {needed_gb:.2} GB ({model_state_gb:.2} GB weights, gradients and AdamW state + {activations_gb:.2} GB activations per micro-batch) but {available_gb:.2} GB is available. Try {suggestions} (or set max_memory_gb / --max-memory to override the budget)"
    )]
    OutOfMemory {
        /// The estimate, GB.
        needed_gb: f64,
        /// The budget, GB.
        available_gb: f64,
        /// Of the estimate: weights, gradients, optimizer state, GB.
        model_state_gb: f64,
        /// Of the estimate: activations of one micro-batch, GB.
        activations_gb: f64,
        /// Settings that would fit, joined with "; or ".
        suggestions: String,
    },
    /// Training kept producing non-finite losses even after recovery.
    #[error(
        "training diverged at step {step}: {reason}. Try a lower learning rate, gradient clipping, or f32 precision"
    )]
    Diverged {
        /// The step.
        step: u64,
        /// What was non-finite.
        reason: String,
    },
}

impl TrainError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TrainError::Io {
            path: path.into(),
            source,
        }
    }
}

/// `Result` with [`TrainError`].
pub type Result<T, E = TrainError> = std::result::Result<T, E>;
