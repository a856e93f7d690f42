//! [`ParallelRank`]: one rank of a run that composes data, tensor and pipeline parallelism
//! (Megatron-LM's "3D" parallelism) over a [`ParallelLayout`].
//!
//! A step on every rank:
//! 1. its replica's rows of the batch split into `M` micro-batches;
//! 2. the stage's [`PipelineSchedule`]: a forward pass receives the previous stage's activations
//!    (or embeds the tokens) and sends its output on (or computes the loss); a backward pass
//!    receives the gradient of its output from the next stage and sends the gradient of its input
//!    back. Inside each stage, tensor-parallel shards meet in Megatron's *f*/*g* all-reduces;
//! 3. with tied embeddings, the first and last stages' copies of the token embedding add up
//!    their gradients;
//! 4. the data-parallel replicas of each shard average their gradients;
//! 5. the global gradient norm (each parameter counted once: tensor-parallel shards summed,
//!    replicated weights once, the tied copy once), clipping, and AdamW on the rank's own
//!    parameters. AdamW is element-wise, so the sharded update is exactly the whole model's.
//!
//! ```no_run
//! use burn::backend::{Autodiff, Flex};
//! use kiln_distributed::{AdamWSettings, ParallelOptions, ParallelRank, PipelineSchedule, thread_ranks};
//! use kiln_transformer::load_model_dir;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Every rank starts from the same whole model (here a Kiln model directory).
//! let model = load_model_dir::<Autodiff<Flex>>("runs/tiny/model", &Default::default())?;
//! let batch: Vec<Vec<i64>> = vec![vec![1; 257]; 8]; // 8 rows of seq_len + 1 token ids
//! // 4 ranks as threads: TP 2 × PP 2, 4 micro-batches, 1F1B.
//! let results = thread_ranks::<Flex, _>(4, Default::default(), |net| {
//!     let options = ParallelOptions {
//!         tensor: 2,
//!         pipeline: 2,
//!         micro_batches: 4,
//!         schedule: PipelineSchedule::OneFOneB,
//!         stage_layers: None,
//!     };
//!     let mut rank =
//!         ParallelRank::new(model.clone(), net, options, AdamWSettings::default(), Default::default())?;
//!     let report = rank.step(&batch, 6e-4)?;
//!     let whole = rank.consolidate()?; // the whole model on rank 0, for `save_model_dir`
//!     Ok::<_, kiln_distributed::DistError>((report.loss, whole.is_some()))
//! })?;
//! # Ok(()) }
//! ```

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::GradientsAccumulator;
use burn::optim::GradientsParams;
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use kiln_trainer::optimizer::{GroupedAdamW, OptimizerStep, clip_to, embedding_param_ids};
use kiln_transformer::{
    ModelConfig, Stage, StageInput, TensorParallel, Transformer, save_model_dir,
};

use crate::error::{DistError, Result};
use crate::layout::{ParallelLayout, RankCoords, balance_stages};
use crate::p2p::{Group, PeerNet};
use crate::schedule::{Action, PipelineSchedule};
use crate::tensor_parallel::{MegatronOps, TensorParallelBackend, TpComm, owned_copy, shard_model};

/// How a run is split, beyond the number of ranks.
#[derive(Clone, Debug, PartialEq)]
pub struct ParallelOptions {
    /// Tensor-parallel group size `T`.
    pub tensor: usize,
    /// Pipeline stages `P`.
    pub pipeline: usize,
    /// Micro-batches per step `M` (each replica's rows split `M` ways).
    pub micro_batches: usize,
    /// The pipeline schedule.
    pub schedule: PipelineSchedule,
    /// Layers per stage; `None` balances stages by parameter count.
    pub stage_layers: Option<Vec<usize>>,
}

impl Default for ParallelOptions {
    fn default() -> Self {
        Self {
            tensor: 1,
            pipeline: 1,
            micro_batches: 1,
            schedule: PipelineSchedule::OneFOneB,
            stage_layers: None,
        }
    }
}

/// AdamW's settings for a [`ParallelRank`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWSettings {
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay (not applied to the norms and the biases).
    pub weight_decay: f64,
    /// Decay the embedding tables too (nanoGPT's and `kiln train`'s default).
    pub decay_embeddings: bool,
    /// Global gradient-norm clipping threshold (0 = off).
    pub grad_clip: f64,
}

impl Default for AdamWSettings {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            decay_embeddings: false,
            grad_clip: 1.0,
        }
    }
}

impl AdamWSettings {
    /// The settings of a training config (`beta1`, `beta2`, `eps`, `weight_decay`,
    /// `decay_embeddings`, `grad_clip`).
    pub fn from_config(config: &kiln_trainer::TrainConfig) -> Self {
        Self {
            beta1: config.beta1,
            beta2: config.beta2,
            eps: config.eps,
            weight_decay: config.weight_decay,
            decay_embeddings: config.decay_embeddings,
            grad_clip: config.grad_clip,
        }
    }
}

/// One stage's action, timed (for the pipeline-bubble measurement).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TimedAction {
    /// What ran.
    pub action: Action,
    /// Seconds from the start of the step to the start of the compute (after the receive).
    pub start: f64,
    /// Seconds from the start of the step to the end of the compute (before the send).
    pub end: f64,
    /// Seconds from the start of the step to when the send returned (`end` without a send).
    pub sent: f64,
}

/// What a step did on this rank.
#[derive(Clone, Debug, PartialEq)]
pub struct ParallelStepReport {
    /// Mean loss over the whole batch, all replicas (the same on every rank).
    pub loss: f64,
    /// Global gradient norm before clipping (the same on every rank).
    pub grad_norm: f64,
    /// Whether the update was applied (not when the loss or gradient was not finite).
    pub applied: bool,
    /// The most micro-batches whose activations this stage held at once (measured: forward
    /// graphs alive).
    pub peak_live_micro_batches: usize,
    /// This stage's actions with their compute times.
    pub timeline: Vec<TimedAction>,
    /// Seconds the forward and backward phase took on this rank.
    pub seconds: f64,
}

/// Counts live stashes of one micro-batch's forward graph; the peak is the measured activation
/// memory of a schedule, in micro-batches.
#[derive(Debug, Default)]
struct LiveCounter {
    live: AtomicUsize,
    peak: AtomicUsize,
}

/// A forward pass kept for its backward pass: dropping it releases the micro-batch's activations.
struct Stash<B: Backend> {
    /// The stage's input (a leaf that collects its gradient) unless this is the first stage.
    input: Option<Tensor<B, 3>>,
    /// The loss (last stage) or the stage's output.
    output: Tensor<B, 3>,
    counter: Arc<LiveCounter>,
}

impl<B: Backend> Stash<B> {
    fn new(input: Option<Tensor<B, 3>>, output: Tensor<B, 3>, counter: &Arc<LiveCounter>) -> Self {
        let live = counter.live.fetch_add(1, Ordering::Relaxed) + 1;
        counter.peak.fetch_max(live, Ordering::Relaxed);
        Self {
            input,
            output,
            counter: Arc::clone(counter),
        }
    }
}

impl<B: Backend> Drop for Stash<B> {
    fn drop(&mut self) {
        self.counter.live.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One rank of a data × tensor × pipeline parallel run: its stage of the model (its shard of each
/// layer under tensor parallelism), the groups it talks to, and its AdamW state.
pub struct ParallelRank<B: TensorParallelBackend> {
    layout: ParallelLayout,
    coords: RankCoords,
    options: ParallelOptions,
    stage: Option<Stage<B>>,
    stage_layers: Vec<usize>,
    tp: Arc<TpComm<B::InnerBackend>>,
    data_group: Group<B::InnerBackend>,
    model_group: Group<B::InnerBackend>,
    embedding_group: Option<Group<B::InnerBackend>>,
    prev: Option<usize>,
    next: Option<usize>,
    net: Arc<PeerNet<B::InnerBackend>>,
    optimizer: GroupedAdamW<B, Stage<B>>,
    settings: AdamWSettings,
    /// Parameters whose gradient norm this rank adds (each parameter counted once per replica).
    counted: HashSet<ParamId>,
    sharded: HashSet<ParamId>,
    device: B::Device,
}

impl<B: TensorParallelBackend> ParallelRank<B> {
    /// This rank's part of `model` (the same whole model on every rank, e.g. from the same seed),
    /// for `options` over the ranks `net` connects.
    pub fn new(
        model: Transformer<B>,
        net: Arc<PeerNet<B::InnerBackend>>,
        options: ParallelOptions,
        settings: AdamWSettings,
        device: B::Device,
    ) -> Result<Self> {
        let layout = ParallelLayout::new(net.world_size(), options.tensor, options.pipeline)?;
        let config = model.config().clone();
        layout.check(&config, options.micro_batches)?;
        let rank = net.rank();
        check_same_config(&net, &config, &options)?;
        let coords = layout.coords(rank);
        let stage_layers = match &options.stage_layers {
            Some(layers) => {
                if layers.len() != layout.pipeline
                    || layers.contains(&0)
                    || layers.iter().sum::<usize>() != config.n_layers
                {
                    return Err(DistError::Config(format!(
                        "stage_layers {layers:?} do not split {} layers into {} stages",
                        config.n_layers, layout.pipeline
                    )));
                }
                layers.clone()
            }
            None => balanced_layers(&model, layout.pipeline)?,
        };
        let group = |members| Group::new(Arc::clone(&net), members);
        let tp = Arc::new(TpComm::new(group(layout.tensor_group(rank))?));
        let data_group = group(layout.data_group(rank))?;
        let model_group = group(layout.model_group(rank))?;
        let pipeline = layout.pipeline_group(rank);
        let (first, last) = (coords.stage == 0, coords.stage + 1 == layout.pipeline);
        let embedding_group = (config.tied_embeddings && layout.pipeline > 1 && (first || last))
            .then(|| group(vec![pipeline[0], pipeline[layout.pipeline - 1]]))
            .transpose()?;
        // Burn's autodiff merges graphs that share a leaf and locks a merged graph for a whole
        // backward pass: ranks that are threads sharing parameter tensors would serialize, and
        // wait on each other's collectives inside that lock. Every rank gets its own leaves.
        let model = model.map(&mut FreshLeaves);
        check_same_weights(&net, &model.valid())?;
        let embedding_ids: HashSet<ParamId> = embedding_param_ids(&model).into_iter().collect();
        let whole_shapes = param_shapes(&model);

        let model = if layout.tensor > 1 {
            let ops: Arc<dyn TensorParallel<B>> = Arc::new(MegatronOps::<B>::new(Arc::clone(&tp)));
            shard_model(model, coords.tensor, layout.tensor, ops)?
        } else {
            model
        };
        let local_shapes = param_shapes(&model);
        let stage = model
            .into_stages(&stage_layers)?
            .into_iter()
            .nth(coords.stage)
            .ok_or_else(|| DistError::Config("no stage for this rank".into()))?;

        let sharded: HashSet<ParamId> = local_shapes
            .iter()
            .filter(|(id, shape)| whole_shapes.get(id) != Some(shape))
            .map(|(id, _)| *id)
            .collect();
        let tied_copy = (config.tied_embeddings && layout.pipeline > 1 && last && !first)
            .then(|| stage.tok_emb.as_ref().map(|e| e.weight.id))
            .flatten();
        let counted = ids(&stage)
            .into_iter()
            .filter(|id| sharded.contains(id) || coords.tensor == 0)
            .filter(|id| Some(*id) != tied_copy)
            .collect();
        let no_decay: Vec<ParamId> = ids_with_rank_1(&stage)
            .into_iter()
            .chain(
                embedding_ids
                    .into_iter()
                    .filter(|_| !settings.decay_embeddings),
            )
            .collect();
        let optimizer = GroupedAdamW::new(
            &stage,
            settings.beta1,
            settings.beta2,
            settings.eps,
            settings.weight_decay,
        )
        .without_decay(no_decay);
        let pipeline_prev = (!first).then(|| pipeline[coords.stage - 1]);
        let pipeline_next = (!last).then(|| pipeline[coords.stage + 1]);
        Ok(Self {
            layout,
            coords,
            options,
            stage: Some(stage),
            stage_layers,
            tp,
            data_group,
            model_group,
            embedding_group,
            prev: pipeline_prev,
            next: pipeline_next,
            net,
            optimizer,
            settings,
            counted,
            sharded,
            device,
        })
    }

    /// The layout.
    pub fn layout(&self) -> ParallelLayout {
        self.layout
    }

    /// This rank's place in it.
    pub fn coords(&self) -> RankCoords {
        self.coords
    }

    /// Layers per stage.
    pub fn stage_layers(&self) -> &[usize] {
        &self.stage_layers
    }

    /// This rank's part of the model.
    pub fn stage(&self) -> Result<&Stage<B>> {
        self.stage.as_ref().ok_or(DistError::Config(
            "the stage was lost in a failed step".into(),
        ))
    }

    /// The parameters this rank holds only a shard of (tensor parallelism).
    pub fn sharded_params(&self) -> &HashSet<ParamId> {
        &self.sharded
    }

    /// The tensor-parallel communication (for its counters).
    pub fn tensor_comm(&self) -> &Arc<TpComm<B::InnerBackend>> {
        &self.tp
    }

    /// The point-to-point layer.
    pub fn net(&self) -> &Arc<PeerNet<B::InnerBackend>> {
        &self.net
    }

    /// The micro-batch `i` of this replica's rows of `batch` (`[rows, seq + 1]` token ids, the
    /// whole step's batch, the same on every rank): inputs and targets.
    fn micro_batch(
        &self,
        batch: &[Vec<i64>],
        i: usize,
    ) -> Result<(Tensor<B, 2, Int>, Tensor<B, 1, Int>)> {
        let (d, m) = (self.layout.data, self.options.micro_batches);
        if batch.is_empty() || !batch.len().is_multiple_of(d * m) {
            return Err(DistError::Config(format!(
                "a batch of {} rows does not split over {d} replicas × {m} micro-batches",
                batch.len()
            )));
        }
        let per = batch.len() / (d * m);
        let rows = &batch[(self.coords.data * m + i) * per..][..per];
        let seq = rows[0].len().saturating_sub(1);
        if seq == 0 || rows.iter().any(|r| r.len() != seq + 1) {
            return Err(DistError::Config(
                "batch rows must all hold seq + 1 ≥ 2 tokens".into(),
            ));
        }
        let inputs: Vec<i64> = rows.iter().flat_map(|r| r[..seq].iter().copied()).collect();
        let targets: Vec<i64> = rows.iter().flat_map(|r| r[1..].iter().copied()).collect();
        Ok((
            Tensor::from_data(TensorData::new(inputs, [per, seq]), &self.device),
            Tensor::from_data(TensorData::new(targets, [per * seq]), &self.device),
        ))
    }

    /// Runs the stage's schedule over one step's batch: this rank's accumulated gradients (of the
    /// mean loss over its replica's rows; not yet synchronized across replicas or the tied copy),
    /// the replica's mean loss (on the last stage; 0 elsewhere), and what the schedule did.
    pub fn forward_backward(
        &self,
        batch: &[Vec<i64>],
    ) -> Result<(GradientsParams, f64, usize, Vec<TimedAction>)> {
        let stage = self.stage()?;
        let m = self.options.micro_batches;
        let actions = self
            .options
            .schedule
            .actions(self.layout.pipeline, self.coords.stage, m);
        let counter = Arc::new(LiveCounter::default());
        let mut stashes: HashMap<usize, Stash<B>> = HashMap::new();
        let mut accumulator = GradientsAccumulator::<Stage<B>>::new();
        let mut loss_sum = 0.0;
        let mut timeline = Vec::with_capacity(actions.len());
        let started = Instant::now();
        let loss_fn = CrossEntropyLossConfig::new().init(&self.device);
        // The schedule says what comes: M activations from the previous stage, M gradients from
        // the next. Their receives are posted ahead, so they travel while this stage computes.
        let mut from_prev = self.prev.map(|peer| Inbox::new(peer, m));
        let mut from_next = self.next.map(|peer| Inbox::new(peer, m));
        for inbox in from_prev.iter_mut().chain(from_next.iter_mut()) {
            inbox.fill(&self.net)?;
        }
        for action in actions {
            match action {
                Action::Forward(i) => {
                    let (inputs, targets) = self.micro_batch(batch, i)?;
                    let input = match from_prev.as_mut() {
                        None => None,
                        Some(inbox) => {
                            Some(Tensor::<B, 3>::from_inner(inbox.recv(&self.net)?).require_grad())
                        }
                    };
                    let start = started.elapsed().as_secs_f64();
                    let out = stage.forward(match &input {
                        None => StageInput::Tokens(inputs),
                        Some(x) => StageInput::Hidden(x.clone()),
                    })?;
                    self.check_deferred()?;
                    let output = if self.next.is_none() {
                        let [b, t, v] = out.dims();
                        let loss = loss_fn
                            .forward(out.reshape([b * t, v]), targets)
                            .div_scalar(m as f32);
                        loss_sum += loss.clone().into_scalar().elem::<f64>();
                        loss.reshape([1, 1, 1])
                    } else {
                        out
                    };
                    let end = started.elapsed().as_secs_f64();
                    if let Some(next) = self.next {
                        self.net.send(next, output.clone().inner())?;
                    }
                    let sent = started.elapsed().as_secs_f64();
                    stashes.insert(i, Stash::new(input, output, &counter));
                    timeline.push(TimedAction {
                        action,
                        start,
                        end,
                        sent,
                    });
                }
                Action::Backward(i) => {
                    let stash = stashes.remove(&i).ok_or_else(|| {
                        DistError::Config(format!(
                            "backward pass of micro-batch {i} before its forward pass"
                        ))
                    })?;
                    // The next stage's gradient of this stage's output: backpropagating
                    // `sum(output · gradient)` gives exactly the chain rule's terms.
                    let upstream = match from_next.as_mut() {
                        None => None,
                        Some(inbox) => Some(Tensor::<B, 3>::from_inner(inbox.recv(&self.net)?)),
                    };
                    if self.layout.tensor > 1 && self.net.shares_process() {
                        // Ranks that are threads share Burn's autodiff bookkeeping: after a
                        // backward pass it locks every graph of the process, including a peer's
                        // that is inside its own backward pass, waiting for this rank's next
                        // all-reduce. Entering backward passes together rules that out.
                        self.tp.group().barrier()?;
                    }
                    let start = started.elapsed().as_secs_f64();
                    let root = match upstream {
                        None => stash.output.clone().sum(),
                        Some(dy) => (stash.output.clone() * dy).sum(),
                    };
                    let grads = root.backward();
                    self.check_deferred()?;
                    let input_grad = stash.input.as_ref().and_then(|x| x.grad(&grads));
                    accumulator.accumulate(stage, GradientsParams::from_grads(grads, stage));
                    let end = started.elapsed().as_secs_f64();
                    if let Some(prev) = self.prev {
                        let g = input_grad.ok_or_else(|| {
                            DistError::Config("the stage input got no gradient".into())
                        })?;
                        self.net.send(prev, g)?;
                    }
                    let sent = started.elapsed().as_secs_f64();
                    drop(stash);
                    timeline.push(TimedAction {
                        action,
                        start,
                        end,
                        sent,
                    });
                }
            }
        }
        let peak = counter.peak.load(Ordering::Relaxed);
        Ok((accumulator.grads(), loss_sum, peak, timeline))
    }

    fn check_deferred(&self) -> Result<()> {
        match self.tp.take_deferred_error() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The logits of `tokens` (`[batch, seq]`, the same on every rank) through the whole
    /// pipeline without gradients: on the last stage's ranks, `None` elsewhere. Every rank of the
    /// replica must call it.
    pub fn forward_logits(
        &self,
        tokens: Tensor<B, 2, Int>,
    ) -> Result<Option<Tensor<B::InnerBackend, 3>>> {
        let stage = self.stage()?;
        let input = match self.prev {
            None => StageInput::Tokens(tokens),
            Some(prev) => StageInput::Hidden(Tensor::from_inner(self.net.recv::<3>(prev)?)),
        };
        let out = stage.forward(input)?.inner();
        self.check_deferred()?;
        match self.next {
            Some(next) => {
                self.net.send(next, out)?;
                Ok(None)
            }
            None => Ok(Some(out)),
        }
    }

    /// One optimizer step at learning rate `lr` on `batch` (`[rows, seq + 1]` token ids, the
    /// same whole batch on every rank).
    pub fn step(&mut self, batch: &[Vec<i64>], lr: f64) -> Result<ParallelStepReport> {
        let started = Instant::now();
        let (grads, loss, peak, timeline) = self.forward_backward(batch)?;
        let seconds = started.elapsed().as_secs_f64();
        let (grads, loss, square_sum) = self.synchronize(grads, loss)?;
        let mut grads = grads;
        let grad_norm = square_sum.sqrt();
        let stage = self.stage.take().ok_or(DistError::Config(
            "the stage was lost in a failed step".into(),
        ))?;
        // A non-finite loss or gradient (the same verdict on every rank: both are global) leaves
        // the weights and the optimizer state as they were.
        let applied = loss.is_finite() && grad_norm.is_finite();
        self.stage = Some(if applied {
            clip_to(&stage, &mut grads, grad_norm, self.settings.grad_clip);
            self.optimizer.step(lr, stage, grads)
        } else {
            stage
        });
        Ok(ParallelStepReport {
            loss,
            grad_norm,
            applied,
            peak_live_micro_batches: peak,
            timeline,
            seconds,
        })
    }

    /// Steps 3–5 of the module doc before the update: the tied copies' gradients summed, the
    /// replicas' averaged; returns them with the global mean loss and squared gradient norm.
    pub fn synchronize(
        &self,
        mut grads: GradientsParams,
        loss: f64,
    ) -> Result<(GradientsParams, f64, f64)> {
        let stage = self.stage()?;
        if let (Some(group), Some(emb)) = (&self.embedding_group, &stage.tok_emb) {
            let id = emb.weight.id;
            if let Some(g) = grads.remove::<B::InnerBackend, 2>(id) {
                grads.register(id, group.all_reduce_sum(g)?);
            }
        }
        if self.layout.data > 1 {
            grads = all_reduce_mean(stage, grads, &self.data_group)?;
        }
        let square_sum = square_sum(stage, &grads, &self.counted);
        // Loss: the last stage's, summed over the replica's shards once (tensor rank 0) and
        // averaged over replicas; squared norm: summed over the replica's ranks.
        let is_loss_rank = self.next.is_none() && self.coords.tensor == 0;
        let mut values = [if is_loss_rank { loss } else { 0.0 }, square_sum];
        self.model_group.all_reduce_values(&mut values)?;
        let mut mean_loss = [values[0]];
        if self.layout.data > 1 {
            self.data_group.all_reduce_values(&mut mean_loss)?;
        }
        Ok((grads, mean_loss[0] / self.layout.data as f64, values[1]))
    }

    /// Writes a checkpoint into `dir`: the consolidated model in `dir/model` (a Kiln model
    /// directory that `kiln generate`, `kiln serve` and [`ParallelRank::new`] with any layout
    /// load; written by global rank 0), and every rank's AdamW state in
    /// `dir/optimizer/rank-R` beside the layout it belongs to. Every rank must call it.
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        if let Some(model) = self.consolidate()? {
            save_model_dir(&model, None, None, dir.join("model"))?;
        }
        self.save_optimizer(dir)?;
        Group::new(Arc::clone(&self.net), (0..self.net.world_size()).collect())?.barrier()
    }

    /// Writes this rank's AdamW state and layout into `dir/optimizer/rank-R/` (every rank calls
    /// it; [`save_checkpoint`](Self::save_checkpoint) does this and writes the model).
    pub fn save_optimizer(&self, dir: &Path) -> Result<()> {
        let own = self.optimizer_dir(dir);
        std::fs::create_dir_all(&own).map_err(|e| DistError::Checkpoint {
            path: own.clone(),
            reason: e.to_string(),
        })?;
        OptimizerStep::save(&self.optimizer, &own)?;
        let file = own.join("layout.txt");
        kiln_gguf::atomic::write(&file, self.layout_text().as_bytes()).map_err(|e| {
            DistError::Checkpoint {
                path: file.clone(),
                reason: e.to_string(),
            }
        })
    }

    /// Resumes this rank's AdamW state from a checkpoint [`save_checkpoint`](Self::save_checkpoint)
    /// wrote with the same layout (build the rank from `dir/model` first). A different layout
    /// shards the moments differently: that is an error naming both layouts, and the run can
    /// start from `dir/model` with fresh moments instead.
    pub fn load_optimizer(&mut self, dir: &Path) -> Result<()> {
        let own = self.optimizer_dir(dir);
        let file = own.join("layout.txt");
        let saved = std::fs::read_to_string(&file).map_err(|e| DistError::Checkpoint {
            path: file.clone(),
            reason: e.to_string(),
        })?;
        let current = self.layout_text();
        if saved != current {
            return Err(DistError::Checkpoint {
                path: file,
                reason: format!(
                    "the optimizer state was saved by a run with {saved}; this run has {current}"
                ),
            });
        }
        OptimizerStep::load(&mut self.optimizer, &own, &self.device)?;
        Ok(())
    }

    fn optimizer_dir(&self, dir: &Path) -> PathBuf {
        dir.join("optimizer")
            .join(format!("rank-{}", self.net.rank()))
    }

    fn layout_text(&self) -> String {
        format!(
            "data = {}, tensor = {}, pipeline = {}, stage layers = {:?}",
            self.layout.data, self.layout.tensor, self.layout.pipeline, self.stage_layers
        )
    }

    /// The whole model, assembled on global rank 0 from every stage and shard of replica 0
    /// (`None` on the other ranks). Every rank must call it.
    pub fn consolidate(&self) -> Result<Option<Transformer<B::InnerBackend>>> {
        let stage = self.stage()?.valid();
        let config = stage.config.clone();
        // 1. Tensor parallel: every shard's pieces, joined into the whole stage.
        let stage = if self.layout.tensor > 1 {
            unshard_stage(stage, &config, self.tp.group())?
        } else {
            stage
        };
        if self.coords.data != 0 || self.coords.tensor != 0 {
            return Ok(None);
        }
        // 2. Pipeline: the later stages send their parameters to the first.
        let pipeline = self.layout.pipeline_group(self.net.rank());
        if self.coords.stage != 0 {
            for value in param_values(&stage) {
                self.net.send_data(pipeline[0], value)?;
            }
            return Ok(None);
        }
        let skeleton = Transformer::<B::InnerBackend>::new(config, &self.net.device().clone())?;
        let mut stages = skeleton.into_stages(&self.stage_layers)?;
        stages[0] = stage;
        for (s, skeleton) in stages.iter_mut().enumerate().skip(1) {
            let count = param_count(skeleton);
            let values = (0..count)
                .map(|_| self.net.recv_data(pipeline[s]))
                .collect::<Result<Vec<_>>>()?;
            *skeleton = with_values(skeleton.clone(), values, self.net.device())?;
        }
        Ok(Some(Transformer::from_stages(stages)?))
    }
}

/// Receives posted ahead of the compute per neighbour (one in flight while the stage computes,
/// one more queued behind it on the same connection).
const POSTED_AHEAD: usize = 2;

/// One step's receives from one neighbouring stage: `total` tensors, in order, at most
/// [`POSTED_AHEAD`] of them posted before they are needed (never more than the step receives,
/// so nothing posted is left for a later message of the same pair).
struct Inbox {
    peer: usize,
    total: usize,
    posted: usize,
    taken: usize,
}

impl Inbox {
    fn new(peer: usize, total: usize) -> Self {
        Self {
            peer,
            total,
            posted: 0,
            taken: 0,
        }
    }

    /// Posts receives until [`POSTED_AHEAD`] are waiting or all `total` are posted.
    fn fill<B: Backend>(&mut self, net: &PeerNet<B>) -> Result<()> {
        while self.posted < self.total && self.posted - self.taken < POSTED_AHEAD {
            net.post_recv(self.peer)?;
            self.posted += 1;
        }
        Ok(())
    }

    /// The next tensor; the receive after it is posted before this returns.
    fn recv<B: Backend, const D: usize>(&mut self, net: &PeerNet<B>) -> Result<Tensor<B, D>> {
        if self.taken == self.total {
            return Err(DistError::Config(format!(
                "more than the {} tensors of a step received from rank {}",
                self.total, self.peer
            )));
        }
        let tensor = net.recv::<D>(self.peer)?;
        self.taken += 1;
        self.fill(net)?;
        Ok(tensor)
    }
}

/// Replaces every parameter by a new leaf with the same id and value.
struct FreshLeaves;

impl<B: Backend> ModuleMapper<B> for FreshLeaves {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, value, mapper) = param.consume();
        let grad = value.is_require_grad();
        let fresh = owned_copy(value.detach());
        Param::from_mapped_value(id, fresh.set_require_grad(grad), mapper)
    }
}

/// Fails on every rank unless every rank was given the same model structure and split.
fn check_same_config<B: Backend>(
    net: &Arc<PeerNet<B>>,
    config: &ModelConfig,
    options: &ParallelOptions,
) -> Result<()> {
    let text = format!("{config:?} {options:?}");
    // FNV-1a, folded to 48 bits so that f64 carries it exactly.
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    }) & ((1 << 48) - 1);
    check_all_equal(
        net,
        hash as f64,
        "different model configs or parallel layouts",
    )
}

/// Fails on every rank unless every rank holds the same whole model (a checksum of every
/// parameter). A model created with Burn's lazy initializers and cloned before any parameter was
/// read initializes each clone separately, with different random values.
fn check_same_weights<B: Backend>(net: &Arc<PeerNet<B>>, model: &Transformer<B>) -> Result<()> {
    struct Sum(f64);
    impl<B: Backend> ModuleVisitor<B> for Sum {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let v = param.val();
            let s = v.clone().sum().into_scalar().elem::<f64>();
            let q = v.powi_scalar(2).sum().into_scalar().elem::<f64>();
            self.0 += s + 0.5 * q;
        }
    }
    let mut sum = Sum(0.0);
    model.visit(&mut sum);
    check_all_equal(
        net,
        sum.0,
        "different weights: every rank must start from the same whole model (load it from a \
         file, or read every parameter once before cloning a freshly initialized model into \
         thread ranks: Burn initializes each clone of an unread parameter separately)",
    )
}

/// Fails on every rank unless every rank passes the same `value`; the error names the ranks
/// and `what` differs.
fn check_all_equal<B: Backend>(net: &Arc<PeerNet<B>>, value: f64, what: &str) -> Result<()> {
    let all = Group::new(Arc::clone(net), (0..net.world_size()).collect())?;
    let mine = Tensor::<B, 1>::from_data(
        TensorData::new(vec![value], [1]),
        (net.device(), burn::tensor::DType::F64),
    );
    for (rank, theirs) in all.all_gather(mine)?.into_iter().enumerate() {
        let theirs = theirs
            .into_data()
            .convert::<f64>()
            .into_vec::<f64>()
            .unwrap_or_default();
        if theirs.first() != Some(&value) {
            return Err(DistError::Config(format!(
                "ranks {rank} and {} were given {what}",
                net.rank()
            )));
        }
    }
    Ok(())
}

/// Layers per stage balanced by parameter count (the embedding on the first stage, the final norm
/// and an untied head on the last).
fn balanced_layers<B: Backend>(model: &Transformer<B>, stages: usize) -> Result<Vec<usize>> {
    let layer_costs: Vec<u64> = model.blocks.iter().map(|b| b.num_params() as u64).collect();
    let first = model.tok_emb.num_params() as u64
        + model.pos_emb.as_ref().map_or(0, |e| e.num_params() as u64);
    let last = model.norm_f.num_params() as u64
        + model.lm_head.as_ref().map_or(0, |h| h.num_params() as u64);
    balance_stages(&layer_costs, first, last, stages)
}

fn param_shapes<B: Backend, M: Module<B>>(module: &M) -> HashMap<ParamId, Vec<usize>> {
    struct V(HashMap<ParamId, Vec<usize>>);
    impl<B: Backend> ModuleVisitor<B> for V {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0.insert(param.id, param.shape().as_slice().to_vec());
        }
    }
    let mut v = V(HashMap::new());
    module.visit(&mut v);
    v.0
}

fn ids<B: Backend, M: Module<B>>(module: &M) -> Vec<ParamId> {
    param_shapes(module).into_keys().collect()
}

fn ids_with_rank_1<B: Backend, M: Module<B>>(module: &M) -> Vec<ParamId> {
    param_shapes(module)
        .into_iter()
        .filter(|(_, s)| s.len() == 1)
        .map(|(id, _)| id)
        .collect()
}

fn param_count<B: Backend, M: Module<B>>(module: &M) -> usize {
    param_shapes(module).len()
}

/// Every parameter's value, in visiting order.
fn param_values<B: Backend, M: Module<B>>(module: &M) -> Vec<TensorData> {
    struct V(Vec<TensorData>);
    impl<B: Backend> ModuleVisitor<B> for V {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0.push(param.val().into_data());
        }
    }
    let mut v = V(Vec::new());
    module.visit(&mut v);
    v.0
}

/// `module` with its parameters' values replaced, in visiting order.
fn with_values<B: Backend, M: Module<B>>(
    module: M,
    values: Vec<TensorData>,
    device: &B::Device,
) -> Result<M> {
    struct Mp<'a, B: Backend> {
        values: std::vec::IntoIter<TensorData>,
        device: &'a B::Device,
        error: Option<String>,
    }
    impl<B: Backend> ModuleMapper<B> for Mp<'_, B> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let Some(value) = self.values.next() else {
                self.error = Some("too few parameter values".into());
                return param;
            };
            if value.shape.as_slice() != param.shape().as_slice() {
                self.error = Some(format!(
                    "a parameter of shape {:?} got a value of shape {:?}",
                    param.shape().as_slice(),
                    value.shape
                ));
                return param;
            }
            let (id, _, mapper) = param.consume();
            Param::from_mapped_value(id, Tensor::from_data(value, self.device), mapper)
        }
    }
    let mut mapper = Mp::<B> {
        values: values.into_iter(),
        device,
        error: None,
    };
    let module = module.map(&mut mapper);
    match mapper.error {
        Some(e) => Err(DistError::Collective(format!(
            "consolidating the model: {e}"
        ))),
        None => Ok(module),
    }
}

/// The whole stage from this rank's shard: every sharded projection's pieces gathered from the
/// group and put back in place (the row-parallel biases are the first shard's).
fn unshard_stage<B: Backend>(
    stage: Stage<B>,
    config: &ModelConfig,
    group: &Group<B>,
) -> Result<Stage<B>> {
    let t = group.size();
    let (h, kvh, hd) = (config.n_heads, config.n_kv_heads, config.head_dim());
    let (lh, lkv) = (h / t, kvh / t);
    let join_columns = |w: Tensor<B, 2>, qkv: bool| -> Result<Tensor<B, 2>> {
        let parts = group.all_gather(w)?;
        if !qkv {
            return Ok(Tensor::cat(parts, 1));
        }
        // Each shard's columns are [its q heads | its k heads | its v heads].
        let pick = |from: usize, len: usize| -> Vec<Tensor<B, 2>> {
            parts
                .iter()
                .map(|p| p.clone().narrow(1, from, len))
                .collect()
        };
        let mut all = pick(0, lh * hd);
        all.extend(pick(lh * hd, lkv * hd));
        all.extend(pick((lh + lkv) * hd, lkv * hd));
        Ok(Tensor::cat(all, 1))
    };
    let join_bias = |b: Tensor<B, 1>, qkv: bool| -> Result<Tensor<B, 1>> {
        let w = join_columns(b.unsqueeze_dim::<2>(0), qkv)?;
        let n = w.dims()[1];
        Ok(w.reshape([n]))
    };
    let join_rows =
        |w: Tensor<B, 2>| -> Result<Tensor<B, 2>> { Ok(Tensor::cat(group.all_gather(w)?, 0)) };
    let first = group.index() == 0;
    let mut stage = stage;
    let mut blocks = Vec::with_capacity(stage.blocks.len());
    for mut block in std::mem::take(&mut stage.blocks) {
        let qkv = &mut block.attn.qkv;
        qkv.weight = Param::initialized(qkv.weight.id, join_columns(qkv.weight.val(), true)?);
        if let Some(b) = qkv.bias.take() {
            qkv.bias = Some(Param::initialized(b.id, join_bias(b.val(), true)?));
        }
        let proj = &mut block.attn.proj;
        proj.weight = Param::initialized(proj.weight.id, join_rows(proj.weight.val())?);
        block.attn.n_heads = h;
        block.attn.n_kv_heads = kvh;
        let mut columns = vec![&mut block.mlp.up];
        if let Some(gate) = block.mlp.gate.as_mut() {
            columns.insert(0, gate);
        }
        for p in columns {
            p.weight = Param::initialized(p.weight.id, join_columns(p.weight.val(), false)?);
            if let Some(b) = p.bias.take() {
                p.bias = Some(Param::initialized(b.id, join_bias(b.val(), false)?));
            }
        }
        let down = &mut block.mlp.down;
        down.weight = Param::initialized(down.weight.id, join_rows(down.weight.val())?);
        // Row-parallel biases live on the first shard: only there does the whole stage have them.
        if !first {
            block.attn.proj.bias = None;
            block.mlp.down.bias = None;
        }
        blocks.push(block);
    }
    stage.blocks = blocks;
    stage.tensor_parallel = Default::default();
    Ok(stage)
}

/// Sums of squares of the gradients of `counted` parameters, in f32 per tensor, summed in f64.
fn square_sum<B: TensorParallelBackend>(
    stage: &Stage<B>,
    grads: &GradientsParams,
    counted: &HashSet<ParamId>,
) -> f64 {
    struct V<'a> {
        grads: &'a GradientsParams,
        counted: &'a HashSet<ParamId>,
        total: f64,
    }
    impl<B: TensorParallelBackend> ModuleVisitor<B> for V<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if !self.counted.contains(&param.id) {
                return;
            }
            if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
                self.total += g.powi_scalar(2).sum().into_scalar().elem::<f64>();
            }
        }
    }
    let mut v = V {
        grads,
        counted,
        total: 0.0,
    };
    stage.visit(&mut v);
    v.total
}

/// Every gradient of `stage` averaged over `group`, as one all-reduce of all of them.
fn all_reduce_mean<B: TensorParallelBackend>(
    stage: &Stage<B>,
    grads: GradientsParams,
    group: &Group<B::InnerBackend>,
) -> Result<GradientsParams> {
    struct Collect<'a, B: Backend> {
        grads: &'a mut GradientsParams,
        parts: Vec<(ParamId, Vec<usize>, Tensor<B, 1>)>,
    }
    impl<B: TensorParallelBackend> ModuleVisitor<B> for Collect<'_, B::InnerBackend> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
                let shape = g.dims().to_vec();
                let n: usize = shape.iter().product();
                self.parts.push((param.id, shape, g.reshape([n])));
            }
        }
    }
    let mut grads = grads;
    let mut c = Collect::<B::InnerBackend> {
        grads: &mut grads,
        parts: Vec::new(),
    };
    stage.visit(&mut c);
    let parts = c.parts;
    if parts.is_empty() {
        return Ok(grads);
    }
    let lens: Vec<usize> = parts.iter().map(|(_, s, _)| s.iter().product()).collect();
    let flat = Tensor::cat(parts.iter().map(|(_, _, t)| t.clone()).collect(), 0);
    let summed = group.all_reduce_sum(flat)?.div_scalar(group.size() as f64);
    let mut out = GradientsParams::new();
    let mut offset = 0;
    for ((id, shape, _), len) in parts.into_iter().zip(lens) {
        let piece = summed.clone().narrow(0, offset, len);
        offset += len;
        match shape.len() {
            1 => out.register(id, piece),
            2 => out.register(id, piece.reshape([shape[0], shape[1]])),
            3 => out.register(id, piece.reshape([shape[0], shape[1], shape[2]])),
            _ => {
                return Err(DistError::Config(format!(
                    "parameter of {} dimensions",
                    shape.len()
                )));
            }
        }
    }
    Ok(out)
}
