//! Knowledge distillation in the trainer: the loss is `α·T²·KL + (1 − α)·CE` exactly, the soft
//! term moves the student towards the teacher, resume is exact, and a teacher with another
//! vocabulary is refused before anything is written.

use crate::common::serial;
use std::path::Path;

use burn::backend::{Autodiff, Flex};
use kiln_bpe::prepare::{PrepareConfig, prepare_bytes};
use kiln_trainer::{DistillConfig, ModelSpec, TrainConfig, Trainer, init_model};
use kiln_transformer::{ModelConfig, save_model_dir};

type B = Autodiff<Flex>;

const TEXT: &str = "to be, or not to be: that is the question. whether 'tis nobler in the mind \
                    to suffer the slings and arrows of outrageous fortune.\n";

fn student() -> ModelConfig {
    ModelConfig {
        n_layers: 1,
        d_model: 32,
        n_heads: 2,
        n_kv_heads: 2,
        d_ff: 64,
        context_length: 16,
        ..ModelConfig::shakespeare_char(257)
    }
}

fn config(dir: &Path, distill: Option<DistillConfig>) -> TrainConfig {
    TrainConfig {
        model: ModelSpec::Full(ModelConfig {
            dropout: 0.0,
            ..student()
        }),
        data_dir: dir.join("data"),
        micro_batch: 4,
        seq_len: 16,
        max_steps: 6,
        warmup_steps: 2,
        eval_interval: 0,
        checkpoint_interval: 3,
        log_interval: 1,
        distill,
        ..TrainConfig::default()
    }
}

fn losses(trainer: &mut Trainer<B>, steps: usize) -> Vec<f64> {
    (0..steps).map(|_| trainer.step().unwrap().loss).collect()
}

fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.txt");
    std::fs::write(&corpus, TEXT.repeat(60)).unwrap();
    prepare_bytes(
        &[corpus],
        &dir.path().join("data"),
        &PrepareConfig::default(),
    )
    .unwrap();
    dir
}

/// A teacher model directory: `config` initialized from `seed`.
fn teacher(dir: &Path, name: &str, config: &ModelConfig, seed: u64) -> std::path::PathBuf {
    let model = init_model::<B>(config, seed, &Default::default()).unwrap();
    let path = dir.join(name);
    save_model_dir(&model, None, None, &path).unwrap();
    path
}

#[test]
fn the_loss_is_the_weighted_sum_of_kl_and_cross_entropy() {
    let _serial = serial();
    let dir = setup();
    let plain = losses(
        &mut Trainer::<B>::new(
            config(dir.path(), None),
            dir.path().join("plain"),
            Default::default(),
        )
        .unwrap(),
        3,
    );
    // α = 0: exactly the plain run (the soft term weighs nothing).
    let other = teacher(
        dir.path(),
        "other",
        &ModelConfig {
            d_model: 64,
            ..student()
        },
        9,
    );
    let distill = |teacher: &Path, alpha: f64, run: &str| {
        let c = config(
            dir.path(),
            Some(DistillConfig {
                teacher: teacher.to_owned(),
                temperature: 2.0,
                alpha,
            }),
        );
        Trainer::<B>::new(c, dir.path().join(run), Default::default()).unwrap()
    };
    assert_eq!(losses(&mut distill(&other, 0.0, "alpha0"), 3), plain);
    // A teacher equal to the student's initial weights: KL = 0 at the first step, so the loss is
    // (1 − α) · cross-entropy.
    let twin = teacher(
        dir.path(),
        "twin",
        &ModelConfig {
            dropout: 0.0,
            ..student()
        },
        TrainConfig::default().seed,
    );
    let first = losses(&mut distill(&twin, 0.25, "twin"), 1)[0];
    assert!(
        (first - 0.75 * plain[0]).abs() < 1e-5 * plain[0],
        "{first} vs 0.75 × {}",
        plain[0]
    );
    // α = 1 against another model: the soft term is positive and differs from the plain loss.
    let soft = losses(&mut distill(&other, 1.0, "soft"), 1)[0];
    assert!(soft > 0.0 && (soft - plain[0]).abs() > 1e-3, "{soft}");
}

#[test]
fn distillation_pulls_the_student_towards_the_teacher_and_resumes_exactly() {
    let _serial = serial();
    let dir = setup();
    let target = teacher(
        dir.path(),
        "teacher",
        &ModelConfig {
            d_model: 64,
            ..student()
        },
        3,
    );
    let distill = Some(DistillConfig {
        teacher: target.clone(),
        temperature: 1.0,
        alpha: 1.0,
    });
    let mut trainer = Trainer::<B>::new(
        config(dir.path(), distill.clone()),
        dir.path().join("run"),
        Default::default(),
    )
    .unwrap();
    let all = losses(&mut trainer, 6);
    assert!(all[5] < all[0], "KL to the teacher did not fall: {all:?}");

    // Stop at step 3 (the checkpoint), resume to 6: the same losses, bit for bit.
    let mut first = Trainer::<B>::new(
        TrainConfig {
            max_steps: 3,
            ..config(dir.path(), distill)
        },
        dir.path().join("resumed"),
        Default::default(),
    )
    .unwrap();
    first.train().unwrap();
    let mut resumed =
        Trainer::<B>::resume(dir.path().join("resumed"), Some(6), Default::default()).unwrap();
    assert_eq!(losses(&mut resumed, 3), all[3..]);
}

#[test]
fn a_teacher_with_another_vocabulary_is_refused_before_anything_is_written() {
    let _serial = serial();
    let dir = setup();
    let wrong = teacher(
        dir.path(),
        "wrong",
        &ModelConfig {
            vocab_size: 300,
            ..student()
        },
        1,
    );
    let run = dir.path().join("run");
    let Err(err) = Trainer::<B>::new(
        config(
            dir.path(),
            Some(DistillConfig {
                teacher: wrong,
                temperature: 2.0,
                alpha: 0.5,
            }),
        ),
        &run,
        Default::default(),
    ) else {
        panic!("a teacher with 300 tokens was accepted for a student of 257");
    };
    let err = err.to_string();
    assert!(
        err.contains("300") && err.contains("257") && err.contains("tokenizer"),
        "{err}"
    );
    assert!(!run.join("config.toml").exists());
}
