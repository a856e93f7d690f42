//! The feed-forward block: GELU MLP or SwiGLU.

use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, Linear};
use burn::tensor::Tensor;
use burn::tensor::activation::{gelu, gelu_approximate, silu};
use burn::tensor::backend::Backend;

use crate::config::{MlpKind, ModelConfig};
use crate::fused::Gelu;
use crate::linear::{INIT_STD, Kernel, linear, project};

/// `down(act(up(x)))`, or for SwiGLU `down(silu(gate(x)) · up(x))`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// `[d_model, d_ff]` gate projection (SwiGLU only).
    pub gate: Option<Linear<B>>,
    /// `[d_model, d_ff]`.
    pub up: Linear<B>,
    /// `[d_ff, d_model]`.
    pub down: Linear<B>,
    /// Dropout on the output (training only).
    pub dropout: Dropout,
    /// 0 = GELU (tanh approximation), 1 = GELU (erf), 2 = SwiGLU.
    #[module(skip)]
    pub kind: u8,
    /// Decoding kernels for `gate`, `up` and `down` (see [`LinearKernel`](crate::LinearKernel)).
    #[module(skip)]
    pub kernels: [Kernel; 3],
}

impl<B: Backend> Mlp<B> {
    /// A freshly initialized block (the output projection scaled by 1/√(2·layers), as nanoGPT).
    pub fn new(config: &ModelConfig, device: &B::Device) -> Self {
        let residual_std = INIT_STD / (2.0 * config.n_layers as f64).sqrt();
        let swiglu = config.mlp == MlpKind::SwiGlu;
        Self {
            gate: swiglu
                .then(|| linear(config.d_model, config.d_ff, config.bias, INIT_STD, device)),
            up: linear(config.d_model, config.d_ff, config.bias, INIT_STD, device),
            down: linear(
                config.d_ff,
                config.d_model,
                config.bias,
                residual_std,
                device,
            ),
            dropout: DropoutConfig::new(config.dropout).init(),
            kind: match config.mlp {
                MlpKind::GeluTanh => 0,
                MlpKind::Gelu => 1,
                MlpKind::SwiGlu => 2,
            },
            kernels: Default::default(),
        }
    }

    /// `[batch, seq, d_model]` → `[batch, seq, d_model]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [gate_k, up_k, down_k] = &self.kernels;
        let h = match (&self.gate, self.kind) {
            (Some(gate), _) => silu(project(gate, gate_k, x.clone())) * project(&self.up, up_k, x),
            (None, kind) => {
                let h = project(&self.up, up_k, x);
                let which = if kind == 0 { Gelu::Tanh } else { Gelu::Erf };
                match crate::fused::installed::<B>().and_then(|f| f.gelu(&h, which)) {
                    Some(y) => y,
                    None if which == Gelu::Tanh => gelu_approximate(h),
                    None => gelu(h),
                }
            }
        };
        self.dropout.forward(project(&self.down, down_k, h))
    }
}
