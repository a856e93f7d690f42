//! The rendezvous on rank 0 (`MASTER_ADDR:MASTER_PORT`, TCP): every rank checks in with its rank,
//! world size and a fingerprint of its config before any collective starts, so a wrong world
//! size, a duplicate rank or a different config on one rank is a clear error up front. The
//! connections then stay open as a watchdog: when a rank dies (its socket closes, or it sends
//! nothing for [`SILENCE`]), every other rank learns which one, and stops, instead of waiting
//! forever in an all-reduce.

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{DistError, Result};
use crate::launch::ProcessGroupEnv;

/// A rank that says nothing (not even a heartbeat) for this long is taken for dead.
pub const SILENCE: Duration = Duration::from_secs(20);
/// How often each side sends a heartbeat.
const HEARTBEAT: Duration = Duration::from_secs(3);

/// What a rank says when it checks in.
#[derive(Serialize, Deserialize)]
struct Hello {
    rank: usize,
    world_size: usize,
    config: String,
    /// Where the rank's tensor data service listens (`host:port`).
    address: String,
}

/// What rank 0 answers, and the messages after it.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Message {
    /// Every rank checked in: their data-service addresses, in rank order.
    Ok(Vec<String>),
    Error(String),
    Abort(String),
    Ping,
    Done,
}

/// Called once, from a watchdog thread, when another rank fails: the CLI prints it and exits
/// (a rank blocked in a collective cannot be unblocked otherwise).
pub type FailureHandler = Arc<dyn Fn(DistError) + Send + Sync>;

/// This rank's membership in the run's rendezvous.
pub struct Rendezvous {
    finished: Arc<AtomicBool>,
    /// Rank 0: one stream per other rank; others: the stream to rank 0.
    streams: Vec<Arc<Mutex<TcpStream>>>,
    /// Every rank's data-service address, in rank order.
    addresses: Vec<String>,
}

/// FNV-1a of `text`, as hex: the config fingerprint ranks compare.
pub fn fingerprint(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn send(stream: &Mutex<TcpStream>, message: &Message) -> std::io::Result<()> {
    let mut line = serde_json::to_string(message).map_err(std::io::Error::other)?;
    line.push('\n');
    let mut s = stream.lock().unwrap_or_else(|e| e.into_inner());
    s.write_all(line.as_bytes())
}

fn net(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DistError {
    let what = what.into();
    move |source| DistError::Network { what, source }
}

impl Rendezvous {
    /// Checks in as `env.rank` with `config` (a fingerprint of the run's settings) and the
    /// address of its tensor data service, waiting up to `timeout` for every rank; rank 0
    /// listens, the others connect. `on_failure` runs when another rank dies later.
    pub fn join(
        env: &ProcessGroupEnv,
        config: &str,
        address: &str,
        timeout: Duration,
        on_failure: FailureHandler,
    ) -> Result<Self> {
        let finished = Arc::new(AtomicBool::new(false));
        let hello = Hello {
            rank: env.rank,
            world_size: env.world_size,
            config: config.to_owned(),
            address: address.to_owned(),
        };
        let (streams, addresses) = if env.rank == 0 {
            Self::host(env, hello, timeout)?
        } else {
            let (stream, addresses) = Self::connect(env, &hello, timeout)?;
            (vec![stream], addresses)
        };
        let me = Self {
            finished,
            streams,
            addresses,
        };
        me.watch(env.rank, on_failure);
        Ok(me)
    }

    /// Every rank's data-service address, in rank order (for point-to-point transfers).
    pub fn addresses(&self) -> &[String] {
        &self.addresses
    }

    #[allow(clippy::type_complexity)]
    fn host(
        env: &ProcessGroupEnv,
        own: Hello,
        timeout: Duration,
    ) -> Result<(Vec<Arc<Mutex<TcpStream>>>, Vec<String>)> {
        let config = own.config.as_str();
        let mut addresses = vec![String::new(); env.world_size];
        addresses[0] = own.address.clone();
        let listener = TcpListener::bind((env.master_addr.as_str(), env.master_port)).map_err(net(
            format!(
                "rank 0 listening for the other ranks on {}:{} (port in use? pick another with --master HOST:PORT)",
                env.master_addr, env.master_port
            ),
        ))?;
        listener
            .set_nonblocking(true)
            .map_err(net("rendezvous socket"))?;
        let deadline = Instant::now() + timeout;
        let mut joined: Vec<Option<TcpStream>> = (0..env.world_size).map(|_| None).collect();
        let mut problems = Vec::new();
        while joined.iter().skip(1).any(Option::is_none) {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream
                        .set_nonblocking(false)
                        .map_err(net("rendezvous socket"))?;
                    stream
                        .set_read_timeout(Some(Duration::from_secs(10)))
                        .map_err(net("rendezvous socket"))?;
                    let mut line = String::new();
                    BufReader::new(&stream)
                        .read_line(&mut line)
                        .map_err(net("reading a rank's check-in"))?;
                    let hello: Hello = serde_json::from_str(&line).map_err(|e| {
                        DistError::Config(format!("a malformed check-in at the rendezvous: {e}"))
                    })?;
                    if hello.world_size != env.world_size {
                        problems.push(format!(
                            "rank {} has WORLD_SIZE={}, rank 0 has {}",
                            hello.rank, hello.world_size, env.world_size
                        ));
                    } else if hello.rank == 0 || hello.rank >= env.world_size {
                        problems.push(format!("a second rank {} checked in", hello.rank));
                    } else if joined[hello.rank].is_some() {
                        problems.push(format!("rank {} checked in twice", hello.rank));
                    } else if hello.config != config {
                        problems.push(format!(
                            "rank {}'s training config differs from rank 0's (give every rank the same config)",
                            hello.rank
                        ));
                    }
                    let rank = hello.rank.min(env.world_size - 1);
                    if joined[rank].is_none() && rank != 0 {
                        joined[rank] = Some(stream);
                        addresses[rank] = hello.address;
                    }
                    if !problems.is_empty() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        let missing: Vec<String> = joined
                            .iter()
                            .enumerate()
                            .skip(1)
                            .filter(|(_, s)| s.is_none())
                            .map(|(r, _)| r.to_string())
                            .collect();
                        problems.push(format!(
                            "rank(s) {} did not reach the rendezvous at {}:{} within {}s",
                            missing.join(", "),
                            env.master_addr,
                            env.master_port,
                            timeout.as_secs()
                        ));
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(net("accepting a rank at the rendezvous")(e)),
            }
        }
        let streams: Vec<Arc<Mutex<TcpStream>>> = joined
            .into_iter()
            .flatten()
            .map(|s| Arc::new(Mutex::new(s)))
            .collect();
        let answer = match problems.first() {
            Some(p) => Message::Error(p.clone()),
            None => Message::Ok(addresses.clone()),
        };
        for s in &streams {
            let _ = send(s, &answer);
        }
        match problems.into_iter().next() {
            Some(p) => Err(DistError::Config(p)),
            None => Ok((streams, addresses)),
        }
    }

    fn connect(
        env: &ProcessGroupEnv,
        hello: &Hello,
        timeout: Duration,
    ) -> Result<(Arc<Mutex<TcpStream>>, Vec<String>)> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match TcpStream::connect((env.master_addr.as_str(), env.master_port)) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(net(format!(
                        "rank {} could not reach the master {}:{} within {}s",
                        env.rank,
                        env.master_addr,
                        env.master_port,
                        timeout.as_secs()
                    ))(e));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        let mut line =
            serde_json::to_string(hello).map_err(|e| DistError::Config(e.to_string()))?;
        line.push('\n');
        (&stream)
            .write_all(line.as_bytes())
            .map_err(net("checking in at the rendezvous"))?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(net("rendezvous socket"))?;
        let mut answer = String::new();
        BufReader::new(&stream)
            .read_line(&mut answer)
            .map_err(net("waiting for rank 0's answer"))?;
        match serde_json::from_str::<Message>(&answer) {
            Ok(Message::Ok(addresses)) if addresses.len() == env.world_size => {
                Ok((Arc::new(Mutex::new(stream)), addresses))
            }
            Ok(Message::Error(e)) => Err(DistError::Config(e)),
            _ => Err(DistError::Rank {
                rank: 0,
                reason: "closed the rendezvous before answering".into(),
            }),
        }
    }

    /// Heartbeats out, and a watchdog thread per connection.
    fn watch(&self, rank: usize, on_failure: FailureHandler) {
        let others: Vec<usize> = if rank == 0 {
            (1..=self.streams.len()).collect()
        } else {
            vec![0]
        };
        for (stream, peer) in self.streams.iter().zip(others) {
            let beat = Arc::clone(stream);
            let finished = Arc::clone(&self.finished);
            std::thread::spawn(move || {
                while !finished.load(Ordering::SeqCst) && send(&beat, &Message::Ping).is_ok() {
                    std::thread::sleep(HEARTBEAT);
                }
            });
            let reader = stream.lock().unwrap_or_else(|e| e.into_inner()).try_clone();
            let Ok(reader) = reader else { continue };
            let _ = reader.set_read_timeout(Some(SILENCE));
            let finished = Arc::clone(&self.finished);
            let all = self.streams.clone();
            let on_failure = Arc::clone(&on_failure);
            std::thread::spawn(move || {
                let mut lines = BufReader::new(reader);
                let mut line = String::new();
                let reason = loop {
                    line.clear();
                    match lines.read_line(&mut line) {
                        Ok(0) => break format!("rank {peer} stopped (its connection closed)"),
                        Ok(_) => match serde_json::from_str::<Message>(&line) {
                            Ok(Message::Done) => return,
                            Ok(Message::Abort(why)) => break why,
                            _ => {}
                        },
                        Err(e) => break format!("rank {peer} went silent ({e})"),
                    }
                };
                if finished.load(Ordering::SeqCst) {
                    return;
                }
                // Rank 0 tells everyone else which rank failed.
                if rank == 0 {
                    for s in &all {
                        let _ = send(s, &Message::Abort(reason.clone()));
                    }
                }
                on_failure(DistError::Rank {
                    rank: peer,
                    reason: reason
                        .strip_prefix(&format!("rank {peer} "))
                        .unwrap_or(&reason)
                        .to_owned(),
                });
            });
        }
    }

    /// Leaves the rendezvous after a successful run (the others stop watching this rank).
    pub fn finish(&self) {
        self.finished.store(true, Ordering::SeqCst);
        for s in &self.streams {
            let _ = send(s, &Message::Done);
            let _ = s
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .shutdown(Shutdown::Write);
        }
    }
}
