//! # kiln-gguf
//!
//! The model file formats Kiln reads and writes, with no Burn: it sits at the bottom of the
//! workspace.
//!
//! - GGUF, the single-file model format of llama.cpp / ggml: the v2/v3 container
//!   [reader](GgufFile) and [writer](GgufWriter), the one [GGML tensor-type table](GgmlType),
//!   and the block codecs that turn quantized tensor bytes into `f32` and back ([`blocks`]).
//! - PyTorch checkpoints ([`torch`]): the zip files `torch.save` writes (nanoGPT's `ckpt.pt`,
//!   Hugging Face's `pytorch_model.bin`) and the legacy pre-1.6 format, read with a restricted
//!   unpickler and written so that `torch.load(weights_only=True)` accepts them.
//! - ONNX export ([`onnx`]): GPT-2 and Llama-family models as opset-17 ONNX graphs (optionally
//!   with past/present key-value tensors for incremental decoding), protobuf written by hand.
//! - The crash-safe file writer every Kiln artifact goes through ([`atomic`]).
//!
//! GGUF is a header, typed metadata key/value pairs, tensor descriptors and an aligned tensor data
//! section, all little-endian. [`GgufFile::open`] memory-maps a file, parses and validates the
//! header (every tensor known, aligned and in bounds) and then hands out tensor bytes straight
//! from the map. Malformed, truncated or hostile input never panics and never triggers an
//! allocation larger than the input.
//!
//! ```
//! use kiln_gguf::{GgmlType, GgufFile, GgufValue, GgufWriter, blocks};
//!
//! let mut writer = GgufWriter::new();
//! writer.add_metadata("general.architecture", GgufValue::String("llama".into()))?;
//! let weights: Vec<f32> = (0..64).map(|i| i as f32 / 8.0 - 4.0).collect();
//! let q8 = blocks::quantize(GgmlType::Q8_0, &weights)?;
//! writer.add_tensor("w", &[64], GgmlType::Q8_0, q8)?;
//!
//! let file = GgufFile::from_bytes(writer.to_bytes())?;
//! assert_eq!(file.get_str("general.architecture")?, "llama");
//! let info = file.tensor("w").unwrap();
//! let mut back = vec![0f32; 64];
//! blocks::dequantize(info.ty, file.tensor_data(info), &mut back)?;
//! assert!(back.iter().zip(&weights).all(|(a, b)| (a - b).abs() < 0.02));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

pub mod atomic;
pub mod blocks;
mod error;
mod ggml_type;
pub mod onnx;
mod reader;
#[cfg(test)]
mod tests;
pub mod torch;
mod value;
mod writer;

pub use error::GgufError;
pub use ggml_type::GgmlType;
pub use reader::{GgufFile, TensorInfo};
pub use value::{GgufArray, GgufValue};
pub use writer::GgufWriter;

/// The four magic bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// The GGUF version [`GgufWriter`] writes.
pub const GGUF_WRITE_VERSION: u32 = 3;
/// Data-section alignment used when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Metadata key (type UINT32) that overrides the data-section alignment.
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// Most dimensions a tensor may have (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;
/// Deepest nesting of metadata arrays the reader accepts (an array of scalars is depth 1).
pub const MAX_ARRAY_DEPTH: usize = 16;
