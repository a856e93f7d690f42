//! The feed-forward block: GELU MLP or SwiGLU.

use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, Linear};
use burn::tensor::Tensor;
use burn::tensor::activation::{gelu, gelu_approximate, silu};
use burn::tensor::backend::Backend;

use crate::config::{MlpKind, ModelConfig};
use crate::linear::{INIT_STD, linear};

/// `down(act(up(x)))`, or for SwiGLU `down(silu(gate(x)) · up(x))` with gate and up fused in `up`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// `[d_model, d_ff]`, or `[d_model, 2·d_ff]` (gate, then up) for SwiGLU.
    pub up: Linear<B>,
    /// `[d_ff, d_model]`.
    pub down: Linear<B>,
    /// Dropout on the output (training only).
    pub dropout: Dropout,
    /// 0 = GELU (tanh approximation), 1 = GELU (erf), 2 = SwiGLU.
    #[module(skip)]
    pub kind: u8,
}

impl<B: Backend> Mlp<B> {
    /// A freshly initialized block (the output projection scaled by 1/√(2·layers), as nanoGPT).
    pub fn new(config: &ModelConfig, device: &B::Device) -> Self {
        let up_width = if config.mlp == MlpKind::SwiGlu {
            2 * config.d_ff
        } else {
            config.d_ff
        };
        let residual_std = INIT_STD / (2.0 * config.n_layers as f64).sqrt();
        Self {
            up: linear(config.d_model, up_width, config.bias, INIT_STD, device),
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
        }
    }

    /// `[batch, seq, d_model]` → `[batch, seq, d_model]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = self.up.forward(x);
        let h = match self.kind {
            0 => gelu_approximate(h),
            1 => gelu(h),
            _ => {
                let [b, t, w] = h.dims();
                let ff = w / 2;
                let gate = h.clone().slice([0..b, 0..t, 0..ff]);
                let up = h.slice([0..b, 0..t, ff..w]);
                silu(gate) * up
            }
        };
        self.dropout.forward(self.down.forward(h))
    }
}
