//! Tensor and pipeline parallelism, alone and composed with data parallelism, on ranks that are
//! threads talking through the data service on loopback: the logits, the loss and every
//! gradient equal the single-device model's within 1e-5 (relative to each tensor's largest
//! entry), for a GPT-2-style model (tied embeddings, biases, LayerNorm, GELU) and a Llama-style
//! one (RoPE, RMSNorm, SwiGLU, grouped-query attention, untied head); 20 AdamW steps give the
//! single-device losses; the consolidated model is the single-device model; and 1F1B holds
//! fewer micro-batches of activations than GPipe, measured.

use std::collections::HashMap;
use std::sync::Arc;

use burn::backend::{Autodiff, Flex};
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param, ParamId};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::GradientsParams;
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use kiln_distributed::{
    AdamWSettings, ParallelOptions, ParallelRank, PeerNet, PipelineSchedule, shard_model,
    thread_ranks, thread_ranks_over_loopback,
};
use kiln_trainer::optimizer::{GroupedAdamW, clip_to, embedding_param_ids, grad_square_sum};
use kiln_transformer::{ModelConfig, TensorParallel, Transformer};

type Ad = Autodiff<Flex>;
type Inner = Flex;

const ROWS: usize = 8;
const SEQ: usize = 12;

use super::SERIAL;

fn gpt() -> ModelConfig {
    super::tiny_gpt(4, 4, 32, 64)
}

fn llama() -> ModelConfig {
    super::tiny_llama(gpt())
}

/// Step `step`'s batch: `ROWS` rows of `SEQ + 1` tokens.
pub(super) fn batch(step: usize, vocab: usize) -> Vec<Vec<i64>> {
    (0..ROWS)
        .map(|r| {
            (0..=SEQ)
                .map(|i| ((i * 13 + r * 7 + step * 5 + (i * i + r) % 5) % vocab) as i64)
                .collect()
        })
        .collect()
}

fn tensors(batch: &[Vec<i64>]) -> (Tensor<Ad, 2, Int>, Tensor<Ad, 1, Int>) {
    let inputs: Vec<i64> = batch.iter().flat_map(|r| r[..SEQ].to_vec()).collect();
    let targets: Vec<i64> = batch.iter().flat_map(|r| r[1..].to_vec()).collect();
    let device = Default::default();
    (
        Tensor::from_data(TensorData::new(inputs, [batch.len(), SEQ]), &device),
        Tensor::from_data(TensorData::new(targets, [batch.len() * SEQ]), &device),
    )
}

fn settings() -> AdamWSettings {
    AdamWSettings {
        grad_clip: 1.0,
        ..Default::default()
    }
}

/// The single-device run: loss, logits and gradients of `batch`.
fn reference(
    model: &Transformer<Ad>,
    batch: &[Vec<i64>],
) -> (f64, Tensor<Inner, 3>, GradientsParams) {
    let (inputs, targets) = tensors(batch);
    let logits = model.forward(inputs).unwrap();
    let [b, t, v] = logits.dims();
    let loss = CrossEntropyLossConfig::new()
        .init(&Default::default())
        .forward(logits.clone().reshape([b * t, v]), targets);
    let value = loss.clone().into_scalar().elem::<f64>();
    let grads = GradientsParams::from_grads(loss.backward(), model);
    (value, logits.inner(), grads)
}

/// Every parameter's gradient as a model: the whole model with each value replaced by its
/// gradient, so that it can be sharded and split exactly as the ranks' models are.
fn gradient_model(model: &Transformer<Ad>, grads: &GradientsParams) -> Transformer<Inner> {
    struct M<'a>(&'a GradientsParams);
    impl burn::module::ModuleMapper<Inner> for M<'_> {
        fn map_float<const D: usize>(
            &mut self,
            param: Param<Tensor<Inner, D>>,
        ) -> Param<Tensor<Inner, D>> {
            let (id, value, mapper) = param.consume();
            let g = self.0.get::<Inner, D>(id).unwrap_or(value.zeros_like());
            Param::from_mapped_value(id, g, mapper)
        }
    }
    model.valid().map(&mut M(grads))
}

fn values<B: Backend, M: Module<B>>(module: &M) -> HashMap<ParamId, Vec<f32>> {
    struct V(HashMap<ParamId, Vec<f32>>);
    impl<B: Backend> ModuleVisitor<B> for V {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let v = param.val().into_data().convert::<f32>().into_vec().unwrap();
            self.0.insert(param.id, v);
        }
    }
    let mut v = V(HashMap::new());
    module.visit(&mut v);
    v.0
}

fn grad_values(
    stage: &kiln_transformer::Stage<Ad>,
    grads: &GradientsParams,
) -> HashMap<ParamId, Vec<f32>> {
    struct V<'a>(&'a GradientsParams, HashMap<ParamId, Vec<f32>>);
    impl ModuleVisitor<Ad> for V<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<Ad, D>>) {
            if let Some(g) = self.0.get::<Inner, D>(param.id) {
                self.1
                    .insert(param.id, g.into_data().convert::<f32>().into_vec().unwrap());
            }
        }
    }
    let mut v = V(grads, HashMap::new());
    stage.visit(&mut v);
    v.1
}

/// `|a − b| ≤ tol · max|b|` element-wise.
fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * scale,
            "{what}[{i}]: {x} vs {y} (scale {scale})"
        );
    }
}

/// `model` with every parameter initialized, so that its clones share the values (Burn's lazy
/// initializers run once per clone otherwise).
pub(super) fn settled(model: Transformer<Ad>) -> Transformer<Ad> {
    struct Read;
    impl burn::module::ModuleMapper<Ad> for Read {}
    model.map(&mut Read)
}

/// Identity operators, to shard reference tensors the way the ranks shard the model.
#[derive(Debug)]
struct NoOps;
impl TensorParallel<Inner> for NoOps {
    fn enter(&self, x: Tensor<Inner, 3>) -> Tensor<Inner, 3> {
        x
    }
    fn exit(&self, x: Tensor<Inner, 3>) -> Tensor<Inner, 3> {
        x
    }
}

/// Runs `f` on `world` thread ranks, each with its own data service.
fn on_ranks<T: Send>(world: usize, f: impl Fn(Arc<PeerNet<Inner>>) -> T + Sync) -> Vec<T> {
    thread_ranks::<Inner, T>(world, Default::default(), f).unwrap()
}

fn options(tensor: usize, pipeline: usize, micro_batches: usize) -> ParallelOptions {
    ParallelOptions {
        tensor,
        pipeline,
        micro_batches,
        schedule: PipelineSchedule::OneFOneB,
        stage_layers: None,
    }
}

/// One step's logits, loss and gradients on `world` ranks split `tensor × pipeline` (the rest
/// data parallel) equal the single device's.
fn check_one_step(config: ModelConfig, world: usize, tensor: usize, pipeline: usize) {
    check_one_step_with(config, world, tensor, pipeline, PipelineSchedule::OneFOneB);
}

fn check_one_step_with(
    config: ModelConfig,
    world: usize,
    tensor: usize,
    pipeline: usize,
    schedule: PipelineSchedule,
) {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    Ad::seed(&Default::default(), 7);
    let model = settled(Transformer::<Ad>::new(config.clone(), &Default::default()).unwrap());
    let step_batch = batch(0, config.vocab_size);
    let (loss, logits, grads) = reference(&model, &step_batch);
    let logits = logits
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .unwrap();
    let whole_grads = gradient_model(&model, &grads);
    let micro = 2 * pipeline;
    let what = format!(
        "{} T={tensor} P={pipeline} world={world}",
        config.architecture
    );
    on_ranks(world, |net| {
        let rank = net.rank();
        let r = ParallelRank::<Ad>::new(
            model.clone(),
            net,
            ParallelOptions {
                schedule,
                ..options(tensor, pipeline, micro)
            },
            settings(),
            Default::default(),
        )
        .unwrap();
        // Logits of the whole batch through the pipeline.
        let (inputs, _) = tensors(&step_batch);
        if let Some(out) = r.forward_logits(inputs).unwrap() {
            let out = out.into_data().convert::<f32>().into_vec::<f32>().unwrap();
            assert_close(&out, &logits, 1e-5, &format!("{what} rank {rank} logits"));
        }
        let (g, local_loss, _, _) = r.forward_backward(&step_batch).unwrap();
        let (g, global_loss, _) = r.synchronize(g, local_loss).unwrap();
        assert!(
            (global_loss - loss).abs() <= 1e-5 * loss,
            "{what} rank {rank}: loss {global_loss} vs {loss}"
        );
        // The expected gradients: the whole model's, sharded and split as this rank's model.
        let coords = r.coords();
        let expected = if tensor > 1 {
            shard_model(whole_grads.clone(), coords.tensor, tensor, Arc::new(NoOps)).unwrap()
        } else {
            whole_grads.clone()
        };
        let expected = expected
            .into_stages(r.stage_layers())
            .unwrap()
            .into_iter()
            .nth(coords.stage)
            .unwrap();
        let expected = values(&expected);
        let got = grad_values(r.stage().unwrap(), &g);
        assert_eq!(
            got.len(),
            expected.len(),
            "{what} rank {rank}: gradient count"
        );
        for (id, e) in &expected {
            assert_close(
                &got[id],
                e,
                1e-5,
                &format!("{what} rank {rank} gradient {id} len {}", e.len()),
            );
        }
    });
}

#[test]
fn tensor_parallel_matches_one_device() {
    check_one_step(gpt(), 2, 2, 1);
    check_one_step(llama(), 2, 2, 1);
}

#[test]
fn pipeline_parallel_matches_one_device() {
    check_one_step(gpt(), 2, 1, 2);
    check_one_step(llama(), 2, 1, 2);
}

#[test]
fn gpipe_with_tensor_parallel_matches_one_device() {
    // Several micro-batches' graphs alive at once on tensor-parallel ranks that are threads.
    check_one_step_with(gpt(), 4, 2, 2, PipelineSchedule::GPipe);
}

#[test]
fn compositions_match_one_device() {
    // DP 2 × TP 2, DP 2 × PP 2, TP 2 × PP 2.
    for config in [gpt(), llama()] {
        check_one_step(config.clone(), 4, 2, 1);
        check_one_step(config.clone(), 4, 1, 2);
        check_one_step(config, 4, 2, 2);
    }
}

/// 20 AdamW steps: the per-step losses and the consolidated model equal the single device's.
fn check_training(config: ModelConfig, world: usize, tensor: usize, pipeline: usize) {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    const STEPS: usize = 20;
    const LR: f64 = 3e-3;
    Ad::seed(&Default::default(), 11);
    let model = settled(Transformer::<Ad>::new(config.clone(), &Default::default()).unwrap());
    // The single device: the same AdamW, clipping and decay groups.
    let s = settings();
    let no_decay: Vec<ParamId> = {
        let mut ids = embedding_param_ids(&model);
        struct V(Vec<ParamId>);
        impl ModuleVisitor<Ad> for V {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<Ad, D>>) {
                if D == 1 {
                    self.0.push(param.id);
                }
            }
        }
        let mut v = V(Vec::new());
        model.visit(&mut v);
        ids.extend(v.0);
        ids
    };
    let mut adamw =
        GroupedAdamW::new(&model, s.beta1, s.beta2, s.eps, s.weight_decay).without_decay(no_decay);
    let mut single = model.clone();
    let mut expected_losses = Vec::new();
    for step in 0..STEPS {
        let (loss, _, mut grads) = reference(&single, &batch(step, config.vocab_size));
        let norm = grad_square_sum(&single, &grads).sqrt();
        clip_to(&single, &mut grads, norm, s.grad_clip);
        single = adamw.step(LR, single, grads);
        expected_losses.push(loss);
    }
    let expected_model = values(&single.valid());
    let what = format!(
        "{} T={tensor} P={pipeline} world={world}",
        config.architecture
    );
    let results = on_ranks(world, |net| {
        let mut r = ParallelRank::<Ad>::new(
            model.clone(),
            net,
            options(tensor, pipeline, 2 * pipeline),
            s,
            Default::default(),
        )
        .unwrap();
        let losses: Vec<f64> = (0..STEPS)
            .map(|step| r.step(&batch(step, config.vocab_size), LR).unwrap().loss)
            .collect();
        let own = values(&r.stage().unwrap().valid());
        let place = (r.coords(), r.stage_layers().to_vec());
        (losses, own, place, r.consolidate().unwrap())
    });
    for (rank, (losses, ..)) in results.iter().enumerate() {
        for (step, (got, want)) in losses.iter().zip(&expected_losses).enumerate() {
            assert!(
                (got - want).abs() <= 1e-4 * want,
                "{what} rank {rank} step {step}: loss {got} vs {want}"
            );
        }
    }
    let consolidated = results[0].3.clone().expect("rank 0 assembles the model");
    // Consolidation is exact: every rank's own parameters are the consolidated model's pieces.
    for (rank, (_, own, (coords, layers), assembled)) in results.iter().enumerate() {
        assert_eq!(
            assembled.is_some(),
            rank == 0,
            "{what}: only rank 0 assembles the model"
        );
        let piece = if tensor > 1 {
            shard_model(consolidated.clone(), coords.tensor, tensor, Arc::new(NoOps)).unwrap()
        } else {
            consolidated.clone()
        };
        let piece = values(
            &piece
                .into_stages(layers)
                .unwrap()
                .into_iter()
                .nth(coords.stage)
                .unwrap(),
        );
        assert_eq!(
            piece.len(),
            own.len(),
            "{what} rank {rank}: parameter count"
        );
        for (id, v) in own {
            assert_eq!(
                &piece[id], v,
                "{what} rank {rank}: parameter {id} consolidated"
            );
        }
    }
    // And it is the single-device model, up to the rounding that AdamW's normalization lifts
    // for parameters whose gradients are near zero.
    let got = values(&consolidated);
    assert_eq!(got.len(), expected_model.len());
    for (id, want) in &expected_model {
        assert_close(&got[id], want, 1e-3, &format!("{what} consolidated {id}"));
    }
}

#[test]
fn training_matches_one_device_and_consolidates() {
    check_training(gpt(), 2, 2, 1);
    check_training(llama(), 2, 1, 2);
    check_training(gpt(), 4, 2, 2);
    check_training(llama(), 4, 2, 2);
}

#[test]
fn one_f_one_b_holds_fewer_micro_batches_than_gpipe() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    Ad::seed(&Default::default(), 3);
    let config = gpt();
    let model = settled(Transformer::<Ad>::new(config.clone(), &Default::default()).unwrap());
    let step_batch = batch(0, config.vocab_size);
    let mut peaks = HashMap::new();
    for schedule in [PipelineSchedule::GPipe, PipelineSchedule::OneFOneB] {
        let per_stage = on_ranks(2, |net| {
            let r = ParallelRank::<Ad>::new(
                model.clone(),
                net,
                ParallelOptions {
                    schedule,
                    ..options(1, 2, 8)
                },
                settings(),
                Default::default(),
            )
            .unwrap();
            let (_, _, peak, timeline) = r.forward_backward(&step_batch).unwrap();
            assert_eq!(timeline.len(), 16);
            peak
        });
        peaks.insert(schedule, per_stage);
    }
    // GPipe keeps all M = 8; 1F1B at most P − s = 2, 1.
    assert_eq!(peaks[&PipelineSchedule::GPipe], vec![8, 8]);
    assert_eq!(peaks[&PipelineSchedule::OneFOneB], vec![2, 1]);
}

#[test]
fn mismatched_configs_are_refused_on_every_rank() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let errors = on_ranks(2, |net| {
        let config = if net.rank() == 0 { gpt() } else { llama() };
        let model = Transformer::<Ad>::new(config, &Default::default()).unwrap();
        ParallelRank::<Ad>::new(model, net, options(2, 1, 1), settings(), Default::default())
            .err()
            .map(|e| e.to_string())
    });
    for e in errors {
        let e = e.expect("a mismatched config must be an error");
        assert!(e.contains("different model config"), "{e}");
    }
}

/// A TP 2 × PP 2 run saved after 6 steps and resumed into new ranks continues with the losses of
/// the run that never stopped; the saved model directory starts another layout (PP 2 alone), and
/// the optimizer state of the first layout is refused there.
#[test]
fn checkpoints_resume_exactly_and_reshard_the_model() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    const LR: f64 = 3e-3;
    let config = llama();
    Ad::seed(&Default::default(), 5);
    let model = settled(Transformer::<Ad>::new(config.clone(), &Default::default()).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let load = || {
        kiln_transformer::load_model_dir::<Ad>(dir.path().join("model"), &Default::default())
            .unwrap()
    };
    let run = |from: usize, to: usize, resume: bool, save: bool| {
        on_ranks(4, |net| {
            let start = if resume { load() } else { model.clone() };
            let mut r = ParallelRank::<Ad>::new(
                start,
                net,
                options(2, 2, 4),
                settings(),
                Default::default(),
            )
            .unwrap();
            if resume {
                r.load_optimizer(dir.path()).unwrap();
            }
            let losses: Vec<f64> = (from..to)
                .map(|step| r.step(&batch(step, config.vocab_size), LR).unwrap().loss)
                .collect();
            if save {
                r.save_checkpoint(dir.path()).unwrap();
            }
            losses
        })
    };
    let straight = run(0, 10, false, false);
    let first = run(0, 6, false, true);
    let resumed = run(6, 10, true, false);
    for rank in 0..4 {
        let joined: Vec<f64> = first[rank].iter().chain(&resumed[rank]).copied().collect();
        assert_eq!(joined, straight[rank], "rank {rank}: resumed losses");
    }
    let errors = on_ranks(2, |net| {
        let mut r = ParallelRank::<Ad>::new(
            load(),
            net,
            options(1, 2, 2),
            settings(),
            Default::default(),
        )
        .unwrap();
        r.load_optimizer(dir.path()).unwrap_err().to_string()
    });
    for e in errors {
        assert!(e.contains("tensor = 2") && e.contains("tensor = 1"), "{e}");
    }
}

/// Ranks that talk through their data services over loopback (as processes do) train exactly as
/// ranks that pass tensors through in-process mailboxes: the transport changes no bit.
#[test]
fn the_loopback_transport_trains_bit_for_bit_like_mailboxes() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    Ad::seed(&Default::default(), 11);
    let config = llama();
    let model = settled(Transformer::<Ad>::new(config.clone(), &Default::default()).unwrap());
    let train = |net: Arc<PeerNet<Inner>>| {
        let mut r = ParallelRank::<Ad>::new(
            model.clone(),
            net,
            options(2, 2, 4),
            settings(),
            Default::default(),
        )
        .unwrap();
        (0..3)
            .map(|step| {
                let report = r.step(&batch(step, config.vocab_size), 1e-3).unwrap();
                (report.loss, report.grad_norm)
            })
            .collect::<Vec<_>>()
    };
    let mailboxes = thread_ranks::<Inner, _>(4, Default::default(), train).unwrap();
    let loopback = thread_ranks_over_loopback::<Inner, _>(4, Default::default(), train).unwrap();
    assert_eq!(mailboxes, loopback);
    assert!(mailboxes[0].iter().all(|(l, n)| l.is_finite() && *n > 0.0));
}
