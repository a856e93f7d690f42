//! kiln-trainer's integration tests, one binary (one link of the training stack instead of five):
//! training runs, exact resume and NaN recovery (`training`), run artifacts (`artifacts`), the
//! data-parallel seams (`seams`), the fused kernels under autodiff (`fused_kernels`) and
//! distillation (`distill`).
//!
//! Burn's CPU random generator is process-wide, so the tests that depend on seeded
//! initialization, dropout or data order take turns ([`common::serial`]).

mod artifacts;
mod common;
mod distill;
mod fused_kernels;
mod seams;
mod training;
