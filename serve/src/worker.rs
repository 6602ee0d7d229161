//! One engine, many clients: the model runs on one thread of its own (the engine is
//! synchronous), fed by a bounded queue of [`Job`]s. Each job streams [`Event`]s back to its
//! HTTP handler; when the handler is gone (the client disconnected), the job stops at the next
//! token. The KV cache of the last request is kept: a request whose prompt begins with the
//! same tokens runs only the rest of its prompt (sessions: prefix reuse).

use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use shadowmoe_engine::{
    GenerateOptions, KvCache, Model, NoObserver, SamplingParams, TextStream, Tokenizer, generate_cached,
};
use tokio::sync::mpsc::UnboundedSender;

use crate::error::Api;
use crate::metrics::{Metrics, Outcome, RunRecord};
use crate::stop::{Step, StopMatcher};

/// A request for the engine.
#[derive(Debug)]
pub struct Job {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Generate past end-of-sequence tokens (vLLM's `ignore_eos`).
    pub ignore_eos: bool,
    pub events: UnboundedSender<Event>,
    pub enqueued: Instant,
    pub api: Api,
}

/// Why generation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token.
    Eos,
    /// `max_tokens` reached.
    Length,
    /// One of the request's stop strings.
    StopSequence(String),
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV cache came from the previous request.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
}

/// What the worker tells a request's handler.
#[derive(Debug)]
pub enum Event {
    /// A piece of text, in order.
    Text(String),
    Done(FinishReason, Usage),
    Failed(String),
}

/// The conversation whose KV cache the engine holds: the tokens at its positions.
#[derive(Debug)]
struct Session {
    tokens: Vec<u32>,
    cache: KvCache,
}

/// What the worker thread owns.
pub struct Worker {
    pub model: Arc<Model>,
    pub tokenizer: Arc<Tokenizer>,
    pub eos_token_ids: Vec<u32>,
    pub metrics: Arc<Metrics>,
    /// Positions a new session's KV cache makes room for at once (untouched pages cost
    /// nothing; a cache that doubled as a conversation grew kept its old copies resident).
    pub kv_reserve: usize,
    /// The byte model (and slots): after the first request it takes the process's measured
    /// overhead (the server's threads and buffers included) for its later predictions.
    pub byte_model: Option<(shadowmoe_engine::offload::ByteModel, usize)>,
    /// The expert cache, whose read spans are folded into the metrics after each request.
    pub cached: Option<Arc<shadowmoe_engine::offload::CachedExperts>>,
    /// Prefix reuse across requests (off: every request starts from an empty KV cache).
    pub reuse_prefix: bool,
    /// Set once the worker has no more jobs to take (for `/health`).
    pub stopped: Arc<Mutex<bool>>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").finish_non_exhaustive()
    }
}

impl Worker {
    /// Runs jobs until every sender of the queue is gone.
    pub fn run(self, queue: Receiver<Job>) {
        let mut session: Option<Session> = None;
        while let Ok(job) = queue.recv() {
            self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
            if job.events.is_closed() {
                tracing::debug!("a queued request's client left before it ran");
                self.metrics.request(job.api, Outcome::Cancelled);
                continue;
            }
            self.metrics.busy.store(1, Ordering::Relaxed);
            session = self.run_job(job, session.take());
            if let Some(c) = &self.cached {
                self.metrics.absorb_loads(c);
            }
            self.metrics.busy.store(0, Ordering::Relaxed);
        }
        *self.stopped.lock().unwrap_or_else(|e| e.into_inner()) = true;
    }

    /// After the first request (warm-up): the overhead the byte model predicts with becomes
    /// what the process holds beyond its weights, expert slots and this session's KV cache.
    fn calibrate(&self, session_tokens: usize) {
        let Some((bm, slots)) = &self.byte_model else {
            return;
        };
        let mut slot = self
            .metrics
            .overhead_after_warmup
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            return;
        }
        shadowmoe_engine::trim_heap();
        if let Some(rss) = shadowmoe_engine::current_rss_bytes() {
            let rest = bm.predict_slots(*slots, session_tokens) - bm.overhead_bytes;
            *slot = Some(rss.saturating_sub(rest));
        }
    }

    fn new_cache(&self) -> shadowmoe_engine::KvCache {
        let mut c = self.model.new_cache();
        c.reserve(self.kv_reserve);
        c
    }

    /// Runs one job, continuing from `session` where the prompt allows; returns the session the
    /// KV cache now holds (none after an engine error).
    fn run_job(&self, job: Job, session: Option<Session>) -> Option<Session> {
        let started = Instant::now();
        let prompt = &job.prompt;
        // Reuse the longest shared prefix, leaving at least one prompt token to run.
        let (reused, mut cache) = match session {
            Some(mut s) if self.reuse_prefix => {
                let common = s
                    .tokens
                    .iter()
                    .zip(prompt)
                    .take_while(|(a, b)| a == b)
                    .count()
                    .min(prompt.len().saturating_sub(1));
                if common > 0 && s.cache.truncate(common) {
                    (common, s.cache)
                } else {
                    (0, self.new_cache())
                }
            }
            _ => (0, self.new_cache()),
        };
        // A request longer than the reserve grows the cache once to its own length.
        cache.reserve(prompt.len() + job.max_tokens);
        let opts = GenerateOptions {
            max_new_tokens: job.max_tokens,
            sampling: job.sampling,
            eos_token_ids: if job.ignore_eos {
                Vec::new()
            } else {
                self.eos_token_ids.clone()
            },
        };
        let eos = opts.eos_token_ids.clone();
        let mut stream = TextStream::default();
        let mut stop = StopMatcher::new(job.stop);
        let mut finish = None;
        let mut cancelled = false;
        let mut first_token = None;
        let tx = &job.events;
        let result = generate_cached(
            &self.model,
            &mut cache,
            &prompt[reused..],
            &opts,
            &mut NoObserver,
            |id| {
                first_token.get_or_insert_with(Instant::now);
                if eos.contains(&id) {
                    finish = Some(FinishReason::Eos);
                    return Ok(false);
                }
                if let Some(piece) = stream.push(&self.tokenizer, id)? {
                    let (text, stopped) = match stop.push(&piece) {
                        Step::Emit(t) => (t, None),
                        Step::Stop(t, s) => (t, Some(s)),
                    };
                    if !text.is_empty() && tx.send(Event::Text(text)).is_err() {
                        cancelled = true;
                        return Ok(false);
                    }
                    if let Some(s) = stopped {
                        finish = Some(FinishReason::StopSequence(s));
                        return Ok(false);
                    }
                }
                if tx.is_closed() {
                    cancelled = true;
                    return Ok(false);
                }
                Ok(true)
            },
        );
        let (out, stats) = match result {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("request failed in the engine: {e}");
                let _ = tx.send(Event::Failed(e.to_string()));
                self.metrics.request(job.api, Outcome::Error);
                return None;
            }
        };
        let rest = stop.finish();
        if !cancelled && !rest.is_empty() && finish.is_none() {
            cancelled = tx.send(Event::Text(rest)).is_err();
        }
        let usage = Usage {
            prompt_tokens: prompt.len(),
            cached_tokens: reused,
            completion_tokens: out.len(),
        };
        let reason = finish.unwrap_or(if out.len() >= job.max_tokens {
            FinishReason::Length
        } else {
            FinishReason::Eos
        });
        if cancelled || tx.send(Event::Done(reason, usage)).is_err() {
            tracing::info!("client left after {} tokens: generation stopped", out.len());
            self.metrics.request(job.api, Outcome::Cancelled);
        } else {
            self.metrics.request(job.api, Outcome::Ok);
        }
        self.metrics.run(&RunRecord {
            prompt_tokens: prompt.len(),
            reused_tokens: reused,
            completion_tokens: out.len(),
            prefill_secs: stats.prefill_secs,
            decode_steps: stats.decode_steps,
            decode_secs: stats.decode_secs,
            queue_secs: started.duration_since(job.enqueued).as_secs_f64(),
            ttft_secs: first_token.map_or(0.0, |t| t.duration_since(started).as_secs_f64()),
        });
        tracing::info!(
            "request: {} prompt tokens ({} reused), {} generated, prefill {:.1} tok/s, decode {}",
            prompt.len(),
            reused,
            out.len(),
            stats.prefill_tok_s(),
            stats
                .decode_tok_s()
                .map_or("n/a".into(), |r| format!("{r:.1} tok/s"))
        );
        // The cache holds the prompt and every generated token but the last.
        let mut tokens = job.prompt;
        tokens.extend_from_slice(&out);
        tokens.truncate(cache.len);
        self.metrics.session_tokens.store(cache.len, Ordering::Relaxed);
        self.calibrate(cache.len);
        Some(Session { tokens, cache })
    }
}
