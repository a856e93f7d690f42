//! ZeRO-3's parameter gathering inside the forward pass (what PyTorch's FSDP does with hooks):
//! each rank holds only its rows of every parameter, and a block's weights are all-gathered just
//! before the block runs, dropped once it has run, gathered again when the backward pass reaches
//! the block, and their gradient reduce-scattered there, so no rank ever holds the whole model or
//! the whole gradient.
//!
//! The gather is an operation of Burn's autodiff graph ([`GatherBackend`]): its gradient is the
//! reduce-scatter of the whole parameter's gradient, and it is marked recomputable, so the graph
//! keeps the shard and gathers again in the backward pass instead of keeping the whole weight
//! (Burn's checkpointing machinery, used for this one operation whatever the model's own
//! activation-checkpointing strategy). Its node is ordered after the block's input activation, so
//! the backward pass reduce-scatters each block's gradients when it leaves the block, not at the
//! end.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use burn::backend::Autodiff;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::retro_forward::RetroForward;
use burn::backend::autodiff::checkpoint::state::BackwardStates;
use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::module::ParamId;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Shape, Tensor, TensorMetadata, TensorPrimitive};
use kiln_transformer::{ModelError, WeightSource};

use crate::comm::Communicator;
use crate::error::{DistError, Result};
use crate::partition::Partition;

/// How many collectives the gathering ran (for tests and reports).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GatherCounts {
    /// All-gathers in forward passes.
    pub gathers: u64,
    /// All-gathers repeated in backward passes (a whole weight recomputed instead of kept).
    pub regathers: u64,
    /// Reduce-scatters of gradients in backward passes.
    pub reduce_scatters: u64,
}

/// One collective of the gathering, in the order a rank ran it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GatherEvent {
    /// Parameter `0` (its position in the partition) all-gathered in a forward pass.
    Gather(usize),
    /// Parameter `0` all-gathered again in a backward pass.
    Regather(usize),
    /// Parameter `0`'s gradient reduce-scattered.
    ReduceScatter(usize),
}

/// One rank's view of ZeRO-3's split: which rows of which parameter it holds, and the collectives
/// that turn its rows into the whole parameter and a whole gradient into its rows.
pub struct ParamGather<B: Backend> {
    comm: Arc<Communicator<B>>,
    partition: Partition,
    dtype: DType,
    index: HashMap<ParamId, usize>,
    deferred: Mutex<Option<DistError>>,
    gathers: AtomicU64,
    regathers: AtomicU64,
    reduce_scatters: AtomicU64,
    events: Mutex<Option<Vec<GatherEvent>>>,
}

impl<B: Backend> std::fmt::Debug for ParamGather<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParamGather")
            .field("rank", &self.comm.rank())
            .field("world_size", &self.comm.world_size())
            .field("params", &self.partition.params().len())
            .finish()
    }
}

impl<B: Backend> ParamGather<B> {
    /// The gathering for this rank of `partition`, whose gathered weights and scattered
    /// gradients are `dtype` (the working precision: every rank must agree).
    pub fn new(comm: Arc<Communicator<B>>, partition: Partition, dtype: DType) -> Self {
        let index = partition
            .params()
            .iter()
            .enumerate()
            .map(|(i, p)| (p.id, i))
            .collect();
        Self {
            comm,
            partition,
            dtype,
            index,
            deferred: Mutex::new(None),
            gathers: AtomicU64::new(0),
            regathers: AtomicU64::new(0),
            reduce_scatters: AtomicU64::new(0),
            events: Mutex::new(None),
        }
    }

    /// Starts (or stops and clears) recording every collective in order ([`events`](Self::events)):
    /// how tests see that blocks are gathered and scattered one at a time.
    pub fn record_events(&self, on: bool) {
        *self.events.lock().unwrap_or_else(|p| p.into_inner()) = on.then(Vec::new);
    }

    /// The collectives recorded since [`record_events`](Self::record_events).
    pub fn events(&self) -> Vec<GatherEvent> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_default()
    }

    /// The partition it gathers.
    pub fn partition(&self) -> &Partition {
        &self.partition
    }

    fn note(&self, event: GatherEvent) {
        let counter = match event {
            GatherEvent::Gather(_) => &self.gathers,
            GatherEvent::Regather(_) => &self.regathers,
            GatherEvent::ReduceScatter(_) => &self.reduce_scatters,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some(log) = self
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            log.push(event);
        }
    }

    /// The collectives run so far.
    pub fn counts(&self) -> GatherCounts {
        GatherCounts {
            gathers: self.gathers.load(Ordering::Relaxed),
            regathers: self.regathers.load(Ordering::Relaxed),
            reduce_scatters: self.reduce_scatters.load(Ordering::Relaxed),
        }
    }

    /// Position in the partition of parameter `id` when its value `stored` must be gathered;
    /// `None` for a parameter the partition does not know, or a whole value on a single rank.
    fn to_gather(&self, id: ParamId, stored: &Shape) -> Option<usize> {
        let index = *self.index.get(&id)?;
        let whole = self.partition.params()[index].shape.as_slice() == stored.as_slice();
        (self.comm.world_size() > 1 || !whole).then_some(index)
    }

    /// Parameter `index` whole, zero everywhere but this rank's `rows` (flat, `rows` rows long):
    /// summed over the ranks, these make the whole parameter (an all-gather as an all-reduce,
    /// exact, since every element has one non-zero term).
    pub(crate) fn padded(
        &self,
        index: usize,
        rows: Option<Tensor<B, 1>>,
        dtype: DType,
    ) -> Tensor<B, 1> {
        let layout = &self.partition.params()[index];
        let mine = self.partition.rows(index, self.comm.rank());
        let len = layout.row_len();
        let device = self.comm.device();
        let zeros = |n: usize| Tensor::<B, 1>::zeros([n], (device, dtype));
        match rows.filter(|_| !mine.is_empty()) {
            None => zeros(layout.len()),
            Some(v) => {
                let mut parts = Vec::with_capacity(3);
                if mine.start > 0 {
                    parts.push(zeros(mine.start * len));
                }
                parts.push(v.cast(dtype));
                if mine.end < layout.rows() {
                    parts.push(zeros((layout.rows() - mine.end) * len));
                }
                Tensor::cat(parts, 0)
            }
        }
    }

    /// Parameter `index` whole, in its full shape, from this rank's rows `shard`.
    fn all_gather(&self, index: usize, shard: FloatTensor<B>) -> Result<FloatTensor<B>> {
        let padded = self.padded(index, Some(flat::<B>(shard)), self.dtype);
        let whole = self.comm.all_reduce_sum(padded)?;
        let shape = Shape::from(self.partition.params()[index].shape.clone());
        Ok(B::float_reshape(whole.into_primitive().tensor(), shape))
    }

    /// This rank's rows (in `shard_shape`) of the sum over the ranks of `grad`, the gradient of
    /// parameter `index`'s whole value.
    fn reduce_scatter(
        &self,
        index: usize,
        grad: FloatTensor<B>,
        shard_shape: &Shape,
    ) -> Result<FloatTensor<B>> {
        let summed = self.comm.all_reduce_sum(flat::<B>(grad).cast(self.dtype))?;
        let len = self.partition.params()[index].row_len();
        let rows = self.partition.rows(index, self.comm.rank());
        let mine = summed.slice(rows.start * len..rows.end * len);
        Ok(B::float_reshape(
            mine.into_primitive().tensor(),
            shard_shape.clone(),
        ))
    }

    /// Keeps the first error of a backward pass (which cannot return one).
    fn defer(&self, e: DistError) {
        let mut slot = self.deferred.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(e);
    }

    /// The first error a backward pass met, taken out.
    pub fn take_deferred_error(&self) -> Option<DistError> {
        self.deferred
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Gathers again in a backward pass; zeros on error (kept for [`take_deferred_error`]).
    fn regather(&self, index: usize, shard: FloatTensor<B>) -> FloatTensor<B> {
        self.note(GatherEvent::Regather(index));
        self.all_gather(index, shard).unwrap_or_else(|e| {
            self.defer(e);
            let shape = Shape::from(self.partition.params()[index].shape.clone());
            self.zeros(shape)
        })
    }

    fn zeros(&self, shape: Shape) -> FloatTensor<B> {
        let zeros = Tensor::<B, 1>::zeros([shape.num_elements()], (self.comm.device(), self.dtype));
        B::float_reshape(zeros.into_primitive().tensor(), shape)
    }

    /// Reduce-scatters in a backward pass; zeros on error (kept for [`take_deferred_error`]).
    fn scatter_gradient(
        &self,
        index: usize,
        grad: FloatTensor<B>,
        shard_shape: &Shape,
    ) -> FloatTensor<B> {
        self.note(GatherEvent::ReduceScatter(index));
        self.reduce_scatter(index, grad, shard_shape)
            .unwrap_or_else(|e| {
                self.defer(e);
                self.zeros(shard_shape.clone())
            })
    }
}

/// Reshapes `t` to one dimension.
fn flat<B: Backend>(t: FloatTensor<B>) -> Tensor<B, 1> {
    let n = t.shape().num_elements();
    Tensor::from_primitive(TensorPrimitive::Float(B::float_reshape(t, Shape::new([n]))))
}

/// Autodiff backends whose graphs can hold ZeRO-3's gather operation (every `Autodiff<B, C>`).
pub trait GatherBackend: AutodiffBackend {
    /// Parameter `index` whole from this rank's rows `shard`, as an operation of the autodiff
    /// graph: its gradient is this rank's rows of the gradient summed over the ranks, and the
    /// backward pass gathers again rather than keep the whole value. `after` orders the
    /// operation after the activation the parameter's module consumes.
    fn gather_param(
        gather: &Arc<ParamGather<Self::InnerBackend>>,
        index: usize,
        shard: FloatTensor<Self>,
        after: Option<FloatTensor<Self>>,
    ) -> Result<FloatTensor<Self>>;
}

#[derive(Debug)]
struct GatherParam<B: Backend> {
    gather: Arc<ParamGather<B>>,
    index: usize,
    shard_shape: Shape,
}

impl<B: Backend, const N: usize> Backward<B, N> for GatherParam<B> {
    type State = ();

    fn backward(self, ops: Ops<(), N>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        if let Some(shard) = &ops.parents[0] {
            let rows = self
                .gather
                .scatter_gradient(self.index, grad, &self.shard_shape);
            grads.register::<B>(shard.id, rows);
        }
    }
}

#[derive(Debug)]
struct RegatherParam<B: Backend> {
    gather: Arc<ParamGather<B>>,
    index: usize,
    shard: NodeId,
    /// The ordering parent: the graph counts this operation among its users, so it is taken
    /// (and let go) here.
    after: Option<NodeId>,
}

impl<B: Backend> RetroForward for RegatherParam<B> {
    fn forward(&self, states: &mut BackwardStates, out_node: NodeId) {
        let shard = states.get_state::<FloatTensor<B>>(&self.shard);
        if let Some(after) = &self.after {
            drop(states.get_state::<FloatTensor<B>>(after));
        }
        states.save(out_node, self.gather.regather(self.index, shard));
    }
}

impl<B: Backend, C: CheckpointStrategy> GatherBackend for Autodiff<B, C> {
    fn gather_param(
        gather: &Arc<ParamGather<B>>,
        index: usize,
        shard: FloatTensor<Self>,
        after: Option<FloatTensor<Self>>,
    ) -> Result<FloatTensor<Self>> {
        gather.note(GatherEvent::Gather(index));
        let whole = gather.all_gather(index, shard.primitive.clone())?;
        let op = GatherParam {
            gather: Arc::clone(gather),
            index,
            shard_shape: shard.primitive.shape(),
        };
        let retro = RegatherParam {
            gather: Arc::clone(gather),
            index,
            shard: shard.node.id,
            after: after.as_ref().map(|a| a.node.id),
        };
        // Recomputable whatever the model's strategy, so the whole weight is never kept; a
        // recomputed operation's parents must be kept, the shard and the activation (which its
        // module's backward keeps anyway).
        Ok(match after {
            None => op
                .prepare::<BalancedCheckpointing>([shard.node.clone()])
                .memory_bound()
                .retro_forward(retro)
                .parents([&shard])
                .stateless(whole),
            Some(after) => op
                .prepare::<BalancedCheckpointing>([shard.node.clone(), after.node.clone()])
                .memory_bound()
                .retro_forward(retro)
                .parents([&shard, &after])
                .stateless(whole),
        })
    }
}

fn model_error(e: DistError) -> ModelError {
    ModelError::WeightSource(e.to_string())
}

/// ZeRO-3's weights for a training forward pass: every sharded parameter gathered inside the
/// autodiff graph ([`GatherBackend::gather_param`]).
pub struct GraphGather<B: GatherBackend> {
    gather: Arc<ParamGather<B::InnerBackend>>,
}

impl<B: GatherBackend> GraphGather<B> {
    /// Gathers with `gather`.
    pub fn new(gather: Arc<ParamGather<B::InnerBackend>>) -> Self {
        Self { gather }
    }
}

impl<B: GatherBackend> WeightSource<B> for GraphGather<B> {
    fn weight(
        &self,
        id: ParamId,
        stored: TensorPrimitive<B>,
        input: Option<&Tensor<B, 3>>,
    ) -> kiln_transformer::Result<TensorPrimitive<B>> {
        let Some(index) = self.gather.to_gather(id, &stored.shape()) else {
            return Ok(stored);
        };
        let after = input.map(|x| x.clone().into_primitive().tensor());
        B::gather_param(&self.gather, index, stored.tensor(), after)
            .map(TensorPrimitive::Float)
            .map_err(model_error)
    }

    fn take_deferred_error(&self) -> Option<ModelError> {
        self.gather.take_deferred_error().map(model_error)
    }
}

/// ZeRO-3's weights for a forward pass without gradients (evaluation): each parameter
/// all-gathered just before its module runs.
pub struct PlainGather<B: Backend> {
    gather: Arc<ParamGather<B>>,
}

impl<B: Backend> PlainGather<B> {
    /// Gathers with `gather`.
    pub fn new(gather: Arc<ParamGather<B>>) -> Self {
        Self { gather }
    }
}

impl<B: Backend> WeightSource<B> for PlainGather<B> {
    fn weight(
        &self,
        id: ParamId,
        stored: TensorPrimitive<B>,
        _input: Option<&Tensor<B, 3>>,
    ) -> kiln_transformer::Result<TensorPrimitive<B>> {
        let Some(index) = self.gather.to_gather(id, &stored.shape()) else {
            return Ok(stored);
        };
        self.gather.note(GatherEvent::Gather(index));
        self.gather
            .all_gather(index, stored.tensor())
            .map(TensorPrimitive::Float)
            .map_err(model_error)
    }
}
