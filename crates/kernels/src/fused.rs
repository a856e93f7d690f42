//! Fused operations a backend runs as one kernel in place of the model's composed Burn ops, and
//! how the model finds them.
//!
//! Burn runs causal attention, LayerNorm and GELU as chains of small tensor operations, and under
//! automatic differentiation every link records its own backward step. A backend with one kernel
//! for the whole operation (forward *and* backward) implements [`FusedOps`]. The model asks
//! [`ops::<B>()`](ops) for the kernels of its backend wherever the shapes fit and falls back to
//! the composed ops everywhere else, so it stays generic over `B: Backend`.
//!
//! Kiln's own kernels are built in: with the `flex` feature (on by default) Flex, `Autodiff<Flex>`
//! and `Autodiff<Flex, BalancedCheckpointing>` resolve to them with no init call, so any program
//! that uses `kiln-transformer` or `kiln-trainer` on the CPU gets them. Other backends can
//! [`register`] theirs. [`ComposedOps`] switches the fused path off on the current thread (tests
//! and benchmarks compare the two paths side by side without a global lock).

use std::any::{Any, TypeId};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

pub use crate::gemm::Products;

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

    /// [`causal_attention`](Self::causal_attention) of the packed `[batch, seq, (heads + 2 ·
    /// kv_heads) · head_dim]` output of a fused QKV projection (queries, then keys, then values,
    /// head by head), read in place: returns `[batch, seq, heads · head_dim]`, and in training
    /// the gradient of the packed tensor in one buffer, not three to stitch together. `None` (the
    /// default) where the backend has no such kernel.
    fn causal_attention_packed(
        &self,
        qkv: &Tensor<B, 3>,
        heads: usize,
        kv_heads: usize,
    ) -> Option<Tensor<B, 3>> {
        let _ = (qkv, heads, kv_heads);
        None
    }

    /// One AdamW step of a parameter (flattened): the new parameter and moments, from the
    /// gradient and the moments of the previous step (zero at the first). `Err` hands the
    /// tensors back unchanged where the backend has no such kernel (the default) or does not take
    /// them, and the caller runs Burn's `AdamW`.
    fn adamw(
        &self,
        tensors: AdamWTensors<B>,
        step: &AdamWStep,
    ) -> Result<AdamWTensors<B>, AdamWTensors<B>> {
        let _ = step;
        Err(tensors)
    }

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

    /// A decoding step's attention: one new query per head, `q` `[b, kv_heads, group, d]` (each
    /// KV head's group of query heads), over the keys and values `k`, `v`: blocks
    /// `[b, kv_heads, n, d]` that follow one another along the sequence (a paged KV cache's, read
    /// in place; or one tensor) — all positions, or the first `keys[r]` for batch row `r` (rows
    /// of different lengths, or a last block only partly written). The result has `q`'s shape.
    /// `None` (the default) where the backend has no such kernel, or for inputs it does not take.
    fn decode_attention(
        &self,
        q: &Tensor<B, 4>,
        k: &[Tensor<B, 4>],
        v: &[Tensor<B, 4>],
        keys: Option<&[usize]>,
    ) -> Option<Tensor<B, 4>> {
        let _ = (q, k, v, keys);
        None
    }

    /// Rotary position embedding of `x` `[batch, heads, seq, head_dim]` by angles `cos`, `sin`
    /// `[rows, 1, seq, head_dim / 2]` (`rows` 1 or `batch`): pairs `(i, i + head_dim / 2)` when
    /// `half_split`, else `(2i, 2i + 1)`, each to `(x₀ cos − x₁ sin, x₁ cos + x₀ sin)`. `None`
    /// (the default) where the backend has no such kernel, or for inputs it does not take.
    fn rope(
        &self,
        x: &Tensor<B, 4>,
        cos: &Tensor<B, 4>,
        sin: &Tensor<B, 4>,
        half_split: bool,
    ) -> Option<Tensor<B, 4>> {
        let _ = (x, cos, sin, half_split);
        None
    }

    /// A linear layer, `x · w + bias` for `x` `[rows, d_in]`, `w` `[d_in, d_out]`, `bias`
    /// `[d_out]`, with its multiplications (forward and backward) taken in `products`' precision
    /// and summed in f32. `None` (the default) where the backend has no such kernel or this
    /// machine cannot run it ([`multiplies_in`](Self::multiplies_in)).
    fn linear(
        &self,
        x: &Tensor<B, 2>,
        w: &Tensor<B, 2>,
        bias: Option<&Tensor<B, 1>>,
        products: Products,
    ) -> Option<Tensor<B, 2>> {
        let _ = (x, w, bias, products);
        None
    }

    /// Whether [`linear`](Self::linear) runs on this machine with `products`.
    fn multiplies_in(&self, products: Products) -> bool {
        let _ = products;
        false
    }
}

/// A parameter, its gradient and its AdamW moments (`None` before the first step), flattened.
#[derive(Debug)]
pub struct AdamWTensors<B: Backend> {
    /// The parameter.
    pub param: Tensor<B, 1>,
    /// Its gradient.
    pub grad: Tensor<B, 1>,
    /// The first and second moments.
    pub moments: Option<(Tensor<B, 1>, Tensor<B, 1>)>,
}

/// The constants of one AdamW step (Loshchilov & Hutter's decoupled weight decay, as PyTorch's and
/// Burn's `AdamW`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    /// Learning rate.
    pub lr: f64,
    /// β₁, the first moment's decay.
    pub beta_1: f32,
    /// β₂, the second moment's decay.
    pub beta_2: f32,
    /// ε, added to the second moment's square root.
    pub epsilon: f32,
    /// Weight decay (a fraction of `lr` per step).
    pub weight_decay: f32,
    /// The step's number, from 1 (for the bias corrections).
    pub time: usize,
}

/// Which GELU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gelu {
    /// `x · Φ(x)` with the error function (PyTorch's default, nanoGPT).
    Erf,
    /// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))` (GPT-2).
    Tanh,
}

/// One backend's kernels, type-erased: `Box<Arc<dyn FusedOps<B>>>` keyed by `TypeId::of::<B>()`.
pub(crate) type Entry = (TypeId, Box<dyn Any + Send + Sync>);

/// Registrations made at run time; they take precedence over the built-in kernels.
static REGISTERED: RwLock<Vec<Entry>> = RwLock::new(Vec::new());
/// Whether [`REGISTERED`] holds anything (skips the lock on the hot path).
static ANY_REGISTERED: AtomicBool = AtomicBool::new(false);

thread_local! {
    static COMPOSED_ONLY: Cell<bool> = const { Cell::new(false) };
    static LINEAR_PRODUCTS: Cell<Option<Products>> = const { Cell::new(None) };
}

/// Looks `B` up in a type-erased table.
pub(crate) fn find<B: Backend>(entries: &[Entry]) -> Option<Arc<dyn FusedOps<B>>> {
    entries
        .iter()
        .find(|(id, _)| *id == TypeId::of::<B>())
        .and_then(|(_, ops)| ops.downcast_ref::<Arc<dyn FusedOps<B>>>())
        .cloned()
}

/// Erases `ops` into a table entry for backend `B`.
pub(crate) fn entry<B: Backend>(ops: Arc<dyn FusedOps<B>>) -> Entry {
    (TypeId::of::<B>(), Box::new(ops))
}

/// The fused operations for backend `B`: a [registered](register) implementation, else a
/// built-in one; `None` inside a [`ComposedOps`] scope or when `B` has none.
pub fn ops<B: Backend>() -> Option<Arc<dyn FusedOps<B>>> {
    if COMPOSED_ONLY.with(Cell::get) {
        return None;
    }
    if ANY_REGISTERED.load(Ordering::Acquire) {
        let registered = REGISTERED.read().unwrap_or_else(|e| e.into_inner());
        if let Some(ops) = find::<B>(&registered) {
            return Some(ops);
        }
    }
    builtin::<B>()
}

/// Whether `B` has built-in fused kernels (Flex and Flex under autodiff, with feature `flex`).
pub fn has_builtin<B: Backend>() -> bool {
    builtin::<B>().is_some()
}

fn builtin<B: Backend>() -> Option<Arc<dyn FusedOps<B>>> {
    #[cfg(feature = "flex")]
    {
        crate::flex::builtin::<B>()
    }
    #[cfg(not(feature = "flex"))]
    {
        None
    }
}

/// Registers `ops` for backend `B` process-wide, in place of any built-in kernels and earlier
/// registration; `None` removes the registration (the built-in kernels, if any, apply again).
pub fn register<B: Backend>(ops: Option<Arc<dyn FusedOps<B>>>) {
    let mut registered = REGISTERED.write().unwrap_or_else(|e| e.into_inner());
    registered.retain(|(id, _)| *id != TypeId::of::<B>());
    if let Some(ops) = ops {
        registered.push(entry(ops));
    }
    ANY_REGISTERED.store(!registered.is_empty(), Ordering::Release);
}

/// While alive, the current thread runs Burn's composed ops instead of any fused kernel (other
/// threads are unaffected). Dropping it restores the previous setting.
///
/// ```
/// # use burn::backend::Flex;
/// assert!(kiln_kernels::fused::ops::<Flex>().is_some());
/// {
///     let _composed = kiln_kernels::fused::ComposedOps::enter();
///     assert!(kiln_kernels::fused::ops::<Flex>().is_none());
/// }
/// assert!(kiln_kernels::fused::ops::<Flex>().is_some());
/// ```
#[derive(Debug)]
#[must_use = "the composed-ops scope ends when this guard is dropped"]
pub struct ComposedOps {
    previous: bool,
}

impl ComposedOps {
    /// Starts a composed-ops scope on the current thread.
    pub fn enter() -> Self {
        Self {
            previous: COMPOSED_ONLY.with(|c| c.replace(true)),
        }
    }
}

impl Drop for ComposedOps {
    fn drop(&mut self) {
        COMPOSED_ONLY.with(|c| c.set(self.previous));
    }
}

/// Runs `f` with Burn's composed ops on the current thread (see [`ComposedOps`]).
pub fn with_composed_ops<R>(f: impl FnOnce() -> R) -> R {
    let _scope = ComposedOps::enter();
    f()
}

/// While alive, linear layers built on the current thread take their products through the
/// backend's [`FusedOps::linear`] with the given precision (where it has one; elsewhere they use
/// the backend's own product): mixed precision in the manner of PyTorch's CPU autocast, with f32
/// tensors, f32 master weights and bf16 multiplications. The backward pass of a product uses the
/// precision its forward pass had. Dropping the guard restores the previous setting.
///
/// ```
/// use kiln_kernels::fused::{LinearProducts, Products, linear_products};
///
/// assert_eq!(linear_products(), None);
/// {
///     let _bf16 = LinearProducts::enter(Products::Bf16);
///     assert_eq!(linear_products(), Some(Products::Bf16));
/// }
/// assert_eq!(linear_products(), None);
/// ```
#[derive(Debug)]
#[must_use = "the linear-products scope ends when this guard is dropped"]
pub struct LinearProducts {
    previous: Option<Products>,
}

impl LinearProducts {
    /// Starts a scope on the current thread in which linear layers multiply in `products`.
    pub fn enter(products: Products) -> Self {
        Self {
            previous: LINEAR_PRODUCTS.with(|c| c.replace(Some(products))),
        }
    }
}

impl Drop for LinearProducts {
    fn drop(&mut self) {
        LINEAR_PRODUCTS.with(|c| c.set(self.previous));
    }
}

/// The precision linear layers on the current thread multiply in: `Some` inside a
/// [`LinearProducts`] scope.
pub fn linear_products() -> Option<Products> {
    LINEAR_PRODUCTS.with(Cell::get)
}
