//! Errors of distributed training.

use std::path::PathBuf;

use kiln_trainer::TrainError;

/// What can go wrong setting up or running data-parallel training.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// The rank, world size, addresses or ZeRO stage do not fit together.
    #[error("distributed setup: {0}")]
    Config(String),
    /// A collective operation (register, all-reduce) failed.
    #[error("collective operation failed: {0}")]
    Collective(String),
    /// A rank stopped, or never arrived.
    #[error("rank {rank} {reason}")]
    Rank {
        /// The rank that failed.
        rank: usize,
        /// What happened to it.
        reason: String,
    },
    /// A network endpoint could not be opened or reached.
    #[error("{what}: {source}")]
    Network {
        /// What was being opened or reached.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A sharded optimizer checkpoint could not be written or read.
    #[error("sharded checkpoint {path}: {reason}")]
    Checkpoint {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The model could not be built, split or run.
    #[error(transparent)]
    Model(#[from] kiln_transformer::ModelError),
    /// The trainer failed.
    #[error(transparent)]
    Train(#[from] TrainError),
}

/// Results of this crate.
pub type Result<T> = std::result::Result<T, DistError>;

impl From<DistError> for TrainError {
    fn from(e: DistError) -> Self {
        match e {
            DistError::Train(t) => t,
            DistError::Checkpoint { path, reason } => TrainError::Checkpoint { path, reason },
            DistError::Config(message) => TrainError::Config(message),
            DistError::Model(model) => TrainError::Model(model),
            other => TrainError::Collective(other.to_string()),
        }
    }
}
