//! A trained shadow model on disk and at run time: `model.safetensors` (Burn's record) beside
//! `predictor.json` (shape, depths, the model it predicts for). At run time it runs on wgpu
//! where an adapter answers and on Burn's CPU backend otherwise, and says which.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::store::{ModuleSnapshot, SafetensorsStore};
use serde::{Deserialize, Serialize};

use crate::shadow::{LossKind, ShadowMlp, ShadowShape};
use crate::train::{BackendChoice, device, predict_topk};

/// Format tag of `predictor.json`.
pub const PREDICTOR_FORMAT: &str = "shadowmoe-predictor/1";

/// Errors of loading and saving predictors.
#[derive(Debug, thiserror::Error)]
pub enum PredictorError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{what}: {message}")]
    Invalid { what: String, message: String },
}

/// `predictor.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictorMeta {
    pub format: String,
    pub shape: ShadowShape,
    pub depths: Vec<usize>,
    pub k: usize,
    pub loss: LossKind,
    /// The model whose routing it predicts, and the sha256 of its config.json.
    pub model_id: String,
    pub config_sha256: String,
    pub moe_layers: Vec<usize>,
    pub top_k: usize,
    pub traces: Vec<String>,
    pub parameters: usize,
    pub bytes: u64,
    pub harness_version: String,
}

/// A loaded predictor.
#[derive(Debug)]
pub struct ShadowPredictor {
    pub meta: PredictorMeta,
    model: ShadowMlp,
    device: Device,
    backend: &'static str,
}

fn file_err(path: &Path, message: impl std::fmt::Display) -> PredictorError {
    PredictorError::File {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// Writes `model` and `meta` into `dir` (created if needed).
pub fn save(dir: &Path, model: &ShadowMlp, meta: &PredictorMeta) -> Result<(), PredictorError> {
    std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
    let weights = dir.join("model.safetensors");
    let mut store = SafetensorsStore::from_file(&weights).overwrite(true);
    model
        .save_into(&mut store)
        .map_err(|e| file_err(&weights, format!("{e:?}")))?;
    let mut meta = meta.clone();
    meta.bytes = std::fs::metadata(&weights).map(|m| m.len()).unwrap_or(0);
    let json = dir.join("predictor.json");
    let text = serde_json::to_string_pretty(&meta).map_err(|e| file_err(&json, e))?;
    std::fs::write(&json, text).map_err(|e| file_err(&json, e))
}

impl ShadowPredictor {
    /// Loads the predictor in `dir`; refuses one made for another model than `config_sha256`.
    pub fn load(
        dir: &Path,
        config_sha256: Option<&str>,
        backend: BackendChoice,
    ) -> Result<Self, PredictorError> {
        let json = dir.join("predictor.json");
        let text = std::fs::read_to_string(&json)
            .map_err(|e| file_err(&json, format!("{e} (train one with train-shadow)")))?;
        let meta: PredictorMeta =
            serde_json::from_str(&text).map_err(|e| file_err(&json, format!("not a predictor: {e}")))?;
        if meta.format != PREDICTOR_FORMAT {
            return Err(file_err(
                &json,
                format!("format `{}` is not {PREDICTOR_FORMAT}", meta.format),
            ));
        }
        if let Some(sha) = config_sha256
            && sha != meta.config_sha256
        {
            return Err(file_err(
                &json,
                format!(
                    "this predictor was trained for another model (config sha256 {}, this model {sha}); train one on this model's traces",
                    meta.config_sha256
                ),
            ));
        }
        let (device, backend) = device(backend).map_err(|message| PredictorError::Invalid {
            what: "backend".into(),
            message,
        })?;
        let weights = dir.join("model.safetensors");
        let mut model = meta.shape.init(&device);
        model
            .load_from(&mut SafetensorsStore::from_file(&weights))
            .map_err(|e| file_err(&weights, format!("{e:?}")))?;
        tracing::info!("shadow predictor {} on {backend}", dir.display());
        Ok(Self {
            meta,
            model,
            device,
            backend,
        })
    }

    /// "wgpu" or "cpu".
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// Top-`k` experts for each row: hidden states `[n, H]` at source MoE-layer ordinals `src`,
    /// predicting `depth` MoE layers ahead.
    pub fn predict(&self, hidden: &[f32], src: &[u16], depth: &[u8], k: usize) -> Vec<u16> {
        let ex = crate::data::Examples {
            hidden_size: self.meta.shape.hidden_size,
            k: 0,
            request: vec![0; src.len()],
            token: vec![0; src.len()],
            src: src.to_vec(),
            depth: depth.to_vec(),
            hidden: hidden.to_vec(),
            target: Vec::new(),
            prev_target: Vec::new(),
        };
        predict_topk(&self.model, &self.device, &ex, k, 4096)
    }
}

/// The shadow model as the engine's run-time predictor: model layer indices are mapped to the
/// MoE-layer ordinals it was trained on, and the depth is the distance between them. It was
/// trained within a token: for the next token's layers (a target at or before the source) it
/// predicts nothing.
impl shadowmoe_engine::predict::ExpertPredictor for ShadowPredictor {
    fn name(&self) -> String {
        format!("shadow ({})", self.backend)
    }

    fn predict(
        &mut self,
        view: &shadowmoe_engine::predict::LayerView<'_>,
        target: usize,
        k: usize,
    ) -> shadowmoe_engine::Result<Vec<u32>> {
        Ok(self.predict_many(view, &[target], k)?.pop().unwrap_or_default())
    }

    fn predict_many(
        &mut self,
        view: &shadowmoe_engine::predict::LayerView<'_>,
        targets: &[usize],
        k: usize,
    ) -> shadowmoe_engine::Result<Vec<Vec<u32>>> {
        let invalid = |message: String| shadowmoe_engine::EngineError::Invalid {
            what: "shadow predictor".into(),
            message,
        };
        let ordinal = |layer: usize| {
            self.meta
                .moe_layers
                .iter()
                .position(|&l| l == layer)
                .ok_or_else(|| {
                    invalid(format!(
                        "layer {layer} is not one of its MoE layers {:?}",
                        self.meta.moe_layers
                    ))
                })
        };
        if view.hidden.len() != self.meta.shape.hidden_size {
            return Err(invalid(format!(
                "hidden state of {} values, expected {}",
                view.hidden.len(),
                self.meta.shape.hidden_size
            )));
        }
        let src = ordinal(view.layer)?;
        // (position in `targets`, depth) of the targets it can predict.
        let mut rows = Vec::new();
        for (i, &t) in targets.iter().enumerate() {
            let dst = ordinal(t)?;
            if dst <= src {
                continue;
            }
            let depth = dst - src;
            if depth > self.meta.shape.max_depth {
                return Err(invalid(format!(
                    "cannot predict layer {t} from layer {}: depths 1..={} only",
                    view.layer, self.meta.shape.max_depth
                )));
            }
            rows.push((i, depth as u8));
        }
        let mut out = vec![Vec::new(); targets.len()];
        if rows.is_empty() {
            return Ok(out);
        }
        let n = rows.len();
        let hidden: Vec<f32> = std::iter::repeat_n(view.hidden, n).flatten().copied().collect();
        let depths: Vec<u8> = rows.iter().map(|r| r.1).collect();
        let top = ShadowPredictor::predict(self, &hidden, &vec![src as u16; n], &depths, k);
        for ((i, _), chunk) in rows.iter().zip(top.chunks(k)) {
            out[*i] = chunk.iter().map(|&e| u32::from(e)).collect();
        }
        Ok(out)
    }
}
