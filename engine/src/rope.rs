//! Rotary position embeddings, computed as transformers' `modeling_rope_utils` does, in f32.
//!
//! Dimensions: `Dh` = head_dim; `inv_freq` has `Dh / 2` entries; cos/sin of one position have
//! `Dh` entries (the half-size table repeated, as `torch.cat((freqs, freqs))`).

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{EngineError, Result};

/// How the inverse frequencies are scaled (`rope_type` of the config).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Default,
    Linear {
        factor: f64,
    },
    /// NTK-aware dynamic scaling: the base grows once the sequence passes
    /// `max_position_embeddings`.
    Dynamic {
        factor: f64,
    },
    Yarn {
        factor: f64,
        original_max_position_embeddings: f64,
        beta_fast: f64,
        beta_slow: f64,
        truncate: bool,
        attention_factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// RoPE parameters of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    /// The rotated width of a head: `head_dim`, or its `partial_rotary_factor` share.
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub scaling: RopeScaling,
}

/// The rope types this engine computes.
pub const SUPPORTED_ROPE_TYPES: [&str; 5] = ["default", "linear", "dynamic", "yarn", "llama3"];

impl RopeConfig {
    /// Reads `rope_parameters` (transformers 5) or `rope_scaling` + `rope_theta` (4.x).
    pub fn from_config(
        map: &Map<String, Value>,
        path: &Path,
        default_theta: f64,
        head_dim: usize,
    ) -> Result<Self> {
        Self::from_config_partial(map, path, default_theta, head_dim, None)
    }

    /// [`RopeConfig::from_config`] for an architecture that rotates only the first
    /// `partial_rotary_factor · head_dim` values of each head (qwen3_next): the factor is read
    /// from `rope_parameters` or the top level, `default_factor` when absent, and the
    /// config's `head_dim` is the rotated width. `None`: a factor other than 1 is refused.
    pub fn from_config_partial(
        map: &Map<String, Value>,
        path: &Path,
        default_theta: f64,
        head_dim: usize,
        default_factor: Option<f64>,
    ) -> Result<Self> {
        let (params, params_key) = match (map.get("rope_parameters"), map.get("rope_scaling")) {
            (Some(Value::Object(p)), _) => (Some(p), "rope_parameters"),
            (_, Some(Value::Object(p))) => (Some(p), "rope_scaling"),
            (Some(Value::Null) | None, Some(Value::Null) | None) => (None, "rope_parameters"),
            (Some(_), _) => {
                return Err(EngineError::field(path, "rope_parameters", "expected an object"));
            }
            (_, Some(_)) => {
                return Err(EngineError::field(path, "rope_scaling", "expected an object"));
            }
        };
        let num = |key: &str| -> Result<Option<f64>> {
            let v = params.and_then(|p| p.get(key)).or(None);
            match v {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                    EngineError::field(path, format!("{params_key}.{key}"), "expected a number")
                }),
            }
        };
        let required = |key: &str| -> Result<f64> {
            num(key)?.ok_or_else(|| {
                EngineError::field(
                    path,
                    format!("{params_key}.{key}"),
                    "missing (required by its rope_type)",
                )
            })
        };
        let top_theta = match map.get("rope_theta") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_f64()
                    .ok_or_else(|| EngineError::field(path, "rope_theta", "expected a number"))?,
            ),
        };
        let theta_key = if num("rope_theta")?.is_some() {
            format!("{params_key}.rope_theta")
        } else {
            "rope_theta".to_string()
        };
        let theta = num("rope_theta")?.or(top_theta).unwrap_or(default_theta);
        if !(theta.is_finite() && theta > 0.0) {
            return Err(EngineError::field(
                path,
                theta_key,
                format!("{theta} (expected a finite number > 0)"),
            ));
        }
        // A scaling factor of 0 or less divides frequencies by nothing: refused by name.
        let positive = |key: &str, v: f64| -> Result<f64> {
            if v.is_finite() && v > 0.0 {
                Ok(v)
            } else {
                Err(EngineError::field(
                    path,
                    format!("{params_key}.{key}"),
                    format!("{v} (expected a finite number > 0)"),
                ))
            }
        };
        let required = |key: &str| -> Result<f64> { positive(key, required(key)?) };
        let max_position_embeddings = map
            .get("max_position_embeddings")
            .and_then(Value::as_u64)
            .unwrap_or(0) as usize;
        let top_factor = match map.get("partial_rotary_factor") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_f64()
                    .ok_or_else(|| EngineError::field(path, "partial_rotary_factor", "expected a number"))?,
            ),
        };
        let in_params = num("partial_rotary_factor")?;
        let factor_key = if in_params.is_some() {
            format!("{params_key}.partial_rotary_factor")
        } else {
            "partial_rotary_factor".to_string()
        };
        let factor = in_params.or(top_factor);
        let head_dim = match default_factor {
            None => {
                if let Some(f) = factor
                    && f != 1.0
                {
                    return Err(EngineError::field(
                        path,
                        factor_key,
                        "partial rotary embeddings are not supported by this architecture",
                    ));
                }
                head_dim
            }
            Some(d) => {
                let f = factor.unwrap_or(d);
                // transformers: int(head_dim * partial_rotary_factor), rotated in pairs.
                let rotary = (head_dim as f64 * f) as usize;
                if !(f > 0.0 && f <= 1.0) || rotary == 0 || !rotary.is_multiple_of(2) {
                    return Err(EngineError::field(
                        path,
                        factor_key,
                        format!(
                            "{f} gives {rotary} rotated values of head_dim {head_dim} (expected a positive even number)"
                        ),
                    ));
                }
                rotary
            }
        };

        let rope_type = params
            .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let original_max = |key_missing_default: f64| -> Result<f64> {
            Ok(num("original_max_position_embeddings")?
                .or_else(|| {
                    map.get("original_max_position_embeddings")
                        .and_then(Value::as_f64)
                })
                .unwrap_or(key_missing_default))
        };
        let scaling = match rope_type {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear {
                factor: required("factor")?,
            },
            "dynamic" => RopeScaling::Dynamic {
                factor: required("factor")?,
            },
            "yarn" => {
                let original = original_max(max_position_embeddings as f64)?;
                let original = positive("original_max_position_embeddings", original)?;
                let factor = match num("factor")? {
                    Some(f) => positive("factor", f)?,
                    None => max_position_embeddings as f64 / original,
                };
                let mscale = num("mscale")?;
                let mscale_all_dim = num("mscale_all_dim")?;
                let get_mscale = |scale: f64, m: f64| {
                    if scale <= 1.0 {
                        1.0
                    } else {
                        0.1 * m * scale.ln() + 1.0
                    }
                };
                let attention_factor = match num("attention_factor")? {
                    Some(a) => a,
                    None => match (mscale, mscale_all_dim) {
                        (Some(m), Some(a)) if m != 0.0 && a != 0.0 => {
                            get_mscale(factor, m) / get_mscale(factor, a)
                        }
                        _ => get_mscale(factor, 1.0),
                    },
                };
                let truncate = params
                    .and_then(|p| p.get("truncate"))
                    .and_then(Value::as_bool)
                    .unwrap_or(true);
                RopeScaling::Yarn {
                    factor,
                    original_max_position_embeddings: original,
                    beta_fast: num("beta_fast")?.filter(|&b| b != 0.0).unwrap_or(32.0),
                    beta_slow: num("beta_slow")?.filter(|&b| b != 0.0).unwrap_or(1.0),
                    truncate,
                    attention_factor,
                }
            }
            "llama3" => RopeScaling::Llama3 {
                factor: required("factor")?,
                low_freq_factor: required("low_freq_factor")?,
                high_freq_factor: required("high_freq_factor")?,
                original_max_position_embeddings: original_max(max_position_embeddings as f64)?,
            },
            other => {
                return Err(EngineError::field(
                    path,
                    format!("{params_key}.rope_type"),
                    format!(
                        "`{other}` is not supported (supported: {})",
                        SUPPORTED_ROPE_TYPES.join(", ")
                    ),
                ));
            }
        };
        Ok(RopeConfig {
            theta,
            head_dim,
            max_position_embeddings,
            scaling,
        })
    }

    /// The plain inverse frequencies `1 / base^(2i/Dh)`, in f32 as torch computes them.
    fn base_inv_freq(&self, base: f64) -> Vec<f32> {
        let dim = self.head_dim;
        let base = base as f32;
        (0..dim / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / dim as f32))
            .collect()
    }

    /// Inverse frequencies and the attention scaling (cos/sin multiplier) for a forward pass
    /// whose largest position is `seq_len - 1`.
    pub fn inv_freq(&self, seq_len: usize) -> (Vec<f32>, f32) {
        let dim = self.head_dim as f64;
        match &self.scaling {
            RopeScaling::Default => (self.base_inv_freq(self.theta), 1.0),
            RopeScaling::Linear { factor } => {
                let f = *factor as f32;
                let inv = self.base_inv_freq(self.theta);
                (inv.into_iter().map(|x| x / f).collect(), 1.0)
            }
            RopeScaling::Dynamic { factor } => {
                let max = self.max_position_embeddings as f64;
                let seq = (seq_len as f64).max(max);
                let base = self.theta * ((factor * seq / max) - (factor - 1.0)).powf(dim / (dim - 2.0));
                (self.base_inv_freq(base), 1.0)
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                truncate,
                attention_factor,
            } => {
                let base = self.theta;
                let correction_dim = |rotations: f64| {
                    (dim * (original_max_position_embeddings / (rotations * 2.0 * std::f64::consts::PI)).ln())
                        / (2.0 * base.ln())
                };
                let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0) as f32;
                let mut high = high.min(dim - 1.0) as f32;
                if low == high {
                    high += 0.001;
                }
                let base32 = base as f32;
                let factor32 = *factor as f32;
                let inv = (0..self.head_dim / 2)
                    .map(|i| {
                        let pos_freq = base32.powf((2 * i) as f32 / self.head_dim as f32);
                        let extrapolation = 1.0 / pos_freq;
                        let interpolation = 1.0 / (factor32 * pos_freq);
                        let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolation_factor = 1.0 - ramp;
                        interpolation * (1.0 - extrapolation_factor) + extrapolation * extrapolation_factor
                    })
                    .collect();
                (inv, *attention_factor as f32)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = *original_max_position_embeddings;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                let inv = self
                    .base_inv_freq(self.theta)
                    .into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f as f64;
                        let scaled = if wavelen > low_wavelen {
                            f / *factor as f32
                        } else {
                            f
                        };
                        if wavelen < high_wavelen || wavelen > low_wavelen {
                            scaled
                        } else {
                            let smooth = ((old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor))
                                as f32;
                            (1.0 - smooth) * scaled / *factor as f32 + smooth * scaled
                        }
                    })
                    .collect();
                (inv, 1.0)
            }
        }
    }
}

/// cos and sin tables for a run of positions: `[T, Dh]` each, row-major.
#[derive(Debug)]
pub struct RopeTables {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub head_dim: usize,
}

impl RopeTables {
    /// Tables for `positions` (one row each).
    pub fn new(cfg: &RopeConfig, positions: &[usize]) -> Self {
        let seq_len = positions.iter().copied().max().map_or(0, |p| p + 1);
        let (inv_freq, scale) = cfg.inv_freq(seq_len);
        let half = cfg.head_dim / 2;
        let mut cos = Vec::with_capacity(positions.len() * cfg.head_dim);
        let mut sin = Vec::with_capacity(positions.len() * cfg.head_dim);
        for &p in positions {
            for _ in 0..2 {
                for &f in &inv_freq[..half] {
                    let angle = p as f32 * f;
                    cos.push(angle.cos() * scale);
                    sin.push(angle.sin() * scale);
                }
            }
        }
        RopeTables {
            cos,
            sin,
            head_dim: cfg.head_dim,
        }
    }

    /// Rotates one head vector `x` (`Dh` values) at table row `t`, in place:
    /// `x * cos + rotate_half(x) * sin`.
    pub fn apply(&self, x: &mut [f32], t: usize) {
        let dh = self.head_dim;
        let half = dh / 2;
        let cos = &self.cos[t * dh..(t + 1) * dh];
        let sin = &self.sin[t * dh..(t + 1) * dh];
        for i in 0..half {
            let (a, b) = (x[i], x[i + half]);
            x[i] = a * cos[i] - b * sin[i];
            x[i + half] = b * cos[i + half] + a * sin[i + half];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(params: &str) -> RopeConfig {
        let json = format!(r#"{{"max_position_embeddings": 32, {params}}}"#);
        let map: Map<String, Value> = serde_json::from_str(&json).unwrap();
        RopeConfig::from_config(&map, Path::new("config.json"), 10_000.0, 8).unwrap()
    }

    #[test]
    fn default_frequencies() {
        let (inv, scale) = cfg(r#""rope_theta": 10000.0"#).inv_freq(4);
        assert_eq!(scale, 1.0);
        assert_eq!(inv[0], 1.0);
        assert!((inv[1] - 0.1).abs() < 1e-7);
    }

    #[test]
    fn linear_divides_by_factor() {
        let (inv, _) = cfg(r#""rope_scaling": {"type": "linear", "factor": 4.0}"#).inv_freq(4);
        assert_eq!(inv[0], 0.25);
    }

    #[test]
    fn dynamic_only_changes_past_max_positions() {
        let c = cfg(r#""rope_parameters": {"rope_type": "dynamic", "factor": 2.0}"#);
        assert_eq!(c.inv_freq(10).0, c.inv_freq(32).0);
        assert!(c.inv_freq(40).0[1] < c.inv_freq(32).0[1]);
    }

    #[test]
    fn unknown_rope_type_is_named() {
        let map: Map<String, Value> =
            serde_json::from_str(r#"{"rope_scaling": {"rope_type": "longrope"}}"#).unwrap();
        let err = RopeConfig::from_config(&map, Path::new("config.json"), 1e4, 8)
            .unwrap_err()
            .to_string();
        assert!(err.contains("rope_scaling.rope_type"), "{err}");
        assert!(err.contains("longrope"), "{err}");
    }

    #[test]
    fn rotation_preserves_norm() {
        let c = cfg(r#""rope_theta": 10000.0"#);
        let t = RopeTables::new(&c, &[0, 5]);
        let mut x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        let before: f32 = x.iter().map(|v| v * v).sum();
        t.apply(&mut x, 1);
        let after: f32 = x.iter().map(|v| v * v).sum();
        assert!((before - after).abs() < 1e-3);
        let mut y = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        t.apply(&mut y, 0);
        assert_eq!(y, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
    }
}
