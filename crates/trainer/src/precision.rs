//! Mixed precision: the low-precision compute copy of the model, and dynamic loss scaling.
//!
//! The model the optimizer updates stays in f32 (the *master weights*, and AdamW's moments with
//! them). Each micro-batch, [`compute_copy`] casts the f32 model to the compute dtype with a
//! [`ModuleMapper`] that keeps every [`ParamId`](burn::module::ParamId); the casts are recorded by
//! autodiff, so the backward pass runs in bf16/f16 and its cast nodes hand each parameter's gradient
//! back to the f32 master weight *in f32* (Burn's `float_cast` backward casts the gradient to the
//! input's dtype). `GradientsParams::from_grads(grads, &f32_model)` therefore collects f32
//! gradients under the master weights' ids, ready for clipping and AdamW.
//!
//! f16's narrow range (max 65504, smallest normal 6.1e-5) makes small gradients underflow, so f16
//! runs scale the loss by a [`LossScaler`] before backward and divide the f32 gradients by the same
//! factor afterwards, like `torch.cuda.amp.GradScaler`.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{FloatDType, Tensor};
use kiln_kernels::fused::Products;
use serde::{Deserialize, Serialize};

use crate::config::Precision;

impl Precision {
    /// The name used in configs: `f32`, `bf16`, `f16`.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }

    /// The dtype forward and backward run in: `None` for plain f32 (no compute copy).
    pub fn compute_dtype(self) -> Option<FloatDType> {
        match self {
            Precision::F32 => None,
            Precision::Bf16 => Some(FloatDType::BF16),
            Precision::F16 => Some(FloatDType::F16),
        }
    }

    /// How backend `B` runs this precision's matrix products without a compute copy: bf16 on a
    /// backend whose linear-layer kernel multiplies in bf16 on this machine (Flex on CPUs with
    /// AVX512_BF16) keeps every tensor in f32 and rounds only the operands of the linear layers'
    /// products, forward and backward, to bf16, summing in f32, like PyTorch's CPU autocast.
    /// `None` elsewhere: f32, or a [`compute_copy`] in [`compute_dtype`](Self::compute_dtype).
    pub fn linear_products<B: Backend>(self) -> Option<Products> {
        let products = match self {
            Precision::Bf16 => Products::Bf16,
            Precision::F32 | Precision::F16 => return None,
        };
        kiln_kernels::fused::ops::<B>()
            .is_some_and(|ops| ops.multiplies_in(products))
            .then_some(products)
    }
}

/// Casts every float parameter of a module to `dtype`, keeping parameter ids (and, on autodiff
/// backends, the link to the original parameter in the graph).
#[derive(Clone, Copy, Debug)]
pub struct CastMapper {
    /// The target dtype.
    pub dtype: FloatDType,
}

impl<B: Backend> ModuleMapper<B> for CastMapper {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        Param::from_mapped_value(id, tensor.cast(self.dtype), mapper)
    }
}

/// Initializes every lazily initialized parameter of `module` in place.
///
/// Burn's `Param::clone` of a parameter that was never read clones its *initializer*, not its
/// value (burn-core `module/param/base.rs`, `impl Clone for Param`): the clone would draw its own
/// random weights on first use, with its own autodiff node, so a compute copy made from it would
/// neither share the master weights' values nor send gradients to them. Materializing first makes
/// clones share the values.
pub fn materialize<B: Backend, M: Module<B>>(module: &M) {
    struct Visitor;
    impl<B: Backend> ModuleVisitor<B> for Visitor {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let _ = param.val();
        }
    }
    module.visit(&mut Visitor);
}

/// A copy of `module` with every float parameter cast to `dtype` (same parameter ids). On an
/// autodiff backend the casts are part of the graph: gradients flow back to `module`'s parameters
/// in their own dtype.
pub fn compute_copy<B: Backend, M: Module<B>>(module: &M, dtype: FloatDType) -> M {
    materialize(module);
    module.clone().map(&mut CastMapper { dtype })
}

/// What [`LossScaler::update`] did to the scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ScaleUpdate {
    /// The scale stayed.
    Kept,
    /// `growth_interval` clean steps in a row: the scale doubled to this.
    Grew(f64),
    /// The gradients were not finite: the scale halved to this.
    BackedOff(f64),
}

/// Dynamic loss scaling (`torch.cuda.amp.GradScaler`'s policy): the loss is multiplied by
/// [`scale`](Self::scale) before backward and the gradients divided by it after; a step whose
/// gradients are not finite is skipped and halves the scale, and `growth_interval` clean steps in a
/// row double it. A static scaler (bf16, f32) always has scale 1.
///
/// It is part of the trainer state saved with every checkpoint, so a resumed run continues with the
/// same scale and the same count towards the next growth.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    /// The current scale.
    pub scale: f64,
    /// Whether the scale adapts (f16); a static scaler stays at 1.
    pub dynamic: bool,
    /// Clean steps in a row needed to double the scale.
    pub growth_interval: u64,
    /// Clean steps since the scale last changed.
    pub clean_steps: u64,
}

impl Default for LossScaler {
    fn default() -> Self {
        Self::fixed()
    }
}

impl LossScaler {
    /// The scale an f16 run starts with (PyTorch's `GradScaler` default, 2¹⁶).
    pub const INITIAL_SCALE: f64 = 65536.0;

    /// A scaler that never scales (f32, bf16).
    pub fn fixed() -> Self {
        Self {
            scale: 1.0,
            dynamic: false,
            growth_interval: 0,
            clean_steps: 0,
        }
    }

    /// Dynamic scaling from [`INITIAL_SCALE`](Self::INITIAL_SCALE), doubling after
    /// `growth_interval` clean steps.
    pub fn dynamic(growth_interval: u64) -> Self {
        Self {
            scale: Self::INITIAL_SCALE,
            dynamic: true,
            growth_interval: growth_interval.max(1),
            clean_steps: 0,
        }
    }

    /// The scaler a precision needs: dynamic for f16, fixed otherwise.
    pub fn for_precision(precision: Precision, growth_interval: u64) -> Self {
        match precision {
            Precision::F16 => Self::dynamic(growth_interval),
            Precision::F32 | Precision::Bf16 => Self::fixed(),
        }
    }

    /// The factor the loss is multiplied by before backward.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Records a step's outcome (`finite`: the unscaled gradient norm was finite).
    pub fn update(&mut self, finite: bool) -> ScaleUpdate {
        if !self.dynamic {
            return ScaleUpdate::Kept;
        }
        if !finite {
            self.scale *= 0.5;
            self.clean_steps = 0;
            return ScaleUpdate::BackedOff(self.scale);
        }
        self.clean_steps += 1;
        if self.clean_steps >= self.growth_interval {
            self.clean_steps = 0;
            // f32 can represent the product; f16 overflow then shows up as a skipped step.
            if self.scale * 2.0 < f64::from(f32::MAX) {
                self.scale *= 2.0;
                return ScaleUpdate::Grew(self.scale);
            }
        }
        ScaleUpdate::Kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaler_policy() {
        let mut s = LossScaler::dynamic(3);
        assert_eq!(s.scale(), 65536.0);
        assert_eq!(s.update(false), ScaleUpdate::BackedOff(32768.0));
        assert_eq!(s.update(true), ScaleUpdate::Kept);
        assert_eq!(s.update(true), ScaleUpdate::Kept);
        assert_eq!(s.update(true), ScaleUpdate::Grew(65536.0));
        // An overflow resets the count towards the next growth.
        s.update(true);
        s.update(false);
        s.update(true);
        s.update(true);
        assert_eq!(s.scale(), 32768.0);
        let mut fixed = LossScaler::for_precision(Precision::Bf16, 3);
        assert_eq!(fixed.update(false), ScaleUpdate::Kept);
        assert_eq!(fixed.scale(), 1.0);
    }
}
