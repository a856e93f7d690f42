//! The data-parallel seam: how a training step's gradients and global numbers are combined across
//! ranks. [`SingleProcess`] (the default) is one rank doing nothing; a data-parallel crate plugs an
//! all-reducing (DDP) or reduce-scattering (ZeRO-2) implementation into
//! [`TrainerBuilder::gradient_sync`](crate::TrainerBuilder::gradient_sync) without touching the
//! training loop.
//!
//! Per step, every rank calls, in this order: [`GradientSync::sync`] once (after the backward
//! passes and accumulation of its micro-batches), then [`GradientSync::all_reduce_sum`] once on
//! `[loss]` (or `[loss, squared gradient norm]` when [`GradientSync::sharded`]), and, with more
//! than one rank, once on `[stop requested]`. Evaluation all-reduces `[loss sum, tokens]`;
//! checkpoints synchronize with [`GradientSync::barrier`]-like all-reduces. Every rank must make
//! the same calls in the same order.

use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use kiln_transformer::Transformer;

use crate::error::{Result, TrainError};
use crate::sampler::DataRank;

/// Combines gradients and scalars across the ranks of a data-parallel run.
///
/// Clipping and the non-finite-step guard are global: the trainer reduces the loss (and the
/// squared gradient norm of sharded gradients) with [`all_reduce_sum`](Self::all_reduce_sum), so a
/// NaN on any rank makes every rank skip or roll back the same step.
pub trait GradientSync<B: AutodiffBackend>: Send {
    /// This process's rank, in `0..world_size()`. Rank 0 logs metrics and writes checkpoints.
    fn rank(&self) -> usize;

    /// Number of ranks.
    fn world_size(&self) -> usize;

    /// Called once per step with this rank's accumulated gradients (still multiplied by the f16
    /// loss scale, if any); returns the gradients this rank updates its parameters with. DDP:
    /// the mean over ranks. ZeRO-2: this rank's shard of the mean (and [`sharded`](Self::sharded)
    /// returns true).
    fn sync(&mut self, model: &Transformer<B>, grads: GradientsParams) -> Result<GradientsParams>;

    /// Replaces each of `values` by its sum over all ranks.
    fn all_reduce_sum(&mut self, values: &mut [f64]) -> Result<()>;

    /// Whether [`sync`](Self::sync) returns only this rank's shard of the gradients, so the
    /// global norm adds the ranks' squared norms. False (the default): every rank holds the whole
    /// gradient and its norm is already global.
    fn sharded(&self) -> bool {
        false
    }

    /// Makes every rank start from rank 0's parameters; the builder calls it once, after
    /// initializing a new run's model (PyTorch's DDP broadcasts the module state the same way).
    /// Default: the model unchanged.
    fn broadcast_parameters(&mut self, model: Transformer<B>) -> Result<Transformer<B>> {
        Ok(model)
    }

    /// Waits until every rank gets here (an all-reduce of one value by default).
    fn barrier(&mut self) -> Result<()> {
        self.all_reduce_sum(&mut [0.0])
    }

    /// This rank as the data sampler sees it.
    fn data_rank(&self) -> Result<DataRank> {
        DataRank::new(self.rank(), self.world_size())
            .map_err(|e| TrainError::Collective(e.to_string()))
    }
}

/// One process, no communication: gradients and values pass through unchanged (rank 0 of 1).
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl<B: AutodiffBackend> GradientSync<B> for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn sync(&mut self, _model: &Transformer<B>, grads: GradientsParams) -> Result<GradientsParams> {
        Ok(grads)
    }

    fn all_reduce_sum(&mut self, _values: &mut [f64]) -> Result<()> {
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        Ok(())
    }
}
