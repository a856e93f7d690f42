//! Fused operations a backend can provide in place of the model's composed Burn ops.
//!
//! Burn runs causal attention, LayerNorm and GELU as chains of small tensor operations, and under
//! automatic differentiation every link records its own backward step. A backend that has one
//! kernel for the whole operation (forward *and* backward) registers it here once, at start-up,
//! with [`install`]; the model then calls it wherever the shapes fit and falls back to the composed
//! ops everywhere else. The model stays generic over `B: Backend`: the kernels are looked up by
//! the backend's type, and a backend without any behaves exactly as before.
//!
//! `kiln::fused::install()` registers Kiln's CPU training kernels for its Flex training backends.

use std::any::{Any, TypeId};
use std::sync::{Arc, RwLock};

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

/// A backend's fused operations. Each returns `None` when it does not handle the input (its
/// dtype, layout or shape), and the model then uses Burn's composed ops.
pub trait FusedOps<B: Backend>: Send + Sync {
    /// Causal attention `softmax(q·kᵀ/√d)·v` over `[batch, heads, seq, head_dim]` queries and
    /// `[batch, kv_heads, seq, head_dim]` keys and values (grouped-query when `kv_heads < heads`):
    /// query `i` sees keys `0..=i`. Returns `[batch, heads, seq, head_dim]`.
    fn causal_attention(
        &self,
        q: &Tensor<B, 4>,
        k: &Tensor<B, 4>,
        v: &Tensor<B, 4>,
    ) -> Option<Tensor<B, 4>>;

    /// LayerNorm over the last dimension: `(x − mean) / √(var + eps) · weight + bias`.
    fn layer_norm(
        &self,
        x: &Tensor<B, 3>,
        weight: &Tensor<B, 1>,
        bias: Option<&Tensor<B, 1>>,
        eps: f64,
    ) -> Option<Tensor<B, 3>>;

    /// GELU, exact or GPT-2's tanh approximation.
    fn gelu(&self, x: &Tensor<B, 3>, kind: Gelu) -> Option<Tensor<B, 3>>;
}

/// Which GELU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gelu {
    /// `x · Φ(x)` with the error function (PyTorch's default, nanoGPT).
    Erf,
    /// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))` (GPT-2).
    Tanh,
}

type Registry = RwLock<Vec<(TypeId, Box<dyn Any + Send + Sync>)>>;

static REGISTRY: Registry = RwLock::new(Vec::new());

/// Registers `ops` for backend `B`, replacing any earlier registration; `None` removes it.
pub fn install<B: Backend>(ops: Option<Arc<dyn FusedOps<B>>>) {
    let mut registry = REGISTRY.write().unwrap_or_else(|e| e.into_inner());
    registry.retain(|(id, _)| *id != TypeId::of::<B>());
    if let Some(ops) = ops {
        registry.push((TypeId::of::<B>(), Box::new(ops)));
    }
}

/// The fused operations registered for backend `B`, if any.
pub fn installed<B: Backend>() -> Option<Arc<dyn FusedOps<B>>> {
    let registry = REGISTRY.read().unwrap_or_else(|e| e.into_inner());
    registry
        .iter()
        .find(|(id, _)| *id == TypeId::of::<B>())
        .and_then(|(_, ops)| ops.downcast_ref::<Arc<dyn FusedOps<B>>>())
        .cloned()
}
