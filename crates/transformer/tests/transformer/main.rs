//! kiln-transformer's integration tests, one binary (one link of the model stack instead of
//! seven): cached decoding (`cached_decoding`), GGUF architectures (`gguf_architectures`) and
//! export (`gguf_export`), Hugging Face (`hf_checkpoints`) and PyTorch (`torch_checkpoints`)
//! checkpoints, Kiln model directories (`model_io`), and SmolLM2 against its numpy reference
//! (`smollm2_parity`). The WGPU parity test (`backend_parity`) stays a binary of its own, built
//! with the `wgpu` feature.

mod cached_decoding;
mod gguf_architectures;
mod gguf_export;
mod hf_checkpoints;
mod model_io;
mod smollm2_parity;
mod torch_checkpoints;
