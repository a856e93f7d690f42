//! Tokenizer benchmarks: encode throughput (GPT-2 vocabulary, one thread, warm and cold cache;
//! batch across threads), BPE training, and corpus → shards.
//!
//! `cargo bench --bench bpe`. Needs `../shared` (tinyshakespeare, GPT-2's tokenizer); the peers'
//! figures come from `scripts/bench_tokenizer.sh`, which runs them in the same session.

use std::path::{Path, PathBuf};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kiln::bpe::prepare::{PrepareConfig, prepare};
use kiln::bpe::{BpeTrainer, SpecialTokens, Tokenizer, TrainerConfig};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: kiln::Allocator = kiln::Allocator;

fn shared(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared")
        .join(rel)
}

fn bench(c: &mut Criterion) {
    eprintln!("CPU: {}", kiln::kernels::cpu_description());
    let corpus = shared("data/tinyshakespeare.txt");
    let Ok(text) = std::fs::read_to_string(&corpus) else {
        eprintln!("{} not found: nothing to benchmark", corpus.display());
        return;
    };
    let docs: Vec<&str> = text.split("\n\n").filter(|d| !d.is_empty()).collect();
    let gpt2 =
        Tokenizer::from_file(shared("tokenizers/gpt2/tokenizer.json")).expect("GPT-2 tokenizer");

    let mut g = c.benchmark_group("encode_gpt2_tinyshakespeare");
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.sample_size(20);
    g.bench_function("one_thread_warm", |b| {
        b.iter(|| docs.iter().map(|d| gpt2.encode(d).len()).sum::<usize>())
    });
    g.bench_function("one_thread_cold", |b| {
        b.iter_batched(
            || gpt2.clone(),
            |tok| docs.iter().map(|d| tok.encode(d).len()).sum::<usize>(),
            criterion::BatchSize::LargeInput,
        )
    });
    g.bench_function("batch_all_threads", |b| {
        b.iter(|| gpt2.encode_batch(&docs, SpecialTokens::AsText).len())
    });
    g.finish();

    let mut g = c.benchmark_group("train_tinyshakespeare");
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.sample_size(10);
    for vocab_size in [2048, 8192] {
        g.bench_function(format!("vocab_{vocab_size}"), |b| {
            b.iter(|| {
                let mut t = BpeTrainer::new(TrainerConfig {
                    vocab_size,
                    ..TrainerConfig::default()
                })
                .expect("config");
                t.feed_files(std::slice::from_ref(&corpus)).expect("corpus");
                t.finish().expect("tokenizer").vocab_size()
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("prepare_tinyshakespeare");
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.sample_size(10);
    let out = tempfile::tempdir().expect("temp dir");
    g.bench_function("gpt2_shards", |b| {
        b.iter(|| {
            prepare(
                &gpt2,
                std::slice::from_ref(&corpus),
                out.path(),
                &PrepareConfig::default(),
            )
            .expect("prepare")
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
