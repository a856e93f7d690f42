//! Putting named f32 tensors into a [`Transformer`]: the one path every weight format goes through.
//!
//! Loaders translate their file's names and layouts into Kiln's parameter paths (e.g.
//! `blocks.3.attn.qkv.weight`, `[in, out]` layout) and hand the tensors to [`apply`], which checks
//! that every parameter is present with the right shape.

use burn::module::ParamId;
use burn::tensor::TensorData;
use burn::tensor::backend::Backend;
use burn_store::{ApplyError, ModuleSnapshot, TensorSnapshot};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::model::Transformer;

/// A tensor destined for the parameter at `path`.
#[derive(Debug)]
pub(crate) struct NamedTensor {
    /// Kiln parameter path.
    pub path: String,
    /// Name in the source file (for error messages).
    pub source_name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl NamedTensor {
    /// A tensor for Kiln parameter `path`, read from `source_name`.
    pub(crate) fn new(
        path: impl Into<String>,
        source_name: &str,
        shape: Vec<usize>,
        data: Vec<f32>,
    ) -> Self {
        Self {
            path: path.into(),
            source_name: source_name.to_owned(),
            shape,
            data,
        }
    }
}

/// A tensor read from a file, with its name there.
pub(crate) struct Source {
    pub name: String,
    pub data: Vec<f32>,
}

/// One Llama block as GGUF and Hugging Face store it: linear weights `[out, in]`, Q and K rows in
/// half-split RoPE order.
pub(crate) struct LlamaBlock {
    pub attn_norm: Source,
    pub q: Source,
    pub k: Source,
    pub v: Source,
    pub o: Source,
    pub ffn_norm: Source,
    pub gate: Source,
    pub up: Source,
    pub down: Source,
}

/// A fused `[Σ rows, cols]` tensor cut into its parts of `rows[j]` rows each.
pub(crate) fn split_rows<const N: usize>(
    fused: Source,
    rows: [usize; N],
    cols: usize,
) -> [Source; N] {
    let mut start = 0;
    rows.map(|n| {
        let part = fused.data[start * cols..(start + n) * cols].to_vec();
        start += n;
        Source {
            name: fused.name.clone(),
            data: part,
        }
    })
}

/// Block `i`'s Kiln parameters: Q, K and V fused, every linear weight transposed to `[in, out]`.
pub(crate) fn llama_block(i: usize, b: LlamaBlock, config: &ModelConfig) -> Vec<NamedTensor> {
    let (d, ff) = (config.d_model, config.d_ff);
    let q_out = config.n_heads * config.head_dim();
    let qkv_out = q_out + 2 * config.n_kv_heads * config.head_dim();
    let path = |s: &str| format!("blocks.{i}.{s}.weight");
    vec![
        NamedTensor::new(path("norm1"), &b.attn_norm.name, vec![d], b.attn_norm.data),
        NamedTensor::new(
            path("attn.qkv"),
            &b.q.name,
            vec![d, qkv_out],
            transpose(&[b.q.data, b.k.data, b.v.data].concat(), qkv_out, d),
        ),
        NamedTensor::new(
            path("attn.proj"),
            &b.o.name,
            vec![q_out, d],
            transpose(&b.o.data, d, q_out),
        ),
        NamedTensor::new(path("norm2"), &b.ffn_norm.name, vec![d], b.ffn_norm.data),
        NamedTensor::new(
            path("mlp.gate"),
            &b.gate.name,
            vec![d, ff],
            transpose(&b.gate.data, ff, d),
        ),
        NamedTensor::new(
            path("mlp.up"),
            &b.up.name,
            vec![d, ff],
            transpose(&b.up.data, ff, d),
        ),
        NamedTensor::new(
            path("mlp.down"),
            &b.down.name,
            vec![ff, d],
            transpose(&b.down.data, d, ff),
        ),
    ]
}

/// Applies `tensors` to `model`; every parameter must be provided, with the right shape.
pub(crate) fn apply<B: Backend>(
    model: &mut Transformer<B>,
    tensors: Vec<NamedTensor>,
    file: &str,
) -> Result<()> {
    apply_except(model, tensors, file, &|_| false)
}

/// [`apply`], where the parameters `filled_elsewhere` names (Kiln paths) may be absent from
/// `tensors`: the caller sets them another way (quantized kernels).
pub(crate) fn apply_except<B: Backend>(
    model: &mut Transformer<B>,
    tensors: Vec<NamedTensor>,
    file: &str,
    filled_elsewhere: &dyn Fn(&str) -> bool,
) -> Result<()> {
    let names: Vec<(String, String)> = tensors
        .iter()
        .map(|t| (t.path.clone(), t.source_name.clone()))
        .collect();
    let source_of = |path: &str| {
        names
            .iter()
            .find(|(p, _)| p == path)
            .map_or_else(|| path.to_owned(), |(_, s)| s.clone())
    };
    let snapshots = tensors
        .into_iter()
        .map(|t| {
            let stack = t.path.split('.').map(str::to_owned).collect();
            TensorSnapshot::from_data(
                TensorData::new(t.data, t.shape),
                stack,
                Vec::new(),
                ParamId::new(),
            )
        })
        .collect();
    let result = model.apply(snapshots, None, None, false);
    if let Some(err) = result.errors.first() {
        return Err(match err {
            ApplyError::ShapeMismatch {
                path,
                expected,
                found,
            } => ModelError::ShapeMismatch {
                name: source_of(path),
                expected: expected.to_vec(),
                found: found.to_vec(),
            },
            other => ModelError::BadTensor {
                name: file.to_owned(),
                reason: other.to_string(),
            },
        });
    }
    if let Some((path, _)) = result
        .missing
        .iter()
        .find(|(path, _)| !filled_elsewhere(path))
    {
        return Err(ModelError::MissingTensor {
            name: path.clone(),
            file: file.to_owned(),
        });
    }
    Ok(())
}

/// Row-major `[rows, cols]` → `[cols, rows]`, blocked for cache locality.
pub(crate) fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const TILE: usize = 32;
    let mut out = vec![0.0f32; data.len()];
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    out[c * rows + r] = data[r * cols + c];
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_is_exact() {
        let (r, c) = (37, 70);
        let data: Vec<f32> = (0..r * c).map(|i| i as f32).collect();
        let t = transpose(&data, r, c);
        for i in 0..r {
            for j in 0..c {
                assert_eq!(t[j * r + i], data[i * c + j]);
            }
        }
        assert_eq!(transpose(&t, c, r), data);
    }
}
