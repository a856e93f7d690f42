//! The optimizer seam ([`OptimizerStep`]), and its default: AdamW with nanoGPT's parameter groups,
//! plus global-norm gradient clipping.
//!
//! As in nanoGPT's `configure_optimizers`, every parameter of rank ≥ 2 (the matrices, embedding
//! tables included) gets weight decay; biases and norm scales do not. Two AdamW optimizers, one per
//! group, each see only their group's gradients ([`KernelAdamW`](crate::adamw::KernelAdamW):
//! Burn's state and arithmetic, one kernel pass per parameter where the backend has one).

use std::collections::HashSet;
use std::path::Path;

use burn::module::{AutodiffModule, ModuleVisitor, Param, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::record::AdaptorRecord;
use burn::optim::{GradientsParams, Optimizer};
use burn::record::Record;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, FloatDType, Tensor};
use kiln_transformer::{Transformer, WeightSource};

use crate::adamw::KernelAdamW as AdamW;
use crate::checkpoint;
use crate::config::TrainConfig;
use crate::error::Result;

/// Updates a model from its gradients, and saves and restores its own state in checkpoints.
///
/// The trainer calls [`step`](Self::step) once per applied step with the gradients
/// [`GradientSync::sync`](crate::parallel::GradientSync::sync) returned (after clipping). A
/// sharded (ZeRO-1) optimizer keeps only its rank's share of the state, updates that share of the
/// parameters and all-gathers the rest; it returns true from
/// [`sharded_state`](Self::sharded_state) and writes its share under its own file name in
/// [`save`](Self::save), which every rank then calls with the same checkpoint directory.
pub trait OptimizerStep<B: AutodiffBackend, M: AutodiffModule<B>>: Send {
    /// One update at learning rate `lr`. On error the model is lost (the trainer reports
    /// [`TrainError::ModelUnavailable`](crate::TrainError::ModelUnavailable) afterwards).
    fn step(&mut self, lr: f64, module: M, grads: GradientsParams) -> Result<M>;

    /// Writes the optimizer's state into the checkpoint directory `dir` (being assembled).
    fn save(&self, dir: &Path) -> Result<()>;

    /// Replaces the optimizer's state with the one [`save`](Self::save) wrote in `dir`.
    fn load(&mut self, dir: &Path, device: &B::Device) -> Result<()>;

    /// Whether each rank holds (and saves) its own share of the state. False (the default):
    /// every rank holds the whole state, and only rank 0 saves it.
    fn sharded_state(&self) -> bool {
        false
    }

    /// The model a forward pass (training or evaluation) starts from: the full working model, or,
    /// with a [`weight_source`](Self::weight_source), the stored form that source gathers from.
    /// Every rank calls it; the default returns `module` unchanged.
    fn materialize(&mut self, module: M) -> Result<M> {
        Ok(module)
    }

    /// Where a training forward pass takes each module's weights from, when not from the model
    /// itself: a ZeRO-3 optimizer gathers each block's shards just before the block runs
    /// ([`Transformer::forward_with`](kiln_transformer::Transformer::forward_with)). `None` (the
    /// default): the model's own weights.
    fn weight_source(&self) -> Option<&dyn WeightSource<B>> {
        None
    }

    /// [`weight_source`](Self::weight_source) for forward passes without gradients
    /// (evaluation, on the inner backend).
    fn eval_weight_source(&self) -> Option<&dyn WeightSource<B::InnerBackend>> {
        None
    }

    /// The model back in its resting form after an evaluation or a checkpoint (ZeRO-3: this
    /// rank's shard of each parameter). [`step`](Self::step) returns that form too.
    fn release(&mut self, module: M) -> Result<M> {
        Ok(module)
    }

    /// The model as checkpoints store it (f32 master weights), when the working `module`
    /// differs from it (a bf16 working copy, shards); every rank calls it. `None` (the
    /// default): store `module` itself.
    fn consolidated(&mut self, module: &M) -> Result<Option<M>> {
        let _ = module;
        Ok(None)
    }

    /// Bytes of optimizer state this rank holds (moments, and master weights kept apart from the
    /// model).
    fn state_bytes(&self) -> u64;
}

/// One parameter as the optimizer sees it.
#[derive(Clone, Debug)]
pub struct ParamInfo {
    /// Burn's id of the parameter.
    pub id: ParamId,
    /// Dotted module path, e.g. `blocks.0.attn.qkv.weight`.
    pub path: String,
    /// Number of dimensions.
    pub rank: usize,
    /// Shape.
    pub shape: Vec<usize>,
    /// Whether weight decay applies: rank ≥ 2, as in nanoGPT.
    pub decay: bool,
}

/// Lists the float parameters of `module` with their paths and decay group (by rank).
pub fn param_infos<B: AutodiffBackend, M: AutodiffModule<B>>(module: &M) -> Vec<ParamInfo> {
    struct Visitor {
        stack: Vec<String>,
        out: Vec<ParamInfo>,
    }
    impl<B: burn::tensor::backend::Backend> ModuleVisitor<B> for Visitor {
        fn enter_module(&mut self, name: &str, _container: &str) {
            self.stack.push(name.to_owned());
        }
        fn exit_module(&mut self, _name: &str, _container: &str) {
            self.stack.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let path = self
                .stack
                .iter()
                .filter(|s| !s.is_empty())
                .cloned()
                .collect::<Vec<_>>()
                .join(".");
            self.out.push(ParamInfo {
                id: param.id,
                path,
                rank: D,
                shape: param.val().dims().to_vec(),
                decay: D >= 2,
            });
        }
    }
    let mut v = Visitor {
        stack: Vec::new(),
        out: Vec::new(),
    };
    module.visit(&mut v);
    v.out
}

/// The token and (learned) position embedding tables of `model`, found by structure, not by name.
pub fn embedding_param_ids<B: Backend>(model: &Transformer<B>) -> Vec<ParamId> {
    std::iter::once(model.tok_emb.weight.id)
        .chain(model.pos_emb.as_ref().map(|e| e.weight.id))
        .collect()
}

/// Sum of squares of every gradient in `grads` of `module`'s parameters (the squared global norm
/// of this rank's gradients).
pub fn grad_square_sum<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &GradientsParams,
) -> f64 {
    struct Visitor<'a, B: AutodiffBackend> {
        grads: &'a GradientsParams,
        total: Option<Tensor<B::InnerBackend, 1>>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Visitor<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
                // Summed in f32 whatever each gradient's dtype (they may differ: a bf16 working
                // copy beside f32 parameters, an empty shard).
                let s = g.square().sum().cast(FloatDType::F32);
                self.total = Some(match self.total.take() {
                    Some(t) => t + s,
                    None => s,
                });
            }
        }
    }
    let mut v = Visitor::<B> { grads, total: None };
    module.visit(&mut v);
    v.total.map_or(0.0, |t| t.into_scalar().elem::<f64>())
}

/// Multiplies every gradient of `module`'s parameters in `grads` by `factor`.
pub fn scale_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &mut GradientsParams,
    factor: f64,
) {
    struct Visitor<'a> {
        grads: &'a mut GradientsParams,
        factor: f64,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Visitor<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
                self.grads.register(param.id, g.mul_scalar(self.factor));
            }
        }
    }
    module.visit(&mut Visitor { grads, factor });
}

/// Moves the gradients of `ids` out of `grads` into a new set.
fn split_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &mut GradientsParams,
    ids: &HashSet<ParamId>,
) -> GradientsParams {
    struct Visitor<'a> {
        from: &'a mut GradientsParams,
        to: GradientsParams,
        ids: &'a HashSet<ParamId>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Visitor<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if self.ids.contains(&param.id)
                && let Some(g) = self.from.remove::<B::InnerBackend, D>(param.id)
            {
                self.to.register(param.id, g);
            }
        }
    }
    let mut v = Visitor {
        from: grads,
        to: GradientsParams::new(),
        ids,
    };
    module.visit(&mut v);
    v.to
}

/// Scales `grads` by `max_norm / (norm + 1e-6)` when their global norm `norm` (computed by the
/// caller, over all ranks' shards if sharded) is finite and above `max_norm > 0`, as
/// `torch.nn.utils.clip_grad_norm_` does.
pub fn clip_to<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &mut GradientsParams,
    norm: f64,
    max_norm: f64,
) {
    if max_norm > 0.0 && norm.is_finite() && norm > max_norm {
        scale_grads(module, grads, max_norm / (norm + 1e-6));
    }
}

/// The optimizer state to save in a checkpoint.
#[derive(Record)]
pub struct OptimizerRecord<B: AutodiffBackend, M: AutodiffModule<B>> {
    /// State of the decayed group.
    pub decay: <OptimizerAdaptor<AdamW, M, B> as Optimizer<M, B>>::Record,
    /// State of the group without decay.
    pub no_decay: <OptimizerAdaptor<AdamW, M, B> as Optimizer<M, B>>::Record,
}

/// One group's AdamW state as Burn keeps it: a hash map from parameter id.
type GroupState<B, M> = <OptimizerAdaptor<AdamW, M, B> as Optimizer<M, B>>::Record;

/// [`OptimizerRecord`] as a checkpoint stores it: each group's per-parameter states sorted by
/// parameter id, so two identical runs write identical bytes (Burn's record is a hash map and
/// serializes in hash order).
#[derive(Record)]
pub struct SortedOptimizerRecord<B: AutodiffBackend> {
    /// State of the decayed group, by parameter id.
    pub decay: Vec<(u64, AdaptorRecord<AdamW, B>)>,
    /// State of the group without decay, by parameter id.
    pub no_decay: Vec<(u64, AdaptorRecord<AdamW, B>)>,
}

fn sorted<B: AutodiffBackend, M: AutodiffModule<B>>(
    group: GroupState<B, M>,
) -> Vec<(u64, AdaptorRecord<AdamW, B>)> {
    let mut states: Vec<_> = group.into_iter().map(|(id, s)| (id.val(), s)).collect();
    states.sort_unstable_by_key(|(id, _)| *id);
    states
}

impl<B: AutodiffBackend, M: AutodiffModule<B>> OptimizerRecord<B, M> {
    /// The record in its stored, sorted form.
    pub fn into_sorted(self) -> SortedOptimizerRecord<B> {
        SortedOptimizerRecord {
            decay: sorted::<B, M>(self.decay),
            no_decay: sorted::<B, M>(self.no_decay),
        }
    }

    /// The record back from its stored form.
    pub fn from_sorted(stored: SortedOptimizerRecord<B>) -> Self {
        let group = |states: Vec<(u64, AdaptorRecord<AdamW, B>)>| -> GroupState<B, M> {
            states
                .into_iter()
                .map(|(id, s)| (ParamId::from(id), s))
                .collect()
        };
        Self {
            decay: group(stored.decay),
            no_decay: group(stored.no_decay),
        }
    }
}

/// AdamW over two parameter groups, with global-norm clipping.
pub struct GroupedAdamW<B: AutodiffBackend, M: AutodiffModule<B>> {
    decay: OptimizerAdaptor<AdamW, M, B>,
    no_decay: OptimizerAdaptor<AdamW, M, B>,
    decay_ids: HashSet<ParamId>,
    param_elements: u64,
    stepped: bool,
}

impl<B: AutodiffBackend, M: AutodiffModule<B>> GroupedAdamW<B, M> {
    /// AdamW with `weight_decay` on every parameter of `module` of rank ≥ 2.
    pub fn new(module: &M, beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> Self {
        let adamw = |decay: f64| {
            OptimizerAdaptor::from(AdamW::new(
                beta1 as f32,
                beta2 as f32,
                eps as f32,
                decay as f32,
            ))
        };
        Self {
            decay: adamw(weight_decay),
            no_decay: adamw(0.0),
            decay_ids: param_infos(module)
                .into_iter()
                .filter(|p| p.decay)
                .map(|p| p.id)
                .collect(),
            param_elements: module.num_params() as u64,
            stepped: false,
        }
    }

    /// Exempts the parameters `ids` from weight decay (e.g. [`embedding_param_ids`]).
    pub fn without_decay(mut self, ids: impl IntoIterator<Item = ParamId>) -> Self {
        for id in ids {
            self.decay_ids.remove(&id);
        }
        self
    }

    /// Whether the parameter `id` gets weight decay.
    pub fn decays(&self, id: ParamId) -> bool {
        self.decay_ids.contains(&id)
    }

    /// The global L2 norm of all gradients (as `torch.nn.utils.clip_grad_norm_` computes it).
    pub fn grad_norm(module: &M, grads: &GradientsParams) -> f64 {
        grad_square_sum(module, grads).sqrt()
    }

    /// Scales gradients so their global norm is at most `max_norm`; returns the norm before.
    pub fn clip(module: &M, grads: &mut GradientsParams, max_norm: f64) -> f64 {
        let norm = Self::grad_norm(module, grads);
        clip_to(module, grads, norm, max_norm);
        norm
    }

    /// One optimizer step at learning rate `lr`.
    pub fn step(&mut self, lr: f64, module: M, mut grads: GradientsParams) -> M {
        self.stepped = true;
        let decay_grads = split_grads(&module, &mut grads, &self.decay_ids);
        let module = self.decay.step(lr, module, decay_grads);
        self.no_decay.step(lr, module, grads)
    }

    /// The optimizer state.
    pub fn to_record(&self) -> OptimizerRecord<B, M> {
        OptimizerRecord {
            decay: self.decay.to_record(),
            no_decay: self.no_decay.to_record(),
        }
    }

    /// Restores saved state.
    pub fn load_record(mut self, record: OptimizerRecord<B, M>) -> Self {
        self.stepped |= !(record.decay.is_empty() && record.no_decay.is_empty());
        self.decay = self.decay.load_record(record.decay);
        self.no_decay = self.no_decay.load_record(record.no_decay);
        self
    }
}

impl<B: AutodiffBackend> GroupedAdamW<B, Transformer<B>> {
    /// The trainer's default optimizer for `model`: the config's β₁, β₂, ε and weight decay, the
    /// embedding tables exempt from decay when `decay_embeddings` is off.
    pub fn for_config(model: &Transformer<B>, config: &TrainConfig) -> Self {
        let adamw = Self::new(
            model,
            config.beta1,
            config.beta2,
            config.eps,
            config.weight_decay,
        );
        if config.decay_embeddings {
            adamw
        } else {
            adamw.without_decay(embedding_param_ids(model))
        }
    }
}

/// The default optimizer seam: the whole AdamW state in `optimizer.mpk` of the checkpoint.
impl<B: AutodiffBackend, M: AutodiffModule<B>> OptimizerStep<B, M> for GroupedAdamW<B, M> {
    fn step(&mut self, lr: f64, module: M, grads: GradientsParams) -> Result<M> {
        Ok(GroupedAdamW::step(self, lr, module, grads))
    }

    fn save(&self, dir: &Path) -> Result<()> {
        checkpoint::save_optimizer_record(dir, self.to_record())
    }

    fn state_bytes(&self) -> u64 {
        // Burn's AdamW keeps two f32 moments per parameter once it has stepped.
        if self.stepped {
            self.param_elements * 2 * 4
        } else {
            0
        }
    }

    fn load(&mut self, dir: &Path, device: &B::Device) -> Result<()> {
        let record: OptimizerRecord<B, M> = checkpoint::load_optimizer_record(dir, device)?;
        // Loading replaces the whole state; the adaptors are cheap to clone before it.
        self.stepped = !(record.decay.is_empty() && record.no_decay.is_empty());
        self.decay = self.decay.clone().load_record(record.decay);
        self.no_decay = self.no_decay.clone().load_record(record.no_decay);
        Ok(())
    }
}
