//! The KV cache: per layer, keys and values of every sequence in a batch, preallocated and filled
//! in place as tokens arrive.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::attention::LayerKv;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

/// Keys and values for `batch` sequences of up to `capacity` tokens each.
///
/// Row `i` holds sequence `i`; `len(i)` tokens of it are cached. Rows advance independently, so a
/// batch may hold sequences of different lengths (and a row can be [`reset`](Self::reset) and reused
/// for a new sequence while the others continue).
#[derive(Debug)]
pub struct KvCache<B: Backend> {
    pub(crate) layers: Vec<LayerKv<B>>,
    pub(crate) lens: Vec<usize>,
    capacity: usize,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for `batch` rows of up to `capacity` tokens (at most the model's context).
    pub fn new(
        config: &ModelConfig,
        batch: usize,
        capacity: usize,
        device: &B::Device,
    ) -> Result<Self> {
        if batch == 0 || capacity == 0 {
            return Err(ModelError::InvalidArgument(
                "a KV cache needs at least one row and one slot".into(),
            ));
        }
        if capacity > config.context_length {
            return Err(ModelError::ContextOverflow {
                needed: capacity,
                limit: config.context_length,
            });
        }
        let shape = [batch, config.n_kv_heads, capacity, config.head_dim()];
        let layers = (0..config.n_layers)
            .map(|_| LayerKv {
                k: Some(Tensor::zeros(shape, device)),
                v: Some(Tensor::zeros(shape, device)),
            })
            .collect();
        Ok(Self {
            layers,
            lens: vec![0; batch],
            capacity,
        })
    }

    /// Number of rows.
    pub fn batch_size(&self) -> usize {
        self.lens.len()
    }

    /// Tokens each row can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Tokens cached for each row.
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }

    /// Forgets row `row`'s tokens so the row can start a new sequence.
    pub fn reset(&mut self, row: usize) {
        if let Some(len) = self.lens.get_mut(row) {
            *len = 0;
        }
    }

    /// Keeps only the first `len` tokens of row `row`.
    pub fn truncate(&mut self, row: usize, len: usize) {
        if let Some(l) = self.lens.get_mut(row) {
            *l = (*l).min(len);
        }
    }
}
