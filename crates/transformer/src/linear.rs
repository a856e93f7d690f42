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

/// `layer` applied to `[batch, seq, d_in]` as one `[batch·seq, d_in]` matrix product.
///
/// Burn's `Linear` on a 3-D input broadcasts the weight over the batch, which Flex runs as one
/// matrix product per batch row: in batched decoding (`seq` = 1) that is a matrix-vector product
/// per sequence, each reading the whole weight again. Flattening first reads it once.
pub(crate) fn project<B: Backend>(layer: &Linear<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    let [b, t, d] = x.dims();
    let y = layer.forward(x.reshape([b * t, d]));
    let n = y.dims()[1];
    y.reshape([b, t, n])
}

/// An embedding table with N(0, 0.02) rows.
pub(crate) fn embedding<B: Backend>(n: usize, d: usize, device: &B::Device) -> Embedding<B> {
    Embedding {
        weight: normal([n, d], INIT_STD, device),
    }
}
