//! One Transformer block: `x + attn(norm(x))`, then `x + mlp(norm(x))`.

use burn::module::Module;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::attention::{Attention, AttentionContext};
use crate::cache::LayerKv;
use crate::config::ModelConfig;
use crate::mlp::Mlp;
use crate::norm::Norm;
use crate::parallel::{enter, exit};

/// A pre-norm Transformer block.
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    /// Norm before attention.
    pub norm1: Norm<B>,
    /// Causal self-attention.
    pub attn: Attention<B>,
    /// Norm before the MLP.
    pub norm2: Norm<B>,
    /// Feed-forward block.
    pub mlp: Mlp<B>,
}

impl<B: Backend> Block<B> {
    /// A freshly initialized block.
    pub fn new(config: &ModelConfig, device: &B::Device) -> Self {
        Self {
            norm1: Norm::new(config.norm, config.d_model, config.bias, device),
            attn: Attention::new(config, device),
            norm2: Norm::new(config.norm, config.d_model, config.bias, device),
            mlp: Mlp::new(config, device),
        }
    }

    pub(crate) fn forward(
        &self,
        x: Tensor<B, 3>,
        ctx: &AttentionContext<B>,
        kv: Option<&mut LayerKv<B>>,
    ) -> Tensor<B, 3> {
        // Under tensor parallelism each sub-block's output is a partial sum over the group (`exit`)
        // and its input's gradient too (`enter`); dropout follows the sum.
        let tp = ctx.tensor_parallel.as_deref();
        let h = self
            .attn
            .forward(enter(tp, self.norm1.forward(x.clone())), ctx, kv);
        let x = x + self.attn.dropout.forward(exit(tp, h));
        let h = self.mlp.forward(enter(tp, self.norm2.forward(x.clone())));
        x + self.mlp.dropout.forward(exit(tp, h))
    }
}
