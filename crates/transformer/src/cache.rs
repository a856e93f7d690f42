//! The KV cache: per layer, keys and values of every sequence in a batch, filled in place as
//! tokens arrive.
//!
//! Each row (sequence) of each layer is a list of fixed-size blocks of [`BLOCK`] positions (a paged
//! layout, as in vLLM): preallocated for the whole capacity by [`KvCache::new`], or taken when first
//! written and released when the row is reset by [`KvCache::on_demand`] (what a server with many
//! rows of long capacity wants: memory follows the tokens actually cached). A write
//! touches only the blocks of the row it lands in, so its cost grows neither with the cache's
//! capacity nor with the batch — which matters on backends where an in-place write copies the whole
//! destination tensor when anything else still references it (Burn 0.21's Flex `slice_assign`
//! always does: its `to_contiguous()` clones the storage handle before `Arc::make_mut`).
//!
//! A forward pass may run on any subset of the rows ([`Transformer::forward_rows`]), which is what
//! continuous batching needs: sequences join and leave while the others keep their caches.
//!
//! [`Transformer::forward_rows`]: crate::Transformer::forward_rows

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

/// Where a forward pass writes into the KV cache.
pub(crate) struct CacheSlots {
    /// The cache row each batch row continues.
    pub rows: Vec<usize>,
    /// First cache position written, per batch row.
    pub starts: Vec<usize>,
    /// Keys attended to: positions `0..keys_len` of the cache.
    pub keys_len: usize,
}

/// Keys and values for `batch` sequences of up to `capacity` tokens each.
///
/// Row `i` holds sequence `i`; `len(i)` tokens of it are cached. Rows advance independently, so a
/// batch may hold sequences of different lengths, and a row can be [`reset`](Self::reset) and
/// reused for a new sequence while the others continue.
#[derive(Debug)]
pub struct KvCache<B: Backend> {
    pub(crate) layers: Vec<LayerKv<B>>,
    pub(crate) lens: Vec<usize>,
    capacity: usize,
    on_demand: bool,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for `batch` rows of up to `capacity` tokens (at most the model's context), with
    /// every block allocated up front.
    pub fn new(
        config: &ModelConfig,
        batch: usize,
        capacity: usize,
        device: &B::Device,
    ) -> Result<Self> {
        let mut cache = Self::on_demand(config, batch, capacity, device)?;
        cache.on_demand = false;
        for layer in &mut cache.layers {
            for row in layer.k.iter_mut().chain(layer.v.iter_mut()) {
                ensure_blocks(row, capacity, layer.block_shape, &layer.device);
            }
        }
        Ok(cache)
    }

    /// Like [`new`](Self::new), but each row's blocks are allocated as it fills up and freed when it
    /// is [`reset`](Self::reset).
    pub fn on_demand(
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
        let block_shape = [1, config.n_kv_heads, BLOCK, config.head_dim()];
        let layers = (0..config.n_layers)
            .map(|_| LayerKv {
                k: vec![Vec::new(); batch],
                v: vec![Vec::new(); batch],
                block_shape,
                device: device.clone(),
            })
            .collect();
        Ok(Self {
            layers,
            lens: vec![0; batch],
            capacity,
            on_demand: true,
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

    /// Forgets row `row`'s tokens so the row can start a new sequence (and, for an
    /// [`on_demand`](Self::on_demand) cache, releases its memory).
    pub fn reset(&mut self, row: usize) {
        if let Some(len) = self.lens.get_mut(row) {
            *len = 0;
            if !self.on_demand {
                return;
            }
            for layer in &mut self.layers {
                layer.k[row].clear();
                layer.v[row].clear();
            }
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

/// One row's blocks; `None` only while a block is being rewritten.
type Blocks<B> = Vec<Option<Tensor<B, 4>>>;

/// One layer's cached keys and values: per row, blocks of `[1, n_kv_heads, BLOCK, head_dim]`.
#[derive(Debug)]
pub(crate) struct LayerKv<B: Backend> {
    k: Vec<Blocks<B>>,
    v: Vec<Blocks<B>>,
    block_shape: [usize; 4],
    device: B::Device,
}

impl<B: Backend> LayerKv<B> {
    /// Writes the new keys/values (`[rows, n_kv_heads, seq, head_dim]`; row `i` belongs to cache
    /// row `slots.rows[i]`) at each row's start position and returns every selected row's keys and
    /// values up to `slots.keys_len`.
    pub(crate) fn write(
        &mut self,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        slots: &CacheSlots,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        self.store(k, v, slots);
        self.gather(slots)
    }

    /// Writes the new keys/values as [`write`](Self::write) does, returning nothing.
    pub(crate) fn store(&mut self, k: Tensor<B, 4>, v: Tensor<B, 4>, slots: &CacheSlots) {
        let t = k.dims()[2];
        for (i, (&row, &start)) in slots.rows.iter().zip(&slots.starts).enumerate() {
            let (shape, device) = (self.block_shape, &self.device);
            write_row(&mut self.k[row], &k, i, start, t, shape, device);
            write_row(&mut self.v[row], &v, i, start, t, shape, device);
        }
    }

    /// Cache row `row`'s key and value blocks covering positions `0..len` (`[1, n_kv_heads,
    /// BLOCK, head_dim]` each, the last one partly written): the cache itself, not a copy.
    pub(crate) fn blocks(
        &mut self,
        row: usize,
        len: usize,
    ) -> (Vec<Tensor<B, 4>>, Vec<Tensor<B, 4>>) {
        let (shape, device) = (self.block_shape, &self.device);
        let take = |blocks: &mut Blocks<B>| {
            ensure_blocks(blocks, len, shape, device);
            blocks[..len.div_ceil(BLOCK)]
                .iter()
                .flatten()
                .cloned()
                .collect()
        };
        (take(&mut self.k[row]), take(&mut self.v[row]))
    }

    /// Every selected row's keys and values up to `slots.keys_len`, each as one tensor.
    fn gather(&mut self, slots: &CacheSlots) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let gather = |blocks: &mut Vec<Blocks<B>>| {
            let rows: Vec<Tensor<B, 4>> = slots
                .rows
                .iter()
                .map(|&row| {
                    row_keys(
                        &mut blocks[row],
                        slots.keys_len,
                        self.block_shape,
                        &self.device,
                    )
                })
                .collect();
            if rows.len() == 1 {
                rows.into_iter().next().expect("one row")
            } else {
                Tensor::cat(rows, 0)
            }
        };
        (gather(&mut self.k), gather(&mut self.v))
    }
}

/// Makes sure `blocks` covers positions `0..len`, allocating zeroed blocks as needed.
fn ensure_blocks<B: Backend>(
    blocks: &mut Blocks<B>,
    len: usize,
    shape: [usize; 4],
    device: &B::Device,
) {
    while blocks.len() * BLOCK < len {
        blocks.push(Some(Tensor::zeros(shape, device)));
    }
}

/// Writes `new[i, .., 0..t, ..]` at positions `start..start + t` of one row's blocks.
fn write_row<B: Backend>(
    blocks: &mut Blocks<B>,
    new: &Tensor<B, 4>,
    i: usize,
    start: usize,
    t: usize,
    shape: [usize; 4],
    device: &B::Device,
) {
    let [_, kvh, _, d] = new.dims();
    ensure_blocks(blocks, start + t, shape, device);
    let mut pos = start;
    while pos < start + t {
        let index = pos / BLOCK;
        let end = ((index + 1) * BLOCK).min(start + t);
        let part = new
            .clone()
            .slice([i..i + 1, 0..kvh, pos - start..end - start, 0..d]);
        let offset = index * BLOCK;
        if let Some(block) = blocks[index].take() {
            blocks[index] =
                Some(block.slice_assign([0..1, 0..kvh, pos - offset..end - offset, 0..d], part));
        }
        pos = end;
    }
}

/// The first `len` positions of one row, as one `[1, n_kv_heads, len, head_dim]` tensor (positions
/// the row has not written yet are zeros, masked out by the caller).
fn row_keys<B: Backend>(
    blocks: &mut Blocks<B>,
    len: usize,
    shape: [usize; 4],
    device: &B::Device,
) -> Tensor<B, 4> {
    ensure_blocks(blocks, len, shape, device);
    let mut used: Vec<Tensor<B, 4>> = blocks[..len.div_ceil(BLOCK)]
        .iter()
        .flatten()
        .cloned()
        .collect();
    let all = if used.len() == 1 {
        used.pop().expect("one block")
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
