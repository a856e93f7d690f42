//! The trainer's seams: a custom gradient synchronization and optimizer are really used, the
//! step's decisions (clipping, skipping a non-finite step) follow the synchronized numbers, two
//! simulated data-parallel ranks train like one process with their combined batch, and the stop
//! flag ends a run cleanly with a checkpoint that resumes exactly.

use crate::common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};

use burn::backend::{Autodiff, Flex};
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;
use kiln_trainer::checkpoint::list_checkpoints;
use kiln_trainer::optimizer::{GroupedAdamW, OptimizerStep, scale_grads};
use kiln_trainer::parallel::GradientSync;
use kiln_trainer::{TrainConfig, TrainError, TrainOutcome, Trainer};
use kiln_transformer::Transformer;

type B = Autodiff<Flex>;
type Inner = <B as AutodiffBackend>::InnerBackend;

use common::serial;

const TEXT: &str = "Now is the winter of our discontent\nMade glorious summer by this sun of York;\n\
And all the clouds that lour'd upon our house\nIn the deep bosom of the ocean buried.\n";

/// A byte-level tokenizer, shards of a small corpus, and a tiny model without dropout.
fn config(dir: &Path) -> TrainConfig {
    TrainConfig {
        max_steps: 12,
        warmup_steps: 2,
        eval_batches: 4,
        checkpoint_interval: 0,
        keep_checkpoints: TrainConfig::default().keep_checkpoints,
        log_interval: 1,
        ..common::tiny_run(dir, TEXT, 0.0)
    }
}

/// What a fake synchronization saw.
#[derive(Default)]
struct Log {
    syncs: usize,
    /// The values each all-reduce was called with.
    reduced: Vec<Vec<f64>>,
}

/// Rank `rank` of two, whose partner holds exactly the same values (so sums double), except that
/// the partner's loss is NaN in the step whose `sync` call is number `partner_nan_at`.
struct Mirrored {
    rank: usize,
    grad_scale: f64,
    sharded: bool,
    partner_nan_at: Option<usize>,
    loss_next: bool,
    log: Arc<Mutex<Log>>,
}

impl Mirrored {
    fn new(log: &Arc<Mutex<Log>>) -> Self {
        Self {
            rank: 0,
            grad_scale: 1.0,
            sharded: false,
            partner_nan_at: None,
            loss_next: false,
            log: Arc::clone(log),
        }
    }
}

impl GradientSync<B> for Mirrored {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        2
    }

    fn sync(
        &mut self,
        model: &Transformer<B>,
        mut grads: GradientsParams,
    ) -> kiln_trainer::Result<GradientsParams> {
        self.log.lock().unwrap().syncs += 1;
        self.loss_next = true;
        scale_grads(model, &mut grads, self.grad_scale);
        Ok(grads)
    }

    fn all_reduce_sum(&mut self, values: &mut [f64]) -> kiln_trainer::Result<()> {
        let mut log = self.log.lock().unwrap();
        log.reduced.push(values.to_vec());
        for v in values.iter_mut() {
            *v *= 2.0;
        }
        // The first all-reduce after `sync` carries the loss.
        if std::mem::take(&mut self.loss_next) && self.partner_nan_at == Some(log.syncs) {
            values[0] = f64::NAN;
        }
        Ok(())
    }

    fn sharded(&self) -> bool {
        self.sharded
    }
}

/// The default optimizer, recording the norm of the gradients it is handed, and saving and
/// loading an extra file through the seam.
struct Recording {
    inner: GroupedAdamW<B, Transformer<B>>,
    norms: Arc<Mutex<Vec<f64>>>,
    loaded_from: Arc<Mutex<Vec<String>>>,
    stop_after: Option<(usize, Arc<AtomicBool>)>,
}

impl OptimizerStep<B, Transformer<B>> for Recording {
    fn step(
        &mut self,
        lr: f64,
        model: Transformer<B>,
        grads: GradientsParams,
    ) -> kiln_trainer::Result<Transformer<B>> {
        let mut norms = self.norms.lock().unwrap();
        norms.push(GroupedAdamW::<B, Transformer<B>>::grad_norm(&model, &grads));
        if let Some((n, flag)) = &self.stop_after
            && norms.len() == *n
        {
            // A "signal" in the middle of step n: the step still completes.
            flag.store(true, Ordering::SeqCst);
        }
        OptimizerStep::step(&mut self.inner, lr, model, grads)
    }

    fn state_bytes(&self) -> u64 {
        OptimizerStep::state_bytes(&self.inner)
    }

    fn save(&self, dir: &Path) -> kiln_trainer::Result<()> {
        let steps = self.norms.lock().unwrap().len();
        std::fs::write(dir.join("recording.txt"), steps.to_string()).unwrap();
        OptimizerStep::save(&self.inner, dir)
    }

    fn load(
        &mut self,
        dir: &Path,
        device: &<B as burn::tensor::backend::BackendTypes>::Device,
    ) -> kiln_trainer::Result<()> {
        let text = std::fs::read_to_string(dir.join("recording.txt")).unwrap();
        self.loaded_from.lock().unwrap().push(text);
        OptimizerStep::load(&mut self.inner, dir, device)
    }
}

/// Shared handles to what a [`Recording`] optimizer saw.
#[derive(Clone, Default)]
struct Seen {
    norms: Arc<Mutex<Vec<f64>>>,
    loaded_from: Arc<Mutex<Vec<String>>>,
}

impl Seen {
    fn optimizer(
        &self,
        stop_after: Option<(usize, Arc<AtomicBool>)>,
    ) -> impl FnOnce(
        &Transformer<B>,
        &TrainConfig,
    ) -> kiln_trainer::Result<kiln_trainer::BoxedOptimizer<B>>
    + 'static {
        let seen = self.clone();
        move |model, config| {
            Ok(Box::new(Recording {
                inner: GroupedAdamW::for_config(model, config),
                norms: seen.norms,
                loaded_from: seen.loaded_from,
                stop_after,
            }))
        }
    }

    fn norms(&self) -> Vec<f64> {
        self.norms.lock().unwrap().clone()
    }
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs())
}

#[test]
fn the_gradient_sync_seam_is_used_once_per_step_on_the_accumulated_gradients() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.grad_clip = 0.0;
    let mut plain =
        Trainer::<B>::new(config.clone(), dir.path().join("plain"), Default::default()).unwrap();
    let log = Arc::new(Mutex::new(Log::default()));
    let seen = Seen::default();
    let mut custom = Trainer::<B>::builder(Default::default())
        .gradient_sync(Mirrored {
            grad_scale: 3.0,
            ..Mirrored::new(&log)
        })
        .optimizer(seen.optimizer(None))
        .start(config.clone(), dir.path().join("custom"))
        .unwrap();
    let (p, c) = (plain.step().unwrap(), custom.step().unwrap());
    assert!(p.applied && c.applied);
    // Rank 0 of 2 reads the single process's rows; two equal ranks average to the same loss.
    assert_eq!(c.loss, p.loss);
    // The optimizer got what `sync` returned (3x), and the reported norm is of those.
    assert!(close(c.grad_norm, 3.0 * p.grad_norm, 1e-5), "{c:?} {p:?}");
    assert_eq!(seen.norms(), vec![c.grad_norm]);
    // Once per step (grad_accum = 2), then one all-reduce: the loss alone (unsharded).
    {
        let log = log.lock().unwrap();
        assert_eq!(log.syncs, 1);
        assert_eq!(log.reduced, vec![vec![p.loss]]);
    }
    custom.step().unwrap();
    assert_eq!(log.lock().unwrap().syncs, 2);
    plain.step().unwrap();
    // Two ranks' tokens per step.
    assert_eq!(custom.state().tokens_seen, 2 * plain.state().tokens_seen);
    // Evaluation reduces its sums too (and the ratio of doubled sums is the same loss).
    let val = custom.evaluate().unwrap();
    {
        let log = log.lock().unwrap();
        assert_eq!(log.reduced.len(), 3);
        let sums = log.reduced.last().unwrap();
        assert_eq!(sums[0] / sums[1], val);
    }

    // Rank 1 reads other rows of the batch.
    let mut rank1 = Trainer::<B>::builder(Default::default())
        .gradient_sync(Mirrored {
            rank: 1,
            ..Mirrored::new(&Arc::new(Mutex::new(Log::default())))
        })
        .start(config, dir.path().join("rank1"))
        .unwrap();
    let mut plain = Trainer::<B>::new(
        rank1.config().clone(),
        dir.path().join("plain2"),
        Default::default(),
    )
    .unwrap();
    assert_ne!(rank1.step().unwrap().loss, plain.step().unwrap().loss);
    // Rank 1 writes no metrics: rank 0 logs for the run.
    assert!(!dir.path().join("rank1/metrics.jsonl").exists());
    assert!(!dir.path().join("rank1/config.toml").exists());
}

#[test]
fn clipping_uses_the_global_norm_of_sharded_gradients() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    let mut plain =
        Trainer::<B>::new(config.clone(), dir.path().join("plain"), Default::default()).unwrap();
    let local = plain.step().unwrap().grad_norm;
    // Between this rank's norm and the global one (the partner's shard is as large: √2 x).
    config.grad_clip = 1.2 * local;
    let log = Arc::new(Mutex::new(Log::default()));
    let seen = Seen::default();
    let mut sharded = Trainer::<B>::builder(Default::default())
        .gradient_sync(Mirrored {
            sharded: true,
            ..Mirrored::new(&log)
        })
        .optimizer(seen.optimizer(None))
        .start(config, dir.path().join("sharded"))
        .unwrap();
    let r = sharded.step().unwrap();
    assert!(close(r.grad_norm, 2f64.sqrt() * local, 1e-6), "{r:?}");
    // The squared norm went through the all-reduce with the loss.
    let reduced = log.lock().unwrap().reduced[0].clone();
    assert_eq!(reduced.len(), 2);
    assert!(close(reduced[1], local * local, 1e-6));
    // Clipped against the global norm: this shard scaled by clip / (√2 · local).
    let clip = 1.2 * local;
    let handed = seen.norms()[0];
    assert!(
        close(handed, local * clip / (2f64.sqrt() * local), 1e-5),
        "{handed} (local norm {local}, clip {clip})"
    );
    assert!(handed < local, "a local decision would not have clipped");
}

#[test]
fn a_non_finite_loss_on_another_rank_skips_the_step_here() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let log = Arc::new(Mutex::new(Log::default()));
    let seen = Seen::default();
    let run = dir.path().join("run");
    let mut trainer = Trainer::<B>::builder(Default::default())
        .gradient_sync(Mirrored {
            partner_nan_at: Some(3),
            ..Mirrored::new(&log)
        })
        .optimizer(seen.optimizer(None))
        .start(config, &run)
        .unwrap();
    assert!(trainer.step().unwrap().applied);
    assert!(trainer.step().unwrap().applied);
    let before = trainer.evaluate().unwrap();
    let bad = trainer.step().unwrap();
    // This rank's own loss was finite (it is in the log); the reduced one was not.
    assert!(log.lock().unwrap().reduced.iter().all(|v| v[0].is_finite()));
    assert!(!bad.applied && bad.loss.is_nan(), "{bad:?}");
    assert_eq!(seen.norms().len(), 2, "the optimizer was not called");
    assert_eq!(trainer.evaluate().unwrap(), before, "weights untouched");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert!(
        metrics.contains("non-finite loss: step skipped"),
        "{metrics}"
    );
    assert!(trainer.step().unwrap().applied);
    assert_eq!(seen.norms().len(), 3);
}

#[test]
fn the_stop_flag_ends_a_run_with_a_checkpoint_that_resumes_exactly() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let straight_run = dir.path().join("straight");
    let mut straight =
        Trainer::<B>::new(config.clone(), &straight_run, Default::default()).unwrap();
    let straight_val = straight.train().unwrap();

    let run = dir.path().join("run");
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Seen::default();
    let mut first = Trainer::<B>::builder(Default::default())
        .optimizer(seen.optimizer(Some((5, Arc::clone(&stop)))))
        .start(config.clone(), &run)
        .unwrap()
        .with_stop_flag(Arc::clone(&stop));
    let outcome = first.run().unwrap();
    let checkpoint = run.join("checkpoints/step-5");
    assert_eq!(
        outcome,
        TrainOutcome::Interrupted {
            step: 5,
            checkpoint: checkpoint.clone()
        },
        "the step in progress finished, then the run stopped"
    );
    assert_eq!(list_checkpoints(&run), vec![(5, checkpoint.clone())]);
    // The optimizer saved through its seam: its own file and the default format.
    assert_eq!(
        std::fs::read_to_string(checkpoint.join("recording.txt")).unwrap(),
        "5"
    );
    assert!(checkpoint.join("optimizer.mpk").exists());
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert!(
        metrics
            .lines()
            .last()
            .unwrap()
            .contains("\"interrupted\":true")
    );
    // `train` reports the same stop as an error.
    let err = first.train().unwrap_err();
    assert!(
        matches!(err, TrainError::Interrupted { step: 5, .. }),
        "{err}"
    );
    drop(first);

    // Resuming loads the optimizer through the seam and finishes like the uninterrupted run.
    let mut resumed = Trainer::<B>::builder(Default::default())
        .optimizer(seen.optimizer(None))
        .resume(&run, None)
        .unwrap();
    assert_eq!(*seen.loaded_from.lock().unwrap(), vec!["5".to_string()]);
    assert_eq!(resumed.state().step, 5);
    let val = resumed.train().unwrap();
    assert_eq!(val, straight_val, "bitwise the same run");
}

/// One rank's gradients in the model's parameter order, flattened (parameter ids differ between
/// the ranks' models, as between processes; the order does not).
type Flat = Vec<Option<Tensor<Inner, 1>>>;

/// A shared-memory "collective" for ranks on threads of one process.
struct Collective {
    barrier: Barrier,
    values: Mutex<Vec<Vec<f64>>>,
    grads: Mutex<Vec<Flat>>,
}

/// Data parallelism over threads: all-reduce of the gradients (mean) and of values (sum).
struct ThreadRank {
    rank: usize,
    world: usize,
    shared: Arc<Collective>,
}

/// Collects the gradients of a model's parameters in visiting order.
struct Flatten<'a> {
    grads: &'a GradientsParams,
    out: Flat,
}

impl ModuleVisitor<B> for Flatten<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let g = self.grads.get::<Inner, D>(param.id);
        self.out.push(g.map(|g| g.flatten::<1>(0, D - 1)));
    }
}

/// Registers gradients given in visiting order under the model's parameter ids.
struct Unflatten {
    grads: std::vec::IntoIter<Option<Tensor<Inner, 1>>>,
    out: GradientsParams,
}

impl ModuleVisitor<B> for Unflatten {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(Some(g)) = self.grads.next() {
            self.out
                .register(param.id, g.reshape::<D, _>(param.val().shape()));
        }
    }
}

impl GradientSync<B> for ThreadRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn sync(
        &mut self,
        model: &Transformer<B>,
        grads: GradientsParams,
    ) -> kiln_trainer::Result<GradientsParams> {
        let mut flat = Flatten {
            grads: &grads,
            out: Vec::new(),
        };
        model.visit(&mut flat);
        self.shared.grads.lock().unwrap()[self.rank] = flat.out;
        self.shared.barrier.wait();
        let all = self.shared.grads.lock().unwrap().clone();
        self.shared.barrier.wait();
        let mean: Flat = (0..all[0].len())
            .map(|i| {
                let parts: Vec<Tensor<Inner, 1>> =
                    all.iter().filter_map(|r| r[i].clone()).collect();
                let n = parts.len();
                parts
                    .into_iter()
                    .reduce(|a, b| a + b)
                    .map(|sum| sum.div_scalar(n as f64))
            })
            .collect();
        let mut back = Unflatten {
            grads: mean.into_iter(),
            out: GradientsParams::new(),
        };
        model.visit(&mut back);
        Ok(back.out)
    }

    fn all_reduce_sum(&mut self, values: &mut [f64]) -> kiln_trainer::Result<()> {
        self.shared.values.lock().unwrap()[self.rank] = values.to_vec();
        self.shared.barrier.wait();
        let all = self.shared.values.lock().unwrap().clone();
        for (i, v) in values.iter_mut().enumerate() {
            *v = all.iter().map(|r| r[i]).sum();
        }
        self.shared.barrier.wait();
        Ok(())
    }
}

#[test]
fn two_data_parallel_ranks_train_like_one_process_with_their_combined_batch() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.max_steps = 6;
    config.checkpoint_interval = 0;
    // One process at micro-batch 4 ...
    let mut single = Trainer::<B>::new(
        config.clone(),
        dir.path().join("single"),
        Default::default(),
    )
    .unwrap();
    let single_losses: Vec<f64> = (0..6).map(|_| single.step().unwrap().loss).collect();
    let single_val = single.evaluate().unwrap();
    let single_full = single.evaluate_full().unwrap();
    // ... and two ranks at 2 each, built here (the same seed gives the same initial weights).
    config.micro_batch = 2;
    let world = 2;
    let shared = Arc::new(Collective {
        barrier: Barrier::new(world),
        values: Mutex::new(vec![Vec::new(); world]),
        grads: Mutex::new(vec![Vec::new(); world]),
    });
    let run = dir.path().join("ddp");
    let ranks: Vec<Trainer<B>> = (0..world)
        .map(|rank| {
            Trainer::<B>::builder(Default::default())
                .gradient_sync(ThreadRank {
                    rank,
                    world,
                    shared: Arc::clone(&shared),
                })
                .start(config.clone(), &run)
                .unwrap()
        })
        .collect();
    let steps = Arc::new(AtomicUsize::new(0));
    let results: Vec<(Vec<f64>, f64, std::path::PathBuf)> = std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|mut t| {
                let steps = Arc::clone(&steps);
                s.spawn(move || {
                    let losses: Vec<f64> = (0..6)
                        .map(|_| {
                            steps.fetch_add(1, Ordering::SeqCst);
                            t.step().unwrap().loss
                        })
                        .collect();
                    let val = t.evaluate().unwrap();
                    let ck = t.save_checkpoint().unwrap();
                    (losses, val, ck)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(steps.load(Ordering::SeqCst), 12);
    for (losses, val, ck) in &results {
        // Every rank reports the global mean loss, and it is the single process's (to rounding).
        for (a, b) in losses.iter().zip(&single_losses) {
            assert!(close(*a, *b, 1e-4), "{losses:?} vs {single_losses:?}");
        }
        assert!(close(*val, single_val, 1e-4), "{val} vs {single_val}");
        assert_eq!(ck, &run.join("checkpoints/step-6"));
    }
    assert_eq!(results[0].0, results[1].0, "ranks agree bitwise");
    // Rank 0 wrote the checkpoint; it resumes as one process.
    let mut resumed = Trainer::<B>::resume(&run, None, Default::default()).unwrap();
    assert_eq!(resumed.state().step, 6);
    assert_eq!(
        resumed.state().tokens_seen,
        single.state().tokens_seen,
        "tokens of both ranks"
    );
    assert!(close(resumed.evaluate_full().unwrap(), single_full, 1e-4));
}
