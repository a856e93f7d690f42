//! AdamW's update of one f32 parameter in one parallel pass: moments, bias correction, decoupled
//! weight decay and the step, in place where the tensors are not shared.
//!
//! Burn's `AdamW` runs a dozen whole-tensor ops per parameter on the training thread, each reading
//! and writing the parameter's size in memory; this reads the parameter, its gradient and both
//! moments once, on every core. The arithmetic is Burn's, in its order.

use burn::tensor::{DType, TensorData};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use crate::fused::AdamWStep;

/// Values per parallel task.
const CHUNK: usize = 16 * 1024;

/// A contiguous, uniquely owned f32 copy of `t` when it is f32 (a copy only where `t` is strided
/// or shared).
fn owned_f32(t: FlexTensor) -> Option<FlexTensor> {
    if t.dtype() != DType::F32 {
        return None;
    }
    Some(if t.is_contiguous() && t.layout().start_offset() == 0 {
        t
    } else {
        t.to_contiguous()
    })
}

/// The updated `(param, moment_1, moment_2)` after one AdamW step with gradient `grad`; the
/// moments start at zero when `moments` is `None`. `None` when the tensors are not all f32 of the
/// same size.
pub(crate) fn step(
    param: FlexTensor,
    grad: &FlexTensor,
    moments: Option<(FlexTensor, FlexTensor)>,
    step: &AdamWStep,
) -> Option<(FlexTensor, FlexTensor, FlexTensor)> {
    let n = param.layout().num_elements();
    let grad = grad.to_contiguous();
    let g = grad.as_slice::<f32>()?;
    if g.len() != n {
        return None;
    }
    let shape = param.layout().shape().clone();
    let mut param = owned_f32(param)?;
    let (mut m, mut v) = match moments {
        Some((m, v)) => (owned_f32(m)?, owned_f32(v)?),
        None => {
            let zeros = || FlexTensor::from_data(TensorData::new(vec![0f32; n], shape.clone()));
            (zeros(), zeros())
        }
    };
    if m.layout().num_elements() != n || v.layout().num_elements() != n {
        return None;
    }
    let time = i32::try_from(step.time).ok()?;
    let (beta_1, beta_2) = (step.beta_1, step.beta_2);
    let (factor_1, factor_2) = (1.0 - beta_1, 1.0 - beta_2);
    let (correction_1, correction_2) = (1f32 - beta_1.powi(time), 1f32 - beta_2.powi(time));
    let decay_rate = step.lr * step.weight_decay as f64;
    let keep = (1.0 - decay_rate) as f32;
    let lr = step.lr as f32;
    let eps = step.epsilon;
    let (p, m_values, v_values) = (
        param.storage_mut::<f32>(),
        m.storage_mut::<f32>(),
        v.storage_mut::<f32>(),
    );
    p.par_chunks_mut(CHUNK)
        .zip(m_values.par_chunks_mut(CHUNK))
        .zip(v_values.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .for_each(|(((p, m), v), g)| {
            for (((p, m), v), &g) in p.iter_mut().zip(m).zip(v).zip(g) {
                *m = *m * beta_1 + g * factor_1;
                *v = *v * beta_2 + g * g * factor_2;
                let delta = (*m / correction_1) / ((*v / correction_2).sqrt() + eps);
                let decayed = if decay_rate == 0.0 { *p } else { *p * keep };
                *p = decayed - delta * lr;
            }
        });
    Some((param, m, v))
}
