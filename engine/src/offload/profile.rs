//! Expert profiles (`profiles/<model>.json`): per-layer expert activation counts, from which
//! `--pin PROFILE[:K]` takes each layer's K most used experts. Format: `profiles/README.md`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::ExpertKey;
use crate::error::{EngineError, Result};

/// Format tag.
pub const PROFILE_FORMAT: &str = "shadowmoe-profile/1";

/// One layer of a profile.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LayerProfile {
    /// Activations (over tokens) per expert id.
    pub activations: Vec<u64>,
    /// Share of prompts that used each expert at least once (optional).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prompt_coverage: Vec<f64>,
}

/// An expert profile.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Profile {
    pub format: String,
    pub model_id: String,
    /// sha256 of the model's config.json.
    pub config_sha256: String,
    #[serde(default)]
    pub dataset: String,
    #[serde(default)]
    pub dataset_sha256: String,
    /// By model layer index (as a string key, JSON-style).
    pub layers: BTreeMap<String, LayerProfile>,
}

impl Profile {
    /// Reads and checks a profile file.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => EngineError::MissingFile {
                path: path.to_path_buf(),
                what: "an expert profile",
            },
            _ => EngineError::io(path, e),
        })?;
        let p: Profile = serde_json::from_str(&text).map_err(|e| EngineError::Json {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        if p.format != PROFILE_FORMAT {
            return Err(EngineError::field(
                path,
                "format",
                format!("`{}` is not {PROFILE_FORMAT}", p.format),
            ));
        }
        Ok(p)
    }

    /// The `k` most activated experts of each of `moe_layers` (ties: lower id first). Every
    /// layer must be in the profile and have `num_experts` counts.
    pub fn top_k(
        &self,
        path: &Path,
        moe_layers: &[usize],
        num_experts: usize,
        k: usize,
    ) -> Result<Vec<ExpertKey>> {
        let mut out = Vec::new();
        for &l in moe_layers {
            let lp = self.layers.get(&l.to_string()).ok_or_else(|| {
                EngineError::field(
                    path,
                    format!("layers.{l}"),
                    "missing (the model has this MoE layer)",
                )
            })?;
            if lp.activations.len() != num_experts {
                return Err(EngineError::field(
                    path,
                    format!("layers.{l}.activations"),
                    format!(
                        "has {} counts, expected num_experts = {num_experts}",
                        lp.activations.len()
                    ),
                ));
            }
            let mut ids: Vec<u32> = (0..num_experts as u32).collect();
            ids.sort_by_key(|&e| (std::cmp::Reverse(lp.activations[e as usize]), e));
            out.extend(ids.into_iter().take(k).map(|e| ExpertKey::new(l, e)));
        }
        Ok(out)
    }
}
