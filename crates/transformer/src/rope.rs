//! Rotary position embedding: rotate pairs of query/key dimensions by position-dependent angles.

use std::cell::RefCell;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::config::RopePairing;

/// `cos` and `sin` of every (position, frequency) pair, shaped `[rows, 1, seq, head_dim / 2]` so they
/// broadcast over heads; `rows` is 1 when every sequence shares positions, else the batch size.
pub(crate) struct RopeAngles<B: Backend> {
    pub cos: Tensor<B, 4>,
    pub sin: Tensor<B, 4>,
    /// Half-split tables `[cos, cos]` and `[-sin, sin]` materialized at the full `[batch, heads,
    /// seq, head_dim]` shape of a query or key tensor, built on first use and shared by every
    /// layer: same-shape contiguous operands take Flex's SIMD element-wise path, where a
    /// broadcast table makes it walk both tensors element by element.
    full: RefCell<Vec<FullTables<B>>>,
}

/// A shape and its `[cos, cos]` and `[-sin, sin]` tables.
type FullTables<B> = ([usize; 4], Tensor<B, 4>, Tensor<B, 4>);

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
            full: RefCell::new(Vec::new()),
        }
    }

    /// The half-split tables at `shape`, from the cache or built now.
    fn full_tables(
        &self,
        shape: [usize; 4],
        cos: Tensor<B, 4>,
        sin: Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let dtype = cos.dtype();
        if let Some((_, c, s)) = self
            .full
            .borrow()
            .iter()
            .find(|(s, c, _)| *s == shape && c.dtype() == dtype)
        {
            return (c.clone(), s.clone());
        }
        let [b, h, _, _] = shape;
        let widen = |table: Tensor<B, 4>| {
            let rows = table.dims()[0];
            let table = if rows == b {
                table
            } else {
                Tensor::cat(vec![table; b], 0)
            };
            Tensor::cat(vec![table; h], 1)
        };
        let c = widen(Tensor::cat(vec![cos.clone(), cos], 3));
        let s = widen(Tensor::cat(vec![sin.clone().neg(), sin], 3));
        self.full.borrow_mut().push((shape, c.clone(), s.clone()));
        (c, s)
    }

    /// Rotates `x` of shape `[batch, heads, seq, head_dim]`, in `x`'s float dtype (the tables are
    /// built in f32 and cast, so bf16/f16 compute works on backends that do not mix dtypes).
    pub fn apply(&self, x: Tensor<B, 4>, pairing: RopePairing) -> Tensor<B, 4> {
        let half_split = pairing == RopePairing::HalfSplit;
        if let Some(y) = kiln_kernels::fused::ops::<B>()
            .and_then(|f| f.rope(&x, &self.cos, &self.sin, half_split))
        {
            // One pass over `x` read through its strides (Flex, f32, inference).
            return y;
        }
        let [b, h, t, d] = x.dims();
        let half = d / 2;
        let (mut cos, mut sin) = (self.cos.clone(), self.sin.clone());
        if x.dtype() != cos.dtype() {
            cos = cos.cast(x.dtype());
            sin = sin.cast(x.dtype());
        }
        match pairing {
            RopePairing::HalfSplit => {
                // x·[cos, cos] + [x₂, x₁]·[-sin, sin], as products of contiguous same-shape
                // tensors: `x` (a strided view of the QKV projection) is rebuilt contiguously by
                // the same `cat` that forms the rotated halves.
                let (cos_full, sin_full) = self.full_tables([b, h, t, d], cos, sin);
                let x1 = x.clone().slice([0..b, 0..h, 0..t, 0..half]);
                let x2 = x.slice([0..b, 0..h, 0..t, half..d]);
                let straight = Tensor::cat(vec![x1.clone(), x2.clone()], 3);
                let rotated = Tensor::cat(vec![x2, x1], 3);
                straight * cos_full + rotated * sin_full
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
