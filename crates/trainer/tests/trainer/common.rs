//! What the trainer's integration tests share: a small corpus as byte-level shards and a tiny
//! GPT to train on it.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use kiln_bpe::prepare::{PrepareConfig, prepare_bytes};
use kiln_trainer::{ModelSpec, TrainConfig};
use kiln_transformer::ModelConfig;

/// A byte-level tokenizer and shards of `text` (repeated) in `dir`, and a 2-layer, width-32 GPT
/// with `dropout` that trains 20 steps on them, checkpointing every 10.
pub fn tiny_run(dir: &Path, text: &str, dropout: f64) -> TrainConfig {
    let corpus = dir.join("corpus.txt");
    std::fs::write(&corpus, text.repeat(40)).unwrap();
    let (tok, _) = prepare_bytes(&[corpus], &dir.join("data"), &PrepareConfig::default()).unwrap();
    tok.save(dir.join("tokenizer.json")).unwrap();
    TrainConfig {
        model: ModelSpec::Full(ModelConfig {
            vocab_size: 257,
            context_length: 32,
            n_layers: 2,
            n_heads: 2,
            n_kv_heads: 2,
            d_model: 32,
            d_ff: 64,
            dropout,
            ..ModelConfig::shakespeare_char_cpu(257)
        }),
        data_dir: dir.join("data"),
        tokenizer: Some(dir.join("tokenizer.json")),
        micro_batch: 4,
        seq_len: 16,
        grad_accum: 2,
        max_steps: 20,
        lr: 3e-3,
        min_lr: 3e-4,
        warmup_steps: 4,
        eval_interval: 0,
        checkpoint_interval: 10,
        keep_checkpoints: 2,
        log_interval: 5,
        ..TrainConfig::default()
    }
}

/// One test at a time among those that take this: Burn's CPU random generator is process-wide,
/// so a test drawing weights while another trains would move the other's initialization, dropout
/// and data order, and exact resume is compared bit for bit.
pub fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}
