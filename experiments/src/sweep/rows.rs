//! The rows of a sweep: one result row per configuration and repetition, the results frame
//! (Parquet and CSV) and the median/spread summary.

use super::*;
use shadowmoe_engine::predict::PredictStats;

/// One result row. Its serde form is how a running sweep keeps finished rows on disk
/// (`rows.partial/`, read back by `--resume`): floats as their IEEE-754 bits, so NaN, the
/// infinities and every last digit come back exactly.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Row {
    pub(super) combo: Combo,
    pub(super) mode: String,
    pub(super) repeat: usize,
    #[serde(with = "bits")]
    pub(super) hit_rate: f64,
    #[serde(with = "bits")]
    pub(super) hit_rate_prefill: f64,
    #[serde(with = "bits")]
    pub(super) hit_rate_decode: f64,
    pub(super) cold_misses: u64,
    pub(super) capacity_misses: u64,
    pub(super) demand_loads: u64,
    pub(super) evictions: u64,
    pub(super) bytes_read: u64,
    #[serde(with = "bits")]
    pub(super) stall_secs: f64,
    #[serde(with = "bits")]
    pub(super) est_decode_tok_s: f64,
    #[serde(with = "bits")]
    pub(super) fallback_rate: f64,
    pub(super) prefetch_issued: u64,
    pub(super) prefetch_used: u64,
    pub(super) prefetch_late: u64,
    pub(super) prefetch_wasted: u64,
    #[serde(with = "bits")]
    pub(super) prefetch_precision: f64,
    /// Per decode token, milliseconds: all, and its compute, stall and predictor parts.
    #[serde(with = "bits")]
    pub(super) decode_ms_per_token: f64,
    #[serde(with = "bits")]
    pub(super) compute_ms_per_token: f64,
    #[serde(with = "bits")]
    pub(super) stall_ms_per_token: f64,
    #[serde(with = "bits")]
    pub(super) predictor_ms_per_token: f64,
    /// capacity × MoE layers × expert bytes.
    pub(super) modelled_cache_bytes: u64,
    /// `direct`, `pread`, `mmap` (the mode a live run actually used), or `modelled`.
    pub(super) io_mode: String,
    /// `async` or `inline` (empty without prefetching).
    pub(super) predictor_timing: String,
    /// Bytes read per decode token.
    #[serde(with = "bits")]
    pub(super) bytes_per_token: f64,
    /// The predictor's own time per decode token, wherever it runs (its thread, when async).
    #[serde(with = "bits")]
    pub(super) predictor_busy_ms_per_token: f64,
    pub(super) predictor_calls: u64,
    /// Predictions that arrived after their target layer had routed (dropped).
    pub(super) predictions_late: u64,
    /// Routed layers the predictor never reached (it skipped to a newer one).
    pub(super) predictions_skipped: u64,
    pub(super) prefetch_cancelled: u64,
    // Live only.
    /// Median and 95th percentile of one load's read time on its I/O worker, ms.
    #[serde(with = "opt_bits")]
    pub(super) read_ms_p50: Option<f64>,
    #[serde(with = "opt_bits")]
    pub(super) read_ms_p95: Option<f64>,
    /// Bytes over the summed read time of the loads: each read's own throughput, GB/s.
    #[serde(with = "opt_bits")]
    pub(super) read_gbps: Option<f64>,
    // Both modes.
    /// Reads that landed during decode: mean reads in flight while the disk was busy, and
    /// their bytes over that busy time (the aggregate throughput they got), GB/s.
    #[serde(with = "opt_bits")]
    pub(super) decode_reads_in_flight: Option<f64>,
    #[serde(with = "opt_bits")]
    pub(super) decode_disk_gbps: Option<f64>,
    #[serde(with = "opt_bits")]
    pub(super) decode_tok_s: Option<f64>,
    #[serde(with = "opt_bits")]
    pub(super) prefill_tok_s: Option<f64>,
    pub(super) peak_rss_bytes: Option<u64>,
    pub(super) modelled_total_bytes: Option<u64>,
    #[serde(with = "opt_bits")]
    pub(super) top1_agreement: Option<f64>,
    #[serde(with = "opt_bits")]
    pub(super) kl_divergence: Option<f64>,
    #[serde(with = "opt_bits")]
    pub(super) perplexity: Option<f64>,
    #[serde(with = "opt_bits")]
    pub(super) perplexity_exact: Option<f64>,
    #[serde(with = "opt_bits")]
    pub(super) repetition: Option<f64>,
    pub(super) error: String,
}

/// `f64` as its bits (JSON has no NaN or infinity, and a decimal form is one more place for a
/// value to drift).
mod bits {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(v.to_bits())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        u64::deserialize(d).map(f64::from_bits)
    }
}

/// `Option<f64>` as its bits, `null` for `None`.
mod opt_bits {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(x) => s.serialize_some(&x.to_bits()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        Option::<u64>::deserialize(d).map(|v| v.map(f64::from_bits))
    }
}

impl Row {
    pub(super) fn new(combo: &Combo, mode: &str, repeat: usize) -> Self {
        Row {
            combo: combo.clone(),
            mode: mode.into(),
            repeat,
            hit_rate: f64::NAN,
            hit_rate_prefill: f64::NAN,
            hit_rate_decode: f64::NAN,
            cold_misses: 0,
            capacity_misses: 0,
            demand_loads: 0,
            evictions: 0,
            bytes_read: 0,
            stall_secs: 0.0,
            est_decode_tok_s: f64::NAN,
            fallback_rate: f64::NAN,
            prefetch_issued: 0,
            prefetch_used: 0,
            prefetch_late: 0,
            prefetch_wasted: 0,
            prefetch_precision: f64::NAN,
            decode_ms_per_token: f64::NAN,
            compute_ms_per_token: f64::NAN,
            stall_ms_per_token: f64::NAN,
            predictor_ms_per_token: f64::NAN,
            modelled_cache_bytes: 0,
            io_mode: String::new(),
            predictor_timing: String::new(),
            bytes_per_token: f64::NAN,
            predictor_busy_ms_per_token: 0.0,
            predictor_calls: 0,
            predictions_late: 0,
            predictions_skipped: 0,
            prefetch_cancelled: 0,
            read_ms_p50: None,
            read_ms_p95: None,
            read_gbps: None,
            decode_reads_in_flight: None,
            decode_disk_gbps: None,
            decode_tok_s: None,
            prefill_tok_s: None,
            peak_rss_bytes: None,
            modelled_total_bytes: None,
            top1_agreement: None,
            kl_divergence: None,
            perplexity: None,
            perplexity_exact: None,
            repetition: None,
            error: String::new(),
        }
    }

    pub(super) fn predict_stats(&mut self, p: &PredictStats, decode_tokens: u64) {
        let t = decode_tokens.max(1) as f64;
        // On the critical path: the forward thread's share (handing over, or running inline).
        self.predictor_ms_per_token = p.forward_decode_secs / t * 1e3;
        self.predictor_busy_ms_per_token = p.predictor_secs / t * 1e3;
        self.predictor_calls = p.calls;
        self.predictions_late = p.late;
        self.predictions_skipped = p.skipped;
        self.prefetch_cancelled = p.cancelled;
    }

    pub(super) fn cache_stats(&mut self, s: &CacheStats) {
        self.hit_rate = s.hit_rate().unwrap_or(f64::NAN);
        self.hit_rate_prefill = s.hit_rate_prefill().unwrap_or(f64::NAN);
        self.hit_rate_decode = s.hit_rate_decode().unwrap_or(f64::NAN);
        self.cold_misses = s.cold_misses;
        self.capacity_misses = s.capacity_misses;
        self.demand_loads = s.demand_loads;
        self.evictions = s.evictions;
        self.fallback_rate = s.fallback_rate().unwrap_or(f64::NAN);
        self.prefetch_issued = s.prefetch_issued;
        self.prefetch_used = s.prefetch_used;
        self.prefetch_late = s.prefetch_late;
        self.prefetch_wasted = s.prefetch_wasted;
        self.prefetch_precision = s.prefetch_precision().unwrap_or(f64::NAN);
    }
}

/// What every row of a sweep shares: the harness and the model and trace it ran on.
pub(super) struct RunIds<'a> {
    pub(super) model_id: &'a str,
    pub(super) config_sha256: &'a str,
    pub(super) trace: &'a str,
}

pub(super) fn frame(rows: &[Row], ids: &RunIds<'_>) -> PolarsResult<DataFrame> {
    let s = |f: &dyn Fn(&Row) -> String| rows.iter().map(f).collect::<Vec<String>>();
    let u = |f: &dyn Fn(&Row) -> u64| rows.iter().map(f).collect::<Vec<u64>>();
    let fl = |f: &dyn Fn(&Row) -> f64| rows.iter().map(f).collect::<Vec<f64>>();
    let of = |f: &dyn Fn(&Row) -> Option<f64>| rows.iter().map(f).collect::<Vec<Option<f64>>>();
    let ou = |f: &dyn Fn(&Row) -> Option<u64>| rows.iter().map(f).collect::<Vec<Option<u64>>>();
    let n = rows.len();
    DataFrame::new(
        n,
        vec![
            Column::new("mode".into(), s(&|r| r.mode.clone())),
            Column::new("capacity".into(), u(&|r| r.combo.capacity as u64)),
            Column::new("pinning".into(), s(&|r| r.combo.pinning.clone())),
            Column::new("prefetch_depth".into(), u(&|r| r.combo.prefetch_depth as u64)),
            Column::new("prefetch_span".into(), s(&|r| r.combo.prefetch_span.clone())),
            Column::new("predictor_timing".into(), s(&|r| r.predictor_timing.clone())),
            Column::new("io_mode".into(), s(&|r| r.io_mode.clone())),
            Column::new("predictor".into(), s(&|r| r.combo.predictor.clone())),
            Column::new("policy".into(), s(&|r| r.combo.policy.clone())),
            Column::new("on_miss".into(), s(&|r| r.combo.on_miss.clone())),
            Column::new("repeat".into(), u(&|r| r.repeat as u64)),
            Column::new("hit_rate".into(), fl(&|r| r.hit_rate)),
            Column::new("hit_rate_prefill".into(), fl(&|r| r.hit_rate_prefill)),
            Column::new("hit_rate_decode".into(), fl(&|r| r.hit_rate_decode)),
            Column::new("cold_misses".into(), u(&|r| r.cold_misses)),
            Column::new("capacity_misses".into(), u(&|r| r.capacity_misses)),
            Column::new("demand_loads".into(), u(&|r| r.demand_loads)),
            Column::new("evictions".into(), u(&|r| r.evictions)),
            Column::new("bytes_read".into(), u(&|r| r.bytes_read)),
            Column::new("stall_secs".into(), fl(&|r| r.stall_secs)),
            Column::new("est_decode_tok_s".into(), fl(&|r| r.est_decode_tok_s)),
            Column::new("fallback_rate".into(), fl(&|r| r.fallback_rate)),
            Column::new("prefetch_issued".into(), u(&|r| r.prefetch_issued)),
            Column::new("prefetch_used".into(), u(&|r| r.prefetch_used)),
            Column::new("prefetch_late".into(), u(&|r| r.prefetch_late)),
            Column::new("prefetch_wasted".into(), u(&|r| r.prefetch_wasted)),
            Column::new("prefetch_precision".into(), fl(&|r| r.prefetch_precision)),
            Column::new("decode_ms_per_token".into(), fl(&|r| r.decode_ms_per_token)),
            Column::new("compute_ms_per_token".into(), fl(&|r| r.compute_ms_per_token)),
            Column::new("stall_ms_per_token".into(), fl(&|r| r.stall_ms_per_token)),
            Column::new("predictor_ms_per_token".into(), fl(&|r| r.predictor_ms_per_token)),
            Column::new("modelled_cache_bytes".into(), u(&|r| r.modelled_cache_bytes)),
            Column::new("bytes_per_token".into(), fl(&|r| r.bytes_per_token)),
            Column::new(
                "predictor_busy_ms_per_token".into(),
                fl(&|r| r.predictor_busy_ms_per_token),
            ),
            Column::new("predictor_calls".into(), u(&|r| r.predictor_calls)),
            Column::new("predictions_late".into(), u(&|r| r.predictions_late)),
            Column::new("predictions_skipped".into(), u(&|r| r.predictions_skipped)),
            Column::new("prefetch_cancelled".into(), u(&|r| r.prefetch_cancelled)),
            Column::new("read_ms_p50".into(), of(&|r| r.read_ms_p50)),
            Column::new("read_ms_p95".into(), of(&|r| r.read_ms_p95)),
            Column::new("read_gbps".into(), of(&|r| r.read_gbps)),
            Column::new("decode_reads_in_flight".into(), of(&|r| r.decode_reads_in_flight)),
            Column::new("decode_disk_gbps".into(), of(&|r| r.decode_disk_gbps)),
            Column::new("decode_tok_s".into(), of(&|r| r.decode_tok_s)),
            Column::new("prefill_tok_s".into(), of(&|r| r.prefill_tok_s)),
            Column::new("peak_rss_bytes".into(), ou(&|r| r.peak_rss_bytes)),
            Column::new("modelled_total_bytes".into(), ou(&|r| r.modelled_total_bytes)),
            Column::new("top1_agreement".into(), of(&|r| r.top1_agreement)),
            Column::new("kl_divergence".into(), of(&|r| r.kl_divergence)),
            Column::new("perplexity".into(), of(&|r| r.perplexity)),
            Column::new("perplexity_exact".into(), of(&|r| r.perplexity_exact)),
            Column::new("repetition".into(), of(&|r| r.repetition)),
            Column::new("error".into(), s(&|r| r.error.clone())),
            Column::new(
                "harness_version".into(),
                s(&|_| env!("CARGO_PKG_VERSION").to_string()),
            ),
            Column::new(
                "harness_commit".into(),
                s(&|_| env!("SHADOWMOE_COMMIT").to_string()),
            ),
            Column::new("model_id".into(), s(&|_| ids.model_id.to_string())),
            Column::new("config_sha256".into(), s(&|_| ids.config_sha256.to_string())),
            Column::new("trace".into(), s(&|_| ids.trace.to_string())),
        ],
    )
}

/// The frame as CSV (strings quoted when they hold a comma or a quote).
pub(super) fn csv(df: &DataFrame) -> Result<String> {
    let cols = df.columns();
    let mut text = cols
        .iter()
        .map(|c| c.name().to_string())
        .collect::<Vec<_>>()
        .join(",");
    text.push('\n');
    for i in 0..df.height() {
        let cells: Vec<String> = cols
            .iter()
            .map(|c| {
                let v = c.get(i).map(|v| v.to_string()).unwrap_or_default();
                let v = v.trim_matches('"').to_string();
                if v.contains(',') || v.contains('"') {
                    format!("\"{}\"", v.replace('"', "\"\""))
                } else {
                    v
                }
            })
            .collect();
        text += &cells.join(",");
        text.push('\n');
    }
    Ok(text)
}

/// One line per configuration: median and spread (min–max) over repetitions of the hit rate
/// and decode tok/s (measured live, modelled in sim).
pub(super) fn summary(rows: &[Row]) -> String {
    let mut groups: Vec<(&Combo, Vec<&Row>)> = Vec::new();
    for r in rows {
        match groups.iter_mut().find(|(c, _)| **c == r.combo) {
            Some((_, v)) => v.push(r),
            None => groups.push((&r.combo, vec![r])),
        }
    }
    let med = |mut v: Vec<f64>| -> (f64, f64, f64) {
        v.retain(|x| x.is_finite());
        if v.is_empty() {
            return (f64::NAN, f64::NAN, f64::NAN);
        }
        v.sort_by(f64::total_cmp);
        let m = if v.len() % 2 == 1 {
            v[v.len() / 2]
        } else {
            (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
        };
        (m, v[0], v[v.len() - 1])
    };
    let mut out = format!(
        "{:>8} {:<24} {:>5} {:<6} {:<28} {:<6} {:<5} {:>3} {:>17} {:>22} {:>9}\n",
        "capacity",
        "pinning",
        "depth",
        "span",
        "predictor",
        "policy",
        "miss",
        "n",
        "decode hit (min-max)",
        "decode tok/s (min-max)",
        "fallback"
    );
    for (c, rs) in groups {
        let (h, hl, hh) = med(rs.iter().map(|r| r.hit_rate_decode).collect());
        let (t, tl, th) = med(rs
            .iter()
            .map(|r| r.decode_tok_s.unwrap_or(r.est_decode_tok_s))
            .collect());
        let (f, _, _) = med(rs.iter().map(|r| r.fallback_rate).collect());
        let pin = if c.pinning.len() > 24 {
            format!("…{}", &c.pinning[c.pinning.len() - 23..])
        } else {
            c.pinning.clone()
        };
        let pred = if c.predictor.len() > 28 {
            format!("…{}", &c.predictor[c.predictor.len() - 27..])
        } else {
            c.predictor.clone()
        };
        let errors = rs.iter().filter(|r| !r.error.is_empty()).count();
        out += &format!(
            "{:>8} {:<24} {:>5} {:<6} {:<28} {:<6} {:<5} {:>3} {:>6.3} ({:.3}-{:.3}) {:>8.1} ({:.1}-{:.1}) {:>9.4}{}\n",
            c.capacity,
            pin,
            c.prefetch_depth,
            c.prefetch_span,
            pred,
            c.policy,
            c.on_miss,
            rs.len(),
            h,
            hl,
            hh,
            t,
            tl,
            th,
            f,
            if errors > 0 {
                format!("  ({errors} failed: see the error column)")
            } else {
                String::new()
            }
        );
    }
    out
}

/// Rows read back from a results frame, with what [`summary`] reads (the configuration, the
/// repetition, hit rates, tok/s, fallback rate and error); the other metrics are left unset.
pub(super) fn rows_for_summary(df: &DataFrame) -> Result<Vec<Row>> {
    let col = |name: &str| -> Result<&Series> {
        Ok(df
            .column(name)
            .map_err(|_| anyhow::anyhow!("results: no column `{name}`"))?
            .as_materialized_series())
    };
    let strs = |name: &str| -> Result<Vec<String>> {
        Ok(col(name)?
            .str()?
            .iter()
            .map(|v| v.unwrap_or_default().to_string())
            .collect())
    };
    let ints =
        |name: &str| -> Result<Vec<u64>> { Ok(col(name)?.u64()?.iter().map(|v| v.unwrap_or(0)).collect()) };
    let floats = |name: &str| -> Result<Vec<Option<f64>>> { Ok(col(name)?.f64()?.iter().collect()) };
    let (mode, pinning, span, predictor, policy, on_miss, error) = (
        strs("mode")?,
        strs("pinning")?,
        strs("prefetch_span")?,
        strs("predictor")?,
        strs("policy")?,
        strs("on_miss")?,
        strs("error")?,
    );
    let (capacity, depth, repeat) = (ints("capacity")?, ints("prefetch_depth")?, ints("repeat")?);
    let (hit, tok, est, fallback) = (
        floats("hit_rate_decode")?,
        floats("decode_tok_s")?,
        floats("est_decode_tok_s")?,
        floats("fallback_rate")?,
    );
    Ok((0..df.height())
        .map(|i| {
            let combo = Combo {
                capacity: capacity[i] as usize,
                pinning: pinning[i].clone(),
                prefetch_depth: depth[i] as usize,
                prefetch_span: span[i].clone(),
                predictor: predictor[i].clone(),
                policy: policy[i].clone(),
                on_miss: on_miss[i].clone(),
            };
            let mut r = Row::new(&combo, &mode[i], repeat[i] as usize);
            r.hit_rate_decode = hit[i].unwrap_or(f64::NAN);
            r.decode_tok_s = tok[i];
            r.est_decode_tok_s = est[i].unwrap_or(f64::NAN);
            r.fallback_rate = fallback[i].unwrap_or(f64::NAN);
            r.error = error[i].clone();
            r
        })
        .collect())
}
