//! Attaching int8 decoding kernels to every linear layer of a [`Transformer`].

use std::sync::Arc;

use burn::nn::Linear;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use kiln_transformer::{Kernel, Transformer};

use crate::error::QuantizeError;
use crate::int8::Int8Matrix;

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

/// Gives every linear layer of `model` (attention, MLP, output projection — the tied embedding
/// too) an [`Int8Matrix`] kernel for decoding. Products of few rows (token-by-token generation,
/// batched or not) then read int8 weights; prefill and training keep using the f32 weights.
pub fn quantize_for_decoding<B: Backend>(
    model: &mut Transformer<B>,
) -> Result<QuantizeReport, QuantizeError> {
    let mut report = QuantizeReport::default();
    for (i, block) in model.blocks.iter_mut().enumerate() {
        let attn = &mut block.attn;
        attn.kernels = [
            linear_kernel(&attn.qkv, &format!("blocks.{i}.attn.qkv"), &mut report)?,
            linear_kernel(&attn.proj, &format!("blocks.{i}.attn.proj"), &mut report)?,
        ];
        let mlp = &mut block.mlp;
        let gate = match &mlp.gate {
            Some(gate) => linear_kernel(gate, &format!("blocks.{i}.mlp.gate"), &mut report)?,
            None => None,
        };
        mlp.kernels = [
            gate,
            linear_kernel(&mlp.up, &format!("blocks.{i}.mlp.up"), &mut report)?,
            linear_kernel(&mlp.down, &format!("blocks.{i}.mlp.down"), &mut report)?,
        ];
    }
    model.head_kernel = match &model.lm_head {
        Some(head) => linear_kernel(head, "lm_head", &mut report)?,
        None => {
            // The tied embedding `[vocab, d]` is already one row per output.
            let weight = model.tok_emb.weight.val();
            let [vocab, d] = weight.dims();
            let data = read(weight, "tok_emb")?;
            let matrix = Int8Matrix::quantize(&data, vocab, d)?;
            report.add(&matrix);
            Some(Arc::new(matrix))
        }
    };
    Ok(report)
}

/// An int8 kernel for `layer` (weight `[in, out]`, stored transposed as `[out, in]`).
fn linear_kernel<B: Backend>(
    layer: &Linear<B>,
    name: &str,
    report: &mut QuantizeReport,
) -> Result<Kernel, QuantizeError> {
    let weight = layer.weight.val().transpose();
    let [out, inp] = weight.dims();
    let data = read(weight, name)?;
    let matrix = Int8Matrix::quantize(&data, out, inp)?;
    report.add(&matrix);
    Ok(Some(Arc::new(matrix)))
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
