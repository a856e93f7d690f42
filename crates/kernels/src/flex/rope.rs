//! Rotary position embedding in one pass over the queries or keys, read through their strides (a
//! view of the fused QKV projection), in place of the composed slices, concatenations, products
//! and sum: the same products and sums per value, so the same results.

use burn::tensor::TensorData;
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::strided::StridedF32;

/// Values below which the rotation runs on the calling thread (a decoding step's).
const SERIAL: usize = 1 << 14;

/// `x` `[b, h, t, d]` rotated by `cos`, `sin` `[rows, 1, t, d / 2]` (`rows` 1 or `b`): pairs
/// `(i, i + d/2)` when `half_split`, else `(2i, 2i + 1)`; `x₀ cos − x₁ sin`, `x₁ cos + x₀ sin`.
/// `None` unless the tensors are f32 of those shapes.
pub(crate) fn forward(
    x: &FlexTensor,
    cos: &FlexTensor,
    sin: &FlexTensor,
    half_split: bool,
) -> Option<FlexTensor> {
    let xv = StridedF32::<4>::new(x)?;
    let (cv, sv) = (StridedF32::<4>::new(cos)?, StridedF32::<4>::new(sin)?);
    let [b, h, t, d] = xv.shape;
    let half = d / 2;
    let [rows, one, ct, ch] = cv.shape;
    if d % 2 != 0
        || sv.shape != cv.shape
        || one != 1
        || ct != t
        || ch != half
        || !(rows == 1 || rows == b)
    {
        return None;
    }
    let mut out = vec![0f32; b * h * t * d];
    // One (batch row, head) of `t` positions.
    let head = |bh: usize, out: &mut [f32]| {
        let (bi, hi) = (bh / h, bh % h);
        let r = if rows == 1 { 0 } else { bi };
        let (mut xs, mut cs, mut ss) = (vec![0f32; d], vec![0f32; half], vec![0f32; half]);
        for (ti, o) in out.chunks_exact_mut(d).enumerate() {
            let x = xv.row_ref([bi, hi, ti, 0], d, &mut xs);
            let c = cv.row_ref([r, 0, ti, 0], half, &mut cs);
            let s = sv.row_ref([r, 0, ti, 0], half, &mut ss);
            if half_split {
                let (o0, o1) = o.split_at_mut(half);
                let (x0, x1) = x.split_at(half);
                for i in 0..half {
                    o0[i] = x0[i] * c[i] - x1[i] * s[i];
                    o1[i] = x1[i] * c[i] + x0[i] * s[i];
                }
            } else {
                for (i, (o, x)) in o.chunks_exact_mut(2).zip(x.chunks_exact(2)).enumerate() {
                    o[0] = x[0] * c[i] - x[1] * s[i];
                    o[1] = x[1] * c[i] + x[0] * s[i];
                }
            }
        }
    };
    let per_head = (t * d).max(1);
    if out.len() < SERIAL {
        out.chunks_mut(per_head)
            .enumerate()
            .for_each(|(bh, o)| head(bh, o));
    } else {
        out.par_chunks_mut(per_head)
            .enumerate()
            .for_each(|(bh, o)| head(bh, o));
    }
    Some(FlexTensor::from_data(TensorData::new(out, [b, h, t, d])))
}
