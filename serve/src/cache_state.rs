//! Warm start (`--cache-state FILE`): the resident expert set is written at shutdown and read
//! back at start, so the first request does not meet a cold cache. The file is JSON, tied to
//! its model by the sha256 of `config.json`, written under a temporary name and renamed: a
//! crash never leaves a half-written state.
//!
//! With the resident set go the activation counts of every expert the run used (what LFU and
//! LCP rank by); the experts are loaded least used first, so that LRU's recency order favours
//! the most used ones too.
//!
//! The experts are loaded back through the cache's prefetch path (behind nothing: no request
//! runs yet), so they count as prefetches in the metrics, and a first request's hits on them
//! as prefetches used.

use std::path::Path;

use serde::{Deserialize, Serialize};
use shadowmoe_engine::offload::{CachedExperts, ExpertKey};

use crate::error::ServeError;

const FORMAT: &str = "shadowmoe-cache-state";
/// 2: with usage counts; 1 (resident set only) is still read.
const VERSION: u32 = 2;

#[derive(Debug, Serialize, Deserialize)]
struct State {
    format: String,
    version: u32,
    config_sha256: String,
    /// (model layer, expert) of every resident expert, least used first.
    experts: Vec<(usize, u32)>,
    /// (model layer, expert, activations) of every expert the run used.
    #[serde(default)]
    usage: Vec<(usize, u32, u64)>,
}

fn err(path: &Path, message: impl Into<String>) -> ServeError {
    ServeError::CacheState {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// Writes the resident set of `cached` to `path` (temporary name, then rename).
pub fn save(path: &Path, config_sha256: &str, cached: &CachedExperts) -> Result<usize, ServeError> {
    let mut usage: Vec<(usize, u32, u64)> = cached
        .usage()
        .into_iter()
        .map(|(k, n)| (k.layer as usize, k.expert, n))
        .collect();
    usage.sort_unstable();
    let count = |l: usize, e: u32| {
        usage
            .binary_search_by(|u| (u.0, u.1).cmp(&(l, e)))
            .map_or(0, |i| usage[i].2)
    };
    let mut experts: Vec<(usize, u32)> = cached
        .resident()
        .into_iter()
        .map(|k| (k.layer as usize, k.expert))
        .collect();
    experts.sort_unstable_by_key(|&(l, e)| (count(l, e), l, e));
    let state = State {
        format: FORMAT.into(),
        version: VERSION,
        config_sha256: config_sha256.into(),
        experts,
        usage,
    };
    let text = serde_json::to_string(&state).map_err(|e| err(path, e.to_string()))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, text).map_err(|e| err(&tmp, format!("cannot write: {e}")))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| err(path, format!("cannot rename {} to it: {e}", tmp.display())))?;
    Ok(state.experts.len())
}

/// Loads the experts `path` names into `cached` and waits for them; a missing file is a cold
/// start (0 experts). A file of another model, or one that does not parse, is an error.
pub fn load(
    path: &Path,
    config_sha256: &str,
    moe_layers: &[usize],
    experts_per_layer: usize,
    cached: &CachedExperts,
) -> Result<usize, ServeError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::info!("{}: no cache state yet: a cold start", path.display());
            return Ok(0);
        }
        Err(e) => return Err(err(path, format!("cannot read: {e}"))),
    };
    let state: State =
        serde_json::from_str(&text).map_err(|e| err(path, format!("not a cache state file: {e}")))?;
    if state.format != FORMAT || !(1..=VERSION).contains(&state.version) {
        return Err(err(
            path,
            format!(
                "not a cache state file (format `{}` version {}, expected `{FORMAT}` 1..={VERSION})",
                state.format, state.version
            ),
        ));
    }
    if state.config_sha256 != config_sha256 {
        return Err(err(
            path,
            format!(
                "the cache state of another model (config sha256 {}, this model {config_sha256}); remove it or give another --cache-state",
                state.config_sha256
            ),
        ));
    }
    let mut keys = Vec::with_capacity(state.experts.len());
    for &(layer, expert) in &state.experts {
        if !moe_layers.contains(&layer) || expert as usize >= experts_per_layer {
            return Err(err(
                path,
                format!("expert ({layer}, {expert}) is not one of this model's"),
            ));
        }
        keys.push(ExpertKey::new(layer, expert));
    }
    let mut counts = Vec::with_capacity(state.usage.len());
    for &(layer, expert, n) in &state.usage {
        if !moe_layers.contains(&layer) || expert as usize >= experts_per_layer {
            return Err(err(
                path,
                format!("usage of expert ({layer}, {expert}): not one of this model's"),
            ));
        }
        counts.push((ExpertKey::new(layer, expert), n));
    }
    cached.add_usage(&counts);
    let issued = cached.prefetch(&keys)?;
    cached.wait_idle()?;
    Ok(issued)
}
