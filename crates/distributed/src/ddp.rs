//! Data parallelism's gradient synchronization (DDP), and ZeRO-2/3's reduce-scatter: the
//! [`GradientSync`] every rank of a data-parallel run plugs into its trainer.

use std::sync::Arc;

use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use kiln_trainer::parallel::GradientSync;
use kiln_transformer::Transformer;

use crate::comm::Communicator;
use crate::flat::{self, DEFAULT_BUCKET_ELEMENTS};
use crate::partition::Partition;

/// How a rank's gradients become the mean over the ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reduction {
    /// Whole gradients all-reduced: every rank gets the whole mean (DDP, ZeRO-1).
    AllReduce,
    /// Whole gradients all-reduced, each rank keeping the rows it owns (ZeRO-2).
    ReduceScatter,
    /// The forward pass's gather operations already reduce-scattered them (ZeRO-3): each rank
    /// holds the sum of its rows.
    Prescattered,
}

/// Averages gradients over the ranks with bucketed all-reduces. Plain data parallelism (and
/// ZeRO-1) hands every rank the whole mean gradient; with [`DataParallel::reduce_scatter`]
/// (ZeRO-2) each rank keeps only the rows it owns, and with [`DataParallel::prescattered`]
/// (ZeRO-3) the backward pass already left each rank its rows; in both the trainer adds the
/// ranks' squared norms for clipping.
pub struct DataParallel<B: AutodiffBackend> {
    comm: Arc<Communicator<B::InnerBackend>>,
    reduction: Reduction,
    bucket_elements: usize,
}

impl<B: AutodiffBackend> DataParallel<B> {
    /// Every rank gets the whole mean gradient (DDP, ZeRO-1).
    pub fn new(comm: Arc<Communicator<B::InnerBackend>>) -> Self {
        Self {
            comm,
            reduction: Reduction::AllReduce,
            bucket_elements: DEFAULT_BUCKET_ELEMENTS,
        }
    }

    /// Every rank keeps the mean gradient of the rows it owns ([`Partition`]: ZeRO-2).
    pub fn reduce_scatter(comm: Arc<Communicator<B::InnerBackend>>) -> Self {
        Self {
            reduction: Reduction::ReduceScatter,
            ..Self::new(comm)
        }
    }

    /// The gradients arrive as this rank's rows summed over the ranks (ZeRO-3, whose gather
    /// operations reduce-scatter in the backward pass): every rank divides by the world size.
    pub fn prescattered(comm: Arc<Communicator<B::InnerBackend>>) -> Self {
        Self {
            reduction: Reduction::Prescattered,
            ..Self::new(comm)
        }
    }

    /// All-reduce buckets of at most `elements` elements (default 25 MB of f32).
    pub fn with_bucket_elements(mut self, elements: usize) -> Self {
        self.bucket_elements = elements.max(1);
        self
    }
}

impl<B: AutodiffBackend> GradientSync<B> for DataParallel<B> {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    fn sync(
        &mut self,
        model: &Transformer<B>,
        mut grads: GradientsParams,
    ) -> kiln_trainer::Result<GradientsParams> {
        let world = self.comm.world_size();
        if world == 1 {
            return Ok(grads);
        }
        let n = world as f64;
        let local = flat::take_grads(model, &mut grads);
        // Each rank's gradients, shaped as its parameters, divided by the world size.
        let mean = |sums: flat::Flat<B::InnerBackend>| {
            let shapes = crate::partition::param_shapes(model);
            let mean = sums.into_iter().map(|g| g.map(|g| g.div_scalar(n)));
            flat::grads_from_flat(model, mean.collect(), &shapes)
        };
        if self.reduction == Reduction::Prescattered {
            return Ok(mean(local));
        }
        let summed = flat::all_reduce_buckets(&self.comm, local, self.bucket_elements)?;
        if self.reduction == Reduction::AllReduce {
            return Ok(mean(summed));
        }
        let partition = Partition::of(model, world)?;
        let rank = self.comm.rank();
        let mut shapes = Vec::with_capacity(summed.len());
        let shard = summed
            .into_iter()
            .zip(partition.params())
            .enumerate()
            .map(|(i, (g, layout))| {
                let rows = partition.rows(i, rank);
                shapes.push(layout.shard_shape(&rows));
                let len = layout.row_len();
                g.filter(|_| !rows.is_empty())
                    .map(|g| g.slice(rows.start * len..rows.end * len).div_scalar(n))
            })
            .collect();
        Ok(flat::grads_from_flat(model, shard, &shapes))
    }

    fn broadcast_parameters(
        &mut self,
        model: Transformer<B>,
    ) -> kiln_trainer::Result<Transformer<B>> {
        if self.comm.world_size() == 1 {
            return Ok(model);
        }
        // Rank 0's values plus zeros from everyone else: a broadcast as an all-reduce (exact).
        let rank0 = self.comm.rank() == 0;
        let values = flat::param_values(&model)
            .into_iter()
            .map(|v| v.map(|v| if rank0 { v } else { v.zeros_like() }))
            .collect();
        let summed = flat::all_reduce_buckets(&self.comm, values, self.bucket_elements)?;
        let shapes = crate::partition::param_shapes(&model);
        Ok(flat::with_param_values(model, summed, &shapes))
    }

    fn all_reduce_sum(&mut self, values: &mut [f64]) -> kiln_trainer::Result<()> {
        Ok(self.comm.all_reduce_values(values)?)
    }

    fn sharded(&self) -> bool {
        self.reduction != Reduction::AllReduce && self.comm.world_size() > 1
    }

    fn barrier(&mut self) -> kiln_trainer::Result<()> {
        Ok(self.comm.barrier()?)
    }
}
