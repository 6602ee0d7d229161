//! Run metrics, with the definitions of DESIGN.md: what `--metrics-out` writes and what
//! `generate` summarises.

use std::time::Duration;

use serde::Serialize;

use super::cache::CacheStats;

/// I/O measurements of a live run.
#[derive(Debug, Clone, Default)]
pub struct IoStats {
    pub bytes_read: u64,
    /// Wall time the forward pass waited on expert loads.
    pub stall: Duration,
    /// Per-load read latency on the worker, in seconds.
    pub latencies: Vec<f64>,
    /// Loads that failed (the run stops at a failed demand load).
    pub load_errors: u64,
}

/// Percentiles of load latency, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Latency {
    pub count: usize,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
}

impl Latency {
    pub fn of(samples: &[f64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let q = |p: f64| s[((s.len() - 1) as f64 * p).round() as usize] * 1e3;
        Self {
            count: s.len(),
            mean_ms: s.iter().sum::<f64>() / s.len() as f64 * 1e3,
            p50_ms: q(0.50),
            p95_ms: q(0.95),
            p99_ms: q(0.99),
        }
    }
}

/// Everything a run reports about its experts, as `--metrics-out` JSON.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunMetrics {
    /// `pread`, `direct`, `mmap`: the mode actually used (a refused O_DIRECT reads as `pread`).
    pub io_mode: String,
    pub io_mode_requested: String,
    /// `pack` or `safetensors`.
    pub expert_source: String,
    pub io_threads: usize,
    pub policy: String,
    /// `per-layer` or `global`.
    pub budget_kind: String,
    /// Experts per MoE layer (per-layer budget) or slots in all (global).
    pub capacity: usize,
    pub on_miss: String,
    pub pinned_experts: usize,
    pub expert_bytes: u64,
    pub activations: u64,
    pub activations_prefill: u64,
    pub activations_decode: u64,
    pub hits: u64,
    pub hit_rate: Option<f64>,
    pub hit_rate_prefill: Option<f64>,
    pub hit_rate_decode: Option<f64>,
    pub cold_misses: u64,
    pub capacity_misses: u64,
    pub in_flight_activations: u64,
    pub demand_loads: u64,
    pub evictions: u64,
    pub bytes_read: u64,
    pub stall_secs: f64,
    pub load_latency: Latency,
    /// Bytes read over the summed read time of the loads (per-load throughput).
    pub io_gbps: Option<f64>,
    pub fallbacks: u64,
    pub fallback_rate: Option<f64>,
    pub prefetch_issued: u64,
    pub prefetch_used: u64,
    pub prefetch_late: u64,
    pub prefetch_wasted: u64,
    pub prefetch_precision: Option<f64>,
    pub load_errors: u64,
    pub peak_rss_bytes: Option<u64>,
    pub predicted_rss_bytes: u64,
    pub prefill_tok_s: Option<f64>,
    pub decode_tok_s: Option<f64>,
}

impl RunMetrics {
    /// Fills the cache and I/O counters.
    pub fn set_counters(&mut self, s: &CacheStats, io: &IoStats) {
        self.activations = s.activations();
        self.activations_prefill = s.activations_prefill;
        self.activations_decode = s.activations_decode;
        self.hits = s.hits_prefill + s.hits_decode;
        self.hit_rate = s.hit_rate();
        self.hit_rate_prefill = s.hit_rate_prefill();
        self.hit_rate_decode = s.hit_rate_decode();
        self.cold_misses = s.cold_misses;
        self.capacity_misses = s.capacity_misses;
        self.in_flight_activations = s.in_flight_activations;
        self.demand_loads = s.demand_loads;
        self.evictions = s.evictions;
        self.fallbacks = s.fallbacks;
        self.fallback_rate = s.fallback_rate();
        self.prefetch_issued = s.prefetch_issued;
        self.prefetch_used = s.prefetch_used;
        self.prefetch_late = s.prefetch_late;
        self.prefetch_wasted = s.prefetch_wasted;
        self.prefetch_precision = s.prefetch_precision();
        self.bytes_read = io.bytes_read;
        self.stall_secs = io.stall.as_secs_f64();
        self.load_latency = Latency::of(&io.latencies);
        let busy: f64 = io.latencies.iter().sum();
        self.io_gbps = (busy > 0.0).then(|| io.bytes_read as f64 / busy / 1e9);
        self.load_errors = io.load_errors;
    }

    /// A few lines for the end of `generate`.
    pub fn summary(&self) -> String {
        let pct = |x: Option<f64>| x.map_or("n/a".into(), |v| format!("{:.1}%", v * 100.0));
        let gb = |b: u64| format!("{:.2} GB", b as f64 / 1e9);
        format!(
            "experts: hit rate {} (prefill {}, decode {}), misses {} cold + {} capacity, {} loads, {} read ({} via {}), stall {:.3}s, load p50/p95/p99 {:.2}/{:.2}/{:.2} ms, fallback rate {}\nmemory: peak RSS {} vs byte model {}",
            pct(self.hit_rate),
            pct(self.hit_rate_prefill),
            pct(self.hit_rate_decode),
            self.cold_misses,
            self.capacity_misses,
            self.demand_loads,
            gb(self.bytes_read),
            self.expert_source,
            self.io_mode,
            self.stall_secs,
            self.load_latency.p50_ms,
            self.load_latency.p95_ms,
            self.load_latency.p99_ms,
            pct(self.fallback_rate),
            self.peak_rss_bytes.map_or("n/a".into(), gb),
            gb(self.predicted_rss_bytes),
        )
    }
}
