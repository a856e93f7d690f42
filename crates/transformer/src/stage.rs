//! [`Stage`]: a contiguous run of a model's layers, one rank's part of a pipeline-parallel model.
//! The first stage embeds the tokens, the last applies the final norm and the output head; the
//! ones between pass hidden states on. A model splits into stages
//! ([`Transformer::into_stages`]) and joins back ([`Transformer::from_stages`]) with every
//! parameter keeping its id, so checkpoints and optimizer states line up with the whole model's.

use std::ops::Range;

use burn::module::Module;
use burn::nn::{Dropout, Embedding};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::block::Block;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::linear::Projection;
use crate::model::{Transformer, attention_context, embed};
use crate::norm::Norm;
use crate::parallel::TensorParallelSlot;

/// What a stage consumes: token ids (the first stage) or the previous stage's hidden states.
pub enum StageInput<B: Backend> {
    /// `[batch, seq]` token ids.
    Tokens(Tensor<B, 2, Int>),
    /// `[batch, seq, d_model]` hidden states.
    Hidden(Tensor<B, 3>),
}

/// Layers `layers` of a model, with the embeddings if it is the first stage and the final norm and
/// output head if it is the last. With tied embeddings the last stage holds its own copy of the
/// token embedding for the head (as Megatron-LM does); the two copies' gradients must be summed.
#[derive(Module, Debug)]
pub struct Stage<B: Backend> {
    /// Token embedding: the first stage's input, and the last stage's head when tied.
    pub tok_emb: Option<Embedding<B>>,
    /// Learned position embedding (first stage, GPT-2).
    pub pos_emb: Option<Embedding<B>>,
    /// This stage's blocks.
    pub blocks: Vec<Block<B>>,
    /// Final norm (last stage).
    pub norm_f: Option<Norm<B>>,
    /// Untied output projection (last stage).
    pub lm_head: Option<Projection<B>>,
    /// Dropout on the embeddings (first stage, training only).
    pub emb_dropout: Dropout,
    /// The whole model's structure.
    #[module(skip)]
    pub config: ModelConfig,
    /// Which of the model's layers this stage runs.
    #[module(skip)]
    pub layers: Range<usize>,
    /// Megatron's operators when the stage is also split tensor-parallel.
    #[module(skip)]
    pub tensor_parallel: TensorParallelSlot,
}

impl<B: Backend> Stage<B> {
    /// Whether this stage embeds tokens.
    pub fn is_first(&self) -> bool {
        self.layers.start == 0
    }

    /// Whether this stage produces logits.
    pub fn is_last(&self) -> bool {
        self.layers.end == self.config.n_layers
    }

    /// Runs the stage: hidden states `[batch, seq, d_model]` out, or logits `[batch, seq, vocab]`
    /// from the last stage. Positions start at 0 (training).
    pub fn forward(&self, input: StageInput<B>) -> Result<Tensor<B, 3>> {
        let mut x = match (input, &self.tok_emb) {
            (StageInput::Tokens(tokens), Some(tok_emb)) if self.is_first() => {
                let [rows, t] = tokens.dims();
                self.check_context(t)?;
                let device = tokens.device();
                let mut x = embed(tok_emb, tokens, false);
                if self.config.scale_embeddings {
                    x = x.mul_scalar((self.config.d_model as f64).sqrt());
                }
                if let Some(pos_emb) = &self.pos_emb {
                    let ids: Vec<i64> = (0..rows).flat_map(|_| 0..t as i64).collect();
                    let ids =
                        Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [rows, t]), &device);
                    x = x + embed(pos_emb, ids, false);
                }
                self.emb_dropout.forward(x)
            }
            (StageInput::Hidden(x), _) if !self.is_first() => x,
            _ => {
                return Err(ModelError::InvalidArgument(format!(
                    "stage of layers {:?} takes {}",
                    self.layers,
                    if self.is_first() {
                        "token ids"
                    } else {
                        "hidden states"
                    }
                )));
            }
        };
        let [_, t, _] = x.dims();
        self.check_context(t)?;
        let positions = vec![(0..t).collect::<Vec<_>>()];
        let ctx = attention_context(
            &self.config,
            &positions,
            None,
            None,
            self.tensor_parallel.get(),
            &x.device(),
        );
        for block in &self.blocks {
            x = block.forward(x, &ctx, None);
        }
        if !self.is_last() {
            return Ok(x);
        }
        let hidden = match &self.norm_f {
            Some(norm) => norm.forward(x),
            None => return Err(self.missing("the final norm")),
        };
        let [b, t, d] = hidden.dims();
        match (&self.lm_head, &self.tok_emb) {
            (Some(head), _) => Ok(head.forward(hidden)),
            (None, Some(tok_emb)) => Ok(hidden
                .reshape([b * t, d])
                .matmul(tok_emb.weight.val().transpose())
                .reshape([b, t, self.config.vocab_size])),
            (None, None) => Err(self.missing("the output head")),
        }
    }

    fn check_context(&self, t: usize) -> Result<()> {
        self.config.check_context(t)
    }

    fn missing(&self, what: &str) -> ModelError {
        ModelError::InvalidArgument(format!("stage of layers {:?} lacks {what}", self.layers))
    }
}

impl<B: Backend> Transformer<B> {
    /// Splits the model into pipeline stages of `layers_per_stage[i]` consecutive layers each
    /// (they must add up to the layer count, none zero).
    pub fn into_stages(self, layers_per_stage: &[usize]) -> Result<Vec<Stage<B>>> {
        let n = self.config.n_layers;
        if layers_per_stage.is_empty()
            || layers_per_stage.contains(&0)
            || layers_per_stage.iter().sum::<usize>() != n
        {
            return Err(ModelError::InvalidArgument(format!(
                "stages of {layers_per_stage:?} layers do not split {n} layers"
            )));
        }
        let tied = self.config.tied_embeddings;
        let last = layers_per_stage.len() - 1;
        let mut blocks = self.blocks.into_iter();
        let mut start = 0;
        let mut stages = Vec::with_capacity(layers_per_stage.len());
        for (i, &count) in layers_per_stage.iter().enumerate() {
            let (first, is_last) = (i == 0, i == last);
            stages.push(Stage {
                tok_emb: (first || (is_last && tied)).then(|| self.tok_emb.clone()),
                pos_emb: if first { self.pos_emb.clone() } else { None },
                blocks: blocks.by_ref().take(count).collect(),
                norm_f: is_last.then(|| self.norm_f.clone()),
                lm_head: if is_last { self.lm_head.clone() } else { None },
                emb_dropout: self.emb_dropout.clone(),
                config: self.config.clone(),
                layers: start..start + count,
                tensor_parallel: self.tensor_parallel.clone(),
            });
            start += count;
        }
        Ok(stages)
    }

    /// Joins stages (in order, covering every layer once) back into the whole model; the token
    /// embedding is the first stage's.
    pub fn from_stages(stages: Vec<Stage<B>>) -> Result<Self> {
        let bad = |msg: String| Err(ModelError::InvalidArgument(msg));
        let Some(config) = stages.first().map(|s| s.config.clone()) else {
            return bad("no stages to join".into());
        };
        let mut expected = 0;
        for s in &stages {
            if s.layers.start != expected || s.config != config {
                return bad(format!(
                    "stage of layers {:?} does not follow layer {expected} of the same model",
                    s.layers
                ));
            }
            expected = s.layers.end;
        }
        if expected != config.n_layers {
            return bad(format!(
                "the stages end at layer {expected} of {}",
                config.n_layers
            ));
        }
        let mut tok_emb = None;
        let mut pos_emb = None;
        let mut norm_f = None;
        let mut lm_head = None;
        let mut blocks = Vec::with_capacity(config.n_layers);
        let mut emb_dropout = None;
        let mut tensor_parallel = TensorParallelSlot::default();
        for stage in stages {
            if stage.is_first() {
                tok_emb = stage.tok_emb;
                pos_emb = stage.pos_emb;
                emb_dropout = Some(stage.emb_dropout);
                tensor_parallel = stage.tensor_parallel;
            }
            if stage.layers.end == config.n_layers {
                norm_f = stage.norm_f;
                lm_head = stage.lm_head;
            }
            blocks.extend(stage.blocks);
        }
        let (Some(tok_emb), Some(norm_f), Some(emb_dropout)) = (tok_emb, norm_f, emb_dropout)
        else {
            return bad("the stages lack the embedding or the final norm".into());
        };
        if lm_head.is_none() != config.tied_embeddings {
            return bad("the last stage's output head does not match the config".into());
        }
        Ok(Transformer {
            tok_emb,
            pos_emb,
            blocks,
            norm_f,
            lm_head,
            emb_dropout,
            config,
            tied_head_kernel: None,
            tok_emb_kernel: None,
            tensor_parallel,
        })
    }
}
