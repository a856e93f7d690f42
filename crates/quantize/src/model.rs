//! Attaching int8 decoding kernels to every projection of a [`Transformer`].

use std::sync::Arc;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use kiln_kernels::Int8Matrix;
use kiln_transformer::{Projection, Transformer};

use crate::error::QuantizeError;

/// What [`quantize_for_decoding`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QuantizeReport {
    /// Layers given an int8 kernel.
    pub layers: usize,
    /// Bytes of their f32 weights.
    pub f32_bytes: usize,
    /// Bytes of their int8 values and scales.
    pub int8_bytes: usize,
}

impl QuantizeReport {
    fn add(&mut self, matrix: &Int8Matrix) {
        self.layers += 1;
        self.f32_bytes += 4 * matrix.rows() * matrix.cols();
        self.int8_bytes += matrix.bytes();
    }
}

/// Gives every projection of `model` (attention, MLP, output head — the tied embedding too) an
/// [`Int8Matrix`] kernel for decoding. Products of few rows (token-by-token generation, batched or
/// not) then read int8 weights; prefill and training keep using the f32 weights.
pub fn quantize_for_decoding<B: Backend>(
    model: &mut Transformer<B>,
) -> Result<QuantizeReport, QuantizeError> {
    let mut report = QuantizeReport::default();
    model.try_for_each_projection(|name, projection| {
        let matrix = int8_of(projection, name)?;
        report.add(&matrix);
        projection.kernel = Some(Arc::new(matrix));
        Ok::<_, QuantizeError>(())
    })?;
    if model.lm_head.is_none() {
        // The tied embedding `[vocab, d]` is already one row per output.
        let weight = model.tok_emb.weight.val();
        let [vocab, d] = weight.dims();
        let matrix = Int8Matrix::quantize(&read(weight, "tok_emb")?, vocab, d)?;
        report.add(&matrix);
        model.tied_head_kernel = Some(Arc::new(matrix));
    }
    Ok(report)
}

/// `projection`'s weight (`[in, out]`) as an int8 matrix of one row per output.
fn int8_of<B: Backend>(
    projection: &Projection<B>,
    name: &str,
) -> Result<Int8Matrix, QuantizeError> {
    let weight = projection.weight.val().transpose();
    let [out, inp] = weight.dims();
    Ok(Int8Matrix::quantize(&read(weight, name)?, out, inp)?)
}

fn read<B: Backend>(weight: Tensor<B, 2>, name: &str) -> Result<Vec<f32>, QuantizeError> {
    let data = weight
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| QuantizeError::Read {
            name: name.to_owned(),
            reason: format!("{e:?}"),
        })?;
    if data.iter().any(|v| !v.is_finite()) {
        return Err(QuantizeError::NonFinite(name.to_owned()));
    }
    Ok(data)
}
