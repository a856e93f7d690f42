//! Training batches: `(batch, seq + 1)` windows from the memory-mapped token shard, a pure function
//! of `(seed, step, micro-step)` and the data-parallel rank ([`crate::sampler`]), produced ahead of
//! time on a background thread so the model never waits for input.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use kiln_bpe::TokenShard;

use crate::error::{Result, TrainError};
use crate::sampler::{BatchSampler, DataRank, SamplerError};

/// Batches prepared ahead of the training loop.
const PREFETCH: usize = 4;

/// One micro-batch of token windows.
#[derive(Debug)]
pub struct Batch {
    /// Optimizer step it belongs to.
    pub step: u64,
    /// Micro-step within the step.
    pub micro: usize,
    /// `rows × (seq + 1)` token ids, row-major.
    pub tokens: Vec<u32>,
}

type Message = std::result::Result<Batch, SamplerError>;

/// A background thread sampling batches for steps `from..` in order.
pub struct Prefetcher {
    rx: Option<Receiver<Message>>,
    handle: Option<JoinHandle<()>>,
}

impl Prefetcher {
    /// Starts sampling `grad_accum` micro-batches of `rows` rows per step from step `from`, the
    /// share of `rank` (micro-step `m` of step `s` is sampler batch `s·grad_accum + m`).
    pub fn start(
        shard: Arc<TokenShard>,
        rows: usize,
        seq: usize,
        seed: u64,
        grad_accum: usize,
        from: u64,
        rank: DataRank,
    ) -> Result<Self> {
        let sampler = BatchSampler::new(shard, rows, seq, seed, rank)?;
        let (tx, rx): (SyncSender<Message>, Receiver<Message>) = sync_channel(PREFETCH);
        let handle = std::thread::Builder::new()
            .name("kiln-data".into())
            .spawn(move || {
                for step in from.. {
                    for micro in 0..grad_accum {
                        let batch =
                            sampler
                                .batch(step * grad_accum as u64 + micro as u64)
                                .map(|tokens| Batch {
                                    step,
                                    micro,
                                    tokens,
                                });
                        let failed = batch.is_err();
                        if tx.send(batch).is_err() || failed {
                            return;
                        }
                    }
                }
            })
            .map_err(|_| TrainError::DataThreadStopped)?;
        Ok(Self {
            rx: Some(rx),
            handle: Some(handle),
        })
    }

    /// The next batch (blocks until the background thread has it); fails with
    /// [`TrainError::DataThreadStopped`] once the thread is gone.
    pub fn next(&self) -> Result<Batch> {
        let rx = self.rx.as_ref().ok_or(TrainError::DataThreadStopped)?;
        Ok(rx.recv().map_err(|_| TrainError::DataThreadStopped)??)
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        // Closing the channel ends the thread at its next send.
        self.rx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Splits `rows × (seq + 1)` windows into inputs `[rows, seq]` and next-token targets `[rows·seq]`.
pub fn to_tensors<B: Backend>(
    tokens: &[u32],
    rows: usize,
    seq: usize,
    device: &B::Device,
) -> (Tensor<B, 2, Int>, Tensor<B, 1, Int>) {
    let mut inputs = Vec::with_capacity(rows * seq);
    let mut targets = Vec::with_capacity(rows * seq);
    for row in tokens.chunks_exact(seq + 1) {
        inputs.extend(row[..seq].iter().map(|&t| i64::from(t)));
        targets.extend(row[1..].iter().map(|&t| i64::from(t)));
    }
    (
        Tensor::from_data(TensorData::new(inputs, [rows, seq]), device),
        Tensor::from_data(TensorData::new(targets, [rows * seq]), device),
    )
}
