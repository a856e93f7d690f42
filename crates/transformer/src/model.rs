//! [`Transformer`]: token embedding → blocks → final norm → logits, with or without a KV cache.

use std::sync::Arc;

use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::nn::{Dropout, DropoutConfig, Embedding};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};
use kiln_kernels::{LinearKernel, on_polling_workers, on_worker, runs_host_kernels};

use crate::attention::AttentionContext;
use crate::block::Block;
use crate::cache::{CacheSlots, KvCache};
use crate::config::{ModelConfig, PositionEncoding};
use crate::error::{ModelError, Result};
use crate::linear::{INIT_STD, Projection, embedding, run_kernel};
use crate::norm::Norm;
use crate::parallel::{TensorParallel, TensorParallelSlot};
use crate::rope::RopeAngles;
use crate::source::{WeightSource, resolve};

/// Which positions to compute logits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Every position: `[batch, seq, vocab]`.
    All,
    /// Only each row's last real token: `[batch, 1, vocab]` (what generation needs).
    Last,
}

/// A decoder-only Transformer (GPT-2 and Llama families), generic over the Burn backend.
#[derive(Module, Debug)]
pub struct Transformer<B: Backend> {
    /// Token embedding `[vocab, d_model]`.
    pub tok_emb: Embedding<B>,
    /// Learned position embedding `[context, d_model]` (GPT-2), absent with RoPE.
    pub pos_emb: Option<Embedding<B>>,
    /// The blocks.
    pub blocks: Vec<Block<B>>,
    /// Final norm.
    pub norm_f: Norm<B>,
    /// Output projection `[d_model, vocab]`; absent when tied to `tok_emb`.
    pub lm_head: Option<Projection<B>>,
    /// Dropout on the embeddings (training only).
    pub emb_dropout: Dropout,
    /// The structure.
    #[module(skip)]
    pub config: ModelConfig,
    /// With tied embeddings: the output projection (`tok_emb` read as `[vocab, d]`) in a kernel's
    /// own format, for decoding (an untied `lm_head` holds its own kernel).
    #[module(skip)]
    pub tied_head_kernel: Option<Arc<dyn LinearKernel>>,
    /// The token embedding table in a kernel's own format, rows read by
    /// [`dequantize_rows`](LinearKernel::dequantize_rows): a quantized model's only copy of it
    /// (`tok_emb` is then made from it only if another path asks).
    #[module(skip)]
    pub tok_emb_kernel: Option<Arc<dyn LinearKernel>>,
    /// Megatron's operators when this model is one rank's shard of a tensor-parallel group
    /// (`kiln-distributed` shards a model and sets them).
    #[module(skip)]
    pub tensor_parallel: TensorParallelSlot,
}

impl ModelConfig {
    /// A randomly initialized model (nanoGPT's initialization) on `device`.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<Transformer<B>> {
        Transformer::new(self.clone(), device)
    }
}

impl<B: Backend> Transformer<B> {
    /// A randomly initialized model.
    pub fn new(config: ModelConfig, device: &B::Device) -> Result<Self> {
        config.validate()?;
        let model = Self {
            tok_emb: embedding(config.vocab_size, config.d_model, device),
            pos_emb: matches!(config.position, PositionEncoding::Learned)
                .then(|| embedding(config.context_length, config.d_model, device)),
            blocks: (0..config.n_layers)
                .map(|_| Block::new(&config, device))
                .collect(),
            norm_f: Norm::new(config.norm, config.d_model, config.bias, device),
            lm_head: (!config.tied_embeddings).then(|| {
                Projection::new(config.d_model, config.vocab_size, false, INIT_STD, device)
            }),
            emb_dropout: DropoutConfig::new(config.dropout).init(),
            config,
            tied_head_kernel: None,
            tok_emb_kernel: None,
            tensor_parallel: TensorParallelSlot::default(),
        };
        Ok(model.map(&mut PathParamIds::default()))
    }

    /// The structure.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Calls `f` on every [`Projection`] (attention, MLP and an untied output head) with its
    /// parameter path (`blocks.3.attn.qkv`, for messages); stops at the first error.
    pub fn try_for_each_projection<E>(
        &mut self,
        mut f: impl FnMut(&str, &mut Projection<B>) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        for (i, block) in self.blocks.iter_mut().enumerate() {
            f(&format!("blocks.{i}.attn.qkv"), &mut block.attn.qkv)?;
            f(&format!("blocks.{i}.attn.proj"), &mut block.attn.proj)?;
            if let Some(gate) = &mut block.mlp.gate {
                f(&format!("blocks.{i}.mlp.gate"), gate)?;
            }
            f(&format!("blocks.{i}.mlp.up"), &mut block.mlp.up)?;
            f(&format!("blocks.{i}.mlp.down"), &mut block.mlp.down)?;
        }
        if let Some(head) = &mut self.lm_head {
            f("lm_head", head)?;
        }
        Ok(())
    }

    /// Full causal forward pass over `tokens` (`[batch, seq]`, positions from 0): logits
    /// `[batch, seq, vocab]`. This is the training path; dropout is active on autodiff backends.
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Result<Tensor<B, 3>> {
        if runs_host_kernels::<B>() {
            // See `forward_rows`.
            return on_worker(|| self.forward_here(tokens));
        }
        self.forward_here(tokens)
    }

    fn forward_here(&self, tokens: Tensor<B, 2, Int>) -> Result<Tensor<B, 3>> {
        let [_, t] = tokens.dims();
        self.check_context(t)?;
        let positions = vec![(0..t).collect::<Vec<_>>()];
        let ctx = self.context(&positions, None, None, &tokens.device());
        let hidden = self.hidden(tokens, &positions, &ctx, None, None)?;
        self.logits(hidden, None)
    }

    /// [`forward`](Self::forward) with every module's weights taken from `source` just before the
    /// module runs: each block's when the activations reach it, the output head's after the last
    /// block. This is how a ZeRO-3 rank, which holds only a shard of every parameter, runs a model
    /// whose whole weights never exist at once.
    pub fn forward_with(
        &self,
        tokens: Tensor<B, 2, Int>,
        source: &dyn WeightSource<B>,
    ) -> Result<Tensor<B, 3>> {
        let [_, t] = tokens.dims();
        self.check_context(t)?;
        let positions = vec![(0..t).collect::<Vec<_>>()];
        let ctx = self.context(&positions, None, None, &tokens.device());
        let hidden = self.hidden(tokens, &positions, &ctx, None, Some(source))?;
        self.logits(hidden, Some(source))
    }

    /// Forward pass that appends `tokens` (`[batch, seq]`) to `cache` and attends to everything cached.
    ///
    /// `valid[i]` (default: all of `seq`) is how many of row `i`'s tokens are real; the rest is padding
    /// that is written to the cache but never attended to, and is overwritten by the row's next tokens.
    /// This is how a batch of prompts of different lengths is prefilled in one pass.
    pub fn forward_cached(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
        valid: Option<&[usize]>,
        which: Logits,
    ) -> Result<Tensor<B, 3>> {
        let [b, _] = tokens.dims();
        if b != cache.batch_size() {
            return Err(ModelError::InvalidArgument(format!(
                "{b} rows of tokens for a cache of {} rows",
                cache.batch_size()
            )));
        }
        let rows: Vec<usize> = (0..b).collect();
        self.forward_rows(tokens, cache, &rows, valid, which)
    }

    /// Like [`forward_cached`](Self::forward_cached), but only for some of the cache's rows: row `i`
    /// of `tokens` continues cache row `rows[i]`, and the other rows are left as they are. This is the
    /// step of continuous batching, where sequences join and leave a running batch.
    pub fn forward_rows(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
        rows: &[usize],
        valid: Option<&[usize]>,
        which: Logits,
    ) -> Result<Tensor<B, 3>> {
        if runs_host_kernels::<B>() {
            // On a worker of the host kernels' thread pool, so that their parallel loops share the
            // work with this thread instead of waking every worker while it sleeps, and with the
            // other workers polling for the next loop rather than sleeping between two (decoding
            // makes ~150 such loops per token).
            on_polling_workers(|| self.forward_rows_here(tokens, cache, rows, valid, which))
        } else {
            self.forward_rows_here(tokens, cache, rows, valid, which)
        }
    }

    fn forward_rows_here(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
        rows: &[usize],
        valid: Option<&[usize]>,
        which: Logits,
    ) -> Result<Tensor<B, 3>> {
        let [b, t] = tokens.dims();
        let mut seen = vec![false; cache.batch_size()];
        if rows.len() != b
            || rows
                .iter()
                .any(|&r| r >= seen.len() || std::mem::replace(&mut seen[r], true))
        {
            return Err(ModelError::InvalidArgument(format!(
                "rows {rows:?} do not name {b} distinct rows of a cache of {}",
                cache.batch_size()
            )));
        }
        let valid: Vec<usize> = match valid {
            Some(v) if v.len() != b || v.iter().any(|&n| n > t) => {
                return Err(ModelError::InvalidArgument(format!(
                    "valid lengths {v:?} do not fit {b} rows of {t} tokens"
                )));
            }
            Some(v) => v.to_vec(),
            None => vec![t; b],
        };
        let starts: Vec<usize> = rows.iter().map(|&r| cache.lens[r]).collect();
        for &s in &starts {
            if s + t > cache.capacity() {
                return Err(ModelError::ContextOverflow {
                    needed: s + t,
                    limit: cache.capacity(),
                });
            }
        }
        let uniform = starts.iter().all(|&s| s == starts[0]) && valid.iter().all(|&n| n == t);
        let keys_len = starts.iter().map(|s| s + t).max().unwrap_or(t);
        let positions: Vec<Vec<usize>> = if uniform {
            vec![(starts[0]..starts[0] + t).collect()]
        } else {
            starts.iter().map(|&s| (s..s + t).collect()).collect()
        };
        let device = tokens.device();
        let mask = (!uniform).then(|| self.ragged_mask(&starts, &valid, t, keys_len, &device));
        let slots = CacheSlots {
            rows: rows.to_vec(),
            starts,
            keys_len,
        };
        let ctx = self.context(&positions, mask, Some(slots), &device);
        let hidden = self.hidden(tokens, &positions, &ctx, Some(cache), None)?;
        for (&row, n) in rows.iter().zip(&valid) {
            cache.lens[row] += n;
        }
        let hidden = match which {
            Logits::All => hidden,
            Logits::Last => last_rows(hidden, &valid),
        };
        self.logits(hidden, None)
    }

    fn check_context(&self, t: usize) -> Result<()> {
        self.config.check_context(t)
    }

    fn context(
        &self,
        positions: &[Vec<usize>],
        mask: Option<Tensor<B, 4, Bool>>,
        cache: Option<CacheSlots>,
        device: &B::Device,
    ) -> AttentionContext<B> {
        attention_context(
            &self.config,
            positions,
            mask,
            cache,
            self.tensor_parallel.get(),
            device,
        )
    }

    /// `true` where row `r`'s query `i` must not see key `j`: the future, and the row's padding.
    fn ragged_mask(
        &self,
        starts: &[usize],
        valid: &[usize],
        t: usize,
        keys: usize,
        device: &B::Device,
    ) -> Tensor<B, 4, Bool> {
        let b = starts.len();
        let mut data = Vec::with_capacity(b * t * keys);
        for (&s, &n) in starts.iter().zip(valid) {
            for i in 0..t {
                data.extend((0..keys).map(|j| j > s + i || j >= s + n.max(1)));
            }
        }
        let mask = Tensor::<B, 4, Bool>::from_data(TensorData::new(data, [b, 1, t, keys]), device);
        mask.expand([b, self.config.n_heads, t, keys])
    }

    /// The final-norm hidden states; each module's weights from `source` when given.
    fn hidden(
        &self,
        tokens: Tensor<B, 2, Int>,
        positions: &[Vec<usize>],
        ctx: &AttentionContext<B>,
        mut cache: Option<&mut KvCache<B>>,
        source: Option<&dyn WeightSource<B>>,
    ) -> Result<Tensor<B, 3>> {
        let device = tokens.device();
        let mut x = match self.tok_emb_rows(&tokens, source) {
            Some(x) => x,
            None => embed(
                &*resolve(&self.tok_emb, source, None)?,
                tokens,
                source.is_some(),
            ),
        };
        if self.config.scale_embeddings {
            x = x.mul_scalar((self.config.d_model as f64).sqrt());
        }
        if let Some(pos_emb) = &self.pos_emb {
            let rows = positions.len();
            let t = positions.first().map_or(0, Vec::len);
            let flat: Vec<i64> = positions.iter().flatten().map(|&p| p as i64).collect();
            let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [rows, t]), &device);
            x = x + embed(&*resolve(pos_emb, source, None)?, ids, source.is_some());
        }
        let mut x = self.emb_dropout.forward(x);
        for (i, block) in self.blocks.iter().enumerate() {
            let kv = cache.as_deref_mut().and_then(|c| c.layers.get_mut(i));
            let block = resolve(block, source, Some(&x))?;
            x = block.forward(x, ctx, kv);
        }
        Ok(resolve(&self.norm_f, source, Some(&x))?.forward(x))
    }

    /// The embeddings of `tokens` read from [`tok_emb_kernel`](Self::tok_emb_kernel), when the
    /// model has one, uses host kernels, and takes its weights from nowhere else.
    fn tok_emb_rows(
        &self,
        tokens: &Tensor<B, 2, Int>,
        source: Option<&dyn WeightSource<B>>,
    ) -> Option<Tensor<B, 3>> {
        let kernel = self.tok_emb_kernel.as_ref()?;
        if source.is_some() || !runs_host_kernels::<B>() {
            return None;
        }
        let [b, t] = tokens.dims();
        let ids: Vec<usize> = tokens
            .to_data()
            .convert::<i64>()
            .into_vec::<i64>()
            .ok()?
            .into_iter()
            .map(|id| usize::try_from(id).unwrap_or(usize::MAX))
            .collect();
        let d = kernel.in_features();
        let mut rows = vec![0f32; ids.len() * d];
        kernel.dequantize_rows(&ids, &mut rows).ok()?;
        Some(Tensor::from_data(
            TensorData::new(rows, [b, t, d]),
            &tokens.device(),
        ))
    }

    /// Logits from final-norm hidden states; the head's weights from `source` when given.
    fn logits(
        &self,
        hidden: Tensor<B, 3>,
        source: Option<&dyn WeightSource<B>>,
    ) -> Result<Tensor<B, 3>> {
        let [b, t, d] = hidden.dims();
        if let Some(kernel) = &self.tied_head_kernel
            && source.is_none()
            && self.lm_head.is_none()
            && b * t <= kernel.max_rows()
            && (runs_host_kernels::<B>() || kernel.on_any_backend())
            && let Some(y) = run_kernel(kernel.as_ref(), hidden.clone().reshape([b * t, d]), b * t)
        {
            return Ok(y.reshape([b, t, self.config.vocab_size]));
        }
        Ok(match &self.lm_head {
            Some(head) => resolve(head, source, Some(&hidden))?.forward(hidden),
            None => {
                let w = resolve(&self.tok_emb, source, Some(&hidden))?.weight.val();
                let v = self.config.vocab_size;
                let rows = hidden.reshape([b * t, d]);
                if b * t <= 64 {
                    // Few rows (generation): `W · hᵀ` reads the embedding in its stored layout
                    // instead of materializing its transpose on every step.
                    w.matmul(rows.transpose()).transpose().reshape([b, t, v])
                } else {
                    rows.matmul(w.transpose()).reshape([b, t, v])
                }
            }
        })
    }
}

/// The per-forward inputs every block shares.
pub(crate) fn attention_context<B: Backend>(
    config: &ModelConfig,
    positions: &[Vec<usize>],
    mask: Option<Tensor<B, 4, Bool>>,
    cache: Option<CacheSlots>,
    tensor_parallel: Option<Arc<dyn TensorParallel<B>>>,
    device: &B::Device,
) -> AttentionContext<B> {
    let rope = match config.position {
        PositionEncoding::Rope { theta, pairing } => Some((
            RopeAngles::new(positions, config.head_dim(), theta, device),
            pairing,
        )),
        PositionEncoding::Learned => None,
    };
    AttentionContext {
        rope,
        mask,
        cache,
        tensor_parallel,
    }
}

/// Gives every parameter an id derived from its path (`blocks.3.attn.qkv.weight`) instead of
/// Burn's random one, so two identical runs save byte-identical model and optimizer records (both
/// are keyed by parameter id). Ids only need to be unique within a model.
#[derive(Default)]
struct PathParamIds {
    path: Vec<String>,
}

impl PathParamIds {
    fn id(&self) -> ParamId {
        // FNV-1a over the dotted path.
        let hash = self
            .path
            .iter()
            .filter(|s| !s.is_empty())
            .enumerate()
            .flat_map(|(i, s)| (i > 0).then_some(b'.').into_iter().chain(s.bytes()))
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
        ParamId::from(hash)
    }
}

impl<B: Backend> ModuleMapper<B> for PathParamIds {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_owned());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, mut param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        param.id = self.id();
        param
    }
}

/// The rows of `table` for `ids`. With weights from a [`WeightSource`] the lookup is a row
/// selection: Burn's embedding op keeps its whole table alive until the backward pass, a selection
/// keeps only the indices, so a gathered table can be dropped after the forward pass.
pub(crate) fn embed<B: Backend>(
    table: &Embedding<B>,
    ids: Tensor<B, 2, Int>,
    sourced: bool,
) -> Tensor<B, 3> {
    if !sourced {
        return table.forward(ids);
    }
    let [b, t] = ids.dims();
    let d = table.weight.dims()[1];
    table
        .weight
        .val()
        .select(0, ids.reshape([b * t]))
        .reshape([b, t, d])
}

/// Row `r`'s hidden state at position `valid[r] - 1`: `[batch, 1, d]`.
fn last_rows<B: Backend>(hidden: Tensor<B, 3>, valid: &[usize]) -> Tensor<B, 3> {
    let [b, t, d] = hidden.dims();
    if valid.iter().all(|&n| n == t) {
        return hidden.slice([0..b, t - 1..t, 0..d]);
    }
    let index: Vec<i64> = valid
        .iter()
        .enumerate()
        .map(|(r, &n)| (r * t + n.max(1) - 1) as i64)
        .collect();
    let index = Tensor::<B, 1, Int>::from_data(TensorData::new(index, [b]), &hidden.device());
    hidden
        .reshape([b * t, d])
        .select(0, index)
        .reshape([b, 1, d])
}
