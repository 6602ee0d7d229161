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
    /// Per layer, the smallest set of most-used experts covering `pin_threshold` of its
    /// activations (informational; `--pin PROFILE:K` takes the top K).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pinned: BTreeMap<String, Vec<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_threshold: Option<f64>,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(layers: &[(usize, Vec<u64>)]) -> Profile {
        Profile {
            format: PROFILE_FORMAT.into(),
            model_id: "m".into(),
            config_sha256: "abc".into(),
            dataset: String::new(),
            dataset_sha256: String::new(),
            layers: layers
                .iter()
                .map(|(l, a)| {
                    (
                        l.to_string(),
                        LayerProfile {
                            activations: a.clone(),
                            prompt_coverage: vec![],
                        },
                    )
                })
                .collect(),
            pinned: BTreeMap::new(),
            pin_threshold: None,
        }
    }

    #[test]
    fn top_k_per_layer_with_ties_to_lower_ids() {
        let p = profile(&[(1, vec![5, 9, 9, 0]), (3, vec![1, 2, 3, 4])]);
        let keys = p.top_k(Path::new("p.json"), &[1, 3], 4, 2).unwrap();
        assert_eq!(
            keys,
            vec![
                ExpertKey::new(1, 1),
                ExpertKey::new(1, 2),
                ExpertKey::new(3, 3),
                ExpertKey::new(3, 2)
            ]
        );
    }

    #[test]
    fn missing_layer_or_wrong_count_is_named() {
        let p = profile(&[(1, vec![5, 9, 9])]);
        let err = p.top_k(Path::new("p.json"), &[1], 4, 1).unwrap_err().to_string();
        assert!(
            err.contains("layers.1.activations") && err.contains("expected num_experts = 4"),
            "{err}"
        );
        let err = p.top_k(Path::new("p.json"), &[2], 3, 1).unwrap_err().to_string();
        assert!(err.contains("layers.2") && err.contains("missing"), "{err}");
    }

    #[test]
    fn round_trips_through_json() {
        let p = profile(&[(0, vec![1, 2])]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        std::fs::write(&path, serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(Profile::read(&path).unwrap(), p);
        std::fs::write(&path, "{\"format\": \"other/1\"}").unwrap();
        assert!(Profile::read(&path).is_err());
    }
}
