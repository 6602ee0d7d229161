//! `bench-sweep`: every combination of capacity, pinning, prefetch depth, predictor, policy and
//! miss mode, simulated on a trace (`--mode sim`) or run by the engine on a dataset
//! (`--mode live`, `--repeat N` times); one row per configuration and repetition in
//! `results.parquet` (and a CSV twin) inside a dated run folder with a manifest.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use polars::prelude::*;
use serde::{Deserialize, Serialize};
use shadowmoe_engine::offload::cache::{Budget, CacheStats};
use shadowmoe_engine::offload::{MissMode, PolicyKind};
use shadowmoe_engine::predict::{PredictorTiming, PrefetchSpan};

use crate::args::{parse_list, parse_shard};
use crate::sim::{SimConfig, simulate};

mod merge;
mod partial;
mod rows;
mod source;
pub use merge::merge;
use partial::Partial;
use rows::{Row, RunIds, csv, frame, summary};
use source::{ModelIds, PredictorInputs, Source, open_source, pin_spec, pins, predictor};

/// Flags of `bench-sweep`.
#[derive(Args, Debug, Clone, Serialize)]
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
    /// Prompts to generate on (live mode).
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// Only the first N prompts of --dataset (live mode).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Tokens generated per prompt (live mode; greedy).
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// Feed chat prompts as plain text (base models; as `trace-collect --no-chat-template`).
    #[arg(long)]
    pub no_chat_template: bool,
    /// Runs of each configuration (live mode); the summary reports their median and spread.
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Expert profile ranking the `popularity` predictor (the training traces' profile, from
    /// trace-stats; both modes: ranking by the replayed trace itself would be in-sample).
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// Which later layers each prediction is for: target (layer L + D only), all (each of
    /// L + 1 … L + D), wrap (all, into the next token's first layers). A list.
    #[arg(long, default_value = "target")]
    pub prefetch_span: String,
    /// Where the predictor runs: async (its own thread, off the forward pass; sim: answers land
    /// after their call time) or inline (on the forward thread after each layer).
    #[arg(long, default_value = "async")]
    pub predictor_timing: String,
    /// Deterministic timing: the predictor inline and every load landed before a layer looks
    /// up its experts (live and sim then make the same events in the same order).
    #[arg(long)]
    pub deterministic: bool,
    /// How live mode reads experts: direct (O_DIRECT, default), pread (page cache), mmap.
    #[arg(long)]
    pub io: Option<String>,
    /// Read experts from this expert pack in live mode (`shadowmoe expert-pack`).
    #[arg(long)]
    pub pack: Option<PathBuf>,
    /// A calibration of this machine (`bench-sweep calibrate`) for the simulator's disk,
    /// compute per layer and predictor times; the flags below override its values (sim mode).
    #[arg(long)]
    pub io_profile: Option<PathBuf>,
    /// Bandwidth of one I/O reader, GB/s, readers independent (sim mode; default 1.0, or the
    /// calibration's shared bandwidth).
    #[arg(long)]
    pub ssd_gbps: Option<f64>,
    /// Latency of one expert read, microseconds (sim mode; default 100, 0 with a calibration).
    #[arg(long)]
    pub ssd_latency_us: Option<f64>,
    /// I/O threads: readers in flight at most (both modes).
    #[arg(long, default_value_t = 4)]
    pub io_threads: usize,
    /// Readers that may be busy with prefetches at once (both modes; 0: all of them).
    #[arg(long, default_value_t = 0)]
    pub prefetch_readers: usize,
    /// Bytes of one expert (sim mode; default: the model's); e.g. 1769472 models
    /// Qwen3-Coder-Next's 4-bit experts on this routing.
    #[arg(long)]
    pub expert_bytes: Option<u64>,
    /// Compute time of one MoE layer for one token, milliseconds (sim mode; default 0.5, or the
    /// calibration's).
    #[arg(long)]
    pub layer_ms: Option<f64>,
    /// Time of one shadow-predictor call, milliseconds (sim mode; default: the calibration's, else
    /// 0). Live mode measures every predictor's time.
    #[arg(long)]
    pub predictor_ms: Option<f64>,
    /// Backend of `shadow:` predictors: auto (a hardware GPU, else the CPU), wgpu (any
    /// adapter, software ones included) or cpu.
    #[arg(long, default_value = "auto")]
    pub backend: String,
    /// Threads of the engine's forward pass (live mode; 0: one per core). The predictor's thread
    /// and the I/O threads come on top.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Run one share of the combinations: I/N.
    #[arg(long)]
    pub shard: Option<String>,
    /// Run folder (default: runs/<date>-sweep). One that already holds a sweep is refused
    /// unless --replace is given.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace the sweep already in --out (its results, manifest, summary and figures).
    #[arg(long)]
    pub replace: bool,
    /// Continue the sweep in --out that an earlier run of the same command left unfinished: the
    /// rows it kept (`rows.partial/`) are read back, not run again. A finished sweep is left as
    /// it is.
    #[arg(long, conflicts_with = "replace")]
    pub resume: bool,
}

/// One configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Combo {
    pub capacity: usize,
    pub pinning: String,
    pub prefetch_depth: usize,
    pub prefetch_span: String,
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
    let spans = split(&a.prefetch_span);
    for sp in &spans {
        sp.parse::<PrefetchSpan>()
            .map_err(|e| anyhow::anyhow!("--prefetch-span: {e}"))?;
    }
    let mut out = Vec::new();
    for &capacity in &caps {
        for pinning in split(&a.pinning) {
            for &prefetch_depth in &depths {
                for predictor in &predictors {
                    if (prefetch_depth == 0) != (predictor == "none") {
                        continue;
                    }
                    // Without prefetching the span means nothing: one row, `target`.
                    let my_spans: Vec<String> = if prefetch_depth == 0 {
                        vec!["target".into()]
                    } else {
                        spans.clone()
                    };
                    for span in &my_spans {
                        for policy in &policies {
                            for on_miss in &misses {
                                out.push(Combo {
                                    capacity,
                                    pinning: pinning.clone(),
                                    prefetch_depth,
                                    prefetch_span: span.clone(),
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
    }
    if out.is_empty() {
        bail!("no configuration to run: a prefetch depth above 0 needs a predictor other than none");
    }
    Ok(out)
}

/// Refuses configurations that can never issue a prefetch: a depth past the model's MoE
/// layers, a predictor that reads hidden states on a trace without them (`no_hidden`: sim
/// mode only), a shadow model asked for a depth it was not trained for.
fn check_prefetch(all: &[Combo], moe_layers: usize, no_hidden: Option<bool>) -> Result<()> {
    let mut metas: HashMap<&str, shadowmoe_predictor::PredictorMeta> = HashMap::new();
    for c in all.iter().filter(|c| c.prefetch_depth > 0) {
        let d = c.prefetch_depth;
        let most = if c.prefetch_span == "wrap" {
            moe_layers
        } else {
            moe_layers.saturating_sub(1)
        };
        if d > most {
            bail!(
                "--prefetch-depth: {d} is out of range with --prefetch-span {} (the model has {moe_layers} MoE layers: expected 1..={most})",
                c.prefetch_span
            );
        }
        let reads_hidden = c.predictor == "gate-lookahead" || c.predictor.starts_with("shadow:");
        if reads_hidden && no_hidden == Some(true) {
            bail!(
                "--predictor {}: needs the router inputs, but the --trace has no hidden states (collect it with trace-collect --hidden-layers all)",
                c.predictor
            );
        }
        if let Some(dir) = c.predictor.strip_prefix("shadow:") {
            if !metas.contains_key(dir) {
                let path = std::path::Path::new(dir).join("predictor.json");
                let text = std::fs::read_to_string(&path).with_context(|| {
                    format!(
                        "--predictor shadow:{dir}: cannot read {} (train one with train-shadow)",
                        path.display()
                    )
                })?;
                let meta = serde_json::from_str(&text).with_context(|| {
                    format!("--predictor shadow:{dir}: {} is not a predictor", path.display())
                })?;
                metas.insert(dir, meta);
            }
            let meta = &metas[dir];
            if c.prefetch_span == "target" && !meta.depths.contains(&d) || d > meta.shape.max_depth {
                bail!(
                    "--prefetch-depth {d}: the shadow predictor {dir} was trained for depths {:?} only (train it with --depth {d}, or sweep those depths)",
                    meta.depths
                );
            }
        }
    }
    Ok(())
}

/// The run folder: `--out`, else `runs/<date>-sweep`.
pub fn out_dir(a: &SweepArgs) -> PathBuf {
    a.out.clone().unwrap_or_else(|| {
        PathBuf::from("runs").join(format!(
            "{}-sweep",
            shadowmoe_trace::schema::utc_now().replace(':', "")
        ))
    })
}

/// The arguments that decide a sweep's rows, for its manifest: every flag but where it is
/// written (`--out`, `--replace`, `--resume`), which share it runs (`--shard`) and the thread
/// count.
fn args_json(a: &SweepArgs) -> Result<serde_json::Value> {
    let mut v = serde_json::to_value(a)?;
    if let Some(m) = v.as_object_mut() {
        for k in ["out", "replace", "resume", "shard", "threads"] {
            m.remove(k);
        }
    }
    Ok(v)
}

/// Writes a run folder's outputs: `results.parquet` (under a temporary name, renamed when
/// complete), `results.csv`, `manifest.json`, `summary.txt` (also printed) and the figures its
/// rows feed.
fn write_run(out: &Path, df: &mut DataFrame, summary: &str, manifest: &serde_json::Value) -> Result<()> {
    let tmp = out.join("results.parquet.tmp");
    let written = File::create(&tmp)
        .with_context(|| format!("--out: cannot write {}", tmp.display()))
        .and_then(|f| {
            ParquetWriter::new(f)
                .with_compression(ParquetCompression::Zstd(None))
                .finish(df)
                .map_err(|e| anyhow::anyhow!("{}: {e}", tmp.display()))
        });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, out.join("results.parquet"))?;
    std::fs::write(out.join("results.csv"), csv(df)?)?;
    std::fs::write(out.join("manifest.json"), serde_json::to_string_pretty(manifest)?)?;
    std::fs::write(out.join("summary.txt"), summary)?;
    eprint!("{summary}");
    // The figures this sweep alone can feed (the rest need train-shadow and trace-stats
    // outputs: `plot-figures --results` on a pipeline folder draws all eight).
    match crate::figures::draw(out, &out.join("figures"), &[]) {
        Ok(drawn) => {
            let names: Vec<&str> = drawn
                .iter()
                .filter(|d| d.1.is_ok())
                .map(|d| d.0.as_str())
                .collect();
            if !names.is_empty() {
                eprintln!(
                    "figures in {}: {}",
                    out.join("figures").display(),
                    names.join(", ")
                );
            }
        }
        Err(e) => tracing::warn!("figures not drawn: {e:#}"),
    }
    Ok(())
}

/// The checks that need no input read: the mode and its flags, the lists' syntax, the backend
/// (`--slurm` runs them before writing a job array whose every task would fail on them).
pub fn check_flags(a: &SweepArgs) -> Result<()> {
    if !["sim", "live"].contains(&a.mode.as_str()) {
        bail!("--mode: unknown `{}` (expected sim or live)", a.mode);
    }
    source::refuse_other_mode(a)?;
    a.backend
        .parse::<shadowmoe_predictor::BackendChoice>()
        .map_err(|e: String| anyhow::anyhow!("--backend: {e}"))?;
    combos(a, usize::MAX)?;
    Ok(())
}

/// What [`run`] refuses about the configurations before any work, given the model: a live
/// sweep asking for the future, configurations that can never prefetch (they would report "no
/// gain"), pinning profiles that cannot be read. `sim_without_hidden`: for a sim sweep,
/// whether its trace lacks hidden states; None for a live one.
fn check_combos(all: &[Combo], ids: &ModelIds<'_>, sim_without_hidden: Option<bool>) -> Result<()> {
    if sim_without_hidden.is_none()
        && let Some(c) = all
            .iter()
            .find(|c| c.policy == "belady" || c.predictor == "oracle")
    {
        bail!(
            "--mode live: `{}` needs the future, which only a trace has (use --mode sim)",
            if c.policy == "belady" {
                "--policy belady"
            } else {
                "--predictor oracle"
            }
        );
    }
    check_prefetch(all, ids.moe_layers.len(), sim_without_hidden)?;
    for c in all {
        pins(&c.pinning, c.capacity, ids)?;
    }
    Ok(())
}

/// Everything a sweep's tasks would refuse, checked once before `--slurm` writes the job
/// script: the flags, the trace (sim; and that it comes from --model when both are given) or
/// the checkpoint's configuration (live: no weights are read), and the configurations against
/// the model. A bad value then fails here, in one line, not in every task of the array.
pub fn preflight(a: &SweepArgs) -> Result<()> {
    check_flags(a)?;
    let (sha, moe_layers, num_experts, sim_without_hidden) = if a.mode == "sim" {
        let path = a.trace.as_ref().context("--mode sim needs --trace")?;
        let m = shadowmoe_trace::Trace::open(path)?.manifest;
        if let Some(model) = &a.model {
            let ckpt =
                shadowmoe_engine::Checkpoint::open(model).with_context(|| format!("--model {model}"))?;
            if ckpt.config_sha256()? != m.config_sha256 {
                bail!(
                    "--trace: {} was collected from another model than --model {model}",
                    path.display()
                );
            }
        }
        let hidden = m.hidden_layers.is_empty();
        (m.config_sha256, m.moe_layers, m.num_experts, Some(hidden))
    } else {
        let model = a.model.as_ref().context("--mode live needs --model")?;
        let ckpt = shadowmoe_engine::Checkpoint::open(model).with_context(|| format!("--model {model}"))?;
        (
            ckpt.config_sha256()?,
            ckpt.config.moe_layers(),
            ckpt.config.num_experts,
            None,
        )
    };
    let ids = ModelIds {
        config_sha256: &sha,
        moe_layers: &moe_layers,
        num_experts,
    };
    check_combos(&combos(a, num_experts)?, &ids, sim_without_hidden)
}

/// Runs a sweep; returns the run folder.
pub fn run(a: &SweepArgs, progress: bool) -> Result<PathBuf> {
    let backend: shadowmoe_predictor::BackendChoice = a
        .backend
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--backend: {e}"))?;
    let (si, sn) = match &a.shard {
        Some(s) => parse_shard("--shard", s)?,
        None => (0, 1),
    };
    let (source, info) = open_source(a, backend)?;
    let (sha, moe_layers, num_experts, top_k, model_id) = match &source {
        Source::Sim { trace, .. } => {
            let m = &trace.manifest;
            (
                m.config_sha256.clone(),
                m.moe_layers.clone(),
                m.num_experts,
                m.top_k,
                m.model_id.clone(),
            )
        }
        Source::Live(l) => (
            l.config_sha256.clone(),
            l.ckpt.config.moe_layers(),
            l.ckpt.config.num_experts,
            l.ckpt.config.num_experts_per_tok,
            a.model.clone().unwrap_or_default(),
        ),
    };
    let ids = ModelIds {
        config_sha256: &sha,
        moe_layers: &moe_layers,
        num_experts,
    };
    let all = combos(a, num_experts)?;
    check_combos(
        &all,
        &ids,
        match &source {
            Source::Sim { trace, .. } => Some(trace.manifest.hidden_layers.is_empty()),
            Source::Live(_) => None,
        },
    )?;
    // Each configuration of this shard with its index among all of them (its rows' name in
    // rows.partial/).
    let mine: Vec<(usize, Combo)> = all
        .iter()
        .enumerate()
        .filter(|(i, _)| i % sn == si)
        .map(|(i, c)| (i, c.clone()))
        .collect();
    let out = out_dir(a);
    // What decides the rows: a resume must match it.
    let with_shard = |mut args: serde_json::Value, shard: serde_json::Value| {
        if let Some(m) = args.as_object_mut() {
            m.insert("shard".into(), shard);
        }
        args
    };
    let key = with_shard(args_json(a)?, format!("{si}/{sn}").into());
    let unfinished = out.join(partial::DIR).exists();
    if a.resume && !unfinished && out.join("results.parquet").exists() {
        let manifest = out.join("manifest.json");
        let was = std::fs::read_to_string(&manifest)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .with_context(|| {
                format!(
                    "--resume: {} holds results.parquet but no readable manifest.json (pass --replace to run it again)",
                    out.display()
                )
            })?;
        let was = with_shard(was["args"].clone(), was["shard"].clone());
        partial::check_same(&was, &key, &manifest)?;
        eprintln!(
            "--resume: the sweep in {} is already complete; nothing to run",
            out.display()
        );
        return Ok(out);
    }
    if unfinished && !a.resume && !a.replace {
        bail!(
            "--out: {} holds an unfinished sweep ({}/); pass --resume to continue it, or --replace to start over",
            out.display(),
            partial::DIR
        );
    }
    if out.join("results.parquet").exists() && !(a.resume && unfinished) {
        if !a.replace {
            bail!(
                "--out: {} already holds a sweep (results.parquet); choose another folder, or pass --replace to overwrite it",
                out.display()
            );
        }
        eprintln!("--replace: replacing the sweep in {}", out.display());
        for f in ["results.parquet", "results.csv", "manifest.json", "summary.txt"] {
            let _ = std::fs::remove_file(out.join(f));
        }
        let _ = std::fs::remove_dir_all(out.join("figures"));
    }
    std::fs::create_dir_all(&out).with_context(|| format!("--out: cannot create {}", out.display()))?;
    let probe = out.join(".write-test");
    std::fs::write(&probe, b"").with_context(|| format!("--out: {} is not writable", out.display()))?;
    std::fs::remove_file(&probe)?;
    let kept = Partial::open(&out, &key, a.resume)?;

    let k = a.prefetch_k.unwrap_or(top_k);
    let timing: PredictorTiming = if a.deterministic {
        PredictorTiming::Inline
    } else {
        a.predictor_timing
            .parse()
            .map_err(|e: String| anyhow::anyhow!("--predictor-timing: {e}"))?
    };
    let repeats = if matches!(source, Source::Live(_)) {
        a.repeat
    } else {
        1
    };
    let mut predictors = HashMap::new();
    let bar = if progress {
        indicatif::ProgressBar::new((mine.len() * repeats) as u64).with_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} configurations, {elapsed} (ETA {eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        )
    } else {
        indicatif::ProgressBar::hidden()
    };
    let layers = moe_layers.len() as f64;
    let mut rows = Vec::new();
    let mut resumed = 0;
    // Repeats go round-robin over the configurations, so that a slow spell of this shared
    // machine falls on all of them rather than on one configuration's repeats.
    for rep in 0..repeats {
        for (index, c) in &mine {
            if let Some(row) = kept.load(rep, *index)? {
                rows.push(row);
                resumed += 1;
                bar.inc(1);
                continue;
            }
            let mut row = Row::new(c, &a.mode, rep);
            row.predictor_timing = if c.prefetch_depth > 0 {
                format!("{timing:?}").to_lowercase()
            } else {
                String::new()
            };
            let policy: PolicyKind = c.policy.parse().map_err(|e: String| anyhow::anyhow!(e))?;
            let on_miss: MissMode = c.on_miss.parse().map_err(|e: String| anyhow::anyhow!(e))?;
            let span: PrefetchSpan = c.prefetch_span.parse().map_err(|e: String| anyhow::anyhow!(e))?;
            match &source {
                Source::Sim {
                    trace,
                    reqs,
                    io,
                    layer_ms,
                    compute_threads,
                    predictor_ms,
                    compute_layer_ms,
                } => {
                    row.io_mode = "modelled".into();
                    row.modelled_cache_bytes =
                        (c.capacity as u64) * moe_layers.len() as u64 * io.expert_bytes;
                    // An async predictor's cost to the forward pass, as calibrated beside it.
                    let pkey = if c.predictor.starts_with("shadow:") {
                        "shadow"
                    } else {
                        c.predictor.as_str()
                    };
                    let layer_ms = match compute_layer_ms.get(pkey) {
                        Some(&ms) if c.prefetch_depth > 0 && timing == PredictorTiming::Async => ms,
                        _ => *layer_ms,
                    };
                    let result = (|| -> Result<crate::sim::SimResult> {
                        let inputs = PredictorInputs {
                            trace,
                            model: a.model.as_deref(),
                            backend,
                            profile: a.profile.as_deref(),
                            k,
                        };
                        let cfg = SimConfig {
                            budget: Budget::PerLayer(c.capacity),
                            policy,
                            pinned: pins(&c.pinning, c.capacity, &ids)?,
                            on_miss,
                            prefetch_depth: c.prefetch_depth,
                            prefetch_k: k,
                            prefetch_span: span,
                            predictor: predictor(
                                &c.predictor,
                                c.prefetch_depth,
                                span,
                                &inputs,
                                &mut predictors,
                            )?,
                            timing,
                            io: io.clone(),
                            layer_secs: layer_ms * 1e-3,
                            predictor_secs: predictor_ms.get(pkey).copied().unwrap_or(0.0) * 1e-3,
                            settle_loads: a.deterministic,
                            compute_threads: *compute_threads,
                        };
                        simulate(reqs, &moe_layers, &cfg).map_err(|e| anyhow::anyhow!(e))
                    })();
                    match result {
                        Ok(r) => {
                            row.cache_stats(&r.stats);
                            row.predict_stats(&r.predict, r.decode_tokens);
                            row.bytes_read = r.bytes_read;
                            row.stall_secs = r.stall_secs;
                            row.est_decode_tok_s = r.est_decode_tok_s;
                            let t = r.decode_tokens.max(1) as f64;
                            row.decode_ms_per_token = r.decode_secs / t * 1e3;
                            row.stall_ms_per_token = r.decode_stall_secs / t * 1e3;
                            row.compute_ms_per_token = layer_ms * layers;
                            row.bytes_per_token = r.decode_bytes as f64 / t;
                            row.decode_reads_in_flight = r.decode_reads_in_flight;
                            row.decode_disk_gbps = r.decode_disk_gbps;
                        }
                        Err(e) => row.error = format!("{e:#}"),
                    }
                }
                Source::Live(setup) => {
                    let cfg = crate::live::LiveConfig {
                        capacity: c.capacity,
                        policy,
                        pin: pin_spec(&c.pinning, c.capacity),
                        on_miss,
                        prefetch_depth: c.prefetch_depth,
                        prefetch_k: k,
                        prefetch_span: span,
                        timing,
                        settle_loads: a.deterministic,
                        predictor: c.predictor.clone(),
                        quality: false,
                    };
                    match setup.run(&cfg) {
                        Ok(r) => {
                            row.io_mode = r.io_mode.clone();
                            let lat = &r.read_latency;
                            row.read_ms_p50 = (lat.count > 0).then_some(lat.p50_ms);
                            row.read_ms_p95 = (lat.count > 0).then_some(lat.p95_ms);
                            row.read_gbps = r.read_gbps;
                            row.decode_reads_in_flight = r.decode_reads_in_flight;
                            row.decode_disk_gbps = r.decode_disk_gbps;
                            row.cache_stats(&r.stats);
                            row.predict_stats(&r.predict, r.decode_steps);
                            row.bytes_read = r.bytes_read;
                            row.stall_secs = r.stall_secs;
                            row.modelled_cache_bytes =
                                (c.capacity as u64) * moe_layers.len() as u64 * setup.expert_bytes();
                            let t = r.decode_steps.max(1) as f64;
                            row.decode_ms_per_token = r.decode_secs / t * 1e3;
                            row.stall_ms_per_token = r.decode_stall_secs / t * 1e3;
                            // The forward thread's own time: the predictor's thread (async)
                            // runs beside it.
                            row.compute_ms_per_token = (row.decode_ms_per_token
                                - row.stall_ms_per_token
                                - row.predictor_ms_per_token)
                                .max(0.0);
                            row.bytes_per_token = r.decode_bytes as f64 / t;
                            row.decode_tok_s = (r.decode_steps > 0)
                                .then(|| r.decode_steps as f64 / r.decode_secs.max(1e-12));
                            row.prefill_tok_s = (r.prefill_tokens > 0)
                                .then(|| r.prefill_tokens as f64 / r.prefill_secs.max(1e-12));
                            row.peak_rss_bytes = r.peak_rss_bytes;
                            row.repetition = r.repetition;
                            row.modelled_total_bytes = Some(r.modelled_total_bytes);
                            if let Some(q) = r.quality {
                                row.top1_agreement = Some(q.top1_agreement);
                                row.kl_divergence = Some(q.kl_divergence);
                                row.perplexity = Some(q.perplexity);
                                row.perplexity_exact = Some(q.perplexity_exact);
                            }
                        }
                        Err(e) => row.error = format!("{e:#}"),
                    }
                }
            }
            if !row.error.is_empty() {
                tracing::warn!("{c:?}: {}", row.error);
            }
            kept.store(rep, *index, &row)?;
            rows.push(row);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    if resumed > 0 {
        eprintln!(
            "--resume: {resumed} of {} rows read back from {}",
            rows.len(),
            out.join(partial::DIR).display()
        );
    }
    let trace_name = match &source {
        Source::Sim { .. } => a
            .trace
            .as_ref()
            .map(|t| t.display().to_string())
            .unwrap_or_default(),
        Source::Live(_) => String::new(),
    };
    let mut df = frame(
        &rows,
        &RunIds {
            model_id: &model_id,
            config_sha256: &sha,
            trace: &trace_name,
        },
    )?;
    let manifest = serde_json::json!({
        "format": "shadowmoe-sweep/1",
        "mode": a.mode,
        "harness_version": env!("CARGO_PKG_VERSION"),
        "harness_commit": env!("SHADOWMOE_COMMIT"),
        "created": shadowmoe_trace::schema::utc_now(),
        "model_id": model_id,
        "config_sha256": sha,
        "source": info,
        "args": args_json(a)?,
        "prefetch_k": k,
        "shard": format!("{si}/{sn}"),
        "combinations": all.len(),
        "repeat": repeats,
        "rows": rows.len(),
    });
    write_run(&out, &mut df, &summary(&rows), &manifest)?;
    // Last: while this folder exists the final files may be incomplete.
    kept.remove()?;
    // Rows are written either way (their `error` column says why), but a sweep of which no
    // configuration ran is a failure, not a result.
    if let Some(first) = rows.first()
        && rows.iter().all(|r| !r.error.is_empty())
    {
        bail!(
            "every one of the {} configurations failed (errors in {}); the first: {}",
            rows.len(),
            out.join("results.csv").display(),
            first.error
        );
    }
    Ok(out)
}
