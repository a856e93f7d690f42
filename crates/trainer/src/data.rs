//! Training batches: `(batch, seq + 1)` windows from the memory-mapped token shard, a pure function
//! of `(seed, step, micro-step)`, produced ahead of time on a background thread so the model never
//! waits for input.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use kiln_bpe::{BatchSampler, TokenShard};

use crate::error::Result;

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

/// A background thread sampling batches for steps `from..` in order.
pub struct Prefetcher {
    rx: Option<Receiver<Batch>>,
    handle: Option<JoinHandle<()>>,
}

impl Prefetcher {
    /// Starts sampling `grad_accum` micro-batches per step from step `from`.
    pub fn start(
        shard: Arc<TokenShard>,
        rows: usize,
        seq: usize,
        seed: u64,
        grad_accum: usize,
        from: u64,
    ) -> Result<Self> {
        let sampler = BatchSampler::new(shard, rows, seq, seed)?;
        let (tx, rx): (SyncSender<Batch>, Receiver<Batch>) = sync_channel(PREFETCH);
        let handle = std::thread::Builder::new()
            .name("kiln-data".into())
            .spawn(move || {
                for step in from.. {
                    for micro in 0..grad_accum {
                        let tokens = sampler.batch(step * grad_accum as u64 + micro as u64);
                        if tx
                            .send(Batch {
                                step,
                                micro,
                                tokens,
                            })
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            })
            .ok();
        Ok(Self {
            rx: Some(rx),
            handle,
        })
    }

    /// The next batch (blocks until the background thread has it).
    pub fn next(&self) -> Option<Batch> {
        self.rx.as_ref()?.recv().ok()
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
