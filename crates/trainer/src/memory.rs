//! The pre-flight memory check: an estimate of what a run needs, compared with what the machine
//! has, so a run that cannot fit fails before it starts, with settings that would fit.
//!
//! The estimate counts the f32 master weights, their gradients (and the accumulator with
//! `grad_accum > 1`), AdamW's two moments, the bf16/f16 compute copy when mixed precision is on,
//! and the activations autodiff keeps for one micro-batch: per layer, a multiple of
//! `micro_batch·seq_len·d_model` and `micro_batch·seq_len·d_ff`, the attention scores
//! `micro_batch·heads·seq_len²`, and the vocabulary logits with their f32 loss intermediates. The
//! coefficients were fitted to peak RSS on Flex (docs/trainer.md, "Memory").

use kiln_transformer::ModelConfig;

use crate::config::{Precision, TrainConfig};
use crate::error::{Result, TrainError};

/// Bytes in a GB (10⁹: what `max_memory_gb` and the messages use).
pub const GB: f64 = 1e9;

/// Fixed cost of the process: runtime, thread pools, the data pipeline.
const BASE_BYTES: f64 = 32e6;
/// Activation values kept per token and layer, in units of `d_model` (norms, attention inputs
/// and outputs, residuals, dropout masks).
const PER_TOKEN_WIDTH: f64 = 14.0;
/// Activation values kept per token and layer, in units of `d_ff` (MLP pre- and post-activation).
const PER_TOKEN_FF: f64 = 3.5;
/// Values kept per attention score (`heads·seq_len²` per row): scores, softmax, its gradient.
const PER_SCORE: f64 = 2.5;
/// f32 values kept per logit (logits, log-softmax, their gradient, the cast copy).
const PER_LOGIT: f64 = 4.0;
/// Share of per-layer activations balanced checkpointing keeps (the rest is recomputed).
const CHECKPOINTED_SHARE: f64 = 0.7;

/// What a training run needs, in bytes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MemoryEstimate {
    /// Master weights, gradients, gradient accumulator, AdamW moments, compute copy: independent of
    /// the batch.
    pub model_state: f64,
    /// Activations for one micro-batch (the backward pass holds one at a time).
    pub activations: f64,
    /// Everything, with the process's fixed cost.
    pub total: f64,
}

/// Estimates the memory `config` needs for `model` in one process.
pub fn estimate(model: &ModelConfig, config: &TrainConfig) -> MemoryEstimate {
    estimate_for(model, config, 1)
}

/// Estimates the memory one of `world_size` data-parallel ranks needs (with `config.zero_stage`).
pub fn estimate_for(
    model: &ModelConfig,
    config: &TrainConfig,
    world_size: usize,
) -> MemoryEstimate {
    estimate_with(
        model,
        config,
        config.micro_batch,
        config.seq_len,
        config.activation_checkpointing,
        world_size,
    )
}

/// Model-state bytes per parameter on one of `world` ranks at ZeRO stage `stage`: what the rank
/// keeps, plus what a step holds for a while (ZeRO-3's gathered parameters, the full gradients
/// Burn's backward pass returns before they are reduce-scattered, the accumulator).
///
/// One process or plain data parallel: f32 weights, gradients and two moments (16 bytes), plus
/// the bf16/f16 compute copy and its gradients under mixed precision. ZeRO keeps a low-precision
/// working copy under mixed precision and the f32 master weights with the moments in the sharded
/// optimizer state, as the ZeRO paper counts (2 + 2 + 12 bytes).
pub fn model_state_bytes_per_param(config: &TrainConfig, stage: u8, world: usize) -> f64 {
    let n = world.max(1) as f64;
    let stage = if world > 1 { stage } else { 0 };
    let low = config.precision != Precision::F32;
    let accumulator = if config.grad_accum > 1 { 4.0 } else { 0.0 };
    if stage == 0 {
        let copy = if low { 4.0 } else { 0.0 };
        return 4.0 + 4.0 + 8.0 + accumulator + copy;
    }
    let (param, grad, optim) = if low {
        (2.0, 2.0, 12.0)
    } else {
        (4.0, 4.0, 8.0)
    };
    let params = if stage >= 3 { param / n + param } else { param };
    let grads = if stage >= 2 { grad / n + grad } else { grad };
    params + grads + optim / n + accumulator
}

fn estimate_with(
    model: &ModelConfig,
    config: &TrainConfig,
    micro_batch: usize,
    seq_len: usize,
    checkpointing: bool,
    world: usize,
) -> MemoryEstimate {
    let p = model.num_params() as f64;
    let low = config.precision != Precision::F32;
    let model_state = p * model_state_bytes_per_param(config, config.zero_stage, world);

    let act_bytes = if low { 2.0 } else { 4.0 };
    let tokens = (micro_batch * seq_len) as f64;
    let per_layer = tokens
        * (PER_TOKEN_WIDTH * model.d_model as f64 + PER_TOKEN_FF * model.d_ff as f64)
        + PER_SCORE * (micro_batch * model.n_heads * seq_len * seq_len) as f64;
    let share = if checkpointing {
        CHECKPOINTED_SHARE
    } else {
        1.0
    };
    let layers = per_layer * model.n_layers as f64 * act_bytes * share;
    let logits = tokens * model.vocab_size as f64 * (PER_LOGIT * 4.0 + act_bytes);
    let activations = layers + logits;
    MemoryEstimate {
        model_state,
        activations,
        total: BASE_BYTES + model_state + activations,
    }
}

/// The memory available to the run: `max_memory_gb` if set, else (on a CPU backend) the host's
/// `MemAvailable`; `None` when unknown (the check is skipped).
pub fn available_bytes(config: &TrainConfig, host_memory: bool) -> Option<f64> {
    match config.max_memory_gb {
        Some(gb) => Some(gb * GB),
        None if host_memory => mem_available(),
        None => None,
    }
}

/// `MemAvailable` from `/proc/meminfo`, in bytes (Linux).
pub fn mem_available() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_available(&text)
}

fn parse_mem_available(meminfo: &str) -> Option<f64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024.0)
}

/// Settings that would fit in the budget, keeping tokens per optimizer step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Suggestions {
    /// The largest `micro_batch` dividing `micro_batch·grad_accum` that fits, with the
    /// `grad_accum` that keeps the tokens per step.
    pub micro_batch: Option<(usize, usize)>,
    /// Whether `activation_checkpointing = true` (at the current micro-batch) would fit.
    pub checkpointing_fits: bool,
    /// The longest `seq_len` that fits at the current micro-batch (if shorter than now).
    pub seq_len: Option<usize>,
}

/// What would fit in `budget` bytes.
pub fn suggest(
    model: &ModelConfig,
    config: &TrainConfig,
    budget: f64,
    world: usize,
) -> Suggestions {
    let fits = |b: usize, s: usize, ckpt: bool| {
        estimate_with(model, config, b, s, ckpt, world).total <= budget
    };
    let ckpt = config.activation_checkpointing;
    let rows = config.micro_batch * config.grad_accum;
    let micro_batch = (1..config.micro_batch)
        .rev()
        .filter(|b| rows.is_multiple_of(*b))
        .find(|&b| fits(b, config.seq_len, ckpt))
        .map(|b| (b, rows / b));
    let checkpointing_fits = !ckpt && fits(config.micro_batch, config.seq_len, true);
    let seq_len = (1..config.seq_len)
        .rev()
        .find(|&s| fits(config.micro_batch, s, ckpt));
    Suggestions {
        micro_batch,
        checkpointing_fits,
        seq_len,
    }
}

/// Fails with [`TrainError::OutOfMemory`] when `config` is estimated not to fit in `available`
/// bytes.
pub fn check_fits(
    model: &ModelConfig,
    config: &TrainConfig,
    available: f64,
    world: usize,
) -> Result<()> {
    let need = estimate_for(model, config, world);
    if need.total <= available {
        return Ok(());
    }
    let s = suggest(model, config, available, world);
    let mut advice = Vec::new();
    let mut zero3 = config.clone();
    zero3.zero_stage = 3;
    if world > 1 && config.zero_stage < 3 && estimate_for(model, &zero3, world).total <= available {
        advice.push(format!(
            "zero_stage = 3 (shards the parameters, gradients and optimizer state over the {world} ranks)"
        ));
    }
    if let Some((b, a)) = s.micro_batch {
        advice.push(format!(
            "micro_batch = {b} with grad_accum = {a} (the same {} tokens per step)",
            config.micro_batch * config.grad_accum * config.seq_len
        ));
    }
    if s.checkpointing_fits {
        advice.push("activation_checkpointing = true".into());
    }
    if let Some(seq) = s.seq_len {
        advice.push(format!("seq_len = {seq}"));
    }
    if advice.is_empty() {
        advice.push(if need.model_state + BASE_BYTES > available {
            "a smaller model, or data-parallel ranks with zero_stage = 3 (`kiln train --nproc N`): its weights, gradients and AdamW state alone do not fit".into()
        } else {
            "micro_batch = 1 with activation_checkpointing = true and a shorter seq_len".into()
        });
    }
    Err(TrainError::OutOfMemory {
        needed_gb: need.total / GB,
        available_gb: available / GB,
        model_state_gb: need.model_state / GB,
        activations_gb: need.activations / GB,
        suggestions: advice.join("; or "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn big() -> (ModelConfig, TrainConfig) {
        let model = ModelConfig::shakespeare_char(65);
        let config = TrainConfig {
            micro_batch: 64,
            seq_len: 256,
            grad_accum: 1,
            ..TrainConfig::default()
        };
        (model, config)
    }

    #[test]
    fn estimate_adds_up() {
        let (model, config) = big();
        let e = estimate(&model, &config);
        let p = model.num_params() as f64;
        assert_eq!(e.model_state, 16.0 * p);
        assert!((e.total - (BASE_BYTES + e.model_state + e.activations)).abs() < 1.0);
        // Activations are linear in the micro-batch.
        let half = estimate(
            &model,
            &TrainConfig {
                micro_batch: 32,
                ..config.clone()
            },
        );
        assert!((e.activations - 2.0 * half.activations).abs() < 1e-6 * e.activations);
        // Accumulation adds an f32 gradient copy, bf16 a weight and gradient copy but halves
        // activations, checkpointing keeps less.
        let acc = estimate(
            &model,
            &TrainConfig {
                grad_accum: 4,
                ..config.clone()
            },
        );
        assert_eq!(acc.model_state, 20.0 * p);
        let bf16 = estimate(
            &model,
            &TrainConfig {
                precision: Precision::Bf16,
                ..config.clone()
            },
        );
        assert_eq!(bf16.model_state, 20.0 * p);
        assert!(bf16.activations < 0.75 * e.activations);
        let ckpt = estimate(
            &model,
            &TrainConfig {
                activation_checkpointing: true,
                ..config
            },
        );
        assert!(ckpt.activations < e.activations);
    }

    #[test]
    fn a_config_that_does_not_fit_gets_settings_that_do() {
        let (model, config) = big();
        let need = estimate(&model, &config).total;
        // A budget of 40% of the need: micro-batch 64 must shrink.
        let budget = 0.4 * need;
        let err = check_fits(&model, &config, budget, 1).unwrap_err();
        let TrainError::OutOfMemory {
            needed_gb,
            available_gb,
            ref suggestions,
            ..
        } = err
        else {
            panic!("{err}");
        };
        assert!((needed_gb - need / GB).abs() < 1e-9 && (available_gb - budget / GB).abs() < 1e-9);
        let s = suggest(&model, &config, budget, 1);
        let (b, a) = s.micro_batch.unwrap();
        // Same tokens per step, the largest divisor that fits, and the next larger one does not.
        assert_eq!(b * a, 64);
        let at = |b| {
            estimate(
                &model,
                &TrainConfig {
                    micro_batch: b,
                    ..config.clone()
                },
            )
            .total
        };
        assert!(at(b) <= budget && at(2 * b) > budget, "{b}");
        assert!(suggestions.contains(&format!("micro_batch = {b} with grad_accum = {a}")));
        let seq = s.seq_len.unwrap();
        let with_seq = |s| {
            estimate(
                &model,
                &TrainConfig {
                    seq_len: s,
                    ..config.clone()
                },
            )
            .total
        };
        assert!(with_seq(seq) <= budget && with_seq(seq + 1) > budget);
        assert!(suggestions.contains(&format!("seq_len = {seq}")));
        let text = err.to_string();
        assert!(
            text.contains("GB") && text.contains("micro_batch"),
            "{text}"
        );
        // It fits in its own estimate.
        assert!(check_fits(&model, &config, need, 1).is_ok());
        // Not even the weights fit: say so.
        let tiny = check_fits(&model, &config, 1e6, 1).unwrap_err().to_string();
        assert!(tiny.contains("smaller model"), "{tiny}");
    }

    #[test]
    fn reads_mem_available() {
        let text = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   2000000 kB\n";
        assert_eq!(parse_mem_available(text), Some(2_048_000_000.0));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn zero_stages_shrink_the_model_state_per_rank() {
        let mut config = TrainConfig::default();
        let per = |c: &TrainConfig, z: u8, n: usize| model_state_bytes_per_param(c, z, n);
        // f32: 16 bytes replicated; ZeRO shards the moments, then the gradients, then the
        // parameters (plus what a step gathers for a while).
        assert_eq!(per(&config, 0, 4), 16.0);
        assert_eq!(per(&config, 1, 4), 4.0 + 4.0 + 2.0);
        assert_eq!(per(&config, 2, 4), 4.0 + 1.0 + 4.0 + 2.0);
        assert_eq!(per(&config, 3, 4), 1.0 + 4.0 + 1.0 + 4.0 + 2.0);
        // One rank shards nothing.
        assert_eq!(per(&config, 3, 1), 16.0);
        // bf16: the ZeRO paper's 2 + 2 + 12 bytes.
        config.precision = Precision::Bf16;
        assert_eq!(per(&config, 1, 4), 2.0 + 2.0 + 3.0);
        // The check advises ZeRO-3 when it would fit.
        let (model, mut big) = big();
        big.zero_stage = 0;
        let need0 = estimate_for(&model, &big, 8).total;
        let mut z3 = big.clone();
        z3.zero_stage = 3;
        let need3 = estimate_for(&model, &z3, 8).total;
        assert!(need3 < need0);
        let err = check_fits(&model, &big, (need0 + need3) / 2.0, 8)
            .unwrap_err()
            .to_string();
        assert!(err.contains("zero_stage = 3"), "{err}");
    }
}
