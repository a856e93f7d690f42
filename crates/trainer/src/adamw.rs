//! [`KernelAdamW`]: Burn's `AdamW` whose update runs as the backend's one-pass kernel where it has
//! one ([`FusedOps::adamw`]), with Burn's state and arithmetic, so checkpoints are the same either
//! way.
//!
//! On the CPU (Flex) Burn's `AdamW` is a dozen whole-tensor ops per parameter on the training
//! thread; the kernel reads each parameter, gradient and moment once, on every core.

use burn::optim::{AdamW, AdamWConfig, AdamWState, AdaptiveMomentumState, SimpleOptimizer};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use kiln_kernels::fused::{self, AdamWStep, AdamWTensors};

/// AdamW with decoupled weight decay (no AMSGrad), updated by the backend's kernel when it has
/// one and by Burn's `AdamW` otherwise.
#[derive(Clone)]
pub struct KernelAdamW {
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    weight_decay: f32,
    burn: AdamW,
}

impl KernelAdamW {
    /// AdamW with these constants.
    pub fn new(beta_1: f32, beta_2: f32, epsilon: f32, weight_decay: f32) -> Self {
        let burn = AdamWConfig::new()
            .with_beta_1(beta_1)
            .with_beta_2(beta_2)
            .with_epsilon(epsilon)
            .with_weight_decay(weight_decay)
            .build();
        Self {
            beta_1,
            beta_2,
            epsilon,
            weight_decay,
            burn,
        }
    }
}

impl<B: Backend> SimpleOptimizer<B> for KernelAdamW {
    type State<const D: usize> = AdamWState<B, D>;

    fn step<const D: usize>(
        &self,
        lr: f64,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<B, D>, Option<Self::State<D>>) {
        let Some(kernels) = fused::ops::<B>() else {
            return SimpleOptimizer::<B>::step(&self.burn, lr, tensor, grad, state);
        };
        let shape = tensor.shape();
        let n = shape.num_elements();
        let time = state.as_ref().map_or(1, |s| s.momentum.time + 1);
        let tensors = AdamWTensors {
            param: tensor.reshape([n]),
            grad: grad.reshape([n]),
            moments: state.map(|s| {
                (
                    s.momentum.moment_1.reshape([n]),
                    s.momentum.moment_2.reshape([n]),
                )
            }),
        };
        let step = AdamWStep {
            lr,
            beta_1: self.beta_1,
            beta_2: self.beta_2,
            epsilon: self.epsilon,
            weight_decay: self.weight_decay,
            time,
        };
        match kernels.adamw(tensors, &step) {
            Ok(AdamWTensors {
                param,
                moments: Some((m, v)),
                ..
            }) => {
                let momentum = AdaptiveMomentumState::new(
                    time,
                    m.reshape(shape.clone()),
                    v.reshape(shape.clone()),
                );
                (param.reshape(shape), Some(AdamWState::new(momentum)))
            }
            Ok(tensors) | Err(tensors) => {
                // Declined (or no moments came back): Burn's AdamW on the same tensors.
                let state = tensors.moments.map(|(m, v)| {
                    AdamWState::new(AdaptiveMomentumState::new(
                        time - 1,
                        m.reshape(shape.clone()),
                        v.reshape(shape.clone()),
                    ))
                });
                let (param, grad) = (
                    tensors.param.reshape(shape.clone()),
                    tensors.grad.reshape(shape),
                );
                SimpleOptimizer::<B>::step(&self.burn, lr, param, grad, state)
            }
        }
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &B::Device) -> Self::State<D> {
        <AdamW as SimpleOptimizer<B>>::to_device(state, device)
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Distribution;
    use burn_flex::Flex;

    use super::*;

    type B = Flex;

    fn random(shape: [usize; 2], seed: u64) -> Tensor<B, 2> {
        <B as Backend>::seed(&Default::default(), seed);
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
    }

    fn assert_close(what: &str, got: &Tensor<B, 2>, want: &Tensor<B, 2>) {
        let (got, want) = (got.to_data(), want.to_data());
        let (got, want) = (
            got.as_slice::<f32>().unwrap(),
            want.as_slice::<f32>().unwrap(),
        );
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-6 * w.abs().max(1e-3),
                "{what}[{i}]: {g} against Burn's {w}"
            );
        }
    }

    /// Flex has the kernel, so the comparison below compares it with Burn's `AdamW`.
    #[test]
    fn flex_runs_the_kernel() {
        let kernels = fused::ops::<B>().expect("Flex's kernels");
        let tensors = AdamWTensors {
            param: random([3, 5], 1).reshape([15]),
            grad: random([3, 5], 2).reshape([15]),
            moments: None,
        };
        let step = AdamWStep {
            lr: 1e-3,
            beta_1: 0.9,
            beta_2: 0.95,
            epsilon: 1e-8,
            weight_decay: 0.1,
            time: 1,
        };
        assert!(kernels.adamw(tensors, &step).is_ok());
    }

    /// Five steps with and without weight decay: the kernel's parameter and moments equal Burn's.
    #[test]
    fn the_kernel_steps_like_burns_adamw() {
        for weight_decay in [0.0, 0.1] {
            let ours = KernelAdamW::new(0.9, 0.95, 1e-8, weight_decay);
            let burn = AdamWConfig::new()
                .with_beta_1(0.9)
                .with_beta_2(0.95)
                .with_epsilon(1e-8)
                .with_weight_decay(weight_decay)
                .build();
            let start = random([67, 129], 7);
            let (mut p_ours, mut p_burn) = (start.clone(), start.clone());
            let (mut s_ours, mut s_burn) = (None, None);
            for step in 0..5u64 {
                let grad = random([67, 129], 100 + step);
                let lr = 1e-3 * (step + 1) as f64;
                (p_ours, s_ours) =
                    SimpleOptimizer::<B>::step(&ours, lr, p_ours, grad.clone(), s_ours);
                (p_burn, s_burn) = SimpleOptimizer::<B>::step(&burn, lr, p_burn, grad, s_burn);
                assert_close("parameter", &p_ours, &p_burn);
                let (a, b): (&AdamWState<B, 2>, &AdamWState<B, 2>) =
                    (s_ours.as_ref().unwrap(), s_burn.as_ref().unwrap());
                assert_eq!(a.momentum.time, b.momentum.time);
                assert_close("first moment", &a.momentum.moment_1, &b.momentum.moment_1);
                assert_close("second moment", &a.momentum.moment_2, &b.momentum.moment_2);
            }
            let moved = (p_ours - start).abs().max().into_scalar();
            assert!(moved > 1e-3, "the parameter did not move ({moved})");
        }
    }
}
