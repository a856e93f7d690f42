//! # kiln-quantize
//!
//! Weight quantization for Kiln models.
//!
//! - [`quantize_file`]: a GGUF model into another in one of llama.cpp's types or mixes
//!   ([`Scheme`]: `q8_0` … `q6_k`, `q4_k_m`), each tensor's type chosen as `llama-quantize`
//!   chooses it ([`scheme`]) and encoded by `kiln-gguf`'s reference quantizers, so the bytes equal
//!   llama.cpp's; metadata (tokenizer, chat template, architecture) is kept.
//! - [`gptq`]: GPTQ (Frantar et al., 2022) into the same block layouts, from the calibration
//!   statistics [`collect_hessians`] gathers by running text through the model.
//!
//! Second, [`quantize_for_decoding`] gives every
//! [`Projection`](kiln_transformer::Projection) of a [`Transformer`](kiln_transformer::Transformer)
//! (and its output head) an [`Int8Matrix`](kiln_kernels::Int8Matrix) kernel: `Q8_0` weights (one
//! scale per 32 inputs) that the CPU multiplies by without expanding them, so a decoding step reads
//! a quarter of the bytes of f32 weights, which is what bounds token-by-token generation on a
//! CPU. The f32 weights stay for prefill and training, where matrix products are compute-bound.
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

#![warn(missing_docs)]

pub mod calibrate;
mod error;
pub mod file;
pub mod gptq;
mod model;
pub mod scheme;

pub use calibrate::collect_hessians;
pub use error::QuantizeError;
pub use file::{FileOptions, FileReport, quantize_file};
pub use model::{QuantizeReport, quantize_for_decoding};
pub use scheme::Scheme;
