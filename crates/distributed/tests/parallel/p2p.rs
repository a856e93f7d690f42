//! Posted receives ([`PeerNet::post_recv`]) over the data service on loopback and through
//! in-process mailboxes: a receive posted ahead gets the same tensor, in the same order, as one
//! made when it is needed; a peer's message that arrives first is not held up by an earlier-posted
//! receive from another peer; a peer that closes without sending fails the receive instead of
//! hanging it; a rank that drops with receives still posted shuts down; and a pipeline that posts
//! its receives trains exactly as one that does not.

use std::sync::mpsc;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use kiln_distributed::{
    AdamWSettings, ParallelOptions, ParallelRank, PeerNet, PipelineSchedule, Result, thread_ranks,
    thread_ranks_over_loopback,
};
use kiln_transformer::Transformer;

use super::SERIAL;

type Ad = Autodiff<Flex>;

/// How long one of these tests may take before it counts as hung.
const DEADLINE: Duration = Duration::from_secs(90);

/// `f()` on a thread of its own; a panic (a failed test) if it does not finish by [`DEADLINE`].
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(DEADLINE)
        .unwrap_or_else(|e| panic!("{what}: no result within {DEADLINE:?} ({e})"))
}

fn scalar(net: &PeerNet<Flex>, value: f32) -> Tensor<Flex, 1> {
    Tensor::from_data(TensorData::new(vec![value], [1]), net.device())
}

fn value(tensor: Tensor<Flex, 1>) -> f32 {
    tensor.into_data().to_vec::<f32>().unwrap()[0]
}

/// The transports under test: the data service over loopback, and mailboxes.
fn both<T: Send>(
    world: usize,
    f: impl Fn(Arc<PeerNet<Flex>>) -> T + Sync,
) -> Result<(Vec<T>, Vec<T>)> {
    let loopback = thread_ranks_over_loopback::<Flex, T>(world, Default::default(), &f)?;
    let mailboxes = thread_ranks::<Flex, T>(world, Default::default(), &f)?;
    Ok((loopback, mailboxes))
}

/// Rank 0 posts two receives from rank 1 and one from rank 2; rank 2 sends at once, rank 1 only
/// after rank 0 has rank 2's tensor (so rank 2's arrives first); rank 0 then takes rank 1's three
/// tensors (two posted, one not) in order.
#[test]
fn posted_receives_keep_each_pairs_order_whatever_arrives_first() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (loopback, mailboxes) = within("posted receives", || {
        both(3, |net| -> Result<Vec<f32>> {
            match net.rank() {
                0 => {
                    net.post_recv(1)?;
                    net.post_recv(1)?;
                    net.post_recv(2)?;
                    let mut got = vec![value(net.recv(2)?)];
                    net.send(1, scalar(&net, -1.0))?;
                    for _ in 0..3 {
                        got.push(value(net.recv(1)?));
                    }
                    got.push(net.posted_receives() as f32);
                    Ok(got)
                }
                1 => {
                    let go = value(net.recv(0)?);
                    for v in [10.0, 11.0, 12.0] {
                        net.send(0, scalar(&net, v))?;
                    }
                    Ok(vec![go])
                }
                _ => {
                    net.send(0, scalar(&net, 20.0))?;
                    Ok(vec![])
                }
            }
        })
        .map(|(a, b)| {
            let collect = |v: Vec<Result<Vec<f32>>>| v.into_iter().collect::<Result<Vec<_>>>();
            (collect(a), collect(b))
        })
    })
    .unwrap();
    let expected = vec![vec![20.0, 10.0, 11.0, 12.0, 0.0], vec![-1.0], vec![]];
    assert_eq!(loopback.unwrap(), expected, "over loopback");
    assert_eq!(mailboxes.unwrap(), expected, "through mailboxes");
}

/// A rank that closes without sending what a peer posted a receive for makes that receive an
/// error (over loopback: the connection ends; mailboxes: the rank is marked closed), not a hang.
#[test]
fn a_peer_that_closes_early_fails_the_posted_receive() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (loopback, mailboxes) = within("closing early", || {
        both(2, |net| -> Result<Option<String>> {
            if net.rank() == 0 {
                // Wait until rank 1 has posted, then close without sending.
                net.recv::<1>(1)?;
                return Ok(None);
            }
            net.post_recv(0)?;
            net.send(0, scalar(&net, 1.0))?;
            Ok(net.recv::<1>(0).err().map(|e| e.to_string()))
        })
    })
    .unwrap();
    for (transport, results) in [("loopback", loopback), ("mailboxes", mailboxes)] {
        let error = results[1].as_ref().unwrap().as_ref();
        let error = error.unwrap_or_else(|| panic!("{transport}: the receive succeeded"));
        assert!(error.contains("rank 0"), "{transport}: {error}");
    }
}

/// A rank dropped with receives posted (their downloads waiting on a live peer that never sends)
/// shuts down promptly.
#[test]
fn a_rank_dropped_with_receives_posted_shuts_down() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (loopback, mailboxes) = within("shutting down", || {
        let dropped = Arc::new(Barrier::new(2));
        both(2, move |net| -> Result<usize> {
            if net.rank() == 0 {
                net.recv::<1>(1)?;
                // Serve rank 1's waiting downloads until it has dropped its endpoint.
                dropped.wait();
                return Ok(0);
            }
            net.post_recv(0)?;
            net.post_recv(0)?;
            net.send(0, scalar(&net, 1.0))?;
            let posted = net.posted_receives();
            drop(net);
            dropped.wait();
            Ok(posted)
        })
    })
    .unwrap();
    let posted = |v: Vec<Result<usize>>| v.into_iter().map(|r| r.unwrap()).collect::<Vec<_>>();
    assert_eq!(posted(loopback), vec![0, 2]);
    // Mailboxes have nothing to download ahead.
    assert_eq!(posted(mailboxes), vec![0, 0]);
}

/// Posting to oneself or to a rank that does not exist is a setup error.
#[test]
fn posting_to_a_rank_that_is_no_peer_is_an_error() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let errors = thread_ranks_over_loopback::<Flex, _>(2, Default::default(), |net| {
        (
            net.post_recv(net.rank()).is_err(),
            net.post_recv(7).is_err(),
        )
    })
    .unwrap();
    assert_eq!(errors, vec![(true, true); 2]);
}

/// GPipe and 1F1B at P = 2, M = 4 over loopback (every receive posted ahead) give the losses
/// and gradient norms of the same ranks on mailboxes (no posting) bit for bit, leave nothing
/// posted after a step, and time every action in order (start ≤ end ≤ sent).
#[test]
fn a_pipeline_that_posts_its_receives_trains_bit_for_bit_the_same() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let config = super::tiny_gpt(2, 2, 16, 32);
    Ad::seed(&Default::default(), 3);
    let model = super::model_parallel::settled(
        Transformer::<Ad>::new(config.clone(), &Default::default()).unwrap(),
    );
    for schedule in [PipelineSchedule::GPipe, PipelineSchedule::OneFOneB] {
        let train = |net: Arc<PeerNet<Flex>>| {
            let mut rank = ParallelRank::<Ad>::new(
                model.clone(),
                Arc::clone(&net),
                ParallelOptions {
                    pipeline: 2,
                    micro_batches: 4,
                    schedule,
                    ..Default::default()
                },
                AdamWSettings::default(),
                Default::default(),
            )
            .unwrap();
            (0..3)
                .map(|step| {
                    let report = rank
                        .step(&super::model_parallel::batch(step, config.vocab_size), 1e-3)
                        .unwrap();
                    assert_eq!(net.posted_receives(), 0, "{schedule}: left posted");
                    let mut last = 0.0;
                    for a in &report.timeline {
                        assert!(
                            last <= a.start && a.start <= a.end && a.end <= a.sent,
                            "{schedule}: {a:?} after {last}"
                        );
                        last = a.sent;
                    }
                    (report.loss, report.grad_norm)
                })
                .collect::<Vec<_>>()
        };
        let (loopback, mailboxes) = both(2, train).unwrap();
        assert_eq!(loopback, mailboxes, "{schedule}");
        assert!(loopback[0].iter().all(|(l, n)| l.is_finite() && *n > 0.0));
    }
}
