//! Kiln's fused Flex kernels as a program that uses only `kiln-transformer` / `kiln-trainer` gets
//! them: with no init call. Whole models on the fused path against the same models on Burn's
//! composed ops (a [`ComposedOps`] scope on the test's own thread, so tests run in parallel):
//! logits, loss and every parameter gradient, on a GPT (learned positions, LayerNorm with bias,
//! exact or tanh GELU) and a Llama (RoPE, RMSNorm, SwiGLU, grouped-query attention), with and
//! without activation checkpointing; and the trainer's guarantees on the fused path: resume is
//! bitwise exact, and activation checkpointing gives bitwise the same steps.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, CheckpointStrategy};
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};
use burn_flex::Flex;
use kiln_bpe::prepare::{PrepareConfig, prepare_bytes};
use kiln_kernels::fused::{ComposedOps, with_composed_ops};
use kiln_trainer::{ModelSpec, Precision, TrainConfig, Trainer};
use kiln_transformer::{
    MlpKind, ModelConfig, NormKind, PositionEncoding, RopePairing, Transformer,
};

// Tests that draw from Burn's process-wide generator take turns (`common::serial`); the kernels
// themselves need no lock: the composed-ops scope is per thread.
use crate::common::serial as rng_turn;

fn gpt() -> ModelConfig {
    ModelConfig {
        vocab_size: 61,
        context_length: 80,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 4,
        d_model: 64,
        d_ff: 256,
        bias: true,
        dropout: 0.0,
        ..ModelConfig::shakespeare_char(61)
    }
}

fn llama() -> ModelConfig {
    ModelConfig {
        architecture: "llama".into(),
        n_heads: 6,
        n_kv_heads: 2,
        d_model: 96,
        position: PositionEncoding::Rope {
            theta: 10_000.0,
            pairing: RopePairing::HalfSplit,
        },
        norm: NormKind::RmsNorm { eps: 1e-5 },
        mlp: MlpKind::SwiGlu,
        bias: false,
        ..gpt()
    }
}

/// Every parameter gradient of `model`, flattened, in visiting order.
struct CollectGrads<'a, B: AutodiffBackend> {
    grads: &'a B::Gradients,
    out: Vec<Vec<f32>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for CollectGrads<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(grad) = param.val().grad(self.grads) {
            self.out
                .push(grad.into_data().to_vec::<f32>().expect("f32 gradient"));
        }
    }
}

/// Logits, loss and gradients of one training step on a fixed batch (72 tokens: two query
/// blocks of the fused attention).
fn step<C: CheckpointStrategy>(
    model: &Transformer<Autodiff<Flex, C>>,
) -> (Vec<f32>, f32, Vec<Vec<f32>>) {
    let device = Default::default();
    let (b, t, v) = (3, 72, model.config().vocab_size);
    let ids: Vec<i64> = (0..b * (t + 1)).map(|i| ((i * 7919) % v) as i64).collect();
    let inputs: Vec<i64> = ids.chunks(t + 1).flat_map(|r| r[..t].to_vec()).collect();
    let targets: Vec<i64> = ids.chunks(t + 1).flat_map(|r| r[1..].to_vec()).collect();
    let x =
        Tensor::<Autodiff<Flex, C>, 2, Int>::from_data(TensorData::new(inputs, [b, t]), &device);
    let y =
        Tensor::<Autodiff<Flex, C>, 1, Int>::from_data(TensorData::new(targets, [b * t]), &device);
    let logits = model.forward(x).expect("forward");
    let loss = CrossEntropyLossConfig::new()
        .init(&device)
        .forward(logits.clone().reshape([b * t, v]), y);
    let loss_value = loss.clone().into_scalar();
    let grads = loss.backward();
    let mut collect = CollectGrads::<Autodiff<Flex, C>> {
        grads: &grads,
        out: Vec::new(),
    };
    model.visit(&mut collect);
    let logits = logits.into_data().to_vec::<f32>().expect("f32 logits");
    (logits, loss_value, collect.out)
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-3);
    let err = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        err <= 1e-4 * scale,
        "{what}: max error {err} against scale {scale}"
    );
}

fn compare<C: CheckpointStrategy>(config: ModelConfig) {
    let _rng = rng_turn();
    let model: Transformer<Autodiff<Flex, C>> = config.init(&Default::default()).expect("model");
    let (logits, loss, grads) = with_composed_ops(|| step(&model));
    let (fused_logits, fused_loss, fused_grads) = step(&model);
    let inference = model.valid();
    let ids = Tensor::<Flex, 2, Int>::from_data(
        TensorData::new(
            (0..80).map(|i| (i * 13 % 61) as i64).collect::<Vec<_>>(),
            [1, 80],
        ),
        &Default::default(),
    );
    let fused_eval = inference.forward(ids.clone()).expect("forward").into_data();
    let eval = with_composed_ops(|| inference.forward(ids).expect("forward").into_data());
    assert_ne!(
        fused_logits, logits,
        "the default path is the fused one, not the composed ops"
    );

    assert_close("logits", &fused_logits, &logits);
    assert!(
        (fused_loss - loss).abs() <= 1e-5 * loss,
        "loss {fused_loss} vs {loss}"
    );
    assert!(
        loss.is_finite() && loss > 3.0,
        "an untrained model's loss, got {loss}"
    );
    assert_eq!(
        fused_grads.len(),
        grads.len(),
        "every parameter gets a gradient"
    );
    for (i, (got, want)) in fused_grads.iter().zip(&grads).enumerate() {
        assert_close(&format!("gradient of parameter {i}"), got, want);
    }
    assert_close(
        "inference logits",
        &fused_eval.to_vec::<f32>().expect("f32"),
        &eval.to_vec::<f32>().expect("f32"),
    );
}

/// No init call: Flex, and Flex under autodiff with either checkpointing strategy, resolve to
/// Kiln's kernels as soon as this crate is linked.
#[test]
fn the_cpu_backends_get_the_fused_kernels_without_an_init_call() {
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
    assert!(kiln_kernels::fused::ops::<Flex>().is_some());
    assert!(kiln_kernels::fused::ops::<Autodiff<Flex, NoCheckpointing>>().is_some());
    assert!(kiln_kernels::fused::ops::<Autodiff<Flex, BalancedCheckpointing>>().is_some());
    // A composed-ops scope is this thread's alone.
    let _composed = ComposedOps::enter();
    assert!(kiln_kernels::fused::ops::<Flex>().is_none());
    let elsewhere = std::thread::spawn(|| kiln_kernels::fused::ops::<Flex>().is_some());
    assert!(elsewhere.join().unwrap());
}

#[test]
fn gpt_step_matches_burn_ops() {
    compare::<burn::backend::autodiff::checkpoint::strategy::NoCheckpointing>(gpt());
}

#[test]
fn gpt_step_with_activation_checkpointing_matches_burn_ops() {
    compare::<BalancedCheckpointing>(gpt());
}

#[test]
fn gpt2_tanh_gelu_step_matches_burn_ops() {
    let config = ModelConfig {
        mlp: MlpKind::GeluTanh,
        ..gpt()
    };
    compare::<burn::backend::autodiff::checkpoint::strategy::NoCheckpointing>(config);
}

#[test]
fn llama_step_matches_burn_ops() {
    compare::<burn::backend::autodiff::checkpoint::strategy::NoCheckpointing>(llama());
}

/// A byte-level tokenizer, shards of a small corpus in `dir`, and a 2-layer GPT with dropout.
fn small_run(dir: &std::path::Path) -> TrainConfig {
    let corpus = dir.join("corpus.txt");
    let text = "Tokens in, gradients out:\nthe fused path trains the same model, faster.\n";
    std::fs::write(&corpus, text.repeat(60)).unwrap();
    prepare_bytes(&[corpus], &dir.join("data"), &PrepareConfig::default()).unwrap();
    TrainConfig {
        model: ModelSpec::Full(ModelConfig {
            vocab_size: 257,
            dropout: 0.1,
            ..gpt()
        }),
        data_dir: dir.join("data"),
        micro_batch: 4,
        seq_len: 72,
        grad_accum: 2,
        max_steps: 12,
        lr: 3e-3,
        min_lr: 3e-4,
        warmup_steps: 2,
        eval_interval: 0,
        checkpoint_interval: 0,
        log_interval: 6,
        ..TrainConfig::default()
    }
}

#[test]
fn resume_on_the_fused_path_is_bitwise_exact() {
    type B = Autodiff<Flex>;
    let _rng = rng_turn();
    let dir = tempfile::tempdir().unwrap();
    let config = small_run(dir.path());
    let mut straight = Trainer::<B>::new(config.clone(), dir.path().join("a"), Default::default())
        .expect("trainer");
    let all: Vec<f64> = (0..12).map(|_| straight.step().unwrap().loss).collect();
    let run = dir.path().join("b");
    let mut first = Trainer::<B>::new(config, &run, Default::default()).expect("trainer");
    let mut split: Vec<f64> = (0..6).map(|_| first.step().unwrap().loss).collect();
    first.save_checkpoint().unwrap();
    drop(first);
    let mut resumed = Trainer::<B>::resume(&run, None, Default::default()).expect("resume");
    split.extend((0..6).map(|_| resumed.step().unwrap().loss));
    let eval = (straight.evaluate().unwrap(), resumed.evaluate().unwrap());
    assert_eq!(split, all, "bitwise equal loss curves");
    assert!(all[11] < all[0], "the loss falls: {all:?}");
    assert_eq!(eval.0, eval.1);
}

#[test]
fn activation_checkpointing_on_the_fused_path_gives_bitwise_the_same_steps() {
    let _rng = rng_turn();
    let dir = tempfile::tempdir().unwrap();
    let config = small_run(dir.path());
    let mut plain =
        Trainer::<Autodiff<Flex>>::new(config.clone(), dir.path().join("a"), Default::default())
            .expect("trainer");
    let mut checkpointed = Trainer::<Autodiff<Flex, BalancedCheckpointing>>::new(
        TrainConfig {
            activation_checkpointing: true,
            ..config
        },
        dir.path().join("b"),
        Default::default(),
    )
    .expect("trainer");
    let steps: Vec<_> = (0..6)
        .map(|_| (plain.step().unwrap(), checkpointed.step().unwrap()))
        .collect();
    for (p, c) in steps {
        assert!(p.applied && c.applied);
        assert!(
            p.loss == c.loss && p.grad_norm == c.grad_norm,
            "{} vs {}",
            p.loss,
            c.loss
        );
    }
}

/// BF16 without bf16 products (composed ops, or a CPU without AVX512_BF16) runs a bf16 compute
/// copy, which does not take the fused (f32-only) path: its steps are the composed ops' steps.
/// With bf16 products (the fused kernels on a CPU with AVX512_BF16) the tensors stay f32 and only
/// the linear layers' multiplications round to bf16: the same losses to bf16's precision.
#[test]
fn bf16_compute_falls_back_to_burn_ops() {
    type B = Autodiff<Flex>;
    let _rng = rng_turn();
    let dir = tempfile::tempdir().unwrap();
    let config = TrainConfig {
        precision: Precision::Bf16,
        ..small_run(dir.path())
    };
    let mut losses = Vec::new();
    for fused in [false, true] {
        let _composed = (!fused).then(ComposedOps::enter);
        let mut trainer = Trainer::<B>::new(
            config.clone(),
            dir.path().join(format!("run-{fused}")),
            Default::default(),
        )
        .expect("trainer");
        losses.push(
            (0..3)
                .map(|_| trainer.step().unwrap().loss)
                .collect::<Vec<_>>(),
        );
    }
    assert!(losses.iter().flatten().all(|l| l.is_finite()));
    if Precision::Bf16.linear_products::<B>().is_some() {
        for (copy, products) in losses[0].iter().zip(&losses[1]) {
            assert!(
                (copy - products).abs() < 0.01 * copy,
                "bf16 copy {copy} vs bf16 products {products}"
            );
        }
        assert_ne!(losses[0], losses[1], "bf16 products are a different path");
    } else {
        assert_eq!(losses[0], losses[1]);
    }
}
