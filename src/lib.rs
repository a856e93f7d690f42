//! # Kiln
//!
//! From raw text to a trained, quantized, served language model, on the
//! [Burn](https://burn.dev) deep-learning framework. This crate re-exports the pipeline's crates
//! and holds the `kiln` command line, the examples and the benchmarks.
//!
//! | stage | crate |
//! |---|---|
//! | tokenizer training, encoding, token shards | [`bpe`] (`kiln-bpe`) |
//!
//! See `docs/architecture.md` for the whole pipeline.

pub use kiln_bpe as bpe;

pub mod backend;
