//! Calibration: run text through a model and collect, for every linear weight, the second moment
//! of its inputs (`H = 2/n · Σ xᵀx`, GPTQ's Hessian), keyed by the weight's GGUF tensor name.
//!
//! Each projection gets an observing [`LinearKernel`] that adds its input rows to the layer's
//! statistics and then declines the product, so the backend computes it as usual: the forward pass
//! is the model's own. Kernels see products of at most [`KERNEL_MAX_ROWS`] rows, so every window of
//! text is fed through the KV cache that many tokens at a time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use burn::tensor::backend::Backend;
use kiln_kernels::{KERNEL_MAX_ROWS, KernelError, LinearKernel};
use kiln_transformer::{KvCache, Logits, Transformer, token_rows};

use crate::error::QuantizeError;
use crate::gptq::Hessian;

/// Input rows gathered before they are added to a Hessian: adding many rows at once reuses each
/// tile of the Hessian from cache (16 at a time is memory-bound).
const BUFFER_ROWS: usize = 512;

/// One projection's input statistics, filled while its kernel observes.
#[derive(Debug)]
struct Recorder {
    in_features: usize,
    out_features: usize,
    state: Mutex<RecorderState>,
}

#[derive(Debug)]
struct RecorderState {
    hessian: Hessian,
    buffer: Vec<f32>,
    error: Option<String>,
}

impl RecorderState {
    fn flush(&mut self) {
        if let Err(e) = self.hessian.add(&self.buffer) {
            self.error.get_or_insert(e.to_string());
        }
        self.buffer.clear();
    }
}

impl LinearKernel for Recorder {
    fn in_features(&self) -> usize {
        self.in_features
    }

    fn out_features(&self) -> usize {
        self.out_features
    }

    fn forward(&self, x: &[f32], _rows: usize, _out: &mut [f32]) -> Result<(), KernelError> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.buffer.extend_from_slice(x);
        if state.buffer.len() >= BUFFER_ROWS * self.in_features {
            state.flush();
        }
        Err(KernelError::Declined)
    }

    fn weight_bytes(&self) -> usize {
        0
    }

    /// Calibration must see every input, whatever backend runs the model.
    fn on_any_backend(&self) -> bool {
        true
    }
}

/// The GGUF tensors a Kiln projection feeds. The fused QKV projection is Llama's three tensors or
/// the one `attn_qkv` of GPT-2 and Phi-3, all with the same input; Phi-3's `ffn_up` holds gate and
/// up, which read the same input too. A file uses the names it has.
fn gguf_names(projection: &str) -> Vec<String> {
    if projection == "lm_head" {
        return vec!["output.weight".to_owned()];
    }
    let Some((layer, part)) = projection
        .strip_prefix("blocks.")
        .and_then(|r| r.split_once('.'))
    else {
        return Vec::new();
    };
    let names: &[&str] = match part {
        "attn.qkv" => &["attn_q", "attn_k", "attn_v", "attn_qkv"],
        "attn.proj" => &["attn_output"],
        "mlp.gate" => &["ffn_gate"],
        "mlp.up" => &["ffn_up"],
        "mlp.down" => &["ffn_down"],
        _ => &[],
    };
    names
        .iter()
        .map(|n| format!("blk.{layer}.{n}.weight"))
        .collect()
}

/// Runs `tokens` through `model` in windows of `window` tokens (each window starts a fresh
/// context, as perplexity evaluation does) and returns every linear weight's input statistics
/// by GGUF tensor name. `progress(done, total)` counts tokens. The model's own kernels are put
/// back afterwards.
pub fn collect_hessians<B: Backend>(
    model: &mut Transformer<B>,
    tokens: &[u32],
    window: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<HashMap<String, Hessian>, QuantizeError> {
    let window = window.min(model.config().context_length).max(1);
    if tokens.len() < window {
        return Err(QuantizeError::CalibrationTooShort {
            needed: window,
            found: tokens.len(),
            why: "one window of context".to_owned(),
        });
    }
    let mut recorders: Vec<(String, Arc<Recorder>)> = Vec::new();
    let mut saved = Vec::new();
    model.try_for_each_projection(|name, projection| {
        let recorder = Arc::new(Recorder {
            in_features: projection.in_features(),
            out_features: projection.out_features(),
            state: Mutex::new(RecorderState {
                hessian: Hessian::new(projection.in_features()),
                buffer: Vec::new(),
                error: None,
            }),
        });
        saved.push(projection.kernel.replace(recorder.clone()));
        recorders.push((name.to_owned(), recorder));
        Ok::<_, QuantizeError>(())
    })?;
    let result = run_windows(model, tokens, window, &mut progress);
    let mut saved = saved.into_iter();
    model.try_for_each_projection(|_, projection| {
        projection.kernel = saved.next().flatten();
        Ok::<_, QuantizeError>(())
    })?;
    result?;

    let mut hessians = HashMap::new();
    for (name, recorder) in recorders {
        let mut state = recorder
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        state.flush();
        if let Some(e) = state.error.take() {
            return Err(QuantizeError::Invalid(format!("calibrating `{name}`: {e}")));
        }
        let hessian = std::mem::replace(&mut state.hessian, Hessian::new(0));
        for gguf in gguf_names(&name) {
            hessians.insert(gguf, hessian.clone());
        }
    }
    Ok(hessians)
}

fn run_windows<B: Backend>(
    model: &Transformer<B>,
    tokens: &[u32],
    window: usize,
    progress: &mut impl FnMut(usize, usize),
) -> Result<(), QuantizeError> {
    let device = model.tok_emb.weight.val().device();
    let windows = tokens.len() / window;
    let total = windows * window;
    for (w, ids) in tokens.chunks_exact(window).enumerate() {
        let mut cache = KvCache::new(model.config(), 1, window, &device)?;
        let mut done = 0;
        for chunk in ids.chunks(KERNEL_MAX_ROWS) {
            let input = token_rows::<B>(&[chunk], &device);
            model.forward_cached(input, &mut cache, None, Logits::Last)?;
            done += chunk.len();
            progress(w * window + done, total);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::gguf_names;

    #[test]
    fn projections_map_to_their_gguf_tensors() {
        assert_eq!(
            gguf_names("blocks.3.attn.qkv"),
            [
                "blk.3.attn_q.weight",
                "blk.3.attn_k.weight",
                "blk.3.attn_v.weight",
                "blk.3.attn_qkv.weight"
            ]
        );
        assert_eq!(gguf_names("blocks.0.mlp.down"), ["blk.0.ffn_down.weight"]);
        assert_eq!(gguf_names("lm_head"), ["output.weight"]);
        assert!(gguf_names("blocks.0.other").is_empty());
    }
}
