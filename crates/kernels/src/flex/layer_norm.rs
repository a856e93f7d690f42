//! LayerNorm over the last dimension in one pass per row, forward and backward, on f32 Flex
//! tensors (Burn composes it from ten broadcast element-wise ops, each with its own backward).

use burn::tensor::TensorData;
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::buffer::filled_in_parallel;
use super::math;

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 64;

fn contiguous_f32(tensor: &FlexTensor) -> Option<FlexTensor> {
    (tensor.dtype() == burn::tensor::DType::F32).then(|| tensor.to_contiguous())
}

/// Mean and 1/√(var + eps) of one row.
fn row_stats(x: &[f32], eps: f64) -> (f32, f32) {
    let d = x.len() as f32;
    let mean = math::sum(x) / d;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d;
    (mean, 1.0 / (var + eps as f32).sqrt())
}

/// `(x − mean)/√(var + eps) · weight (+ bias)` over the last dimension of `x`. `None` unless
/// everything is f32 and the widths agree.
pub(crate) fn forward(
    x: &FlexTensor,
    weight: &FlexTensor,
    bias: Option<&FlexTensor>,
    eps: f64,
) -> Option<FlexTensor> {
    let shape = x.layout().shape().clone();
    let d = *shape.last()?;
    let x = contiguous_f32(x)?;
    let weight = contiguous_f32(weight)?;
    let bias = bias
        .map(contiguous_f32)
        .map_or(Some(None), |b| b.map(Some))?;
    let w = weight.as_slice::<f32>()?;
    let beta = bias
        .as_ref()
        .map(|b| b.as_slice::<f32>())
        .unwrap_or(Some(&[]))?;
    if d == 0 || w.len() != d || (bias.is_some() && beta.len() != d) {
        return None;
    }
    let xs = x.as_slice::<f32>()?;
    let y = filled_in_parallel(xs.len(), ROWS_PER_TASK * d, |task, y| {
        let xs = &xs[task * ROWS_PER_TASK * d..][..y.len()];
        for (y, x) in y.chunks_exact_mut(d).zip(xs.chunks_exact(d)) {
            let (mean, rstd) = row_stats(x, eps);
            if beta.is_empty() {
                for ((o, &v), &g) in y.iter_mut().zip(x).zip(w) {
                    *o = (v - mean) * rstd * g;
                }
            } else {
                for (((o, &v), &g), &b) in y.iter_mut().zip(x).zip(w).zip(beta) {
                    *o = (v - mean) * rstd * g + b;
                }
            }
        }
    });
    Some(FlexTensor::from_data(TensorData::new(y, shape)))
}

/// Gradients `(dx, dweight, dbias)` of [`forward`] at `x` given the output gradient `grad` (the
/// row statistics are recomputed: one pass over `x`, instead of keeping them).
pub(crate) fn backward(
    x: &FlexTensor,
    weight: &FlexTensor,
    eps: f64,
    grad: &FlexTensor,
) -> Option<(FlexTensor, FlexTensor, FlexTensor)> {
    let (x, weight, grad) = (
        contiguous_f32(x)?,
        contiguous_f32(weight)?,
        contiguous_f32(grad)?,
    );
    let (xs, dy, w) = (
        x.as_slice::<f32>()?,
        grad.as_slice::<f32>()?,
        weight.as_slice::<f32>()?,
    );
    let d = w.len();
    if dy.len() != xs.len() || d == 0 || xs.len() % d != 0 {
        return None;
    }
    let mut dx = vec![0.0f32; xs.len()];
    // Each task sums its rows' contributions to dweight and dbias; the partial sums are added after.
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(ROWS_PER_TASK * d)
        .zip(xs.par_chunks(ROWS_PER_TASK * d))
        .zip(dy.par_chunks(ROWS_PER_TASK * d))
        .map(|((dx, xs), dy)| {
            let (mut dw, mut db) = (vec![0.0f32; d], vec![0.0f32; d]);
            let mut xhat = vec![0.0f32; d];
            let mut g = vec![0.0f32; d];
            for ((dx, x), dy) in dx
                .chunks_exact_mut(d)
                .zip(xs.chunks_exact(d))
                .zip(dy.chunks_exact(d))
            {
                let (mean, rstd) = row_stats(x, eps);
                for j in 0..d {
                    xhat[j] = (x[j] - mean) * rstd;
                    g[j] = dy[j] * w[j];
                    dw[j] += dy[j] * xhat[j];
                    db[j] += dy[j];
                }
                let g_mean = math::sum(&g) / d as f32;
                let gx_mean = math::dot(&g, &xhat) / d as f32;
                for j in 0..d {
                    dx[j] = rstd * (g[j] - g_mean - xhat[j] * gx_mean);
                }
            }
            (dw, db)
        })
        .collect();
    let (mut dw, mut db) = (vec![0.0f32; d], vec![0.0f32; d]);
    for (pw, pb) in partials {
        dw.iter_mut().zip(&pw).for_each(|(a, b)| *a += b);
        db.iter_mut().zip(&pb).for_each(|(a, b)| *a += b);
    }
    let shape = x.layout().shape().clone();
    Some((
        FlexTensor::from_data(TensorData::new(dx, shape)),
        FlexTensor::from_data(TensorData::new(dw, [d])),
        FlexTensor::from_data(TensorData::new(db, [d])),
    ))
}
