//! The OpenAI wire format: parsing and checking request bodies, building response objects.
//!
//! Bodies are parsed by hand from JSON values rather than with a derived deserializer, so every
//! bad field gets an error that names it (`param`) the way OpenAI's API does.

use kiln_transformer::FinishReason;
use kiln_transformer::chat::ChatMessage;
use kiln_transformer::sampling::SamplingParams;
use serde_json::{Map, Value, json};

use crate::error::ApiError;

/// Most stop strings a request may give.
const MAX_STOP_STRINGS: usize = 16;

/// What a completion request asks to continue.
#[derive(Clone, Debug, PartialEq)]
pub enum PromptInput {
    /// Text, tokenized by the server.
    Text(String),
    /// Token ids, used as given.
    Ids(Vec<u32>),
}

/// The fields `/v1/completions` and `/v1/chat/completions` share.
#[derive(Clone, Debug, PartialEq)]
pub struct Common {
    /// The model asked for (`None`: the one this server serves).
    pub model: Option<String>,
    /// `max_tokens` / `max_completion_tokens`, when given.
    pub max_tokens: Option<usize>,
    /// Sampling parameters (temperature, top-p, top-k, seed, repetition penalty).
    pub sampling: SamplingParams,
    /// Whether the client set `seed` (otherwise the server picks one).
    pub seeded: bool,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Server-sent events instead of one JSON object.
    pub stream: bool,
    /// With `stream`: send a last chunk with token usage.
    pub include_usage: bool,
    /// Keep generating past end-of-text tokens (vLLM's `ignore_eos`, for benchmarks and tests).
    pub ignore_eos: bool,
}

/// A parsed `/v1/completions` body.
#[derive(Clone, Debug, PartialEq)]
pub struct CompletionRequest {
    /// The prompt.
    pub prompt: PromptInput,
    /// Everything else.
    pub common: Common,
}

/// A parsed `/v1/chat/completions` body.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatRequest {
    /// The conversation so far.
    pub messages: Vec<ChatMessage>,
    /// Everything else.
    pub common: Common,
}

/// Parses a `/v1/completions` body.
pub fn parse_completion(body: &[u8]) -> Result<CompletionRequest, ApiError> {
    let object = parse_object(body)?;
    let prompt = match object.get("prompt") {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid("prompt", "`prompt` is required"));
        }
        Some(value) => parse_prompt(value)?,
    };
    Ok(CompletionRequest {
        prompt,
        common: parse_common(&object)?,
    })
}

/// Parses a `/v1/chat/completions` body.
pub fn parse_chat(body: &[u8]) -> Result<ChatRequest, ApiError> {
    let object = parse_object(body)?;
    let Some(Value::Array(items)) = object.get("messages") else {
        return Err(ApiError::invalid(
            "messages",
            "`messages` is required and must be an array of messages",
        ));
    };
    if items.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "`messages` must hold at least one message",
        ));
    }
    let messages = items
        .iter()
        .enumerate()
        .map(|(i, m)| parse_message(i, m))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ChatRequest {
        messages,
        common: parse_common(&object)?,
    })
}

fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        ApiError::invalid("", format!("The request body is not valid UTF-8 ({e})."))
    })?;
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::invalid(
            "",
            "The request body must be a JSON object.",
        )),
        Err(e) => Err(ApiError::invalid(
            "",
            format!("The request body is not valid JSON: {e}."),
        )),
    }
}

fn parse_prompt(value: &Value) -> Result<PromptInput, ApiError> {
    let bad = || {
        ApiError::invalid(
            "prompt",
            "`prompt` must be a string, an array of token ids, or a one-element array of either",
        )
    };
    match value {
        Value::String(s) => Ok(PromptInput::Text(s.clone())),
        Value::Array(items) if items.len() == 1 && !items[0].is_number() => parse_prompt(&items[0]),
        Value::Array(items) if items.iter().all(Value::is_number) && !items.is_empty() => items
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|id| u32::try_from(id).ok())
                    .ok_or_else(bad)
            })
            .collect::<Result<Vec<_>, _>>()
            .map(PromptInput::Ids),
        Value::Array(items) if items.len() > 1 && items.iter().all(|v| !v.is_number()) => Err(
            ApiError::invalid("prompt", "This server takes one prompt per request."),
        ),
        _ => Err(bad()),
    }
}

fn parse_message(index: usize, value: &Value) -> Result<ChatMessage, ApiError> {
    let param = format!("messages[{index}]");
    let Value::Object(m) = value else {
        return Err(ApiError::invalid(&param, "each message must be an object"));
    };
    let role = match m.get("role") {
        Some(Value::String(r)) if !r.is_empty() => r.clone(),
        _ => {
            return Err(ApiError::invalid(
                &format!("{param}.role"),
                "each message needs a `role` string",
            ));
        }
    };
    let content = match m.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None if role == "assistant" => String::new(),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for part in parts {
                match (part.get("type"), part.get("text")) {
                    (Some(Value::String(t)), Some(Value::String(s))) if t == "text" => {
                        text.push_str(s)
                    }
                    _ => {
                        return Err(ApiError::invalid(
                            &format!("{param}.content"),
                            "only text content parts ({\"type\": \"text\", \"text\": ...}) are supported",
                        ));
                    }
                }
            }
            text
        }
        _ => {
            return Err(ApiError::invalid(
                &format!("{param}.content"),
                "each message needs `content`: a string or an array of text parts",
            ));
        }
    };
    Ok(ChatMessage::new(role, content))
}

fn parse_common(o: &Map<String, Value>) -> Result<Common, ApiError> {
    let model = match o.get("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(ApiError::invalid("model", "`model` must be a string")),
    };
    let max_tokens = match (o.get("max_completion_tokens"), o.get("max_tokens")) {
        (Some(v), _) if !v.is_null() => Some(positive(v, "max_completion_tokens")?),
        (_, Some(v)) if !v.is_null() => Some(positive(v, "max_tokens")?),
        _ => None,
    };
    let mut sampling = SamplingParams {
        temperature: 1.0,
        ..SamplingParams::default()
    };
    if let Some(t) = number(o, "temperature")? {
        if !(0.0..=2.0).contains(&t) {
            return Err(ApiError::invalid(
                "temperature",
                format!("`temperature` must be between 0 and 2, got {t}"),
            ));
        }
        sampling.temperature = t as f32;
    }
    if let Some(p) = number(o, "top_p")? {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::invalid(
                "top_p",
                format!("`top_p` must be in (0, 1], got {p}"),
            ));
        }
        sampling.top_p = Some(p as f32);
    }
    match o.get("top_k") {
        None | Some(Value::Null) => {}
        Some(v) => match v.as_i64() {
            Some(-1 | 0) => sampling.top_k = None,
            Some(k) if k > 0 => sampling.top_k = Some(k as usize),
            _ => {
                return Err(ApiError::invalid(
                    "top_k",
                    "`top_k` must be a positive integer (or -1 / 0 for no limit)",
                ));
            }
        },
    }
    if let Some(r) = number(o, "repetition_penalty")? {
        if !(r > 0.0 && r.is_finite()) {
            return Err(ApiError::invalid(
                "repetition_penalty",
                "`repetition_penalty` must be > 0",
            ));
        }
        sampling.repetition_penalty = r as f32;
    }
    let seeded = match o.get("seed") {
        None | Some(Value::Null) => false,
        Some(v) => {
            let seed = v
                .as_i64()
                .map(|s| s as u64)
                .or_else(|| v.as_u64())
                .ok_or_else(|| ApiError::invalid("seed", "`seed` must be an integer"))?;
            sampling.seed = seed;
            true
        }
    };
    let stop = match o.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str().map(str::to_owned).ok_or_else(|| {
                    ApiError::invalid("stop", "`stop` must be a string or an array of strings")
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => {
            return Err(ApiError::invalid(
                "stop",
                "`stop` must be a string or an array of strings",
            ));
        }
    };
    if stop.len() > MAX_STOP_STRINGS {
        return Err(ApiError::invalid(
            "stop",
            format!("at most {MAX_STOP_STRINGS} stop strings are allowed"),
        ));
    }
    let stop = stop.into_iter().filter(|s| !s.is_empty()).collect();
    match o.get("n") {
        None | Some(Value::Null) => {}
        Some(v) if v.as_u64() == Some(1) => {}
        Some(_) => {
            return Err(ApiError::invalid(
                "n",
                "this server generates one choice per request (`n` must be 1)",
            ));
        }
    }
    for unsupported in ["presence_penalty", "frequency_penalty"] {
        if let Some(v) = number(o, unsupported)?
            && v != 0.0
        {
            return Err(ApiError::invalid(
                unsupported,
                format!("`{unsupported}` is not supported; use `repetition_penalty`"),
            ));
        }
    }
    for unsupported in ["echo", "logprobs"] {
        match o.get(unsupported) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => {}
            Some(_) => {
                return Err(ApiError::invalid(
                    unsupported,
                    format!("`{unsupported}` is not supported"),
                ));
            }
        }
    }
    let stream = boolean(o, "stream")?.unwrap_or(false);
    let include_usage = match o.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(opts)) => boolean(opts, "include_usage")?.unwrap_or(false),
        Some(_) => {
            return Err(ApiError::invalid(
                "stream_options",
                "`stream_options` must be an object",
            ));
        }
    };
    Ok(Common {
        model,
        max_tokens,
        sampling,
        seeded,
        stop,
        stream,
        include_usage,
        ignore_eos: boolean(o, "ignore_eos")?.unwrap_or(false),
    })
}

fn positive(v: &Value, param: &str) -> Result<usize, ApiError> {
    match v.as_i64() {
        Some(n) if n >= 1 => Ok(n as usize),
        _ => Err(ApiError::invalid(
            param,
            format!("`{param}` must be a positive integer, got {v}"),
        )),
    }
}

fn number(o: &Map<String, Value>, param: &str) -> Result<Option<f64>, ApiError> {
    match o.get(param) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| ApiError::invalid(param, format!("`{param}` must be a number"))),
    }
}

fn boolean(o: &Map<String, Value>, param: &str) -> Result<Option<bool>, ApiError> {
    match o.get(param) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ApiError::invalid(
            param,
            format!("`{param}` must be true or false"),
        )),
    }
}

/// Which endpoint a response belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/completions`.
    Completion,
    /// `/v1/chat/completions`.
    Chat,
}

/// What every response object of one request shares.
#[derive(Clone, Debug)]
pub struct ResponseHeader {
    /// `cmpl-…` or `chatcmpl-…`.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The served model's name.
    pub model: String,
    /// The endpoint.
    pub endpoint: Endpoint,
}

/// Token counts (`usage`).
pub fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

impl ResponseHeader {
    /// The whole response of a non-streaming request.
    pub fn full(&self, text: &str, finish: FinishReason, usage: Value) -> Value {
        let choice = match self.endpoint {
            Endpoint::Completion => json!({
                "index": 0, "text": text, "logprobs": null, "finish_reason": finish.as_str(),
            }),
            Endpoint::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish.as_str(),
            }),
        };
        json!({
            "id": self.id,
            "object": match self.endpoint {
                Endpoint::Completion => "text_completion",
                Endpoint::Chat => "chat.completion",
            },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage,
        })
    }

    /// One streamed chunk: `text` (and, for chat, the role on the first chunk), or the end.
    pub fn chunk(&self, text: Option<&str>, role: bool, finish: Option<FinishReason>) -> Value {
        let finish = finish.map(|f| f.as_str());
        let choice = match self.endpoint {
            Endpoint::Completion => json!({
                "index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish,
            }),
            Endpoint::Chat => {
                let mut delta = Map::new();
                if role {
                    delta.insert("role".into(), "assistant".into());
                }
                if let Some(text) = text {
                    delta.insert("content".into(), text.into());
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
        };
        self.chunk_object(vec![choice], Value::Null)
    }

    /// The last streamed chunk when usage was asked for: no choices, only `usage`.
    pub fn usage_chunk(&self, usage: Value) -> Value {
        self.chunk_object(Vec::new(), usage)
    }

    fn chunk_object(&self, choices: Vec<Value>, usage: Value) -> Value {
        json!({
            "id": self.id,
            "object": match self.endpoint {
                Endpoint::Completion => "text_completion",
                Endpoint::Chat => "chat.completion.chunk",
            },
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param_of(body: &str) -> Option<String> {
        parse_completion(body.as_bytes()).unwrap_err().param
    }

    #[test]
    fn completion_fields() {
        let r = parse_completion(
            br#"{"model":"m","prompt":"hi","max_tokens":5,"temperature":0,"top_p":0.5,
                "top_k":3,"seed":-1,"stop":["a",""],"stream":true,
                "stream_options":{"include_usage":true},"n":1,"user":"x"}"#,
        )
        .unwrap();
        assert_eq!(r.prompt, PromptInput::Text("hi".into()));
        let c = r.common;
        assert_eq!(c.model.as_deref(), Some("m"));
        assert_eq!(c.max_tokens, Some(5));
        assert_eq!(c.sampling.temperature, 0.0);
        assert_eq!(c.sampling.top_p, Some(0.5));
        assert_eq!(c.sampling.top_k, Some(3));
        assert_eq!(c.sampling.seed, u64::MAX);
        assert!(c.seeded && c.stream && c.include_usage);
        assert_eq!(
            c.stop,
            vec!["a".to_owned()],
            "empty stop strings are dropped"
        );
    }

    #[test]
    fn prompt_forms() {
        let ids = |b: &str| parse_completion(b.as_bytes()).unwrap().prompt;
        assert_eq!(
            ids(r#"{"prompt":[1,2,3]}"#),
            PromptInput::Ids(vec![1, 2, 3])
        );
        assert_eq!(ids(r#"{"prompt":[[4,5]]}"#), PromptInput::Ids(vec![4, 5]));
        assert_eq!(ids(r#"{"prompt":["x"]}"#), PromptInput::Text("x".into()));
        assert_eq!(
            param_of(r#"{"prompt":["x","y"]}"#).as_deref(),
            Some("prompt")
        );
        assert_eq!(param_of(r#"{"prompt":[-1]}"#).as_deref(), Some("prompt"));
        assert_eq!(param_of(r#"{"prompt":7}"#).as_deref(), Some("prompt"));
        assert_eq!(param_of(r#"{}"#).as_deref(), Some("prompt"));
    }

    #[test]
    fn bad_fields_name_the_param() {
        for (body, param) in [
            (r#"{"prompt":"a","max_tokens":0}"#, "max_tokens"),
            (r#"{"prompt":"a","max_tokens":-3}"#, "max_tokens"),
            (r#"{"prompt":"a","max_tokens":"5"}"#, "max_tokens"),
            (
                r#"{"prompt":"a","max_completion_tokens":0}"#,
                "max_completion_tokens",
            ),
            (r#"{"prompt":"a","temperature":"hot"}"#, "temperature"),
            (r#"{"prompt":"a","temperature":3}"#, "temperature"),
            (r#"{"prompt":"a","top_p":0}"#, "top_p"),
            (r#"{"prompt":"a","top_k":-2}"#, "top_k"),
            (r#"{"prompt":"a","seed":1.5}"#, "seed"),
            (r#"{"prompt":"a","stop":5}"#, "stop"),
            (r#"{"prompt":"a","n":2}"#, "n"),
            (r#"{"prompt":"a","stream":"yes"}"#, "stream"),
            (r#"{"prompt":"a","model":5}"#, "model"),
            (r#"{"prompt":"a","echo":true}"#, "echo"),
            (
                r#"{"prompt":"a","presence_penalty":0.5}"#,
                "presence_penalty",
            ),
        ] {
            assert_eq!(param_of(body).as_deref(), Some(param), "{body}");
        }
    }

    #[test]
    fn bodies_that_are_not_json_objects() {
        for body in [&b"{not json"[..], b"[1,2]", b"\xff\xfe{}", b""] {
            let e = parse_completion(body).unwrap_err();
            assert_eq!(e.status, 400);
            assert_eq!(e.kind, "invalid_request_error");
        }
        let e = parse_completion(b"\xff{}").unwrap_err();
        assert!(e.message.contains("UTF-8"), "{}", e.message);
    }

    #[test]
    fn chat_messages() {
        let r = parse_chat(
            br#"{"messages":[{"role":"system","content":"be brief"},
                {"role":"user","content":[{"type":"text","text":"hi "},{"type":"text","text":"there"}]}]}"#,
        )
        .unwrap();
        assert_eq!(r.messages[1], ChatMessage::user("hi there"));
        let param = |b: &str| parse_chat(b.as_bytes()).unwrap_err().param;
        assert_eq!(param(r#"{"messages":[]}"#).as_deref(), Some("messages"));
        assert_eq!(param(r#"{"messages":"hi"}"#).as_deref(), Some("messages"));
        assert_eq!(
            param(r#"{"messages":[{"content":"x"}]}"#).as_deref(),
            Some("messages[0].role")
        );
        assert_eq!(
            param(r#"{"messages":[{"role":"user","content":5}]}"#).as_deref(),
            Some("messages[0].content")
        );
    }

    #[test]
    fn response_objects() {
        let h = ResponseHeader {
            id: "chatcmpl-1".into(),
            created: 7,
            model: "m".into(),
            endpoint: Endpoint::Chat,
        };
        let full = h.full("hey", FinishReason::Stop, usage(3, 1));
        assert_eq!(full["object"], "chat.completion");
        assert_eq!(full["choices"][0]["message"]["content"], "hey");
        assert_eq!(full["choices"][0]["finish_reason"], "stop");
        assert_eq!(full["usage"]["total_tokens"], 4);
        let first = h.chunk(Some(""), true, None);
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        let last = h.chunk(None, false, Some(FinishReason::Length));
        assert_eq!(last["choices"][0]["delta"], json!({}));
        assert_eq!(last["choices"][0]["finish_reason"], "length");
        assert_eq!(h.usage_chunk(usage(1, 2))["choices"], json!([]));
    }
}
