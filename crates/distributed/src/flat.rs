//! Moving a model's gradients and parameters in and out of flat 1-D tensors in the model's visiting
//! order, and bucketed all-reduces over them (few large messages instead of one per tensor).

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};

use crate::comm::Communicator;
use crate::error::Result;

/// One optional flat tensor per parameter, in visiting order.
pub type Flat<B> = Vec<Option<Tensor<B, 1>>>;

/// Default bucket size: 25 MB of f32, PyTorch DDP's `bucket_cap_mb`.
pub const DEFAULT_BUCKET_ELEMENTS: usize = 25 * 1024 * 1024 / 4;

/// The gradients in `grads` of `module`'s parameters, flattened, in visiting order (moved out).
pub fn take_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &mut GradientsParams,
) -> Flat<B::InnerBackend> {
    struct Visitor<'a, B: AutodiffBackend> {
        grads: &'a mut GradientsParams,
        out: Flat<B::InnerBackend>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Visitor<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let g = self.grads.remove::<B::InnerBackend, D>(param.id);
            self.out.push(g.map(|g| g.reshape([-1])));
        }
    }
    let mut v = Visitor::<B> {
        grads,
        out: Vec::new(),
    };
    module.visit(&mut v);
    v.out
}

/// Registers `flat[i]`, reshaped to `shapes[i]`, as the gradient of `module`'s `i`-th parameter.
pub fn grads_from_flat<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    flat: Flat<B::InnerBackend>,
    shapes: &[Vec<usize>],
) -> GradientsParams {
    struct Visitor<'a, B: Backend> {
        flat: std::vec::IntoIter<Option<Tensor<B, 1>>>,
        shapes: std::slice::Iter<'a, Vec<usize>>,
        out: GradientsParams,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Visitor<'_, B::InnerBackend> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let shape = self.shapes.next();
            if let (Some(Some(g)), Some(shape)) = (self.flat.next(), shape) {
                self.out
                    .register(param.id, g.reshape::<D, _>(shape_array::<D>(shape)));
            }
        }
    }
    let mut v = Visitor::<B::InnerBackend> {
        flat: flat.into_iter(),
        shapes: shapes.iter(),
        out: GradientsParams::new(),
    };
    module.visit(&mut v);
    v.out
}

/// `module`'s parameter values, flattened, in visiting order.
pub fn param_values<B: AutodiffBackend, M: AutodiffModule<B>>(module: &M) -> Flat<B::InnerBackend> {
    struct Visitor<B: AutodiffBackend>(Flat<B::InnerBackend>);
    impl<B: AutodiffBackend> ModuleVisitor<B> for Visitor<B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0.push(Some(param.val().inner().reshape([-1])));
        }
    }
    let mut v = Visitor::<B>(Vec::new());
    module.visit(&mut v);
    v.0
}

/// `module` with its `i`-th parameter's value replaced by `flat[i]` reshaped to `shapes[i]` (where
/// `flat[i]` is `Some`), keeping ids and whether each requires a gradient.
pub fn with_param_values<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: M,
    flat: Flat<B::InnerBackend>,
    shapes: &[Vec<usize>],
) -> M {
    struct Mapper<'a, B: Backend> {
        flat: std::vec::IntoIter<Option<Tensor<B, 1>>>,
        shapes: std::slice::Iter<'a, Vec<usize>>,
    }
    impl<B: AutodiffBackend> ModuleMapper<B> for Mapper<'_, B::InnerBackend> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let shape = self.shapes.next();
            match (self.flat.next(), shape) {
                (Some(Some(value)), Some(shape)) => {
                    let (id, old, mapper) = param.consume();
                    let grad = old.is_require_grad();
                    let value = Tensor::<B, D>::from_inner(value.reshape(shape_array::<D>(shape)));
                    Param::from_mapped_value(id, value.set_require_grad(grad), mapper)
                }
                _ => param,
            }
        }
    }
    module.map(&mut Mapper::<B::InnerBackend> {
        flat: flat.into_iter(),
        shapes: shapes.iter(),
    })
}

fn shape_array<const D: usize>(shape: &[usize]) -> [usize; D] {
    let mut out = [1; D];
    for (o, s) in out.iter_mut().zip(shape) {
        *o = *s;
    }
    out
}

/// Sums `flat` over all ranks in buckets of at most `bucket_elements` elements (a tensor larger
/// than that is a bucket of its own). Every rank must pass the same pattern of `Some`s, shapes
/// and dtypes.
pub fn all_reduce_buckets<B: Backend>(
    comm: &Communicator<B>,
    flat: Flat<B>,
    bucket_elements: usize,
) -> Result<Flat<B>> {
    let mut out: Flat<B> = Vec::with_capacity(flat.len());
    let mut bucket: Vec<(usize, Tensor<B, 1>)> = Vec::new();
    let mut elements = 0;
    let flush = |bucket: &mut Vec<(usize, Tensor<B, 1>)>, out: &mut Flat<B>| -> Result<()> {
        if bucket.is_empty() {
            return Ok(());
        }
        let lens: Vec<(usize, usize)> = bucket.iter().map(|(i, t)| (*i, t.dims()[0])).collect();
        let joined = Tensor::cat(bucket.drain(..).map(|(_, t)| t).collect(), 0);
        let summed = comm.all_reduce_sum(joined)?;
        let mut start = 0;
        for (i, len) in lens {
            out[i] = Some(summed.clone().slice(start..start + len));
            start += len;
        }
        Ok(())
    };
    for (i, t) in flat.into_iter().enumerate() {
        out.push(None);
        let Some(t) = t else { continue };
        let len = t.dims()[0];
        let same_dtype = bucket.first().is_none_or(|(_, b)| b.dtype() == t.dtype());
        if !bucket.is_empty() && (elements + len > bucket_elements || !same_dtype) {
            flush(&mut bucket, &mut out)?;
            elements = 0;
        }
        elements += len;
        bucket.push((i, t));
    }
    flush(&mut bucket, &mut out)?;
    Ok(out)
}
