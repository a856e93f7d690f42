//! Kiln's fused CPU kernels for Burn's Flex backend: causal attention, LayerNorm and GELU, each
//! one kernel forward and one backward instead of a chain of recorded tensor ops; RoPE for
//! inference (without autodiff).
//!
//! They are built in: [`crate::fused::ops`] returns them for Flex (inference and evaluation) and
//! for Flex under autodiff (training, with or without activation checkpointing; with
//! checkpointing, attention recomputes its probabilities in the backward pass instead of keeping
//! them). Only f32 tensors take the fused path; other dtypes (BF16/F16 compute) fall back to
//! Burn's ops.

mod adamw;
mod attention;
mod buffer;
mod gelu;
mod layer_norm;
mod linear;
mod math;
mod rope;
mod strided;
#[cfg(test)]
mod tests;

use std::sync::{Arc, OnceLock};

use burn::backend::Autodiff;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::retro_forward::RetroForward;
use burn::backend::autodiff::checkpoint::state::BackwardStates;
use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorPrimitive};
use burn_flex::{Flex, FlexTensor};

use crate::fused::{AdamWStep, AdamWTensors, Entry, FusedOps, Gelu, entry, find};
use crate::gemm::{self, Products};

/// The built-in kernels of backend `B`, if it is Flex or Flex under autodiff.
pub(crate) fn builtin<B: Backend>() -> Option<Arc<dyn FusedOps<B>>> {
    static TABLE: OnceLock<[Entry; 3]> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let keep = FlexKernels {
            keep_attention_probs: true,
        };
        let recompute = FlexKernels {
            keep_attention_probs: false,
        };
        [
            entry::<Flex>(Arc::new(keep)),
            entry::<Autodiff<Flex>>(Arc::new(keep)),
            entry::<Autodiff<Flex, BalancedCheckpointing>>(Arc::new(recompute)),
        ]
    });
    find::<B>(table)
}

/// The fused kernels, for Flex with and without autodiff.
#[derive(Debug, Clone, Copy)]
pub struct FlexKernels {
    /// Keep the attention probabilities (`[batch, heads, seq, seq]` per layer) for the backward
    /// pass; otherwise recompute them there (one more `q·kᵀ` and softmax per head).
    pub keep_attention_probs: bool,
}

impl Default for FlexKernels {
    fn default() -> Self {
        Self {
            keep_attention_probs: true,
        }
    }
}

fn primitive<B: Backend, const D: usize>(tensor: &Tensor<B, D>) -> B::FloatTensorPrimitive {
    tensor.clone().into_primitive().tensor()
}

fn wrap<B: Backend, const D: usize>(primitive: B::FloatTensorPrimitive) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(primitive))
}

impl FusedOps<Flex> for FlexKernels {
    fn causal_attention(
        &self,
        q: &Tensor<Flex, 4>,
        k: &Tensor<Flex, 4>,
        v: &Tensor<Flex, 4>,
    ) -> Option<Tensor<Flex, 4>> {
        let (y, _) = attention::forward(&primitive(q), &primitive(k), &primitive(v), false)?;
        Some(wrap(y))
    }

    fn causal_attention_packed(
        &self,
        qkv: &Tensor<Flex, 3>,
        heads: usize,
        kv_heads: usize,
    ) -> Option<Tensor<Flex, 3>> {
        let (y, _) = attention::forward_packed(&primitive(qkv), heads, kv_heads, false)?;
        Some(wrap(y))
    }

    fn adamw(
        &self,
        tensors: AdamWTensors<Flex>,
        step: &AdamWStep,
    ) -> Result<AdamWTensors<Flex>, AdamWTensors<Flex>> {
        let accepted = |t: &Tensor<Flex, 1>| t.dtype() == burn::tensor::DType::F32;
        let size = tensors.param.dims();
        let fits = |t: &Tensor<Flex, 1>| accepted(t) && t.dims() == size;
        let moments_fit = tensors
            .moments
            .as_ref()
            .is_none_or(|(m, v)| fits(m) && fits(v));
        if !(fits(&tensors.param) && fits(&tensors.grad) && moments_fit)
            || i32::try_from(step.time).is_err()
        {
            return Err(tensors);
        }
        let AdamWTensors {
            param,
            grad,
            moments,
        } = tensors;
        let moments =
            moments.map(|(m, v)| (m.into_primitive().tensor(), v.into_primitive().tensor()));
        let (param, m, v) = adamw::step(
            param.into_primitive().tensor(),
            &grad.clone().into_primitive().tensor(),
            moments,
            step,
        )
        .expect("f32 tensors of one size and a step number that fits, checked above");
        Ok(AdamWTensors {
            param: wrap(param),
            grad,
            moments: Some((wrap(m), wrap(v))),
        })
    }

    fn layer_norm(
        &self,
        x: &Tensor<Flex, 3>,
        weight: &Tensor<Flex, 1>,
        bias: Option<&Tensor<Flex, 1>>,
        eps: f64,
    ) -> Option<Tensor<Flex, 3>> {
        let bias = bias.map(primitive);
        layer_norm::forward(&primitive(x), &primitive(weight), bias.as_ref(), eps).map(wrap)
    }

    fn gelu(&self, x: &Tensor<Flex, 3>, kind: Gelu) -> Option<Tensor<Flex, 3>> {
        gelu::forward(&primitive(x), kind).map(wrap)
    }

    fn rope(
        &self,
        x: &Tensor<Flex, 4>,
        cos: &Tensor<Flex, 4>,
        sin: &Tensor<Flex, 4>,
        half_split: bool,
    ) -> Option<Tensor<Flex, 4>> {
        rope::forward(&primitive(x), &primitive(cos), &primitive(sin), half_split).map(wrap)
    }

    fn decode_attention(
        &self,
        q: &Tensor<Flex, 4>,
        k: &[Tensor<Flex, 4>],
        v: &[Tensor<Flex, 4>],
        keys: Option<&[usize]>,
    ) -> Option<Tensor<Flex, 4>> {
        let k: Vec<FlexTensor> = k.iter().map(primitive).collect();
        let v: Vec<FlexTensor> = v.iter().map(primitive).collect();
        attention::decode(&primitive(q), &k, &v, keys).map(wrap)
    }

    fn linear(
        &self,
        x: &Tensor<Flex, 2>,
        w: &Tensor<Flex, 2>,
        bias: Option<&Tensor<Flex, 1>>,
        products: Products,
    ) -> Option<Tensor<Flex, 2>> {
        let bias = bias.map(primitive);
        linear::forward(&primitive(x), &primitive(w), bias.as_ref(), products).map(wrap)
    }

    fn multiplies_in(&self, products: Products) -> bool {
        gemm::available(products)
    }
}

type Ad<C> = Autodiff<Flex, C>;

/// The backward kernels only fail on tensors that the forward kernel already accepted.
const CHECKED_IN_FORWARD: &str = "fused kernel inputs were validated in the forward pass";

#[derive(Debug)]
struct AttentionBackward;

#[derive(Clone, Debug)]
struct AttentionState {
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    probs: Option<FlexTensor>,
}

impl Backward<Flex, 3> for AttentionBackward {
    type State = AttentionState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node);
        let s = ops.state;
        let (dq, dk, dv) = attention::backward(&s.q, &s.k, &s.v, s.probs.as_ref(), &grad)
            .expect(CHECKED_IN_FORWARD);
        for (parent, grad) in ops.parents.into_iter().zip([dq, dk, dv]) {
            if let Some(node) = parent {
                grads.register::<Flex>(node.id, grad);
            }
        }
    }
}

#[derive(Debug)]
struct PackedAttentionBackward;

#[derive(Clone, Debug)]
struct PackedAttentionState {
    qkv: FlexTensor,
    heads: usize,
    kv_heads: usize,
    probs: Option<FlexTensor>,
}

impl Backward<Flex, 1> for PackedAttentionBackward {
    type State = PackedAttentionState;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node);
        let s = ops.state;
        let [parent] = ops.parents;
        if let Some(node) = parent {
            let dqkv =
                attention::backward_packed(&s.qkv, s.heads, s.kv_heads, s.probs.as_ref(), &grad)
                    .expect(CHECKED_IN_FORWARD);
            grads.register::<Flex>(node.id, dqkv);
        }
    }
}

#[derive(Debug)]
struct LayerNormBackward;

/// The LayerNorm input and weight (checkpointed: recomputed under activation checkpointing when
/// they come from memory-bound ops), and `eps`.
#[derive(Clone, Debug)]
struct LayerNormState {
    x: NodeId,
    weight: NodeId,
    eps: f64,
}

impl LayerNormBackward {
    fn run<const N: usize>(
        ops: Ops<LayerNormState, N>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<Flex>(&ops.node);
        let x: FlexTensor = checkpointer.retrieve_node_output(ops.state.x);
        let weight: FlexTensor = checkpointer.retrieve_node_output(ops.state.weight);
        let (dx, dw, db) =
            layer_norm::backward(&x, &weight, ops.state.eps, &grad).expect(CHECKED_IN_FORWARD);
        for (parent, grad) in ops.parents.into_iter().zip([dx, dw, db]) {
            if let Some(node) = parent {
                grads.register::<Flex>(node.id, grad);
            }
        }
    }
}

impl Backward<Flex, 2> for LayerNormBackward {
    type State = LayerNormState;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, c: &mut Checkpointer) {
        Self::run(ops, grads, c)
    }
}

impl Backward<Flex, 3> for LayerNormBackward {
    type State = LayerNormState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, c: &mut Checkpointer) {
        Self::run(ops, grads, c)
    }
}

/// Recomputes a LayerNorm output from its inputs (activation checkpointing).
#[derive(Clone, Debug)]
struct RetroLayerNorm {
    x: NodeId,
    weight: NodeId,
    bias: Option<NodeId>,
    eps: f64,
}

impl RetroForward for RetroLayerNorm {
    fn forward(&self, states: &mut BackwardStates, out_node: NodeId) {
        let x: FlexTensor = states.get_state(&self.x);
        let weight: FlexTensor = states.get_state(&self.weight);
        let bias: Option<FlexTensor> = self.bias.map(|b| states.get_state(&b));
        let y =
            layer_norm::forward(&x, &weight, bias.as_ref(), self.eps).expect(CHECKED_IN_FORWARD);
        states.save(out_node, y)
    }
}

#[derive(Debug)]
struct LinearBackward;

/// A linear layer's input and weight, and the precision of its products.
#[derive(Clone, Debug)]
struct LinearState {
    x: FlexTensor,
    w: FlexTensor,
    products: Products,
}

impl LinearBackward {
    fn run<const N: usize>(ops: Ops<LinearState, N>, grads: &mut Gradients) {
        let grad = grads.consume::<Flex>(&ops.node);
        let s = ops.state;
        let mut want = [false; 3];
        for (want, parent) in want.iter_mut().zip(&ops.parents) {
            *want = parent.is_some();
        }
        let out = linear::backward(&s.x, &s.w, &grad, s.products, want).expect(CHECKED_IN_FORWARD);
        for (parent, grad) in ops.parents.into_iter().zip(out) {
            if let (Some(node), Some(grad)) = (parent, grad) {
                grads.register::<Flex>(node.id, grad);
            }
        }
    }
}

impl Backward<Flex, 2> for LinearBackward {
    type State = LinearState;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        Self::run(ops, grads)
    }
}

impl Backward<Flex, 3> for LinearBackward {
    type State = LinearState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        Self::run(ops, grads)
    }
}

#[derive(Debug)]
struct GeluBackward;

impl Backward<Flex, 1> for GeluBackward {
    type State = (NodeId, Gelu);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, c: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node);
        let (input, kind) = ops.state;
        let x: FlexTensor = c.retrieve_node_output(input);
        if let [Some(node)] = ops.parents {
            let dx = gelu::backward(&x, &grad, kind).expect(CHECKED_IN_FORWARD);
            grads.register::<Flex>(node.id, dx);
        }
    }
}

/// Recomputes a GELU output from its input (activation checkpointing).
#[derive(Clone, Debug)]
struct RetroGelu {
    x: NodeId,
    kind: Gelu,
}

impl RetroForward for RetroGelu {
    fn forward(&self, states: &mut BackwardStates, out_node: NodeId) {
        let x: FlexTensor = states.get_state(&self.x);
        states.save(
            out_node,
            gelu::forward(&x, self.kind).expect(CHECKED_IN_FORWARD),
        )
    }
}

impl<C: CheckpointStrategy> FusedOps<Ad<C>> for FlexKernels {
    fn causal_attention(
        &self,
        q: &Tensor<Ad<C>, 4>,
        k: &Tensor<Ad<C>, 4>,
        v: &Tensor<Ad<C>, 4>,
    ) -> Option<Tensor<Ad<C>, 4>> {
        let (q, k, v) = (primitive(q), primitive(k), primitive(v));
        let prep = AttentionBackward
            .prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()])
            .compute_bound()
            .stateful();
        let output = match prep {
            OpsKind::Tracked(prep) => {
                let keep = self.keep_attention_probs;
                let (y, probs) =
                    attention::forward(&q.primitive, &k.primitive, &v.primitive, keep)?;
                let state = AttentionState {
                    q: q.primitive,
                    k: k.primitive,
                    v: v.primitive,
                    probs,
                };
                prep.finish(state, y)
            }
            OpsKind::UnTracked(prep) => {
                let (y, _) = attention::forward(&q.primitive, &k.primitive, &v.primitive, false)?;
                prep.finish(y)
            }
        };
        Some(wrap(output))
    }

    fn causal_attention_packed(
        &self,
        qkv: &Tensor<Ad<C>, 3>,
        heads: usize,
        kv_heads: usize,
    ) -> Option<Tensor<Ad<C>, 3>> {
        let qkv = primitive(qkv);
        let prep = PackedAttentionBackward
            .prepare::<C>([qkv.node.clone()])
            .compute_bound()
            .stateful();
        let output = match prep {
            OpsKind::Tracked(prep) => {
                let keep = self.keep_attention_probs;
                let (y, probs) = attention::forward_packed(&qkv.primitive, heads, kv_heads, keep)?;
                let state = PackedAttentionState {
                    qkv: qkv.primitive,
                    heads,
                    kv_heads,
                    probs,
                };
                prep.finish(state, y)
            }
            OpsKind::UnTracked(prep) => {
                let (y, _) = attention::forward_packed(&qkv.primitive, heads, kv_heads, false)?;
                prep.finish(y)
            }
        };
        Some(wrap(output))
    }

    fn layer_norm(
        &self,
        x: &Tensor<Ad<C>, 3>,
        weight: &Tensor<Ad<C>, 1>,
        bias: Option<&Tensor<Ad<C>, 1>>,
        eps: f64,
    ) -> Option<Tensor<Ad<C>, 3>> {
        let (x, weight) = (primitive(x), primitive(weight));
        let bias = bias.map(primitive);
        let y = layer_norm::forward(
            &x.primitive,
            &weight.primitive,
            bias.as_ref().map(|b| &b.primitive),
            eps,
        )?;
        let retro = RetroLayerNorm {
            x: x.node.id,
            weight: weight.node.id,
            bias: bias.as_ref().map(|b| b.node.id),
            eps,
        };
        // Memory-bound, like Burn's own element-wise ops: under activation checkpointing the
        // output is recomputed in the backward pass instead of kept.
        macro_rules! finish {
            ($n:literal, $nodes:expr, $parents:expr) => {
                match <LayerNormBackward as Backward<Flex, $n>>::prepare::<C>(
                    LayerNormBackward,
                    $nodes,
                )
                .memory_bound()
                .retro_forward(retro)
                .parents($parents)
                .stateful()
                {
                    OpsKind::Tracked(mut prep) => {
                        let state = LayerNormState {
                            x: prep.checkpoint(&x),
                            weight: prep.checkpoint(&weight),
                            eps,
                        };
                        prep.finish(state, y)
                    }
                    OpsKind::UnTracked(prep) => prep.finish(y),
                }
            };
        }
        let output = match &bias {
            Some(bias) => finish!(
                3,
                [x.node.clone(), weight.node.clone(), bias.node.clone()],
                [&x, &weight, bias]
            ),
            None => finish!(2, [x.node.clone(), weight.node.clone()], [&x, &weight]),
        };
        Some(wrap(output))
    }

    fn gelu(&self, x: &Tensor<Ad<C>, 3>, kind: Gelu) -> Option<Tensor<Ad<C>, 3>> {
        let x = primitive(x);
        let y = gelu::forward(&x.primitive, kind)?;
        let output = match GeluBackward
            .prepare::<C>([x.node.clone()])
            .memory_bound()
            .retro_forward(RetroGelu { x: x.node.id, kind })
            .parents([&x])
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let state = (prep.checkpoint(&x), kind);
                prep.finish(state, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        Some(wrap(output))
    }

    fn linear(
        &self,
        x: &Tensor<Ad<C>, 2>,
        w: &Tensor<Ad<C>, 2>,
        bias: Option<&Tensor<Ad<C>, 1>>,
        products: Products,
    ) -> Option<Tensor<Ad<C>, 2>> {
        let (x, w) = (primitive(x), primitive(w));
        let bias = bias.map(primitive);
        let y = linear::forward(
            &x.primitive,
            &w.primitive,
            bias.as_ref().map(|b| &b.primitive),
            products,
        )?;
        let state = || LinearState {
            x: x.primitive.clone(),
            w: w.primitive.clone(),
            products,
        };
        // Compute-bound, like Burn's matrix product: its inputs are kept, not recomputed.
        let output = match &bias {
            Some(bias) => match <LinearBackward as Backward<Flex, 3>>::prepare::<C>(
                LinearBackward,
                [x.node.clone(), w.node.clone(), bias.node.clone()],
            )
            .compute_bound()
            .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish(state(), y),
                OpsKind::UnTracked(prep) => prep.finish(y),
            },
            None => match <LinearBackward as Backward<Flex, 2>>::prepare::<C>(
                LinearBackward,
                [x.node.clone(), w.node.clone()],
            )
            .compute_bound()
            .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish(state(), y),
                OpsKind::UnTracked(prep) => prep.finish(y),
            },
        };
        Some(wrap(output))
    }

    fn multiplies_in(&self, products: Products) -> bool {
        gemm::available(products)
    }
}
