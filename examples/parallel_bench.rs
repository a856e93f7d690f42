//! Tensor and pipeline parallelism on this machine, ranks as threads talking over loopback
//! (Kiln's side of `scripts/bench_distributed.sh`):
//!
//! 1. **The pipeline bubble.** For P = 2, 4 stages and M = 4, 8, 16 micro-batches, GPipe and 1F1B:
//!    each stage's idle fraction of the pipeline's step (1 − its compute time / the step's wall
//!    time, from the timestamps of the forward and backward passes; the step runs from the first
//!    action of any stage to the last, the same window for every stage, as the formula counts),
//!    against `(P − 1)/(M + P − 1)`.
//! 2. **Parameter memory per rank** with T = 2, 4 and P = 2, 4 against one device.
//! 3. **Tensor-parallel communication per step**: bytes each rank all-reduced, against Megatron's
//!    count, 4 all-reduces of `b·s·d` values per layer per micro-batch (2 forward, 2 backward).
//!
//! With `--timeline`, the bubble table also says where each stage's idle time went, from the
//! per-action timestamps of `ParallelStepReport::timeline` of every stage on one clock: waiting
//! while the neighbour still computes what this stage needs (the bubble proper), waiting for a
//! tensor the neighbour has finished computing (the transfer), and sending.
//!
//! ```text
//! cargo run --release --example parallel_bench -- [--layers 8] [--d-model 128] [--seq 128]
//!     [--stages 2,4] [--micro-batches 4,8,16] [--timeline] [--bubble-only]
//! ```

use std::sync::Arc;

use burn::backend::{Autodiff, Flex};
use burn::module::Module;
use burn::tensor::backend::Backend;
use clap::Parser;
use kiln::distributed::{
    Action, AdamWSettings, ParallelOptions, ParallelRank, ParallelStepReport, PeerNet,
    PipelineSchedule, TimedAction, bubble_fraction, thread_ranks,
};
use kiln::transformer::{ModelConfig, Transformer};

type Ad = Autodiff<Flex>;

/// Pipeline bubble, memory and tensor-parallel traffic.
#[derive(Debug, Parser)]
struct Args {
    /// Layers of the benchmark GPT.
    #[arg(long, default_value_t = 8)]
    layers: usize,
    /// Model width.
    #[arg(long, default_value_t = 128)]
    d_model: usize,
    /// Tokens per row.
    #[arg(long, default_value_t = 128)]
    seq: usize,
    /// Rows per micro-batch.
    #[arg(long, default_value_t = 4)]
    rows: usize,
    /// Timed steps per setting (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Pipeline stage counts P of the bubble table.
    #[arg(long, value_delimiter = ',', default_values_t = [2usize, 4])]
    stages: Vec<usize>,
    /// Micro-batch counts M of the bubble table.
    #[arg(long, value_delimiter = ',', default_values_t = [4usize, 8, 16])]
    micro_batches: Vec<usize>,
    /// Also print where each stage's idle time went (milliseconds per step, median step).
    #[arg(long)]
    timeline: bool,
    /// Only the bubble table (not the memory and traffic sections).
    #[arg(long)]
    bubble_only: bool,
    /// Pipeline stages as threads of this process (default: one process per stage, talking over
    /// loopback, as `kiln train --nproc` runs them; threads share Burn's autodiff bookkeeping,
    /// whose locks slow a stage's backward pass while another stage computes).
    #[arg(long)]
    threads: bool,
    /// Internal: run as one stage of a process-per-stage measurement
    /// (`RANK,P,M,SCHEDULE,ADDRESSES`).
    #[arg(long, hide = true)]
    stage_of: Option<String>,
}

fn config(args: &Args) -> ModelConfig {
    ModelConfig {
        vocab_size: 256,
        context_length: args.seq,
        n_layers: args.layers,
        n_heads: 4,
        n_kv_heads: 4,
        d_model: args.d_model,
        d_ff: 4 * args.d_model,
        dropout: 0.0,
        ..ModelConfig::shakespeare_char_cpu(256)
    }
}

fn batch(rows: usize, seq: usize) -> Vec<Vec<i64>> {
    (0..rows)
        .map(|r| {
            (0..=seq)
                .map(|i| ((i * 31 + r * 17) % 256) as i64)
                .collect()
        })
        .collect()
}

/// Runs `f` on `world` thread ranks.
fn on_ranks<T: Send>(world: usize, f: impl Fn(Arc<PeerNet<Flex>>) -> T + Sync) -> Vec<T> {
    thread_ranks::<Flex, T>(world, Default::default(), f).expect("thread ranks")
}

/// One stage's step: its timeline (`ParallelStepReport::timeline`) on the machine's clock,
/// seconds since the Unix epoch (the stages are processes of one machine).
#[derive(Clone, Debug, Default)]
struct StageStep {
    actions: Vec<TimedAction>,
}

impl StageStep {
    /// `report`'s step, which began at `t0` (seconds since the Unix epoch).
    fn of(report: &ParallelStepReport, t0: f64) -> Self {
        let actions = report
            .timeline
            .iter()
            .map(|a| TimedAction {
                action: a.action,
                start: t0 + a.start,
                end: t0 + a.end,
                sent: t0 + a.sent,
            })
            .collect();
        Self { actions }
    }

    fn line(&self) -> String {
        let words: Vec<String> = self
            .actions
            .iter()
            .map(|a| {
                let (kind, i) = match a.action {
                    Action::Forward(i) => ('F', i),
                    Action::Backward(i) => ('B', i),
                };
                format!("{kind}:{i}:{}:{}:{}", a.start, a.end, a.sent)
            })
            .collect();
        words.join(" ")
    }

    fn parse(line: &str) -> Option<Self> {
        let actions = line
            .split_whitespace()
            .map(|word| {
                let parts: Vec<&str> = word.split(':').collect();
                let [kind, i, start, end, sent] = parts[..] else {
                    return None;
                };
                let i = i.parse().ok()?;
                Some(TimedAction {
                    action: if kind == "F" {
                        Action::Forward(i)
                    } else {
                        Action::Backward(i)
                    },
                    start: start.parse().ok()?,
                    end: end.parse().ok()?,
                    sent: sent.parse().ok()?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Self { actions })
    }

    fn first(&self) -> f64 {
        self.actions.first().map_or(0.0, |a| a.start)
    }

    fn last(&self) -> f64 {
        self.actions.last().map_or(0.0, |a| a.end)
    }

    fn find(&self, action: Action) -> Option<&TimedAction> {
        self.actions.iter().find(|a| a.action == action)
    }
}

/// One stage's idle time in one pipeline step. The step runs from the first action of any stage
/// to the last, the same window for every stage (the formula's definition); idle is the window
/// less the stage's compute, split into sending, waiting for a tensor its neighbour had already
/// computed (the transfer), and the rest (the neighbour still computing: the bubble itself).
#[derive(Clone, Copy, Debug, Default)]
struct StageIdle {
    /// Idle fraction of the window.
    idle: f64,
    /// The window (seconds).
    window: f64,
    /// Inside sends.
    send: f64,
    /// Waiting after the awaited tensor's compute had ended on the neighbour.
    transfer: f64,
    /// Receives that waited on a transfer.
    late: usize,
}

/// Each stage's idle time, the median step of each (by idle fraction); `steps[stage][step]`.
fn pipeline_idle(steps: &[Vec<StageStep>]) -> Vec<StageIdle> {
    let p = steps.len();
    let n = steps.iter().map(Vec::len).min().unwrap_or(0);
    (0..p)
        .map(|s| {
            let mut per_step: Vec<StageIdle> = (0..n)
                .map(|k| {
                    let start = steps
                        .iter()
                        .map(|st| st[k].first())
                        .fold(f64::MAX, f64::min);
                    let end = steps.iter().map(|st| st[k].last()).fold(f64::MIN, f64::max);
                    let own = &steps[s][k];
                    let window = end - start;
                    let mut out = StageIdle {
                        window,
                        ..StageIdle::default()
                    };
                    let mut busy = 0.0;
                    let mut ready = start;
                    for a in &own.actions {
                        busy += a.end - a.start;
                        // The neighbour's action whose output this one waits for.
                        let producer = match a.action {
                            Action::Forward(_) if s > 0 => steps[s - 1][k].find(a.action),
                            Action::Backward(_) if s + 1 < p => steps[s + 1][k].find(a.action),
                            _ => None,
                        };
                        if let Some(producer) = producer {
                            let waited = (a.start - ready.max(producer.end)).max(0.0);
                            if waited > 0.0 {
                                out.transfer += waited;
                                out.late += 1;
                            }
                        }
                        out.send += a.sent - a.end;
                        ready = a.sent;
                    }
                    out.idle = 1.0 - busy / window;
                    out
                })
                .collect();
            per_step.sort_by(|a, b| a.idle.total_cmp(&b.idle));
            per_step[per_step.len() / 2]
        })
        .collect()
}

fn unix_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// This stage's timed steps (after one warm-up).
fn stage_steps(
    model: &Transformer<Ad>,
    net: Arc<PeerNet<Flex>>,
    args: &Args,
    p: usize,
    m: usize,
    schedule: PipelineSchedule,
) -> Vec<StageStep> {
    let rows = batch(args.rows * m, args.seq);
    let mut rank = ParallelRank::<Ad>::new(
        model.clone(),
        net,
        ParallelOptions {
            pipeline: p,
            micro_batches: m,
            schedule,
            // Equal compute per stage, as the formula assumes (balancing by parameters would
            // give the first stage fewer layers for its embedding, which costs parameters but
            // little compute).
            stage_layers: Some(vec![args.layers / p; p]),
            tensor: 1,
        },
        AdamWSettings::default(),
        Default::default(),
    )
    .expect("rank");
    let mut steps = Vec::new();
    for step in 0..=args.steps {
        let t0 = unix_seconds();
        let report = rank.step(&rows, 1e-4).expect("step");
        if step > 0 {
            steps.push(StageStep::of(&report, t0));
        }
    }
    rank.net().drain();
    steps
}

/// The stages as `p` processes (this program again, with `--stage-of`), each with its share of
/// the cores; their steps in stage order.
fn stage_processes(
    args: &Args,
    p: usize,
    m: usize,
    schedule: PipelineSchedule,
) -> Vec<Vec<StageStep>> {
    let addresses = PeerNet::<Flex>::local_addresses(p)
        .expect("ports")
        .join(",");
    let threads = (std::thread::available_parallelism().map_or(1, |n| n.get()) / p).max(1);
    let exe = std::env::current_exe().expect("this program");
    let children: Vec<_> = (0..p)
        .map(|rank| {
            std::process::Command::new(&exe)
                .args([
                    "--layers",
                    &args.layers.to_string(),
                    "--d-model",
                    &args.d_model.to_string(),
                    "--seq",
                    &args.seq.to_string(),
                    "--rows",
                    &args.rows.to_string(),
                    "--steps",
                    &args.steps.to_string(),
                    "--stage-of",
                    &format!("{rank},{p},{m},{schedule},{addresses}"),
                ])
                .env("RAYON_NUM_THREADS", threads.to_string())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("stage process")
        })
        .collect();
    children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().expect("stage process");
            assert!(out.status.success(), "a stage process failed");
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(|l| StageStep::parse(l).expect("stage report"))
                .collect()
        })
        .collect()
}

/// Reads every parameter once (mapping does), so that clones share the values: Burn's lazy
/// initializers would run once per clone.
fn bench_model(config: &ModelConfig) -> Transformer<Ad> {
    struct Read;
    impl burn::module::ModuleMapper<Ad> for Read {}
    Ad::seed(&Default::default(), 1);
    Transformer::<Ad>::new(config.clone(), &Default::default())
        .expect("model")
        .map(&mut Read)
}

fn main() {
    let args = Args::parse();
    if let Some(spec) = &args.stage_of {
        let parts: Vec<&str> = spec.splitn(5, ',').collect();
        let [rank, p, m, schedule, addresses] = parts[..] else {
            panic!("--stage-of RANK,P,M,SCHEDULE,ADDRESSES");
        };
        let (rank, p, m): (usize, usize, usize) = (
            rank.parse().expect("rank"),
            p.parse().expect("P"),
            m.parse().expect("M"),
        );
        let schedule: PipelineSchedule = schedule.parse().expect("schedule");
        let addresses = addresses.split(',').map(str::to_owned).collect();
        let net =
            PeerNet::<Flex>::start(rank, addresses, Default::default()).expect("data service");
        let steps = stage_steps(
            &bench_model(&config(&args)),
            Arc::new(net),
            &args,
            p,
            m,
            schedule,
        );
        for step in steps {
            println!("{}", step.line());
        }
        return;
    }
    println!(
        "CPU: {}; {} cores",
        kiln::kernels::cpu_description(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let config = config(&args);
    let model = bench_model(&config);
    let whole_bytes = model.num_params() * 4;

    println!(
        "\n== pipeline bubble: {} layers, d = {}, {} rows × {} tokens per micro-batch",
        args.layers, args.d_model, args.rows, args.seq
    );
    println!(
        "P  M   schedule  idle per stage (median of {} steps)      mean   formula  mean/formula",
        args.steps
    );
    for &p in &args.stages {
        for &m in &args.micro_batches {
            for schedule in [PipelineSchedule::GPipe, PipelineSchedule::OneFOneB] {
                let stage_steps = if args.threads {
                    on_ranks(p, |net| stage_steps(&model, net, &args, p, m, schedule))
                } else {
                    stage_processes(&args, p, m, schedule)
                };
                let steps = pipeline_idle(&stage_steps);
                let idle: Vec<f64> = steps.iter().map(|s| s.idle).collect();
                let mean = idle.iter().sum::<f64>() / idle.len() as f64;
                let formula = bubble_fraction(p, m);
                let stages: Vec<String> = idle.iter().map(|x| format!("{x:.3}")).collect();
                println!(
                    "{p}  {m:<3} {schedule:<9} {:<38} {mean:.3}  {formula:.3}    {:.2}",
                    stages.join(" "),
                    mean / formula
                );
                if args.timeline {
                    for (stage, s) in steps.iter().enumerate() {
                        let idle = s.idle * s.window;
                        println!(
                            "     stage {stage}: step {:.1} ms, compute {:.1}, idle {:.1} = neighbour \
                             computing {:.1} + transfers {:.1} ({} late receives, {:.2} ms each) + \
                             sending {:.1}",
                            1e3 * s.window,
                            1e3 * (s.window - idle),
                            1e3 * idle,
                            1e3 * (idle - s.transfer - s.send),
                            1e3 * s.transfer,
                            s.late,
                            1e3 * s.transfer / s.late.max(1) as f64,
                            1e3 * s.send
                        );
                    }
                }
            }
        }
    }
    if args.bubble_only {
        return;
    }

    println!(
        "\n== parameter memory per rank (f32), whole model {:.2} MB",
        mb(whole_bytes)
    );
    for (t, p) in [(2usize, 1usize), (4, 1), (1, 2), (1, 4), (2, 2)] {
        let bytes = on_ranks(t * p, |net| {
            let rank = ParallelRank::<Ad>::new(
                model.clone(),
                net,
                ParallelOptions {
                    tensor: t,
                    pipeline: p,
                    micro_batches: p,
                    ..Default::default()
                },
                AdamWSettings::default(),
                Default::default(),
            )
            .expect("rank");
            rank.stage().expect("stage").num_params() * 4
        });
        let largest = bytes.iter().copied().max().unwrap_or(0);
        let per: Vec<String> = bytes.iter().map(|b| format!("{:.2}", mb(*b))).collect();
        println!(
            "T={t} P={p}: per rank [{}] MB; largest / whole = {:.3} (1/{} = {:.3})",
            per.join(", "),
            largest as f64 / whole_bytes as f64,
            t * p,
            1.0 / (t * p) as f64
        );
    }

    println!("\n== tensor-parallel traffic per step (f32)");
    for t in [2usize, 4] {
        let m = 2;
        let rows = batch(args.rows * m, args.seq);
        let measured = on_ranks(t, |net| {
            let mut rank = ParallelRank::<Ad>::new(
                model.clone(),
                net,
                ParallelOptions {
                    tensor: t,
                    micro_batches: m,
                    ..Default::default()
                },
                AdamWSettings::default(),
                Default::default(),
            )
            .expect("rank");
            let before = rank.tensor_comm().group().bytes_reduced();
            rank.step(&rows, 1e-4).expect("step");
            // The step's own all-reduces of activations and their gradients (the rest of the
            // group's traffic is the loss and norm bookkeeping: a few values).
            let (forward, backward) = rank.tensor_comm().reduces();
            (
                rank.tensor_comm().group().bytes_reduced() - before,
                forward,
                backward,
            )
        });
        let (bytes, forward, backward) = measured[0];
        let megatron = 4 * args.layers * m * args.rows * args.seq * args.d_model * 4;
        println!(
            "T={t}: {forward} forward + {backward} backward all-reduces, {:.2} MB all-reduced per rank; \
             Megatron 4·L·M·b·s·d·4 B = {:.2} MB ({:.3}×); sent per rank: {:.2} MB here \
             (each rank sends its part to the T−1 others), {:.2} MB in a ring (2(T−1)/T)",
            mb(bytes as usize),
            mb(megatron),
            bytes as f64 / megatron as f64,
            mb(bytes as usize) * (t as f64 - 1.0),
            mb(bytes as usize) * 2.0 * (t as f64 - 1.0) / t as f64
        );
    }
}

fn mb(bytes: usize) -> f64 {
    bytes as f64 / 1e6
}
