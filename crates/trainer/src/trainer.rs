//! The training loop: data → forward → cross-entropy → backward → gradient synchronization → clip
//! → optimizer update, with evaluation, logging, checkpoints, exact resume, recovery from
//! non-finite steps, and a clean stop on request.
//!
//! A step runs in four phases, each its own method: `forward_backward` over the micro-batches,
//! `synchronize` (the [`GradientSync`] seam, loss unscaling, the global loss and gradient norm),
//! `clip`, and `update` (the [`OptimizerStep`](crate::optimizer::OptimizerStep) seam or the
//! non-finite-step policy, plus bookkeeping).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use burn::module::AutodiffModule;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, FloatDType};
use kiln_bpe::{TokenShard, Tokenizer};
use kiln_kernels::fused::{LinearProducts, Products};
use kiln_transformer::{ModelConfig, Transformer};
use serde_json::json;

use crate::builder::{BoxedOptimizer, TrainerBuilder};
use crate::checkpoint::{self, TrainerState};
use crate::config::{Precision, TrainConfig};
use crate::data::{Prefetcher, to_tensors};
use crate::distill::Teacher;
use crate::error::{Result, TrainError};
use crate::eval::evaluate_share;
use crate::optimizer::{clip_to, grad_square_sum, scale_grads};
use crate::parallel::GradientSync;
use crate::precision::{ScaleUpdate, compute_copy};
use crate::run_loop::{self, TrainingRun};
use crate::schedule::learning_rate;

/// What one optimizer step did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    /// The step's index.
    pub step: u64,
    /// Mean training loss over the step's micro-batches (and ranks).
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

/// How [`Trainer::run`] ended.
#[derive(Clone, Debug, PartialEq)]
pub enum TrainOutcome {
    /// `max_steps` reached.
    Finished {
        /// Validation loss over the whole split.
        val_loss: f64,
    },
    /// The stop flag was raised: the step in progress finished and a checkpoint was written.
    Interrupted {
        /// Optimizer steps completed (the checkpoint's step).
        step: u64,
        /// The checkpoint's directory.
        checkpoint: PathBuf,
    },
}

/// Bytes one rank holds for the model's training state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ModelStateBytes {
    /// The parameters as the rank keeps them between steps (all of them, or its ZeRO-3 shard).
    pub parameters: u64,
    /// The gradients the rank holds from synchronization to the update (all, or its ZeRO-2/3
    /// shard).
    pub gradients: u64,
    /// Optimizer state: AdamW's moments and master weights kept apart from the model.
    pub optimizer: u64,
}

impl ModelStateBytes {
    /// Parameters, gradients and optimizer state together.
    pub fn total(&self) -> u64 {
        self.parameters + self.gradients + self.optimizer
    }
}

/// Bytes of the float parameters of `model` (a Transformer, or any part of one) as stored
/// (their shapes and dtypes).
pub fn parameter_bytes<B: burn::tensor::backend::Backend, M: burn::module::Module<B>>(
    model: &M,
) -> u64 {
    use burn::module::{ModuleVisitor, Param};
    struct Visitor(u64);
    impl<B: burn::tensor::backend::Backend> ModuleVisitor<B> for Visitor {
        fn visit_float<const D: usize>(&mut self, param: &Param<burn::tensor::Tensor<B, D>>) {
            let t = param.val();
            self.0 += (t.shape().num_elements() * t.dtype().size()) as u64;
        }
    }
    let mut v = Visitor(0);
    model.visit(&mut v);
    v.0
}

/// Bytes of the gradients in `grads` of `model`'s parameters.
fn gradient_bytes<B: AutodiffBackend>(model: &Transformer<B>, grads: &GradientsParams) -> u64 {
    use burn::module::{Module, ModuleVisitor, Param};
    struct Visitor<'a>(&'a GradientsParams, u64);
    impl<B: AutodiffBackend> ModuleVisitor<B> for Visitor<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<burn::tensor::Tensor<B, D>>) {
            if let Some(g) = self.0.get::<B::InnerBackend, D>(param.id) {
                self.1 += (g.shape().num_elements() * g.dtype().size()) as u64;
            }
        }
    }
    let mut v = Visitor(grads, 0);
    model.visit(&mut v);
    v.1
}

/// Gradients after synchronization, with the global numbers the step's decisions use.
struct Synced {
    grads: GradientsParams,
    /// Mean loss over micro-batches and ranks.
    loss: f64,
    /// Squared global gradient norm (unscaled).
    square_sum: f64,
}

/// Everything a trainer is made of (see [`TrainerBuilder`]).
pub(crate) struct Parts<B: AutodiffBackend> {
    pub state: TrainerState,
    pub model_config: ModelConfig,
    pub model: Transformer<B>,
    pub optimizer: BoxedOptimizer<B>,
    pub sync: Box<dyn GradientSync<B>>,
    pub run_dir: PathBuf,
    pub device: B::Device,
    pub shards: (Arc<TokenShard>, Arc<TokenShard>),
    pub tokenizer: Option<Tokenizer>,
    pub teacher: Option<Teacher<B>>,
}

/// A training run in a run directory.
pub struct Trainer<B: AutodiffBackend> {
    config: TrainConfig,
    model_config: ModelConfig,
    model: Option<Transformer<B>>,
    optimizer: BoxedOptimizer<B>,
    sync: Box<dyn GradientSync<B>>,
    state: TrainerState,
    run_dir: PathBuf,
    device: B::Device,
    train: Arc<TokenShard>,
    val: Arc<TokenShard>,
    tokenizer: Option<Tokenizer>,
    teacher: Option<Teacher<B>>,
    prefetch: Option<Prefetcher>,
    bad_steps: u32,
    poison_next: bool,
    show_progress: bool,
    stop: Option<Arc<AtomicBool>>,
    gradient_bytes: u64,
}

/// Returns `local`, or an error on every rank when any rank's `local` failed.
fn agree<B: AutodiffBackend, T>(
    sync: &mut dyn GradientSync<B>,
    local: Result<T>,
    what: &str,
) -> Result<T> {
    if sync.world_size() == 1 {
        return local;
    }
    let mut failed = [f64::from(u8::from(local.is_err()))];
    sync.all_reduce_sum(&mut failed)?;
    match local {
        Ok(_) if failed[0] > 0.0 => Err(TrainError::Collective(format!(
            "{} other rank(s) failed to {what}",
            failed[0]
        ))),
        local => local,
    }
}

impl<B: AutodiffBackend> Trainer<B> {
    /// Starts a new run in `run_dir` (created if needed): one process, the default optimizer.
    pub fn new(config: TrainConfig, run_dir: impl AsRef<Path>, device: B::Device) -> Result<Self> {
        TrainerBuilder::new(device).start(config, run_dir)
    }

    /// Continues the run in `run_dir` from its newest checkpoint, optionally to a new `max_steps`.
    pub fn resume(
        run_dir: impl AsRef<Path>,
        max_steps: Option<u64>,
        device: B::Device,
    ) -> Result<Self> {
        TrainerBuilder::new(device).resume(run_dir, max_steps)
    }

    /// A builder, to plug in a [`GradientSync`] or an
    /// [`OptimizerStep`](crate::optimizer::OptimizerStep).
    pub fn builder(device: B::Device) -> TrainerBuilder<B> {
        TrainerBuilder::new(device)
    }

    pub(crate) fn assemble(parts: Parts<B>) -> Self {
        let (train, val) = parts.shards;
        Self {
            config: parts.state.config.clone(),
            model_config: parts.model_config,
            model: Some(parts.model),
            optimizer: parts.optimizer,
            sync: parts.sync,
            state: parts.state,
            run_dir: parts.run_dir,
            device: parts.device,
            train,
            val,
            tokenizer: parts.tokenizer,
            teacher: parts.teacher,
            prefetch: None,
            bad_steps: 0,
            poison_next: false,
            show_progress: false,
            stop: None,
            gradient_bytes: 0,
        }
    }

    /// Draw a progress bar on stderr while training (rank 0 only).
    pub fn with_progress(mut self, show: bool) -> Self {
        self.show_progress = show;
        self
    }

    /// Stop [`run`](Self::run) cleanly once `flag` is set: the step in progress finishes, a
    /// checkpoint is written, and the outcome is [`TrainOutcome::Interrupted`]. With several
    /// ranks, a flag raised on any rank stops all of them at the same step.
    pub fn with_stop_flag(mut self, flag: Arc<AtomicBool>) -> Self {
        self.stop = Some(flag);
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

    /// The run directory.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Makes the next step's loss NaN: exercises the non-finite-step recovery (tests, drills).
    pub fn poison_next_step(&mut self) {
        self.poison_next = true;
    }

    fn is_rank0(&self) -> bool {
        self.sync.rank() == 0
    }

    /// Appends a line to `metrics.jsonl` (rank 0 only).
    fn metrics(&self, line: serde_json::Value) -> Result<()> {
        if !self.is_rank0() {
            return Ok(());
        }
        run_loop::append_metrics(&self.run_dir, &line)
    }

    /// Training tokens per optimizer step, all ranks together.
    fn tokens_per_step(&self) -> u64 {
        let c = &self.config;
        (c.micro_batch * c.seq_len * c.grad_accum * self.sync.world_size()) as u64
    }

    /// Runs one optimizer step (`grad_accum` micro-batches on every rank).
    pub fn step(&mut self) -> Result<StepReport> {
        let step = self.state.step;
        if self.prefetch.is_none() {
            let c = &self.config;
            self.prefetch = Some(Prefetcher::start(
                self.train.clone(),
                c.micro_batch,
                c.seq_len,
                c.seed,
                c.grad_accum,
                step,
                self.sync.data_rank()?,
            )?);
        }
        let c = &self.config;
        let lr = learning_rate(step, c.lr, c.min_lr, c.warmup_steps, c.decay_steps())
            * self.state.lr_scale;
        // Dropout masks are a function of (seed, step, rank): resumed runs replay them exactly.
        let rank_salt = (self.sync.rank() as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
        B::seed(
            &self.device,
            c.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ step ^ rank_salt,
        );
        let model = self.model.take().ok_or(TrainError::ModelUnavailable)?;
        let model = self.optimizer.materialize(model)?;
        let loss_scale = self.state.loss_scaler.scale();
        let poison = std::mem::take(&mut self.poison_next);
        let synced = self
            .forward_backward(&model, step, loss_scale, poison)
            .and_then(|(grads, loss)| self.synchronize(&model, grads, loss, loss_scale));
        let Synced {
            mut grads,
            loss,
            square_sum,
        } = match synced {
            Ok(s) => s,
            Err(e) => {
                self.model = Some(model);
                return Err(e);
            }
        };
        let grad_norm = self.clip(&model, &mut grads, square_sum);
        let report = StepReport {
            step,
            loss,
            grad_norm,
            lr,
            applied: loss.is_finite() && grad_norm.is_finite(),
            loss_scale,
        };
        self.update(model, grads, &report)?;
        Ok(report)
    }

    /// Phase 1: forward and backward over this rank's `grad_accum` micro-batches; returns the
    /// accumulated gradients (times the loss scale) and the mean loss.
    fn forward_backward(
        &self,
        model: &Transformer<B>,
        step: u64,
        loss_scale: f64,
        poison: bool,
    ) -> Result<(GradientsParams, f64)> {
        let c = &self.config;
        let (rows, seq, accum) = (c.micro_batch, c.seq_len, c.grad_accum);
        let prefetch = self
            .prefetch
            .as_ref()
            .ok_or(TrainError::DataThreadStopped)?;
        let loss_fn = CrossEntropyLossConfig::new().init(&self.device);
        let compute = c.precision.compute_dtype();
        let source = self.optimizer.weight_source();
        let products = self.linear_products();
        let mut accumulator = GradientsAccumulator::<Transformer<B>>::new();
        let mut loss_sum = 0.0;
        for _ in 0..accum {
            let batch = prefetch.next()?;
            debug_assert_eq!(batch.step, step);
            let (inputs, targets) = to_tensors::<B>(&batch.tokens, rows, seq, &self.device);
            let teacher_inputs = self.teacher.as_ref().map(|_| inputs.clone());
            // Mixed precision: forward and backward on a bf16/f16 copy whose casts lead back to the
            // f32 master weights, or (bf16 where the backend multiplies in bf16) f32 tensors with
            // bf16 products; the loss itself is computed in f32.
            let forward = |m: &Transformer<B>| match source {
                Some(source) => m.forward_with(inputs, source),
                None => m.forward(inputs),
            };
            let logits = match (products, compute) {
                // bf16 products inside f32 tensors (the backward products keep the precision).
                (Some(products), _) => {
                    let _scope = LinearProducts::enter(products);
                    forward(model)?
                }
                (None, None) => forward(model)?,
                (None, Some(dtype)) => forward(&compute_copy(model, dtype))?.cast(FloatDType::F32),
            };
            let v = self.model_config.vocab_size;
            let hard = loss_fn.forward(logits.clone().reshape([rows * seq, v]), targets);
            let mut loss = match (&self.teacher, teacher_inputs) {
                (Some(teacher), Some(inputs)) => teacher.loss(inputs, logits, hard)?,
                _ => hard,
            };
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
            let grads = GradientsParams::from_grads(loss.backward(), model);
            if let Some(e) = source.and_then(|s| s.take_deferred_error()) {
                return Err(e.into());
            }
            accumulator.accumulate(model, grads);
        }
        Ok((accumulator.grads(), loss_sum))
    }

    /// Phase 2: the [`GradientSync`] seam, then loss unscaling, then the global loss and squared
    /// gradient norm (all-reduced, so every rank makes the same decisions).
    fn synchronize(
        &mut self,
        model: &Transformer<B>,
        grads: GradientsParams,
        local_loss: f64,
        loss_scale: f64,
    ) -> Result<Synced> {
        let mut grads = self.sync.sync(model, grads)?;
        self.gradient_bytes = gradient_bytes(model, &grads);
        if loss_scale != 1.0 {
            scale_grads(model, &mut grads, 1.0 / loss_scale);
        }
        let mut global = [local_loss, grad_square_sum(model, &grads)];
        // Unsharded gradients are whole on every rank: their norm is already global.
        let reduced = if self.sync.sharded() { 2 } else { 1 };
        self.sync.all_reduce_sum(&mut global[..reduced])?;
        Ok(Synced {
            grads,
            loss: global[0] / self.sync.world_size() as f64,
            square_sum: global[1],
        })
    }

    /// Phase 3: global-norm clipping; returns the norm before clipping.
    fn clip(&self, model: &Transformer<B>, grads: &mut GradientsParams, square_sum: f64) -> f64 {
        let norm = square_sum.sqrt();
        clip_to(model, grads, norm, self.config.grad_clip);
        norm
    }

    /// Phase 4: the [`OptimizerStep`](crate::optimizer::OptimizerStep) seam when the step is finite, the non-finite-step policy
    /// otherwise; counts the step and updates the loss scale.
    fn update(
        &mut self,
        model: Transformer<B>,
        grads: GradientsParams,
        report: &StepReport,
    ) -> Result<()> {
        let step = report.step;
        self.state.step += 1;
        self.state.tokens_seen += self.tokens_per_step();
        let scale_update = self.state.loss_scaler.update(report.grad_norm.is_finite());
        if report.applied {
            self.bad_steps = 0;
            self.model = Some(self.optimizer.step(report.lr, model, grads)?);
            if let ScaleUpdate::Grew(to) = scale_update {
                self.metrics(json!({"step": step, "loss_scale": to,
                    "reason": "clean steps: loss scale doubled"}))?;
            }
            Ok(())
        } else {
            self.model = Some(model);
            self.skip(report, scale_update)
        }
    }

    /// A non-finite step: log it, and after `max_bad_steps` in a row roll back.
    fn skip(&mut self, report: &StepReport, scale_update: ScaleUpdate) -> Result<()> {
        let (step, loss, loss_scale) = (report.step, report.loss, report.loss_scale);
        // An f16 overflow (finite loss, non-finite gradients at a scale above 1) is routine
        // for dynamic loss scaling: the scale backs off and the step does not count as bad.
        let overflow = loss.is_finite() && loss_scale > 1.0;
        let reason = match scale_update {
            ScaleUpdate::BackedOff(to) => format!(
                "non-finite {} with loss scale {loss_scale}: step skipped, loss scale -> {to}",
                if loss.is_finite() {
                    "gradient norm"
                } else {
                    "loss"
                }
            ),
            _ if !loss.is_finite() => "non-finite loss: step skipped".into(),
            _ => "non-finite gradient norm: step skipped".into(),
        };
        self.metrics(json!({"step": step, "skipped": true, "loss": loss,
            "grad_norm": report.grad_norm, "loss_scale": self.state.loss_scaler.scale(),
            "reason": reason}))?;
        if !overflow {
            self.bad_steps += 1;
            if self.bad_steps >= self.config.max_bad_steps.max(1) {
                self.recover(step)?;
            }
        }
        Ok(())
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
            self.optimizer.load(&dir, &self.device)?;
            self.model = Some(model);
        }
        self.state.lr_scale = scale;
        if self.is_rank0() {
            eprintln!(
                "step {step}: {} non-finite steps in a row; reloaded the last checkpoint, learning rate x{scale}",
                self.config.max_bad_steps
            );
        }
        self.metrics(json!({"step": step, "recovered": true, "lr_scale": scale}))
    }

    /// Mean cross-entropy over the validation split (its first `eval_batches` batches if set),
    /// each rank evaluating its share.
    pub fn evaluate(&mut self) -> Result<f64> {
        self.evaluate_batches(self.config.eval_batches)
    }

    /// Mean cross-entropy over the whole validation split.
    pub fn evaluate_full(&mut self) -> Result<f64> {
        self.evaluate_batches(0)
    }

    fn evaluate_batches(&mut self, max_batches: usize) -> Result<f64> {
        let rank = self.sync.data_rank()?;
        let model = self.model.take().ok_or(TrainError::ModelUnavailable)?;
        let model = self.optimizer.materialize(model)?;
        let shared = evaluate_share(
            &model.valid(),
            &self.val,
            self.config.micro_batch,
            self.config.seq_len,
            max_batches,
            rank,
            self.optimizer.eval_weight_source(),
            &self.device,
        );
        self.model = Some(self.optimizer.release(model)?);
        let (total, tokens) = shared?;
        let mut sums = [total, tokens as f64];
        self.sync.all_reduce_sum(&mut sums)?;
        Ok(sums[0] / sums[1].max(1.0))
    }

    /// Saves a checkpoint of the current state; returns its directory. With several ranks every
    /// rank calls this: rank 0 writes the model and trainer state, and the optimizer state (each
    /// rank its share, if [`sharded_state`](crate::optimizer::OptimizerStep::sharded_state)).
    pub fn save_checkpoint(&mut self) -> Result<PathBuf> {
        let working = self.model.as_ref().ok_or(TrainError::ModelUnavailable)?;
        let consolidated = self.optimizer.consolidated(working)?;
        let model = consolidated.as_ref().unwrap_or(working);
        let (step, rank0) = (self.state.step, self.sync.rank() == 0);
        let sync = &mut *self.sync;
        let staged = if rank0 {
            checkpoint::begin(&self.run_dir, step).map(drop)
        } else {
            Ok(())
        };
        agree(sync, staged, "create the checkpoint directory")?;
        let tmp = checkpoint::staging_dir(&self.run_dir, step);
        let saved = if rank0 || self.optimizer.sharded_state() {
            self.optimizer.save(&tmp)
        } else {
            Ok(())
        };
        let written = agree(sync, saved, "save the optimizer state").and_then(|()| {
            let done = if rank0 {
                checkpoint::write_model_and_state(&tmp, model, &self.state, self.tokenizer.as_ref())
                    .and_then(|()| {
                        checkpoint::commit(&self.run_dir, &tmp, step, self.config.keep_checkpoints)
                            .map(drop)
                    })
            } else {
                Ok(())
            };
            agree(sync, done, "write the checkpoint")
        });
        if written.is_err() && rank0 {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        written.map(|()| checkpoint::checkpoint_dir(&self.run_dir, step))
    }

    /// Bytes this rank holds for parameters, gradients (as of the last step) and optimizer state.
    pub fn model_state_bytes(&self) -> ModelStateBytes {
        ModelStateBytes {
            parameters: self.model.as_ref().map_or(0, parameter_bytes),
            gradients: self.gradient_bytes,
            optimizer: self.optimizer.state_bytes(),
        }
    }

    /// Every rank's [`ModelStateBytes`], gathered on every rank (each rank calls it).
    pub fn model_state_bytes_by_rank(&mut self) -> Result<Vec<ModelStateBytes>> {
        let (rank, world) = (self.sync.rank(), self.sync.world_size());
        let mine = self.model_state_bytes();
        let mut all = vec![0.0; 3 * world];
        all[3 * rank..3 * rank + 3].copy_from_slice(&[
            mine.parameters as f64,
            mine.gradients as f64,
            mine.optimizer as f64,
        ]);
        if world > 1 {
            self.sync.all_reduce_sum(&mut all)?;
        }
        Ok(all
            .chunks(3)
            .map(|c| ModelStateBytes {
                parameters: c[0] as u64,
                gradients: c[1] as u64,
                optimizer: c[2] as u64,
            })
            .collect())
    }

    /// The precision the linear layers multiply in without a compute copy (bf16 products, see
    /// [`Precision::linear_products`](crate::Precision::linear_products)); `None` for f32 and
    /// for a compute copy. A sharded optimizer's weight source hands out its own low-precision
    /// working copy, so it keeps the copy.
    fn linear_products(&self) -> Option<Products> {
        self.config
            .precision
            .linear_products::<B>()
            .filter(|_| self.optimizer.weight_source().is_none())
    }

    /// Logs every rank's model-state bytes (metrics on rank 0, stderr with a progress bar), and
    /// how mixed precision runs.
    fn report_memory(&mut self) -> Result<()> {
        let precision = self.config.precision;
        if precision != Precision::F32 {
            let how = match self.linear_products() {
                Some(_) => "bf16 products in f32 tensors",
                None => "a low-precision compute copy",
            };
            if self.is_rank0() && self.show_progress {
                eprintln!("mixed precision {}: {how}", precision.name());
            }
            self.metrics(json!({"step": self.state.step, "mixed_precision": how}))?;
        }
        let by_rank = self.model_state_bytes_by_rank()?;
        if self.is_rank0() && self.show_progress {
            for (r, b) in by_rank.iter().enumerate() {
                eprintln!(
                    "rank {r}: parameters {:.1} MB, gradients {:.1} MB, optimizer state {:.1} MB (model state {:.1} MB)",
                    b.parameters as f64 / 1e6,
                    b.gradients as f64 / 1e6,
                    b.optimizer as f64 / 1e6,
                    b.total() as f64 / 1e6
                );
            }
        }
        self.metrics(json!({"step": self.state.step, "model_state_bytes": by_rank}))
    }

    /// Whether to stop before the next step: the stop flag, raised on any rank.
    fn stop_requested(&mut self) -> Result<bool> {
        let local = self.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst));
        if self.sync.world_size() == 1 {
            return Ok(local);
        }
        let mut raised = [f64::from(u8::from(local))];
        self.sync.all_reduce_sum(&mut raised)?;
        Ok(raised[0] > 0.0)
    }

    /// Trains to `max_steps`, evaluating and checkpointing on schedule, and returns the validation
    /// loss over the whole split at the end. A raised stop flag
    /// ([`with_stop_flag`](Self::with_stop_flag)) ends it with [`TrainError::Interrupted`]; use
    /// [`run`](Self::run) to get that as an outcome.
    pub fn train(&mut self) -> Result<f64> {
        match self.run()? {
            TrainOutcome::Finished { val_loss } => Ok(val_loss),
            TrainOutcome::Interrupted { step, checkpoint } => {
                Err(TrainError::Interrupted { step, checkpoint })
            }
        }
    }

    /// Trains to `max_steps` or until the stop flag is raised, evaluating and checkpointing on
    /// schedule ([`run_loop::run`]). Finished: the validation loss over the whole split (and a
    /// final checkpoint). Stopped: the step in progress completes, a checkpoint is written, and
    /// the outcome says where, so the run can be resumed from exactly there.
    pub fn run(&mut self) -> Result<TrainOutcome> {
        run_loop::run(self)
    }
}

impl<B: AutodiffBackend> TrainingRun for Trainer<B> {
    fn config(&self) -> &TrainConfig {
        &self.config
    }

    fn model_config(&self) -> &ModelConfig {
        &self.model_config
    }

    fn state(&self) -> &TrainerState {
        &self.state
    }

    fn state_mut(&mut self) -> &mut TrainerState {
        &mut self.state
    }

    fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    fn is_rank0(&self) -> bool {
        Trainer::is_rank0(self)
    }

    fn devices(&self) -> usize {
        self.sync.world_size()
    }

    fn tokens_per_step(&self) -> u64 {
        Trainer::tokens_per_step(self)
    }

    fn show_progress(&self) -> bool {
        self.show_progress
    }

    fn stop_requested(&mut self) -> Result<bool> {
        Trainer::stop_requested(self)
    }

    fn step(&mut self) -> Result<StepReport> {
        Trainer::step(self)
    }

    fn report_memory(&mut self) -> Result<()> {
        Trainer::report_memory(self)
    }

    fn evaluate_batches(&mut self, max_batches: usize) -> Result<f64> {
        Trainer::evaluate_batches(self, max_batches)
    }

    fn save_checkpoint(&mut self) -> Result<PathBuf> {
        Trainer::save_checkpoint(self)
    }
}
