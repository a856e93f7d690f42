//! Data parallelism and ZeRO on ranks that are threads of this process, through Burn's collective
//! engine: the losses of one process with the ranks' combined batch, identical weights on every
//! rank, ZeRO-1/2/3 following plain data parallelism, the model-state bytes the ZeRO paper counts,
//! and checkpoints that resume on the same or another number of ranks.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::AutodiffBackend;
use kiln_bpe::TokenShard;
use kiln_bpe::prepare::{PrepareConfig, prepare_bytes};
use kiln_distributed::{Communicator, GatherBackend, Transport, flat, trainer_builder};
use kiln_trainer::{ModelSpec, ModelStateBytes, Precision, TrainConfig, Trainer};
use kiln_transformer::ModelConfig;

type B = Autodiff<Flex>;
type Inner = <B as AutodiffBackend>::InnerBackend;

use super::SERIAL;

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Shards of a slice of Tiny Shakespeare (or a built-in text) and a 2-layer GPT without dropout.
fn config(dir: &Path) -> TrainConfig {
    let text = std::fs::read_to_string("../../../shared/data/tinyshakespeare.txt")
        .map(|t| t.chars().take(60_000).collect::<String>())
        .unwrap_or_else(|_| {
            "Now is the winter of our discontent\nMade glorious summer by this sun of York;\n"
                .repeat(400)
        });
    let corpus = dir.join("corpus.txt");
    std::fs::write(&corpus, text).unwrap();
    prepare_bytes(&[corpus], &dir.join("data"), &PrepareConfig::default()).unwrap();
    TrainConfig {
        model: ModelSpec::Full(ModelConfig {
            vocab_size: 257,
            context_length: 32,
            n_layers: 2,
            n_heads: 2,
            n_kv_heads: 2,
            d_model: 32,
            d_ff: 64,
            dropout: 0.0,
            ..ModelConfig::shakespeare_char_cpu(257)
        }),
        data_dir: dir.join("data"),
        tokenizer: Some(dir.join("data/tokenizer.json")),
        micro_batch: 8,
        seq_len: 16,
        grad_accum: 1,
        max_steps: 20,
        lr: 3e-3,
        min_lr: 3e-4,
        warmup_steps: 4,
        eval_interval: 0,
        eval_batches: 4,
        checkpoint_interval: 0,
        log_interval: 5,
        ..TrainConfig::default()
    }
}

/// A hash of the model's parameter values (bits), in visiting order.
fn weights_hash<Bk: AutodiffBackend<InnerBackend = Inner>>(trainer: &Trainer<Bk>) -> u64 {
    let mut h = DefaultHasher::new();
    for v in flat::param_values::<Bk, _>(trainer.model().unwrap())
        .into_iter()
        .flatten()
    {
        for x in v.into_data().convert::<f32>().into_vec::<f32>().unwrap() {
            x.to_bits().hash(&mut h);
        }
    }
    h.finish()
}

/// What one rank saw.
struct RankRun {
    losses: Vec<f64>,
    hashes: Vec<u64>,
    bytes: ModelStateBytes,
    val: f64,
}

/// `world` ranks as threads at ZeRO `stage`, each at `config.micro_batch`, for `steps` steps
/// (resuming the run in `run` when `resume`), saving a checkpoint at the end.
fn run_ranks(
    config: &TrainConfig,
    world: usize,
    run: &Path,
    steps: usize,
    resume: bool,
) -> Vec<RankRun> {
    run_ranks_on::<B>(config, world, run, steps, resume)
}

/// [`run_ranks`] on the autodiff backend `Bk` (Burn's activation checkpointing is one).
fn run_ranks_on<Bk: GatherBackend<InnerBackend = Inner>>(
    config: &TrainConfig,
    world: usize,
    run: &Path,
    steps: usize,
    resume: bool,
) -> Vec<RankRun> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let config = config.clone();
                let run = run.to_owned();
                s.spawn(move || {
                    let comm = Arc::new(
                        Communicator::<Inner>::join(
                            rank,
                            world,
                            Default::default(),
                            &Transport::Threads,
                        )
                        .unwrap(),
                    );
                    let builder =
                        trainer_builder::<Bk>(comm, config.zero_stage, Default::default());
                    let mut trainer = if resume {
                        builder.resume(&run, None).unwrap()
                    } else {
                        builder.start(config, &run).unwrap()
                    };
                    let mut losses = Vec::new();
                    let mut hashes = Vec::new();
                    for _ in 0..steps {
                        let report = trainer.step().unwrap();
                        assert!(report.applied);
                        losses.push(report.loss);
                        hashes.push(weights_hash(&trainer));
                    }
                    let bytes = trainer.model_state_bytes();
                    let val = trainer.evaluate_full().unwrap();
                    trainer.save_checkpoint().unwrap();
                    RankRun {
                        losses,
                        hashes,
                        bytes,
                        val,
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn single_process(config: &TrainConfig, run: &Path, steps: usize) -> Vec<f64> {
    let mut t = Trainer::<B>::new(config.clone(), run, Default::default()).unwrap();
    (0..steps).map(|_| t.step().unwrap().loss).collect()
}

fn assert_close(a: &[f64], b: &[f64], rel: f64, what: &str) {
    assert_eq!(a.len(), b.len());
    for (step, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= rel * x.abs().max(y.abs()),
            "{what}: step {step}: {x} vs {y}\n{a:?}\n{b:?}"
        );
    }
}

#[test]
fn data_parallel_ranks_train_like_one_process_with_their_combined_batch() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let base = config(dir.path());
    for world in [2, 4] {
        let mut single = base.clone();
        single.micro_batch = 2 * world;
        let expected = single_process(&single, &dir.path().join(format!("single{world}")), 20);
        let mut ddp = base.clone();
        ddp.micro_batch = 2;
        let ranks = run_ranks(
            &ddp,
            world,
            &dir.path().join(format!("ddp{world}")),
            20,
            false,
        );
        for r in &ranks {
            assert_close(&r.losses, &expected, 1e-5, &format!("DDP x{world}"));
            assert_eq!(r.hashes, ranks[0].hashes, "identical weights on every rank");
            assert_eq!(r.val, ranks[0].val);
        }
        // The weights move every step.
        let mut distinct = ranks[0].hashes.clone();
        distinct.dedup();
        assert_eq!(distinct.len(), 20);
    }
}

#[test]
fn zero_stages_follow_plain_data_parallelism() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut base = config(dir.path());
    // A micro-batch that leaves rank 1 without rows in the last, partial validation batch: ZeRO-3
    // ranks must still take part in every gather of the evaluation.
    let rows = (TokenShard::open(base.data_dir.join("val.bin"))
        .unwrap()
        .len()
        - 1)
        / base.seq_len;
    base.micro_batch = (3..16)
        .find(|b| (1..=*b).contains(&(rows % (2 * b))))
        .expect("a micro-batch with an uneven last validation batch");
    let ddp = run_ranks(&base, 2, &dir.path().join("ddp"), 20, false);
    for stage in 1..=3 {
        let mut zero = base.clone();
        zero.zero_stage = stage;
        let ranks = run_ranks(
            &zero,
            2,
            &dir.path().join(format!("zero{stage}")),
            20,
            false,
        );
        for r in &ranks {
            assert_close(&r.losses, &ddp[0].losses, 1e-5, &format!("ZeRO-{stage}"));
            assert!(
                (r.val - ddp[0].val).abs() <= 1e-5 * ddp[0].val,
                "ZeRO-{stage} validation"
            );
        }
        if stage < 3 {
            assert_eq!(
                ranks[0].hashes, ranks[1].hashes,
                "ZeRO-{stage}: identical weights"
            );
        }
    }
}

#[test]
fn model_state_bytes_per_rank_match_the_zero_paper() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut base = config(dir.path());
    base.micro_batch = 2;
    base.precision = Precision::Bf16;
    let psi = {
        let t =
            Trainer::<B>::new(base.clone(), dir.path().join("count"), Default::default()).unwrap();
        kiln_trainer::parameter_bytes(t.model().unwrap()) as f64 / 4.0
    };
    for world in [2usize, 4] {
        let n = world as f64;
        // The paper's per-rank bytes: DDP, ZeRO-1, -2, -3 (mixed precision, Adam: K = 12).
        let paper = [16.0, 4.0 + 12.0 / n, 2.0 + 14.0 / n, 16.0 / n];
        for stage in 0..=3u8 {
            let mut c = base.clone();
            c.zero_stage = stage;
            let ranks = run_ranks(
                &c,
                world,
                &dir.path().join(format!("mem{world}-{stage}")),
                2,
                false,
            );
            for (rank, r) in ranks.iter().enumerate() {
                let per_param = r.bytes.total() as f64 / psi;
                let want = paper[stage as usize];
                assert!(
                    (per_param - want).abs() <= 0.1 * want,
                    "ZeRO-{stage}, rank {rank} of {world}: {per_param:.2} bytes per parameter, the paper says {want:.2} ({:?})",
                    r.bytes
                );
            }
        }
    }
}

fn checkpoint(run: &Path, step: u64) -> PathBuf {
    run.join(format!("checkpoints/step-{step}"))
}

#[test]
fn sharded_checkpoints_resume_exactly_and_on_other_world_sizes() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut base = config(dir.path());
    base.micro_batch = 4;
    base.zero_stage = 2;
    base.keep_checkpoints = 10;
    // 12 steps straight on 2 ranks.
    let straight = run_ranks(&base, 2, &dir.path().join("straight"), 12, false);
    // 6, then 6 more after a restart on 2 ranks: bit for bit.
    let run = dir.path().join("resumed");
    run_ranks(&base, 2, &run, 6, false);
    assert!(
        checkpoint(&run, 6)
            .join("zero-rank-00001-of-00002.safetensors")
            .exists()
    );
    let copy = |to: &str| {
        let dst = dir.path().join(to);
        std::fs::create_dir_all(dst.join("checkpoints")).unwrap();
        std::fs::copy(run.join("config.toml"), dst.join("config.toml")).unwrap();
        let from = checkpoint(&run, 6);
        let into = checkpoint(&dst, 6);
        std::fs::create_dir_all(&into).unwrap();
        for e in std::fs::read_dir(&from).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                std::fs::copy(e.path(), into.join(e.file_name())).unwrap();
            }
        }
        dst
    };
    let (on1, on4) = (copy("on1"), copy("on4"));
    let again = run_ranks(&base, 2, &run, 6, true);
    assert_eq!(again[0].losses, straight[0].losses[6..].to_vec(), "bitwise");
    assert_eq!(again[0].val, straight[0].val);
    // 8 rows per micro-batch do not split over 3 ranks: a clear error before training.
    let err = Trainer::<B>::builder(Default::default())
        .gradient_sync(ThreeRanks)
        .resume(&run, None)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("do not split evenly over 3 ranks"), "{err}");
    // Resharded: 2 -> 1 and 2 -> 4 ranks, each reading its rows of the two shard files (the
    // batch split differently, so equal to rounding).
    for (world, run) in [(1, on1), (4, on4)] {
        let ranks = run_ranks(&base, world, &run, 6, true);
        assert_close(
            &ranks[0].losses,
            &straight[0].losses[6..],
            1e-5,
            &format!("2 -> {world} ranks"),
        );
    }
}

/// A rank of three that never communicates (resume fails before it would).
struct ThreeRanks;

impl kiln_trainer::parallel::GradientSync<B> for ThreeRanks {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        3
    }
    fn sync(
        &mut self,
        _model: &kiln_transformer::Transformer<B>,
        grads: burn::optim::GradientsParams,
    ) -> kiln_trainer::Result<burn::optim::GradientsParams> {
        Ok(grads)
    }
    fn all_reduce_sum(&mut self, _values: &mut [f64]) -> kiln_trainer::Result<()> {
        Ok(())
    }
}

#[test]
fn all_reduce_sums_every_rank_once() {
    let _serial = serial();
    for world in [2usize, 3, 4] {
        let results: Vec<(Vec<f64>, Vec<f32>)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..world)
                .map(|rank| {
                    s.spawn(move || {
                        let comm = Communicator::<Inner>::join(
                            rank,
                            world,
                            Default::default(),
                            &Transport::Threads,
                        )
                        .unwrap();
                        let mut values = vec![10f64.powi(rank as i32), 0.5];
                        comm.all_reduce_values(&mut values).unwrap();
                        let t = burn::tensor::Tensor::<Inner, 1>::from_floats(
                            [rank as f32, 100.0 * rank as f32, 1.0, 2.0, 3.0],
                            &Default::default(),
                        );
                        let t = comm.all_reduce_sum(t).unwrap();
                        (values, t.into_data().into_vec::<f32>().unwrap())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let n = world as f64;
        let ones: f64 = (0..world).map(|r| 10f64.powi(r as i32)).sum();
        let ranks: f32 = (0..world).map(|r| r as f32).sum();
        for (values, tensor) in results {
            assert_eq!(values, vec![ones, 0.5 * n], "{world} ranks");
            assert_eq!(
                tensor,
                vec![
                    ranks,
                    100.0 * ranks,
                    n as f32,
                    2.0 * n as f32,
                    3.0 * n as f32
                ],
                "{world} ranks"
            );
        }
    }
}

#[test]
fn zero_works_with_mixed_precision_and_activation_checkpointing() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut base = config(dir.path());
    base.micro_batch = 4;
    // bf16: ZeRO's bf16 working copy and f32 master shards against DDP's f32 master weights and
    // bf16 compute copy (the same bf16 weights in the forward pass; ZeRO sums bf16 gradients).
    base.precision = Precision::Bf16;
    let ddp = run_ranks(&base, 2, &dir.path().join("ddp-bf16"), 10, false);
    for stage in [1, 3] {
        let mut zero = base.clone();
        zero.zero_stage = stage;
        let ranks = run_ranks(
            &zero,
            2,
            &dir.path().join(format!("zero{stage}-bf16")),
            10,
            false,
        );
        assert_close(
            &ranks[0].losses,
            &ddp[0].losses,
            1e-2,
            &format!("bf16 ZeRO-{stage}"),
        );
        assert!(
            ranks[0].losses[9] < ranks[0].losses[0] - 0.1,
            "it learns: {:?}",
            ranks[0].losses
        );
    }
    // Balanced activation checkpointing: the same steps as without.
    let mut f32 = base.clone();
    f32.precision = Precision::F32;
    f32.zero_stage = 3;
    let plain = run_ranks(&f32, 2, &dir.path().join("z3"), 6, false);
    let ckpt = run_ranks_on::<
        Autodiff<Flex, burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing>,
    >(&f32, 2, &dir.path().join("z3-ckpt"), 6, false);
    assert_close(
        &ckpt[0].losses,
        &plain[0].losses,
        1e-5,
        "ZeRO-3 with activation checkpointing",
    );
}

#[test]
fn one_rank_resumes_on_two() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut base = config(dir.path());
    base.micro_batch = 8;
    base.zero_stage = 1;
    let straight = run_ranks(&base, 1, &dir.path().join("straight"), 10, false);
    let run = dir.path().join("run");
    run_ranks(&base, 1, &run, 5, false);
    // 8 rows on one rank become 4 on each of two.
    let two = run_ranks(&base, 2, &run, 5, true);
    assert_close(
        &two[0].losses,
        &straight[0].losses[5..],
        1e-5,
        "1 -> 2 ranks",
    );
    assert_eq!(two[0].hashes, two[1].hashes);
}
