//! [`Projection`], the model's linear layer, and embeddings with nanoGPT's initialization.

use std::sync::Arc;

use burn::module::{Module, Param, ParamId};
use burn::nn::{Embedding, Initializer};
use burn::tensor::backend::Backend;
use burn::tensor::module::linear;
use burn::tensor::{Shape, Tensor, TensorData};
use kiln_kernels::{LinearKernel, QuantLinear, runs_host_kernels};

use crate::weights::transpose;

/// nanoGPT's weight initialization: N(0, 0.02).
pub(crate) const INIT_STD: f64 = 0.02;

fn normal<B: Backend, const D: usize>(
    shape: [usize; D],
    std: f64,
    device: &B::Device,
) -> Param<Tensor<B, D>> {
    Initializer::Normal { mean: 0.0, std }.init(shape, device)
}

/// A linear layer `y = x·W + b` (`W` is `[d_in, d_out]`) whose weight may also be held in a
/// quantized format. With a [`LinearKernel`] attached, products of up to
/// [`max_rows`](LinearKernel::max_rows) rows run through the kernel on backends that use host
/// kernels ([`runs_host_kernels`]): `kiln-quantize`'s int8 weights beside `W` serve
/// token-by-token decoding, and a GGUF model's own blocks ([`Projection::from_quantized`]) serve
/// every product while `W` is not even made. Everything else uses the backend's product on `W`.
///
/// Its parameters are named `weight` and `bias`, like Burn's `Linear`, so checkpoints and
/// safetensors files keep the same tensor names.
#[derive(Module, Debug)]
pub struct Projection<B: Backend> {
    /// `[d_in, d_out]`.
    pub weight: Param<Tensor<B, 2>>,
    /// `[d_out]`, if the layer has a bias.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// The weight in a kernel's own format, for small products.
    #[module(skip)]
    pub kernel: Option<Arc<dyn LinearKernel>>,
}

impl<B: Backend> Projection<B> {
    /// A `[d_in, d_out]` layer with N(0, `std`) weights and a zero bias (if `bias`).
    pub fn new(d_in: usize, d_out: usize, bias: bool, std: f64, device: &B::Device) -> Self {
        Self {
            weight: normal([d_in, d_out], std, device),
            bias: bias.then(|| Param::from_tensor(Tensor::zeros([d_out], device))),
            kernel: None,
        }
    }

    /// A layer whose weights live in `kernel` (`[out, in]` rows of quantized blocks) alone: the
    /// f32 weight `W` (parameter `id`) is dequantized from it on first use, by a backend without
    /// host kernels (a GPU) or by training, and never before.
    pub fn from_quantized(kernel: QuantLinear, id: ParamId, device: &B::Device) -> Self {
        let (d_in, d_out) = (kernel.in_features(), kernel.out_features());
        let kernel = Arc::new(kernel);
        let source = Arc::clone(&kernel);
        let weight = Param::uninitialized(
            id,
            move |device: &B::Device, require_grad| {
                let w = transpose(&source.dequantize(), d_out, d_in);
                let w = Tensor::from_data(TensorData::new(w, [d_in, d_out]), device);
                if require_grad { w.require_grad() } else { w }
            },
            device.clone(),
            true,
            Shape::new([d_in, d_out]),
        );
        Self {
            weight,
            bias: None,
            kernel: Some(kernel),
        }
    }

    /// Input width.
    pub fn in_features(&self) -> usize {
        self.weight.lazy_shape()[0]
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        self.weight.lazy_shape()[1]
    }

    /// `[batch, seq, d_in]` → `[batch, seq, d_out]`, as one `[batch·seq, d_in]` matrix product
    /// (Burn's `Linear` on 3-D input broadcasts the weight over the batch, which Flex runs as one
    /// product per row: in batched decoding that reads the whole weight once per sequence), or
    /// through the attached kernel when the product is small.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, t, d] = x.dims();
        let y = self.forward_rows(x.reshape([b * t, d]));
        let n = y.dims()[1];
        y.reshape([b, t, n])
    }

    /// `[rows, d_in]` → `[rows, d_out]`.
    pub fn forward_rows(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let rows = x.dims()[0];
        if let Some(kernel) = &self.kernel
            && rows <= kernel.max_rows()
            && (runs_host_kernels::<B>() || kernel.on_any_backend())
            && kernel.in_features() == x.dims()[1]
            && let Some(y) = run_kernel(kernel.as_ref(), x.clone(), rows)
        {
            return match &self.bias {
                Some(bias) => y + bias.val().unsqueeze::<2>(),
                None => y,
            };
        }
        let bias = self.bias.as_ref().map(Param::val);
        // Mixed precision (a `LinearProducts` scope): the backend's own kernel multiplies in the
        // scope's precision, forward and backward.
        if let Some(products) = kiln_kernels::fused::linear_products()
            && let Some(fused) = kiln_kernels::fused::ops::<B>()
            && let Some(y) = fused.linear(&x, &self.weight.val(), bias.as_ref(), products)
        {
            return y;
        }
        linear(x, self.weight.val(), bias)
    }
}

/// `x` (`rows` rows) through `kernel` on the host; `None` if `x` cannot be read as f32 or the
/// kernel refuses the shapes (the caller then uses the backend's product).
pub(crate) fn run_kernel<B: Backend>(
    kernel: &dyn LinearKernel,
    x: Tensor<B, 2>,
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
