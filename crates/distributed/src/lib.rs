//! # kiln-distributed
//!
//! Distributed training for Kiln, generic over the backend.
//!
//! - **Data parallel** on Burn's collective engine (`burn-collective`): every rank holds a model
//!   replica, reads its own rows of each batch, and averages gradients with bucketed all-reduces
//!   ([`DataParallel`]); ZeRO stages 1–3 ([`ZeroOptimizer`]) shard the optimizer state, the
//!   gradients and the parameters over the ranks. Ranks are threads of one process or processes
//!   on one or many machines ([`Communicator::join`]); [`launch`] starts and watches processes the
//!   way `torchrun` does.
//! - **Tensor and pipeline parallel**, composed with data parallel ([`ParallelRank`] over a
//!   [`ParallelLayout`]): Megatron-LM's split of every layer's heads and hidden units
//!   ([`tensor_parallel`]), layers split into stages that run GPipe or 1F1B schedules over
//!   micro-batches ([`schedule`]), on point-to-point transfers and sub-group collectives over
//!   `burn-communication`'s tensor data service ([`p2p`]).
//!
//! Everything plugs into the trainer through its seams ([`kiln_trainer::Trainer::builder`]):
//!
//! ```no_run
//! use std::sync::Arc;
//! use burn::backend::{Autodiff, Flex};
//! use kiln_distributed::{Communicator, Transport, trainer_builder};
//! use kiln_trainer::TrainConfig;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = TrainConfig::load("train.toml")?;
//! // Four ranks as threads of this process.
//! std::thread::scope(|s| {
//!     for rank in 0..4 {
//!         let config = config.clone();
//!         s.spawn(move || -> kiln_distributed::Result<()> {
//!             let comm = Arc::new(Communicator::join(rank, 4, Default::default(), &Transport::Threads)?);
//!             let mut trainer = trainer_builder::<Autodiff<Flex>>(comm, config.zero_stage, Default::default())
//!                 .start(config, "runs/ddp")?;
//!             trainer.train()?;
//!             Ok(())
//!         });
//!     }
//! });
//! # Ok(()) }
//! ```

pub mod comm;
pub mod ddp;
pub mod error;
pub mod flat;
pub mod gather;
pub mod launch;
pub mod layout;
pub mod model_parallel;
pub mod p2p;
pub mod parallel_trainer;
pub mod partition;
pub mod rendezvous;
pub mod schedule;
mod shards;
pub mod tensor_parallel;
pub mod zero;

use std::sync::Arc;

use kiln_trainer::{TrainError, TrainerBuilder};

pub use comm::{Communicator, Endpoints, Transport};
pub use ddp::DataParallel;
pub use error::{DistError, Result};
pub use gather::{GatherBackend, GatherCounts, GatherEvent, GraphGather, ParamGather, PlainGather};
pub use layout::{ParallelLayout, RankCoords, balance_stages};
pub use model_parallel::{
    AdamWSettings, ParallelOptions, ParallelRank, ParallelStepReport, TimedAction,
};
pub use p2p::{Group, PeerNet, thread_ranks, thread_ranks_over_loopback};
pub use parallel_trainer::{ParallelTrainer, parallel_options};
pub use partition::{ParamLayout, Partition};
pub use schedule::{Action, PipelineSchedule, bubble_fraction};
pub use shards::shard_file;
pub use tensor_parallel::{MegatronOps, TensorParallelBackend, TpComm, shard_model};
pub use zero::ZeroOptimizer;

/// A trainer builder for one rank of a data-parallel run at ZeRO `zero_stage` (0 = plain data
/// parallel with the trainer's own AdamW): the gradient synchronization and, for stages 1–3, the
/// sharded optimizer plugged in. The run's config must ask for the same stage.
pub fn trainer_builder<B: GatherBackend>(
    comm: Arc<Communicator<B::InnerBackend>>,
    zero_stage: u8,
    device: B::Device,
) -> TrainerBuilder<B> {
    let sync = match zero_stage {
        0 | 1 => DataParallel::<B>::new(Arc::clone(&comm)),
        2 => DataParallel::<B>::reduce_scatter(Arc::clone(&comm)),
        _ => DataParallel::<B>::prescattered(Arc::clone(&comm)),
    };
    let builder = TrainerBuilder::new(device).gradient_sync(sync);
    builder.optimizer(move |model, config| {
        if config.zero_stage != zero_stage {
            return Err(TrainError::Config(format!(
                "the run's config says zero_stage = {}, the ranks were set up for {zero_stage}",
                config.zero_stage
            )));
        }
        if zero_stage == 0 {
            return Ok(Box::new(kiln_trainer::optimizer::GroupedAdamW::for_config(
                model, config,
            )));
        }
        Ok(Box::new(ZeroOptimizer::new(
            model, config, zero_stage, comm,
        )?))
    })
}
