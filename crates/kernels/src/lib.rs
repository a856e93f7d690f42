//! # kiln-kernels
//!
//! Kiln's backend-specific fast paths, behind interfaces the generic model code calls:
//!
//! - [`fused`]: causal attention, LayerNorm and GELU as one kernel each, forward and backward.
//!   The model asks [`fused::ops::<B>()`](fused::ops) for its backend's kernels. With the `flex`
//!   feature (default) Burn's Flex CPU backend, with and without autodiff, resolves to Kiln's
//!   kernels with **no init call**: a program that only depends on `kiln-transformer` or
//!   `kiln-trainer` gets them.
//! - [`LinearKernel`]: a linear layer's product computed on the host from weights in the kernel's
//!   own format, and [`Int8Matrix`], `Q8_0` weights with AVX-512 / AVX2 / portable kernels chosen
//!   at run time, for decoding.
//! - [`QuantLinear`] / [`QuantMatrix`]: weights kept in GGUF's `Q4_0`, `Q4_1` and `Q8_0` blocks
//!   (`Q4_1` memory-mapped from the file where possible; `Q4_0` and `Q8_0` repacked at load into
//!   interleaved 16-row tiles), multiplied with 8-bit activations and integer
//!   dot products (AVX-512 VNNI / AVX2 chosen at run time, portable fallback) for decoding and
//!   prefill alike; the only resident copy of a quantized model's weights.
//! - [`runs_host_kernels`]: which backends use the host-side kernels (Flex, without autodiff).
//!
//! ```
//! use burn::backend::{Autodiff, Flex};
//! use kiln_kernels::{Int8Matrix, LinearKernel};
//!
//! // Built in, no registration: Flex for inference and Autodiff<Flex> for training.
//! assert!(kiln_kernels::fused::ops::<Flex>().is_some());
//! assert!(kiln_kernels::fused::ops::<Autodiff<Flex>>().is_some());
//!
//! // A 2×32 weight quantized to Q8_0, multiplied by one input row.
//! let w: Vec<f32> = (0..64).map(|i| (i as f32 - 32.0) / 32.0).collect();
//! let q = Int8Matrix::quantize(&w, 2, 32)?;
//! let mut y = [0f32; 2];
//! q.forward(&[1.0; 32], 1, &mut y)?;
//! assert!((y[0] - w[..32].iter().sum::<f32>()).abs() < 0.05);
//! # Ok::<(), kiln_kernels::KernelError>(())
//! ```

#![warn(missing_docs)]

#[cfg(feature = "flex")]
pub mod flex;
pub mod fused;
pub mod gemm;
mod host;
mod int8;
mod linear;
pub mod quant;
mod quant_linear;

pub use host::{cpu_description, on_polling_workers, on_worker, runs_host_kernels};
pub use int8::{BLOCK, Int8Matrix};
pub use linear::{KERNEL_MAX_ROWS, KernelError, LinearKernel};
pub use quant::{Q8Rows, QuantMatrix, SharedBytes};
pub use quant_linear::QuantLinear;
