//! The Burn backend the `kiln` binary, examples and benches run on, chosen by cargo feature:
//! `cuda` over `wgpu` over `flex` (the default, pure-Rust CPU). Library crates stay generic over
//! `B: Backend`; only this module names a concrete one.

#[cfg(not(any(feature = "flex", feature = "wgpu", feature = "cuda")))]
compile_error!("enable one backend feature: `flex` (default), `wgpu` or `cuda`");

/// The inference backend selected at compile time.
#[cfg(feature = "cuda")]
pub type DefaultBackend = burn::backend::Cuda;
/// The inference backend selected at compile time.
#[cfg(all(feature = "wgpu", not(feature = "cuda")))]
pub type DefaultBackend = burn::backend::Wgpu;
/// The inference backend selected at compile time.
#[cfg(all(feature = "flex", not(any(feature = "wgpu", feature = "cuda"))))]
pub type DefaultBackend = burn::backend::Flex;

/// The training backend: [`DefaultBackend`] with automatic differentiation.
pub type TrainBackend = burn::backend::Autodiff<DefaultBackend>;

/// The training backend with activation (gradient) checkpointing: Burn's balanced strategy keeps
/// the outputs of compute-bound operations (matmuls) and recomputes memory-bound ones (element-wise
/// operations, activations, norms) in the backward pass instead of storing them. `kiln train`
/// uses it when the config sets `activation_checkpointing = true`.
pub type CheckpointedTrainBackend = burn::backend::Autodiff<
    DefaultBackend,
    burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing,
>;

/// Human-readable name of [`DefaultBackend`].
pub const BACKEND_NAME: &str = if cfg!(feature = "cuda") {
    "cuda"
} else if cfg!(feature = "wgpu") {
    "wgpu"
} else {
    "flex (CPU)"
};

/// Runs a tiny computation on the default device; returns the sum of `[1, 2, 3, 4]` (10.0).
pub fn smoke_test() -> f32 {
    use burn::tensor::{ElementConversion, Tensor};
    let device = Default::default();
    let t = Tensor::<DefaultBackend, 1>::from_floats([1.0, 2.0, 3.0, 4.0], &device);
    t.sum().into_scalar().elem::<f32>()
}
