//! `kiln train`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args as ClapArgs;
use kiln::backend::{CheckpointedTrainBackend, TrainBackend};
use kiln::distributed::GatherBackend;
use kiln::distributed::launch::{self, LaunchOutcome, LaunchPlan, ProcessGroupEnv};
use kiln::distributed::rendezvous::{self, Rendezvous};
use kiln::distributed::{Communicator, ParallelTrainer, PeerNet, TensorParallelBackend, Transport};
use kiln::trainer::checkpoint;
use kiln::trainer::{DistillConfig, Precision, TrainConfig, TrainOutcome, Trainer, TrainingRun};

use super::stop::{StopSignals, shell_quote};

#[derive(Debug, ClapArgs)]
#[command(
    after_help = "SIGINT (Ctrl-C) or SIGTERM stops cleanly: the step in progress finishes, a checkpoint is \
                  written, the command that resumes the run is printed, and kiln exits with status 130 \
                  (SIGINT) or 143 (SIGTERM). A second signal exits at once.\n\n\
                  Data parallel: `--nproc N` starts N ranks on this machine (like torchrun \
                  --nproc-per-node); add `--nnodes M --node-rank R --master HOST:PORT` on each of M \
                  machines. A process started with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in its \
                  environment (torchrun, SLURM, Kubernetes) runs as that rank. `zero_stage` in the \
                  config (or --zero-stage) shards the optimizer state (1), gradients (2) and parameters \
                  (3) over the ranks. `tensor_parallel = T` and `pipeline_parallel = P` in the config split the \
                  model over T × P ranks (Megatron-LM's tensor and pipeline parallelism; \
                  `micro_batches`, `pipeline_schedule = \"1f1b\"|\"gpipe\"`): start them with \
                  --nproc T×P (×D for D data-parallel replicas). See docs/distributed.md."
)]
pub struct TrainArgs {
    /// Training config (TOML; for `kiln distill`, the student's); see examples/configs/tiny.toml.
    #[arg(
        long,
        short,
        visible_alias = "student-config",
        value_name = "FILE",
        required_unless_present = "resume"
    )]
    pub config: Option<PathBuf>,
    /// Continue the run in this directory from its newest checkpoint.
    #[arg(long, value_name = "RUN_DIR", conflicts_with = "config")]
    pub resume: Option<PathBuf>,
    /// Token shards directory (overrides the config's data_dir).
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Start from this model's weights (fine-tuning): a .gguf, nanoGPT's ckpt.pt, a Hugging Face
    /// or Kiln model directory. Its structure replaces the config's [model]; its tokenizer is
    /// used when the data has none beside it.
    #[arg(long, value_name = "M", conflicts_with = "resume")]
    pub init_from: Option<PathBuf>,
    /// Run directory (checkpoints, metrics.jsonl, config.toml).
    #[arg(long, default_value = "runs/train", value_name = "RUN_DIR")]
    pub out: PathBuf,
    /// Stop after this many optimizer steps in total.
    #[arg(long, value_name = "N")]
    pub max_steps: Option<u64>,
    /// Seed for initialization, data order and dropout.
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
    /// Compute precision: f32, bf16 or f16 (f32 master weights; f16 with dynamic loss scaling).
    #[arg(long, value_name = "P", value_parser = ["f32", "bf16", "f16"])]
    pub precision: Option<String>,
    /// Recompute cheap activations in the backward pass instead of storing them (less memory).
    #[arg(long)]
    pub activation_checkpointing: bool,
    /// Memory budget in GB for the pre-flight check (default: the available host memory on CPU).
    #[arg(long, value_name = "GB")]
    pub max_memory: Option<f64>,
    /// Peak FLOP/s of the device, for the MFU in the log and metrics.jsonl (a CPU: its measured
    /// float32 matrix-multiply rate, e.g. 3.1e11; an H200: 9.89e14 in BF16).
    #[arg(long, value_name = "FLOPS", value_parser = positive_flops)]
    pub peak_flops: Option<f64>,
    /// Ranks (processes) to start on this machine, each with its share of the cores: data-parallel
    /// replicas, each training at the config's micro_batch, or tensor × pipeline shards of them.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub nproc: usize,
    /// Machines in the run (start `kiln train` on each with its --node-rank).
    #[arg(long, default_value_t = 1, value_name = "M")]
    pub nnodes: usize,
    /// This machine's index among --nnodes.
    #[arg(long, default_value_t = 0, value_name = "R")]
    pub node_rank: usize,
    /// Rank 0's rendezvous address; it also uses the next ports for Burn's orchestrator and the
    /// ranks' data services (docs/distributed.md).
    #[arg(long, default_value = launch::DEFAULT_MASTER, value_name = "HOST:PORT")]
    pub master: String,
    /// ZeRO stage for a new run (overrides the config's zero_stage): 0 plain data parallel, 1
    /// shard the optimizer state, 2 also gradients, 3 also parameters.
    #[arg(long, value_name = "Z", value_parser = clap::value_parser!(u8).range(0..=3))]
    pub zero_stage: Option<u8>,
    /// Distill from this teacher (a .gguf file or a model directory with the student's tokenizer):
    /// loss = α·T²·KL(teacher_T ‖ student_T) + (1 − α)·cross-entropy (`kiln distill`).
    #[arg(long, value_name = "M")]
    pub teacher: Option<PathBuf>,
    /// Distillation temperature T.
    #[arg(long, default_value_t = 2.0, value_name = "T", requires = "teacher")]
    pub temperature: f64,
    /// Weight α of the teacher's term in the distillation loss.
    #[arg(long, default_value_t = 0.5, value_name = "A", requires = "teacher")]
    pub alpha: f64,
}

fn positive_flops(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!(
            "expected a positive number of FLOP/s such as 3.1e11, got {s:?}"
        )),
    }
}
/// A new run from a config, or the continuation of one.
enum Start {
    New(Box<TrainConfig>),
    Resume(PathBuf),
}

/// Trains; on SIGINT or SIGTERM stops after the step in progress, writes a checkpoint, prints the
/// command that resumes it, and exits with 130 (SIGINT) or 143 (SIGTERM). A second signal exits at
/// once.
pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let signals = StopSignals::install()?;
    let group = ProcessGroupEnv::from_env()?;
    if group.is_none() && (args.nproc > 1 || args.nnodes > 1) {
        return launch_ranks(&args, &signals);
    }
    let (start, checkpointing) = if let Some(run_dir) = &args.resume {
        if args.precision.is_some()
            || args.activation_checkpointing
            || args.max_memory.is_some()
            || args.peak_flops.is_some()
        {
            bail!(
                "--precision, --activation-checkpointing, --max-memory and --peak-flops apply to \
                 new runs only"
            );
        }
        let state = checkpoint::latest_state(run_dir)
            .with_context(|| format!("resuming {}", run_dir.display()))?;
        (
            Start::Resume(run_dir.clone()),
            state.config.activation_checkpointing,
        )
    } else {
        let Some(path) = &args.config else {
            bail!("either --config or --resume is required");
        };
        let mut config = TrainConfig::load(path)?;
        if let Some(d) = &args.data {
            config.data_dir = d.clone();
        }
        if let Some(from) = &args.init_from {
            config.init_from = Some(from.clone());
        }
        if let Some(m) = args.max_steps {
            config.max_steps = m;
        }
        if let Some(s) = args.seed {
            config.seed = s;
        }
        if let Some(p) = &args.precision {
            config.precision = match p.as_str() {
                "bf16" => Precision::Bf16,
                "f16" => Precision::F16,
                _ => Precision::F32,
            };
        }
        config.activation_checkpointing |= args.activation_checkpointing;
        if let Some(gb) = args.max_memory {
            config.max_memory_gb = Some(gb);
        }
        if let Some(peak) = args.peak_flops {
            config.peak_flops = Some(peak);
        }
        if let Some(z) = args.zero_stage {
            config.zero_stage = z;
        }
        if let Some(teacher) = &args.teacher {
            config.distill = Some(DistillConfig {
                teacher: teacher.clone(),
                temperature: args.temperature,
                alpha: args.alpha,
            });
        }
        let checkpointing = config.activation_checkpointing;
        (Start::New(Box::new(config)), checkpointing)
    };
    let model_parallel = match &start {
        Start::New(config) => config.model_parallel(),
        Start::Resume(run_dir) => checkpoint::latest_state(run_dir)?.config.model_parallel(),
    };
    if model_parallel {
        let Some(group) = group.as_ref() else {
            let config = match &start {
                Start::New(config) => (**config).clone(),
                Start::Resume(run_dir) => checkpoint::latest_state(run_dir)?.config,
            };
            bail!(
                "tensor_parallel = {} × pipeline_parallel = {} needs {} ranks: start them with \
                 --nproc {} (a multiple of it adds data-parallel replicas)",
                config.tensor_parallel,
                config.pipeline_parallel,
                config.tensor_parallel * config.pipeline_parallel,
                config.tensor_parallel * config.pipeline_parallel
            );
        };
        let stopped = if checkpointing {
            train_model_parallel::<CheckpointedTrainBackend>(start, &args, &signals, group)?
        } else {
            train_model_parallel::<TrainBackend>(start, &args, &signals, group)?
        };
        if let Some(status) = stopped {
            std::process::exit(status);
        }
        return Ok(());
    }
    // The checkpointing strategy is a type parameter of Burn's autodiff backend.
    let stopped = if checkpointing {
        train_on::<CheckpointedTrainBackend>(start, &args, &signals, group.as_ref())?
    } else {
        train_on::<TrainBackend>(start, &args, &signals, group.as_ref())?
    };
    if let Some(status) = stopped {
        std::process::exit(status);
    }
    Ok(())
}

/// `kiln train --nproc N`: starts this node's ranks as child processes and watches them.
fn launch_ranks(args: &TrainArgs, signals: &StopSignals) -> anyhow::Result<()> {
    let plan = LaunchPlan {
        nproc: args.nproc,
        nnodes: args.nnodes,
        node_rank: args.node_rank,
        master: args.master.clone(),
    };
    plan.validate()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / args.nproc).max(1);
    let exe = std::env::current_exe().context("locating the kiln executable")?;
    let command: Vec<String> = std::iter::once(exe.display().to_string())
        .chain(std::env::args().skip(1))
        .collect();
    let world = plan.nproc * plan.nnodes;
    eprintln!(
        "starting ranks {}..{} of {world} on this machine ({threads} thread(s) each); master {}",
        plan.node_rank * plan.nproc,
        (plan.node_rank + 1) * plan.nproc - 1,
        plan.master
    );
    let flag = signals.flag();
    let mut forwarded = false;
    let outcome = launch::launch(&command, &plan, threads, Duration::from_secs(10), || {
        if !forwarded && flag.load(std::sync::atomic::Ordering::SeqCst) {
            forwarded = true;
            let (name, _) = signals.received();
            return Some(if name == "SIGINT" { 2 } else { 15 });
        }
        None
    })?;
    match outcome {
        LaunchOutcome::Success => Ok(()),
        LaunchOutcome::RankFailed { status, .. } if forwarded => {
            std::process::exit(status.code().unwrap_or(signals.received().1))
        }
        failed => bail!("{}", failed.message()),
    }
}

/// This process's part in a multi-process run: the rendezvous (config check, watchdog), the
/// collective group, and the trainer builder with data parallelism and ZeRO plugged in.
fn join_group<B: GatherBackend>(
    group: &ProcessGroupEnv,
    fingerprint: &str,
    zero_stage: u8,
    device: B::Device,
) -> anyhow::Result<(kiln::trainer::TrainerBuilder<B>, Rendezvous)> {
    let rank = group.rank;
    let (rv, endpoints) = join_rendezvous(group, fingerprint)?;
    if rank == 0 {
        launch::start_orchestrator(group.orchestrator_port())?;
    }
    let comm = Communicator::<B::InnerBackend>::join(
        rank,
        group.world_size,
        device.clone(),
        &Transport::Processes(endpoints),
    )
    .with_context(|| format!("rank {rank}: joining the collective group"))?;
    Ok((
        kiln::distributed::trainer_builder::<B>(Arc::new(comm), zero_stage, device),
        rv,
    ))
}

/// Checks this rank in at the rendezvous (config fingerprint, its data-service address, the
/// watchdog that stops it when another rank dies).
fn join_rendezvous(
    group: &ProcessGroupEnv,
    fingerprint: &str,
) -> anyhow::Result<(Rendezvous, kiln::distributed::Endpoints)> {
    let rank = group.rank;
    let on_failure: rendezvous::FailureHandler = Arc::new(move |e| {
        eprintln!("kiln: {e}; stopping rank {rank}");
        std::process::exit(1);
    });
    let timeout = std::env::var("KILN_RENDEZVOUS_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Duration::from_secs(120), Duration::from_secs);
    let endpoints = group.endpoints()?;
    launch::check_port_free("0.0.0.0", endpoints.data_port, "this rank's data service")?;
    let address = format!("{}:{}", endpoints.node_host, endpoints.data_port);
    let rv = Rendezvous::join(group, fingerprint, &address, timeout, on_failure)
        .with_context(|| format!("rank {rank}: joining the run"))?;
    Ok((rv, endpoints))
}

/// The fingerprint ranks compare at the rendezvous (the config, or the checkpoint resumed), and
/// the run's ZeRO stage.
fn run_fingerprint(start: &Start) -> anyhow::Result<(String, u8)> {
    Ok(match start {
        Start::New(config) => (
            rendezvous::fingerprint(&config.to_toml()?),
            config.zero_stage,
        ),
        Start::Resume(run_dir) => {
            let state = checkpoint::latest_state(run_dir)?;
            let at = format!("{} step {}", run_dir.display(), state.step);
            (rendezvous::fingerprint(&at), state.config.zero_stage)
        }
    })
}

/// One rank of a tensor/pipeline-parallel run (`tensor_parallel` or `pipeline_parallel` > 1):
/// point-to-point transfers between the ranks' data services; returns the exit status when a
/// signal stopped the run.
fn train_model_parallel<B: TensorParallelBackend>(
    start: Start,
    args: &TrainArgs,
    signals: &StopSignals,
    group: &ProcessGroupEnv,
) -> anyhow::Result<Option<i32>> {
    let device = B::Device::default();
    let rank = group.rank;
    let (fingerprint, _) = run_fingerprint(&start)?;
    let (rendezvous, _) = join_rendezvous(group, &fingerprint)?;
    let net =
        PeerNet::<B::InnerBackend>::start(rank, rendezvous.addresses().to_vec(), device.clone())
            .with_context(|| format!("rank {rank}: starting its data service"))?;
    let net = Arc::new(net);
    let trainer = match start {
        Start::Resume(run_dir) => {
            ParallelTrainer::<B>::resume(&run_dir, args.max_steps, net, device)
                .with_context(|| format!("resuming {}", run_dir.display()))?
        }
        Start::New(config) => ParallelTrainer::<B>::start(*config, &args.out, net, device)?,
    };
    let rank0 = rank == 0;
    if rank0 {
        let layout = trainer.rank().layout();
        let c = trainer.config();
        print_model_line(&trainer);
        eprintln!(
            "model parallel: tensor {} × pipeline {} ({} schedule, {} micro-batches, layers per \
             stage {:?}) × data {}",
            layout.tensor,
            layout.pipeline,
            c.pipeline_schedule,
            c.grad_accum,
            trainer.rank().stage_layers(),
            layout.data
        );
    }
    let started = std::time::Instant::now();
    let start_step = trainer.state().step;
    let mut trainer = trainer
        .with_progress(super::interactive() && rank0)
        .with_stop_flag(signals.flag());
    let outcome = trainer.run()?;
    // The last messages (the final barrier's) must reach the peers before this process exits.
    trainer.rank().net().drain();
    rendezvous.finish();
    Ok(report_outcome(
        outcome, &trainer, start_step, started, rank0, signals,
    ))
}

/// The model line every run starts with.
fn print_model_line(run: &dyn TrainingRun) {
    let (m, c) = (run.model_config(), run.config());
    eprintln!(
        "model: {} layers, width {}, {} heads, context {} ({:.2}M parameters) on {}; {}{}",
        m.n_layers,
        m.d_model,
        m.n_heads,
        m.context_length,
        m.num_params() as f64 / 1e6,
        kiln::backend::BACKEND_NAME,
        c.precision.name(),
        if c.activation_checkpointing {
            ", activation checkpointing"
        } else {
            ""
        }
    );
}

/// Prints how a run ended (rank 0); returns the exit status when a signal stopped it.
fn report_outcome(
    outcome: TrainOutcome,
    run: &dyn TrainingRun,
    start_step: u64,
    started: std::time::Instant,
    rank0: bool,
    signals: &StopSignals,
) -> Option<i32> {
    let val = match outcome {
        TrainOutcome::Finished { val_loss } => val_loss,
        TrainOutcome::Interrupted { step, checkpoint } => {
            let (signal, status) = signals.received();
            if rank0 {
                eprintln!(
                    "{signal}: stopped after step {step}; checkpoint {}\nresume with: kiln train --resume {}",
                    checkpoint.display(),
                    shell_quote(&run.run_dir().display().to_string())
                );
            }
            return Some(status);
        }
    };
    if rank0 {
        eprintln!(
            "{} steps in {:.1}s; val loss {val:.4} (perplexity {:.2})",
            run.state().step - start_step,
            started.elapsed().as_secs_f64(),
            val.exp()
        );
        println!("final val_loss {val:.4}");
    }
    None
}

/// Trains on backend `B` (one rank of `group` if given); returns the exit status when a signal
/// stopped the run.
fn train_on<B: GatherBackend>(
    start: Start,
    args: &TrainArgs,
    signals: &StopSignals,
    group: Option<&ProcessGroupEnv>,
) -> anyhow::Result<Option<i32>> {
    let device = B::Device::default();
    let (builder, rendezvous) = match group {
        None => (Trainer::<B>::builder(device), None),
        Some(group) => {
            let (fingerprint, stage) = run_fingerprint(&start)?;
            let (builder, rv) = join_group::<B>(group, &fingerprint, stage, device)?;
            (builder, Some(rv))
        }
    };
    let trainer = match start {
        Start::Resume(run_dir) => builder
            .resume(&run_dir, args.max_steps)
            .with_context(|| format!("resuming {}", run_dir.display()))?,
        Start::New(config) => builder.start(*config, &args.out)?,
    };
    let rank0 = group.is_none_or(|g| g.rank == 0);
    if rank0 {
        print_model_line(&trainer);
        if let Some(g) = group {
            eprintln!(
                "data parallel: {} ranks, ZeRO stage {}, {} rows per rank and micro-batch",
                g.world_size,
                trainer.config().zero_stage,
                trainer.config().micro_batch
            );
        }
    }
    let started = std::time::Instant::now();
    let start_step = trainer.state().step;
    let mut trainer = trainer
        .with_progress(super::interactive())
        .with_stop_flag(signals.flag());
    let outcome = trainer.run()?;
    if let Some(rv) = &rendezvous {
        rv.finish();
    }
    Ok(report_outcome(
        outcome, &trainer, start_step, started, rank0, signals,
    ))
}
