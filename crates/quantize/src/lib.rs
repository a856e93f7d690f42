//! # kiln-quantize
//!
//! Weight quantization for Kiln models. [`Int8Matrix`] stores a weight matrix as signed 8-bit
//! integers with one f32 scale per block of [`BLOCK`] inputs (the layout of llama.cpp's `Q8_0`),
//! and its [`LinearKernel`](kiln_transformer::LinearKernel) multiplies by it on the CPU without
//! expanding it: a decoding step reads a quarter of the bytes of f32 weights, which is what
//! bounds token-by-token generation on a CPU.
//!
//! [`quantize_for_decoding`] attaches such kernels to every linear layer of a
//! [`Transformer`](kiln_transformer::Transformer) (and its output projection); the f32 weights
//! stay for prefill and training, where matrix products are compute-bound.
//!
//! ```
//! use burn::backend::Flex;
//! use kiln_transformer::{ModelConfig, Transformer};
//!
//! let config = ModelConfig { n_layers: 2, d_model: 64, n_heads: 2, n_kv_heads: 2, d_ff: 128,
//!     vocab_size: 100, context_length: 32, ..ModelConfig::gpt2_124m() };
//! let mut model = Transformer::<Flex>::new(config, &Default::default()).unwrap();
//! let report = kiln_quantize::quantize_for_decoding(&mut model).unwrap();
//! assert_eq!(report.layers, 2 * 4 + 1);
//! ```

mod error;
mod int8;
mod model;

pub use error::QuantizeError;
pub use int8::{BLOCK, Int8Matrix};
pub use model::{QuantizeReport, quantize_for_decoding};
