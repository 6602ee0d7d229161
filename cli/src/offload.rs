//! The expert-cache flags shared by `generate` and `logits`, and the model they build: all
//! experts resident (no cache flags) or streamed from disk through a bounded cache.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Args;
use shadowmoe_engine::offload::bytes::{fmt_bytes, parse_bytes};
use shadowmoe_engine::offload::{
    Budget, ByteModel, CacheOptions, CachedExperts, IoMode, MissMode, PolicyKind, Profile, RunMetrics,
};
use shadowmoe_engine::predict::{ExpertPredictor, GateLookahead, Popularity, Prefetch, PreviousToken};
use shadowmoe_engine::{Checkpoint, GenerationStats, Model, peak_rss_bytes};

/// Flags of the expert cache. Without `--capacity` or `--cache-bytes` every expert stays
/// resident (memory-mapped).
#[derive(Args, Debug, Default)]
pub struct CacheArgs {
    /// Experts resident per MoE layer: N, or `auto` (the largest that fits --memory-budget).
    /// The other experts are read from disk when routed.
    #[arg(long)]
    capacity: Option<String>,
    /// One byte budget for the experts of all layers instead of a per-layer capacity (e.g. 8GiB).
    #[arg(long, conflicts_with = "capacity")]
    cache_bytes: Option<String>,
    /// Memory budget for `--capacity auto` (e.g. 20GiB).
    #[arg(long)]
    memory_budget: Option<String>,
    /// How expert bytes are read: direct (O_DIRECT: the SSD's real cost), pread (page cache), mmap.
    #[arg(long, default_value = "direct")]
    io: String,
    /// Read experts from this expert pack (`shadowmoe expert-pack`) instead of the checkpoint.
    #[arg(long)]
    pack: Option<PathBuf>,
    /// Keep each MoE layer's K most used experts of a profile resident: PROFILE[:K]
    /// (K counts toward the capacity; default: half of it).
    #[arg(long)]
    pin: Option<String>,
    /// When a routed expert is not resident: sync (wait for it: exact) or skip (flash-moe's
    /// fallback: drop it for this token and renormalise the others).
    #[arg(long, default_value = "sync")]
    on_miss: String,
    /// I/O threads that read experts.
    #[arg(long, default_value_t = 4)]
    io_threads: usize,
    /// Eviction policy: lru, lfu or lcp.
    #[arg(long, default_value = "lru")]
    policy: String,
    /// Check every expert load against the pack's checksum.
    #[arg(long)]
    verify: bool,
    /// Write the run's metrics (DESIGN.md definitions) as JSON to this file.
    #[arg(long)]
    metrics_out: Option<PathBuf>,
    /// Prefetch with a predictor: none, popularity (needs --profile), previous-token or
    /// gate-lookahead. (The shadow model runs in `bench-sweep --mode live`: this binary is built
    /// without Burn.)
    #[arg(long, default_value = "none")]
    predictor: String,
    /// Prefetch for the MoE layer this many MoE layers ahead (default: 4, or the deepest the
    /// model allows).
    #[arg(long)]
    prefetch_depth: Option<usize>,
    /// Experts prefetched per layer (default: the model's top-k).
    #[arg(long)]
    prefetch_k: Option<usize>,
    /// Expert profile whose ranking the popularity predictor prefetches.
    #[arg(long)]
    profile: Option<PathBuf>,
}

/// A model ready to run, with what is needed to report on it.
pub struct Loaded {
    pub model: Model,
    pub cached: Option<Arc<CachedExperts>>,
    pub metrics: RunMetrics,
    byte_model: Option<(ByteModel, usize)>,
}

fn flag<T: std::str::FromStr<Err = String>>(name: &str, value: &str) -> Result<T> {
    value.parse::<T>().map_err(|e| anyhow::anyhow!("{name}: {e}"))
}

impl CacheArgs {
    fn cache_requested(&self) -> bool {
        self.capacity.is_some() || self.cache_bytes.is_some()
    }

    /// Builds the model; `context` is the most tokens the run will hold (for the byte model).
    pub fn load(&self, ckpt: &Checkpoint, context: usize) -> Result<Loaded> {
        if !self.cache_requested() {
            for (set, name) in [
                (self.pack.is_some(), "--pack"),
                (self.pin.is_some(), "--pin"),
                (self.memory_budget.is_some(), "--memory-budget"),
                (self.verify, "--verify"),
                (self.predictor != "none", "--predictor"),
            ] {
                if set {
                    bail!("{name} applies to the expert cache: give --capacity N or --cache-bytes SIZE too");
                }
            }
            let mut metrics = RunMetrics {
                io_mode: "resident".into(),
                ..Default::default()
            };
            metrics.expert_source = "memory-mapped checkpoint (all resident)".into();
            return Ok(Loaded {
                model: ckpt.load_model()?,
                cached: None,
                metrics,
                byte_model: None,
            });
        }
        let cfg = &ckpt.config;
        let io: IoMode = flag("--io", &self.io)?;
        let policy: PolicyKind = flag("--policy", &self.policy)?;
        let on_miss: MissMode = flag("--on-miss", &self.on_miss)?;
        if self.io_threads == 0 {
            bail!("--io-threads: must be at least 1");
        }
        let store = Arc::new(ckpt.expert_store(io, self.pack.as_deref(), self.verify)?);
        let bm = ckpt.byte_model(&store);
        let moe_layers = cfg.moe_layers();
        let experts = cfg.num_experts;

        let budget = match (&self.capacity, &self.cache_bytes) {
            (Some(c), _) if c == "auto" => {
                let Some(mb) = &self.memory_budget else {
                    bail!("--capacity auto needs --memory-budget SIZE (e.g. 20GiB)");
                };
                let budget = parse_bytes(mb).map_err(|e| anyhow::anyhow!("--memory-budget: {e}"))?;
                let n = bm.capacity_for(budget, context, experts)?;
                eprintln!(
                    "capacity auto: {n} experts per layer (of {experts}); byte model {} within --memory-budget {}",
                    fmt_bytes(bm.predict(n, context)),
                    fmt_bytes(budget)
                );
                Budget::PerLayer(n)
            }
            (Some(c), _) => {
                let n: usize = c.parse().map_err(|_| {
                    anyhow::anyhow!(
                        "--capacity: `{c}` is not a number of experts (expected 1..={experts} or auto)"
                    )
                })?;
                if n == 0 || n > experts {
                    bail!(
                        "--capacity: {n} is out of range (the model has {experts} experts per layer; expected 1..={experts})"
                    );
                }
                Budget::PerLayer(n)
            }
            (None, Some(b)) => {
                let bytes = parse_bytes(b).map_err(|e| anyhow::anyhow!("--cache-bytes: {e}"))?;
                let slots = (bytes / store.slot_bytes() as u64) as usize;
                let all = experts * moe_layers.len();
                if slots == 0 {
                    bail!(
                        "--cache-bytes: {} holds no expert (one expert takes {})",
                        fmt_bytes(bytes),
                        fmt_bytes(store.slot_bytes() as u64)
                    );
                }
                Budget::Global(slots.min(all))
            }
            (None, None) => unreachable!("cache_requested"),
        };
        let per_partition = match budget {
            Budget::PerLayer(n) | Budget::Global(n) => n,
        };
        let pinned = match &self.pin {
            None => Vec::new(),
            Some(spec) => {
                let (path, k) = match spec.rsplit_once(':') {
                    Some((p, k)) if k.chars().all(|c| c.is_ascii_digit()) && !k.is_empty() => {
                        (PathBuf::from(p), k.parse::<usize>().context("--pin: K")?)
                    }
                    _ => (PathBuf::from(spec), (per_partition / 2).max(1)),
                };
                let profile = Profile::read(&path).map_err(|e| anyhow::anyhow!("--pin: {e}"))?;
                let sha = ckpt.config_sha256()?;
                if profile.config_sha256 != sha {
                    bail!(
                        "--pin: {} is a profile of another model (config sha256 {}, this model {sha})",
                        path.display(),
                        profile.config_sha256
                    );
                }
                profile
                    .top_k(&path, &moe_layers, experts, k)
                    .map_err(|e| anyhow::anyhow!("--pin: {e}"))?
            }
        };
        let opts = CacheOptions {
            budget,
            policy,
            on_miss,
            io_threads: self.io_threads,
            pinned,
            settle_loads: false,
        };
        let prefetch = self.prefetch(ckpt)?;
        let (model, cached) = ckpt.load_model_cached(store.clone(), &opts)?;
        if let Some((kind, depth, k, ranked)) = prefetch {
            let predictor: Box<dyn ExpertPredictor> = match kind {
                "previous-token" => Box::new(PreviousToken::default()),
                "gate-lookahead" => Box::new(GateLookahead::new(model.routers())),
                _ => Box::new(Popularity {
                    ranked: ranked.unwrap_or_default(),
                }),
            };
            tracing::info!("prefetching: {kind}, depth {depth}, k {k}");
            model.set_prefetch(Some(Prefetch { predictor, depth, k }));
        }
        let slots = cached.total_slots();
        let metrics = RunMetrics {
            io_mode: store.mode().name().into(),
            io_mode_requested: io.name().into(),
            expert_source: store.source().into(),
            io_threads: self.io_threads,
            policy: policy.name().into(),
            budget_kind: match budget {
                Budget::PerLayer(_) => "per-layer".into(),
                Budget::Global(_) => "global".into(),
            },
            capacity: per_partition,
            on_miss: on_miss.name().into(),
            pinned_experts: opts.pinned.len(),
            expert_bytes: store.expert_bytes(),
            ..Default::default()
        };
        tracing::info!(
            "expert cache: {slots} slots of {} ({} via {}), policy {}, on-miss {}",
            fmt_bytes(store.slot_bytes() as u64),
            store.source(),
            store.mode().name(),
            policy.name(),
            on_miss.name()
        );
        Ok(Loaded {
            model,
            cached: Some(cached),
            metrics,
            byte_model: Some((bm, slots)),
        })
    }

    /// The prefetching asked for: (predictor, depth, k, popularity ranking per MoE layer).
    #[allow(clippy::type_complexity)]
    fn prefetch(
        &self,
        ckpt: &Checkpoint,
    ) -> Result<Option<(&str, usize, usize, Option<HashMap<usize, Vec<u32>>>)>> {
        let cfg = &ckpt.config;
        let kind = self.predictor.as_str();
        if kind == "none" {
            return Ok(None);
        }
        if kind.starts_with("shadow:") {
            bail!(
                "--predictor {kind}: the shadow model runs in `bench-sweep --mode live --predictor shadow:DIR` (this binary is built without Burn)"
            );
        }
        if !["popularity", "previous-token", "gate-lookahead"].contains(&kind) {
            bail!(
                "--predictor: unknown `{kind}` (expected none, popularity, previous-token or gate-lookahead)"
            );
        }
        let layers = cfg.moe_layers().len();
        let depth = self
            .prefetch_depth
            .unwrap_or_else(|| 4.min(layers.saturating_sub(1)));
        if depth == 0 || depth >= layers {
            bail!(
                "--prefetch-depth: {depth} is out of range (the model has {layers} MoE layers; expected 1..={})",
                layers.saturating_sub(1)
            );
        }
        let k = self.prefetch_k.unwrap_or(cfg.num_experts_per_tok);
        if k == 0 || k > cfg.num_experts {
            bail!(
                "--prefetch-k: {k} is out of range (expected 1..={})",
                cfg.num_experts
            );
        }
        let ranked = if kind == "popularity" {
            let Some(path) = &self.profile else {
                bail!("--predictor popularity needs --profile PROFILE (written by trace-stats)");
            };
            let profile = Profile::read(path).map_err(|e| anyhow::anyhow!("--profile: {e}"))?;
            if profile.config_sha256 != ckpt.config_sha256()? {
                bail!("--profile: {} is a profile of another model", path.display());
            }
            let mut ranked: HashMap<usize, Vec<u32>> = HashMap::new();
            for key in profile
                .top_k(path, &cfg.moe_layers(), cfg.num_experts, cfg.num_experts)
                .map_err(|e| anyhow::anyhow!("--profile: {e}"))?
            {
                ranked.entry(key.layer as usize).or_default().push(key.expert);
            }
            Some(ranked)
        } else {
            None
        };
        Ok(Some((kind, depth, k, ranked)))
    }

    /// Completes the metrics after a run, prints the cache summary, writes `--metrics-out`.
    pub fn finish(&self, loaded: &mut Loaded, stats: Option<&GenerationStats>, context: usize) -> Result<()> {
        let m = &mut loaded.metrics;
        if let Some(c) = &loaded.cached {
            let (cs, io) = c.stats();
            m.set_counters(&cs, &io);
        }
        if let Some((bm, slots)) = &loaded.byte_model {
            m.predicted_rss_bytes = bm.predict_slots(*slots, context);
        }
        m.peak_rss_bytes = peak_rss_bytes();
        if let Some(s) = stats {
            m.prefill_tok_s = Some(s.prefill_tok_s());
            m.decode_tok_s = s.decode_tok_s();
        }
        if loaded.cached.is_some() {
            eprintln!("{}", m.summary());
        }
        if let Some(path) = &self.metrics_out {
            let text = serde_json::to_string_pretty(m)?;
            let tmp = path.with_extension("json.tmp");
            std::fs::write(&tmp, text)
                .with_context(|| format!("--metrics-out: cannot write {}", tmp.display()))?;
            std::fs::rename(&tmp, path)
                .with_context(|| format!("--metrics-out: cannot write {}", path.display()))?;
        }
        Ok(())
    }
}
