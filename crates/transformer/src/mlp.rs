//! The feed-forward block: GELU MLP, or gated (SwiGLU, GeGLU).

use std::sync::Arc;

use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::activation::{gelu, gelu_approximate, silu};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use kiln_kernels::fused::Gelu;
use kiln_kernels::{LinearKernel, runs_host_kernels};

use crate::config::{MlpKind, ModelConfig};
use crate::linear::{INIT_STD, Projection};

/// `down(act(up(x)))`, or gated `down(act(gate(x)) · up(x))` (SwiGLU: silu; GeGLU: tanh GELU).
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// `[d_model, d_ff]` gate projection (gated blocks only).
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
    /// SwiGLU's gate and up weights stacked in one kernel (gate's outputs first), the only copy of
    /// a quantized model's weights: one product and the activation on the host, in place of two
    /// products and three tensor operations per token.
    #[module(skip)]
    pub gate_up: Option<Arc<dyn LinearKernel>>,
}

impl<B: Backend> Mlp<B> {
    /// A freshly initialized block (the output projection scaled by 1/√(2·layers), as nanoGPT).
    pub fn new(config: &ModelConfig, device: &B::Device) -> Self {
        let residual_std = INIT_STD / (2.0 * config.n_layers as f64).sqrt();
        let (d, ff, bias) = (config.d_model, config.d_ff, config.bias);
        Self {
            gate: config
                .mlp
                .gated()
                .then(|| Projection::new(d, ff, bias, INIT_STD, device)),
            up: Projection::new(d, ff, bias, INIT_STD, device),
            down: Projection::new(ff, d, bias, residual_std, device),
            dropout: DropoutConfig::new(config.dropout).init(),
            kind: config.mlp,
            gate_up: None,
        }
    }

    /// `[batch, seq, d_model]` → `[batch, seq, d_model]`, before dropout (a partial sum under
    /// tensor parallelism).
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        if let Some(h) = self.swiglu_on_host(&x) {
            return self.down.forward(h);
        }
        // `new` and every loader create a gate exactly for the gated kinds.
        let h = match &self.gate {
            Some(gate) if self.kind == MlpKind::GeGlu => {
                gelu_approximate(gate.forward(x.clone())) * self.up.forward(x)
            }
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

    /// `act(gate(x)) · up(x)` through [`gate_up`](Self::gate_up), when the model has it and the
    /// backend uses host kernels.
    fn swiglu_on_host(&self, x: &Tensor<B, 3>) -> Option<Tensor<B, 3>> {
        let kernel = self.gate_up.as_ref()?;
        if !runs_host_kernels::<B>() || self.gate.is_none() {
            return None;
        }
        let [b, t, d] = x.dims();
        let ff = kernel.out_features() / 2;
        if kernel.in_features() != d || self.gate.as_ref()?.bias.is_some() || self.up.bias.is_some()
        {
            return None;
        }
        let input = x.to_data().convert::<f32>().into_vec::<f32>().ok()?;
        let rows = b * t;
        let mut both = vec![0f32; rows * 2 * ff];
        kernel.forward(&input, rows, &mut both).ok()?;
        let mut h = Vec::with_capacity(rows * ff);
        for row in both.chunks_exact(2 * ff) {
            let (gate, up) = row.split_at(ff);
            if self.kind == MlpKind::GeGlu {
                h.extend(gate.iter().zip(up).map(|(&g, &u)| gelu_tanh(g) * u));
            } else {
                h.extend(
                    gate.iter()
                        .zip(up)
                        .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u),
                );
            }
        }
        Some(Tensor::from_data(
            TensorData::new(h, [b, t, ff]),
            &x.device(),
        ))
    }
}

/// GELU's tanh approximation, `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)).tanh())
}
