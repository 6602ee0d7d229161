//! One way from a configuration to an offloaded model: the disk tier (checkpoint or expert
//! pack, read mode), the bounded cache (capacity per layer, a byte budget, or the largest
//! capacity a memory budget fits), pinning from a profile, the I/O pool. `shadowmoe generate`,
//! `bench-sweep --mode live` and `serve` all build through [`Checkpoint::offload`], so a flag
//! means the same thing everywhere. Errors name the flag (`--capacity`, `--pin`, …) that the
//! binaries expose for each field.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::bytes::fmt_bytes;
use super::cache::Budget;
use super::{
    ByteModel, CacheOptions, CachedExperts, ExpertKey, ExpertStore, IoMode, MissMode, PolicyKind, Profile,
};
use crate::checkpoint::Checkpoint;
use crate::error::{EngineError, Result};
use crate::model::Model;

/// How many experts the cache holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capacity {
    /// N experts per MoE layer.
    PerLayer(usize),
    /// One byte budget shared by all layers.
    Bytes(u64),
    /// The largest per-layer capacity whose byte model fits `memory_budget` for a run of
    /// `context` tokens.
    Auto { memory_budget: u64, context: usize },
}

/// `PROFILE[:K]`: each MoE layer's K most used experts of a profile (default K: half the
/// per-layer capacity).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinSpec {
    pub profile: PathBuf,
    pub k: Option<usize>,
}

impl PinSpec {
    /// Parses `PROFILE[:K]`.
    pub fn parse(s: &str) -> Self {
        match s.rsplit_once(':') {
            Some((p, k)) if !k.is_empty() && k.chars().all(|c| c.is_ascii_digit()) => Self {
                profile: PathBuf::from(p),
                k: k.parse().ok(),
            },
            _ => Self {
                profile: PathBuf::from(s),
                k: None,
            },
        }
    }
}

/// Everything that decides how a model's experts are served.
#[derive(Debug, Clone)]
pub struct OffloadConfig {
    pub io: IoMode,
    /// An expert pack to read instead of the checkpoint's safetensors.
    pub pack: Option<PathBuf>,
    pub verify: bool,
    pub capacity: Capacity,
    pub policy: PolicyKind,
    pub on_miss: MissMode,
    pub io_threads: usize,
    pub pin: Option<PinSpec>,
    /// Deterministic timing: every load in flight lands before a layer looks its experts up
    /// (tests, and runs that must equal the simulator's event order).
    pub settle_loads: bool,
    /// Readers that may be busy with prefetches at once (0: all).
    pub prefetch_readers: usize,
}

impl OffloadConfig {
    /// A per-layer capacity with the defaults of the binaries' flags (`direct`, LRU, sync, 4
    /// readers, no pins).
    pub fn per_layer(capacity: usize) -> Self {
        Self {
            io: IoMode::Direct,
            pack: None,
            verify: false,
            capacity: Capacity::PerLayer(capacity),
            policy: PolicyKind::Lru,
            on_miss: MissMode::Sync,
            io_threads: 4,
            pin: None,
            settle_loads: false,
            prefetch_readers: 0,
        }
    }
}

/// A model whose experts are served from disk, with what a run reports about it.
pub struct Offloaded {
    pub model: Model,
    pub cached: Arc<CachedExperts>,
    pub store: Arc<ExpertStore>,
    pub budget: Budget,
    pub pinned: Vec<ExpertKey>,
    pub byte_model: ByteModel,
}

impl std::fmt::Debug for Offloaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Offloaded")
            .field("budget", &self.budget)
            .field("pinned", &self.pinned.len())
            .finish_non_exhaustive()
    }
}

impl Offloaded {
    /// Experts per cache partition (per layer, or all slots for a byte budget).
    pub fn per_partition(&self) -> usize {
        match self.budget {
            Budget::PerLayer(n) | Budget::Global(n) => n,
        }
    }
}

/// Reads a profile and checks that it belongs to the model whose config sha256 is `sha`.
pub fn profile_for(path: &Path, sha: &str, flag: &str) -> Result<Profile> {
    let profile = Profile::read(path).map_err(|e| EngineError::invalid(flag, e.to_string()))?;
    if profile.config_sha256 != sha {
        return Err(EngineError::invalid(
            flag,
            format!(
                "{} is a profile of another model (config sha256 {}, this model {sha})",
                path.display(),
                profile.config_sha256
            ),
        ));
    }
    Ok(profile)
}

/// Every expert of every MoE layer ranked by a profile's counts: the `popularity` predictor.
pub fn ranking(ckpt: &Checkpoint, path: &Path, flag: &str) -> Result<HashMap<usize, Vec<u32>>> {
    let cfg = &ckpt.config;
    let profile = profile_for(path, &ckpt.config_sha256()?, flag)?;
    let mut ranked: HashMap<usize, Vec<u32>> = HashMap::new();
    for key in profile
        .top_k(path, &cfg.moe_layers(), cfg.num_experts, cfg.num_experts)
        .map_err(|e| EngineError::invalid(flag, e.to_string()))?
    {
        ranked.entry(key.layer as usize).or_default().push(key.expert);
    }
    Ok(ranked)
}

impl Checkpoint {
    /// Builds the model with its experts served from disk as `cfg` says.
    pub fn offload(&self, cfg: &OffloadConfig) -> Result<Offloaded> {
        let c = &self.config;
        if cfg.io_threads == 0 {
            return Err(EngineError::invalid("--io-threads", "must be at least 1"));
        }
        let store = Arc::new(self.expert_store(cfg.io, cfg.pack.as_deref(), cfg.verify)?);
        let mut byte_model = self.byte_model(&store);
        // The process as it stands before the weights load (code, tokenizer, the checkpoint's
        // index), measured, plus what a run adds besides its weights and KV cache (thread
        // stacks, allocator slack): the overhead term, where the platform tells it.
        self.weights.release_pages();
        crate::generate::trim_heap();
        if let Some(rss) = crate::generate::current_rss_bytes() {
            byte_model.overhead_bytes = rss + crate::offload::bytes::RUN_SLACK;
            tracing::debug!(
                "byte model: process baseline {} before the weights load",
                crate::offload::bytes::fmt_bytes(rss)
            );
        }
        let moe_layers = c.moe_layers();
        let experts = c.num_experts;
        let budget = match cfg.capacity {
            Capacity::PerLayer(n) => {
                if n == 0 || n > experts {
                    return Err(EngineError::invalid(
                        "--capacity",
                        format!(
                            "{n} is out of range (the model has {experts} experts per layer; expected 1..={experts})"
                        ),
                    ));
                }
                Budget::PerLayer(n)
            }
            Capacity::Auto {
                memory_budget,
                context,
            } => {
                let n = byte_model.capacity_for(memory_budget, context, experts)?;
                tracing::info!(
                    "capacity auto: {n} experts per layer (of {experts}); byte model {} within --memory-budget {}",
                    fmt_bytes(byte_model.predict(n, context)),
                    fmt_bytes(memory_budget)
                );
                Budget::PerLayer(n)
            }
            Capacity::Bytes(bytes) => {
                let slots = (bytes / store.slot_bytes() as u64) as usize;
                if slots == 0 {
                    return Err(EngineError::invalid(
                        "--cache-bytes",
                        format!(
                            "{} holds no expert (one expert takes {})",
                            fmt_bytes(bytes),
                            fmt_bytes(store.slot_bytes() as u64)
                        ),
                    ));
                }
                Budget::Global(slots.min(experts * moe_layers.len()))
            }
        };
        let per_partition = match budget {
            Budget::PerLayer(n) | Budget::Global(n) => n,
        };
        let pinned = match &cfg.pin {
            None => Vec::new(),
            Some(spec) => {
                let k = spec.k.unwrap_or(per_partition / 2);
                let profile = profile_for(&spec.profile, &self.config_sha256()?, "--pin")?;
                profile
                    .top_k(&spec.profile, &moe_layers, experts, k)
                    .map_err(|e| EngineError::invalid("--pin", e.to_string()))?
            }
        };
        let opts = CacheOptions {
            budget,
            policy: cfg.policy,
            on_miss: cfg.on_miss,
            io_threads: cfg.io_threads,
            pinned: pinned.clone(),
            settle_loads: cfg.settle_loads,
            prefetch_readers: cfg.prefetch_readers,
        };
        let (model, cached) = self.load_model_cached(store.clone(), &opts)?;
        tracing::info!(
            "expert cache: {} slots of {} ({} via {}), policy {}, on-miss {}",
            cached.total_slots(),
            fmt_bytes(store.slot_bytes() as u64),
            store.source(),
            store.mode().name(),
            cfg.policy.name(),
            cfg.on_miss.name()
        );
        Ok(Offloaded {
            model,
            cached,
            store,
            budget,
            pinned,
            byte_model,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_specs_parse() {
        assert_eq!(
            PinSpec::parse("p.json:16"),
            PinSpec {
                profile: "p.json".into(),
                k: Some(16)
            }
        );
        assert_eq!(PinSpec::parse("dir:x/p.json").k, None);
        assert_eq!(PinSpec::parse("p.json").profile, PathBuf::from("p.json"));
    }
}
