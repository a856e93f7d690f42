//! [`TensorParallel`]: the two communication points of a Megatron-LM tensor-parallel block. A rank
//! of a tensor-parallel group holds some of each attention layer's heads (the QKV projection's
//! columns, the output projection's rows) and some of each MLP's hidden units (the up and gate
//! projections' columns, the down projection's rows); every sub-block then computes a partial
//! sum of its output that the group adds up ([`TensorParallel::exit`], Megatron's *g*), and the
//! gradient of the sub-block's input is a partial sum too ([`TensorParallel::enter`], *f*).

use std::any::Any;
use std::fmt::Debug;
use std::sync::Arc;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::error::ModelError;

/// Megatron-LM's *f* and *g* operators for one rank of a tensor-parallel group.
pub trait TensorParallel<B: Backend>: Debug + Send + Sync {
    /// *f*, at the input of a column-parallel sub-block: the identity in the forward pass, the sum
    /// over the group of the input's gradient in the backward pass.
    fn enter(&self, x: Tensor<B, 3>) -> Tensor<B, 3>;

    /// *g*, at the output of a row-parallel projection: the sum over the group in the forward
    /// pass, the identity in the backward pass.
    fn exit(&self, partial: Tensor<B, 3>) -> Tensor<B, 3>;

    /// An error that happened where it could not be returned (a collective inside the forward or
    /// backward pass), taken out; the caller checks after each pass.
    fn take_deferred_error(&self) -> Option<ModelError> {
        None
    }
}

/// `x` through *f* when the model is tensor-parallel.
pub(crate) fn enter<B: Backend>(
    tp: Option<&dyn TensorParallel<B>>,
    x: Tensor<B, 3>,
) -> Tensor<B, 3> {
    match tp {
        Some(tp) => tp.enter(x),
        None => x,
    }
}

/// `partial` through *g* when the model is tensor-parallel.
pub(crate) fn exit<B: Backend>(
    tp: Option<&dyn TensorParallel<B>>,
    partial: Tensor<B, 3>,
) -> Tensor<B, 3> {
    match tp {
        Some(tp) => tp.exit(partial),
        None => partial,
    }
}

/// Where a model keeps its [`TensorParallel`] operators (empty for a whole model). Burn's module
/// derive takes any field that names the backend for a module, so the operators are held
/// type-erased and found again by backend.
#[derive(Clone, Default)]
pub struct TensorParallelSlot(Option<Arc<dyn Any + Send + Sync>>);

impl TensorParallelSlot {
    /// A slot holding `ops`.
    pub fn new<B: Backend>(ops: Arc<dyn TensorParallel<B>>) -> Self {
        Self(Some(Arc::new(ops)))
    }

    /// The operators, if the slot holds some for backend `B`.
    pub fn get<B: Backend>(&self) -> Option<Arc<dyn TensorParallel<B>>> {
        self.0
            .as_ref()?
            .downcast_ref::<Arc<dyn TensorParallel<B>>>()
            .cloned()
    }

    /// Whether the slot is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }
}

impl Debug for TensorParallelSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "TensorParallelSlot(set)"
        } else {
            "TensorParallelSlot(empty)"
        })
    }
}
