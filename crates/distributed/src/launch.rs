//! Processes and nodes the way `torchrun` does it: the standard environment variables (`RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`) say where a process stands, and
//! [`launch`] starts `nproc` such processes on this node and watches them: when one dies, the
//! others are stopped and the error names it.
//!
//! Ports, from `MASTER_PORT` = P: P is the rendezvous on rank 0 ([`crate::rendezvous`]), P + 1
//! Burn's global orchestrator (rank 0), and P + 2 + rank each rank's tensor data service
//! (`KILN_DATA_PORT` overrides it). The rendezvous listens on `MASTER_ADDR` only; the orchestrator
//! and the data services of `burn-collective` listen on every interface (0.0.0.0).

use std::net::{IpAddr, TcpListener, ToSocketAddrs, UdpSocket};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use crate::comm::Endpoints;
use crate::error::{DistError, Result};

/// SIGTERM's number.
const SIGTERM: i32 = 15;

/// The default master address: loopback, so nothing is reachable from other machines unless asked.
pub const DEFAULT_MASTER: &str = "127.0.0.1:29500";

/// Where this process stands in a multi-process run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessGroupEnv {
    /// Global rank.
    pub rank: usize,
    /// Number of ranks.
    pub world_size: usize,
    /// Rank on this node.
    pub local_rank: usize,
    /// Host of rank 0.
    pub master_addr: String,
    /// The rendezvous port on rank 0.
    pub master_port: u16,
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn parse<T: std::str::FromStr>(name: &str, value: &str) -> Result<T> {
    value
        .trim()
        .parse()
        .map_err(|_| DistError::Config(format!("{name}={value:?} is not a valid number")))
}

impl ProcessGroupEnv {
    /// Reads the torchrun/SLURM-style variables; `None` when `WORLD_SIZE` is unset (one process).
    /// `SLURM_PROCID` / `SLURM_NTASKS` / `SLURM_LOCALID` stand in for the torchrun names.
    pub fn from_env() -> Result<Option<Self>> {
        let world = var("WORLD_SIZE").or_else(|| var("SLURM_NTASKS"));
        let Some(world) = world else { return Ok(None) };
        let world_size: usize = parse("WORLD_SIZE", &world)?;
        let rank = var("RANK")
            .or_else(|| var("SLURM_PROCID"))
            .ok_or_else(|| DistError::Config("WORLD_SIZE is set but RANK is not".into()))?;
        let rank: usize = parse("RANK", &rank)?;
        let local_rank = match var("LOCAL_RANK").or_else(|| var("SLURM_LOCALID")) {
            Some(v) => parse("LOCAL_RANK", &v)?,
            None => 0,
        };
        let master_addr = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let master_port = match var("MASTER_PORT") {
            Some(p) => parse("MASTER_PORT", &p)?,
            None => 29500,
        };
        let env = Self {
            rank,
            world_size,
            local_rank,
            master_addr,
            master_port,
        };
        env.validate()?;
        Ok(Some(env))
    }

    /// Checks the numbers fit together.
    pub fn validate(&self) -> Result<()> {
        if self.world_size == 0 || self.rank >= self.world_size {
            return Err(DistError::Config(format!(
                "RANK={} is not in a world of WORLD_SIZE={}",
                self.rank, self.world_size
            )));
        }
        if usize::from(self.master_port) + 2 + self.world_size > usize::from(u16::MAX) {
            return Err(DistError::Config(format!(
                "MASTER_PORT={} leaves no room for {} data ports above it",
                self.master_port, self.world_size
            )));
        }
        Ok(())
    }

    /// The port of Burn's orchestrator.
    pub fn orchestrator_port(&self) -> u16 {
        self.master_port + 1
    }

    /// This rank's data-service port (`KILN_DATA_PORT` overrides it).
    pub fn data_port(&self) -> Result<u16> {
        match var("KILN_DATA_PORT") {
            Some(p) => parse("KILN_DATA_PORT", &p),
            None => Ok(self.master_port + 2 + self.rank as u16),
        }
    }

    /// The address other ranks reach this one at: `KILN_NODE_HOST`, else loopback when the
    /// master is on loopback, else the local address that routes to the master.
    pub fn node_host(&self) -> Result<String> {
        if let Some(h) = var("KILN_NODE_HOST") {
            return Ok(h);
        }
        let master = resolve(&self.master_addr, self.master_port)?;
        if master.is_loopback() {
            return Ok("127.0.0.1".into());
        }
        let probe = UdpSocket::bind(("0.0.0.0", 0))
            .and_then(|s| s.connect((master, self.master_port)).map(|()| s))
            .and_then(|s| s.local_addr())
            .map_err(|e| DistError::Network {
                what: format!("finding this node's address towards {}", self.master_addr),
                source: e,
            })?;
        Ok(probe.ip().to_string())
    }

    /// Where this rank meets the others through `burn-collective`.
    pub fn endpoints(&self) -> Result<Endpoints> {
        Ok(Endpoints {
            orchestrator: format!("{}:{}", self.master_addr, self.orchestrator_port()),
            node_host: self.node_host()?,
            data_port: self.data_port()?,
        })
    }
}

/// The first address of `host`.
pub fn resolve(host: &str, port: u16) -> Result<IpAddr> {
    (host, port)
        .to_socket_addrs()
        .map_err(|e| DistError::Network {
            what: format!("resolving the master address {host}"),
            source: e,
        })?
        .next()
        .map(|a| a.ip())
        .ok_or_else(|| DistError::Config(format!("the master address {host} resolves to nothing")))
}

/// Fails with a clear error when `port` cannot be listened on (in use, or not permitted).
pub fn check_port_free(host: &str, port: u16, what: &str) -> Result<()> {
    TcpListener::bind((host, port))
        .map(drop)
        .map_err(|e| DistError::Network {
            what: format!(
                "{what}: port {port} on {host} (in use? pick another with --master HOST:PORT)"
            ),
            source: e,
        })
}

/// Runs Burn's global orchestrator on `port` in a background thread (rank 0 does this).
pub fn start_orchestrator(port: u16) -> Result<()> {
    check_port_free("0.0.0.0", port, "the collective orchestrator")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| DistError::Network {
            what: "starting the orchestrator's runtime".into(),
            source: e,
        })?;
    std::thread::Builder::new()
        .name("kiln-orchestrator".into())
        .spawn(move || runtime.block_on(burn_collective::start_global_orchestrator(port)))
        .map_err(|e| DistError::Network {
            what: "starting the orchestrator thread".into(),
            source: e,
        })?;
    Ok(())
}

/// What [`launch`] starts on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchPlan {
    /// Processes (ranks) on this node.
    pub nproc: usize,
    /// Nodes in the run.
    pub nnodes: usize,
    /// This node's index.
    pub node_rank: usize,
    /// `host:port` of the rendezvous on rank 0 (node 0's first process).
    pub master: String,
}

impl LaunchPlan {
    /// The master's host and port.
    pub fn master_host_port(&self) -> Result<(String, u16)> {
        let (host, port) = self.master.rsplit_once(':').ok_or_else(|| {
            DistError::Config(format!("--master {} is not HOST:PORT", self.master))
        })?;
        let port = parse("the master port", port)?;
        Ok((host.trim_matches(['[', ']']).to_owned(), port))
    }

    /// Checks the plan.
    pub fn validate(&self) -> Result<()> {
        if self.nproc == 0 || self.nnodes == 0 || self.node_rank >= self.nnodes {
            return Err(DistError::Config(format!(
                "--nproc {} --nnodes {} --node-rank {}: need at least one process and node, and \
                 a node rank below the number of nodes",
                self.nproc, self.nnodes, self.node_rank
            )));
        }
        self.master_host_port().map(drop)
    }
}

/// How a launched run ended.
#[derive(Debug)]
pub enum LaunchOutcome {
    /// Every rank exited successfully.
    Success,
    /// A rank failed first (its rank and exit status); the others were stopped.
    RankFailed {
        /// The rank.
        rank: usize,
        /// Its exit status.
        status: ExitStatus,
    },
}

fn describe(status: &ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return format!("was killed by signal {sig}");
        }
    }
    match status.code() {
        Some(c) => format!("exited with status {c}"),
        None => "exited".into(),
    }
}

impl LaunchOutcome {
    /// A sentence for the user.
    pub fn message(&self) -> String {
        match self {
            Self::Success => "every rank finished".into(),
            Self::RankFailed { rank, status } => {
                format!(
                    "rank {rank} {}; the other ranks were stopped",
                    describe(status)
                )
            }
        }
    }
}

/// Starts `plan.nproc` copies of `command` (program and arguments) on this node, each with the
/// torchrun environment and `threads` compute threads (`RAYON_NUM_THREADS`), and waits for them.
/// When one exits unsuccessfully the others get SIGTERM, then SIGKILL after `grace`. `forward`
/// is polled: when it returns a signal number, that signal is passed to every rank.
pub fn launch(
    command: &[String],
    plan: &LaunchPlan,
    threads: usize,
    grace: Duration,
    mut forward: impl FnMut() -> Option<i32>,
) -> Result<LaunchOutcome> {
    plan.validate()?;
    let (host, port) = plan.master_host_port()?;
    let (program, args) = command
        .split_first()
        .ok_or_else(|| DistError::Config("nothing to launch".into()))?;
    let world = plan.nproc * plan.nnodes;
    let mut children: Vec<(usize, Child)> = Vec::new();
    for local in 0..plan.nproc {
        let rank = plan.node_rank * plan.nproc + local;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("LOCAL_WORLD_SIZE", plan.nproc.to_string())
            .env("MASTER_ADDR", &host)
            .env("MASTER_PORT", port.to_string());
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            cmd.env("RAYON_NUM_THREADS", threads.max(1).to_string());
        }
        match cmd.spawn() {
            Ok(child) => children.push((rank, child)),
            Err(e) => {
                stop_all(&mut children, grace);
                return Err(DistError::Network {
                    what: format!("starting rank {rank} ({program})"),
                    source: e,
                });
            }
        }
    }
    let mut running: Vec<(usize, Child)> = children;
    loop {
        if let Some(sig) = forward() {
            for (_, c) in &running {
                signal(c, sig);
            }
        }
        let mut i = 0;
        while i < running.len() {
            match running[i].1.try_wait() {
                Ok(Some(status)) => {
                    let (rank, _) = running.remove(i);
                    if !status.success() {
                        stop_all(&mut running, grace);
                        return Ok(LaunchOutcome::RankFailed { rank, status });
                    }
                }
                Ok(None) => i += 1,
                Err(e) => {
                    let rank = running[i].0;
                    stop_all(&mut running, grace);
                    return Err(DistError::Rank {
                        rank,
                        reason: format!("could not be waited for: {e}"),
                    });
                }
            }
        }
        if running.is_empty() {
            return Ok(LaunchOutcome::Success);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(unix)]
fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid with a plain signal number touches no memory.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

#[cfg(not(unix))]
fn signal(_child: &Child, _sig: i32) {}

/// SIGTERM to every child, SIGKILL to those still running after `grace`, then reaps them.
fn stop_all(children: &mut Vec<(usize, Child)>, grace: Duration) {
    for (_, c) in children.iter() {
        signal(c, SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline
        && children
            .iter_mut()
            .any(|(_, c)| matches!(c.try_wait(), Ok(None)))
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    for (_, c) in children.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
    children.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_and_environments_are_checked() {
        let plan = LaunchPlan {
            nproc: 2,
            nnodes: 2,
            node_rank: 1,
            master: "10.0.0.1:29500".into(),
        };
        assert!(plan.validate().is_ok());
        assert_eq!(plan.master_host_port().unwrap(), ("10.0.0.1".into(), 29500));
        let bad = LaunchPlan {
            node_rank: 2,
            ..plan.clone()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("node rank")
        );
        let no_port = LaunchPlan {
            master: "localhost".into(),
            ..plan
        };
        assert!(
            no_port
                .validate()
                .unwrap_err()
                .to_string()
                .contains("HOST:PORT")
        );
        let env = ProcessGroupEnv {
            rank: 3,
            world_size: 2,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: 29500,
        };
        assert!(env.validate().unwrap_err().to_string().contains("RANK=3"));
    }

    #[test]
    fn a_port_in_use_is_named() {
        let taken = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = taken.local_addr().unwrap().port();
        let err = check_port_free("127.0.0.1", port, "the rendezvous").unwrap_err();
        assert!(err.to_string().contains(&format!("port {port}")), "{err}");
    }
}
