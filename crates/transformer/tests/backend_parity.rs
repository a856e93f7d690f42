//! The same model definition on every compiled backend gives the same logits as the CPU backend.
//!
//! Runs with `-p kiln-transformer --features wgpu` (in CI on Mesa's software Vulkan device,
//! lavapipe) and with `--features cuda` on a GPU machine (`scripts/gpu_parity.sh`).
#![cfg(any(feature = "wgpu", feature = "cuda"))]

use std::path::Path;

use burn::backend::Flex;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use kiln_transformer::{
    KvCache, Logits, ModelConfig, PositionEncoding, RopePairing, load_gguf_quantized, load_model,
    save_model_dir,
};

#[cfg(feature = "cuda")]
type Gpu = burn::backend::Cuda;
#[cfg(all(feature = "wgpu", not(feature = "cuda")))]
type Gpu = burn::backend::Wgpu;

fn logits<B: Backend>(dir: &Path, ids: &[i64]) -> (Vec<f32>, Vec<f32>) {
    let device = Default::default();
    let loaded = load_model::<B>(dir, &device).unwrap();
    let model = &loaded.model;
    let input =
        Tensor::<B, 2, Int>::from_data(TensorData::new(ids.to_vec(), [1, ids.len()]), &device);
    let full: Vec<f32> = model
        .forward(input)
        .unwrap()
        .into_data()
        .convert::<f32>()
        .to_vec()
        .unwrap();
    // And through the KV cache: prefill all but the last token, then one decode step.
    let mut cache = KvCache::<B>::new(model.config(), 1, ids.len(), &device).unwrap();
    let n = ids.len();
    let prefill =
        Tensor::<B, 2, Int>::from_data(TensorData::new(ids[..n - 1].to_vec(), [1, n - 1]), &device);
    model
        .forward_cached(prefill, &mut cache, None, Logits::Last)
        .unwrap();
    let last = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![ids[n - 1]], [1, 1]), &device);
    let step: Vec<f32> = model
        .forward_cached(last, &mut cache, None, Logits::Last)
        .unwrap()
        .into_data()
        .convert::<f32>()
        .to_vec()
        .unwrap();
    (full, step)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn check(config: ModelConfig) {
    let dir = tempfile::tempdir().unwrap();
    let model = config.init::<Flex>(&Default::default()).unwrap();
    save_model_dir(&model, None, None, dir.path()).unwrap();
    let ids: Vec<i64> = (0..12)
        .map(|i| (i * 13 + 5) % config.vocab_size as i64)
        .collect();
    let (cpu_full, cpu_step) = logits::<Flex>(dir.path(), &ids);
    let (gpu_full, gpu_step) = logits::<Gpu>(dir.path(), &ids);
    let d = max_diff(&cpu_full, &gpu_full);
    assert!(
        d < 1e-4,
        "{}: full forward differs by {d}",
        config.architecture
    );
    let d = max_diff(&cpu_step, &gpu_step);
    assert!(
        d < 1e-4,
        "{}: cached step differs by {d}",
        config.architecture
    );
}

#[test]
fn random_gpt2_matches_cpu() {
    check(ModelConfig {
        vocab_size: 211,
        context_length: 64,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 4,
        d_model: 64,
        d_ff: 256,
        ..ModelConfig::gpt2_124m()
    });
}

#[test]
fn random_llama_matches_cpu() {
    for pairing in [RopePairing::Interleaved, RopePairing::HalfSplit] {
        check(ModelConfig {
            vocab_size: 223,
            context_length: 64,
            n_layers: 2,
            n_heads: 6,
            n_kv_heads: 2,
            d_model: 96,
            d_ff: 160,
            position: PositionEncoding::Rope {
                theta: 10_000.0,
                pairing,
            },
            tied_embeddings: false,
            ..ModelConfig::smollm2_135m()
        });
    }
}

#[test]
fn smollm2_first_token_logits_match_cpu() {
    // KILN_SHARED points at the shared data when the test binary runs on another machine.
    let shared = std::env::var_os("KILN_SHARED").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared"),
        Into::into,
    );
    let path = shared.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.exists() {
        assert!(
            std::env::var("KILN_REQUIRE_SHARED").as_deref() != Ok("1"),
            "{} missing",
            path.display()
        );
        return;
    }
    let ids = [504i64, 3575, 282, 4649, 314];
    let run = |gpu: bool, quantized: bool| -> Vec<f32> {
        fn go<B: Backend>(path: &Path, ids: &[i64], quantized: bool) -> Vec<f32> {
            let device = Default::default();
            let loaded = if quantized {
                load_gguf_quantized::<B>(path, &device).unwrap()
            } else {
                load_model::<B>(path, &device).unwrap()
            };
            let input = Tensor::<B, 2, Int>::from_data(
                TensorData::new(ids.to_vec(), [1, ids.len()]),
                &device,
            );
            let mut cache = KvCache::<B>::new(loaded.model.config(), 1, 8, &device).unwrap();
            let out = loaded
                .model
                .forward_cached(input, &mut cache, None, Logits::Last)
                .unwrap();
            out.into_data().convert::<f32>().to_vec().unwrap()
        }
        if gpu {
            go::<Gpu>(&path, &ids, quantized)
        } else {
            go::<Flex>(&path, &ids, quantized)
        }
    };
    let (cpu, gpu) = (run(false, false), run(true, false));
    let d = max_diff(&cpu, &gpu);
    assert!(d < 1e-3, "SmolLM2 last-position logits differ by {d}");
    // Kept in the file's quantized blocks, the model runs on the GPU from weights dequantized to
    // the backend's float type on first use: the f32 model's logits.
    let gpu_quantized = run(true, true);
    let d = max_diff(&cpu, &gpu_quantized);
    assert!(d < 1e-3, "quantized SmolLM2 on the GPU differs by {d}");
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
    };
    assert_eq!(argmax(&cpu), Some(7042), "' Paris'");
    assert_eq!(argmax(&gpu), argmax(&cpu));
    assert_eq!(argmax(&gpu_quantized), argmax(&cpu));
}
