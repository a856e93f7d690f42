//! Validation loss: next-token cross-entropy over a shard in consecutive windows, whole or split
//! between data-parallel ranks.

use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Int, Tensor};
use kiln_bpe::TokenShard;
use kiln_transformer::{Transformer, WeightSource};

use crate::data::to_tensors;
use crate::error::Result;
use crate::sampler::{BatchSampler, DataRank};

/// Mean next-token cross-entropy of `model` over `shard` in consecutive windows of `seq + 1`,
/// `rows` windows per batch (the first `max_batches` batches, or the whole shard when 0).
pub fn evaluate<B: Backend>(
    model: &Transformer<B>,
    shard: &TokenShard,
    rows: usize,
    seq: usize,
    max_batches: usize,
    device: &B::Device,
) -> Result<f64> {
    let (total, tokens) = evaluate_share(
        model,
        shard,
        rows,
        seq,
        max_batches,
        DataRank::single(),
        None,
        device,
    )?;
    Ok(total / tokens.max(1) as f64)
}

/// `rank`'s share of [`evaluate`]: the summed cross-entropy over its windows of the first
/// `max_batches` global batches (all when 0), and the number of tokens it predicted. Global batches
/// are `world_size · rows` windows split as in training
/// ([`BatchSampler::sequential_windows`]), so summing both numbers over the ranks and dividing
/// gives the loss that one process with `world_size · rows` windows per batch computes. Module
/// weights come from `source` when given (a ZeRO-3 rank gathering its shards).
#[allow(clippy::too_many_arguments)]
pub fn evaluate_share<B: Backend>(
    model: &Transformer<B>,
    shard: &TokenShard,
    rows: usize,
    seq: usize,
    max_batches: usize,
    rank: DataRank,
    source: Option<&dyn WeightSource<B>>,
    device: &B::Device,
) -> Result<(f64, usize)> {
    let sampler = BatchSampler::new(shard, rows, seq, 0, rank)?;
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let (mut total, mut count) = (0.0f64, 0usize);
    let mut windows = sampler.sequential_windows();
    for i in 0..sampler.num_sequential_batches() {
        if max_batches > 0 && i >= max_batches {
            break;
        }
        let Some(window) = windows.next() else {
            // A later rank has no rows in the last, partial batch. A weight source that gathers
            // across the ranks needs every rank in every forward pass: run an idle one.
            match source {
                Some(source) => {
                    let idle = Tensor::<B, 2, Int>::zeros([1, 1], device);
                    model.forward_with(idle, source)?;
                    continue;
                }
                None => break,
            }
        };
        let window = window?;
        let n = window.len() / (seq + 1);
        let (inputs, targets) = to_tensors::<B>(&window, n, seq, device);
        let logits = match source {
            Some(source) => model.forward_with(inputs, source)?,
            None => model.forward(inputs)?,
        };
        let v = model.config().vocab_size;
        let loss: Tensor<B, 1> = loss_fn.forward(logits.reshape([n * seq, v]), targets);
        total += loss.into_scalar().elem::<f64>() * (n * seq) as f64;
        count += n * seq;
    }
    Ok((total, count))
}
