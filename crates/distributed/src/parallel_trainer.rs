//! [`ParallelTrainer`]: a training run whose ranks split the model (tensor and pipeline
//! parallelism, with data parallelism over the replicas), driven by the same loop as the
//! single-process trainer ([`kiln_trainer::run_loop`]): the config keys `tensor_parallel`,
//! `pipeline_parallel`, `micro_batches` (= `grad_accum`, the pipeline's M), `pipeline_schedule`
//! and `pipeline_stages`.
//!
//! Every rank reads the same batches as one process would with the same config: micro-batch `i`
//! of step `s` is the sampler's batch `s·M + i`, and replica `d` of `D` takes its share of it, as
//! a data-parallel rank does. Checkpoints hold the consolidated model (a normal model directory,
//! with the tokenizer), the trainer state, and every rank's AdamW state; they resume exactly into
//! the same layout, and their model starts a run of any layout.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use kiln_bpe::{TokenShard, Tokenizer};
use kiln_trainer::checkpoint::{self, TrainerState};
use kiln_trainer::precision::LossScaler;
use kiln_trainer::run_loop::{self, TrainingRun};
use kiln_trainer::sampler::{BatchSampler, DataRank};
use kiln_trainer::schedule::learning_rate;
use kiln_trainer::{
    Precision, StepReport, TrainConfig, TrainError, TrainOutcome, initial_model, open_shards,
    prepare_new_run, resolve,
};
use kiln_transformer::{ModelConfig, load_model_dir, save_model_dir};
use serde_json::json;

use crate::error::{DistError, Result};
use crate::model_parallel::{AdamWSettings, ParallelOptions, ParallelRank};
use crate::p2p::{Group, PeerNet};
use crate::tensor_parallel::TensorParallelBackend;

type TrainResult<T> = kiln_trainer::Result<T>;

/// One rank of a tensor/pipeline(/data)-parallel training run in a run directory.
pub struct ParallelTrainer<B: TensorParallelBackend> {
    rank: ParallelRank<B>,
    world: Group<B::InnerBackend>,
    config: TrainConfig,
    model_config: ModelConfig,
    state: TrainerState,
    run_dir: PathBuf,
    tokenizer: Option<Tokenizer>,
    train: Arc<TokenShard>,
    val: Arc<TokenShard>,
    bad_steps: u32,
    show_progress: bool,
    stop: Option<Arc<AtomicBool>>,
    device: B::Device,
}

/// The split a config asks for.
pub fn parallel_options(config: &TrainConfig) -> Result<ParallelOptions> {
    Ok(ParallelOptions {
        tensor: config.tensor_parallel,
        pipeline: config.pipeline_parallel,
        micro_batches: config.grad_accum,
        schedule: config.pipeline_schedule.parse()?,
        stage_layers: config.pipeline_stages.clone(),
    })
}

impl<B: TensorParallelBackend> ParallelTrainer<B> {
    /// Starts a new run in `run_dir` as the rank `net` stands for (every rank calls it with the
    /// same config; each draws the same initial weights from the config's seed).
    pub fn start(
        mut config: TrainConfig,
        run_dir: impl AsRef<Path>,
        net: Arc<PeerNet<B::InnerBackend>>,
        device: B::Device,
    ) -> Result<Self> {
        let run_dir = run_dir.as_ref().to_owned();
        let (tokenizer, model_config) = prepare_new_run(&mut config)?;
        let options = parallel_options(&config)?;
        crate::ParallelLayout::new(net.world_size(), options.tensor, options.pipeline)?
            .check(&model_config, options.micro_batches)?;
        if net.rank() == 0 {
            let path = run_dir.join("config.toml");
            kiln_gguf::atomic::write(&path, config.to_toml()?.as_bytes())
                .map_err(|e| TrainError::io(&path, e))?;
        }
        let model = initial_model::<B>(&config, &model_config, &device)?;
        let rank = ParallelRank::new(
            model,
            net,
            options,
            AdamWSettings::from_config(&config),
            device.clone(),
        )?;
        let state = TrainerState {
            step: 0,
            lr_scale: 1.0,
            tokens_seen: 0,
            val_loss: None,
            loss_scaler: LossScaler::for_precision(
                Precision::F32,
                config.loss_scale_growth_interval,
            ),
            world_size: rank.layout().data,
            config,
        };
        Self::assemble(rank, state, model_config, run_dir, tokenizer, device)
    }

    /// Continues the run in `run_dir` from its newest checkpoint, optionally to a new
    /// `max_steps`, on the same layout it was saved with.
    pub fn resume(
        run_dir: impl AsRef<Path>,
        max_steps: Option<u64>,
        net: Arc<PeerNet<B::InnerBackend>>,
        device: B::Device,
    ) -> Result<Self> {
        let run_dir = run_dir.as_ref().to_owned();
        let dir = checkpoint::latest_checkpoint(&run_dir)?;
        let mut state = checkpoint::load_state(&dir)?;
        if let Some(m) = max_steps {
            state.config.max_steps = m;
        }
        let (tokenizer, model_config) = resolve(&state.config)?;
        let model = load_model_dir::<B>(dir.join("model"), &device)?;
        if model.config() != &model_config {
            return Err(DistError::Checkpoint {
                path: dir.join("model"),
                reason: "the model does not match the run's config".into(),
            });
        }
        let mut rank = ParallelRank::new(
            model,
            net,
            parallel_options(&state.config)?,
            AdamWSettings::from_config(&state.config),
            device.clone(),
        )?;
        rank.load_optimizer(&dir)?;
        Self::assemble(rank, state, model_config, run_dir, tokenizer, device)
    }

    fn assemble(
        rank: ParallelRank<B>,
        state: TrainerState,
        model_config: ModelConfig,
        run_dir: PathBuf,
        tokenizer: Option<Tokenizer>,
        device: B::Device,
    ) -> Result<Self> {
        let (train, val) = open_shards(&state.config)?;
        let net = Arc::clone(rank.net());
        let world = Group::new(net, (0..rank.layout().world_size()).collect())?;
        Ok(Self {
            rank,
            world,
            config: state.config.clone(),
            model_config,
            state,
            run_dir,
            tokenizer,
            train,
            val,
            bad_steps: 0,
            show_progress: false,
            stop: None,
            device,
        })
    }

    /// Draw a progress bar on stderr while training (rank 0 only).
    pub fn with_progress(mut self, show: bool) -> Self {
        self.show_progress = show;
        self
    }

    /// Stop [`run`](Self::run) cleanly once `flag` is set on any rank: the step in progress
    /// finishes and a checkpoint is written.
    pub fn with_stop_flag(mut self, flag: Arc<AtomicBool>) -> Self {
        self.stop = Some(flag);
        self
    }

    /// This rank's part of the run.
    pub fn rank(&self) -> &ParallelRank<B> {
        &self.rank
    }

    /// The run's settings.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Where the run stands.
    pub fn state(&self) -> &TrainerState {
        &self.state
    }

    /// The run directory.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Trains to `max_steps` or until the stop flag is raised (see
    /// [`Trainer::run`](kiln_trainer::Trainer::run)).
    pub fn run(&mut self) -> TrainResult<TrainOutcome> {
        run_loop::run(self)
    }

    /// Step `step`'s whole batch (every replica's rows, replica-major, micro-batch-minor), as
    /// `[rows, seq + 1]` token ids.
    fn batch(&self, step: u64) -> Result<Vec<Vec<i64>>> {
        let c = &self.config;
        let replicas = self.rank.layout().data;
        let mut rows = Vec::with_capacity(replicas * c.grad_accum * c.micro_batch);
        for d in 0..replicas {
            let sampler = BatchSampler::new(
                &*self.train,
                c.micro_batch,
                c.seq_len,
                c.seed,
                DataRank::new(d, replicas).map_err(TrainError::from)?,
            )
            .map_err(TrainError::from)?;
            for i in 0..c.grad_accum {
                let tokens = sampler
                    .batch(step * c.grad_accum as u64 + i as u64)
                    .map_err(TrainError::from)?;
                rows.extend(
                    tokens
                        .chunks_exact(c.seq_len + 1)
                        .map(|r| r.iter().map(|&t| i64::from(t)).collect()),
                );
            }
        }
        Ok(rows)
    }

    fn metrics(&self, line: serde_json::Value) -> TrainResult<()> {
        if self.world.net().rank() == 0 {
            run_loop::append_metrics(&self.run_dir, &line)?;
        }
        Ok(())
    }
}

impl<B: TensorParallelBackend> TrainingRun for ParallelTrainer<B> {
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
        self.world.net().rank() == 0
    }

    fn devices(&self) -> usize {
        self.rank.layout().world_size()
    }

    fn tokens_per_step(&self) -> u64 {
        let c = &self.config;
        (c.micro_batch * c.seq_len * c.grad_accum * self.rank.layout().data) as u64
    }

    fn show_progress(&self) -> bool {
        self.show_progress
    }

    fn stop_requested(&mut self) -> TrainResult<bool> {
        let local = self.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst));
        let mut raised = [f64::from(u8::from(local))];
        self.world.all_reduce_values(&mut raised)?;
        Ok(raised[0] > 0.0)
    }

    fn step(&mut self) -> TrainResult<StepReport> {
        let step = self.state.step;
        let c = &self.config;
        let lr = learning_rate(step, c.lr, c.min_lr, c.warmup_steps, c.decay_steps())
            * self.state.lr_scale;
        // Dropout masks are a function of (seed, step, replica, stage): the shards of one
        // tensor-parallel group drop the same activations.
        let coords = self.rank.coords();
        let salt =
            ((coords.data as u64) << 32 | coords.stage as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
        B::seed(
            &self.device,
            c.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ step ^ salt,
        );
        let batch = self.batch(step)?;
        let report = self.rank.step(&batch, lr)?;
        if report.applied {
            self.bad_steps = 0;
        } else {
            self.bad_steps += 1;
            self.metrics(json!({"step": step, "skipped": true, "loss": report.loss,
                "grad_norm": report.grad_norm}))?;
            if self.bad_steps >= self.config.max_bad_steps.max(1) {
                return Err(TrainError::Config(format!(
                    "{} steps in a row with a non-finite loss or gradient (step {step}): lower lr \
                     (now {lr:.2e}) or set grad_clip, and resume from the last checkpoint",
                    self.bad_steps
                )));
            }
        }
        self.state.step += 1;
        self.state.tokens_seen += self.tokens_per_step();
        Ok(StepReport {
            step,
            loss: report.loss,
            grad_norm: report.grad_norm,
            lr,
            applied: report.applied,
            loss_scale: 1.0,
        })
    }

    fn report_memory(&mut self) -> TrainResult<()> {
        let mut bytes = vec![0.0; self.world.size()];
        bytes[self.world.index()] = kiln_trainer::parameter_bytes(self.rank.stage()?) as f64;
        self.world.all_reduce_values(&mut bytes)?;
        if self.is_rank0() && self.show_progress {
            for (r, b) in bytes.iter().enumerate() {
                eprintln!("rank {r}: parameters {:.1} MB", b / 1e6);
            }
        }
        self.metrics(json!({"step": self.state.step, "parameter_bytes": bytes}))
    }

    fn evaluate_batches(&mut self, max_batches: usize) -> TrainResult<f64> {
        let c = &self.config;
        let (coords, layout) = (self.rank.coords(), self.rank.layout());
        let sampler = BatchSampler::new(
            &*self.val,
            c.micro_batch,
            c.seq_len,
            0,
            DataRank::new(coords.data, layout.data)?,
        )?;
        let loss_fn = CrossEntropyLossConfig::new().init::<B::InnerBackend>(&self.device);
        let vocab = self.model_config.vocab_size;
        let counts = coords.tensor == 0 && coords.stage + 1 == layout.pipeline;
        let (mut total, mut count) = (0.0f64, 0.0f64);
        let mut windows = sampler.sequential_windows();
        for i in 0..sampler.num_sequential_batches() {
            if max_batches > 0 && i >= max_batches {
                break;
            }
            let Some(window) = windows.next() else { break };
            let window = window?;
            let n = window.len() / (c.seq_len + 1);
            let (mut inputs, mut targets) = (Vec::new(), Vec::new());
            for row in window.chunks_exact(c.seq_len + 1) {
                inputs.extend(row[..c.seq_len].iter().map(|&t| i64::from(t)));
                targets.extend(row[1..].iter().map(|&t| i64::from(t)));
            }
            let tokens = Tensor::<B, 2, Int>::from_data(
                TensorData::new(inputs, [n, c.seq_len]),
                &self.device,
            );
            let logits = self.rank.forward_logits(tokens)?;
            if let (Some(logits), true) = (logits, counts) {
                let targets = Tensor::<B::InnerBackend, 1, Int>::from_data(
                    TensorData::new(targets, [n * c.seq_len]),
                    &self.device,
                );
                let loss = loss_fn.forward(logits.reshape([n * c.seq_len, vocab]), targets);
                total += loss.into_scalar().elem::<f64>() * (n * c.seq_len) as f64;
                count += (n * c.seq_len) as f64;
            }
        }
        let mut sums = [total, count];
        self.world.all_reduce_values(&mut sums)?;
        Ok(sums[0] / sums[1].max(1.0))
    }

    fn save_checkpoint(&mut self) -> TrainResult<PathBuf> {
        let step = self.state.step;
        let rank0 = self.is_rank0();
        if rank0 {
            checkpoint::begin(&self.run_dir, step)?;
        }
        self.world.barrier()?;
        let staging = checkpoint::staging_dir(&self.run_dir, step);
        let whole = self.rank.consolidate()?;
        self.rank.save_optimizer(&staging)?;
        if let Some(model) = whole {
            save_model_dir(&model, self.tokenizer.as_ref(), None, staging.join("model"))?;
            checkpoint::write_state(&staging, &self.state)?;
        }
        self.world.barrier()?;
        if rank0 {
            checkpoint::commit(&self.run_dir, &staging, step, self.config.keep_checkpoints)?;
        }
        self.world.barrier()?;
        Ok(checkpoint::checkpoint_dir(&self.run_dir, step))
    }
}
