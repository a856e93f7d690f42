//! LayerNorm and RMSNorm over the last dimension.

use burn::module::{Module, Param};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::config::NormKind;

/// A normalization layer: RMSNorm (`weight` only) or LayerNorm (`weight`, optional `bias`).
#[derive(Module, Debug)]
pub struct Norm<B: Backend> {
    /// Scale (γ).
    pub weight: Param<Tensor<B, 1>>,
    /// Shift (β), LayerNorm with biases only.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// RMSNorm when true, LayerNorm otherwise.
    #[module(skip)]
    pub rms: bool,
    /// Added to the (mean-square) variance.
    #[module(skip)]
    pub eps: f64,
}

impl<B: Backend> Norm<B> {
    /// A fresh layer (γ = 1, β = 0) of width `d`.
    pub fn new(kind: NormKind, d: usize, bias: bool, device: &B::Device) -> Self {
        let (rms, eps) = match kind {
            NormKind::RmsNorm { eps } => (true, eps),
            NormKind::LayerNorm { eps } => (false, eps),
        };
        Self {
            weight: Param::from_tensor(Tensor::ones([d], device)),
            bias: (bias && !rms).then(|| Param::from_tensor(Tensor::zeros([d], device))),
            rms,
            eps,
        }
    }

    /// Normalizes over the last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        if !self.rms
            && D == 3
            && let Some(fused) = kiln_kernels::fused::ops::<B>()
        {
            let weight = self.weight.val();
            let bias = self.bias.as_ref().map(|b| b.val());
            let x3: Tensor<B, 3> = x.clone().reshape(x.shape());
            if let Some(y) = fused.layer_norm(&x3, &weight, bias.as_ref(), self.eps) {
                return y.reshape(x.shape());
            }
        }
        let x = if self.rms {
            let inv = x
                .clone()
                .square()
                .mean_dim(D - 1)
                .add_scalar(self.eps)
                .sqrt()
                .recip();
            x * inv
        } else {
            let centered = x.clone() - x.mean_dim(D - 1);
            let inv = centered
                .clone()
                .square()
                .mean_dim(D - 1)
                .add_scalar(self.eps)
                .sqrt()
                .recip();
            centered * inv
        };
        let x = x * self.weight.val().unsqueeze();
        match &self.bias {
            Some(b) => x + b.val().unsqueeze(),
            None => x,
        }
    }
}
