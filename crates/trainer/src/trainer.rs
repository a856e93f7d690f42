//! The training loop: data → forward → cross-entropy → backward → clip → AdamW, with evaluation,
//! logging, checkpoints, exact resume, and recovery from non-finite steps.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, FloatDType, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use kiln_bpe::{BatchSampler, TokenShard, Tokenizer};
use kiln_transformer::{ModelConfig, Transformer};
use serde_json::json;

use crate::checkpoint::{self, TrainerState};
use crate::config::TrainConfig;
use crate::data::{Prefetcher, to_tensors};
use crate::error::{Result, TrainError};
use crate::memory;
use crate::optimizer::{GroupedAdamW, scale_grads};
use crate::precision::{LossScaler, ScaleUpdate, compute_copy, materialize};
use crate::schedule::learning_rate;

/// What one optimizer step did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    /// The step's index.
    pub step: u64,
    /// Mean training loss over the step's micro-batches.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Whether the update was applied (false when the loss or gradient was not finite).
    pub applied: bool,
    /// The loss scale the step ran with (1 unless f16).
    pub loss_scale: f64,
}

/// A training run in a run directory.
pub struct Trainer<B: AutodiffBackend> {
    config: TrainConfig,
    model_config: ModelConfig,
    model: Option<Transformer<B>>,
    optimizer: Option<GroupedAdamW<B, Transformer<B>>>,
    state: TrainerState,
    run_dir: PathBuf,
    device: B::Device,
    train: Arc<TokenShard>,
    val: Arc<TokenShard>,
    tokenizer: Option<Tokenizer>,
    prefetch: Option<Prefetcher>,
    bad_steps: u32,
    poison_next: bool,
    show_progress: bool,
}

fn open_shards(config: &TrainConfig) -> Result<(Arc<TokenShard>, Arc<TokenShard>)> {
    let train = TokenShard::open(config.data_dir.join("train.bin"))?;
    let val = TokenShard::open(config.data_dir.join("val.bin"))?;
    Ok((Arc::new(train), Arc::new(val)))
}

/// The tokenizer a config names and the model structure it resolves to.
fn resolve(config: &TrainConfig) -> Result<(Option<Tokenizer>, ModelConfig)> {
    let tokenizer = config
        .tokenizer
        .as_ref()
        .map(Tokenizer::from_file)
        .transpose()?;
    let model_config = config
        .model
        .resolve(tokenizer.as_ref().map(Tokenizer::vocab_size))?;
    Ok((tokenizer, model_config))
}

/// AdamW with the config's hyper-parameters and parameter groups for `model`.
fn optimizer_for<B: AutodiffBackend>(
    model: &Transformer<B>,
    c: &TrainConfig,
) -> GroupedAdamW<B, Transformer<B>> {
    GroupedAdamW::new(model, c.beta1, c.beta2, c.eps, c.weight_decay)
        .with_embedding_decay(model, c.decay_embeddings)
}

impl<B: AutodiffBackend> Trainer<B> {
    /// Starts a new run in `run_dir` (created if needed).
    pub fn new(
        mut config: TrainConfig,
        run_dir: impl AsRef<Path>,
        device: B::Device,
    ) -> Result<Self> {
        let run_dir = run_dir.as_ref().to_owned();
        if config.tokenizer.is_none() {
            // `kiln data prepare` leaves the shards' tokenizer beside them.
            let beside = config.data_dir.join("tokenizer.json");
            config.tokenizer = beside.exists().then_some(beside);
        }
        let (tokenizer, model_config) = resolve(&config)?;
        config.validate(&model_config)?;
        let backend = B::name(&device);
        // CPU backends share the host's memory; elsewhere only an explicit budget is checked.
        let host_memory = backend.contains("flex") || backend.contains("ndarray");
        if let Some(available) = memory::available_bytes(&config, host_memory) {
            memory::check_fits(&model_config, &config, available)?;
        }
        let shards = open_shards(&config)?;
        std::fs::create_dir_all(&run_dir).map_err(|e| TrainError::io(&run_dir, e))?;
        let path = run_dir.join("config.toml");
        std::fs::write(&path, config.to_toml()).map_err(|e| TrainError::io(&path, e))?;
        B::seed(&device, config.seed);
        let model = model_config.init::<B>(&device)?;
        // Draw the initial weights now, from `seed` (Burn initializes parameters lazily).
        materialize(&model);
        let optimizer = optimizer_for(&model, &config);
        let state = TrainerState {
            step: 0,
            lr_scale: 1.0,
            tokens_seen: 0,
            val_loss: None,
            loss_scaler: LossScaler::for_precision(
                config.precision,
                config.loss_scale_growth_interval,
            ),
            config,
        };
        Ok(Self::assemble(
            state,
            model_config,
            model,
            optimizer,
            run_dir,
            device,
            shards,
            tokenizer,
        ))
    }

    /// Continues the run in `run_dir` from its newest checkpoint, optionally to a new `max_steps`.
    pub fn resume(
        run_dir: impl AsRef<Path>,
        max_steps: Option<u64>,
        device: B::Device,
    ) -> Result<Self> {
        let run_dir = run_dir.as_ref().to_owned();
        let (_, dir) = checkpoint::list_checkpoints(&run_dir)
            .pop()
            .ok_or_else(|| TrainError::Checkpoint {
                path: checkpoint::checkpoints_dir(&run_dir),
                reason: "no completed checkpoint to resume from".into(),
            })?;
        let mut state = checkpoint::load_state(&dir)?;
        if let Some(m) = max_steps {
            state.config.max_steps = m;
        }
        let (tokenizer, model_config) = resolve(&state.config)?;
        let shards = open_shards(&state.config)?;
        let model = checkpoint::load_model_state(&dir, model_config.init::<B>(&device)?, &device)?;
        let optimizer =
            checkpoint::load_optimizer_state(&dir, optimizer_for(&model, &state.config), &device)?;
        Ok(Self::assemble(
            state,
            model_config,
            model,
            optimizer,
            run_dir,
            device,
            shards,
            tokenizer,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        state: TrainerState,
        model_config: ModelConfig,
        model: Transformer<B>,
        optimizer: GroupedAdamW<B, Transformer<B>>,
        run_dir: PathBuf,
        device: B::Device,
        (train, val): (Arc<TokenShard>, Arc<TokenShard>),
        tokenizer: Option<Tokenizer>,
    ) -> Self {
        Self {
            config: state.config.clone(),
            model_config,
            model: Some(model),
            optimizer: Some(optimizer),
            state,
            run_dir,
            device,
            train,
            val,
            tokenizer,
            prefetch: None,
            bad_steps: 0,
            poison_next: false,
            show_progress: false,
        }
    }

    /// Draw a progress bar on stderr while training.
    pub fn with_progress(mut self, show: bool) -> Self {
        self.show_progress = show;
        self
    }

    /// The run's configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// The model's structure.
    pub fn model_config(&self) -> &ModelConfig {
        &self.model_config
    }

    /// The trainer's state (step, LR scale, tokens seen, last validation loss).
    pub fn state(&self) -> &TrainerState {
        &self.state
    }

    /// The model being trained.
    pub fn model(&self) -> Option<&Transformer<B>> {
        self.model.as_ref()
    }

    /// Makes the next step's loss NaN: exercises the non-finite-step recovery (tests, drills).
    pub fn poison_next_step(&mut self) {
        self.poison_next = true;
    }

    fn metrics(&self, line: serde_json::Value) -> Result<()> {
        let path = self.run_dir.join("metrics.jsonl");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| TrainError::io(&path, e))?;
        writeln!(f, "{line}").map_err(|e| TrainError::io(&path, e))
    }

    /// Runs one optimizer step (`grad_accum` micro-batches).
    pub fn step(&mut self) -> Result<StepReport> {
        let c = &self.config;
        let (rows, seq, accum) = (c.micro_batch, c.seq_len, c.grad_accum);
        let step = self.state.step;
        if self.prefetch.is_none() {
            self.prefetch = Some(Prefetcher::start(
                self.train.clone(),
                rows,
                seq,
                c.seed,
                accum,
                step,
            )?);
        }
        let lr = learning_rate(step, c.lr, c.min_lr, c.warmup_steps, c.decay_steps())
            * self.state.lr_scale;
        // Dropout masks are a function of (seed, step): resumed runs replay them exactly.
        B::seed(
            &self.device,
            c.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ step,
        );
        let model = self
            .model
            .take()
            .ok_or_else(|| TrainError::Config("trainer lost its model".into()))?;
        let loss_fn = CrossEntropyLossConfig::new().init(&self.device);
        let compute = c.precision.compute_dtype();
        let loss_scale = self.state.loss_scaler.scale();
        let mut accumulator = GradientsAccumulator::<Transformer<B>>::new();
        let mut loss_sum = 0.0;
        let poison = std::mem::take(&mut self.poison_next);
        for _ in 0..accum {
            let batch = self
                .prefetch
                .as_ref()
                .and_then(Prefetcher::next)
                .ok_or_else(|| TrainError::Config("the data thread stopped".into()))?;
            debug_assert_eq!(batch.step, step);
            let (inputs, targets) = to_tensors::<B>(&batch.tokens, rows, seq, &self.device);
            // Mixed precision: forward and backward on a bf16/f16 copy whose casts lead back to the
            // f32 master weights; the loss itself is computed in f32.
            let logits = match compute {
                None => model.forward(inputs),
                Some(dtype) => compute_copy(&model, dtype)
                    .forward(inputs)
                    .map(|l| l.cast(FloatDType::F32)),
            };
            let logits = match logits {
                Ok(l) => l,
                Err(e) => {
                    self.model = Some(model);
                    return Err(e.into());
                }
            };
            let v = self.model_config.vocab_size;
            let mut loss = loss_fn.forward(logits.reshape([rows * seq, v]), targets);
            if poison {
                loss = loss.mul_scalar(f32::NAN);
            }
            let loss = loss.div_scalar(accum as f32);
            loss_sum += loss.clone().into_scalar().elem::<f64>();
            let loss = if loss_scale == 1.0 {
                loss
            } else {
                loss.mul_scalar(loss_scale)
            };
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            accumulator.accumulate(&model, grads);
        }
        let mut grads = accumulator.grads();
        if loss_scale != 1.0 {
            scale_grads(&model, &mut grads, 1.0 / loss_scale);
        }
        let grad_norm = GroupedAdamW::<B, Transformer<B>>::clip(&model, &mut grads, c.grad_clip);
        let finite = loss_sum.is_finite() && grad_norm.is_finite();
        let report = StepReport {
            step,
            loss: loss_sum,
            grad_norm,
            lr,
            applied: finite,
            loss_scale,
        };
        self.state.step += 1;
        self.state.tokens_seen += (rows * seq * accum) as u64;
        let scale_update = self.state.loss_scaler.update(grad_norm.is_finite());
        if finite {
            self.bad_steps = 0;
            let optimizer = self
                .optimizer
                .as_mut()
                .ok_or_else(|| TrainError::Config("trainer lost its optimizer".into()))?;
            self.model = Some(optimizer.step(lr, model, grads));
            if let ScaleUpdate::Grew(to) = scale_update {
                self.metrics(json!({"step": step, "loss_scale": to,
                    "reason": "clean steps: loss scale doubled"}))?;
            }
        } else {
            self.model = Some(model);
            // An f16 overflow (finite loss, non-finite gradients at a scale above 1) is routine
            // for dynamic loss scaling: the scale backs off and the step does not count as bad.
            let overflow = loss_sum.is_finite() && loss_scale > 1.0;
            let reason = match scale_update {
                ScaleUpdate::BackedOff(to) => format!(
                    "non-finite {} with loss scale {loss_scale}: step skipped, loss scale -> {to}",
                    if loss_sum.is_finite() {
                        "gradient norm"
                    } else {
                        "loss"
                    }
                ),
                _ if !loss_sum.is_finite() => "non-finite loss: step skipped".into(),
                _ => "non-finite gradient norm: step skipped".into(),
            };
            self.metrics(json!({"step": step, "skipped": true, "loss": loss_sum,
                "grad_norm": grad_norm, "loss_scale": self.state.loss_scaler.scale(),
                "reason": reason}))?;
            if !overflow {
                self.bad_steps += 1;
                if self.bad_steps >= self.config.max_bad_steps.max(1) {
                    self.recover(step)?;
                }
            }
        }
        Ok(report)
    }

    /// After too many bad steps in a row: reload the newest checkpoint and halve the learning rate.
    fn recover(&mut self, step: u64) -> Result<()> {
        self.bad_steps = 0;
        let scale = self.state.lr_scale * 0.5;
        if scale < 1e-3 {
            return Err(TrainError::Diverged {
                step,
                reason: "the loss stayed non-finite after repeated learning-rate cuts".into(),
            });
        }
        if let Some((_, dir)) = checkpoint::list_checkpoints(&self.run_dir).pop() {
            let model = checkpoint::load_model_state(
                &dir,
                self.model_config.init::<B>(&self.device)?,
                &self.device,
            )?;
            let optimizer = optimizer_for(&model, &self.config);
            self.optimizer = Some(checkpoint::load_optimizer_state(
                &dir,
                optimizer,
                &self.device,
            )?);
            self.model = Some(model);
        }
        self.state.lr_scale = scale;
        eprintln!(
            "step {step}: {} non-finite steps in a row; reloaded the last checkpoint, learning rate x{scale}",
            self.config.max_bad_steps
        );
        self.metrics(json!({"step": step, "recovered": true, "lr_scale": scale}))
    }

    /// Mean cross-entropy over the validation split (its first `eval_batches` batches if set).
    pub fn evaluate(&self) -> Result<f64> {
        self.evaluate_batches(self.config.eval_batches)
    }

    /// Mean cross-entropy over the whole validation split.
    pub fn evaluate_full(&self) -> Result<f64> {
        self.evaluate_batches(0)
    }

    fn evaluate_batches(&self, max_batches: usize) -> Result<f64> {
        let model = self
            .model
            .as_ref()
            .ok_or_else(|| TrainError::Config("trainer lost its model".into()))?
            .valid();
        evaluate(
            &model,
            &self.val,
            self.config.micro_batch,
            self.config.seq_len,
            max_batches,
            &self.device,
        )
    }

    /// Saves a checkpoint of the current state.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let (Some(model), Some(optimizer)) = (&self.model, &self.optimizer) else {
            return Err(TrainError::Config("trainer lost its model".into()));
        };
        checkpoint::save_checkpoint(
            &self.run_dir,
            model,
            optimizer,
            &self.state,
            self.tokenizer.as_ref(),
            self.config.keep_checkpoints,
        )
    }

    /// Trains to `max_steps`, evaluating and checkpointing on schedule; returns the validation loss
    /// over the whole split at the end.
    pub fn train(&mut self) -> Result<f64> {
        let total = self.config.max_steps;
        let bar = if self.show_progress {
            let bar = ProgressBar::new(total);
            if let Ok(style) =
                ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed} < {eta}]")
            {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_position(self.state.step);
            bar
        } else {
            ProgressBar::hidden()
        };
        let flops_per_token = self.model_config.flops_per_token(self.config.seq_len);
        let mut window = Instant::now();
        let mut window_tokens = 0u64;
        while self.state.step < total {
            let report = self.step()?;
            window_tokens +=
                (self.config.micro_batch * self.config.seq_len * self.config.grad_accum) as u64;
            let step = report.step + 1;
            if self.config.log_interval > 0
                && (step % self.config.log_interval == 0 || step == total)
            {
                let secs = window.elapsed().as_secs_f64().max(1e-9);
                let tps = window_tokens as f64 / secs;
                let mfu = self.config.peak_flops.map(|p| tps * flops_per_token / p);
                let mfu_note = mfu.map_or(String::new(), |m| format!(" MFU {:.1}%", 100.0 * m));
                bar.set_message(format!(
                    "loss {:.4} lr {:.2e} {:.0} tok/s{mfu_note}",
                    report.loss, report.lr, tps
                ));
                self.metrics(json!({"step": report.step, "loss": report.loss, "lr": report.lr, "grad_norm": report.grad_norm,
                    "tokens_per_s": tps, "mfu": mfu, "tokens_seen": self.state.tokens_seen}))?;
                window = Instant::now();
                window_tokens = 0;
            }
            bar.set_position(step);
            let eval_now = self.config.eval_interval > 0
                && step % self.config.eval_interval == 0
                && step < total;
            if eval_now {
                let val = self.evaluate()?;
                self.state.val_loss = Some(val);
                let line = format!("step {step}: val loss {val:.4} (ppl {:.2})", val.exp());
                if bar.is_hidden() {
                    eprintln!("{line}");
                } else {
                    bar.println(line);
                }
                self.metrics(json!({"step": step, "val_loss": val, "val_ppl": val.exp()}))?;
            }
            if self.config.checkpoint_interval > 0
                && step % self.config.checkpoint_interval == 0
                && step < total
            {
                self.save_checkpoint()?;
            }
        }
        bar.finish_and_clear();
        let val = self.evaluate_full()?;
        self.state.val_loss = Some(val);
        self.metrics(json!({"step": self.state.step, "val_loss": val, "val_ppl": val.exp()}))?;
        self.save_checkpoint()?;
        Ok(val)
    }
}

/// Mean next-token cross-entropy of `model` over `shard` in consecutive windows of `seq + 1`
/// (the whole shard when `max_batches` is 0).
pub fn evaluate<B: Backend>(
    model: &Transformer<B>,
    shard: &TokenShard,
    rows: usize,
    seq: usize,
    max_batches: usize,
    device: &B::Device,
) -> Result<f64> {
    let sampler = BatchSampler::new(shard, rows, seq, 0)?;
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let (mut total, mut count) = (0.0f64, 0usize);
    for (i, window) in sampler.sequential_windows().enumerate() {
        if max_batches > 0 && i >= max_batches {
            break;
        }
        let n = window.len() / (seq + 1);
        let (inputs, targets) = to_tensors::<B>(&window, n, seq, device);
        let logits = model.forward(inputs)?;
        let v = model.config().vocab_size;
        let loss: Tensor<B, 1> = loss_fn.forward(logits.reshape([n * seq, v]), targets);
        total += loss.into_scalar().elem::<f64>() * (n * seq) as f64;
        count += n * seq;
    }
    Ok(total / count.max(1) as f64)
}
