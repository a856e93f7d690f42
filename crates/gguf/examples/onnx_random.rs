//! Writes a random-weight model as ONNX files, with its spec and weights for an independent
//! reference (`scripts/check_onnx_export.py --numpy-model DIR`).
//!
//! ```text
//! cargo run --release -p kiln-gguf --example onnx_random -- ARCH OUT_DIR [--no-weights]
//! ```
//!
//! `ARCH` is one of `gpt2` (learned positions, LayerNorm with bias, tanh GELU, tied head),
//! `nanogpt` (erf GELU, no biases), `llama` (RoPE with interleaved pairs, RMSNorm, SwiGLU,
//! grouped-query attention 6/2, untied head), `llama-half` (half-split RoPE, tied head, 4/1 heads),
//! `qwen2` (llama with a qkv bias) or `smollm2` (SmolLM2-135M's shape: 30 layers, d=576, 9/3
//! heads, FFN 1536, vocab 49152, for speed measurements).
//!
//! `OUT_DIR` receives `model.onnx` (input `input_ids`), `model_kv.onnx` (with past/present key
//! values), `spec.json` and, unless `--no-weights`, `weights/NAME.npy` for every weight.
//! Weights are drawn from a seeded generator at scales that keep activations of order one, so
//! logits differ clearly between tokens.

use std::path::{Path, PathBuf};

use kiln_gguf::onnx::{self, ExportOptions, Mlp, ModelSpec, Norm, Position, RopePairing, Weights};
use serde_json::json;

/// The architectures this example writes.
pub const ARCHS: [&str; 6] = ["gpt2", "nanogpt", "llama", "llama-half", "qwen2", "smollm2"];

/// The spec of `arch` (see the module docs).
pub fn spec(arch: &str) -> Option<ModelSpec> {
    let gpt2 = ModelSpec {
        architecture: "gpt2".into(),
        vocab_size: 211,
        context_length: 64,
        n_layers: 3,
        n_heads: 4,
        n_kv_heads: 4,
        d_model: 64,
        d_ff: 256,
        position: Position::Learned,
        norm: Norm::LayerNorm { eps: 1e-5 },
        mlp: Mlp::GeluTanh,
        bias: true,
        qkv_bias: false,
        tied_embeddings: true,
    };
    let llama = ModelSpec {
        architecture: "llama".into(),
        vocab_size: 223,
        context_length: 128,
        n_layers: 3,
        n_heads: 6,
        n_kv_heads: 2,
        d_model: 96,
        d_ff: 160,
        position: Position::Rope {
            theta: 10_000.0,
            pairing: RopePairing::Interleaved,
        },
        norm: Norm::RmsNorm { eps: 1e-5 },
        mlp: Mlp::SwiGlu,
        bias: false,
        qkv_bias: false,
        tied_embeddings: false,
    };
    Some(match arch {
        "gpt2" => gpt2,
        "nanogpt" => ModelSpec {
            mlp: Mlp::Gelu,
            bias: false,
            ..gpt2
        },
        "llama" => llama,
        "llama-half" => ModelSpec {
            n_heads: 4,
            n_kv_heads: 1,
            d_model: 64,
            position: Position::Rope {
                theta: 100_000.0,
                pairing: RopePairing::HalfSplit,
            },
            tied_embeddings: true,
            ..llama
        },
        "qwen2" => ModelSpec {
            architecture: "qwen2".into(),
            qkv_bias: true,
            norm: Norm::RmsNorm { eps: 1e-6 },
            ..llama
        },
        "smollm2" => ModelSpec {
            vocab_size: 49152,
            context_length: 2048,
            n_layers: 30,
            n_heads: 9,
            n_kv_heads: 3,
            d_model: 576,
            d_ff: 1536,
            position: Position::Rope {
                theta: 100_000.0,
                pairing: RopePairing::HalfSplit,
            },
            tied_embeddings: true,
            ..llama
        },
        _ => return None,
    })
}

/// SplitMix64 with Box–Muller normals.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }
}

/// Values for weight `name` of `shape`: norms near 1, biases small, matrices ~1/√fan_in.
fn random(rng: &mut Rng, name: &str, shape: &[usize]) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let (mean, std) = if name.contains("norm") && name.ends_with(".weight") {
        (1.0, 0.1)
    } else if name.ends_with(".bias") {
        (0.0, 0.1)
    } else if name.starts_with("tok_emb") {
        (0.0, 0.5)
    } else if name.starts_with("pos_emb") {
        // Large enough that the state moves with position: greedy decoding does not settle on
        // one token.
        (0.0, 2.0)
    } else {
        (0.0, 1.0 / (shape[0] as f32).sqrt())
    };
    let mut values: Vec<f32> = (0..n).map(|_| mean + std * rng.normal()).collect();
    if name.starts_with("tok_emb") {
        // Rows of equal norm: with a tied head, a random table's longest row would win every
        // argmax and greedy decoding would repeat one token.
        for row in values.chunks_mut(shape[1]) {
            let rms = (row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32).sqrt();
            row.iter_mut().for_each(|v| *v *= std / rms);
        }
    }
    values
}

/// A NumPy `.npy` (version 1.0) file of little-endian `f32`.
fn npy(shape: &[usize], data: &[f32]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let tuple = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {tuple}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend(data.iter().flat_map(|v| v.to_le_bytes()));
    out
}

fn spec_json(spec: &ModelSpec) -> serde_json::Value {
    let position = match spec.position {
        Position::Learned => json!({ "type": "learned" }),
        Position::Rope { theta, pairing } => json!({
            "type": "rope",
            "theta": theta,
            "pairing": match pairing {
                RopePairing::Interleaved => "interleaved",
                RopePairing::HalfSplit => "half_split",
            },
        }),
    };
    let norm = match spec.norm {
        Norm::LayerNorm { eps } => json!({ "type": "layer_norm", "eps": eps }),
        Norm::RmsNorm { eps } => json!({ "type": "rms_norm", "eps": eps }),
    };
    let mlp = match spec.mlp {
        Mlp::GeluTanh => "gelu_tanh",
        Mlp::Gelu => "gelu",
        Mlp::SwiGlu => "swi_glu",
    };
    json!({
        "architecture": spec.architecture,
        "vocab_size": spec.vocab_size,
        "context_length": spec.context_length,
        "n_layers": spec.n_layers,
        "n_heads": spec.n_heads,
        "n_kv_heads": spec.n_kv_heads,
        "d_model": spec.d_model,
        "d_ff": spec.d_ff,
        "position": position,
        "norm": norm,
        "mlp": mlp,
        "bias": spec.bias,
        "qkv_bias": spec.qkv_bias,
        "tied_embeddings": spec.tied_embeddings,
    })
}

/// Writes `arch`'s random model into `out`: `model.onnx`, `model_kv.onnx`, `spec.json` and
/// (with `with_weights`) `weights/NAME.npy`.
pub fn write_random_model(
    arch: &str,
    out: &Path,
    with_weights: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let spec = spec(arch).ok_or_else(|| format!("unknown architecture {arch:?}"))?;
    let mut rng = Rng(0x6b69_6c6e);
    let mut weights = Weights::new();
    if with_weights {
        std::fs::create_dir_all(out.join("weights"))?;
    }
    for (name, shape) in spec.weight_shapes() {
        let data = random(&mut rng, &name, &shape);
        if with_weights {
            let path = out.join("weights").join(format!("{name}.npy"));
            kiln_gguf::atomic::write(path, &npy(&shape, &data))?;
        }
        weights.insert(name, shape, data)?;
    }
    let text = serde_json::to_string_pretty(&spec_json(&spec))?;
    kiln_gguf::atomic::write(out.join("spec.json"), text.as_bytes())?;
    for (file, kv_cache) in [("model.onnx", false), ("model_kv.onnx", true)] {
        let options = ExportOptions {
            kv_cache,
            producer_version: env!("CARGO_PKG_VERSION").into(),
        };
        let model = onnx::build(&spec, weights.clone(), &options)?;
        model.save(out.join(file))?;
        println!(
            "{}: {} nodes, {} bytes",
            out.join(file).display(),
            model.graph.nodes.len(),
            model.encoded_len()
        );
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let with_weights = !args.iter().any(|a| a == "--no-weights");
    let positional: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    let [arch, out] = positional[..] else {
        eprintln!(
            "usage: onnx_random ARCH OUT_DIR [--no-weights]   \
             (ARCH: {})",
            ARCHS.join(", ")
        );
        std::process::exit(2);
    };
    if let Err(e) = write_random_model(arch, &PathBuf::from(out), with_weights) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
