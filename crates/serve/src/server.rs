//! The HTTP server: routes, authentication, request checks, streaming, graceful shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use burn::tensor::backend::Backend;
use futures_util::stream::{self, Stream, StreamExt};
use kiln_bpe::Tokenizer;
use kiln_transformer::chat::ChatTemplate;
use kiln_transformer::{GenerateParams, LoadedModel, Prompt, Transformer};
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use crate::api::{
    self, ChatRequest, Common, CompletionRequest, Endpoint, PromptInput, ResponseHeader,
};
use crate::engine::{
    Completion, Engine, EngineConfig, EngineError, EngineHandle, Event, Request as Job,
};
use crate::error::{ApiError, ServeError};
use crate::metrics::Metrics;

/// Completion tokens when a `/v1/completions` request gives no `max_tokens` (OpenAI's default).
const DEFAULT_COMPLETION_TOKENS: usize = 16;

/// How the server listens and what it accepts.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Address to bind (default `127.0.0.1`).
    pub host: String,
    /// Port (0 picks a free one).
    pub port: u16,
    /// The model's name in `/v1/models` and responses.
    pub model_name: String,
    /// When set, `/v1/*` requests need `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// After SIGINT/SIGTERM, how long in-flight requests may run before they are cancelled.
    pub shutdown_timeout: Duration,
    /// Scheduling.
    pub engine: EngineConfig,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8000,
            model_name: "kiln".into(),
            api_key: None,
            max_body_bytes: 2 << 20,
            shutdown_timeout: Duration::from_secs(30),
            engine: EngineConfig::default(),
        }
    }
}

struct AppState {
    engine: EngineHandle,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    model_name: String,
    context: usize,
    vocab_size: usize,
    api_key: Option<String>,
    max_body_bytes: usize,
    metrics: Arc<Metrics>,
    started: u64,
    next_id: AtomicU64,
}

type Shared = Arc<AppState>;

/// Serves `loaded` until SIGINT or SIGTERM; calls `on_ready` with the bound address once listening.
pub fn serve<B: Backend>(
    loaded: LoadedModel<B>,
    config: ServeConfig,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<(), ServeError>
where
    Transformer<B>: Send + 'static,
{
    if config.engine.max_batch_size == 0 || config.engine.max_queue == 0 {
        return Err(ServeError::Config(
            "--max-batch-size and --max-queue must be at least 1".into(),
        ));
    }
    let tokenizer = loaded.require_tokenizer()?.clone();
    let template = loaded.template()?;
    let model_config = loaded.model.config().clone();
    let context = config.engine.context.min(model_config.context_length);
    let metrics = Arc::new(Metrics::default());
    let engine_config = EngineConfig {
        context,
        ..config.engine.clone()
    };
    let (engine, handle) = Engine::start(
        loaded.model,
        tokenizer.clone(),
        engine_config,
        metrics.clone(),
    )?;
    let state = Arc::new(AppState {
        engine: handle.clone(),
        tokenizer,
        template,
        model_name: config.model_name.clone(),
        context,
        vocab_size: model_config.vocab_size,
        api_key: config.api_key.clone(),
        max_body_bytes: config.max_body_bytes,
        metrics,
        started: unix_now(),
        next_id: AtomicU64::new(0),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| io_error("starting the async runtime", e))?;
    let result = runtime.block_on(async move {
        let address = format!("{}:{}", config.host, config.port);
        let listener = tokio::net::TcpListener::bind(&address)
            .await
            .map_err(|e| io_error(&format!("binding {address}"), e))?;
        let local = listener
            .local_addr()
            .map_err(|e| io_error("reading the bound address", e))?;
        on_ready(local);
        let grace = config.shutdown_timeout;
        axum::serve(listener, router(state))
            .with_graceful_shutdown(async move {
                shutdown_signal().await;
                eprintln!(
                    "shutting down: finishing in-flight requests (at most {}s)",
                    grace.as_secs()
                );
                tokio::spawn(async move {
                    tokio::time::sleep(grace).await;
                    handle.cancel_all();
                });
            })
            .await
            .map_err(|e| io_error("serving", e))
    });
    engine.join();
    result
}

fn io_error(context: &str, source: std::io::Error) -> ServeError {
    ServeError::Io {
        context: context.to_owned(),
        source,
    }
}

async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {},
        () = terminate => {},
    }
}

fn router(state: Shared) -> Router {
    let v1 = Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(v1)
        .fallback(not_found)
        .with_state(state)
}

async fn authenticate(State(state): State<Shared>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            state.metrics.request(request.uri().path(), 401);
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(request).await
}

async fn health() -> impl IntoResponse {
    axum::Json(json!({"status": "ok"}))
}

async fn metrics(State(state): State<Shared>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::no_route(uri.path())
}

fn model_object(state: &AppState) -> Value {
    json!({
        "id": state.model_name,
        "object": "model",
        "created": state.started,
        "owned_by": "kiln",
        "max_model_len": state.context,
    })
}

async fn list_models(State(state): State<Shared>) -> impl IntoResponse {
    state.metrics.request("/v1/models", 200);
    axum::Json(json!({"object": "list", "data": [model_object(&state)]}))
}

async fn get_model(
    State(state): State<Shared>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    if id == state.model_name {
        axum::Json(model_object(&state)).into_response()
    } else {
        ApiError::unknown_model(&id, &state.model_name).into_response()
    }
}

async fn completions(State(state): State<Shared>, body: Body) -> Response {
    let response = async {
        let bytes = read_body(body, state.max_body_bytes).await?;
        let request: CompletionRequest = api::parse_completion(&bytes)?;
        let prompt = match request.prompt {
            PromptInput::Text(text) => Prompt::text(&state.tokenizer, &text),
            PromptInput::Ids(ids) => {
                if let Some(bad) = ids.iter().find(|&&id| id as usize >= state.vocab_size) {
                    return Err(ApiError::invalid(
                        "prompt",
                        format!(
                            "token id {bad} is outside the vocabulary of {} tokens",
                            state.vocab_size
                        ),
                    ));
                }
                Prompt::ids(&state.tokenizer, ids)
            }
        };
        start(
            &state,
            Endpoint::Completion,
            prompt,
            request.common,
            "prompt",
        )
    }
    .await;
    finish_response(&state, "/v1/completions", response).await
}

async fn chat_completions(State(state): State<Shared>, body: Body) -> Response {
    let response = async {
        let bytes = read_body(body, state.max_body_bytes).await?;
        let request: ChatRequest = api::parse_chat(&bytes)?;
        let prompt = Prompt::chat(&state.tokenizer, &state.template, &request.messages)
            .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
        start(&state, Endpoint::Chat, prompt, request.common, "messages")
    }
    .await;
    finish_response(&state, "/v1/chat/completions", response).await
}

/// A request accepted by the engine, not yet answered.
struct Started {
    header: ResponseHeader,
    events: UnboundedReceiver<Event>,
    stream: bool,
    include_usage: bool,
    prompt_tokens: usize,
}

async fn read_body(body: Body, limit: usize) -> Result<axum::body::Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(err) = cause {
            if err.is::<http_body_util::LengthLimitError>() {
                return ApiError::too_large(limit);
            }
            cause = err.source();
        }
        ApiError::invalid("", format!("reading the request body: {e}"))
    })
}

/// Checks the request against the model and the context, and queues it.
fn start(
    state: &AppState,
    endpoint: Endpoint,
    prompt: Prompt,
    common: Common,
    prompt_param: &str,
) -> Result<Started, ApiError> {
    if let Some(model) = &common.model
        && model != &state.model_name
    {
        return Err(ApiError::unknown_model(model, &state.model_name));
    }
    let prompt_tokens = prompt.ids.len();
    if prompt_tokens == 0 {
        return Err(ApiError::invalid(prompt_param, "the prompt is empty"));
    }
    if prompt_tokens >= state.context {
        return Err(ApiError::invalid(
            prompt_param,
            format!(
                "This model's maximum context length is {} tokens, and the prompt has {prompt_tokens}.",
                state.context
            ),
        )
        .with_code("context_length_exceeded"));
    }
    let room = state.context - prompt_tokens;
    let max_tokens = match (common.max_tokens, endpoint) {
        (Some(n), _) if n > room => {
            return Err(ApiError::invalid(
                "max_tokens",
                format!(
                    "This model's maximum context length is {} tokens. However, you requested {} \
                     tokens ({prompt_tokens} in the prompt, {n} for the completion).",
                    state.context,
                    prompt_tokens + n
                ),
            )
            .with_code("context_length_exceeded"));
        }
        (Some(n), _) => n,
        (None, Endpoint::Completion) => DEFAULT_COMPLETION_TOKENS.min(room),
        (None, Endpoint::Chat) => room,
    };
    let mut sampling = common.sampling;
    if !common.seeded {
        sampling.seed = random_seed(state);
    }
    let mut stop_strings = prompt.stop_strings;
    stop_strings.extend(common.stop);
    let params = GenerateParams {
        max_new_tokens: max_tokens,
        sampling,
        stop_ids: if common.ignore_eos {
            Vec::new()
        } else {
            prompt.stop_ids
        },
        stop_strings,
    };
    let (sender, events) = unbounded_channel();
    state.engine.submit(Job {
        prompt: prompt.ids,
        params,
        events: sender,
    })?;
    let number = state.next_id.fetch_add(1, Ordering::Relaxed);
    let prefix = match endpoint {
        Endpoint::Completion => "cmpl",
        Endpoint::Chat => "chatcmpl",
    };
    Ok(Started {
        header: ResponseHeader {
            id: format!("{prefix}-{:08x}{number:08x}", state.started as u32),
            created: unix_now(),
            model: state.model_name.clone(),
            endpoint,
        },
        events,
        stream: common.stream,
        include_usage: common.include_usage,
        prompt_tokens,
    })
}

/// Answers a started request (streamed or whole), or its error; counts it in the metrics.
async fn finish_response(
    state: &AppState,
    endpoint: &str,
    started: Result<Started, ApiError>,
) -> Response {
    let response = match started {
        Err(e) => Err(e),
        Ok(started) if started.stream => Ok(stream_response(started).into_response()),
        Ok(started) => whole_response(started).await,
    };
    match response {
        Ok(response) => {
            state.metrics.request(endpoint, 200);
            response
        }
        Err(e) => {
            state.metrics.request(endpoint, e.status.as_u16());
            e.into_response()
        }
    }
}

async fn whole_response(mut started: Started) -> Result<Response, ApiError> {
    let mut text = String::new();
    while let Some(event) = started.events.recv().await {
        match event {
            Event::Piece(piece) => text.push_str(&piece.text),
            Event::Done(done) => {
                let usage = api::usage(done.prompt_tokens, done.completion_tokens);
                let body = started.header.full(&text, done.finish, usage);
                return Ok((StatusCode::OK, axum::Json(body)).into_response());
            }
            Event::Failed(e) => return Err(e.into()),
        }
    }
    Err(EngineError::ShuttingDown.into())
}

/// Where a stream is: before the first chunk, generating, or done.
enum Phase {
    Start,
    Running,
    Ended,
}

/// A stream's progress: the engine's events, the phase, and text released without a new token
/// (the final flush), which rides on the closing chunk.
struct StreamState {
    events: UnboundedReceiver<Event>,
    phase: Phase,
    tail: String,
}

/// Server-sent events: (for chat) a role chunk, then one chunk per generated token — so clients
/// can count tokens; a chunk's text may be empty while a character or a possible stop string is
/// incomplete — then the closing chunk with `finish_reason`, the usage chunk when asked, and
/// `[DONE]`. An error after the stream started is sent as an `{"error": …}` event before `[DONE]`.
fn stream_response(started: Started) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let Started {
        header,
        events,
        include_usage,
        prompt_tokens,
        ..
    } = started;
    let initial = StreamState {
        events,
        phase: Phase::Start,
        tail: String::new(),
    };
    let stream = stream::unfold(initial, move |mut state| {
        let header = header.clone();
        async move {
            let mut out = Vec::new();
            match state.phase {
                Phase::Ended => return None,
                Phase::Start if header.endpoint == Endpoint::Chat => {
                    out.push(data(&header.chunk(Some(""), true, None)));
                    state.phase = Phase::Running;
                    return Some((out, state));
                }
                Phase::Start | Phase::Running => {}
            }
            let next = state
                .events
                .recv()
                .await
                .unwrap_or(Event::Failed(EngineError::ShuttingDown));
            match next {
                Event::Piece(piece) if piece.ids.is_empty() => state.tail.push_str(&piece.text),
                Event::Piece(piece) => {
                    let text = std::mem::take(&mut state.tail) + &piece.text;
                    out.push(data(&header.chunk(Some(&text), false, None)));
                }
                Event::Done(Completion {
                    finish,
                    completion_tokens,
                    ..
                }) => {
                    let tail = std::mem::take(&mut state.tail);
                    let text = (!tail.is_empty()).then_some(tail.as_str());
                    out.push(data(&header.chunk(text, false, Some(finish))));
                    if include_usage {
                        let usage = api::usage(prompt_tokens, completion_tokens);
                        out.push(data(&header.usage_chunk(usage)));
                    }
                    out.push(SseEvent::default().data("[DONE]"));
                    state.phase = Phase::Ended;
                }
                Event::Failed(e) => {
                    out.push(data(&ApiError::from(e).body()));
                    out.push(SseEvent::default().data("[DONE]"));
                    state.phase = Phase::Ended;
                }
            }
            state.phase = match state.phase {
                Phase::Ended => Phase::Ended,
                _ => Phase::Running,
            };
            Some((out, state))
        }
    })
    .flat_map(|events| stream::iter(events.into_iter().map(Ok)));
    Sse::new(stream)
}

fn data(value: &Value) -> SseEvent {
    SseEvent::default().data(value.to_string())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn random_seed(state: &AppState) -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ state.next_id.load(Ordering::Relaxed).rotate_left(32)
}
