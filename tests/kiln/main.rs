//! The `kiln` program end to end, one test binary (one link of the whole stack instead of
//! eight): the command line (`cli`), distributed training through `--nproc` (`distributed`), the
//! examples (`examples`), ONNX (`export`) and PyTorch (`export_pt`) export, Python clients
//! (`python_clients`), `kiln quantize` and `kiln eval` (`quantize`), and `kiln serve` (`serve`).

mod cli;
mod common;
mod distributed;
mod examples;
mod export;
mod export_pt;
mod python_clients;
mod quantize;
mod serve;
