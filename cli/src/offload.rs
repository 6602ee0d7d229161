//! The expert-cache flags shared by `generate` and `logits`, and the model they build: all
//! experts resident (no cache flags) or streamed from disk through a bounded cache.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Args;
use shadowmoe_engine::offload::bytes::parse_bytes;
use shadowmoe_engine::offload::{
    Budget, ByteModel, CachedExperts, Capacity, IoMode, OffloadConfig, PinSpec, RunMetrics,
};
use shadowmoe_engine::predict::{
    ExpertPredictor, GateLookahead, Popularity, PredictorTiming, Prefetch, PrefetchSpan, PreviousToken,
};
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
    /// Which later layers a prediction is for: target (layer L + D only), all (each of L + 1 …
    /// L + D) or wrap (all, continuing into the next token's first layers).
    #[arg(long, default_value = "target")]
    prefetch_span: String,
    /// Where the predictor runs: async (its own thread, off the forward pass) or inline (on the
    /// forward thread after each layer: deterministic).
    #[arg(long, default_value = "async")]
    predictor_timing: String,
    /// Readers that may be busy with prefetches at once (0: all --io-threads); the disk's
    /// bandwidth is shared, so fewer leaves more of it to demand loads.
    #[arg(long, default_value_t = 0)]
    prefetch_readers: usize,
    /// Seconds a pass waits for an expert read before it fails naming the expert and its file
    /// (a hanging disk ends the run instead of hanging it).
    #[arg(long, default_value_t = 60.0)]
    load_timeout: f64,
}

/// A model ready to run, with what is needed to report on it.
pub struct Loaded {
    /// Shared: `serve` runs it on a thread of its own.
    pub model: Arc<Model>,
    pub cached: Option<Arc<CachedExperts>>,
    pub metrics: RunMetrics,
    byte_model: Option<(ByteModel, usize)>,
}

fn flag<T: std::str::FromStr<Err = String>>(name: &str, value: &str) -> Result<T> {
    value.parse::<T>().map_err(|e| anyhow::anyhow!("{name}: {e}"))
}

impl Loaded {
    /// The byte model's resident bytes with `tokens` in the KV cache (None: no expert cache).
    /// The byte model and the expert slots it counts (experts from disk only).
    pub fn byte_model(&self) -> Option<(ByteModel, usize)> {
        self.byte_model
    }

    pub fn predicted_rss(&self, tokens: usize) -> Option<u64> {
        self.byte_model
            .as_ref()
            .map(|(bm, slots)| bm.predict_slots(*slots, tokens))
    }
}

impl CacheArgs {
    /// `--on-miss skip`: routed experts that are not resident are dropped.
    pub fn skips_misses(&self) -> bool {
        self.on_miss == "skip"
    }

    pub fn on_miss_name(&self) -> &str {
        &self.on_miss
    }

    /// `--capacity` or `--cache-bytes` as given (None: every expert resident).
    pub fn capacity_name(&self) -> Option<String> {
        self.capacity.clone().or_else(|| self.cache_bytes.clone())
    }

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
                model: Arc::new(ckpt.load_model()?),
                cached: None,
                metrics,
                byte_model: None,
            });
        }
        let io: IoMode = flag("--io", &self.io)?;
        let capacity = match (&self.capacity, &self.cache_bytes) {
            (Some(c), _) if c == "auto" => {
                let Some(mb) = &self.memory_budget else {
                    bail!("--capacity auto needs --memory-budget SIZE (e.g. 20GiB)");
                };
                Capacity::Auto {
                    memory_budget: parse_bytes(mb).map_err(|e| anyhow::anyhow!("--memory-budget: {e}"))?,
                    context,
                }
            }
            (Some(c), _) => Capacity::PerLayer(c.parse().map_err(|_| {
                anyhow::anyhow!(
                    "--capacity: `{c}` is not a number of experts (expected 1..={} or auto)",
                    ckpt.config.num_experts
                )
            })?),
            (None, Some(b)) => {
                Capacity::Bytes(parse_bytes(b).map_err(|e| anyhow::anyhow!("--cache-bytes: {e}"))?)
            }
            (None, None) => unreachable!("cache_requested"),
        };
        let cfg = OffloadConfig {
            io,
            pack: self.pack.clone(),
            verify: self.verify,
            capacity,
            policy: flag("--policy", &self.policy)?,
            on_miss: flag("--on-miss", &self.on_miss)?,
            io_threads: self.io_threads,
            pin: self.pin.as_deref().map(PinSpec::parse),
            settle_loads: false,
            prefetch_readers: self.prefetch_readers,
        };
        let prefetch = self.prefetch(ckpt)?;
        let off = ckpt.offload(&cfg)?;
        if !(self.load_timeout.is_finite() && self.load_timeout > 0.0) {
            bail!(
                "--load-timeout: expected seconds above 0, got {}",
                self.load_timeout
            );
        }
        off.cached
            .set_load_timeout(std::time::Duration::from_secs_f64(self.load_timeout.min(1e9)));
        if let Some((kind, depth, k, ranked)) = prefetch {
            let predictor: Box<dyn ExpertPredictor> = match kind {
                "previous-token" => Box::new(PreviousToken::default()),
                "gate-lookahead" => Box::new(GateLookahead::new(off.model.routers())),
                _ => Box::new(Popularity {
                    ranked: ranked.unwrap_or_default(),
                }),
            };
            let span: PrefetchSpan = flag("--prefetch-span", &self.prefetch_span)?;
            let timing: PredictorTiming = flag("--predictor-timing", &self.predictor_timing)?;
            tracing::info!("prefetching: {kind}, depth {depth}, k {k}, span {}", span.name());
            off.model.set_prefetch(Some(Prefetch {
                predictor,
                depth,
                k,
                span,
                timing,
            }));
        }
        let slots = off.cached.total_slots();
        let metrics = RunMetrics {
            io_mode: off.store.mode().name().into(),
            io_mode_requested: io.name().into(),
            expert_source: off.store.source().into(),
            io_threads: self.io_threads,
            policy: cfg.policy.name().into(),
            budget_kind: match off.budget {
                Budget::PerLayer(_) => "per-layer".into(),
                Budget::Global(_) => "global".into(),
            },
            capacity: off.per_partition(),
            on_miss: cfg.on_miss.name().into(),
            pinned_experts: off.pinned.len(),
            expert_bytes: off.store.expert_bytes(),
            ..Default::default()
        };
        Ok(Loaded {
            byte_model: Some((off.byte_model, slots)),
            cached: Some(off.cached),
            model: Arc::new(off.model),
            metrics,
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
            Some(shadowmoe_engine::offload::setup::ranking(
                ckpt,
                path,
                "--profile",
            )?)
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

/// Refuses an output file path before any work: a folder, or a folder that does not exist or
/// cannot be written (so that a long run never ends on "cannot write").
pub fn check_out_file(out: &std::path::Path) -> Result<()> {
    if out.is_dir() {
        anyhow::bail!(
            "--out: {} is a folder (expected a file name, e.g. out.safetensors)",
            out.display()
        );
    }
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    let probe = dir.join(format!(".shadowmoe-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"").with_context(|| format!("--out: cannot write into {}", dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}
