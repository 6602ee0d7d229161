//! Errors: [`ServeError`] for starting and stopping the server (one line for the user), and
//! [`ApiError`] for a request that fails, answered in the error shape of the API it came in
//! through (OpenAI's `{"error": {...}}` or Anthropic's `{"type": "error", ...}`).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Why the server could not start or stopped badly.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {message}")]
    Invalid { what: String, message: String },
    #[error("{path}: {message}")]
    CacheState { path: String, message: String },
    #[error("the HTTP server failed: {0}")]
    Http(#[source] std::io::Error),
    #[error("the model's worker thread panicked")]
    WorkerPanicked,
    #[error(transparent)]
    Engine(#[from] shadowmoe_engine::EngineError),
}

/// Which API a request came in through: it decides the error shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Api {
    Chat,
    Completions,
    Messages,
}

impl Api {
    /// The label of this API in metrics.
    pub fn label(self) -> &'static str {
        match self {
            Api::Chat => "chat_completions",
            Api::Completions => "completions",
            Api::Messages => "messages",
        }
    }
}

/// What went wrong, independent of the API's spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// 400: the request is malformed or out of range.
    BadRequest,
    /// 404: no such model.
    NotFound,
    /// 503: the queue is full.
    Overloaded,
    /// 500: the engine failed.
    Internal,
}

/// A failed request.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub api: Api,
    pub kind: Kind,
    pub message: String,
    /// The request field at fault (OpenAI's `param`).
    pub param: Option<String>,
    /// OpenAI's `code` (e.g. `model_not_found`).
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(api: Api, kind: Kind, message: impl Into<String>) -> Self {
        Self {
            api,
            kind,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    pub fn bad(api: Api, param: impl Into<String>, message: impl Into<String>) -> Self {
        let param = param.into();
        Self {
            param: (!param.is_empty()).then_some(param),
            ..Self::new(api, Kind::BadRequest, message)
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn status(&self) -> StatusCode {
        match self.kind {
            Kind::BadRequest => StatusCode::BAD_REQUEST,
            Kind::NotFound => StatusCode::NOT_FOUND,
            Kind::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            Kind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The error body in the API's own shape.
    pub fn body(&self) -> serde_json::Value {
        match self.api {
            Api::Chat | Api::Completions => {
                let ty = match self.kind {
                    Kind::BadRequest | Kind::NotFound => "invalid_request_error",
                    Kind::Overloaded => "server_overloaded",
                    Kind::Internal => "server_error",
                };
                json!({"error": {
                    "message": self.message,
                    "type": ty,
                    "param": self.param,
                    "code": self.code,
                }})
            }
            Api::Messages => {
                let ty = match self.kind {
                    Kind::BadRequest => "invalid_request_error",
                    Kind::NotFound => "not_found_error",
                    Kind::Overloaded => "overloaded_error",
                    Kind::Internal => "api_error",
                };
                json!({"type": "error", "error": {"type": ty, "message": self.message}})
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status(), axum::Json(self.body())).into_response();
        if self.kind == Kind::Overloaded {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}
