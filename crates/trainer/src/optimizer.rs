//! AdamW with nanoGPT's parameter groups, and global-norm gradient clipping.
//!
//! Matrices (rank ≥ 2, except embeddings) get weight decay; biases, norm scales and embeddings do
//! not. Two Burn `AdamW` optimizers, one per group, each see only their group's gradients.

use std::collections::HashSet;

use burn::module::{AutodiffModule, ModuleVisitor, Param, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWConfig, GradientsParams, Optimizer};
use burn::record::Record;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};

/// One parameter as the optimizer sees it.
#[derive(Clone, Debug)]
pub struct ParamInfo {
    /// Burn's id of the parameter.
    pub id: ParamId,
    /// Dotted module path, e.g. `blocks.0.attn.qkv.weight`.
    pub path: String,
    /// Number of dimensions.
    pub rank: usize,
    /// Whether it is an embedding table.
    pub embedding: bool,
    /// Whether weight decay applies.
    pub decay: bool,
}

/// Lists the float parameters of `module` with their paths and decay group.
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
            let embedding = path.contains("emb");
            let decay = D >= 2 && !embedding;
            self.out.push(ParamInfo {
                id: param.id,
                path,
                rank: D,
                embedding,
                decay,
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

/// Sum of squares of every gradient in `grads` (for the global norm).
fn grad_square_sum<B: AutodiffBackend, M: AutodiffModule<B>>(
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
                let s = g.square().sum();
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

/// The optimizer state to save in a checkpoint.
#[derive(Record)]
pub struct OptimizerRecord<B: AutodiffBackend, M: AutodiffModule<B>> {
    /// State of the decayed group.
    pub decay: <OptimizerAdaptor<AdamW, M, B> as Optimizer<M, B>>::Record,
    /// State of the group without decay.
    pub no_decay: <OptimizerAdaptor<AdamW, M, B> as Optimizer<M, B>>::Record,
}

/// AdamW over two parameter groups, with global-norm clipping.
pub struct GroupedAdamW<B: AutodiffBackend, M: AutodiffModule<B>> {
    decay: OptimizerAdaptor<AdamW, M, B>,
    no_decay: OptimizerAdaptor<AdamW, M, B>,
    decay_ids: HashSet<ParamId>,
}

impl<B: AutodiffBackend, M: AutodiffModule<B>> GroupedAdamW<B, M> {
    /// AdamW with `weight_decay` on `module`'s matrices.
    pub fn new(module: &M, beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> Self {
        let base = AdamWConfig::new()
            .with_beta_1(beta1 as f32)
            .with_beta_2(beta2 as f32)
            .with_epsilon(eps as f32);
        Self {
            decay: base.clone().with_weight_decay(weight_decay as f32).init(),
            no_decay: base.with_weight_decay(0.0).init(),
            decay_ids: param_infos(module)
                .into_iter()
                .filter(|p| p.decay)
                .map(|p| p.id)
                .collect(),
        }
    }

    /// Also decays the embedding tables (nanoGPT's `configure_optimizers` decays every parameter
    /// of rank ≥ 2, embeddings included).
    pub fn with_embedding_decay(mut self, module: &M, on: bool) -> Self {
        self.decay_ids = param_infos(module)
            .into_iter()
            .filter(|p| p.decay || (on && p.embedding && p.rank >= 2))
            .map(|p| p.id)
            .collect();
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
        if max_norm > 0.0 && norm.is_finite() && norm > max_norm {
            scale_grads(module, grads, max_norm / (norm + 1e-6));
        }
        norm
    }

    /// One optimizer step at learning rate `lr`.
    pub fn step(&mut self, lr: f64, module: M, mut grads: GradientsParams) -> M {
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
        self.decay = self.decay.load_record(record.decay);
        self.no_decay = self.no_decay.load_record(record.no_decay);
        self
    }
}
