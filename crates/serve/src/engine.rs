//! The engine: a scheduler thread that owns the model and runs continuous batching.
//!
//! Requests wait in a bounded queue. Each scheduler iteration admits waiting requests into free
//! cache rows (up to the batch limit), runs one prefill chunk for the requests still reading their
//! prompts (several prompts share the chunk's token budget), then one decode step for every request
//! that is generating — each with its own sampler and stop rules. Finished, timed-out and
//! abandoned requests (their client went away) leave the batch at once and free their rows.
//! Long prompts are read a chunk at a time, so they never stall the sequences already decoding for
//! more than one chunk.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use burn::tensor::backend::Backend;
use kiln_bpe::Tokenizer;
use kiln_transformer::{
    FinishReason, GenerateParams, KvCache, Logits, ModelError, Piece, Sequence, Transformer,
    logits_rows, token_rows,
};
use tokio::sync::mpsc::UnboundedSender;

use crate::metrics::Metrics;

/// How the scheduler batches work.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Most sequences in the running batch (1 = one request at a time).
    pub max_batch_size: usize,
    /// Most requests waiting for a slot; more are refused.
    pub max_queue: usize,
    /// Tokens each sequence may hold (prompt + generation), at most the model's context.
    pub context: usize,
    /// Prompt tokens read per scheduler iteration, shared by the prompts being read.
    pub prefill_chunk: usize,
    /// A request still running after this long ends with a timeout error.
    pub request_timeout: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch_size: 16,
            max_queue: 256,
            context: 2048,
            prefill_chunk: 256,
            request_timeout: Duration::from_secs(600),
        }
    }
}

/// What the engine sends back about a request, in order: pieces, then one `Done` or `Failed`.
#[derive(Debug)]
pub enum Event {
    /// Newly generated tokens and the text they release.
    Piece(Piece),
    /// Generation ended.
    Done(Completion),
    /// Generation stopped with an error (timeout, shutdown, model error).
    Failed(EngineError),
}

/// Summary of a finished generation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    /// `stop` or `length`.
    pub finish: FinishReason,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
}

/// Why the engine refused or ended a request.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum EngineError {
    /// The waiting queue is full.
    #[error("the server is busy: {0} requests are already waiting; retry later")]
    QueueFull(usize),
    /// The engine is shutting down.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The request ran past the per-request timeout.
    #[error("the request did not finish within {0:?}")]
    Timeout(Duration),
    /// The model failed on this request.
    #[error("generation failed: {0}")]
    Model(String),
}

/// One generation request, as the HTTP layer hands it to the engine.
#[derive(Debug)]
pub struct Request {
    /// Prompt token ids (checked against the context by the caller).
    pub prompt: Vec<u32>,
    /// Sampling and stop rules.
    pub params: GenerateParams,
    /// Where events go; when its receiver is dropped the request is cancelled.
    pub events: UnboundedSender<Event>,
}

/// A cloneable handle for submitting requests to the scheduler thread.
#[derive(Clone)]
pub struct EngineHandle {
    sender: SyncSender<Request>,
    shared: Arc<Shared>,
}

struct Shared {
    metrics: Arc<Metrics>,
    max_queue: usize,
    cancel_all: AtomicBool,
}

impl EngineHandle {
    /// Queues `request`; refuses it at once when the queue is full or the engine has stopped.
    pub fn submit(&self, request: Request) -> Result<(), EngineError> {
        let queued = self.shared.metrics.queue_depth();
        if queued >= self.shared.max_queue {
            return Err(EngineError::QueueFull(queued));
        }
        self.shared.metrics.enqueued();
        match self.sender.try_send(request) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                self.shared.metrics.dequeued();
                Err(EngineError::QueueFull(self.shared.max_queue))
            }
            Err(TrySendError::Disconnected(_)) => {
                self.shared.metrics.dequeued();
                Err(EngineError::ShuttingDown)
            }
        }
    }

    /// Ends every running and waiting request with [`EngineError::ShuttingDown`].
    pub fn cancel_all(&self) {
        self.shared.cancel_all.store(true, Ordering::SeqCst);
    }
}

/// The scheduler thread; dropping every [`EngineHandle`] and then calling [`Engine::join`] stops it.
pub struct Engine {
    thread: JoinHandle<()>,
}

impl Engine {
    /// Starts the scheduler thread with `model`; returns it and a handle for submitting requests.
    pub fn start<B: Backend>(
        model: Transformer<B>,
        tokenizer: Tokenizer,
        config: EngineConfig,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, EngineHandle), ModelError>
    where
        Transformer<B>: Send + 'static,
    {
        let context = config.context.min(model.config().context_length);
        let device = model.tok_emb.weight.device();
        let cache = KvCache::on_demand(model.config(), config.max_batch_size, context, &device)?;
        let (sender, receiver) = sync_channel(config.max_queue.max(1));
        let shared = Arc::new(Shared {
            metrics,
            max_queue: config.max_queue,
            cancel_all: AtomicBool::new(false),
        });
        let mut scheduler = Scheduler {
            model,
            tokenizer,
            cache,
            config,
            receiver,
            shared: shared.clone(),
            waiting: VecDeque::new(),
            slots: Vec::new(),
        };
        scheduler
            .slots
            .resize_with(scheduler.config.max_batch_size, || None);
        let thread = std::thread::Builder::new()
            .name("kiln-engine".into())
            .spawn(move || scheduler.run())
            .map_err(|e| ModelError::InvalidArgument(format!("starting the engine thread: {e}")))?;
        Ok((Self { thread }, EngineHandle { sender, shared }))
    }

    /// Waits for the scheduler thread to finish (after every handle is dropped).
    pub fn join(self) {
        let _ = self.thread.join();
    }
}

/// A request holding a cache row.
struct Active {
    sequence: Sequence,
    events: UnboundedSender<Event>,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    started: Instant,
    first_token: Option<Instant>,
}

impl Active {
    fn prompt_left(&self) -> usize {
        self.sequence.prompt().len() - self.prefilled
    }
}

struct Scheduler<B: Backend> {
    model: Transformer<B>,
    tokenizer: Tokenizer,
    cache: KvCache<B>,
    config: EngineConfig,
    receiver: Receiver<Request>,
    shared: Arc<Shared>,
    waiting: VecDeque<(Request, Instant)>,
    /// Cache row → the request using it.
    slots: Vec<Option<Active>>,
}

impl<B: Backend> Scheduler<B> {
    fn run(&mut self) {
        let mut open = true;
        while open || !self.waiting.is_empty() || self.slots.iter().any(Option::is_some) {
            open = self.intake(open);
            if self.shared.cancel_all.load(Ordering::SeqCst) {
                self.fail_everything(EngineError::ShuttingDown);
                continue;
            }
            self.admit();
            self.drop_abandoned();
            self.prefill_step();
            self.decode_step();
            let running = self.slots.iter().filter(|s| s.is_some()).count();
            self.shared.metrics.set_running(running);
        }
    }

    /// Moves submitted requests into the waiting list; blocks while there is nothing to do.
    /// Returns whether the submission channel is still open.
    fn intake(&mut self, open: bool) -> bool {
        if !open {
            return false;
        }
        let idle = self.waiting.is_empty() && self.slots.iter().all(Option::is_none);
        if idle {
            match self.receiver.recv_timeout(Duration::from_millis(100)) {
                Ok(request) => self.waiting.push_back((request, Instant::now())),
                Err(RecvTimeoutError::Timeout) => return true,
                Err(RecvTimeoutError::Disconnected) => return false,
            }
        }
        loop {
            match self.receiver.try_recv() {
                Ok(request) => self.waiting.push_back((request, Instant::now())),
                Err(std::sync::mpsc::TryRecvError::Empty) => return true,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return false,
            }
        }
    }

    /// Gives free rows to waiting requests, oldest first.
    fn admit(&mut self) {
        while let Some(row) = self.slots.iter().position(Option::is_none) {
            let Some((request, queued)) = self.waiting.pop_front() else {
                break;
            };
            self.shared.metrics.dequeued();
            if request.events.is_closed() {
                continue;
            }
            let model = self.model.config();
            match Sequence::new(
                &request.prompt,
                request.params,
                model.vocab_size,
                self.cache.capacity(),
            ) {
                Ok(sequence) => {
                    self.cache.reset(row);
                    self.slots[row] = Some(Active {
                        sequence,
                        events: request.events,
                        prefilled: 0,
                        started: queued,
                        first_token: None,
                    });
                }
                Err(e) => {
                    let _ = request
                        .events
                        .send(Event::Failed(EngineError::Model(e.to_string())));
                }
            }
        }
    }

    /// Frees the rows of requests whose client went away or whose time ran out.
    fn drop_abandoned(&mut self) {
        let timeout = self.config.request_timeout;
        for row in 0..self.slots.len() {
            let Some(active) = &self.slots[row] else {
                continue;
            };
            if active.events.is_closed() {
                self.shared.metrics.cancelled();
                self.free(row);
            } else if active.started.elapsed() > timeout {
                let _ = active
                    .events
                    .send(Event::Failed(EngineError::Timeout(timeout)));
                self.shared.metrics.failed();
                self.free(row);
            }
        }
        let now = Instant::now();
        self.waiting.retain(|(request, queued)| {
            let keep = !request.events.is_closed() && now.duration_since(*queued) <= timeout;
            if !keep {
                let _ = request
                    .events
                    .send(Event::Failed(EngineError::Timeout(timeout)));
                self.shared.metrics.dequeued();
            }
            keep
        });
    }

    fn free(&mut self, row: usize) {
        self.slots[row] = None;
        self.cache.reset(row);
    }

    fn fail_everything(&mut self, error: EngineError) {
        for (request, _) in self.waiting.drain(..) {
            let _ = request.events.send(Event::Failed(error.clone()));
            self.shared.metrics.dequeued();
        }
        for row in 0..self.slots.len() {
            if let Some(active) = &self.slots[row] {
                let _ = active.events.send(Event::Failed(error.clone()));
                self.free(row);
            }
        }
        while let Ok(request) = self.receiver.try_recv() {
            let _ = request.events.send(Event::Failed(error.clone()));
            self.shared.metrics.dequeued();
        }
    }

    /// Reads the next chunk of the prompts still being read. Prompts join the chunk oldest first
    /// while the padded chunk (`rows × longest piece`) fits the token budget.
    fn prefill_step(&mut self) {
        let budget = self.config.prefill_chunk.max(1);
        let mut rows: Vec<usize> = Vec::new();
        let mut width = 0;
        let mut order: Vec<(Instant, usize)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(row, s)| {
                s.as_ref()
                    .filter(|a| a.prompt_left() > 0)
                    .map(|a| (a.started, row))
            })
            .collect();
        order.sort();
        for (_, row) in order {
            let Some(active) = &self.slots[row] else {
                continue;
            };
            let piece = active.prompt_left().min(budget);
            let new_width = width.max(piece);
            let fits_cache = self.cache.lens()[row] + new_width <= self.cache.capacity()
                && rows
                    .iter()
                    .all(|&r| self.cache.lens()[r] + new_width <= self.cache.capacity());
            if !rows.is_empty() && ((rows.len() + 1) * new_width > budget || !fits_cache) {
                break;
            }
            rows.push(row);
            width = new_width;
        }
        if rows.is_empty() {
            return;
        }
        let mut tokens: Vec<Vec<u32>> = Vec::with_capacity(rows.len());
        let mut valid = Vec::with_capacity(rows.len());
        for &row in &rows {
            let active = self.slots[row].as_ref().expect("selected rows are active");
            let start = active.prefilled;
            let n = active.prompt_left().min(width);
            let mut chunk = active.sequence.prompt()[start..start + n].to_vec();
            chunk.resize(width, 0);
            tokens.push(chunk);
            valid.push(n);
        }
        let result = self.forward(&rows, &tokens, Some(&valid));
        for (i, &row) in rows.iter().enumerate() {
            if let Some(active) = self.slots[row].as_mut() {
                active.prefilled += valid[i];
                self.shared.metrics.prompt_tokens(valid[i]);
            }
        }
        match result {
            Ok(logits) => {
                for (&row, logits) in rows.iter().zip(logits) {
                    let done = self.slots[row]
                        .as_ref()
                        .is_some_and(|a| a.prompt_left() == 0);
                    if done {
                        self.deliver(row, &logits);
                    }
                }
            }
            Err(e) => self.fail_rows(&rows, e),
        }
    }

    /// One token for every sequence that is generating.
    fn decode_step(&mut self) {
        let mut rows = Vec::new();
        let mut tokens = Vec::new();
        for (row, slot) in self.slots.iter().enumerate() {
            let Some(active) = slot else { continue };
            if active.prompt_left() > 0 {
                continue;
            }
            if let Some(id) = active.sequence.pending() {
                rows.push(row);
                tokens.push(vec![id]);
            }
        }
        let (mut full, mut ready) = (Vec::new(), Vec::new());
        for (row, token) in rows.into_iter().zip(tokens) {
            if self.cache.lens()[row] >= self.cache.capacity() {
                full.push(row);
            } else {
                ready.push((row, token));
            }
        }
        for row in full {
            if let Some(active) = self.slots[row].as_mut() {
                let piece = active.sequence.end(FinishReason::Length, Vec::new());
                if let Some(piece) = piece {
                    let _ = active.events.send(Event::Piece(piece));
                }
            }
            self.finish_if_done(row);
        }
        if ready.is_empty() {
            return;
        }
        let (rows, tokens): (Vec<usize>, Vec<Vec<u32>>) = ready.into_iter().unzip();
        let started = Instant::now();
        match self.forward(&rows, &tokens, None) {
            Ok(logits) => {
                for (&row, logits) in rows.iter().zip(logits) {
                    self.deliver(row, &logits);
                }
                self.shared
                    .metrics
                    .decode_step(rows.len(), started.elapsed());
            }
            Err(e) => self.fail_rows(&rows, e),
        }
    }

    fn forward(
        &mut self,
        rows: &[usize],
        tokens: &[Vec<u32>],
        valid: Option<&[usize]>,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let device = self.model.tok_emb.weight.device();
        let slices: Vec<&[u32]> = tokens.iter().map(Vec::as_slice).collect();
        let input = token_rows::<B>(&slices, &device);
        let logits = self
            .model
            .forward_rows(input, &mut self.cache, rows, valid, Logits::Last)?;
        logits_rows(logits)
    }

    /// Samples row `row`'s next token from `logits` and sends what it releases.
    fn deliver(&mut self, row: usize, logits: &[f32]) {
        let Some(active) = self.slots[row].as_mut() else {
            return;
        };
        match active.sequence.accept(&self.tokenizer, logits) {
            Ok(piece) => {
                if active.first_token.is_none() {
                    let now = Instant::now();
                    active.first_token = Some(now);
                    self.shared
                        .metrics
                        .first_token(now.duration_since(active.started));
                }
                if let Some(piece) = piece {
                    self.shared.metrics.generated_tokens(piece.ids.len());
                    let _ = active.events.send(Event::Piece(piece));
                }
                self.finish_if_done(row);
            }
            Err(e) => self.fail_rows(&[row], e),
        }
    }

    /// Sends `Done` and frees the row if the sequence has finished.
    fn finish_if_done(&mut self, row: usize) {
        let Some(active) = &self.slots[row] else {
            return;
        };
        let Some(finish) = active.sequence.finish_reason() else {
            return;
        };
        let _ = active.events.send(Event::Done(Completion {
            finish,
            prompt_tokens: active.sequence.prompt().len(),
            completion_tokens: active.sequence.generated().len(),
        }));
        self.shared.metrics.completed(active.started.elapsed());
        self.free(row);
    }

    fn fail_rows(&mut self, rows: &[usize], error: ModelError) {
        for &row in rows {
            if let Some(active) = &self.slots[row] {
                let _ = active
                    .events
                    .send(Event::Failed(EngineError::Model(error.to_string())));
                self.shared.metrics.failed();
                self.free(row);
            }
        }
    }
}
