//! Tensor (model) parallelism as in Megatron-LM (Shoeybi et al., 2019): each rank of a group of
//! `T` holds `1/T` of every attention layer's heads and of every MLP's hidden units.
//!
//! - Attention: the QKV projection is split by columns, whole heads per rank (query heads, and the
//!   key/value heads of grouped-query attention, which must divide by `T` too); the output
//!   projection by rows. Each rank computes its heads' attention and a partial sum of the output.
//! - MLP / SwiGLU: the up and gate projections by columns, the down projection by rows.
//! - Per sub-block, one all-reduce in the forward pass (*g*, [`TensorParallelBackend::tp_exit`])
//!   sums the partial outputs, and one in the backward pass (*f*, `tp_enter`) sums the partial
//!   gradients of the sub-block's input. A row-parallel projection's bias lives on the group's
//!   first rank only, so the sum adds it once.
//! - Embeddings, norms and the output head are **replicated**: every rank computes them on the
//!   same (summed) activations, so their gradients agree without communication. A
//!   vocabulary-parallel head with a parallel cross-entropy saves `(T−1)/T` of the head's memory
//!   and compute, which pays for vocabularies of 50k+ tokens on wide models; at the sizes Kiln
//!   trains on CPUs the head is small next to the blocks, and replication keeps the loss exactly
//!   the single-device loss.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::module::Param;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Shape, Tensor, TensorMetadata, TensorPrimitive};
use kiln_transformer::{ModelError, Projection, TensorParallel, TensorParallelSlot, Transformer};

use crate::error::{DistError, Result};
use crate::p2p::Group;

/// A tensor-parallel group's communication, shared by the *f* and *g* operators of every layer.
#[derive(Debug)]
pub struct TpComm<B: Backend> {
    group: Group<B>,
    deferred: Mutex<Option<DistError>>,
    forward_reduces: AtomicU64,
    backward_reduces: AtomicU64,
}

impl<B: Backend> TpComm<B> {
    /// The operators for `group` (the ranks holding the shards of the same layers).
    pub fn new(group: Group<B>) -> Self {
        Self {
            group,
            deferred: Mutex::new(None),
            forward_reduces: AtomicU64::new(0),
            backward_reduces: AtomicU64::new(0),
        }
    }

    /// The group.
    pub fn group(&self) -> &Group<B> {
        &self.group
    }

    /// All-reduces run so far: `(forward, backward)`.
    pub fn reduces(&self) -> (u64, u64) {
        (
            self.forward_reduces.load(Ordering::Relaxed),
            self.backward_reduces.load(Ordering::Relaxed),
        )
    }

    /// Sums `x` over the group; on error, keeps the error and returns `x` (the caller checks
    /// [`take_deferred_error`](Self::take_deferred_error) after the pass).
    fn sum(&self, x: FloatTensor<B>, backward: bool) -> FloatTensor<B> {
        let counter = if backward {
            &self.backward_reduces
        } else {
            &self.forward_reduces
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let shape = x.shape();
        let n = shape.num_elements();
        let flat = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(B::float_reshape(
            x.clone(),
            Shape::new([n]),
        )));
        match self.group.all_reduce_sum(flat) {
            Ok(sum) => B::float_reshape(sum.into_primitive().tensor(), shape),
            Err(e) => {
                self.deferred
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert(e);
                x
            }
        }
    }

    /// The first error a pass met, taken out.
    pub fn take_deferred_error(&self) -> Option<DistError> {
        self.deferred
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}

/// Autodiff backends whose graphs can hold Megatron's *f* and *g* (every `Autodiff<B, C>`).
pub trait TensorParallelBackend: AutodiffBackend {
    /// *f*: `x` unchanged; its gradient summed over the group.
    fn tp_enter(comm: &Arc<TpComm<Self::InnerBackend>>, x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// *g*: `x` summed over the group; its gradient passed through.
    fn tp_exit(comm: &Arc<TpComm<Self::InnerBackend>>, x: FloatTensor<Self>) -> FloatTensor<Self>;
}

#[derive(Debug)]
struct SumGradient<B: Backend> {
    comm: Arc<TpComm<B>>,
}

impl<B: Backend> Backward<B, 1> for SumGradient<B> {
    type State = ();

    fn backward(self, ops: Ops<(), 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        if let Some(parent) = &ops.parents[0] {
            grads.register::<B>(parent.id, self.comm.sum(grad, true));
        }
    }
}

#[derive(Debug)]
struct PassGradient;

impl<B: Backend> Backward<B, 1> for PassGradient {
    type State = ();

    fn backward(self, ops: Ops<(), 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        if let Some(parent) = &ops.parents[0] {
            grads.register::<B>(parent.id, grad);
        }
    }
}

impl<B: Backend, C: CheckpointStrategy> TensorParallelBackend for Autodiff<B, C> {
    fn tp_enter(comm: &Arc<TpComm<B>>, x: FloatTensor<Self>) -> FloatTensor<Self> {
        let op = SumGradient {
            comm: Arc::clone(comm),
        };
        let value = x.primitive.clone();
        <SumGradient<B> as Backward<B, 1>>::prepare::<C>(op, [x.node.clone()])
            .compute_bound()
            .stateless(value)
    }

    fn tp_exit(comm: &Arc<TpComm<B>>, x: FloatTensor<Self>) -> FloatTensor<Self> {
        let summed = comm.sum(x.primitive.clone(), false);
        <PassGradient as Backward<B, 1>>::prepare::<C>(PassGradient, [x.node.clone()])
            .compute_bound()
            .stateless(summed)
    }
}

/// Megatron's operators for one rank, as the model sees them.
#[derive(Debug)]
pub struct MegatronOps<B: TensorParallelBackend> {
    comm: Arc<TpComm<B::InnerBackend>>,
}

impl<B: TensorParallelBackend> MegatronOps<B> {
    /// The operators over `comm`.
    pub fn new(comm: Arc<TpComm<B::InnerBackend>>) -> Self {
        Self { comm }
    }
}

fn lift<B: Backend>(x: FloatTensor<B>) -> Tensor<B, 3> {
    Tensor::from_primitive(TensorPrimitive::Float(x))
}

impl<B: TensorParallelBackend> TensorParallel<B> for MegatronOps<B> {
    fn enter(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        lift(B::tp_enter(&self.comm, x.into_primitive().tensor()))
    }

    fn exit(&self, partial: Tensor<B, 3>) -> Tensor<B, 3> {
        lift(B::tp_exit(&self.comm, partial.into_primitive().tensor()))
    }

    fn take_deferred_error(&self) -> Option<ModelError> {
        self.comm
            .take_deferred_error()
            .map(|e| ModelError::WeightSource(e.to_string()))
    }
}

/// Which part of a projection a rank keeps.
#[derive(Clone, Debug)]
enum Split<'a> {
    /// These column ranges of the weight (and bias), concatenated.
    Columns(&'a [std::ops::Range<usize>]),
    /// This row range of the weight; the bias only on the group's first rank.
    Rows(std::ops::Range<usize>, bool),
}

fn map_value<B: Backend, const D: usize>(
    param: Param<Tensor<B, D>>,
    f: impl FnOnce(Tensor<B, D>) -> Tensor<B, D>,
) -> Param<Tensor<B, D>> {
    let (id, value, mapper) = param.consume();
    let grad = value.is_require_grad();
    // A new leaf: the slice's values, without the graph of the slicing.
    let value = owned_copy(f(value.detach()));
    Param::from_mapped_value(id, value.set_require_grad(grad), mapper)
}

/// `t`'s values in memory of their own: an optimizer that updates the copy in place cannot
/// change `t` (Flex shares the bytes of a tensor read out and read back in).
pub(crate) fn owned_copy<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    let (device, dtype, shape) = (t.device(), t.dtype(), t.shape());
    let data = t.into_data();
    let bytes = data.as_bytes().to_vec();
    Tensor::from_data(
        burn::tensor::TensorData::from_bytes_vec(bytes, shape, dtype),
        (&device, dtype),
    )
}

fn columns<B: Backend, const D: usize>(
    t: Tensor<B, D>,
    ranges: &[std::ops::Range<usize>],
) -> Tensor<B, D> {
    let parts: Vec<Tensor<B, D>> = ranges
        .iter()
        .map(|r| t.clone().narrow(D - 1, r.start, r.len()))
        .collect();
    Tensor::cat(parts, D - 1)
}

fn split_projection<B: Backend>(p: Projection<B>, split: Split) -> Projection<B> {
    match split {
        Split::Columns(ranges) => Projection {
            weight: map_value(p.weight, |w| columns(w, ranges)),
            bias: p.bias.map(|b| map_value(b, |b| columns(b, ranges))),
            kernel: None,
        },
        Split::Rows(rows, keeps_bias) => Projection {
            weight: map_value(p.weight, |w| w.narrow(0, rows.start, rows.len())),
            bias: if keeps_bias { p.bias } else { None },
            kernel: None,
        },
    }
}

/// Shard `index` of `size` of a whole model: its share of every layer's heads and hidden units,
/// with `ops` (the group's *f* and *g*) installed. Every rank of the group must start from the
/// same whole model; the parameters keep their ids.
pub fn shard_model<B: Backend>(
    model: Transformer<B>,
    index: usize,
    size: usize,
    ops: Arc<dyn TensorParallel<B>>,
) -> Result<Transformer<B>> {
    let c = model.config().clone();
    let (h, kvh, hd, ff) = (c.n_heads, c.n_kv_heads, c.head_dim(), c.d_ff);
    if size == 0
        || index >= size
        || !h.is_multiple_of(size)
        || !kvh.is_multiple_of(size)
        || !ff.is_multiple_of(size)
    {
        return Err(DistError::Config(format!(
            "tensor-parallel shard {index} of {size} does not split {h} heads, {kvh} key/value \
             heads and d_ff = {ff}"
        )));
    }
    let (lh, lkv, lff) = (h / size, kvh / size, ff / size);
    let q = index * lh * hd..(index + 1) * lh * hd;
    let k = (h + index * lkv) * hd..(h + (index + 1) * lkv) * hd;
    let v = (h + kvh + index * lkv) * hd..(h + kvh + (index + 1) * lkv) * hd;
    let qkv = [q.clone(), k, v];
    let hidden = index * lff..(index + 1) * lff;
    let first = index == 0;
    let mut model = model;
    model.blocks = model
        .blocks
        .into_iter()
        .map(|mut block| {
            block.attn.qkv = split_projection(block.attn.qkv, Split::Columns(&qkv));
            block.attn.proj = split_projection(block.attn.proj, Split::Rows(q.clone(), first));
            block.attn.n_heads = lh;
            block.attn.n_kv_heads = lkv;
            block.mlp.gate = block
                .mlp
                .gate
                .map(|g| split_projection(g, Split::Columns(std::slice::from_ref(&hidden))));
            block.mlp.up =
                split_projection(block.mlp.up, Split::Columns(std::slice::from_ref(&hidden)));
            block.mlp.down = split_projection(block.mlp.down, Split::Rows(hidden.clone(), first));
            block
        })
        .collect();
    model.tensor_parallel = TensorParallelSlot::new(ops);
    Ok(model)
}
