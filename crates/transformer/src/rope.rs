//! Rotary position embedding: rotate pairs of query/key dimensions by position-dependent angles.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::config::RopePairing;

/// `cos` and `sin` of every (position, frequency) pair, shaped `[rows, 1, seq, head_dim / 2]` so they
/// broadcast over heads; `rows` is 1 when every sequence shares positions, else the batch size.
pub(crate) struct RopeAngles<B: Backend> {
    pub cos: Tensor<B, 4>,
    pub sin: Tensor<B, 4>,
}

impl<B: Backend> RopeAngles<B> {
    /// Angles for `positions[row][i]`, computed in f64 as `pos · θ^(-2k/head_dim)`.
    pub fn new(positions: &[Vec<usize>], head_dim: usize, theta: f32, device: &B::Device) -> Self {
        let half = head_dim / 2;
        let rows = positions.len();
        let seq = positions.first().map_or(0, Vec::len);
        let inv_freq: Vec<f64> = (0..half)
            .map(|k| f64::from(theta).powf(-2.0 * k as f64 / head_dim as f64))
            .collect();
        let mut cos = Vec::with_capacity(rows * seq * half);
        let mut sin = Vec::with_capacity(rows * seq * half);
        for row in positions {
            for &p in row {
                for f in &inv_freq {
                    let angle = p as f64 * f;
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
        }
        let shape = [rows, 1, seq, half];
        Self {
            cos: Tensor::from_data(TensorData::new(cos, shape), device),
            sin: Tensor::from_data(TensorData::new(sin, shape), device),
        }
    }

    /// Rotates `x` of shape `[batch, heads, seq, head_dim]`, in `x`'s float dtype (the tables are
    /// built in f32 and cast, so bf16/f16 compute works on backends that do not mix dtypes).
    pub fn apply(&self, x: Tensor<B, 4>, pairing: RopePairing) -> Tensor<B, 4> {
        let [b, h, t, d] = x.dims();
        let half = d / 2;
        let (mut cos, mut sin) = (self.cos.clone(), self.sin.clone());
        if x.dtype() != cos.dtype() {
            cos = cos.cast(x.dtype());
            sin = sin.cast(x.dtype());
        }
        match pairing {
            RopePairing::HalfSplit => {
                // x·[cos, cos] + [x₂, x₁]·[-sin, sin]: whole-row products that broadcast one
                // `[seq, head_dim]` table over batch and heads (fast paths on every backend).
                let cos_full = Tensor::cat(vec![cos.clone(), cos], 3);
                let sin_full = Tensor::cat(vec![sin.clone().neg(), sin], 3);
                let x1 = x.clone().slice([0..b, 0..h, 0..t, 0..half]);
                let x2 = x.clone().slice([0..b, 0..h, 0..t, half..d]);
                x * cos_full + Tensor::cat(vec![x2, x1], 3) * sin_full
            }
            RopePairing::Interleaved => {
                let pairs = x.reshape([b, h, t, half, 2]);
                let x0 = pairs
                    .clone()
                    .slice([0..b, 0..h, 0..t, 0..half, 0..1])
                    .reshape([b, h, t, half]);
                let x1 = pairs
                    .slice([0..b, 0..h, 0..t, 0..half, 1..2])
                    .reshape([b, h, t, half]);
                let out0 = x0.clone() * cos.clone() - x1.clone() * sin.clone();
                let out1 = x0 * sin + x1 * cos;
                Tensor::stack::<5>(vec![out0, out1], 4).reshape([b, h, t, d])
            }
        }
    }
}
