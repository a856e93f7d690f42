//! One optimizer step (forward, backward, clipping, AdamW) of nanoGPT's two Shakespeare-char
//! models on the default backend, on random tokens: the figures to set against nanoGPT's
//! per-iteration time (CPU recipe 4×4×128, context 64, batch 12; GPU model 6×6×384, context 256,
//! batch 8 on CPU).
//!
//! On CPUs with AVX512_BF16 it also times the step in bf16 mixed precision (`fused_bf16`).
//!
//! `cargo bench --bench train_step`

use burn::optim::GradientsParams;
use burn::tensor::{Int, Tensor, TensorData};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kiln::backend::TrainBackend as B;
use kiln::kernels::fused::{LinearProducts, Products};
use kiln::trainer::optimizer::GroupedAdamW;
use kiln::transformer::{ModelConfig, Transformer};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: kiln::Allocator = kiln::Allocator;

fn bench_model(c: &mut Criterion, name: &str, config: ModelConfig, batch: usize, seq: usize) {
    // Burn's composed ops, then Kiln's fused kernels, in the same run.
    for fused in [false, true] {
        let _composed = (!fused).then(kiln::kernels::fused::ComposedOps::enter);
        let label = if fused { "fused" } else { "burn_ops" };
        bench_step(
            c,
            &format!("{name}/{label}"),
            config.clone(),
            batch,
            seq,
            None,
        );
    }
    // Mixed precision as `precision = "bf16"` trains on CPUs with AVX512_BF16: the fused
    // kernels with the linear layers' products in bf16.
    if kiln::trainer::Precision::Bf16
        .linear_products::<B>()
        .is_some()
    {
        let label = format!("{name}/fused_bf16");
        bench_step(c, &label, config, batch, seq, Some(Products::Bf16));
    }
}

fn bench_step(
    c: &mut Criterion,
    name: &str,
    config: ModelConfig,
    batch: usize,
    seq: usize,
    products: Option<Products>,
) {
    let device = Default::default();
    let mut model: Option<Transformer<B>> = Some(config.init(&device).expect("model"));
    let mut optim = GroupedAdamW::new(model.as_ref().expect("model"), 0.9, 0.99, 1e-8, 0.1);
    let v = config.vocab_size as i64;
    let ids: Vec<i64> = (0..(batch * (seq + 1)) as i64)
        .map(|i| (i * 7919) % v)
        .collect();
    let inputs: Vec<i64> = ids
        .chunks(seq + 1)
        .flat_map(|r| r[..seq].to_vec())
        .collect();
    let targets: Vec<i64> = ids.chunks(seq + 1).flat_map(|r| r[1..].to_vec()).collect();
    let loss_fn = burn::nn::loss::CrossEntropyLossConfig::new().init(&device);
    let mut g = c.benchmark_group(name);
    g.sample_size(10);
    g.throughput(Throughput::Elements((batch * seq) as u64));
    g.bench_function("train_step", |b| {
        b.iter(|| {
            let m = model.take().expect("model");
            let x = Tensor::<B, 2, Int>::from_data(
                TensorData::new(inputs.clone(), [batch, seq]),
                &device,
            );
            let y = Tensor::<B, 1, Int>::from_data(
                TensorData::new(targets.clone(), [batch * seq]),
                &device,
            );
            let logits = {
                let _scope = products.map(LinearProducts::enter);
                m.forward(x).expect("forward")
            };
            let loss = loss_fn.forward(logits.reshape([batch * seq, config.vocab_size]), y);
            let mut grads = GradientsParams::from_grads(loss.backward(), &m);
            GroupedAdamW::<B, Transformer<B>>::clip(&m, &mut grads, 1.0);
            model = Some(optim.step(1e-3, m, grads));
        })
    });
    g.finish();
}

fn bench(c: &mut Criterion) {
    eprintln!(
        "CPU: {}; {} threads",
        kiln::kernels::cpu_description(),
        rayon::current_num_threads()
    );
    bench_model(
        c,
        "shakespeare_char_cpu_4x128_ctx64_b12",
        ModelConfig::shakespeare_char_cpu(65),
        12,
        64,
    );
    let mut big = ModelConfig::shakespeare_char(65);
    big.dropout = 0.0;
    bench_model(c, "shakespeare_char_6x384_ctx256_b8", big, 8, 256);
}

criterion_group!(benches, bench);
criterion_main!(benches);
