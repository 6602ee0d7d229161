//! What the OpenAI and Anthropic handlers share: parsing a body into typed fields (errors name
//! the field), checking ranges, turning messages into prompt tokens, and handing the job to
//! the engine's queue.

use std::sync::atomic::Ordering;
use std::sync::mpsc::TrySendError;
use std::time::Instant;

use serde::de::DeserializeOwned;
use shadowmoe_engine::{ChatMessage, SamplingParams};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::Shared;
use crate::error::{Api, ApiError, Kind};
use crate::metrics::Outcome;
use crate::worker::{Event, FinishReason, Job, Usage};

/// Parses a body as a JSON object; a syntax error is a 400.
pub fn parse_body(api: Api, body: &[u8]) -> Result<serde_json::Value, ApiError> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad(api, "", format!("the request body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad(api, "", "the request body must be a JSON object"));
    }
    Ok(v)
}

/// Reads typed fields out of a parsed body; a missing field or one of the wrong type is a
/// 400 naming it (unknown fields are ignored).
pub fn fields<T: DeserializeOwned>(api: Api, body: &serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            ApiError::bad(api, "", inner.to_string())
        } else {
            ApiError::bad(api, path.clone(), format!("`{path}`: {inner}"))
        }
    })
}

/// The sampling fields as a request gives them (absent: the server's defaults).
#[derive(Debug, Default, Clone, Copy)]
pub struct SamplingFields {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub seed: Option<i64>,
}

impl SamplingFields {
    /// Checks the ranges (`max_temperature`: 2 for OpenAI, 1 for Anthropic).
    pub fn resolve(
        self,
        api: Api,
        defaults: SamplingParams,
        max_temperature: f64,
    ) -> Result<SamplingParams, ApiError> {
        let mut p = defaults;
        if let Some(t) = self.temperature {
            if !(0.0..=max_temperature).contains(&t) {
                return Err(ApiError::bad(
                    api,
                    "temperature",
                    format!("`temperature` is {t}, expected a number in [0, {max_temperature}]"),
                ));
            }
            p.temperature = t as f32;
        }
        if let Some(v) = self.top_p {
            if !(v > 0.0 && v <= 1.0) {
                return Err(ApiError::bad(
                    api,
                    "top_p",
                    format!("`top_p` is {v}, expected a number in (0, 1]"),
                ));
            }
            p.top_p = v as f32;
        }
        if let Some(k) = self.top_k {
            p.top_k = usize::try_from(k).map_err(|_| {
                ApiError::bad(api, "top_k", format!("`top_k` is {k}, expected an integer >= 0"))
            })?;
        }
        if let Some(s) = self.seed {
            // Negative seeds are fine: the bits are the seed.
            p.seed = s as u64;
        }
        Ok(p)
    }
}

/// `max_tokens` checked: at least 1.
pub fn max_tokens(api: Api, field: &str, value: Option<i64>, default: usize) -> Result<usize, ApiError> {
    match value {
        None => Ok(default),
        Some(n) if n >= 1 => {
            usize::try_from(n).map_err(|_| ApiError::bad(api, field, format!("`{field}` is too large")))
        }
        Some(n) => Err(ApiError::bad(
            api,
            field,
            format!("`{field}` is {n}, expected an integer >= 1"),
        )),
    }
}

/// 404 unless `model` is the one served.
pub fn check_model(s: &Shared, api: Api, model: &str) -> Result<(), ApiError> {
    if model == s.opts.model_id {
        return Ok(());
    }
    Err(ApiError {
        param: Some("model".into()),
        ..ApiError::new(
            api,
            Kind::NotFound,
            format!(
                "model `{model}` not found: this server serves `{}`",
                s.opts.model_id
            ),
        )
    }
    .with_code("model_not_found"))
}

/// Prompt tokens of a chat: the checkpoint's chat template (with the assistant's turn opened),
/// or, with `--no-chat-template` or no template, the texts joined by blank lines.
pub fn chat_tokens(s: &Shared, api: Api, messages: &[ChatMessage]) -> Result<Vec<u32>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad(
            api,
            "messages",
            "`messages` is empty: give at least one message",
        ));
    }
    let tok = &s.tokenizer;
    let ids = if s.opts.chat_template && tok.has_chat_template() {
        tok.encode_chat(messages).map_err(|e| {
            ApiError::bad(
                api,
                "messages",
                format!("the chat template refused the messages: {e}"),
            )
        })?
    } else {
        let text: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
        tok.encode(&text.join("\n\n"))
            .map_err(|e| ApiError::new(api, Kind::Internal, e.to_string()))?
    };
    check_prompt(s, api, "messages", ids)
}

/// Prompt tokens of a plain text, with the tokenizer's own special tokens (as `generate
/// --prompt` encodes it).
pub fn text_tokens(s: &Shared, api: Api, text: &str) -> Result<Vec<u32>, ApiError> {
    let ids = s
        .tokenizer
        .encode(text)
        .map_err(|e| ApiError::new(api, Kind::Internal, e.to_string()))?;
    check_prompt(s, api, "prompt", ids)
}

/// Prompt token ids given directly.
pub fn id_tokens(s: &Shared, api: Api, ids: Vec<u32>) -> Result<Vec<u32>, ApiError> {
    if let Some(bad) = ids.iter().find(|&&t| t as usize >= s.vocab_size) {
        return Err(ApiError::bad(
            api,
            "prompt",
            format!(
                "token id {bad} is outside the vocabulary (vocab_size = {})",
                s.vocab_size
            ),
        ));
    }
    check_prompt(s, api, "prompt", ids)
}

fn check_prompt(s: &Shared, api: Api, field: &str, ids: Vec<u32>) -> Result<Vec<u32>, ApiError> {
    if ids.is_empty() {
        return Err(ApiError::bad(api, field, "the prompt encodes to no tokens"));
    }
    let limit = s.opts.max_input_tokens;
    if ids.len() > limit {
        return Err(ApiError::bad(
            api,
            field,
            format!(
                "the prompt is {} tokens, more than this server's limit of {limit} (--max-input-tokens {limit})",
                ids.len()
            ),
        )
        .with_code("context_length_exceeded"));
    }
    Ok(ids)
}

/// A request ready for the engine.
#[derive(Debug)]
pub struct Prepared {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
}

/// Stop strings checked: at most 4 (OpenAI's limit), none empty.
pub fn stop_strings(api: Api, field: &str, stops: Vec<String>) -> Result<Vec<String>, ApiError> {
    if stops.len() > 4 {
        return Err(ApiError::bad(
            api,
            field,
            format!("`{field}` has {} strings, at most 4 are allowed", stops.len()),
        ));
    }
    if stops.iter().any(String::is_empty) {
        return Err(ApiError::bad(
            api,
            field,
            format!("`{field}` has an empty string"),
        ));
    }
    Ok(stops)
}

/// Puts the request on the engine's queue; its events come back on the receiver. A full
/// queue is a 503 (with `Retry-After`).
pub fn submit(s: &Shared, api: Api, p: Prepared) -> Result<UnboundedReceiver<Event>, ApiError> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let job = Job {
        prompt: p.prompt,
        max_tokens: p.max_tokens,
        sampling: p.sampling,
        stop: p.stop,
        ignore_eos: p.ignore_eos,
        events: tx,
        enqueued: Instant::now(),
        api,
    };
    s.metrics.queued.fetch_add(1, Ordering::Relaxed);
    match s.queue.try_send(job) {
        Ok(()) => Ok(rx),
        Err(e) => {
            s.metrics.queued.fetch_sub(1, Ordering::Relaxed);
            match e {
                TrySendError::Full(_) => {
                    s.metrics.request(api, Outcome::Overloaded);
                    Err(ApiError::new(
                        api,
                        Kind::Overloaded,
                        format!(
                            "the server is busy: the engine is running a request and its queue \
                             (--queue-depth {}) is full; retry later",
                            s.opts.queue_depth
                        ),
                    ))
                }
                TrySendError::Disconnected(_) => {
                    Err(ApiError::new(api, Kind::Internal, "the engine has stopped"))
                }
            }
        }
    }
}

/// Waits for a whole answer (non-streaming requests).
pub async fn collect(
    api: Api,
    rx: &mut UnboundedReceiver<Event>,
) -> Result<(String, FinishReason, Usage), ApiError> {
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Text(t) => text.push_str(&t),
            Event::Done(reason, usage) => return Ok((text, reason, usage)),
            Event::Failed(m) => {
                return Err(ApiError::new(
                    api,
                    Kind::Internal,
                    format!("generation failed: {m}"),
                ));
            }
        }
    }
    Err(ApiError::new(
        api,
        Kind::Internal,
        "the engine stopped before answering",
    ))
}

/// Counts a refused request, then passes the error on.
pub fn rejected(s: &Shared, e: ApiError) -> ApiError {
    if matches!(e.kind, Kind::BadRequest | Kind::NotFound) {
        s.metrics.request(e.api, Outcome::Rejected);
    }
    e
}

/// A fresh id for a response: `prefix` then a counter and the time.
pub fn response_id(prefix: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{:x}{n:04x}", crate::unix_now())
}

/// A message's content as both APIs give it: a string, or a list of typed parts (OpenAI's
/// content parts, Anthropic's content blocks) of which only text is served.
#[derive(Debug, serde::Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, serde::Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

impl Content {
    /// The text: the string, or the text parts joined; a part of another type is a 400 naming
    /// `field`.
    pub fn text(self, api: Api, field: &str) -> Result<String, ApiError> {
        match self {
            Content::Text(t) => Ok(t),
            Content::Parts(parts) => {
                let mut out = String::new();
                for p in parts {
                    if p.kind != "text" {
                        return Err(ApiError::bad(
                            api,
                            field,
                            format!(
                                "`{field}`: content part of type `{}` is not supported (text only)",
                                p.kind
                            ),
                        ));
                    }
                    out.push_str(&p.text.unwrap_or_default());
                }
                Ok(out)
            }
        }
    }
}

/// The answer to a request: the handler's response, or its error (counted) in the API's shape.
pub fn respond(s: &Shared, r: Result<axum::response::Response, ApiError>) -> axum::response::Response {
    use axum::response::IntoResponse;
    r.unwrap_or_else(|e| rejected(s, e).into_response())
}

/// How one API writes the engine's events as server-sent events.
pub trait StreamShape: Send + 'static {
    /// Sent before the first token.
    fn opening(&mut self) -> Vec<Sse>;
    /// One piece of generated text.
    fn text(&mut self, text: String) -> Sse;
    /// The end of the answer.
    fn done(&mut self, reason: FinishReason, usage: Usage) -> Vec<Sse>;
    /// The engine failed mid-answer.
    fn failed(&mut self, message: String) -> Sse;
    /// Sent last whatever happened (OpenAI's `[DONE]`).
    fn trailer(&mut self) -> Option<Sse> {
        None
    }
}

pub use axum::response::sse::Event as Sse;

/// The event stream of a request in `shape`. When the client goes, the stream's receiver is
/// dropped, the next send fails and the engine's receiver goes with it: the worker stops at
/// its next token.
pub fn event_stream(
    mut rx: UnboundedReceiver<Event>,
    mut shape: impl StreamShape,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let (tx, out) = tokio::sync::mpsc::channel::<Result<Sse, std::convert::Infallible>>(64);
    tokio::spawn(async move {
        let send = |e: Sse| tx.send(Ok(e));
        for e in shape.opening() {
            if send(e).await.is_err() {
                return;
            }
        }
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Text(t) => {
                    if send(shape.text(t)).await.is_err() {
                        return;
                    }
                }
                Event::Done(reason, usage) => {
                    for e in shape.done(reason, usage) {
                        if send(e).await.is_err() {
                            return;
                        }
                    }
                    break;
                }
                Event::Failed(m) => {
                    if send(shape.failed(m)).await.is_err() {
                        return;
                    }
                    break;
                }
            }
        }
        if let Some(e) = shape.trailer() {
            let _ = send(e).await;
        }
    });
    axum::response::sse::Sse::new(tokio_stream::wrappers::ReceiverStream::new(out)).into_response()
}
