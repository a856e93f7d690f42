//! How ZeRO splits a model's training state over ranks: the parameters in the model's visiting
//! order, each cut into contiguous row ranges (row = everything but the first dimension), the cut
//! points chosen so every rank owns the same number of elements to within one row. Rows, not
//! whole tensors, are the unit, so one large tensor (GPT-2's 38M-entry embedding) does not leave
//! one rank holding a third of the state.

use std::ops::Range;

use burn::module::{AutodiffModule, ParamId};
use burn::tensor::backend::AutodiffBackend;
use kiln_trainer::optimizer::param_infos;

use crate::error::{DistError, Result};

/// One parameter as the partition sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamLayout {
    /// Burn's id (path-derived, the same in every process).
    pub id: ParamId,
    /// Dotted path, e.g. `blocks.0.attn.qkv.weight` (names the state in sharded checkpoints).
    pub path: String,
    /// Shape.
    pub shape: Vec<usize>,
}

impl ParamLayout {
    /// Rows: the first dimension.
    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }

    /// Elements per row.
    pub fn row_len(&self) -> usize {
        self.shape.iter().skip(1).product()
    }

    /// Elements.
    pub fn len(&self) -> usize {
        self.rows() * self.row_len()
    }

    /// Whether the parameter has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The shape of rows `rows` of the parameter.
    pub fn shard_shape(&self, rows: &Range<usize>) -> Vec<usize> {
        let mut shape = self.shape.clone();
        if let Some(first) = shape.first_mut() {
            *first = rows.len();
        }
        shape
    }
}

/// The float parameters of `module` in visiting order, with their paths and shapes.
pub fn param_layouts<B: AutodiffBackend, M: AutodiffModule<B>>(module: &M) -> Vec<ParamLayout> {
    param_infos(module)
        .into_iter()
        .map(|p| ParamLayout {
            id: p.id,
            path: p.path,
            shape: p.shape,
        })
        .collect()
}

/// The shapes of `module`'s float parameters, in visiting order.
pub fn param_shapes<B: AutodiffBackend, M: AutodiffModule<B>>(module: &M) -> Vec<Vec<usize>> {
    param_infos(module).into_iter().map(|p| p.shape).collect()
}

/// The row ranges every rank owns of every parameter.
#[derive(Clone, Debug, PartialEq)]
pub struct Partition {
    params: Vec<ParamLayout>,
    /// `owned[p][r]`: the rows of parameter `p` rank `r` owns.
    owned: Vec<Vec<Range<usize>>>,
    world: usize,
}

impl Partition {
    /// Splits `params` over `world` ranks.
    pub fn new(params: Vec<ParamLayout>, world: usize) -> Result<Self> {
        if world == 0 {
            return Err(DistError::Config("a world of 0 ranks".into()));
        }
        let total: u128 = params.iter().map(|p| p.len() as u128).sum();
        let n = world as u128;
        let mut offset = 0u128;
        let mut owned = Vec::with_capacity(params.len());
        for p in &params {
            let (rows, len) = (p.rows(), p.row_len() as u128);
            // A row belongs to the rank whose equal share of the elements holds its midpoint.
            let owner = |row: usize| -> usize {
                if total == 0 {
                    return 0;
                }
                let mid2 = 2 * (offset + row as u128 * len) + len;
                ((mid2 * n) / (2 * total)).min(n - 1) as usize
            };
            let mut ranges = vec![0..0; world];
            let mut row = 0;
            while row < rows {
                let r = owner(row);
                let start = row;
                while row < rows && owner(row) == r {
                    row += 1;
                }
                ranges[r] = start..row;
            }
            offset += p.len() as u128;
            owned.push(ranges);
        }
        Ok(Self {
            params,
            owned,
            world,
        })
    }

    /// The partition of `module`'s parameters over `world` ranks.
    pub fn of<B: AutodiffBackend, M: AutodiffModule<B>>(module: &M, world: usize) -> Result<Self> {
        Self::new(param_layouts(module), world)
    }

    /// The parameters, in visiting order.
    pub fn params(&self) -> &[ParamLayout] {
        &self.params
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// The rows of parameter `index` that `rank` owns (possibly none).
    pub fn rows(&self, index: usize, rank: usize) -> Range<usize> {
        self.owned[index][rank].clone()
    }

    /// Elements `rank` owns over all parameters.
    pub fn owned_elements(&self, rank: usize) -> usize {
        self.params
            .iter()
            .zip(&self.owned)
            .map(|(p, o)| o[rank].len() * p.row_len())
            .sum()
    }

    /// Total elements.
    pub fn total_elements(&self) -> usize {
        self.params.iter().map(ParamLayout::len).sum()
    }

    /// Whether `other` has the same parameters (paths and shapes).
    pub fn same_params(&self, other: &[ParamLayout]) -> bool {
        self.params.len() == other.len()
            && self
                .params
                .iter()
                .zip(other)
                .all(|(a, b)| a.path == b.path && a.shape == b.shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(path: &str, shape: &[usize]) -> ParamLayout {
        ParamLayout {
            id: ParamId::new(),
            path: path.into(),
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn rows_cover_every_parameter_once_and_balance_to_a_row() {
        let params = vec![
            layout("emb", &[1000, 48]),
            layout("w1", &[48, 192]),
            layout("b1", &[192]),
            layout("w2", &[192, 48]),
            layout("norm", &[48]),
        ];
        for world in [1, 2, 3, 4, 7] {
            let p = Partition::new(params.clone(), world).unwrap();
            for (i, layout) in params.iter().enumerate() {
                // Contiguous, in rank order, covering 0..rows.
                let mut next = 0;
                for r in 0..world {
                    let rows = p.rows(i, r);
                    if rows.is_empty() {
                        continue;
                    }
                    assert_eq!(rows.start, next, "{world} ranks, {}", layout.path);
                    next = rows.end;
                }
                assert_eq!(next, layout.rows());
            }
            let total = p.total_elements();
            let sum: usize = (0..world).map(|r| p.owned_elements(r)).sum();
            assert_eq!(sum, total);
            let widest = params.iter().map(ParamLayout::row_len).max().unwrap();
            for r in 0..world {
                let share = p.owned_elements(r) as f64;
                let ideal = total as f64 / world as f64;
                assert!(
                    (share - ideal).abs() <= widest as f64,
                    "rank {r} of {world}: {share} vs {ideal}"
                );
            }
        }
    }

    #[test]
    fn a_world_of_zero_is_an_error() {
        assert!(Partition::new(vec![layout("w", &[2, 2])], 0).is_err());
    }
}
