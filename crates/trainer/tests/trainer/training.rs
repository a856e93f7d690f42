//! Training end to end on a tiny model: the loss falls, resume is exact, a NaN step is skipped and
//! recovered from, checkpoints rotate, clipping uses the global norm.

use crate::common;

use std::path::Path;

use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::backend::{Autodiff, Flex};
use burn::optim::GradientsParams;
use burn::tensor::{DType, ElementConversion, FloatDType, Int, Tensor, TensorData};
use kiln_trainer::checkpoint::list_checkpoints;
use kiln_trainer::memory;
use kiln_trainer::optimizer::{GroupedAdamW, embedding_param_ids, param_infos};
use kiln_trainer::precision::compute_copy;
use kiln_trainer::{ModelSpec, Precision, StepReport, TrainConfig, TrainError, Trainer};
use kiln_transformer::{ModelConfig, PositionEncoding, RopePairing, Transformer};

type B = Autodiff<Flex>;

use common::serial;

const TEXT: &str = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n\
The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\nAnd by opposing end them.\n";

/// A byte-level tokenizer and shards of a small corpus in `dir`, and a tiny model with dropout.
fn data(dir: &Path) -> TrainConfig {
    common::tiny_run(dir, TEXT, 0.1)
}

#[test]
fn loss_falls_and_a_checkpoint_is_written() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut config = data(dir.path());
    config.max_steps = 60;
    let run = dir.path().join("run");
    let mut trainer = Trainer::<B>::new(config, &run, Default::default()).unwrap();
    let before = trainer.evaluate().unwrap();
    let after = trainer.train().unwrap();
    assert!(after < before * 0.7, "val loss {before} -> {after}");
    assert!(
        (before - (257f64).ln()).abs() < 0.5,
        "initial loss {before} is about ln(vocab)"
    );
    let ckpts = list_checkpoints(&run);
    assert_eq!(
        ckpts.iter().map(|c| c.0).collect::<Vec<_>>(),
        vec![50, 60],
        "keeps the newest 2"
    );
    let model_dir = ckpts[1].1.join("model");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(model_dir.join(f).exists(), "{f}");
    }
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert!(metrics.lines().any(|l| l.contains("\"val_loss\"")));
    assert!(metrics.lines().any(|l| l.contains("\"tokens_per_s\"")));
}

/// A one-layer, 8-wide GPT for tests that inspect parameters rather than train.
fn micro_gpt() -> ModelConfig {
    ModelConfig {
        vocab_size: 50,
        context_length: 8,
        n_layers: 1,
        n_heads: 2,
        n_kv_heads: 2,
        d_model: 8,
        d_ff: 16,
        ..ModelConfig::gpt2_124m()
    }
}

fn losses(trainer: &mut Trainer<B>, steps: usize) -> Vec<f64> {
    (0..steps).map(|_| trainer.step().unwrap().loss).collect()
}

#[test]
fn resume_is_exact() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let config = data(dir.path());
    // Uninterrupted: 20 steps.
    let mut straight =
        Trainer::<B>::new(config.clone(), dir.path().join("a"), Default::default()).unwrap();
    let all = losses(&mut straight, 20);
    // Interrupted at 10, checkpointed, resumed in a new trainer, 10 more.
    let run = dir.path().join("b");
    let mut first = Trainer::<B>::new(config, &run, Default::default()).unwrap();
    let mut split = losses(&mut first, 10);
    first.save_checkpoint().unwrap();
    drop(first);
    let mut resumed = Trainer::<B>::resume(&run, None, Default::default()).unwrap();
    assert_eq!(resumed.state().step, 10);
    split.extend(losses(&mut resumed, 10));
    assert_eq!(split, all, "bitwise equal loss curves");
    assert_eq!(straight.evaluate().unwrap(), resumed.evaluate().unwrap());
}

#[test]
fn a_nan_step_is_skipped_and_training_continues() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut config = data(dir.path());
    config.max_steps = 40;
    config.max_bad_steps = 2;
    let mut trainer =
        Trainer::<B>::new(config, dir.path().join("run"), Default::default()).unwrap();
    let start = trainer.evaluate().unwrap();
    for _ in 0..10 {
        assert!(trainer.step().unwrap().applied);
    }
    trainer.save_checkpoint().unwrap();
    trainer.poison_next_step();
    let bad = trainer.step().unwrap();
    assert!(!bad.applied && bad.loss.is_nan());
    assert!(
        trainer.evaluate().unwrap().is_finite(),
        "weights untouched by the bad step"
    );
    // Two bad steps in a row: reload the last checkpoint and halve the learning rate.
    trainer.poison_next_step();
    trainer.poison_next_step();
    trainer.step().unwrap();
    trainer.poison_next_step();
    trainer.step().unwrap();
    assert_eq!(trainer.state().lr_scale, 0.5);
    let end = trainer.train().unwrap();
    assert!(end.is_finite() && end < start * 0.8, "{start} -> {end}");
}

#[test]
fn global_norm_clipping_and_parameter_groups() {
    let _serial = serial();
    let config = ModelConfig {
        bias: true,
        tied_embeddings: true,
        ..micro_gpt()
    };
    let device = Default::default();
    let model: Transformer<B> = config.init(&device).unwrap();
    let infos = param_infos::<B, _>(&model);
    let decayed: Vec<&str> = infos
        .iter()
        .filter(|p| p.decay)
        .map(|p| p.path.as_str())
        .collect();
    // By rank, as nanoGPT: every matrix decays, embedding tables included; vectors do not.
    assert!(
        decayed.contains(&"blocks.0.attn.qkv.weight")
            && decayed.contains(&"blocks.0.mlp.down.weight")
            && decayed.contains(&"tok_emb.weight")
            && decayed.contains(&"pos_emb.weight")
    );
    assert!(infos.iter().all(|p| p.decay == (p.rank >= 2)));
    assert!(
        infos
            .iter()
            .filter(|p| p.path.contains("norm") || p.path.ends_with("bias"))
            .all(|p| !p.decay && p.rank == 1)
    );

    let ids = Tensor::<B, 2, Int>::from_data(
        TensorData::new((0..16).map(|i| i % 50).collect::<Vec<i64>>(), [2, 8]),
        &device,
    );
    let loss = model.forward(ids).unwrap().mean();
    let mut grads = GradientsParams::from_grads(loss.backward(), &model);
    // The global norm, computed here independently from every gradient.
    let mut sum = 0.0f64;
    for p in &infos {
        let square_sum = match p.rank {
            1 => grads.get::<Flex, 1>(p.id).map(|g| g.square().sum()),
            _ => grads.get::<Flex, 2>(p.id).map(|g| g.square().sum()),
        };
        sum += square_sum
            .expect("every parameter has a gradient")
            .into_scalar()
            .elem::<f64>();
    }
    let norm = GroupedAdamW::<B, Transformer<B>>::grad_norm(&model, &grads);
    assert!(
        (norm - sum.sqrt()).abs() < 1e-6 * norm.max(1.0),
        "{norm} vs {}",
        sum.sqrt()
    );
    let before = GroupedAdamW::<B, Transformer<B>>::clip(&model, &mut grads, norm / 4.0);
    assert_eq!(before, norm);
    let after = GroupedAdamW::<B, Transformer<B>>::grad_norm(&model, &grads);
    assert!(
        (after - norm / 4.0).abs() < 1e-4 * norm,
        "clipped to {after}"
    );
}

#[test]
fn bad_configs_are_clear_errors() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut config = data(dir.path());
    config.seq_len = 64;
    let err = Trainer::<B>::new(config.clone(), dir.path().join("r"), Default::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("context"), "{err}");
    config.seq_len = 16;
    config.data_dir = dir.path().join("nope");
    let err = Trainer::<B>::new(config, dir.path().join("r"), Default::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("nope"), "{err}");
    let err = Trainer::<B>::resume(dir.path().join("empty"), None, Default::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("no completed checkpoint"), "{err}");
}

#[test]
fn embeddings_decay_by_default_and_can_be_exempted_structurally() {
    let _serial = serial();
    let model: Transformer<B> = micro_gpt().init(&Default::default()).unwrap();
    let infos = param_infos::<B, _>(&model);
    let id = |path: &str| infos.iter().find(|p| p.path == path).unwrap().id;
    let (tok, pos, qkv) = (
        id("tok_emb.weight"),
        id("pos_emb.weight"),
        id("blocks.0.attn.qkv.weight"),
    );
    assert_eq!(embedding_param_ids(&model), vec![tok, pos]);
    let nanogpt = GroupedAdamW::<B, Transformer<B>>::new(&model, 0.9, 0.99, 1e-8, 0.1);
    assert!(nanogpt.decays(tok) && nanogpt.decays(pos) && nanogpt.decays(qkv));
    let exempt = nanogpt.without_decay(embedding_param_ids(&model));
    assert!(!exempt.decays(tok) && !exempt.decays(pos) && exempt.decays(qkv));
    // The config switch: on by default; off exempts exactly the embedding tables.
    let mut config = TrainConfig::default();
    assert!(config.decay_embeddings);
    let on = GroupedAdamW::for_config(&model, &config);
    config.decay_embeddings = false;
    let off = GroupedAdamW::for_config(&model, &config);
    for p in &infos {
        let embedding = p.id == tok || p.id == pos;
        assert_eq!(on.decays(p.id), p.rank >= 2, "{}", p.path);
        assert_eq!(off.decays(p.id), p.rank >= 2 && !embedding, "{}", p.path);
    }
    // A rotary model has no position table.
    let rope = ModelConfig {
        position: PositionEncoding::Rope {
            theta: 10000.0,
            pairing: RopePairing::HalfSplit,
        },
        ..micro_gpt()
    };
    let model: Transformer<B> = rope.init(&Default::default()).unwrap();
    assert_eq!(embedding_param_ids(&model), vec![model.tok_emb.weight.id]);
}

/// Trains `steps` steps at `precision` from the tiny config; returns (initial, final) validation
/// loss and the trainer.
fn train_at(dir: &Path, precision: Precision, steps: u64) -> (f64, f64, Trainer<B>) {
    let mut config = data(dir);
    config.max_steps = steps;
    config.precision = precision;
    let run = dir.join(format!("run-{precision:?}"));
    let mut trainer = Trainer::<B>::new(config, &run, Default::default()).unwrap();
    let before = trainer.evaluate().unwrap();
    let after = trainer.train().unwrap();
    (before, after, trainer)
}

#[test]
fn bf16_trains_like_f32() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let (start, f32_end, _) = train_at(dir.path(), Precision::F32, 60);
    let (bf16_start, bf16_end, trainer) = train_at(dir.path(), Precision::Bf16, 60);
    eprintln!("f32 {start} -> {f32_end}; bf16 {bf16_start} -> {bf16_end}");
    assert_eq!(start, bf16_start, "same seed, same f32 initial weights");
    assert!(
        bf16_end < start * 0.7,
        "bf16 val loss {start} -> {bf16_end}"
    );
    assert!(
        (bf16_end - f32_end).abs() < 0.05 * f32_end,
        "bf16 {bf16_end} vs f32 {f32_end}"
    );
    assert_eq!(
        trainer.state().loss_scaler.scale(),
        1.0,
        "bf16 needs no loss scaling"
    );
    // The run says which bf16 path it took.
    let metrics = std::fs::read_to_string(dir.path().join("run-Bf16/metrics.jsonl")).unwrap();
    let how = if Precision::Bf16.linear_products::<B>().is_some() {
        "bf16 products in f32 tensors"
    } else {
        "a low-precision compute copy"
    };
    assert!(
        metrics.contains(&format!("\"mixed_precision\":\"{how}\"")),
        "{metrics}"
    );
}

#[test]
fn f16_with_loss_scaling_trains() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let (start, f32_end, _) = train_at(dir.path(), Precision::F32, 60);
    let (_, f16_end, trainer) = train_at(dir.path(), Precision::F16, 60);
    eprintln!("f32 {start} -> {f32_end}; f16 -> {f16_end}");
    assert!(f16_end < start * 0.7, "f16 val loss {start} -> {f16_end}");
    assert!(
        (f16_end - f32_end).abs() < 0.05 * f32_end,
        "f16 {f16_end} vs f32 {f32_end}"
    );
    assert!(trainer.state().loss_scaler.dynamic);
}

#[test]
fn the_compute_copy_runs_in_low_precision_and_hands_f32_gradients_to_the_master_weights() {
    let _serial = serial();
    let config = ModelConfig {
        bias: true,
        ..micro_gpt()
    };
    let device = Default::default();
    // Fresh (lazily initialized) parameters: the copy must still share the master weights.
    let model: Transformer<B> = config.init(&device).unwrap();
    let ids = Tensor::<B, 2, Int>::from_data(
        TensorData::new((0..16).map(|i| i % 50).collect::<Vec<i64>>(), [2, 8]),
        &device,
    );
    for dtype in [FloatDType::BF16, FloatDType::F16] {
        let copy = compute_copy(&model, dtype);
        assert_eq!(copy.tok_emb.weight.val().dtype(), DType::from(dtype));
        let logits = copy.forward(ids.clone()).unwrap();
        assert_eq!(logits.dtype(), DType::from(dtype));
        let loss = logits.cast(FloatDType::F32).mean();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        for p in param_infos::<B, _>(&model) {
            let dt = match p.rank {
                1 => grads.get::<Flex, 1>(p.id).map(|g| g.dtype()),
                _ => grads.get::<Flex, 2>(p.id).map(|g| g.dtype()),
            };
            assert_eq!(dt, Some(DType::F32), "{} ({dtype:?})", p.path);
        }
        // The copy holds the master weights, rounded.
        let master = model
            .tok_emb
            .weight
            .val()
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let low = copy.tok_emb.weight.val().cast(FloatDType::F32);
        let low = low.into_data().to_vec::<f32>().unwrap();
        let err = master
            .iter()
            .zip(&low)
            .map(|(a, b)| (a - b).abs() / a.abs().max(1e-3))
            .fold(0.0f32, f32::max);
        assert!(err < 1e-2, "relative rounding error {err}");
    }
}

#[test]
fn rotary_models_train_in_bf16() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut config = data(dir.path());
    let ModelSpec::Full(model) = &mut config.model else {
        unreachable!()
    };
    model.position = PositionEncoding::Rope {
        theta: 10000.0,
        pairing: RopePairing::HalfSplit,
    };
    config.max_steps = 40;
    let at = |precision: Precision| {
        let mut config = config.clone();
        config.precision = precision;
        let run = dir.path().join(format!("rope-{precision:?}"));
        let mut trainer = Trainer::<B>::new(config, run, Default::default()).unwrap();
        let before = trainer.evaluate().unwrap();
        (before, trainer.train().unwrap())
    };
    let (start, f32_end) = at(Precision::F32);
    let (bf16_start, bf16_end) = at(Precision::Bf16);
    assert_eq!(start, bf16_start);
    assert!(
        bf16_end < start * 0.8,
        "bf16 val loss {start} -> {bf16_end}"
    );
    assert!(
        (bf16_end - f32_end).abs() < 0.05 * f32_end,
        "bf16 {bf16_end} vs f32 {f32_end}"
    );
}

#[test]
fn the_loss_scale_halves_on_overflow_and_grows_after_clean_steps() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut config = data(dir.path());
    config.precision = Precision::F16;
    config.loss_scale_growth_interval = 3;
    config.max_bad_steps = 5;
    let run = dir.path().join("run");
    let mut trainer = Trainer::<B>::new(config, &run, Default::default()).unwrap();
    // f16 really overflows at the initial 2^16 on this model: the first steps back off until one
    // fits (and none of them counts towards divergence recovery).
    let mut settled = None;
    for _ in 0..8 {
        let r = trainer.step().unwrap();
        assert!(r.applied || r.loss.is_finite());
        if r.applied {
            settled = Some(r.loss_scale);
            break;
        }
    }
    let scale = settled.expect("the scale settles within 8 steps");
    assert!(scale <= 65536.0);
    assert_eq!(
        trainer.state().lr_scale,
        1.0,
        "overflows are not divergence"
    );
    let before = trainer.evaluate().unwrap();
    trainer.poison_next_step();
    let bad = trainer.step().unwrap();
    assert!(!bad.applied && !bad.grad_norm.is_finite());
    assert_eq!(trainer.state().loss_scaler.scale(), scale / 2.0, "halved");
    assert_eq!(
        trainer.evaluate().unwrap(),
        before,
        "a skipped step touches no weight"
    );
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert!(
        metrics.contains(&format!("loss scale -> {}", scale / 2.0)),
        "the skip is logged with its reason: {metrics}"
    );
    let scale = scale / 2.0;
    // Growth interval 3: two clean steps keep the scale, the third doubles it.
    for expected in [scale, scale, 2.0 * scale] {
        let r = trainer.step().unwrap();
        assert!(r.applied);
        assert_eq!(trainer.state().loss_scaler.scale(), expected);
    }
}

#[test]
fn the_loss_scale_survives_checkpoint_and_resume() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut config = data(dir.path());
    config.precision = Precision::F16;
    config.loss_scale_growth_interval = 4;
    // Uninterrupted: 20 steps, an overflow injected at step 3.
    let run_a = dir.path().join("a");
    let mut straight = Trainer::<B>::new(config.clone(), &run_a, Default::default()).unwrap();
    let mut all = Vec::new();
    for i in 0..20 {
        if i == 3 {
            straight.poison_next_step();
        }
        all.push(straight.step().unwrap());
    }
    // The same with a checkpoint at step 9 (mid-way to the next growth) and a resume.
    let run = dir.path().join("b");
    let mut first = Trainer::<B>::new(config, &run, Default::default()).unwrap();
    let mut split = Vec::new();
    for i in 0..9 {
        if i == 3 {
            first.poison_next_step();
        }
        split.push(first.step().unwrap());
    }
    let scaler = first.state().loss_scaler.clone();
    assert!(
        scaler.clean_steps > 0 && scaler.scale != 65536.0,
        "{scaler:?}"
    );
    first.save_checkpoint().unwrap();
    drop(first);
    let mut resumed = Trainer::<B>::resume(&run, None, Default::default()).unwrap();
    assert_eq!(resumed.state().loss_scaler, scaler);
    split.extend((9..20).map(|_| resumed.step().unwrap()));
    let bits = |r: &Vec<StepReport>| {
        r.iter()
            .map(|r| {
                (
                    r.loss.to_bits(),
                    r.grad_norm.to_bits(),
                    r.applied,
                    r.loss_scale,
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        bits(&split),
        bits(&all),
        "bitwise equal steps, loss scales included"
    );
    assert!(all.iter().any(|r| r.applied && r.loss_scale < 65536.0));
    assert_eq!(straight.state().loss_scaler, resumed.state().loss_scaler);
}

#[test]
fn a_run_that_does_not_fit_the_memory_budget_fails_before_training_with_settings_that_fit() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut config = data(dir.path());
    config.micro_batch = 8;
    config.grad_accum = 1;
    let model = config.model.resolve(Some(257)).unwrap();
    let need = |b: usize| {
        memory::estimate(
            &model,
            &TrainConfig {
                micro_batch: b,
                grad_accum: 8 / b,
                ..config.clone()
            },
        )
        .total
    };
    // Room for micro-batches of 2 (with accumulation), not 4.
    let budget = (need(2) + need(4)) / 2.0;
    config.max_memory_gb = Some(budget / memory::GB);
    let run = dir.path().join("r");
    let err = Trainer::<B>::new(config.clone(), &run, Default::default())
        .err()
        .unwrap();
    let text = err.to_string();
    assert!(matches!(err, TrainError::OutOfMemory { .. }), "{text}");
    assert!(
        text.contains("micro_batch = 2 with grad_accum = 4 (the same 128 tokens per step)"),
        "{text}"
    );
    assert!(!run.join("checkpoints").exists(), "nothing started");
    // The suggested settings start.
    config.micro_batch = 2;
    config.grad_accum = 4;
    assert!(Trainer::<B>::new(config, &run, Default::default()).is_ok());
}

/// Balanced checkpointing recomputes memory-bound operations in the backward pass; the numbers
/// are the same, dropout included.
#[test]
fn activation_checkpointing_gives_bitwise_the_same_steps() {
    type Checkpointed = Autodiff<Flex, BalancedCheckpointing>;
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut config = data(dir.path());
    config.activation_checkpointing = true;
    for precision in [Precision::F32, Precision::Bf16] {
        config.precision = precision;
        let mut plain =
            Trainer::<B>::new(config.clone(), dir.path().join("a"), Default::default()).unwrap();
        let mut ckpt =
            Trainer::<Checkpointed>::new(config.clone(), dir.path().join("b"), Default::default())
                .unwrap();
        for _ in 0..8 {
            let (p, c) = (plain.step().unwrap(), ckpt.step().unwrap());
            assert!(p.applied && c.applied);
            assert!(
                p.loss == c.loss && p.grad_norm == c.grad_norm,
                "{precision:?}: {} vs {}",
                p.loss,
                c.loss
            );
        }
    }
}
