//! Anthropic's `POST /v1/messages`, streaming (`message_start`, `content_block_start`,
//! `ping`, `content_block_delta`…, `content_block_stop`, `message_delta`, `message_stop`)
//! and not. Errors: `{"type": "error", "error": {type, message}}`.

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Json, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use shadowmoe_engine::ChatMessage;

use crate::Shared;
use crate::api::{self, Content, Prepared, SamplingFields, Sse, StreamShape};
use crate::error::{Api, ApiError};
use crate::worker::{FinishReason, Usage};

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    content: Content,
}

#[derive(Debug, Deserialize)]
struct Request {
    model: String,
    max_tokens: i64,
    messages: Vec<Message>,
    #[serde(default)]
    system: Option<Content>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    top_k: Option<i64>,
    #[serde(default)]
    stop_sequences: Option<Vec<String>>,
}

fn stop_reason(r: &FinishReason) -> (&'static str, Value) {
    match r {
        FinishReason::Eos => ("end_turn", Value::Null),
        FinishReason::Length => ("max_tokens", Value::Null),
        FinishReason::StopSequence(s) => ("stop_sequence", json!(s)),
    }
}

fn usage_json(u: &Usage) -> Value {
    json!({
        // Anthropic counts cached input apart from the rest.
        "input_tokens": u.prompt_tokens - u.cached_tokens,
        "cache_read_input_tokens": u.cached_tokens,
        "cache_creation_input_tokens": 0,
        "output_tokens": u.completion_tokens,
    })
}

pub async fn messages(State(s): State<Shared>, body: Bytes) -> Response {
    api::respond(&s, inner(&s, Api::Messages, &body).await)
}

async fn inner(s: &Shared, api: Api, body: &[u8]) -> Result<Response, ApiError> {
    let body = api::parse_body(api, body)?;
    if let Some(m) = body.get("model").and_then(Value::as_str) {
        api::check_model(s, api, m)?;
    }
    let req: Request = api::fields(api, &body)?;
    api::check_model(s, api, &req.model)?;
    let mut messages = Vec::with_capacity(req.messages.len() + 1);
    if let Some(sys) = req.system {
        let text = sys.text(api, "system")?;
        if !text.is_empty() {
            messages.push(ChatMessage {
                role: "system".into(),
                content: text,
            });
        }
    }
    if req.messages.is_empty() {
        return Err(ApiError::bad(
            api,
            "messages",
            "`messages` is empty: give at least one message",
        ));
    }
    for (i, m) in req.messages.into_iter().enumerate() {
        if !matches!(m.role.as_str(), "user" | "assistant") {
            return Err(ApiError::bad(
                api,
                "",
                format!(
                    "messages.{i}.role: `{}` is not supported (expected user or assistant)",
                    m.role
                ),
            ));
        }
        let content = m.content.text(api, &format!("messages.{i}.content"))?;
        messages.push(ChatMessage {
            role: m.role,
            content,
        });
    }
    let max_tokens = api::max_tokens(api, "max_tokens", Some(req.max_tokens), s.opts.default_max_tokens)?;
    let sampling = SamplingFields {
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        seed: None,
    }
    .resolve(api, s.opts.default_sampling, 1.0)?;
    let stop = api::stop_strings(api, "stop_sequences", req.stop_sequences.unwrap_or_default())?;
    let prompt = api::chat_tokens(s, api, &messages)?;
    let prompt_tokens = prompt.len();
    let mut rx = api::submit(
        s,
        api,
        Prepared {
            prompt,
            max_tokens,
            sampling,
            stop,
            ignore_eos: false,
        },
    )?;
    let id = api::response_id("msg_");
    let model = s.opts.model_id.clone();
    if req.stream.unwrap_or(false) {
        let events = Events {
            id,
            model,
            prompt_tokens,
        };
        return Ok(api::event_stream(rx, events));
    }
    let (text, reason, usage) = api::collect(api, &mut rx).await?;
    let (reason, seq) = stop_reason(&reason);
    Ok(Json(json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": reason,
        "stop_sequence": seq,
        "usage": usage_json(&usage),
    }))
    .into_response())
}

/// Anthropic's stream: `message_start`, `content_block_start`, `ping`, a `content_block_delta`
/// per piece of text, `content_block_stop`, `message_delta` (stop reason, usage),
/// `message_stop`.
struct Events {
    id: String,
    model: String,
    prompt_tokens: usize,
}

fn ev(name: &str, v: Value) -> Sse {
    Sse::default().event(name).data(v.to_string())
}

impl StreamShape for Events {
    fn opening(&mut self) -> Vec<Sse> {
        vec![
            ev(
                "message_start",
                json!({"type": "message_start", "message": {
                    "id": self.id, "type": "message", "role": "assistant", "model": self.model,
                    "content": [], "stop_reason": null, "stop_sequence": null,
                    "usage": {"input_tokens": self.prompt_tokens, "output_tokens": 0},
                }}),
            ),
            ev(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ),
            ev("ping", json!({"type": "ping"})),
        ]
    }

    fn text(&mut self, text: String) -> Sse {
        let d =
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}});
        ev("content_block_delta", d)
    }

    fn done(&mut self, reason: FinishReason, usage: Usage) -> Vec<Sse> {
        let (reason, seq) = stop_reason(&reason);
        vec![
            ev(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ),
            ev(
                "message_delta",
                json!({"type": "message_delta",
                       "delta": {"stop_reason": reason, "stop_sequence": seq},
                       "usage": usage_json(&usage)}),
            ),
            ev("message_stop", json!({"type": "message_stop"})),
        ]
    }

    fn failed(&mut self, message: String) -> Sse {
        let body = json!({"type": "error", "error": {"type": "api_error", "message": format!("generation failed: {message}")}});
        ev("error", body)
    }
}
