//! All-reduce bandwidth through `burn-collective` on this machine (Kiln's side of
//! `scripts/bench_distributed.sh`): 1 MB to 256 MB f32 tensors summed over `--ranks` processes on
//! loopback (or threads with `--threads`), against the machine's memcpy bandwidth in the same run.
//!
//! ```text
//! cargo run --release --example allreduce_bench -- [--ranks 2] [--threads] [--iters 5]
//! ```
//! Prints, per size, the median time and the "bus bandwidth" nccl-tests reports:
//! `2·(N−1)/N · bytes / time`, the bytes each rank must move in an ideal ring all-reduce.

use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::backend::Flex;
use burn::tensor::Tensor;
use clap::Parser;
use kiln::distributed::launch::{self, LaunchPlan, ProcessGroupEnv};
use kiln::distributed::{Communicator, Transport};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: kiln::Allocator = kiln::Allocator;

/// All-reduce bandwidth over loopback against memcpy.
#[derive(Debug, Parser)]
struct Args {
    /// Ranks.
    #[arg(long, default_value_t = 2)]
    ranks: usize,
    /// Ranks as threads of one process instead of processes.
    #[arg(long)]
    threads: bool,
    /// Timed all-reduces per size (after one warm-up).
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Rendezvous port for processes (the next ones are used too).
    #[arg(long, default_value_t = 29620)]
    port: u16,
}

const SIZES_MB: [usize; 5] = [1, 4, 16, 64, 256];

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// memcpy of the largest size, GB/s (one thread, as one rank's copy would be).
fn memcpy_gbs() -> f64 {
    let n = 256 * 1024 * 1024 / 4;
    let src = vec![1f32; n];
    let mut dst = vec![0f32; n];
    let times: Vec<Duration> = (0..5)
        .map(|_| {
            let t = Instant::now();
            dst.copy_from_slice(&src);
            std::hint::black_box(&dst);
            t.elapsed()
        })
        .collect();
    (n * 4) as f64 / median(times).as_secs_f64() / 1e9
}

/// Times the all-reduces of one rank; returns (MB, median) per size.
fn measure(comm: &Communicator<Flex>, iters: usize) -> Vec<(usize, Duration)> {
    SIZES_MB
        .iter()
        .map(|&mb| {
            let n = mb * 1024 * 1024 / 4;
            let t = Tensor::<Flex, 1>::ones([n], comm.device());
            let _ = comm.all_reduce_sum(t.clone()).expect("all-reduce");
            let times = (0..iters)
                .map(|_| {
                    comm.barrier().expect("barrier");
                    let start = Instant::now();
                    let out = comm.all_reduce_sum(t.clone()).expect("all-reduce");
                    let _ = out.into_data();
                    start.elapsed()
                })
                .collect();
            (mb, median(times))
        })
        .collect()
}

fn report(results: &[(usize, Duration)], ranks: usize, how: &str) {
    let memcpy = memcpy_gbs();
    let cpu = kiln::kernels::cpu_description();
    println!("all-reduce over {ranks} {how} on loopback; CPU: {cpu}; memcpy {memcpy:.2} GB/s");
    println!(
        "{:>8} {:>10} {:>12} {:>10}",
        "size", "median", "bus GB/s", "/ memcpy"
    );
    for (mb, t) in results {
        let bytes = (*mb * 1024 * 1024) as f64;
        let bus = 2.0 * (ranks as f64 - 1.0) / ranks as f64 * bytes / t.as_secs_f64() / 1e9;
        println!(
            "{:>6}MB {:>8.1}ms {:>12.2} {:>10.3}",
            mb,
            t.as_secs_f64() * 1e3,
            bus,
            bus / memcpy
        );
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.threads {
        let results = std::thread::scope(|s| {
            let handles: Vec<_> = (0..args.ranks)
                .map(|rank| {
                    s.spawn(move || {
                        let comm = Communicator::<Flex>::join(
                            rank,
                            args.ranks,
                            Default::default(),
                            &Transport::Threads,
                        )
                        .expect("join");
                        measure(&comm, args.iters)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("rank"))
                .collect::<Vec<_>>()
        });
        report(&results[0], args.ranks, "threads");
        return Ok(());
    }
    match ProcessGroupEnv::from_env()? {
        None => {
            let command: Vec<String> = std::env::args().collect();
            let plan = LaunchPlan {
                nproc: args.ranks,
                nnodes: 1,
                node_rank: 0,
                master: format!("127.0.0.1:{}", args.port),
            };
            let outcome = launch::launch(&command, &plan, 1, Duration::from_secs(5), || None)?;
            anyhow::ensure!(
                matches!(outcome, launch::LaunchOutcome::Success),
                "{}",
                outcome.message()
            );
        }
        Some(group) => {
            let endpoints = group.endpoints()?;
            launch::check_port_free("0.0.0.0", endpoints.data_port, "this rank's data service")?;
            if group.rank == 0 {
                launch::start_orchestrator(group.orchestrator_port())?;
            }
            let comm = Arc::new(Communicator::<Flex>::join(
                group.rank,
                group.world_size,
                Default::default(),
                &Transport::Processes(endpoints),
            )?);
            let results = measure(&comm, args.iters);
            if group.rank == 0 {
                report(&results, group.world_size, "processes");
            }
            comm.barrier()?;
        }
    }
    Ok(())
}
