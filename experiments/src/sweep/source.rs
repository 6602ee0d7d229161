//! What a sweep runs on and with: the trace or the live engine (`open_source`, which checks every
//! flag before work starts), the pinned set of a configuration and the simulator's predictors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use shadowmoe_engine::offload::{ExpertKey, Profile};
use shadowmoe_trace::{RequestRouting, Trace};

use super::SweepArgs;
use crate::sim::{IoModel, SimPredictor};

/// The model a sweep runs on: what pinning and predictors check profiles against.
pub(super) struct ModelIds<'a> {
    pub(super) config_sha256: &'a str,
    pub(super) moe_layers: &'a [usize],
    pub(super) num_experts: usize,
}

pub(super) fn pins(spec: &str, capacity: usize, m: &ModelIds<'_>) -> Result<Vec<ExpertKey>> {
    if spec == "off" {
        return Ok(Vec::new());
    }
    let (path, k) = match spec.rsplit_once(':') {
        Some((p, k)) if !k.is_empty() && k.chars().all(|c| c.is_ascii_digit()) => {
            (PathBuf::from(p), k.parse()?)
        }
        _ => (PathBuf::from(spec), capacity / 2),
    };
    let profile = Profile::read(&path).map_err(|e| anyhow::anyhow!("--pinning: {e}"))?;
    if profile.config_sha256 != m.config_sha256 {
        bail!(
            "--pinning: {} is a profile of another model than the sweep's",
            path.display()
        );
    }
    Ok(profile.top_k(
        &path,
        m.moe_layers,
        m.num_experts,
        k.min(capacity.saturating_sub(1)),
    )?)
}

pub(super) fn predictor(
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

/// What a sweep runs on.
pub(super) enum Source {
    Sim {
        trace: Box<Trace>,
        reqs: Vec<RequestRouting>,
        io: IoModel,
    },
    Live(Box<crate::live::LiveSetup>),
}

/// Checks the flags and opens the inputs: every error here comes before any work starts.
pub(super) fn open_source(
    a: &SweepArgs,
    backend: shadowmoe_predictor::BackendChoice,
) -> Result<(Source, serde_json::Value)> {
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
            let expert_bytes = match a.expert_bytes {
                Some(0) => bail!("--expert-bytes: expected a positive number of bytes"),
                Some(b) => b,
                None => {
                    let ckpt = shadowmoe_engine::Checkpoint::open(a.model.as_deref().unwrap_or(&m.model_id))
                        .context("the expert size comes from the model: pass --model, or --expert-bytes")?;
                    let store = ckpt.expert_store(shadowmoe_engine::offload::IoMode::Pread, None, false)?;
                    store.expert_bytes()
                }
            };
            let io_ok = a.ssd_gbps.is_finite()
                && a.ssd_gbps > 0.0
                && a.ssd_latency_us.is_finite()
                && a.ssd_latency_us >= 0.0
                && a.io_threads > 0;
            if !io_ok {
                bail!(
                    "--ssd-gbps, --ssd-latency-us, --io-threads: expected a positive bandwidth, a latency ≥ 0 and at least one thread"
                );
            }
            let io = IoModel {
                gbps: a.ssd_gbps,
                latency_us: a.ssd_latency_us,
                threads: a.io_threads,
                expert_bytes,
            };
            let reqs = trace.requests(None)?;
            let info = serde_json::json!({
                "trace": trace_path.display().to_string(),
                "trace_manifest": m,
                "io_model": io,
                "layer_ms": a.layer_ms,
                "predictor_ms": a.predictor_ms,
            });
            Ok((
                Source::Sim {
                    trace: Box::new(trace),
                    reqs,
                    io,
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
            let moe_layers = ckpt.config.moe_layers();
            let popularity = match &a.profile {
                None => None,
                Some(path) => {
                    let profile = Profile::read(path).map_err(|e| anyhow::anyhow!("--profile: {e}"))?;
                    if profile.config_sha256 != sha {
                        bail!(
                            "--profile: {} is a profile of another model than --model",
                            path.display()
                        );
                    }
                    let n = ckpt.config.num_experts;
                    let keys = profile.top_k(path, &moe_layers, n, n)?;
                    let mut ranked: HashMap<usize, Vec<u32>> = HashMap::new();
                    for k in keys {
                        ranked.entry(k.layer as usize).or_default().push(k.expert);
                    }
                    Some(ranked)
                }
            };
            let info = serde_json::json!({
                "model": model,
                "config_sha256": sha,
                "dataset": ds.display().to_string(),
                "dataset_sha256": ds_sha,
                "prompts": ids.len(),
                "max_new_tokens": a.max_new_tokens,
                "io_threads": a.io_threads,
                "io_mode": "pread",
                "chat_template": !a.no_chat_template,
                "repeat": a.repeat,
            });
            let setup =
                crate::live::LiveSetup::new(ckpt, ids, a.max_new_tokens, a.io_threads, backend, popularity)?;
            Ok((Source::Live(Box::new(setup)), info))
        }
        m => bail!("--mode: unknown `{m}` (expected sim or live)"),
    }
}
