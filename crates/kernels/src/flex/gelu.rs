//! GELU (exact or tanh), forward and backward, on f32 Flex tensors with a vectorized `erf` and
//! `tanh` (Flex calls libm's scalar `erff` / `tanhf` for every element, in both passes).

use crate::fused::Gelu;
use burn::tensor::{DType, TensorData};
use burn_flex::FlexTensor;

use super::buffer::filled_in_parallel;
use super::math;

/// Elements per parallel task.
const CHUNK: usize = 16 * 1024;

/// GELU of `x`; `None` unless `x` is f32.
pub(crate) fn forward(x: &FlexTensor, kind: Gelu) -> Option<FlexTensor> {
    if x.dtype() != DType::F32 {
        return None;
    }
    let x = x.to_contiguous();
    let xs = x.as_slice::<f32>()?;
    let y = filled_in_parallel(xs.len(), CHUNK, |i, y| {
        let x = &xs[i * CHUNK..][..y.len()];
        match kind {
            Gelu::Erf => math::gelu(x, y),
            Gelu::Tanh => math::gelu_tanh(x, y),
        }
    });
    Some(FlexTensor::from_data(TensorData::new(
        y,
        x.layout().shape().clone(),
    )))
}

/// `grad · gelu'(x)`; `None` unless both are f32 of the same size.
pub(crate) fn backward(x: &FlexTensor, grad: &FlexTensor, kind: Gelu) -> Option<FlexTensor> {
    if x.dtype() != DType::F32 || grad.dtype() != DType::F32 {
        return None;
    }
    let (x, grad) = (x.to_contiguous(), grad.to_contiguous());
    let (xs, gs) = (x.as_slice::<f32>()?, grad.as_slice::<f32>()?);
    if xs.len() != gs.len() {
        return None;
    }
    let dx = filled_in_parallel(xs.len(), CHUNK, |i, dx| {
        let (x, g) = (&xs[i * CHUNK..][..dx.len()], &gs[i * CHUNK..][..dx.len()]);
        match kind {
            Gelu::Erf => math::gelu_backward(x, g, dx),
            Gelu::Tanh => math::gelu_tanh_backward(x, g, dx),
        }
    });
    Some(FlexTensor::from_data(TensorData::new(
        dx,
        x.layout().shape().clone(),
    )))
}
