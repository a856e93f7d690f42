//! [`WeightSource`]: where a forward pass takes each module's weights from. The plain forward pass
//! uses the model's own; a sharded trainer (ZeRO-3, FSDP) keeps only a shard of every parameter and
//! gathers each block's weights just before the block runs
//! ([`Transformer::forward_with`](crate::Transformer::forward_with)).

use std::borrow::Cow;

use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorMetadata, TensorPrimitive};

use crate::error::{ModelError, Result};

/// Supplies the values of a model's parameters to a forward pass, module by module.
pub trait WeightSource<B: Backend> {
    /// The value parameter `id` has in this forward pass, given the value the model `stored` (whole,
    /// or this rank's shard). `input` is the activation the module is about to consume (none for
    /// the embeddings): an implementation that records a graph can order its work after it.
    fn weight(
        &self,
        id: ParamId,
        stored: TensorPrimitive<B>,
        input: Option<&Tensor<B, 3>>,
    ) -> Result<TensorPrimitive<B>>;

    /// An error that happened where it could not be returned (inside a backward pass, which cannot
    /// fail), taken out; a trainer checks after every backward pass.
    fn take_deferred_error(&self) -> Option<ModelError> {
        None
    }
}

/// `module` with every parameter replaced by the value `source` gives it (borrowed when there is
/// no source).
pub(crate) fn resolve<'m, B: Backend, M: Module<B>>(
    module: &'m M,
    source: Option<&dyn WeightSource<B>>,
    input: Option<&Tensor<B, 3>>,
) -> Result<Cow<'m, M>> {
    let Some(source) = source else {
        return Ok(Cow::Borrowed(module));
    };
    let mut mapper = SourceMapper {
        source,
        input,
        error: None,
    };
    let mapped = module.clone().map(&mut mapper);
    match mapper.error {
        Some(e) => Err(e),
        None => Ok(Cow::Owned(mapped)),
    }
}

struct SourceMapper<'a, B: Backend> {
    source: &'a dyn WeightSource<B>,
    input: Option<&'a Tensor<B, 3>>,
    error: Option<ModelError>,
}

impl<B: Backend> ModuleMapper<B> for SourceMapper<'_, B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        if self.error.is_some() {
            return param;
        }
        let (id, value, mapper) = param.consume();
        match self
            .source
            .weight(id, value.clone().into_primitive(), self.input)
        {
            Ok(v) if v.rank() == D => {
                Param::from_mapped_value(id, Tensor::from_primitive(v), mapper)
            }
            Ok(v) => {
                self.error = Some(ModelError::InvalidArgument(format!(
                    "the weight source gave parameter {id} {} dimensions, the model has {D}",
                    v.rank()
                )));
                Param::from_mapped_value(id, value, mapper)
            }
            Err(e) => {
                self.error = Some(e);
                Param::from_mapped_value(id, value, mapper)
            }
        }
    }
}
