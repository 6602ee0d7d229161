//! Run metrics, with the definitions of DESIGN.md: what `--metrics-out` writes and what
//! `generate` summarises.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::cache::CacheStats;

/// I/O measurements of a live run.
#[derive(Debug, Clone, Default)]
pub struct IoStats {
    pub bytes_read: u64,
    /// Wall time the forward pass waited on expert loads.
    pub stall: Duration,
    /// Loads that failed (the run stops at a failed demand load).
    pub load_errors: u64,
    /// When each read ran on its worker.
    pub spans: Vec<ReadSpan>,
}

impl IoStats {
    /// Per-load read latency on the worker, in seconds.
    pub fn latencies(&self) -> Vec<f64> {
        self.spans.iter().map(|s| s.end - s.start).collect()
    }
}

/// One read on a worker: seconds since the process's first read, and whether a decode pass
/// was running when it landed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReadSpan {
    pub start: f64,
    pub end: f64,
    pub decode: bool,
}

impl ReadSpan {
    /// The span of a read that began at `started` and took `latency`.
    pub fn new(started: Instant, latency: Duration, decode: bool) -> Self {
        static EPOCH: OnceLock<Instant> = OnceLock::new();
        let epoch = *EPOCH.get_or_init(Instant::now);
        let start = started.saturating_duration_since(epoch).as_secs_f64();
        Self {
            start,
            end: start + latency.as_secs_f64(),
            decode,
        }
    }
}

/// How the disk was used by a set of reads: time with at least one read in flight, and the
/// summed read time (their ratio is the mean number of reads in flight while reading).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct DiskActivity {
    pub reads: usize,
    pub busy_secs: f64,
    pub read_secs: f64,
}

impl DiskActivity {
    /// Of the spans `keep` selects.
    pub fn of(spans: &[ReadSpan], keep: impl Fn(&ReadSpan) -> bool) -> Self {
        let mut v: Vec<(f64, f64)> = spans
            .iter()
            .filter(|s| keep(s))
            .map(|s| (s.start, s.end))
            .collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut out = Self {
            reads: v.len(),
            ..Self::default()
        };
        let mut cur: Option<(f64, f64)> = None;
        for (s, e) in v {
            out.read_secs += e - s;
            cur = match cur {
                Some((cs, ce)) if s <= ce => Some((cs, ce.max(e))),
                Some((cs, ce)) => {
                    out.busy_secs += ce - cs;
                    Some((s, e))
                }
                None => Some((s, e)),
            };
        }
        if let Some((cs, ce)) = cur {
            out.busy_secs += ce - cs;
        }
        out
    }

    /// Mean reads in flight while at least one was.
    pub fn in_flight(&self) -> Option<f64> {
        (self.busy_secs > 0.0).then(|| self.read_secs / self.busy_secs)
    }

    /// Bytes over the time the disk was busy: the aggregate throughput the reads got.
    pub fn gbps(&self, bytes: u64) -> Option<f64> {
        (self.busy_secs > 0.0).then(|| bytes as f64 / self.busy_secs / 1e9)
    }
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
    /// Mean reads in flight while the disk was busy, and bytes over that busy time (the
    /// aggregate throughput the reads got); the first also for reads that landed in decode.
    pub reads_in_flight: Option<f64>,
    pub disk_gbps: Option<f64>,
    pub decode_reads_in_flight: Option<f64>,
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
        self.load_latency = Latency::of(&io.latencies());
        let all = DiskActivity::of(&io.spans, |_| true);
        self.io_gbps = (all.read_secs > 0.0).then(|| io.bytes_read as f64 / all.read_secs / 1e9);
        self.reads_in_flight = all.in_flight();
        self.disk_gbps = all.gbps(io.bytes_read);
        self.decode_reads_in_flight = DiskActivity::of(&io.spans, |s| s.decode).in_flight();
        self.load_errors = io.load_errors;
    }

    /// A few lines for the end of `generate`.
    pub fn summary(&self) -> String {
        let pct = |x: Option<f64>| x.map_or("n/a".into(), |v| format!("{:.1}%", v * 100.0));
        let gb = |b: u64| format!("{:.2} GB", b as f64 / 1e9);
        // No per-read record (a server folds them into /metrics' histogram as it goes): say
        // so rather than print zeros.
        let latency = if self.load_latency.count == 0 && self.demand_loads > 0 {
            "load latency in /metrics".to_string()
        } else {
            format!(
                "load p50/p95/p99 {:.2}/{:.2}/{:.2} ms",
                self.load_latency.p50_ms, self.load_latency.p95_ms, self.load_latency.p99_ms
            )
        };
        format!(
            "experts: hit rate {} (prefill {}, decode {}), misses {} cold + {} capacity, {} loads, {} read ({} via {}), stall {:.3}s, {latency}, {} reads in flight at {} while reading, fallback rate {}\nmemory: peak RSS {} vs byte model {}",
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
            self.reads_in_flight.map_or("n/a".into(), |v| format!("{v:.2}")),
            self.disk_gbps.map_or("n/a".into(), |v| format!("{v:.2} GB/s")),
            pct(self.fallback_rate),
            self.peak_rss_bytes.map_or("n/a".into(), gb),
            gb(self.predicted_rss_bytes),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(start: f64, end: f64) -> ReadSpan {
        ReadSpan {
            start,
            end,
            decode: start >= 10.0,
        }
    }

    #[test]
    fn disk_activity_counts_overlap_once() {
        // Two reads overlapping on [1, 2], a gap, then one alone: busy 3 + 1, read 2 + 2 + 1.
        let spans = [span(0.0, 2.0), span(1.0, 3.0), span(10.0, 11.0)];
        let a = DiskActivity::of(&spans, |_| true);
        assert_eq!(a.reads, 3);
        assert!((a.busy_secs - 4.0).abs() < 1e-12, "{a:?}");
        assert!((a.read_secs - 5.0).abs() < 1e-12);
        assert!((a.in_flight().unwrap() - 1.25).abs() < 1e-12);
        assert!((a.gbps(8_000_000_000).unwrap() - 2.0).abs() < 1e-12);
        let d = DiskActivity::of(&spans, |s| s.decode);
        assert_eq!((d.reads, d.in_flight()), (1, Some(1.0)));
        assert_eq!(DiskActivity::of(&[], |_| true).in_flight(), None);
    }
}
