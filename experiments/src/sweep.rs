//! `bench-sweep`: every combination of capacity, pinning, prefetch depth, predictor, policy and
//! miss mode, simulated on a trace; one row per configuration in `results.parquet` (and a CSV
//! twin) inside a dated run folder with a manifest.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use polars::prelude::*;
use serde::Serialize;
use shadowmoe_engine::offload::cache::Budget;
use shadowmoe_engine::offload::{ExpertKey, MissMode, PolicyKind, Profile};
use shadowmoe_trace::{RequestRouting, Trace};

use crate::args::{parse_list, parse_shard};
use crate::sim::{IoModel, SimConfig, SimPredictor, simulate};

/// Flags of `bench-sweep`.
#[derive(Args, Debug, Clone)]
pub struct SweepArgs {
    /// Experts per MoE layer: a list or range (160..256:32).
    #[arg(long)]
    pub capacity: String,
    /// Pinning: `off` and/or profiles PROFILE[:K] (comma-separated).
    #[arg(long, default_value = "off")]
    pub pinning: String,
    /// Prefetch depths in MoE layers (0: none).
    #[arg(long, default_value = "0")]
    pub prefetch_depth: String,
    /// Experts prefetched per layer (default: the model's top-k).
    #[arg(long)]
    pub prefetch_k: Option<usize>,
    /// Predictors: none, popularity, previous-token, gate-lookahead, oracle, shadow:PATH.
    #[arg(long, default_value = "none")]
    pub predictor: String,
    /// Eviction policies: lru, lfu, lcp, belady.
    #[arg(long, default_value = "lru")]
    pub policy: String,
    /// Miss handling: sync, skip.
    #[arg(long, default_value = "sync")]
    pub on_miss: String,
    /// sim (replay --trace) or live (run --model on --dataset).
    #[arg(long, default_value = "sim")]
    pub mode: String,
    /// The trace to replay (sim mode).
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// The checkpoint (gate-lookahead's routers; live mode).
    #[arg(long)]
    pub model: Option<String>,
    /// Bandwidth of one I/O reader, GB/s.
    #[arg(long, default_value_t = 1.0)]
    pub ssd_gbps: f64,
    /// Latency of one expert read, microseconds.
    #[arg(long, default_value_t = 100.0)]
    pub ssd_latency_us: f64,
    #[arg(long, default_value_t = 4)]
    pub io_threads: usize,
    /// Bytes of one expert (default: the model's, from the trace's config); e.g. 1769472 models
    /// Qwen3-Coder-Next's 4-bit experts on this routing.
    #[arg(long)]
    pub expert_bytes: Option<u64>,
    /// Compute time of one MoE layer for one token, milliseconds.
    #[arg(long, default_value_t = 0.5)]
    pub layer_ms: f64,
    /// Backend of `shadow:` predictors: auto (a hardware GPU, else the CPU), wgpu (any
    /// adapter, software ones included) or cpu.
    #[arg(long, default_value = "auto")]
    pub backend: String,
    /// Run one share of the combinations: I/N.
    #[arg(long)]
    pub shard: Option<String>,
    /// Run folder (default: runs/<date>-sweep).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// One configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Combo {
    pub capacity: usize,
    pub pinning: String,
    pub prefetch_depth: usize,
    pub predictor: String,
    pub policy: String,
    pub on_miss: String,
}

/// Every combination of the flags (prefetch depth 0 only with predictor none, and the other
/// way round), in a fixed order.
pub fn combos(a: &SweepArgs, max_experts: usize) -> Result<Vec<Combo>> {
    let caps = parse_list("--capacity", &a.capacity)?;
    if let Some(&c) = caps.iter().find(|&&c| c == 0 || c > max_experts) {
        bail!("--capacity: {c} is out of range (the model has {max_experts} experts per layer)");
    }
    let depths = parse_list("--prefetch-depth", &a.prefetch_depth)?;
    let split = |s: &str| -> Vec<String> {
        s.split(',')
            .map(|x| x.trim().to_string())
            .filter(|x| !x.is_empty())
            .collect()
    };
    let predictors = split(&a.predictor);
    for p in &predictors {
        if !["none", "popularity", "previous-token", "gate-lookahead", "oracle"].contains(&p.as_str())
            && !p.starts_with("shadow:")
        {
            bail!(
                "--predictor: unknown `{p}` (expected none, popularity, previous-token, gate-lookahead, oracle or shadow:PATH)"
            );
        }
    }
    let policies = split(&a.policy);
    for p in &policies {
        p.parse::<PolicyKind>()
            .map_err(|e| anyhow::anyhow!("--policy: {e}"))?;
    }
    let misses = split(&a.on_miss);
    for m in &misses {
        m.parse::<MissMode>()
            .map_err(|e| anyhow::anyhow!("--on-miss: {e}"))?;
    }
    let mut out = Vec::new();
    for &capacity in &caps {
        for pinning in split(&a.pinning) {
            for &prefetch_depth in &depths {
                for predictor in &predictors {
                    if (prefetch_depth == 0) != (predictor == "none") {
                        continue;
                    }
                    for policy in &policies {
                        for on_miss in &misses {
                            out.push(Combo {
                                capacity,
                                pinning: pinning.clone(),
                                prefetch_depth,
                                predictor: predictor.clone(),
                                policy: policy.clone(),
                                on_miss: on_miss.clone(),
                            });
                        }
                    }
                }
            }
        }
    }
    if out.is_empty() {
        bail!("no configuration to run: a prefetch depth above 0 needs a predictor other than none");
    }
    Ok(out)
}

/// One result row.
#[derive(Debug, Clone, Serialize)]
struct Row {
    combo: Combo,
    mode: String,
    hit_rate: f64,
    hit_rate_prefill: f64,
    hit_rate_decode: f64,
    cold_misses: u64,
    capacity_misses: u64,
    demand_loads: u64,
    evictions: u64,
    bytes_read: u64,
    stall_secs: f64,
    est_decode_tok_s: f64,
    fallback_rate: f64,
    prefetch_issued: u64,
    prefetch_used: u64,
    prefetch_late: u64,
    prefetch_wasted: u64,
    prefetch_precision: f64,
    error: String,
}

fn pins(spec: &str, capacity: usize, trace: &Trace) -> Result<Vec<ExpertKey>> {
    if spec == "off" {
        return Ok(Vec::new());
    }
    let (path, k) = match spec.rsplit_once(':') {
        Some((p, k)) if !k.is_empty() && k.chars().all(|c| c.is_ascii_digit()) => {
            (PathBuf::from(p), k.parse()?)
        }
        _ => (PathBuf::from(spec), capacity / 2),
    };
    let m = &trace.manifest;
    let profile = Profile::read(&path).map_err(|e| anyhow::anyhow!("--pinning: {e}"))?;
    if profile.config_sha256 != m.config_sha256 {
        bail!(
            "--pinning: {} is a profile of another model than the trace's",
            path.display()
        );
    }
    Ok(profile.top_k(
        &path,
        &m.moe_layers,
        m.num_experts,
        k.min(capacity.saturating_sub(1)),
    )?)
}

fn predictor(
    name: &str,
    depth: usize,
    reqs: &[RequestRouting],
    trace: &Trace,
    cache: &mut HashMap<(String, usize), SimPredictor>,
    (model, backend): (Option<&str>, shadowmoe_predictor::BackendChoice),
    k: usize,
) -> Result<SimPredictor> {
    if let Some(p) = cache.get(&(name.to_string(), depth)) {
        return Ok(p.clone());
    }
    let m = &trace.manifest;
    let p = match name {
        "none" => SimPredictor::None,
        "previous-token" => SimPredictor::PreviousToken,
        "oracle" => SimPredictor::Oracle,
        "popularity" => {
            let mut counts = vec![vec![0u64; m.num_experts]; m.moe_layers.len()];
            for r in reqs {
                for t in 0..r.tokens() {
                    for (l, c) in counts.iter_mut().enumerate() {
                        for &e in r.experts_at(t, l) {
                            c[e as usize] += 1;
                        }
                    }
                }
            }
            SimPredictor::Popularity(
                counts
                    .iter()
                    .map(|c| shadowmoe_predictor::baselines::rank_by_count(c))
                    .collect(),
            )
        }
        "gate-lookahead" => {
            let model_id = model.unwrap_or(&m.model_id);
            let ckpt = shadowmoe_engine::Checkpoint::open(model_id).with_context(|| {
                format!("gate-lookahead needs the checkpoint's routers (--model): {model_id}")
            })?;
            let routers = shadowmoe_predictor::baselines::routers(&ckpt)?;
            let ex = shadowmoe_predictor::data::all_examples(trace, &[depth], 64, &|_| true)?;
            let pred = shadowmoe_predictor::baselines::gate_lookahead(&routers, &ex, k);
            precomputed(&ex, &pred, k)
        }
        s => {
            let dir = s.strip_prefix("shadow:").context("predictor")?;
            let sp =
                shadowmoe_predictor::ShadowPredictor::load(Path::new(dir), Some(&m.config_sha256), backend)?;
            let ex = shadowmoe_predictor::data::all_examples(trace, &[depth], 64, &|_| true)?;
            let pred = sp.predict(&ex.hidden, &ex.src, &ex.depth, k);
            precomputed(&ex, &pred, k)
        }
    };
    cache.insert((name.to_string(), depth), p.clone());
    Ok(p)
}

fn precomputed(ex: &shadowmoe_predictor::data::Examples, pred: &[u16], k: usize) -> SimPredictor {
    let mut map = HashMap::new();
    for i in 0..ex.len() {
        map.insert(
            (ex.request[i], ex.token[i], ex.src[i]),
            pred[i * k..(i + 1) * k].to_vec(),
        );
    }
    SimPredictor::Precomputed(map)
}

fn frame(rows: &[Row]) -> PolarsResult<DataFrame> {
    let s = |f: &dyn Fn(&Row) -> String| rows.iter().map(f).collect::<Vec<String>>();
    let u = |f: &dyn Fn(&Row) -> u64| rows.iter().map(f).collect::<Vec<u64>>();
    let fl = |f: &dyn Fn(&Row) -> f64| rows.iter().map(f).collect::<Vec<f64>>();
    let n = rows.len();
    DataFrame::new(
        n,
        vec![
            Column::new("mode".into(), s(&|r| r.mode.clone())),
            Column::new("capacity".into(), u(&|r| r.combo.capacity as u64)),
            Column::new("pinning".into(), s(&|r| r.combo.pinning.clone())),
            Column::new("prefetch_depth".into(), u(&|r| r.combo.prefetch_depth as u64)),
            Column::new("predictor".into(), s(&|r| r.combo.predictor.clone())),
            Column::new("policy".into(), s(&|r| r.combo.policy.clone())),
            Column::new("on_miss".into(), s(&|r| r.combo.on_miss.clone())),
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
            Column::new("error".into(), s(&|r| r.error.clone())),
        ],
    )
}

/// The frame as CSV (strings quoted when they hold a comma or a quote).
fn csv(df: &DataFrame) -> Result<String> {
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

/// Runs a sweep; returns the run folder.
pub fn run(a: &SweepArgs, progress: bool) -> Result<PathBuf> {
    if a.mode != "sim" {
        bail!(
            "--mode: `{}`: this build runs sim sweeps (live sweeps: run `shadowmoe generate --metrics-out` per configuration)",
            a.mode
        );
    }
    let backend: shadowmoe_predictor::BackendChoice = a
        .backend
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--backend: {e}"))?;
    let trace_path = a.trace.as_ref().context("--mode sim needs --trace")?;
    let trace = Trace::open(trace_path)?;
    let m = trace.manifest.clone();
    let all = combos(a, m.num_experts)?;
    let (si, sn) = match &a.shard {
        Some(s) => parse_shard("--shard", s)?,
        None => (0, 1),
    };
    let mine: Vec<Combo> = all
        .iter()
        .enumerate()
        .filter(|(i, _)| i % sn == si)
        .map(|(_, c)| c.clone())
        .collect();
    let out = a.out.clone().unwrap_or_else(|| {
        PathBuf::from("runs").join(format!(
            "{}-sweep",
            shadowmoe_trace::schema::utc_now().replace(':', "")
        ))
    });
    std::fs::create_dir_all(&out).with_context(|| format!("--out: cannot create {}", out.display()))?;
    let probe = out.join(".write-test");
    std::fs::write(&probe, b"").with_context(|| format!("--out: {} is not writable", out.display()))?;
    std::fs::remove_file(&probe)?;

    let reqs = trace.requests(None)?;
    let expert_bytes = match a.expert_bytes {
        Some(b) => b,
        None => {
            let ckpt = shadowmoe_engine::Checkpoint::open(a.model.as_deref().unwrap_or(&m.model_id))
                .context("the expert size comes from the model: pass --model, or --expert-bytes")?;
            let store = ckpt.expert_store(shadowmoe_engine::offload::IoMode::Pread, None, false)?;
            store.expert_bytes()
        }
    };
    let io = IoModel {
        gbps: a.ssd_gbps,
        latency_us: a.ssd_latency_us,
        threads: a.io_threads,
        expert_bytes,
    };
    let k = a.prefetch_k.unwrap_or(m.top_k);
    let mut predictors = HashMap::new();
    let bar = if progress {
        indicatif::ProgressBar::new(mine.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut rows = Vec::new();
    for c in &mine {
        let mut row = Row {
            combo: c.clone(),
            mode: "sim".into(),
            hit_rate: f64::NAN,
            hit_rate_prefill: f64::NAN,
            hit_rate_decode: f64::NAN,
            cold_misses: 0,
            capacity_misses: 0,
            demand_loads: 0,
            evictions: 0,
            bytes_read: 0,
            stall_secs: 0.0,
            est_decode_tok_s: 0.0,
            fallback_rate: f64::NAN,
            prefetch_issued: 0,
            prefetch_used: 0,
            prefetch_late: 0,
            prefetch_wasted: 0,
            prefetch_precision: f64::NAN,
            error: String::new(),
        };
        let result = (|| -> Result<crate::sim::SimResult> {
            let cfg = SimConfig {
                budget: Budget::PerLayer(c.capacity),
                policy: c.policy.parse().map_err(|e: String| anyhow::anyhow!(e))?,
                pinned: pins(&c.pinning, c.capacity, &trace)?,
                on_miss: c.on_miss.parse().map_err(|e: String| anyhow::anyhow!(e))?,
                prefetch_depth: c.prefetch_depth,
                prefetch_k: k,
                predictor: predictor(
                    &c.predictor,
                    c.prefetch_depth,
                    &reqs,
                    &trace,
                    &mut predictors,
                    (a.model.as_deref(), backend),
                    k,
                )?,
                io,
                layer_secs: a.layer_ms * 1e-3,
            };
            simulate(&reqs, &m.moe_layers, &cfg).map_err(|e| anyhow::anyhow!(e))
        })();
        match result {
            Ok(r) => {
                let s = &r.stats;
                row.hit_rate = s.hit_rate().unwrap_or(f64::NAN);
                row.hit_rate_prefill = s.hit_rate_prefill().unwrap_or(f64::NAN);
                row.hit_rate_decode = s.hit_rate_decode().unwrap_or(f64::NAN);
                row.cold_misses = s.cold_misses;
                row.capacity_misses = s.capacity_misses;
                row.demand_loads = s.demand_loads;
                row.evictions = s.evictions;
                row.bytes_read = r.bytes_read;
                row.stall_secs = r.stall_secs;
                row.est_decode_tok_s = r.est_decode_tok_s;
                row.fallback_rate = s.fallback_rate().unwrap_or(f64::NAN);
                row.prefetch_issued = s.prefetch_issued;
                row.prefetch_used = s.prefetch_used;
                row.prefetch_late = s.prefetch_late;
                row.prefetch_wasted = s.prefetch_wasted;
                row.prefetch_precision = s.prefetch_precision().unwrap_or(f64::NAN);
            }
            Err(e) => row.error = format!("{e:#}"),
        }
        rows.push(row);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let mut df = frame(&rows)?;
    let tmp = out.join("results.parquet.tmp");
    ParquetWriter::new(File::create(&tmp)?)
        .with_compression(ParquetCompression::Zstd(None))
        .finish(&mut df)?;
    std::fs::rename(&tmp, out.join("results.parquet"))?;
    std::fs::write(out.join("results.csv"), csv(&df)?)?;
    let manifest = serde_json::json!({
        "format": "shadowmoe-sweep/1",
        "harness_version": env!("CARGO_PKG_VERSION"),
        "harness_commit": env!("SHADOWMOE_COMMIT"),
        "created": shadowmoe_trace::schema::utc_now(),
        "trace": trace_path.display().to_string(),
        "trace_manifest": m,
        "io_model": io,
        "layer_ms": a.layer_ms,
        "prefetch_k": k,
        "shard": format!("{si}/{sn}"),
        "combinations": all.len(),
        "rows": rows.len(),
    });
    std::fs::write(
        out.join("manifest.json"),
        serde_json::to_string_pretty(&manifest)?,
    )?;
    Ok(out)
}
