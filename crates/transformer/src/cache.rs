//! The KV cache: per layer, keys and values of every sequence in a batch, preallocated and filled
//! in place as tokens arrive.
//!
//! Each layer's cache is a list of fixed-size blocks of [`BLOCK`] positions (a paged layout, as in
//! vLLM). A write touches only the blocks it lands in, so its cost does not grow with the cache's
//! capacity — which matters on backends where an in-place write copies the whole destination
//! tensor when anything else still references it (Burn 0.21's Flex `slice_assign` always does:
//! its `to_contiguous()` clones the storage handle before `Arc::make_mut`).

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::attention::CacheSlots;
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
        let shape = [batch, config.n_kv_heads, BLOCK, config.head_dim()];
        let blocks = capacity.div_ceil(BLOCK);
        let layers = (0..config.n_layers)
            .map(|_| LayerKv {
                k: (0..blocks)
                    .map(|_| Some(Tensor::zeros(shape, device)))
                    .collect(),
                v: (0..blocks)
                    .map(|_| Some(Tensor::zeros(shape, device)))
                    .collect(),
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

/// Positions per cache block.
pub const BLOCK: usize = 64;

/// One layer's cached keys and values: blocks of `[batch, n_kv_heads, BLOCK, head_dim]`.
#[derive(Debug)]
pub(crate) struct LayerKv<B: Backend> {
    k: Vec<Option<Tensor<B, 4>>>,
    v: Vec<Option<Tensor<B, 4>>>,
}

impl<B: Backend> LayerKv<B> {
    /// Writes the new keys/values (`[batch, n_kv_heads, seq, head_dim]`) at each row's start
    /// position and returns all keys/values up to `slots.keys_len`.
    pub(crate) fn write(
        &mut self,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        slots: &CacheSlots,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [b, _, t, _] = k.dims();
        if slots.uniform {
            write_rows(&mut self.k, &k, 0..b, slots.starts[0], t);
            write_rows(&mut self.v, &v, 0..b, slots.starts[0], t);
        } else {
            for (row, &s) in slots.starts.iter().enumerate() {
                write_rows(&mut self.k, &k, row..row + 1, s, t);
                write_rows(&mut self.v, &v, row..row + 1, s, t);
            }
        }
        (
            gather(&self.k, slots.keys_len),
            gather(&self.v, slots.keys_len),
        )
    }
}

/// Writes `new[rows, .., 0..t, ..]` at positions `start..start + t` of `rows`.
fn write_rows<B: Backend>(
    blocks: &mut [Option<Tensor<B, 4>>],
    new: &Tensor<B, 4>,
    rows: std::ops::Range<usize>,
    start: usize,
    t: usize,
) {
    let [_, kvh, _, d] = new.dims();
    let mut pos = start;
    while pos < start + t {
        let index = pos / BLOCK;
        let end = ((index + 1) * BLOCK).min(start + t);
        let Some(block) = blocks.get_mut(index).and_then(Option::take) else {
            return;
        };
        let part = new
            .clone()
            .slice([rows.clone(), 0..kvh, pos - start..end - start, 0..d]);
        let offset = index * BLOCK;
        blocks[index] = Some(block.slice_assign(
            [rows.clone(), 0..kvh, pos - offset..end - offset, 0..d],
            part,
        ));
        pos = end;
    }
}

/// The first `len` positions of every row, as one tensor.
fn gather<B: Backend>(blocks: &[Option<Tensor<B, 4>>], len: usize) -> Tensor<B, 4> {
    let used: Vec<Tensor<B, 4>> = blocks
        .iter()
        .take(len.div_ceil(BLOCK))
        .flatten()
        .cloned()
        .collect();
    let all = if used.len() == 1 {
        used.into_iter().next().expect("one block")
    } else {
        Tensor::cat(used, 2)
    };
    let [b, kvh, total, d] = all.dims();
    if total == len {
        all
    } else {
        all.slice([0..b, 0..kvh, 0..len, 0..d])
    }
}
