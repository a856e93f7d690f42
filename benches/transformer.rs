//! Transformer inference benchmarks on SmolLM2-135M (`../shared/models`): prefill of a 128-token
//! prompt and one decode step at context 128. `scripts/bench_generate.sh` compares with llama.cpp.
//!
//! `cargo bench --bench transformer`

use std::path::Path;

use burn::tensor::{Int, Tensor, TensorData};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kiln::backend::DefaultBackend as B;
use kiln::transformer::{KvCache, Logits, load_model};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: kiln::Allocator = kiln::Allocator;

fn bench(c: &mut Criterion) {
    eprintln!("CPU: {}", kiln::kernels::cpu_description());
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.exists() {
        eprintln!("{} not found: nothing to benchmark", path.display());
        return;
    }
    let device = Default::default();
    let loaded = load_model::<B>(&path, &device).expect("model");
    let model = &loaded.model;
    let ids: Vec<i64> = (0..128).map(|i| 100 + (i * 37) % 40_000).collect();
    let prompt = || Tensor::<B, 2, Int>::from_data(TensorData::new(ids.clone(), [1, 128]), &device);

    let mut g = c.benchmark_group("smollm2_135m");
    g.sample_size(10);
    g.throughput(Throughput::Elements(128));
    g.bench_function("prefill_128", |b| {
        b.iter(|| {
            let mut cache = KvCache::<B>::new(model.config(), 1, 256, &device).expect("cache");
            model
                .forward_cached(prompt(), &mut cache, None, Logits::Last)
                .expect("forward")
        })
    });
    g.throughput(Throughput::Elements(1));
    let mut cache = KvCache::<B>::new(model.config(), 1, 4096, &device).expect("cache");
    model
        .forward_cached(prompt(), &mut cache, None, Logits::Last)
        .expect("prefill");
    g.bench_function("decode_step_at_128", |b| {
        b.iter(|| {
            cache.truncate(0, 128);
            let next =
                Tensor::<B, 2, Int>::from_data(TensorData::new(vec![42i64], [1, 1]), &device);
            model
                .forward_cached(next, &mut cache, None, Logits::Last)
                .expect("step")
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
