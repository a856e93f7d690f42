//! Building Burn `Linear` and `Embedding` layers with nanoGPT's initialization.

use burn::module::Param;
use burn::nn::{Embedding, Initializer, Linear};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

/// nanoGPT's weight initialization: N(0, 0.02).
pub(crate) const INIT_STD: f64 = 0.02;

fn normal<B: Backend, const D: usize>(
    shape: [usize; D],
    std: f64,
    device: &B::Device,
) -> Param<Tensor<B, D>> {
    Initializer::Normal { mean: 0.0, std }.init(shape, device)
}

/// A `[d_in, d_out]` linear layer with N(0, `std`) weights and zero bias.
pub(crate) fn linear<B: Backend>(
    d_in: usize,
    d_out: usize,
    bias: bool,
    std: f64,
    device: &B::Device,
) -> Linear<B> {
    Linear {
        weight: normal([d_in, d_out], std, device),
        bias: bias.then(|| Param::from_tensor(Tensor::zeros([d_out], device))),
    }
}

/// An embedding table with N(0, 0.02) rows.
pub(crate) fn embedding<B: Backend>(n: usize, d: usize, device: &B::Device) -> Embedding<B> {
    Embedding {
        weight: normal([n, d], INIT_STD, device),
    }
}
