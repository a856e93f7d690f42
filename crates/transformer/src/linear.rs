//! Building Burn `Linear` and `Embedding` layers with nanoGPT's initialization.

use std::fmt::Debug;
use std::sync::Arc;

use burn::module::Param;
use burn::nn::{Embedding, Initializer, Linear};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

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

/// A host-side implementation of one linear layer's product `y = x · Wᵀ` (no bias), used instead of
/// the backend's matrix product when few rows go through the layer (token-by-token decoding).
///
/// This is how `kiln-quantize` runs decoding on int8 weights: the layer keeps its f32 weights for
/// training and prefill, and the kernel reads a quarter of the bytes per generated token.
pub trait LinearKernel: Send + Sync + Debug {
    /// Width of each input row.
    fn in_features(&self) -> usize;
    /// Width of each output row.
    fn out_features(&self) -> usize;
    /// `out[r] = x[r] · Wᵀ` for `rows` rows laid out one after another; an error (the caller then
    /// uses the backend's product) when the slices do not have those shapes.
    fn forward(&self, x: &[f32], rows: usize, out: &mut [f32]) -> crate::Result<()>;
}

/// A layer's optional [`LinearKernel`].
pub type Kernel = Option<Arc<dyn LinearKernel>>;

/// Most rows a [`LinearKernel`] takes; larger products (prefill, training) use the backend.
pub const KERNEL_MAX_ROWS: usize = 16;

/// `layer` applied to `[batch, seq, d_in]` as one `[batch·seq, d_in]` matrix product, or through
/// `kernel` when one is attached and the product is small.
///
/// Burn's `Linear` on a 3-D input broadcasts the weight over the batch, which Flex runs as one
/// matrix product per batch row: in batched decoding (`seq` = 1) that is a matrix-vector product
/// per sequence, each reading the whole weight again. Flattening first reads it once.
pub(crate) fn project<B: Backend>(
    layer: &Linear<B>,
    kernel: &Kernel,
    x: Tensor<B, 3>,
) -> Tensor<B, 3> {
    let [b, t, d] = x.dims();
    if let Some(kernel) = kernel
        && b * t <= KERNEL_MAX_ROWS
        && kernel.in_features() == d
        && let Some(y) = run_kernel(kernel.as_ref(), x.clone(), b * t)
    {
        let y = match &layer.bias {
            Some(bias) => y + bias.val().unsqueeze::<2>(),
            None => y,
        };
        return y.reshape([b, t, kernel.out_features()]);
    }
    let y = layer.forward(x.reshape([b * t, d]));
    let n = y.dims()[1];
    y.reshape([b, t, n])
}

/// `x` (`[.., d]`, `rows` rows) through `kernel` on the host; `None` if `x` cannot be read as f32 or
/// the kernel refuses the shapes.
pub(crate) fn run_kernel<B: Backend, const D: usize>(
    kernel: &dyn LinearKernel,
    x: Tensor<B, D>,
    rows: usize,
) -> Option<Tensor<B, 2>> {
    let device = x.device();
    let input = x.into_data().convert::<f32>().into_vec::<f32>().ok()?;
    let n = kernel.out_features();
    let mut out = vec![0.0f32; rows * n];
    kernel.forward(&input, rows, &mut out).ok()?;
    Some(Tensor::from_data(TensorData::new(out, [rows, n]), &device))
}

/// An embedding table with N(0, 0.02) rows.
pub(crate) fn embedding<B: Backend>(n: usize, d: usize, device: &B::Device) -> Embedding<B> {
    Embedding {
        weight: normal([n, d], INIT_STD, device),
    }
}
