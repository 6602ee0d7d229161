//! `shadowmoe serve`: the offloaded engine behind the OpenAI (`/v1/chat/completions`,
//! `/v1/completions`) and Anthropic (`/v1/messages`) HTTP APIs, with `/v1/models`, `/health`
//! and Prometheus `/metrics` carrying the expert cache's live counters.
//!
//! One engine, many clients: HTTP runs on tokio (axum), the model on one thread of its own
//! ([`worker`]) fed by a bounded queue; a full queue answers 503 with `Retry-After`. The
//! cache, its counters and the last request's KV cache (prefix reuse) persist across requests.
//!
//! Use: [`Server::bind`] first (a port in use is an error before the model loads), then
//! [`Server::run`] with the loaded [`Engine`]; it returns after SIGINT or SIGTERM, once the
//! running request has finished.

mod anthropic;
mod api;
mod cache_state;
mod error;
mod metrics;
mod openai;
mod stop;
mod worker;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use serde_json::json;
use shadowmoe_engine::offload::CachedExperts;
use shadowmoe_engine::{Model, SamplingParams, Tokenizer};

pub use error::ServeError;

use crate::metrics::Metrics;
use crate::worker::{Job, Worker};

/// How the server runs; the defaults apply where a request does not say.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub host: String,
    pub port: u16,
    /// The model id clients name (`/v1/models` lists it; another name gets 404).
    pub model_id: String,
    /// Longest prompt, in tokens, a request may have (longer: 400).
    pub max_input_tokens: usize,
    /// Requests that may wait behind the running one (more: 503).
    pub queue_depth: usize,
    /// Tokens generated when a request gives no `max_tokens` (OpenAI's APIs).
    pub default_max_tokens: usize,
    /// Sampling when a request does not say (its fields override each one).
    pub default_sampling: SamplingParams,
    /// Render chat messages through the checkpoint's chat template. Off (or without a
    /// template): the messages' texts joined by blank lines, as plain text for a base model.
    pub chat_template: bool,
    /// Reuse the previous request's KV cache for a shared prompt prefix.
    pub reuse_prefix: bool,
    /// Warm start: the resident expert set is loaded from this file at start (if it exists)
    /// and written to it at shutdown.
    pub cache_state: Option<std::path::PathBuf>,
}

/// The loaded model and what goes with it.
pub struct Engine {
    /// Shared with the caller, which keeps its handle for the closing report.
    pub model: Arc<Model>,
    pub tokenizer: Tokenizer,
    pub eos_token_ids: Vec<u32>,
    /// The expert cache, when experts stream from disk (its counters feed `/metrics`).
    pub cached: Option<Arc<CachedExperts>>,
    /// sha256 of the checkpoint's `config.json` (ties a cache state to its model).
    pub config_sha256: String,
    /// The byte model of the loaded run and its expert slots (experts from disk): `/metrics`
    /// shows its prediction for the session's context beside the resident set.
    pub byte_model: Option<(shadowmoe_engine::offload::ByteModel, usize)>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

/// What the HTTP handlers share.
pub(crate) struct AppState {
    pub opts: ServeOptions,
    pub tokenizer: Arc<Tokenizer>,
    pub vocab_size: usize,
    pub queue: std::sync::mpsc::SyncSender<Job>,
    pub metrics: Arc<Metrics>,
    pub cached: Option<Arc<CachedExperts>>,
    pub byte_model: Option<(shadowmoe_engine::offload::ByteModel, usize)>,
    pub started: u64,
    pub worker_stopped: Arc<Mutex<bool>>,
}

pub(crate) type Shared = Arc<AppState>;

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A server with its port taken, not yet serving.
#[derive(Debug)]
pub struct Server {
    listener: std::net::TcpListener,
    opts: ServeOptions,
    /// Started with the port, before the model loads: the byte model's measured baseline
    /// then counts its threads.
    runtime: tokio::runtime::Runtime,
}

impl Server {
    /// Takes the port (`--port 0`: any free one).
    pub fn bind(opts: ServeOptions) -> Result<Self, ServeError> {
        if opts.default_max_tokens == 0 {
            return Err(ServeError::Invalid {
                what: "--max-new-tokens".into(),
                message: "must be at least 1 for serve".into(),
            });
        }
        if opts.max_input_tokens == 0 {
            return Err(ServeError::Invalid {
                what: "--max-input-tokens".into(),
                message: "must be at least 1".into(),
            });
        }
        opts.default_sampling.validate()?;
        let addr = format!("{}:{}", opts.host, opts.port);
        let listener = std::net::TcpListener::bind(&addr).map_err(|source| ServeError::Bind {
            addr: addr.clone(),
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| ServeError::Bind { addr, source })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("shadowmoe-http")
            .build()
            .map_err(ServeError::Http)?;
        Ok(Self {
            listener,
            opts,
            runtime,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until SIGINT or SIGTERM; the running request finishes first.
    pub fn run(self, engine: Engine) -> Result<(), ServeError> {
        let Engine {
            model,
            tokenizer,
            eos_token_ids,
            cached,
            config_sha256,
            byte_model,
        } = engine;
        let state_file = self.opts.cache_state.clone();
        if let Some(path) = &state_file {
            let Some(c) = &cached else {
                return Err(ServeError::Invalid {
                    what: "--cache-state".into(),
                    message: "applies to the expert cache: give --capacity N or --cache-bytes SIZE too"
                        .into(),
                });
            };
            let start = Instant::now();
            let cfg = &model.config;
            let n = cache_state::load(path, &config_sha256, &cfg.moe_layers(), cfg.num_experts, c)?;
            if n > 0 {
                eprintln!(
                    "shadowmoe serve: warm start: {n} experts loaded from {} in {:.2}s",
                    path.display(),
                    start.elapsed().as_secs_f64()
                );
            }
        }
        if self.opts.chat_template && !tokenizer.has_chat_template() {
            tracing::warn!("the checkpoint has no chat template: chat messages are joined as plain text");
        }
        let tokenizer = Arc::new(tokenizer);
        let metrics = Arc::new(Metrics::default());
        let stopped = Arc::new(Mutex::new(false));
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(self.opts.queue_depth);
        let vocab_size = model.config.vocab_size;
        let worker = Worker {
            kv_reserve: self.opts.max_input_tokens + self.opts.default_max_tokens,
            byte_model,
            model,
            tokenizer: tokenizer.clone(),
            eos_token_ids,
            metrics: metrics.clone(),
            cached: cached.clone(),
            reuse_prefix: self.opts.reuse_prefix,
            stopped: stopped.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("shadowmoe-engine".into())
            .spawn(move || worker.run(rx))
            .map_err(ServeError::Http)?;
        let state: Shared = Arc::new(AppState {
            opts: self.opts,
            tokenizer,
            vocab_size,
            queue: tx,
            metrics,
            cached: cached.clone(),
            byte_model,
            started: unix_now(),
            worker_stopped: stopped,
        });
        let runtime = self.runtime;
        let listener = self.listener;
        let served = runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).map_err(ServeError::Http)?;
            if let Ok(addr) = listener.local_addr() {
                // One line on stderr that scripts (and the tests) wait for.
                eprintln!("shadowmoe serve: listening on http://{addr}");
            }
            let app = router(state);
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown_signal())
                .await
                .map_err(ServeError::Http)
        });
        // The router (and its queue sender) is gone: the worker finishes its job and stops.
        drop(runtime);
        handle.join().map_err(|_| ServeError::WorkerPanicked)?;
        if let (Some(path), Some(c)) = (&state_file, &cached) {
            let n = cache_state::save(path, &config_sha256, c)?;
            eprintln!(
                "shadowmoe serve: {n} resident experts saved to {}",
                path.display()
            );
        }
        served
    }
}

fn router(state: Shared) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(openai::chat))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(prometheus))
        .layer(DefaultBodyLimit::max(16 << 20))
        .with_state(state)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down: finishing the running request");
}

async fn models(State(s): State<Shared>) -> Json<serde_json::Value> {
    let id = &s.opts.model_id;
    Json(json!({
        "object": "list",
        "data": [{
            "id": id,
            "object": "model",
            "created": s.started,
            "owned_by": "shadowmoe",
            // Anthropic's model object.
            "type": "model",
            "display_name": id,
            "created_at": "1970-01-01T00:00:00Z",
        }],
        "has_more": false,
        "first_id": id,
        "last_id": id,
    }))
}

async fn health(State(s): State<Shared>) -> Response {
    let stopped = *s.worker_stopped.lock().unwrap_or_else(|e| e.into_inner());
    let body = json!({
        "status": if stopped { "stopping" } else { "ok" },
        "model": s.opts.model_id,
        "queue_depth": s.metrics.queued.load(Ordering::Relaxed),
        "queue_capacity": s.opts.queue_depth,
        "busy": s.metrics.busy.load(Ordering::Relaxed) == 1,
    });
    let status = if stopped {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    } else {
        axum::http::StatusCode::OK
    };
    (status, Json(body)).into_response()
}

async fn prometheus(State(s): State<Shared>) -> Response {
    let start = Instant::now();
    let text = s
        .metrics
        .render(s.cached.as_ref(), s.opts.queue_depth, s.byte_model.as_ref());
    tracing::debug!("metrics rendered in {:?}", start.elapsed());
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
