//! Putting named f32 tensors into a [`Transformer`]: the one path every weight format goes through.
//!
//! Loaders translate their file's names and layouts into Kiln's parameter paths (e.g.
//! `blocks.3.attn.qkv.weight`, `[in, out]` layout) and hand the tensors to [`apply`], which checks
//! that every parameter is present with the right shape.

use burn::module::ParamId;
use burn::tensor::TensorData;
use burn::tensor::backend::Backend;
use burn_store::{ApplyError, ModuleSnapshot, TensorSnapshot};

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

/// Applies `tensors` to `model`; every parameter must be provided, with the right shape.
pub(crate) fn apply<B: Backend>(
    model: &mut Transformer<B>,
    tensors: Vec<NamedTensor>,
    file: &str,
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
    if let Some((path, _)) = result.missing.first() {
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

/// Stacks row-major matrices that share a column count (concatenation along rows).
pub(crate) fn concat_rows(parts: Vec<Vec<f32>>) -> Vec<f32> {
    parts.concat()
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
