//! ZeRO-3's parameter gathering inside the autodiff graph, on two ranks that are threads: the loss
//! and the gradient rows each rank gets equal those of the whole model (gradients summed over the
//! ranks' batches), and the collectives run block by block: every block matrix is gathered again in
//! the backward pass (the whole weight was not kept) and the last block's gradients are
//! reduce-scattered before the first block's weights are gathered again.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::GradientsParams;
use burn::tensor::{DType, Int, Tensor, TensorData};
use kiln_distributed::partition::{Partition, param_layouts};
use kiln_distributed::{
    Communicator, GatherBackend, GatherEvent, GraphGather, ParamGather, Transport, flat,
};
use kiln_transformer::{ModelConfig, Transformer};

const WORLD: usize = 2;
const ROWS: usize = 2;
const SEQ: usize = 12;

use super::SERIAL;

fn gpt() -> ModelConfig {
    super::tiny_gpt(3, 2, 16, 48)
}

fn llama() -> ModelConfig {
    super::tiny_llama(gpt())
}

/// Rank `rank`'s inputs and targets.
fn batch<B: burn::tensor::backend::Backend>(
    rank: usize,
    vocab: usize,
    device: &B::Device,
) -> (Tensor<B, 2, Int>, Tensor<B, 1, Int>) {
    let ids: Vec<i64> = (0..ROWS * (SEQ + 1))
        .map(|i| ((i * 13 + rank * 7 + i * i % 5) % vocab) as i64)
        .collect();
    let all = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [ROWS, SEQ + 1]), device);
    let inputs = all.clone().slice([0..ROWS, 0..SEQ]);
    let targets = all.slice([0..ROWS, 1..SEQ + 1]).reshape([ROWS * SEQ]);
    (inputs, targets)
}

fn loss<B: burn::tensor::backend::Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 1, Int>,
) -> Tensor<B, 1> {
    let [b, t, v] = logits.dims();
    CrossEntropyLossConfig::new()
        .init(&logits.device())
        .forward(logits.reshape([b * t, v]), targets)
}

fn values(t: Tensor<Flex, 1>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

/// `model` holding only `rank`'s rows of every parameter.
fn shard<B: GatherBackend<InnerBackend = Flex>>(
    model: Transformer<B>,
    partition: &Partition,
    rank: usize,
) -> Transformer<B> {
    let mut shapes = Vec::new();
    let rows = flat::param_values::<B, _>(&model)
        .into_iter()
        .zip(partition.params())
        .enumerate()
        .map(|(i, (v, layout))| {
            let rows = partition.rows(i, rank);
            shapes.push(layout.shard_shape(&rows));
            let len = layout.row_len();
            v.map(|v| v.slice(rows.start * len..rows.end * len))
        })
        .collect();
    flat::with_param_values(model, rows, &shapes)
}

fn check<B: GatherBackend<InnerBackend = Flex>>(config: ModelConfig) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let device = Default::default();
    let model: Transformer<B> = config.init(&device).unwrap();
    let vocab = config.vocab_size;
    let partition = Partition::of(&model, WORLD).unwrap();

    // The reference: the whole model on each rank's batch, gradients summed.
    let mut ref_losses = Vec::new();
    let mut ref_grads: Vec<Vec<f32>> = Vec::new();
    for rank in 0..WORLD {
        let (inputs, targets) = batch::<B>(rank, vocab, &device);
        let l = loss(model.forward(inputs).unwrap(), targets);
        ref_losses.push(values(l.clone().inner())[0]);
        let mut grads = GradientsParams::from_grads(l.backward(), &model);
        for (i, g) in flat::take_grads(&model, &mut grads).into_iter().enumerate() {
            let g = values(g.expect("every parameter has a gradient"));
            match ref_grads.get_mut(i) {
                Some(sum) => sum.iter_mut().zip(g).for_each(|(s, x)| *s += x),
                None => ref_grads.push(g),
            }
        }
    }

    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..WORLD)
            .map(|rank| {
                let (model, partition) = (model.clone(), partition.clone());
                let device = device.clone();
                s.spawn(move || {
                    let comm = Arc::new(
                        Communicator::<Flex>::join(
                            rank,
                            WORLD,
                            Default::default(),
                            &Transport::Threads,
                        )
                        .unwrap(),
                    );
                    let gather = Arc::new(ParamGather::new(comm, partition.clone(), DType::F32));
                    gather.record_events(true);
                    let model = shard(model, &partition, rank);
                    let source = GraphGather::<B>::new(Arc::clone(&gather));
                    let (inputs, targets) = batch::<B>(rank, vocab, &device);
                    let l = loss(model.forward_with(inputs, &source).unwrap(), targets);
                    let gathered = gather.events().len();
                    let value = values(l.clone().inner())[0];
                    let mut grads = GradientsParams::from_grads(l.backward(), &model);
                    assert!(gather.take_deferred_error().is_none());
                    let rows: Vec<_> = flat::take_grads(&model, &mut grads)
                        .into_iter()
                        .map(|g| g.map(values))
                        .collect();
                    (value, rows, gathered, gather.events())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    let paths: Vec<&str> = partition.params().iter().map(|p| p.path.as_str()).collect();
    let block_of = |i: usize| -> Option<usize> {
        paths[i]
            .strip_prefix("blocks.")?
            .split('.')
            .next()?
            .parse()
            .ok()
    };
    for (rank, (value, rows, gathered, events)) in results.into_iter().enumerate() {
        assert!(
            (value - ref_losses[rank]).abs() <= 1e-5 * ref_losses[rank].abs(),
            "rank {rank}: loss {value} against {}",
            ref_losses[rank]
        );
        for (i, (layout, grad)) in partition.params().iter().zip(rows).enumerate() {
            let own = partition.rows(i, rank);
            let len = layout.row_len();
            let expected = &ref_grads[i][own.start * len..own.end * len];
            let got = grad.unwrap_or_default();
            assert_eq!(got.len(), expected.len(), "{}: shard length", paths[i]);
            let scale = ref_grads[i].iter().fold(1e-6f32, |m, x| m.max(x.abs()));
            for (g, e) in got.iter().zip(expected) {
                assert!(
                    (g - e).abs() <= 1e-5 * scale,
                    "rank {rank} {}: gradient {g} against {e}",
                    paths[i]
                );
            }
        }

        // The forward pass gathered every parameter, in the model's order, nothing else.
        let (forward, backward) = events.split_at(gathered);
        let firsts: Vec<usize> = forward
            .iter()
            .map(|e| match e {
                GatherEvent::Gather(i) => *i,
                other => panic!("forward pass ran {other:?}"),
            })
            .collect();
        for (i, path) in paths.iter().enumerate() {
            assert!(firsts.contains(&i), "{path} never gathered");
        }
        // Backward: one reduce-scatter per forward gather; every block matrix gathered again once.
        let scatters = backward
            .iter()
            .filter(|e| matches!(e, GatherEvent::ReduceScatter(_)))
            .count();
        assert_eq!(scatters, forward.len());
        let layouts = param_layouts::<B, _>(&model);
        for (i, layout) in layouts.iter().enumerate() {
            if block_of(i).is_some() && layout.shape.len() == 2 {
                let again = backward
                    .iter()
                    .filter(|e| **e == GatherEvent::Regather(i))
                    .count();
                assert_eq!(again, 1, "{} regathered {again} times", paths[i]);
            }
        }
        // Block by block: the last block's gradients leave before the first block is gathered
        // again.
        let last = config.n_layers - 1;
        let position = |pred: &dyn Fn(&GatherEvent) -> bool| backward.iter().position(pred);
        let last_scattered = backward
            .iter()
            .rposition(|e| matches!(e, GatherEvent::ReduceScatter(i) if block_of(*i) == Some(last)))
            .unwrap();
        let first_regathered =
            position(&|e| matches!(e, GatherEvent::Regather(i) if block_of(*i) == Some(0)))
                .unwrap();
        assert!(
            last_scattered < first_regathered,
            "block {last}'s gradients were scattered at {last_scattered}, block 0 gathered again at {first_regathered}: {backward:?}"
        );
    }
    drop(model.valid());
}

#[test]
fn gpt_gradients_match_the_whole_model_block_by_block() {
    check::<Autodiff<Flex>>(gpt());
}

#[test]
fn llama_gradients_match_the_whole_model_under_activation_checkpointing() {
    check::<Autodiff<Flex, BalancedCheckpointing>>(llama());
}
