//! [`PeerNet`]: point-to-point tensor transfers between ranks, and collectives over any subset of
//! the ranks ([`Group`]), on `burn-communication`'s tensor data service, the layer
//! `burn-collective` itself moves tensors with.
//!
//! `burn-collective` 0.21 has one group per process and no point-to-point send or receive, and
//! pipeline stages, tensor-parallel groups and the data-parallel groups of a composed run each
//! need their own. Its data service has what they need: every rank serves the tensors it
//! *exposes* (`expose_data`, non-blocking) and *downloads* what a peer exposed (`download_tensor`,
//! which waits until the peer has exposed it). A send is an expose for one download, a receive a
//! download. Every message between two ranks carries the next number of that ordered pair, so two
//! ranks that make matching sends and receives in the same order always meet, and since a send
//! never blocks, no schedule in which every receive has a matching send can deadlock.
//!
//! A receive can be *posted* ahead of time ([`PeerNet::post_recv`]): it takes the pair's next
//! number at once and downloads in the background, on the runtime the data service already runs
//! on, so that the [`recv`](PeerNet::recv) that comes for it finds the tensor arrived. A download
//! asked for before its tensor is exposed is answered the moment it is, instead of a request and
//! a reply after the receiver gets there: a pipeline stage that knows its next receives from the
//! schedule takes the transfer off its critical path (Megatron's batched p2p does the same).
//!
//! Ranks that are threads of one process ([`thread_ranks`]) skip the network: a send puts the
//! tensor in the receiver's in-process mailbox, with the same numbering. Serializing a tensor
//! and a round trip through a local WebSocket cost a millisecond or more per message, which a
//! 1F1B pipeline pays on its critical path at every micro-batch unless the receive is posted.

use std::collections::{HashMap, VecDeque};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use burn_communication::Address;
use burn_communication::ProtocolServer;
use burn_communication::data_service::{TensorDataServer, TensorDataService};
use burn_communication::websocket::{WebSocket, WsServer};
use tokio_util::sync::CancellationToken;

use crate::error::{DistError, Result};

/// Ranks started in this process and not yet closed.
static LIVE_IN_PROCESS: AtomicU64 = AtomicU64::new(0);

/// How long a rank waits for a peer's data service to come up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

/// One rank's endpoint for point-to-point transfers: its own data service, and the addresses of
/// every rank's.
pub struct PeerNet<B: Backend> {
    rank: usize,
    addresses: Vec<String>,
    link: Link<B>,
    sent: Mutex<HashMap<usize, u64>>,
    received: Mutex<HashMap<usize, u64>>,
    posted: Mutex<HashMap<usize, VecDeque<Posted>>>,
    reachable: Mutex<Vec<bool>>,
    device: B::Device,
    bytes_sent: AtomicU64,
}

/// How a [`PeerNet`] reaches its peers.
enum Link<B: Backend> {
    /// `burn-communication`'s tensor data service over WebSocket (ranks in other processes).
    Service {
        service: Arc<TensorDataService<B, WebSocket>>,
        runtime: tokio::runtime::Runtime,
        cancel: CancellationToken,
        /// Sends handed to the runtime and not yet exposed.
        exposing: Arc<AtomicU64>,
    },
    /// Mailboxes shared by ranks that are threads of one process.
    Local(Arc<LocalHub>),
}

/// A receive under way in the background: message `seq` from its peer.
struct Posted {
    seq: u64,
    download: tokio::task::JoinHandle<Option<TensorData>>,
}

/// The in-process mailboxes of a set of thread ranks: messages keyed by transfer id, and the
/// ranks that have closed (a receive from one of them that finds nothing fails instead of
/// waiting forever).
#[derive(Default)]
pub(crate) struct LocalHub {
    state: Mutex<HubState>,
    arrived: Condvar,
}

#[derive(Default)]
struct HubState {
    messages: HashMap<u64, TensorData>,
    closed: Vec<usize>,
}

impl LocalHub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn put(&self, id: u64, data: TensorData) {
        self.lock().messages.insert(id, data);
        self.arrived.notify_all();
    }

    fn close(&self, rank: usize) {
        self.lock().closed.push(rank);
        self.arrived.notify_all();
    }

    /// Message `id` from `from`, once sent; `None` if `from` closed without sending it.
    fn take(&self, id: u64, from: usize) -> Option<TensorData> {
        let mut state = self.lock();
        loop {
            if let Some(data) = state.messages.remove(&id) {
                return Some(data);
            }
            if state.closed.contains(&from) {
                return None;
            }
            state = self.arrived.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl<B: Backend> std::fmt::Debug for PeerNet<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerNet")
            .field("rank", &self.rank)
            .field("ranks", &self.addresses.len())
            .finish()
    }
}

impl<B: Backend> PeerNet<B> {
    /// Starts rank `rank`'s data service on the port of `addresses[rank]` (`host:port` of every
    /// rank's service; it listens on every interface). Peers are contacted when first used.
    pub fn start(rank: usize, addresses: Vec<String>, device: B::Device) -> Result<Self> {
        let Some(own) = addresses.get(rank) else {
            return Err(DistError::Config(format!(
                "rank {rank} has no address among {} ranks",
                addresses.len()
            )));
        };
        let port = own
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .ok_or_else(|| DistError::Config(format!("address {own} has no port")))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kiln-p2p")
            .enable_all()
            .build()
            .map_err(|e| DistError::Collective(format!("p2p runtime: {e}")))?;
        let cancel = CancellationToken::new();
        let service = Arc::new(TensorDataService::<B, WebSocket>::new(cancel.clone()));
        let server = TensorDataServer::<B, WebSocket>::route_tensor_data_service(
            WsServer::new(port),
            Arc::clone(&service),
        );
        let shutdown = cancel.clone();
        runtime.spawn(async move {
            if let Err(e) = server
                .serve(async move { shutdown.cancelled().await })
                .await
            {
                eprintln!("kiln: p2p data service on port {port} stopped: {e:?}");
            }
        });
        Ok(Self::with_link(
            rank,
            addresses,
            Link::Service {
                service,
                runtime,
                cancel,
                exposing: Arc::new(AtomicU64::new(0)),
            },
            device,
        ))
    }

    /// Rank `rank` of `world` thread ranks sharing `hub`.
    pub(crate) fn start_local(
        rank: usize,
        world: usize,
        hub: Arc<LocalHub>,
        device: B::Device,
    ) -> Self {
        let addresses = (0..world).map(|r| format!("thread:{r}")).collect();
        Self::with_link(rank, addresses, Link::Local(hub), device)
    }

    fn with_link(rank: usize, addresses: Vec<String>, link: Link<B>, device: B::Device) -> Self {
        LIVE_IN_PROCESS.fetch_add(1, Ordering::Relaxed);
        let n = addresses.len();
        let mut reachable = vec![false; n];
        reachable[rank] = true;
        Self {
            rank,
            addresses,
            link,
            sent: Mutex::new(HashMap::new()),
            received: Mutex::new(HashMap::new()),
            posted: Mutex::new(HashMap::new()),
            reachable: Mutex::new(reachable),
            device,
            bytes_sent: AtomicU64::new(0),
        }
    }

    /// `n` addresses on 127.0.0.1 with ports that were free a moment ago: for ranks that are
    /// threads of one process.
    pub fn local_addresses(n: usize) -> Result<Vec<String>> {
        let listeners = (0..n)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| DistError::Config(format!("no free local port: {e}")))?;
        listeners
            .iter()
            .map(|l| {
                l.local_addr()
                    .map(|a| format!("127.0.0.1:{}", a.port()))
                    .map_err(|e| DistError::Config(format!("local port: {e}")))
            })
            .collect()
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.addresses.len()
    }

    /// The device tensors are received on.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// Whether other ranks run in this process (as threads): they then share Burn's autodiff
    /// bookkeeping, which locks every graph of the process after each backward pass.
    pub fn shares_process(&self) -> bool {
        LIVE_IN_PROCESS.load(Ordering::Relaxed) > 1
    }

    /// Bytes this rank has sent so far (tensor payloads).
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent.load(Ordering::Relaxed)
    }

    fn next(counters: &Mutex<HashMap<usize, u64>>, peer: usize) -> u64 {
        let mut map = counters.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(peer).or_insert(0);
        *n += 1;
        *n
    }

    /// The transfer id of message `seq` from `from` to `to`: unique among `from`'s exposed tensors.
    fn transfer_id(from: usize, to: usize, seq: u64) -> u64 {
        ((from as u64) << 48) | ((to as u64) << 32) | (seq & 0xFFFF_FFFF)
    }

    fn check_peer(&self, peer: usize) -> Result<()> {
        if peer >= self.addresses.len() || peer == self.rank {
            return Err(DistError::Config(format!(
                "rank {} cannot exchange tensors with rank {peer} of {}",
                self.rank,
                self.addresses.len()
            )));
        }
        Ok(())
    }

    /// Sends `data` to `to` (returns at once; the peer's matching [`recv`](Self::recv) gets it).
    /// Over the data service the tensor is serialized and exposed in the background, off the
    /// caller's thread; [`drain`](Self::drain) waits for it.
    pub fn send_data(&self, to: usize, data: TensorData) -> Result<()> {
        self.check_peer(to)?;
        let seq = Self::next(&self.sent, to);
        self.bytes_sent
            .fetch_add(data.bytes.len() as u64, Ordering::Relaxed);
        let id = Self::transfer_id(self.rank, to, seq);
        match &self.link {
            Link::Service {
                service,
                runtime,
                exposing,
                ..
            } => {
                let (service, exposing) = (Arc::clone(service), Arc::clone(exposing));
                exposing.fetch_add(1, Ordering::SeqCst);
                runtime.spawn(async move {
                    service.expose_data(data, 1, id.into()).await;
                    exposing.fetch_sub(1, Ordering::SeqCst);
                });
            }
            Link::Local(hub) => hub.put(id, data),
        }
        Ok(())
    }

    /// Posts the receive of the next tensor `from` sends: its download starts now, in the
    /// background, and the next [`recv_data`](Self::recv_data) from `from` returns it (posted
    /// receives are taken in the order they were posted, before any later message). Posting
    /// ahead does not change which tensor a receive gets, only when it travels. Between thread
    /// ranks (mailboxes) there is nothing to start, and this does nothing.
    pub fn post_recv(&self, from: usize) -> Result<()> {
        self.check_peer(from)?;
        let Link::Service {
            service, runtime, ..
        } = &self.link
        else {
            return Ok(());
        };
        self.wait_reachable(from)?;
        let address = Address::from_str(&format!("ws://{}", self.addresses[from]))
            .map_err(|e| DistError::Config(format!("address of rank {from}: {e}")))?;
        let seq = Self::next(&self.received, from);
        let id = Self::transfer_id(from, self.rank, seq);
        let service = Arc::clone(service);
        // A task of its own: the data service panics on a lost connection, which then ends this
        // download (an error for `recv_data`) rather than the caller.
        let download =
            runtime.spawn(async move { service.download_tensor(address, id.into()).await });
        self.lock_posted()
            .entry(from)
            .or_default()
            .push_back(Posted { seq, download });
        Ok(())
    }

    /// Receives posted and not yet taken, from every peer.
    pub fn posted_receives(&self) -> usize {
        self.lock_posted().values().map(VecDeque::len).sum()
    }

    fn lock_posted(&self) -> std::sync::MutexGuard<'_, HashMap<usize, VecDeque<Posted>>> {
        self.posted.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next tensor `from` sends this rank (waits for it).
    pub fn recv_data(&self, from: usize) -> Result<TensorData> {
        self.check_peer(from)?;
        let runtime = match &self.link {
            Link::Service { runtime, .. } => runtime,
            Link::Local(hub) => {
                let seq = Self::next(&self.received, from);
                return hub
                    .take(Self::transfer_id(from, self.rank, seq), from)
                    .ok_or_else(|| self.closed_early(from, seq));
            }
        };
        let posted = self
            .lock_posted()
            .get_mut(&from)
            .and_then(VecDeque::pop_front);
        let Posted { seq, download } = match posted {
            Some(posted) => posted,
            None => {
                self.post_recv(from)?;
                self.lock_posted()
                    .get_mut(&from)
                    .and_then(VecDeque::pop_front)
                    .ok_or_else(|| {
                        DistError::Collective(format!("the receive from rank {from} was lost"))
                    })?
            }
        };
        match runtime.block_on(download) {
            Ok(Some(data)) => Ok(data),
            Ok(None) => Err(self.closed_early(from, seq)),
            Err(e) => Err(DistError::Collective(format!(
                "downloading message {seq} from rank {from} to rank {} failed: {e}",
                self.rank
            ))),
        }
    }

    fn closed_early(&self, from: usize, seq: u64) -> DistError {
        DistError::Collective(format!(
            "rank {from} closed the connection before sending message {seq} to rank {}",
            self.rank
        ))
    }

    /// Sends `tensor` to `to`.
    pub fn send<const D: usize>(&self, to: usize, tensor: Tensor<B, D>) -> Result<()> {
        self.send_data(to, tensor.into_data())
    }

    /// The next tensor `from` sends, on this rank's device.
    pub fn recv<const D: usize>(&self, from: usize) -> Result<Tensor<B, D>> {
        let data = self.recv_data(from)?;
        if data.shape.len() != D {
            return Err(DistError::Collective(format!(
                "rank {from} sent a {}-dimensional tensor where {D} were expected",
                data.shape.len()
            )));
        }
        // Keep the sender's precision (a plain `from_data` converts to the default float type).
        let dtype = data.dtype;
        Ok(Tensor::from_data(data, (&self.device, dtype)))
    }

    /// Waits (up to half a minute) until the peers have downloaded everything this rank sent.
    /// A process must do this before it exits, or its last messages are lost; dropping the
    /// `PeerNet` does it too.
    pub fn drain(&self) {
        let Link::Service {
            service,
            runtime,
            exposing,
            ..
        } = &self.link
        else {
            return;
        };
        runtime.block_on(async {
            let started = Instant::now();
            loop {
                let pending = exposing.load(Ordering::SeqCst) > 0
                    || !service.exposed_tensors.lock().await.is_empty()
                    || service.sends_in_flight.load(Ordering::SeqCst) > 0;
                if !pending || started.elapsed() > DRAIN_TIMEOUT {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
    }

    /// Waits until `peer`'s data service accepts connections (the data service panics on a
    /// refused connection, so it is never asked to make one before this).
    fn wait_reachable(&self, peer: usize) -> Result<()> {
        if self.reachable.lock().unwrap_or_else(|p| p.into_inner())[peer] {
            return Ok(());
        }
        let address = &self.addresses[peer];
        let started = Instant::now();
        loop {
            let target = std::net::ToSocketAddrs::to_socket_addrs(address.as_str())
                .ok()
                .and_then(|mut a| a.next());
            if let Some(target) = target
                && std::net::TcpStream::connect_timeout(&target, Duration::from_secs(1)).is_ok()
            {
                self.reachable.lock().unwrap_or_else(|p| p.into_inner())[peer] = true;
                return Ok(());
            }
            if started.elapsed() > CONNECT_TIMEOUT {
                return Err(DistError::Collective(format!(
                    "rank {peer}'s data service at {address} did not answer within {CONNECT_TIMEOUT:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// How long a closing rank keeps serving tensors its peers have not downloaded yet.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

impl<B: Backend> Drop for PeerNet<B> {
    fn drop(&mut self) {
        LIVE_IN_PROCESS.fetch_sub(1, Ordering::Relaxed);
        self.drain();
        let posted: Vec<Posted> = self
            .lock_posted()
            .drain()
            .flat_map(|(_, queue)| queue)
            .collect();
        match &self.link {
            Link::Service {
                service,
                runtime,
                cancel,
                ..
            } => {
                // Receives posted and never taken wait on a connection that `close` needs.
                for Posted { download, .. } in posted {
                    download.abort();
                    let _ = runtime.block_on(download);
                }
                // In a task: closing a connection the peer already dropped panics in the data
                // service, and a drop must not.
                let service = Arc::clone(service);
                let _ = runtime.block_on(runtime.spawn(async move { service.close().await }));
                cancel.cancel();
            }
            Link::Local(hub) => hub.close(self.rank),
        }
    }
}

/// Runs `f` on `world` ranks that are threads of this process, each computing on its own rayon
/// pool with its share of the cores, exchanging tensors through in-process mailboxes (the way
/// tests, benchmarks and library users run small parallel jobs);
/// returns each rank's result in rank order. A rank that panics is reported as an error.
pub fn thread_ranks<B: Backend, T: Send>(
    world: usize,
    device: B::Device,
    f: impl Fn(Arc<PeerNet<B>>) -> T + Sync,
) -> Result<Vec<T>> {
    let hub = Arc::new(LocalHub::default());
    run_threads(
        world,
        |rank| {
            Ok(PeerNet::start_local(
                rank,
                world,
                Arc::clone(&hub),
                device.clone(),
            ))
        },
        f,
    )
}

/// Like [`thread_ranks`], but every rank runs its own data service on 127.0.0.1 and the ranks
/// talk through it, exactly as separate processes do (for testing that path in one process).
pub fn thread_ranks_over_loopback<B: Backend, T: Send>(
    world: usize,
    device: B::Device,
    f: impl Fn(Arc<PeerNet<B>>) -> T + Sync,
) -> Result<Vec<T>> {
    let addresses = PeerNet::<B>::local_addresses(world)?;
    run_threads(
        world,
        |rank| PeerNet::<B>::start(rank, addresses.clone(), device.clone()),
        f,
    )
}

fn run_threads<B: Backend, T: Send>(
    world: usize,
    start: impl Fn(usize) -> Result<PeerNet<B>> + Sync,
    f: impl Fn(Arc<PeerNet<B>>) -> T + Sync,
) -> Result<Vec<T>> {
    // Each rank computes on its own share of the cores, as a process started by the launcher
    // does: ranks sharing rayon's global pool would queue their kernels behind each other.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / world.max(1)).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let (start, f) = (&start, &f);
                s.spawn(move || {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .thread_name(move |i| format!("kiln-rank{rank}-{i}"))
                        .build()
                        .map_err(|e| DistError::Config(format!("rank {rank}'s threads: {e}")))?;
                    pool.install(|| start(rank).map(|n| f(Arc::new(n))))
                })
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(rank, h)| {
                h.join().unwrap_or_else(|_| {
                    Err(DistError::Rank {
                        rank,
                        reason: "panicked".into(),
                    })
                })
            })
            .collect()
    })
}

/// A set of ranks that run collectives together (a tensor-parallel group, the data-parallel
/// replicas of one shard, a pipeline, ...), over a [`PeerNet`].
#[derive(Clone, Debug)]
pub struct Group<B: Backend> {
    net: Arc<PeerNet<B>>,
    members: Vec<usize>,
    bytes_reduced: Arc<AtomicU64>,
}

impl<B: Backend> Group<B> {
    /// The group of `members` (global ranks; this rank must be one of them, and every member
    /// must list the same ranks in the same order).
    pub fn new(net: Arc<PeerNet<B>>, members: Vec<usize>) -> Result<Self> {
        if !members.contains(&net.rank()) || members.iter().any(|&m| m >= net.world_size()) {
            return Err(DistError::Config(format!(
                "rank {} cannot form a group of ranks {members:?}",
                net.rank()
            )));
        }
        Ok(Self {
            net,
            members,
            bytes_reduced: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Number of members.
    pub fn size(&self) -> usize {
        self.members.len()
    }

    /// This rank's position in the group.
    pub fn index(&self) -> usize {
        self.members
            .iter()
            .position(|&m| m == self.net.rank())
            .unwrap_or(0)
    }

    /// The members' global ranks.
    pub fn members(&self) -> &[usize] {
        &self.members
    }

    /// The transfers underneath.
    pub fn net(&self) -> &Arc<PeerNet<B>> {
        &self.net
    }

    /// Bytes of tensors this rank has all-reduced in the group so far (each counted once, the
    /// size of the tensor; what a ring all-reduce moves per rank is `2(n−1)/n` of it).
    pub fn bytes_reduced(&self) -> u64 {
        self.bytes_reduced.load(Ordering::Relaxed)
    }

    /// The element-wise sum of `tensor` over the group. Every member adds the same values in the
    /// same (member) order, so every member gets the same bits.
    pub fn all_reduce_sum<const D: usize>(&self, tensor: Tensor<B, D>) -> Result<Tensor<B, D>> {
        if self.members.len() == 1 {
            return Ok(tensor);
        }
        let dtype = tensor.dtype();
        self.bytes_reduced.fetch_add(
            (tensor.shape().num_elements() * dtype.size()) as u64,
            Ordering::Relaxed,
        );
        let mine = tensor.clone().into_data();
        for &m in &self.members {
            if m != self.net.rank() {
                self.net.send_data(m, mine.clone())?;
            }
        }
        let mut sum: Option<Tensor<B, D>> = None;
        for &m in &self.members {
            let part = if m == self.net.rank() {
                tensor.clone()
            } else {
                self.net.recv::<D>(m)?.cast(dtype)
            };
            sum = Some(match sum {
                None => part,
                Some(s) => s + part,
            });
        }
        Ok(sum.unwrap_or(tensor))
    }

    /// Every member's `tensor`, in member order (all the same shape).
    pub fn all_gather<const D: usize>(&self, tensor: Tensor<B, D>) -> Result<Vec<Tensor<B, D>>> {
        if self.members.len() == 1 {
            return Ok(vec![tensor]);
        }
        let mine = tensor.clone().into_data();
        for &m in &self.members {
            if m != self.net.rank() {
                self.net.send_data(m, mine.clone())?;
            }
        }
        self.members
            .iter()
            .map(|&m| {
                if m == self.net.rank() {
                    Ok(tensor.clone())
                } else {
                    self.net.recv::<D>(m)
                }
            })
            .collect()
    }

    /// Waits until every member gets here.
    pub fn barrier(&self) -> Result<()> {
        self.all_reduce_values(&mut [0.0])
    }

    /// Replaces each of `values` by its sum over the group, in f64.
    pub fn all_reduce_values(&self, values: &mut [f64]) -> Result<()> {
        if self.members.len() == 1 || values.is_empty() {
            return Ok(());
        }
        let tensor = Tensor::<B, 1>::from_data(
            TensorData::new(values.to_vec(), [values.len()]),
            (self.net.device(), DType::F64),
        );
        let summed = self
            .all_reduce_sum(tensor)?
            .into_data()
            .convert::<f64>()
            .into_vec::<f64>()
            .map_err(|e| DistError::Collective(format!("reduced values: {e:?}")))?;
        values.copy_from_slice(&summed);
        Ok(())
    }
}
