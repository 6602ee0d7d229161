//! OpenAI's `POST /v1/chat/completions` and `POST /v1/completions`, streaming (server-sent
//! events ending in `data: [DONE]`) and not. Errors: `{"error": {message, type, param, code}}`.

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Json, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use shadowmoe_engine::ChatMessage;

use crate::api::{self, Content, Prepared, SamplingFields, Sse, StreamShape};
use crate::error::{Api, ApiError};
use crate::worker::{FinishReason, Usage};
use crate::{Shared, unix_now};

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// The fields both endpoints share (unknown fields are ignored, as OpenAI's server does for
/// the ones it does not use).
#[derive(Debug, Deserialize)]
struct Common {
    model: String,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    max_completion_tokens: Option<i64>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    top_k: Option<i64>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    n: Option<i64>,
    /// vLLM's extension: keep generating past end-of-sequence tokens (to `max_tokens`).
    #[serde(default)]
    ignore_eos: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<Message>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    prompt: Prompt,
}

/// Checks the shared fields; returns (prepared without prompt, stream, include_usage).
fn common(s: &Shared, api: Api, c: Common, prompt: Vec<u32>) -> Result<(Prepared, bool, bool), ApiError> {
    if let Some(n) = c.n
        && n != 1
    {
        return Err(ApiError::bad(
            api,
            "n",
            format!("`n` is {n}: only one choice per request is supported"),
        ));
    }
    let (field, value) = match c.max_completion_tokens {
        Some(v) => ("max_completion_tokens", Some(v)),
        None => ("max_tokens", c.max_tokens),
    };
    let max_tokens = api::max_tokens(api, field, value, s.opts.default_max_tokens)?;
    let sampling = SamplingFields {
        temperature: c.temperature,
        top_p: c.top_p,
        top_k: c.top_k,
        seed: c.seed,
    }
    .resolve(api, s.opts.default_sampling, 2.0)?;
    let stop = api::stop_strings(api, "stop", c.stop.map(Stop::into_vec).unwrap_or_default())?;
    let stream = c.stream.unwrap_or(false);
    let usage = c.stream_options.and_then(|o| o.include_usage).unwrap_or(false);
    Ok((
        Prepared {
            prompt,
            max_tokens,
            sampling,
            stop,
            ignore_eos: c.ignore_eos.unwrap_or(false),
        },
        stream,
        usage,
    ))
}

fn finish_reason(r: &FinishReason) -> &'static str {
    match r {
        FinishReason::Eos | FinishReason::StopSequence(_) => "stop",
        FinishReason::Length => "length",
    }
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

pub async fn chat(State(s): State<Shared>, body: Bytes) -> Response {
    api::respond(&s, chat_inner(&s, Api::Chat, &body).await)
}

async fn chat_inner(s: &Shared, api: Api, body: &[u8]) -> Result<Response, ApiError> {
    let body = api::parse_body(api, body)?;
    let c: Common = api::fields(api, &body)?;
    api::check_model(s, api, &c.model)?;
    let req: ChatRequest = api::fields(api, &body)?;
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(ApiError::bad(
                    api,
                    format!("messages[{i}].role"),
                    format!(
                        "role `{other}` is not supported (expected system, developer, user or assistant)"
                    ),
                ));
            }
        };
        messages.push(ChatMessage {
            role: role.into(),
            content: match m.content {
                Some(c) => c.text(api, &format!("messages[{i}].content"))?,
                None => String::new(),
            },
        });
    }
    let prompt = api::chat_tokens(s, api, &messages)?;
    let (prepared, stream, include_usage) = common(s, api, c, prompt)?;
    let mut rx = api::submit(s, api, prepared)?;
    let id = api::response_id("chatcmpl-");
    let model = s.opts.model_id.clone();
    let created = unix_now();
    if stream {
        let chunks = Chunks {
            id,
            object: "chat.completion.chunk",
            created,
            model,
            chat: true,
            include_usage,
        };
        return Ok(api::event_stream(rx, chunks));
    }
    let (text, reason, usage) = api::collect(api, &mut rx).await?;
    Ok(Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish_reason(&reason),
            "logprobs": null,
        }],
        "usage": usage_json(&usage),
    }))
    .into_response())
}

pub async fn completions(State(s): State<Shared>, body: Bytes) -> Response {
    api::respond(&s, completions_inner(&s, Api::Completions, &body).await)
}

async fn completions_inner(s: &Shared, api: Api, body: &[u8]) -> Result<Response, ApiError> {
    let body = api::parse_body(api, body)?;
    let c: Common = api::fields(api, &body)?;
    api::check_model(s, api, &c.model)?;
    let req: CompletionRequest = api::fields(api, &body)?;
    let one = |n: usize| {
        ApiError::bad(
            api,
            "prompt",
            format!("`prompt` has {n} prompts: one prompt per request is supported"),
        )
    };
    let prompt = match req.prompt {
        Prompt::Text(t) => api::text_tokens(s, api, &t)?,
        Prompt::Texts(mut v) if v.len() == 1 => api::text_tokens(s, api, &v.remove(0))?,
        Prompt::Texts(v) => return Err(one(v.len())),
        Prompt::Ids(ids) => api::id_tokens(s, api, ids)?,
        Prompt::IdLists(mut v) if v.len() == 1 => api::id_tokens(s, api, v.remove(0))?,
        Prompt::IdLists(v) => return Err(one(v.len())),
    };
    let (prepared, stream, include_usage) = common(s, api, c, prompt)?;
    let mut rx = api::submit(s, api, prepared)?;
    let id = api::response_id("cmpl-");
    let model = s.opts.model_id.clone();
    let created = unix_now();
    if stream {
        let chunks = Chunks {
            id,
            object: "text_completion",
            created,
            model,
            chat: false,
            include_usage,
        };
        return Ok(api::event_stream(rx, chunks));
    }
    let (text, reason, usage) = api::collect(api, &mut rx).await?;
    Ok(Json(json!({
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish_reason(&reason), "logprobs": null}],
        "usage": usage_json(&usage),
    }))
    .into_response())
}

/// OpenAI's stream: chunks of `object` (chat deltas, or completion texts), an opening chunk
/// with the role for chat, a closing chunk with the finish reason, the usage chunk if asked
/// for, then `[DONE]`.
struct Chunks {
    id: String,
    object: &'static str,
    created: u64,
    model: String,
    chat: bool,
    include_usage: bool,
}

impl Chunks {
    fn chunk(&self, delta: Value, finish: Option<&str>) -> Value {
        let choice = if self.chat {
            json!({"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null})
        } else {
            json!({"index": 0, "text": delta, "finish_reason": finish, "logprobs": null})
        };
        json!({
            "id": self.id, "object": self.object, "created": self.created, "model": self.model,
            "choices": [choice],
        })
    }
}

fn data(v: Value) -> Sse {
    Sse::default().data(v.to_string())
}

impl StreamShape for Chunks {
    fn opening(&mut self) -> Vec<Sse> {
        if self.chat {
            vec![data(
                self.chunk(json!({"role": "assistant", "content": ""}), None),
            )]
        } else {
            Vec::new()
        }
    }

    fn text(&mut self, text: String) -> Sse {
        let delta = if self.chat {
            json!({"content": text})
        } else {
            json!(text)
        };
        data(self.chunk(delta, None))
    }

    fn done(&mut self, reason: FinishReason, usage: Usage) -> Vec<Sse> {
        let empty = if self.chat { json!({}) } else { json!("") };
        let mut out = vec![data(self.chunk(empty, Some(finish_reason(&reason))))];
        if self.include_usage {
            let mut last = self.chunk(Value::Null, None);
            last["choices"] = json!([]);
            last["usage"] = usage_json(&usage);
            out.push(data(last));
        }
        out
    }

    fn failed(&mut self, message: String) -> Sse {
        data(
            json!({"error": {"message": format!("generation failed: {message}"), "type": "server_error", "param": null, "code": null}}),
        )
    }

    fn trailer(&mut self) -> Option<Sse> {
        Some(Sse::default().data("[DONE]"))
    }
}
