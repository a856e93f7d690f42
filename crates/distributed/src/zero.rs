//! ZeRO (Rajbhandari et al., 2020): the optimizer state (stage 1), the gradients (stage 2) and the
//! parameters (stage 3) of data-parallel training split over the ranks, each rank updating only
//! the rows it owns ([`Partition`]) with AdamW, then sharing them.
//!
//! Under mixed precision the model the trainer runs is a bf16/f16 working copy and the f32 master
//! weights live here, sharded with AdamW's moments: the paper's 2 + 2 + 12 bytes per parameter.
//! In f32 the model's own weights are the master weights.
//!
//! The update is Burn's `AdamW` step, element for element (the same operations in the same
//! order), so a ZeRO run follows plain data parallelism to rounding.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Tensor};
use kiln_trainer::optimizer::{GroupedAdamW, OptimizerStep};
use kiln_trainer::{TrainConfig, TrainError};
use kiln_transformer::{Transformer, WeightSource};

use crate::comm::Communicator;
use crate::error::{DistError, Result};
use crate::flat::{self, DEFAULT_BUCKET_ELEMENTS, Flat};
use crate::gather::{GatherBackend, GatherCounts, GraphGather, ParamGather, PlainGather};
use crate::partition::{Partition, param_layouts};
use crate::shards;

/// AdamW's settings, with the types Burn's `AdamW` computes in.
#[derive(Clone, Copy, Debug)]
struct AdamW {
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
}

/// What this rank keeps of one parameter.
pub(crate) struct Shard<B: Backend> {
    /// The rows it owns.
    pub rows: Range<usize>,
    /// Whether weight decay applies.
    pub decay: bool,
    /// f32 master rows (mixed precision only; in f32 the model holds them).
    pub master: Option<Tensor<B, 1>>,
    /// First moment of the owned rows (after the first step).
    pub moment1: Option<Tensor<B, 1>>,
    /// Second moment.
    pub moment2: Option<Tensor<B, 1>>,
}

/// The ZeRO-1/2/3 optimizer of one rank (pair it with [`crate::DataParallel`]: plain for stage 1,
/// reduce-scattering for 2 and 3).
pub struct ZeroOptimizer<B: GatherBackend> {
    comm: Arc<Communicator<B::InnerBackend>>,
    stage: u8,
    partition: Partition,
    gather: Arc<ParamGather<B::InnerBackend>>,
    /// ZeRO-3's weight sources: training (inside the autodiff graph) and evaluation.
    sources: Option<(GraphGather<B>, PlainGather<B::InnerBackend>)>,
    shards: Vec<Option<Shard<B::InnerBackend>>>,
    adamw: AdamW,
    time: i32,
    working: Option<FloatDType>,
    bucket_elements: usize,
}

fn dtype_of(working: Option<FloatDType>) -> DType {
    match working {
        Some(FloatDType::BF16) => DType::BF16,
        Some(FloatDType::F16) => DType::F16,
        Some(FloatDType::F64) => DType::F64,
        _ => DType::F32,
    }
}

impl<B: GatherBackend> ZeroOptimizer<B> {
    /// The optimizer for `model` (full, f32: freshly initialized or loaded from a checkpoint) at
    /// ZeRO `stage` 1, 2 or 3, with the run's AdamW settings and precision.
    pub fn new(
        model: &Transformer<B>,
        config: &TrainConfig,
        stage: u8,
        comm: Arc<Communicator<B::InnerBackend>>,
    ) -> Result<Self> {
        if !(1..=3).contains(&stage) {
            return Err(DistError::Config(format!(
                "ZeRO stage {stage}: the sharded optimizer is for stages 1, 2 and 3"
            )));
        }
        let rank = comm.rank();
        let partition = Partition::of(model, comm.world_size())?;
        let groups = GroupedAdamW::for_config(model, config);
        let working = config.precision.compute_dtype();
        let values = flat::param_values(model);
        let shards = partition
            .params()
            .iter()
            .zip(values)
            .enumerate()
            .map(|(i, (layout, value))| {
                let rows = partition.rows(i, rank);
                if rows.is_empty() {
                    return None;
                }
                let len = layout.row_len();
                let master = working.and(value).map(|v| {
                    v.slice(rows.start * len..rows.end * len)
                        .cast(FloatDType::F32)
                });
                Some(Shard {
                    decay: groups.decays(layout.id),
                    rows,
                    master,
                    moment1: None,
                    moment2: None,
                })
            })
            .collect();
        let gather = Arc::new(ParamGather::new(
            Arc::clone(&comm),
            partition.clone(),
            dtype_of(working),
        ));
        let sources = (stage == 3).then(|| {
            (
                GraphGather::new(Arc::clone(&gather)),
                PlainGather::new(Arc::clone(&gather)),
            )
        });
        Ok(Self {
            comm,
            stage,
            partition,
            gather,
            sources,
            shards,
            adamw: AdamW {
                beta1: config.beta1 as f32,
                beta2: config.beta2 as f32,
                eps: config.eps as f32,
                weight_decay: config.weight_decay as f32,
            },
            time: 0,
            working,
            bucket_elements: DEFAULT_BUCKET_ELEMENTS,
        })
    }

    /// The ZeRO stage.
    pub fn stage(&self) -> u8 {
        self.stage
    }

    /// How the state is split.
    pub fn partition(&self) -> &Partition {
        &self.partition
    }

    /// The collectives ZeRO-3's parameter gathering has run on this rank.
    pub fn gather_counts(&self) -> GatherCounts {
        self.gather.counts()
    }

    fn full_shapes(&self) -> Vec<Vec<usize>> {
        self.partition
            .params()
            .iter()
            .map(|p| p.shape.clone())
            .collect()
    }

    fn shard_shapes(&self) -> Vec<Vec<usize>> {
        let rank = self.comm.rank();
        self.partition
            .params()
            .iter()
            .enumerate()
            .map(|(i, p)| p.shard_shape(&self.partition.rows(i, rank)))
            .collect()
    }

    /// Whether `model`'s parameters are this rank's shards (ZeRO-3 at rest) rather than whole.
    fn is_sharded(&self, model: &Transformer<B>) -> bool {
        let layouts = param_layouts(model);
        !self.partition.same_params(&layouts)
    }

    /// The whole of every parameter from every rank's rows (`mine[i]`: this rank's rows of
    /// parameter `i`, flat, in `dtype`), in bucketed all-reduces of zero-padded tensors.
    fn all_gather(
        &self,
        mine: Vec<Option<Tensor<B::InnerBackend, 1>>>,
        dtype: DType,
    ) -> Result<Flat<B::InnerBackend>> {
        let padded = mine
            .into_iter()
            .enumerate()
            .map(|(i, rows)| Some(self.gather.padded(i, rows, dtype)))
            .collect();
        flat::all_reduce_buckets(&self.comm, padded, self.bucket_elements)
    }

    /// This rank's rows of each parameter of `model` (whole or sharded), flat.
    fn my_rows(&self, model: &Transformer<B>) -> Flat<B::InnerBackend> {
        let sharded = self.is_sharded(model);
        let rank = self.comm.rank();
        flat::param_values(model)
            .into_iter()
            .zip(self.partition.params())
            .enumerate()
            .map(|(i, (v, layout))| {
                let rows = self.partition.rows(i, rank);
                let len = layout.row_len();
                v.filter(|_| !rows.is_empty()).map(|v| {
                    if sharded {
                        v
                    } else {
                        v.slice(rows.start * len..rows.end * len)
                    }
                })
            })
            .collect()
    }

    /// This rank's f32 master rows of each parameter.
    fn master_rows(&self, model: &Transformer<B>) -> Flat<B::InnerBackend> {
        let from_model = self.my_rows(model);
        self.shards
            .iter()
            .zip(from_model)
            .map(|(s, v)| match s.as_ref().and_then(|s| s.master.clone()) {
                Some(m) => Some(m),
                None => v.map(|v| v.cast(FloatDType::F32)),
            })
            .collect()
    }

    /// One AdamW update of this rank's rows; returns the new f32 rows of each parameter.
    fn update_rows(
        &mut self,
        lr: f64,
        master: Flat<B::InnerBackend>,
        grads: Flat<B::InnerBackend>,
    ) -> Flat<B::InnerBackend> {
        self.time += 1;
        let a = self.adamw;
        let t = self.time;
        let (f1, f2) = (1.0 - a.beta1, 1.0 - a.beta2);
        let decay_rate = lr * a.weight_decay as f64;
        self.shards
            .iter_mut()
            .zip(master.into_iter().zip(grads))
            .map(|(shard, (p, g))| {
                let (Some(shard), Some(p)) = (shard.as_mut(), p) else {
                    return None;
                };
                // A parameter without a gradient keeps its value and state (as Burn's adaptor).
                let Some(g) = g else { return Some(p) };
                let g = g.cast(FloatDType::F32);
                let m = match shard.moment1.take() {
                    Some(m) => m.mul_scalar(a.beta1).add(g.clone().mul_scalar(f1)),
                    None => g.clone().mul_scalar(f1),
                };
                let v = match shard.moment2.take() {
                    Some(v) => v.mul_scalar(a.beta2).add(g.square().mul_scalar(f2)),
                    None => g.square().mul_scalar(f2),
                };
                let m_hat = m.clone().div_scalar(1f32 - a.beta1.powi(t));
                let v_hat = v.clone().div_scalar(1f32 - a.beta2.powi(t));
                let delta = m_hat.div(v_hat.sqrt().add_scalar(a.eps));
                shard.moment1 = Some(m);
                shard.moment2 = Some(v);
                let decayed = if shard.decay && decay_rate != 0.0 {
                    p.mul_scalar(1.0 - decay_rate)
                } else {
                    p
                };
                Some(decayed - delta.mul_scalar(lr))
            })
            .collect()
    }
}

fn train_err(e: DistError) -> TrainError {
    e.into()
}

impl<B: GatherBackend> OptimizerStep<B, Transformer<B>> for ZeroOptimizer<B> {
    fn step(
        &mut self,
        lr: f64,
        model: Transformer<B>,
        mut grads: burn::optim::GradientsParams,
    ) -> kiln_trainer::Result<Transformer<B>> {
        let rank = self.comm.rank();
        let mut flat_grads = flat::take_grads(&model, &mut grads);
        if self.stage == 1 {
            // Whole gradients: keep the owned rows.
            for (i, (g, layout)) in flat_grads
                .iter_mut()
                .zip(self.partition.params())
                .enumerate()
            {
                let rows = self.partition.rows(i, rank);
                let len = layout.row_len();
                *g = g
                    .take()
                    .filter(|_| !rows.is_empty())
                    .map(|g| g.slice(rows.start * len..rows.end * len));
            }
        }
        let master = self.master_rows(&model);
        let updated = self.update_rows(lr, master, flat_grads);
        let working_dtype = dtype_of(self.working);
        let mut working_rows = Vec::with_capacity(updated.len());
        for (shard, new) in self.shards.iter_mut().zip(updated) {
            match (shard.as_mut(), new) {
                (Some(shard), Some(new)) => {
                    if shard.master.is_some() {
                        shard.master = Some(new.clone());
                    }
                    working_rows.push(Some(new.cast(working_dtype)));
                }
                _ => working_rows.push(None),
            }
        }
        if self.stage == 3 {
            // Keep only the owned rows until the next forward gathers them.
            let shapes = self.shard_shapes();
            let rows = self.fill_empty(working_rows, working_dtype);
            return Ok(flat::with_param_values(model, rows, &shapes));
        }
        let full = self
            .all_gather(working_rows, working_dtype)
            .map_err(train_err)?;
        Ok(flat::with_param_values(model, full, &self.full_shapes()))
    }

    fn materialize(&mut self, model: Transformer<B>) -> kiln_trainer::Result<Transformer<B>> {
        let working_dtype = dtype_of(self.working);
        if self.stage == 3 {
            // The forward pass gathers block by block (`weight_source`): keep only the shards.
            if self.is_sharded(&model) {
                return Ok(model);
            }
            let rows = self
                .my_rows(&model)
                .into_iter()
                .map(|r| r.map(|r| r.cast(working_dtype)))
                .collect();
            let rows = self.fill_empty(rows, working_dtype);
            return Ok(flat::with_param_values(model, rows, &self.shard_shapes()));
        }
        let values = flat::param_values(&model);
        if values.iter().flatten().all(|v| v.dtype() == working_dtype) {
            return Ok(model);
        }
        // A whole f32 model (initialized or restored): the working copy in the compute dtype.
        let cast = values
            .into_iter()
            .map(|v| v.map(|v| v.cast(working_dtype)))
            .collect();
        Ok(flat::with_param_values(model, cast, &self.full_shapes()))
    }

    fn weight_source(&self) -> Option<&dyn WeightSource<B>> {
        self.sources
            .as_ref()
            .map(|(graph, _)| graph as &dyn WeightSource<B>)
    }

    fn eval_weight_source(&self) -> Option<&dyn WeightSource<B::InnerBackend>> {
        self.sources
            .as_ref()
            .map(|(_, plain)| plain as &dyn WeightSource<B::InnerBackend>)
    }

    fn release(&mut self, model: Transformer<B>) -> kiln_trainer::Result<Transformer<B>> {
        if self.stage < 3 || self.is_sharded(&model) {
            return Ok(model);
        }
        let rows = self.my_rows(&model);
        let rows = self.fill_empty(rows, dtype_of(self.working));
        Ok(flat::with_param_values(model, rows, &self.shard_shapes()))
    }

    fn consolidated(
        &mut self,
        model: &Transformer<B>,
    ) -> kiln_trainer::Result<Option<Transformer<B>>> {
        if self.working.is_none() && self.stage < 3 {
            return Ok(None);
        }
        let master = self.master_rows(model);
        let full = self.all_gather(master, DType::F32).map_err(train_err)?;
        Ok(Some(flat::with_param_values(
            model.clone(),
            full,
            &self.full_shapes(),
        )))
    }

    fn state_bytes(&self) -> u64 {
        let bytes = |t: &Option<Tensor<B::InnerBackend, 1>>| {
            t.as_ref()
                .map_or(0, |t| (t.dims()[0] * t.dtype().size()) as u64)
        };
        self.shards
            .iter()
            .flatten()
            .map(|s| bytes(&s.master) + bytes(&s.moment1) + bytes(&s.moment2))
            .sum()
    }

    fn sharded_state(&self) -> bool {
        true
    }

    fn save(&self, dir: &Path) -> kiln_trainer::Result<()> {
        shards::save(
            dir,
            &self.partition,
            self.comm.rank(),
            self.time,
            &self.shards,
        )
        .map_err(train_err)
    }

    fn load(&mut self, dir: &Path, device: &B::Device) -> kiln_trainer::Result<()> {
        let _ = device;
        let time = shards::load(
            dir,
            &self.partition,
            self.comm.rank(),
            &mut self.shards,
            self.comm.device(),
        )
        .map_err(train_err)?;
        self.time = time;
        Ok(())
    }
}

impl<B: GatherBackend> ZeroOptimizer<B> {
    /// `rows` with an empty tensor for each parameter this rank owns no rows of (ZeRO-3 keeps a
    /// zero-row tensor in their place).
    fn fill_empty(&self, rows: Flat<B::InnerBackend>, dtype: DType) -> Flat<B::InnerBackend> {
        let device = self.comm.device().clone();
        rows.into_iter()
            .map(|r| {
                Some(
                    r.unwrap_or_else(|| Tensor::<B::InnerBackend, 1>::zeros([0], (&device, dtype))),
                )
            })
            .collect()
    }
}
