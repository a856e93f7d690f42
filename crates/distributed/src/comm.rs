//! One rank's handle on Burn's collective engine (`burn-collective`): ranks as threads of one
//! process, or as processes on one or many machines, and the operations data parallelism and ZeRO
//! need, all built on its public all-reduce.
//!
//! `burn-collective` 0.21 has no public reduce-scatter or all-gather, and its multi-node `reduce`
//! and `broadcast` are not implemented, so both are all-reduces here: a reduce-scatter is an
//! all-reduce of which each rank keeps its share, an all-gather an all-reduce of tensors that are
//! zero outside each rank's share (exact: `x + 0 = x`). Each moves the bytes of a full
//! all-reduce, twice those of the ring primitive it stands for (docs/distributed.md).

use std::str::FromStr;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use burn_collective::{CollectiveConfig, PeerId, ReduceOperation};

use crate::error::{DistError, Result};

/// Where the ranks of a multi-process run meet: the orchestrator, and this process's own data
/// service that the other ranks download tensors from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoints {
    /// `host:port` of the global orchestrator (run by rank 0).
    pub orchestrator: String,
    /// The host other ranks reach this process at.
    pub node_host: String,
    /// The port of this process's data service (it listens on every interface).
    pub data_port: u16,
}

/// How the ranks of a run are connected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Every rank is a thread of this process.
    Threads,
    /// One rank per process, through the orchestrator.
    Processes(Endpoints),
}

/// One rank of a collective group over the (non-autodiff) backend `B`. Dropping it leaves the
/// group.
pub struct Communicator<B: Backend> {
    peer: PeerId,
    rank: usize,
    world: usize,
    device: B::Device,
    registered: bool,
}

fn collective(e: burn_collective::CollectiveError) -> DistError {
    DistError::Collective(format!("{e:?}"))
}

impl<B: Backend> Communicator<B> {
    /// Joins the group as rank `rank` of `world` and waits until every rank has joined. With
    /// [`Transport::Threads`] the other ranks are threads of this process (each calls this with
    /// its own rank); with [`Transport::Processes`] each process is one rank and rank 0 runs the
    /// orchestrator ([`crate::launch::start_orchestrator`]).
    pub fn join(
        rank: usize,
        world: usize,
        device: B::Device,
        transport: &Transport,
    ) -> Result<Self> {
        if world == 0 || rank >= world {
            return Err(DistError::Config(format!(
                "rank {rank} is not in a world of {world}"
            )));
        }
        let peer = PeerId::from(rank as u32);
        let mut comm = Self {
            peer,
            rank,
            world,
            device: device.clone(),
            registered: false,
        };
        if world == 1 {
            return Ok(comm);
        }
        let config = match transport {
            Transport::Threads => CollectiveConfig::default().with_num_devices(world),
            Transport::Processes(e) => {
                let address = |text: String| {
                    burn_communication::Address::from_str(&text)
                        .map_err(|e| DistError::Config(format!("address {text}: {e}")))
                };
                CollectiveConfig::default()
                    .with_num_devices(1)
                    .with_num_nodes(world as u32)
                    .with_global_address(address(format!("ws://{}", e.orchestrator))?)
                    .with_node_address(address(format!("ws://{}:{}", e.node_host, e.data_port))?)
                    .with_data_service_port(e.data_port)
            }
        };
        burn_collective::register::<B>(peer, device, config).map_err(collective)?;
        comm.registered = true;
        Ok(comm)
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// The device this rank computes on.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// The element-wise sum of `tensor` over all ranks (every rank gets the same bits).
    pub fn all_reduce_sum(&self, tensor: Tensor<B, 1>) -> Result<Tensor<B, 1>> {
        if self.world == 1 {
            return Ok(tensor);
        }
        // Burn's multi-node ring splits the tensor into one slice per node: pad short ones.
        let len = tensor.dims()[0];
        let tensor = if len < self.world {
            let pad = Tensor::zeros([self.world - len], (&self.device, tensor.dtype()));
            Tensor::cat(vec![tensor, pad], 0)
        } else {
            tensor
        };
        let summed = burn_collective::all_reduce::<B>(
            self.peer,
            tensor.into_primitive().tensor(),
            ReduceOperation::Sum,
        )
        .map_err(collective)?;
        let summed = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(summed));
        Ok(if len < self.world {
            summed.slice(0..len)
        } else {
            summed
        })
    }

    /// Replaces each of `values` by its sum over all ranks, in f64.
    pub fn all_reduce_values(&self, values: &mut [f64]) -> Result<()> {
        if self.world == 1 || values.is_empty() {
            return Ok(());
        }
        let tensor = Tensor::<B, 1>::from_data(
            TensorData::new(values.to_vec(), [values.len()]),
            (&self.device, DType::F64),
        );
        let summed = self.all_reduce_sum(tensor)?.into_data();
        let summed = summed
            .convert::<f64>()
            .into_vec::<f64>()
            .map_err(|e| DistError::Collective(format!("reduced values: {e:?}")))?;
        values.copy_from_slice(&summed);
        Ok(())
    }

    /// Waits until every rank gets here.
    pub fn barrier(&self) -> Result<()> {
        self.all_reduce_values(&mut [0.0])
    }
}

/// How long leaving the group may take before a dropped [`Communicator`] stops waiting.
const FINISH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl<B: Backend> Drop for Communicator<B> {
    fn drop(&mut self) {
        if !self.registered {
            return;
        }
        // burn-collective 0.21's multi-node finish sometimes waits forever for a node that has
        // already left (seen here: rank 0 of a finished `--nproc 2` run, after its last checkpoint):
        // leave from a helper thread and give up waiting after a while, so a finished rank exits.
        let peer = self.peer;
        let (done, finished) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("kiln-collective-finish".into())
            .spawn(move || {
                let _ = burn_collective::finish_collective::<B>(peer);
                let _ = done.send(());
            });
        if spawned.is_ok() && finished.recv_timeout(FINISH_TIMEOUT).is_err() {
            eprintln!(
                "kiln: rank {}: leaving the collective group took over {FINISH_TIMEOUT:?}; not waiting",
                self.rank
            );
        }
    }
}
