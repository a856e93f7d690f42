//! Training end to end on a tiny model: the loss falls, resume is exact, a NaN step is skipped and
//! recovered from, checkpoints rotate, clipping uses the global norm.

use std::path::Path;

use burn::backend::{Autodiff, Flex};
use burn::optim::GradientsParams;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use kiln_bpe::prepare::{PrepareConfig, prepare};
use kiln_bpe::{BpeTrainer, TrainerConfig as BpeConfig};
use kiln_trainer::checkpoint::list_checkpoints;
use kiln_trainer::optimizer::{GroupedAdamW, param_infos};
use kiln_trainer::{ModelSpec, TrainConfig, Trainer};
use kiln_transformer::{ModelConfig, Transformer};

type B = Autodiff<Flex>;

/// Burn's CPU random generator is process-wide: tests that depend on seeded initialization and
/// dropout run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const TEXT: &str = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n\
The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\nAnd by opposing end them.\n";

/// A byte-level tokenizer and shards of a small corpus in `dir`.
fn data(dir: &Path) -> TrainConfig {
    let corpus = dir.join("corpus.txt");
    std::fs::write(&corpus, TEXT.repeat(40)).unwrap();
    let mut t = BpeTrainer::new(BpeConfig {
        vocab_size: 257,
        ..BpeConfig::default()
    })
    .unwrap();
    t.feed_files(std::slice::from_ref(&corpus)).unwrap();
    let tok = t.finish().unwrap();
    tok.save(dir.join("tokenizer.json")).unwrap();
    prepare(
        &tok,
        &[corpus],
        &dir.join("data"),
        &PrepareConfig::default(),
    )
    .unwrap();
    TrainConfig {
        model: ModelSpec::Full(ModelConfig {
            vocab_size: 257,
            context_length: 32,
            n_layers: 2,
            n_heads: 2,
            n_kv_heads: 2,
            d_model: 32,
            d_ff: 64,
            dropout: 0.1,
            ..ModelConfig::shakespeare_char_cpu(257)
        }),
        data_dir: dir.join("data"),
        tokenizer: Some(dir.join("tokenizer.json")),
        micro_batch: 4,
        seq_len: 16,
        grad_accum: 2,
        max_steps: 20,
        lr: 3e-3,
        min_lr: 3e-4,
        warmup_steps: 4,
        eval_interval: 0,
        checkpoint_interval: 10,
        keep_checkpoints: 2,
        log_interval: 5,
        ..TrainConfig::default()
    }
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
        vocab_size: 50,
        context_length: 8,
        n_layers: 1,
        n_heads: 2,
        n_kv_heads: 2,
        d_model: 8,
        d_ff: 16,
        bias: true,
        tied_embeddings: true,
        ..ModelConfig::gpt2_124m()
    };
    let device = Default::default();
    let model: Transformer<B> = config.init(&device).unwrap();
    let infos = param_infos::<B, _>(&model);
    let decayed: Vec<&str> = infos
        .iter()
        .filter(|p| p.decay)
        .map(|p| p.path.as_str())
        .collect();
    assert!(
        decayed.contains(&"blocks.0.attn.qkv.weight")
            && decayed.contains(&"blocks.0.mlp.down.weight")
    );
    assert!(
        infos
            .iter()
            .filter(|p| p.path.contains("emb")
                || p.path.contains("norm")
                || p.path.ends_with("bias"))
            .all(|p| !p.decay)
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
fn embedding_decay_is_opt_in() {
    let _serial = serial();
    let config = ModelConfig {
        vocab_size: 50,
        context_length: 8,
        n_layers: 1,
        n_heads: 2,
        n_kv_heads: 2,
        d_model: 8,
        d_ff: 16,
        ..ModelConfig::gpt2_124m()
    };
    let model: Transformer<B> = config.init(&Default::default()).unwrap();
    let infos = param_infos::<B, _>(&model);
    let emb = infos.iter().find(|p| p.path == "tok_emb.weight").unwrap();
    assert!(emb.embedding && !emb.decay);
    let qkv = infos
        .iter()
        .find(|p| p.path == "blocks.0.attn.qkv.weight")
        .unwrap();
    let plain = GroupedAdamW::<B, Transformer<B>>::new(&model, 0.9, 0.99, 1e-8, 0.1);
    assert!(!plain.decays(emb.id) && plain.decays(qkv.id));
    let nanogpt = plain.with_embedding_decay(&model, true);
    assert!(nanogpt.decays(emb.id) && nanogpt.decays(qkv.id));
}
