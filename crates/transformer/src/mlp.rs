//! The feed-forward block: GELU MLP or SwiGLU.

use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::Tensor;
use burn::tensor::activation::{gelu, gelu_approximate, silu};
use burn::tensor::backend::Backend;
use kiln_kernels::fused::Gelu;

use crate::config::{MlpKind, ModelConfig};
use crate::linear::{INIT_STD, Projection};

/// `down(act(up(x)))`, or for SwiGLU `down(silu(gate(x)) · up(x))`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// `[d_model, d_ff]` gate projection (SwiGLU only).
    pub gate: Option<Projection<B>>,
    /// `[d_model, d_ff]`.
    pub up: Projection<B>,
    /// `[d_ff, d_model]`.
    pub down: Projection<B>,
    /// Dropout on the output (training only; the block applies it).
    pub dropout: Dropout,
    /// The activation.
    #[module(skip)]
    pub kind: MlpKind,
}

impl<B: Backend> Mlp<B> {
    /// A freshly initialized block (the output projection scaled by 1/√(2·layers), as nanoGPT).
    pub fn new(config: &ModelConfig, device: &B::Device) -> Self {
        let residual_std = INIT_STD / (2.0 * config.n_layers as f64).sqrt();
        let (d, ff, bias) = (config.d_model, config.d_ff, config.bias);
        Self {
            gate: (config.mlp == MlpKind::SwiGlu)
                .then(|| Projection::new(d, ff, bias, INIT_STD, device)),
            up: Projection::new(d, ff, bias, INIT_STD, device),
            down: Projection::new(ff, d, bias, residual_std, device),
            dropout: DropoutConfig::new(config.dropout).init(),
            kind: config.mlp,
        }
    }

    /// `[batch, seq, d_model]` → `[batch, seq, d_model]`, before dropout (a partial sum under
    /// tensor parallelism).
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        // A gate makes the block SwiGLU (`new` and every loader create one exactly for SwiGLU).
        let h = match &self.gate {
            Some(gate) => silu(gate.forward(x.clone())) * self.up.forward(x),
            None => {
                let h = self.up.forward(x);
                let which = if self.kind == MlpKind::GeluTanh {
                    Gelu::Tanh
                } else {
                    Gelu::Erf
                };
                match kiln_kernels::fused::ops::<B>().and_then(|f| f.gelu(&h, which)) {
                    Some(y) => y,
                    None if which == Gelu::Tanh => gelu_approximate(h),
                    None => gelu(h),
                }
            }
        };
        self.down.forward(h)
    }
}
