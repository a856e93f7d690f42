//! Exports a Llama-architecture GGUF model (e.g. SmolLM2) as ONNX, weights dequantized to f32.
//!
//! ```text
//! cargo run --release -p kiln-gguf --example onnx_from_gguf -- MODEL.gguf OUT_DIR
//! ```
//!
//! Writes `OUT_DIR/model.onnx` (input `input_ids`) and `OUT_DIR/model_kv.onnx` (with past/present
//! key values). GGUF stores the query/key rows permuted for RoPE on *interleaved* pairs
//! (llama.cpp's convention), so the export keeps the rows as they are and rotates interleaved
//! pairs — the opposite choice to Kiln's loader, which un-permutes the rows and rotates half-split
//! pairs; both compute the same attention scores. Check the files against the numpy reference's
//! golden output with
//! `scripts/check_onnx_export.py OUT_DIR/model_kv.onnx --golden MODEL.golden.json`.

use std::path::Path;

use kiln_gguf::onnx::{self, ExportOptions, Mlp, ModelSpec, Norm, Position, RopePairing, Weights};
use kiln_gguf::{GgufFile, blocks};

type Error = Box<dyn std::error::Error>;

/// The spec a Llama GGUF's metadata describes.
fn spec_from_gguf(file: &GgufFile) -> Result<ModelSpec, Error> {
    let arch = file.get_str("general.architecture")?;
    if arch != "llama" {
        return Err(format!("architecture {arch:?}: only llama GGUF files are exported").into());
    }
    let key = |k: &str| format!("llama.{k}");
    let n_heads = file.get_u64(&key("attention.head_count"))? as usize;
    Ok(ModelSpec {
        architecture: "llama".into(),
        vocab_size: file.get_string_array("tokenizer.ggml.tokens")?.len(),
        context_length: file.get_u64(&key("context_length"))? as usize,
        n_layers: file.get_u64(&key("block_count"))? as usize,
        n_heads,
        n_kv_heads: match file.get(&key("attention.head_count_kv")) {
            Some(_) => file.get_u64(&key("attention.head_count_kv"))? as usize,
            None => n_heads,
        },
        d_model: file.get_u64(&key("embedding_length"))? as usize,
        d_ff: file.get_u64(&key("feed_forward_length"))? as usize,
        position: Position::Rope {
            theta: match file.get(&key("rope.freq_base")) {
                Some(_) => file.get_f32(&key("rope.freq_base"))?,
                None => 10_000.0,
            },
            pairing: RopePairing::Interleaved,
        },
        norm: Norm::RmsNorm {
            eps: f64::from(file.get_f32(&key("attention.layer_norm_rms_epsilon"))?),
        },
        mlp: Mlp::SwiGlu,
        bias: false,
        qkv_bias: false,
        tied_embeddings: file.tensor("output.weight").is_none(),
    })
}

/// Tensor `name` dequantized, row-major `[rows, cols]` as GGUF lays it out (ggml's `ne` reversed).
fn load(file: &GgufFile, name: &str) -> Result<(Vec<usize>, Vec<f32>), Error> {
    let t = file
        .tensor(name)
        .ok_or_else(|| format!("tensor {name} not in the file"))?;
    let data = blocks::dequantize_to_vec(t.ty, file.tensor_data(t), t.n_elements() as usize)?;
    Ok((t.shape(), data))
}

/// `[rows, cols]` → `[cols, rows]`.
fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

/// A GGUF linear weight (`[out, in]`, PyTorch's layout) in Kiln's `[in, out]` layout.
fn linear(file: &GgufFile, name: &str) -> Result<(Vec<usize>, Vec<f32>), Error> {
    let (shape, data) = load(file, name)?;
    let [rows, cols] = shape[..] else {
        return Err(format!("{name}: expected a matrix, got shape {shape:?}").into());
    };
    Ok((vec![cols, rows], transpose(&data, rows, cols)))
}

/// Kiln-named weights from GGUF names (`blk.{i}.attn_q.weight` → part of
/// `blocks.{i}.attn.qkv.weight`, and so on).
fn weights_from_gguf(file: &GgufFile, spec: &ModelSpec) -> Result<Weights, Error> {
    let mut w = Weights::new();
    let (shape, data) = load(file, "token_embd.weight")?;
    w.insert("tok_emb.weight", shape, data)?;
    let (shape, data) = load(file, "output_norm.weight")?;
    w.insert("norm_f.weight", shape, data)?;
    if !spec.tied_embeddings {
        let (shape, data) = linear(file, "output.weight")?;
        w.insert("lm_head.weight", shape, data)?;
    }
    for i in 0..spec.n_layers {
        let g = |s: &str| format!("blk.{i}.{s}.weight");
        let k = |s: &str| format!("blocks.{i}.{s}.weight");
        let (shape, data) = load(file, &g("attn_norm"))?;
        w.insert(k("norm1"), shape, data)?;
        let (shape, data) = load(file, &g("ffn_norm"))?;
        w.insert(k("norm2"), shape, data)?;
        // Fused QKV [d, q + k + v]: each row of the [in, out] matrix is q's row, k's, v's.
        let parts = [g("attn_q"), g("attn_k"), g("attn_v")]
            .iter()
            .map(|n| linear(file, n))
            .collect::<Result<Vec<_>, _>>()?;
        let d = parts[0].0[0];
        let width: usize = parts.iter().map(|(s, _)| s[1]).sum();
        let mut qkv = Vec::with_capacity(d * width);
        for r in 0..d {
            for (s, data) in &parts {
                qkv.extend_from_slice(&data[r * s[1]..(r + 1) * s[1]]);
            }
        }
        w.insert(k("attn.qkv"), [d, width], qkv)?;
        for (gguf, kiln) in [
            ("attn_output", "attn.proj"),
            ("ffn_gate", "mlp.gate"),
            ("ffn_up", "mlp.up"),
            ("ffn_down", "mlp.down"),
        ] {
            let (shape, data) = linear(file, &g(gguf))?;
            w.insert(k(kiln), shape, data)?;
        }
    }
    Ok(w)
}

fn run(gguf: &Path, out: &Path) -> Result<(), Error> {
    let file = GgufFile::open(gguf)?;
    let spec = spec_from_gguf(&file)?;
    let weights = weights_from_gguf(&file, &spec)?;
    for (name, kv_cache) in [("model.onnx", false), ("model_kv.onnx", true)] {
        let options = ExportOptions {
            kv_cache,
            producer_version: env!("CARGO_PKG_VERSION").into(),
        };
        let model = onnx::build(&spec, weights.clone(), &options)?;
        model.save(out.join(name))?;
        println!(
            "{}: {} nodes, {} bytes",
            out.join(name).display(),
            model.graph.nodes.len(),
            model.encoded_len()
        );
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [gguf, out] = &args[..] else {
        eprintln!("usage: onnx_from_gguf MODEL.gguf OUT_DIR");
        std::process::exit(2);
    };
    if let Err(e) = run(Path::new(gguf), Path::new(out)) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
