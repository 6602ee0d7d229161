//! What a sweep runs on and with: the trace or the live engine (`open_source`, which checks every
//! flag before work starts), the pinned set of a configuration and the simulator's predictors.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use shadowmoe_engine::offload::{ExpertKey, IoMode, PinSpec, Profile};
use shadowmoe_engine::predict::{ExpertPredictor, GateLookahead, LayerView, PrefetchSpan, prefetch_targets};
use shadowmoe_trace::reader::HiddenRows;
use shadowmoe_trace::{RequestRouting, Trace};

use super::SweepArgs;
use crate::calibrate::Calibration;
use crate::sim::{IoModel, SimPredictor};

/// The model a sweep runs on: what pinning and predictors check profiles against.
pub(super) struct ModelIds<'a> {
    pub(super) config_sha256: &'a str,
    pub(super) moe_layers: &'a [usize],
    pub(super) num_experts: usize,
}

/// `off` or `PROFILE[:K]` at `capacity`: the profile and K (default half the capacity, never
/// the whole of it).
pub(super) fn pin_spec(spec: &str, capacity: usize) -> Option<PinSpec> {
    if spec == "off" {
        return None;
    }
    let p = PinSpec::parse(spec);
    let k = p.k.unwrap_or(capacity / 2).min(capacity.saturating_sub(1));
    Some(PinSpec { k: Some(k), ..p })
}

pub(super) fn pins(spec: &str, capacity: usize, m: &ModelIds<'_>) -> Result<Vec<ExpertKey>> {
    let Some(p) = pin_spec(spec, capacity) else {
        return Ok(Vec::new());
    };
    let profile = Profile::read(&p.profile).map_err(|e| anyhow::anyhow!("--pinning: {e}"))?;
    if profile.config_sha256 != m.config_sha256 {
        bail!(
            "--pinning: {} is a profile of another model than the sweep's",
            p.profile.display()
        );
    }
    Ok(profile.top_k(&p.profile, m.moe_layers, m.num_experts, p.k.unwrap_or(0))?)
}

/// The experts of every MoE layer (by ordinal) ranked by a profile: the `popularity` baseline.
pub(super) fn popularity(path: &Path, m: &ModelIds<'_>) -> Result<Vec<Vec<u16>>> {
    let profile = Profile::read(path).map_err(|e| anyhow::anyhow!("--profile: {e}"))?;
    if profile.config_sha256 != m.config_sha256 {
        bail!(
            "--profile: {} is a profile of another model than the sweep's",
            path.display()
        );
    }
    let keys = profile.top_k(path, m.moe_layers, m.num_experts, m.num_experts)?;
    let mut ranked = vec![Vec::new(); m.moe_layers.len()];
    for k in keys {
        let ord = m
            .moe_layers
            .iter()
            .position(|&l| l == k.layer as usize)
            .context("profile layer")?;
        ranked[ord].push(k.expert as u16);
    }
    Ok(ranked)
}

/// What the simulator's predictors are built from.
pub(super) struct PredictorInputs<'a> {
    pub(super) trace: &'a Trace,
    pub(super) model: Option<&'a str>,
    pub(super) backend: shadowmoe_predictor::BackendChoice,
    pub(super) profile: Option<&'a Path>,
    pub(super) k: usize,
}

/// The simulator's predictor `name` for `depth` and `span` (built once, then cached).
pub(super) fn predictor(
    name: &str,
    depth: usize,
    span: PrefetchSpan,
    inp: &PredictorInputs<'_>,
    cache: &mut HashMap<(String, usize, PrefetchSpan), SimPredictor>,
) -> Result<SimPredictor> {
    let key = (name.to_string(), depth, span);
    if let Some(p) = cache.get(&key) {
        return Ok(p.clone());
    }
    let m = &inp.trace.manifest;
    let ids = ModelIds {
        config_sha256: &m.config_sha256,
        moe_layers: &m.moe_layers,
        num_experts: m.num_experts,
    };
    let p = match name {
        "none" => SimPredictor::None,
        "previous-token" => SimPredictor::PreviousToken,
        "oracle" => SimPredictor::Oracle,
        "popularity" => {
            let path = inp.profile.context(
                "--predictor popularity needs --profile (the training traces' profile, from trace-stats): ranking by the replayed trace itself would be in-sample",
            )?;
            SimPredictor::Popularity(popularity(path, &ids)?)
        }
        "gate-lookahead" => {
            let model_id = inp.model.unwrap_or(&m.model_id);
            let ckpt = shadowmoe_engine::Checkpoint::open(model_id).with_context(|| {
                format!("gate-lookahead needs the checkpoint's routers (--model): {model_id}")
            })?;
            let mut gl = GateLookahead::new(ckpt.load_model()?.routers());
            let k = inp.k;
            precompute(inp.trace, depth, span, &mut |rows, li, ord, _ahead| {
                let layer = m.moe_layers[li];
                let target = m.moe_layers[ord];
                let h = rows.hidden_size;
                (0..rows.request.len())
                    .map(|i| {
                        let view = LayerView {
                            layer,
                            hidden: &rows.values[i * h..(i + 1) * h],
                            experts: &[],
                        };
                        Ok(gl.predict(&view, target, k)?)
                    })
                    .collect()
            })?
        }
        s => {
            let dir = s.strip_prefix("shadow:").context("predictor")?;
            let sp = shadowmoe_predictor::ShadowPredictor::load(
                Path::new(dir),
                Some(&m.config_sha256),
                inp.backend,
            )?;
            let k = inp.k;
            // The shadow model predicts within a token only: nothing for the next token's layers.
            precompute(inp.trace, depth, span, &mut |rows, li, ord, ahead| {
                let n = rows.request.len();
                if ahead > 0 || ord <= li || ord - li > sp.meta.shape.max_depth {
                    return Ok(vec![Vec::new(); n]);
                }
                let top = sp.predict(&rows.values, &vec![li as u16; n], &vec![(ord - li) as u8; n], k);
                Ok(top
                    .chunks(k)
                    .map(|c| c.iter().map(|&e| u32::from(e)).collect())
                    .collect())
            })?
        }
    };
    cache.insert(key, p.clone());
    Ok(p)
}

/// For every source MoE layer with stored hidden states and every target `span` names at
/// `depth`, `predict(rows, source ordinal, target ordinal, tokens ahead)` gives one prediction
/// per hidden row; they are keyed by (request, token, source, target).
#[allow(clippy::type_complexity)]
fn precompute(
    trace: &Trace,
    depth: usize,
    span: PrefetchSpan,
    predict: &mut dyn FnMut(&HiddenRows, usize, usize, usize) -> Result<Vec<Vec<u32>>>,
) -> Result<SimPredictor> {
    let m = &trace.manifest;
    let n = m.moe_layers.len();
    let mut map = HashMap::new();
    for (li, &layer) in m.moe_layers.iter().enumerate() {
        let targets = prefetch_targets(li, n, depth, span);
        if targets.is_empty() || !m.hidden_layers.contains(&layer) {
            continue;
        }
        let rows = trace.hidden(layer, None)?;
        for (ord, ahead) in targets {
            let preds = predict(&rows, li, ord, ahead)?;
            for (i, p) in preds.into_iter().enumerate() {
                if !p.is_empty() {
                    map.insert(
                        (rows.request[i], rows.token[i], li as u16, ord as u16),
                        p.into_iter().map(|e| e as u16).collect(),
                    );
                }
            }
        }
    }
    Ok(SimPredictor::Precomputed(map))
}

/// What a sweep runs on.
pub(super) enum Source {
    Sim {
        trace: Box<Trace>,
        reqs: Vec<RequestRouting>,
        io: IoModel,
        layer_ms: f64,
        /// Threads `layer_ms` was measured with (the calibration's; 1 without one).
        compute_threads: usize,
        /// Milliseconds per predictor call, by predictor name (`shadow` for shadow models).
        predictor_ms: HashMap<String, f64>,
        /// Compute per MoE layer while that predictor runs beside the forward pass, by name
        /// (the calibration's, when it measured them and no --layer-ms overrides it).
        compute_layer_ms: HashMap<String, f64>,
    },
    Live(Box<crate::live::LiveSetup>),
}

/// Flags that only one mode reads: given in the other, they are refused, not ignored.
pub(super) fn refuse_other_mode(a: &SweepArgs) -> Result<()> {
    let (mode, given): (&str, Vec<(&str, bool)>) = match a.mode.as_str() {
        "live" => (
            "sim",
            vec![
                ("--trace", a.trace.is_some()),
                ("--ssd-gbps", a.ssd_gbps.is_some()),
                ("--ssd-latency-us", a.ssd_latency_us.is_some()),
                ("--expert-bytes", a.expert_bytes.is_some()),
                ("--layer-ms", a.layer_ms.is_some()),
                ("--predictor-ms", a.predictor_ms.is_some()),
                ("--io-profile", a.io_profile.is_some()),
            ],
        ),
        _ => (
            "live",
            vec![
                ("--dataset", a.dataset.is_some()),
                ("--io", a.io.is_some()),
                ("--pack", a.pack.is_some()),
                ("--limit", a.limit.is_some()),
                ("--threads", a.threads != 0),
            ],
        ),
    };
    if let Some((flag, _)) = given.iter().find(|(_, g)| *g) {
        bail!(
            "{flag} applies to --mode {mode} only (this sweep is --mode {}): drop it",
            a.mode
        );
    }
    Ok(())
}

/// Checks the flags and opens the inputs: every error here comes before any work starts.
pub(super) fn open_source(
    a: &SweepArgs,
    backend: shadowmoe_predictor::BackendChoice,
) -> Result<(Source, serde_json::Value)> {
    refuse_other_mode(a)?;
    if a.io_threads == 0 {
        bail!("--io-threads: expected at least one thread");
    }
    match a.mode.as_str() {
        "sim" => {
            let trace_path = a.trace.as_ref().context("--mode sim needs --trace")?;
            let trace = Trace::open(trace_path)?;
            let m = trace.manifest.clone();
            if let Some(model) = &a.model {
                let ckpt =
                    shadowmoe_engine::Checkpoint::open(model).with_context(|| format!("--model {model}"))?;
                if ckpt.config_sha256()? != m.config_sha256 {
                    bail!(
                        "--trace: {} was collected from another model than --model {model} (config sha256 {} vs {})",
                        trace_path.display(),
                        m.config_sha256,
                        ckpt.config_sha256()?
                    );
                }
            }
            let cal = match &a.io_profile {
                None => None,
                Some(p) => {
                    let c = Calibration::read(p)?;
                    c.warn_if_foreign(p, &m.config_sha256);
                    Some(c)
                }
            };
            let expert_bytes = match a.expert_bytes {
                Some(0) => bail!("--expert-bytes: expected a positive number of bytes"),
                Some(b) => b,
                None => match &cal {
                    Some(c) if c.model.config_sha256 == m.config_sha256 => c.model.expert_bytes,
                    _ => {
                        let ckpt =
                            shadowmoe_engine::Checkpoint::open(a.model.as_deref().unwrap_or(&m.model_id))
                                .context(
                                    "the expert size comes from the model: pass --model, or --expert-bytes",
                                )?;
                        ckpt.expert_store(IoMode::Pread, None, false)?.expert_bytes()
                    }
                },
            };
            let positive = |v: Option<f64>, flag: &str, zero_ok: bool| -> Result<()> {
                match v {
                    Some(x) if !x.is_finite() || x < 0.0 || (!zero_ok && x == 0.0) => {
                        bail!(
                            "{flag}: expected a {} number, got {x}",
                            if zero_ok { "non-negative" } else { "positive" }
                        )
                    }
                    _ => Ok(()),
                }
            };
            positive(a.ssd_gbps, "--ssd-gbps", false)?;
            positive(a.ssd_latency_us, "--ssd-latency-us", true)?;
            positive(a.layer_ms, "--layer-ms", true)?;
            positive(a.predictor_ms, "--predictor-ms", true)?;
            // The calibration gives what the flags do not.
            let io = match (&cal, a.ssd_gbps) {
                (Some(c), None) => {
                    let mut io = c.io_model(a.io_threads, expert_bytes);
                    if let Some(l) = a.ssd_latency_us {
                        io.latency_us = l;
                    }
                    io
                }
                _ => IoModel::independent(
                    a.ssd_gbps.unwrap_or(1.0),
                    a.ssd_latency_us.unwrap_or(100.0),
                    a.io_threads,
                    expert_bytes,
                ),
            };
            let layer_ms = a
                .layer_ms
                .or_else(|| cal.as_ref().map(|c| c.compute.layer_ms))
                .unwrap_or(0.5);
            // --layer-ms is a serial figure; a calibration says how many threads computed it.
            let compute_threads = match (a.layer_ms, cal.as_ref()) {
                (None, Some(c)) => c.compute.threads.max(1),
                _ => 1,
            };
            let mut predictor_ms: HashMap<String, f64> = cal
                .as_ref()
                .map(|c| {
                    c.predictors
                        .iter()
                        .map(|(k, v)| (k.clone(), v.ms_per_call))
                        .collect()
                })
                .unwrap_or_default();
            if let Some(ms) = a.predictor_ms {
                predictor_ms.insert("shadow".into(), ms);
            }
            let compute_layer_ms: HashMap<String, f64> = match (a.layer_ms, cal.as_ref()) {
                (None, Some(c)) => c
                    .predictors
                    .iter()
                    .filter_map(|(k, v)| v.compute_layer_ms.map(|ms| (k.clone(), ms)))
                    .collect(),
                _ => HashMap::new(),
            };
            let mut io = io;
            io.prefetch_readers = a.prefetch_readers;
            let reqs = trace.requests(None)?;
            let info = serde_json::json!({
                "trace": trace_path.display().to_string(),
                "trace_manifest": m,
                "io_model": io,
                "io_profile": a.io_profile.as_ref().map(|p| p.display().to_string()),
                "layer_ms": layer_ms,
                "compute_threads": compute_threads,
                "predictor_ms": predictor_ms,
                "compute_layer_ms_by_predictor": compute_layer_ms,
            });
            Ok((
                Source::Sim {
                    trace: Box::new(trace),
                    reqs,
                    io,
                    layer_ms,
                    compute_threads,
                    predictor_ms,
                    compute_layer_ms,
                },
                info,
            ))
        }
        "live" => {
            let model = a.model.as_ref().context("--mode live needs --model")?;
            let ds = a.dataset.as_ref().context("--mode live needs --dataset")?;
            if a.repeat == 0 {
                bail!("--repeat: expected at least 1");
            }
            let io: IoMode =
                a.io.as_deref()
                    .unwrap_or("direct")
                    .parse()
                    .map_err(|e: String| anyhow::anyhow!("--io: {e}"))?;
            let ckpt =
                shadowmoe_engine::Checkpoint::open(model).with_context(|| format!("--model {model}"))?;
            let tok = ckpt.tokenizer()?;
            let (prompts, ds_sha) = crate::dataset::load(ds)?;
            let prompts: Vec<_> = prompts.into_iter().take(a.limit.unwrap_or(usize::MAX)).collect();
            if prompts.is_empty() {
                bail!("--dataset: {} has no prompts", ds.display());
            }
            let ids = prompts
                .iter()
                .map(|p| p.encode(&tok, !a.no_chat_template))
                .collect::<Result<Vec<_>>>()?;
            let sha = ckpt.config_sha256()?;
            let popularity = match &a.profile {
                None => None,
                Some(path) => Some(shadowmoe_engine::offload::setup::ranking(
                    &ckpt,
                    path,
                    "--profile",
                )?),
            };
            // The store opens once here: a pack for another model or a bad --io fails now.
            let probe = ckpt.expert_store(io, a.pack.as_deref(), false)?;
            let info = serde_json::json!({
                "model": model,
                "config_sha256": sha,
                "dataset": ds.display().to_string(),
                "dataset_sha256": ds_sha,
                "prompts": ids.len(),
                "max_new_tokens": a.max_new_tokens,
                "io_threads": a.io_threads,
                "prefetch_readers": a.prefetch_readers,
                "io_mode_requested": io.name(),
                "io_mode": probe.mode().name(),
                "expert_source": probe.source(),
                "pack": a.pack.as_ref().map(|p| p.display().to_string()),
                "chat_template": !a.no_chat_template,
                "repeat": a.repeat,
                "deterministic": a.deterministic,
                "threads": shadowmoe_engine::threads(),
            });
            drop(probe);
            let setup = crate::live::LiveSetup::new(
                ckpt,
                ids,
                a.max_new_tokens,
                crate::live::LiveIo {
                    mode: io,
                    pack: a.pack.clone(),
                    threads: a.io_threads,
                    prefetch_readers: a.prefetch_readers,
                },
                backend,
                popularity,
            )?;
            Ok((Source::Live(Box::new(setup)), info))
        }
        m => bail!("--mode: unknown `{m}` (expected sim or live)"),
    }
}
