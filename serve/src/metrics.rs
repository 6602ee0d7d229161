//! The server's counters and `/metrics` in the Prometheus text format (version 0.0.4). Cache
//! and I/O figures come from the engine's own counters (DESIGN.md "Metrics"), read at scrape
//! time; they persist across requests because the cache does.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use shadowmoe_engine::offload::CachedExperts;

use crate::error::Api;

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Ok,
    /// The client went away before the answer was complete.
    Cancelled,
    /// Refused before it ran (bad input, unknown model).
    Rejected,
    /// The queue was full (503).
    Overloaded,
    /// The engine failed.
    Error,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Cancelled => "cancelled",
            Outcome::Rejected => "rejected",
            Outcome::Overloaded => "overloaded",
            Outcome::Error => "error",
        }
    }
}

/// One request that ran on the engine.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunRecord {
    pub prompt_tokens: usize,
    pub reused_tokens: usize,
    pub completion_tokens: usize,
    pub prefill_secs: f64,
    pub decode_steps: usize,
    pub decode_secs: f64,
    pub queue_secs: f64,
    /// From taking the request off the queue to its first token.
    pub ttft_secs: f64,
}

#[derive(Debug, Default)]
struct Inner {
    requests: BTreeMap<(Api, Outcome), u64>,
    runs: u64,
    prompt_tokens: u64,
    reused_tokens: u64,
    completion_tokens: u64,
    prefill_tokens: u64,
    prefill_secs: f64,
    decode_steps: u64,
    decode_secs: f64,
    queue_secs: f64,
    ttft_secs: f64,
    last_prefill_tok_s: f64,
    last_decode_tok_s: f64,
}

/// The server's own counters (the cache keeps its own).
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
    /// Expert-load latencies folded in from the engine's read spans (which it then drops), so
    /// that neither memory nor a scrape grows with the number of reads.
    loads: Mutex<LoadHistogram>,
    /// Requests waiting in the queue (not the one running).
    pub queued: AtomicUsize,
    /// 1 while the engine runs a request.
    pub busy: AtomicUsize,
    /// Tokens the kept session's KV cache holds (after the last request).
    pub session_tokens: AtomicUsize,
    /// The process's overhead beyond weights, slots and KV cache, measured after the first
    /// request (the byte model predicts with it from then on).
    pub overhead_after_warmup: Mutex<Option<u64>>,
}

/// Cumulative counts of expert-load latencies per bucket of [`LOAD_BUCKETS`].
#[derive(Debug, Default, Clone)]
struct LoadHistogram {
    le: [u64; LOAD_BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// Upper bounds (seconds) of the expert-load latency histogram's buckets.
const LOAD_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn request(&self, api: Api, outcome: Outcome) {
        *self.lock().requests.entry((api, outcome)).or_default() += 1;
    }

    pub fn run(&self, r: &RunRecord) {
        let mut m = self.lock();
        m.runs += 1;
        m.prompt_tokens += r.prompt_tokens as u64;
        m.reused_tokens += r.reused_tokens as u64;
        m.completion_tokens += r.completion_tokens as u64;
        m.prefill_tokens += (r.prompt_tokens - r.reused_tokens) as u64;
        m.prefill_secs += r.prefill_secs;
        m.decode_steps += r.decode_steps as u64;
        m.decode_secs += r.decode_secs;
        m.queue_secs += r.queue_secs;
        m.ttft_secs += r.ttft_secs;
        if r.prefill_secs > 0.0 {
            m.last_prefill_tok_s = (r.prompt_tokens - r.reused_tokens) as f64 / r.prefill_secs;
        }
        if r.decode_steps > 0 && r.decode_secs > 0.0 {
            m.last_decode_tok_s = r.decode_steps as f64 / r.decode_secs;
        }
    }

    /// Folds the engine's read spans since the last call into the load histogram.
    pub fn absorb_loads(&self, cached: &CachedExperts) {
        let spans = cached.take_spans();
        let mut h = self.loads.lock().unwrap_or_else(|e| e.into_inner());
        for s in spans {
            let lat = s.end - s.start;
            for (n, le) in h.le.iter_mut().zip(LOAD_BUCKETS) {
                *n += u64::from(lat <= le);
            }
            h.count += 1;
            h.sum += lat;
        }
    }

    /// The whole `/metrics` page.
    pub fn render(
        &self,
        cached: Option<&Arc<CachedExperts>>,
        queue_capacity: usize,
        byte_model: Option<&(shadowmoe_engine::offload::ByteModel, usize)>,
    ) -> String {
        let mut w = Writer::default();
        {
            let m = self.lock();
            w.family(
                "shadowmoe_requests_total",
                "counter",
                "HTTP generation requests by API and outcome",
            );
            if m.requests.is_empty() {
                w.sample(
                    "shadowmoe_requests_total",
                    &[("api", "chat_completions"), ("outcome", "ok")],
                    0.0,
                );
            }
            for ((api, outcome), n) in &m.requests {
                w.sample(
                    "shadowmoe_requests_total",
                    &[("api", api.label()), ("outcome", outcome.label())],
                    *n as f64,
                );
            }
            w.counter(
                "shadowmoe_engine_runs_total",
                "Requests the engine ran",
                m.runs as f64,
            );
            w.counter(
                "shadowmoe_prompt_tokens_total",
                "Prompt tokens of the requests run",
                m.prompt_tokens as f64,
            );
            w.counter(
                "shadowmoe_prefix_reused_tokens_total",
                "Prompt tokens whose KV cache was reused from the previous request (sessions)",
                m.reused_tokens as f64,
            );
            w.counter(
                "shadowmoe_prefill_tokens_total",
                "Prompt tokens run through prefill",
                m.prefill_tokens as f64,
            );
            w.counter(
                "shadowmoe_generated_tokens_total",
                "Tokens generated",
                m.completion_tokens as f64,
            );
            w.counter(
                "shadowmoe_prefill_seconds_total",
                "Time spent in prefill",
                m.prefill_secs,
            );
            w.counter(
                "shadowmoe_decode_steps_total",
                "Decode steps (tokens after each request's first)",
                m.decode_steps as f64,
            );
            w.counter(
                "shadowmoe_decode_seconds_total",
                "Time spent decoding after the first token",
                m.decode_secs,
            );
            w.counter(
                "shadowmoe_queue_seconds_total",
                "Time requests waited in the queue",
                m.queue_secs,
            );
            w.counter(
                "shadowmoe_time_to_first_token_seconds_total",
                "Sum over requests of the time from leaving the queue to the first token",
                m.ttft_secs,
            );
            let rate = |n: f64, s: f64| if s > 0.0 { n / s } else { 0.0 };
            w.gauge(
                "shadowmoe_prefill_tokens_per_second",
                "Prefill tok/s over all requests so far",
                rate(m.prefill_tokens as f64, m.prefill_secs),
            );
            w.gauge(
                "shadowmoe_decode_tokens_per_second",
                "Decode tok/s (after the first token) over all requests so far",
                rate(m.decode_steps as f64, m.decode_secs),
            );
            w.gauge(
                "shadowmoe_last_prefill_tokens_per_second",
                "Prefill tok/s of the last request",
                m.last_prefill_tok_s,
            );
            w.gauge(
                "shadowmoe_last_decode_tokens_per_second",
                "Decode tok/s of the last request",
                m.last_decode_tok_s,
            );
        }
        w.gauge(
            "shadowmoe_queue_depth",
            "Requests waiting in the queue",
            self.queued.load(Ordering::Relaxed) as f64,
        );
        w.gauge(
            "shadowmoe_queue_capacity",
            "Requests the queue holds (--queue-depth)",
            queue_capacity as f64,
        );
        w.gauge(
            "shadowmoe_engine_busy",
            "1 while the engine runs a request",
            self.busy.load(Ordering::Relaxed) as f64,
        );
        if let Some(rss) = current_rss_bytes() {
            w.gauge(
                "shadowmoe_rss_bytes",
                "Resident set size of the process now",
                rss as f64,
            );
        }
        let session = self.session_tokens.load(Ordering::Relaxed);
        w.gauge(
            "shadowmoe_session_tokens",
            "Tokens the kept session's KV cache holds",
            session as f64,
        );
        if let Some((bm, slots)) = byte_model {
            let mut bm = *bm;
            if let Some(o) = *self
                .overhead_after_warmup
                .lock()
                .unwrap_or_else(|e| e.into_inner())
            {
                bm.overhead_bytes = o;
            }
            w.gauge(
                "shadowmoe_byte_model_bytes",
                "Resident bytes the byte model predicts for the session's context (its overhead measured after the first request)",
                bm.predict_slots(*slots, session) as f64,
            );
        }
        if let Some(peak) = shadowmoe_engine::peak_rss_bytes() {
            w.gauge(
                "shadowmoe_peak_rss_bytes",
                "Peak resident set size of the process",
                peak as f64,
            );
        }
        if let Some(c) = cached {
            self.absorb_loads(c);
            let loads = self.loads.lock().unwrap_or_else(|e| e.into_inner()).clone();
            cache_metrics(&mut w, c, &loads);
        }
        w.out
    }
}

fn cache_metrics(w: &mut Writer, c: &CachedExperts, loads: &LoadHistogram) {
    let (s, io) = c.stats();
    let resident = c.resident().len();
    w.family(
        "shadowmoe_expert_activations_total",
        "counter",
        "Routed (token, layer, expert) activations by phase",
    );
    w.sample(
        "shadowmoe_expert_activations_total",
        &[("phase", "prefill")],
        s.activations_prefill as f64,
    );
    w.sample(
        "shadowmoe_expert_activations_total",
        &[("phase", "decode")],
        s.activations_decode as f64,
    );
    w.family(
        "shadowmoe_expert_hits_total",
        "counter",
        "Activations whose expert was resident, by phase",
    );
    w.sample(
        "shadowmoe_expert_hits_total",
        &[("phase", "prefill")],
        s.hits_prefill as f64,
    );
    w.sample(
        "shadowmoe_expert_hits_total",
        &[("phase", "decode")],
        s.hits_decode as f64,
    );
    w.family(
        "shadowmoe_expert_hit_rate",
        "gauge",
        "Hit rate so far by phase (all: both)",
    );
    for (phase, r) in [
        ("all", s.hit_rate()),
        ("prefill", s.hit_rate_prefill()),
        ("decode", s.hit_rate_decode()),
    ] {
        w.sample("shadowmoe_expert_hit_rate", &[("phase", phase)], r.unwrap_or(0.0));
    }
    w.family(
        "shadowmoe_expert_misses_total",
        "counter",
        "Misses: cold (first use) or capacity (evicted before)",
    );
    w.sample(
        "shadowmoe_expert_misses_total",
        &[("kind", "cold")],
        s.cold_misses as f64,
    );
    w.sample(
        "shadowmoe_expert_misses_total",
        &[("kind", "capacity")],
        s.capacity_misses as f64,
    );
    w.counter(
        "shadowmoe_expert_in_flight_activations_total",
        "Activations whose expert was still loading",
        s.in_flight_activations as f64,
    );
    w.counter(
        "shadowmoe_expert_demand_loads_total",
        "Experts loaded on demand",
        s.demand_loads as f64,
    );
    w.counter(
        "shadowmoe_expert_evictions_total",
        "Experts evicted",
        s.evictions as f64,
    );
    w.counter(
        "shadowmoe_expert_fallbacks_total",
        "Activations served by no expert (skip-on-miss)",
        s.fallbacks as f64,
    );
    w.family(
        "shadowmoe_prefetches_total",
        "counter",
        "Prefetches issued, used, late and wasted",
    );
    for (k, v) in [
        ("issued", s.prefetch_issued),
        ("used", s.prefetch_used),
        ("late", s.prefetch_late),
        ("wasted", s.prefetch_wasted),
    ] {
        w.sample("shadowmoe_prefetches_total", &[("outcome", k)], v as f64);
    }
    w.counter(
        "shadowmoe_expert_bytes_read_total",
        "Bytes read from disk for experts",
        io.bytes_read as f64,
    );
    w.counter(
        "shadowmoe_expert_stall_seconds_total",
        "Wall time the forward pass waited on expert loads",
        io.stall.as_secs_f64(),
    );
    w.counter(
        "shadowmoe_expert_load_errors_total",
        "Expert loads that failed",
        io.load_errors as f64,
    );
    w.gauge(
        "shadowmoe_resident_experts",
        "Experts resident in the cache now",
        resident as f64,
    );
    w.gauge(
        "shadowmoe_expert_slots",
        "Expert slots of the cache",
        c.total_slots() as f64,
    );
    // The load latency histogram, from every read's span on its worker (folded in as they come).
    let name = "shadowmoe_expert_load_seconds";
    w.family(name, "histogram", "Latency of one expert read on an I/O worker");
    for (n, le) in loads.le.iter().zip(LOAD_BUCKETS) {
        w.sample(&format!("{name}_bucket"), &[("le", &format!("{le}"))], *n as f64);
    }
    w.sample(&format!("{name}_bucket"), &[("le", "+Inf")], loads.count as f64);
    w.sample(&format!("{name}_sum"), &[], loads.sum);
    w.sample(&format!("{name}_count"), &[], loads.count as f64);
}

/// Resident set size now (Linux: VmRSS).
fn current_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Prometheus text-format writer.
#[derive(Default)]
struct Writer {
    out: String,
}

impl Writer {
    fn family(&mut self, name: &str, ty: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {ty}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            let _ = write!(self.out, "{{{}}}", l.join(","));
        }
        let _ = writeln!(self.out, " {v}");
    }

    fn counter(&mut self, name: &str, help: &str, v: f64) {
        self.family(name, "counter", help);
        self.sample(name, &[], v);
    }

    fn gauge(&mut self, name: &str, help: &str, v: f64) {
        self.family(name, "gauge", help);
        self.sample(name, &[], v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_families_with_labels() {
        let m = Metrics::default();
        m.request(Api::Messages, Outcome::Ok);
        m.run(&RunRecord {
            prompt_tokens: 10,
            reused_tokens: 4,
            completion_tokens: 3,
            prefill_secs: 0.5,
            decode_steps: 2,
            decode_secs: 0.5,
            ..Default::default()
        });
        let text = m.render(None, 8, None);
        assert!(
            text.contains("shadowmoe_requests_total{api=\"messages\",outcome=\"ok\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("shadowmoe_prefill_tokens_per_second 12\n"),
            "{text}"
        );
        assert!(
            text.contains("shadowmoe_prefix_reused_tokens_total 4\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE shadowmoe_queue_capacity gauge\nshadowmoe_queue_capacity 8\n"));
    }
}
