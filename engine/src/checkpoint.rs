//! A Hugging Face checkpoint directory: `config.json`, the safetensors weights,
//! `generation_config.json` where present; the tokenizer is opened on demand.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::hub::resolve_model;
use crate::model::Model;
use crate::offload::{ByteModel, CacheOptions, CachedExperts, ExpertStore, IoMode, pack};
use crate::tokenizer::Tokenizer;
use crate::weights::WeightIndex;

/// The parts of `generation_config.json` the engine uses.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationConfig {
    pub eos_token_ids: Vec<u32>,
    pub do_sample: Option<bool>,
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
}

impl GenerationConfig {
    /// Reads `path` if it exists; an absent file gives the defaults.
    pub fn open(path: &Path) -> Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(EngineError::io(path, e)),
        };
        let v: Value = serde_json::from_str(&text).map_err(|e| EngineError::Json {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let eos_token_ids = match v.get("eos_token_id") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|n| n as u32).collect(),
            Some(_) => {
                return Err(EngineError::field(
                    path,
                    "eos_token_id",
                    "expected an id or a list of ids",
                ));
            }
        };
        Ok(Self {
            eos_token_ids,
            do_sample: v.get("do_sample").and_then(Value::as_bool),
            temperature: v.get("temperature").and_then(Value::as_f64).map(|x| x as f32),
            top_k: v.get("top_k").and_then(Value::as_u64).map(|x| x as usize),
            top_p: v.get("top_p").and_then(Value::as_f64).map(|x| x as f32),
        })
    }
}

/// An opened checkpoint: configuration read and validated, weights indexed and memory-mapped.
#[derive(Debug)]
pub struct Checkpoint {
    /// The checkpoint's directory (a GGUF file's folder).
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub weights: WeightIndex,
    pub generation: GenerationConfig,
    /// Set when the checkpoint is a GGUF file.
    pub gguf: Option<GgufSource>,
}

/// What a GGUF checkpoint keeps beside its weights.
#[derive(Debug)]
pub struct GgufSource {
    /// The file given (the first split of a split checkpoint names them all).
    pub path: PathBuf,
    /// The configuration read from its metadata, as `config.json` text.
    pub config_json: String,
    pub files: Vec<crate::gguf::GgufFile>,
}

impl Checkpoint {
    /// Opens a `--model` value: a directory, or a hub id in the local Hugging Face cache.
    pub fn open(model: &str) -> Result<Self> {
        let path = Path::new(model);
        if crate::gguf::arch::is_gguf_path(path) {
            return Self::open_gguf(path);
        }
        Self::open_dir(&resolve_model(model)?)
    }

    /// Opens a GGUF checkpoint (one file, or any split of a split one).
    pub fn open_gguf(path: &Path) -> Result<Self> {
        let g = crate::gguf::arch::open(path)?;
        let generation = GenerationConfig {
            eos_token_ids: g.config.eos_token_ids.clone(),
            ..GenerationConfig::default()
        };
        Ok(Self {
            dir: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            config: g.config,
            weights: g.weights,
            generation,
            gguf: Some(GgufSource {
                path: path.to_path_buf(),
                config_json: g.config_json,
                files: g.files,
            }),
        })
    }

    /// Where the checkpoint is (its directory, or its GGUF file), for messages.
    pub fn location(&self) -> &Path {
        self.gguf.as_ref().map_or(&self.dir, |g| &g.path)
    }

    /// Opens the checkpoint in `dir`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let mut config = ModelConfig::from_file(&dir.join("config.json"))?;
        let mut weights = WeightIndex::open_dir(dir)?;
        weights.set_quantization(config.quantization.clone());
        if weights.mlx_layout() {
            // mlx_lm's sanitize stored qwen3_next's zero-centred norms as `1 + w`.
            config.norm_zero_centred = false;
        }
        let generation = GenerationConfig::open(&dir.join("generation_config.json"))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            weights,
            generation,
            gguf: None,
        })
    }

    /// Builds the model with every expert resident.
    pub fn load_model(&self) -> Result<Model> {
        self.warn_unused();
        Model::load(self.config.clone(), &self.weights)
    }

    /// sha256 of `config.json` (of a GGUF file's configuration as `config.json` text): the
    /// checkpoint's identity in packs, profiles and traces.
    pub fn config_sha256(&self) -> Result<String> {
        if let Some(g) = &self.gguf {
            return Ok(pack::sha256_bytes(g.config_json.as_bytes()));
        }
        pack::sha256_file(&self.dir.join("config.json"))
    }

    /// The disk tier for this checkpoint's experts: the expert pack in `pack_dir` (checked to
    /// belong to this model), or the checkpoint's own safetensors.
    pub fn expert_store(&self, io: IoMode, pack_dir: Option<&Path>, verify: bool) -> Result<ExpertStore> {
        let mut store = match pack_dir {
            Some(dir) => {
                if verify && !pack::index_checksummed(dir) {
                    return Err(EngineError::invalid(
                        "--verify",
                        format!(
                            "{} has no {} (made by an older shadowmoe): make the pack again so that its index is checked too",
                            dir.display(),
                            pack::INDEX_SUM
                        ),
                    ));
                }
                pack::open_pack(dir, &self.config, &self.config_sha256()?, io)?
            }
            None => ExpertStore::from_checkpoint(&self.config, &self.weights, io)?,
        };
        store.set_verify(verify)?;
        Ok(store)
    }

    /// Builds the model with only its non-expert weights resident and the experts served
    /// through a bounded cache over `store`.
    pub fn load_model_cached(
        &self,
        store: std::sync::Arc<ExpertStore>,
        opts: &CacheOptions,
    ) -> Result<(Model, std::sync::Arc<CachedExperts>)> {
        self.warn_unused();
        let cached = std::sync::Arc::new(CachedExperts::new(store, &self.config.moe_layers(), opts)?);
        let model = Model::load_with(self.config.clone(), &self.weights, cached.clone())?;
        // The resident weights are copies on the heap and the store reads the experts through
        // its own handles: the pages the load touched in the checkpoint's maps need not stay
        // in this process's resident set (they stay in the page cache).
        self.weights.release_pages();
        Ok((model, cached))
    }

    /// The memory model of this checkpoint with experts in slots of `store`.
    ///
    /// Every non-expert weight counts, the input embedding too: they are copied to the heap
    /// when the model loads ([`WeightIndex::get`]).
    pub fn byte_model(&self, store: &ExpertStore) -> ByteModel {
        ByteModel::for_checkpoint(
            &self.config,
            self.weights.total_bytes(),
            store.expert_bytes(),
            store.slot_bytes() as u64,
        )
    }

    /// Opens the tokenizer and chat template.
    ///
    /// A tokenizer that does not fit `vocab_size` is refused: more tokens than the embedding
    /// has rows cannot be embedded, and fewer than half of them is another model's tokenizer
    /// (checkpoints pad `vocab_size` a little past their tokenizer, never by half).
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let tok = match &self.gguf {
            Some(g) => Tokenizer::from_gguf(&g.files[0])?,
            None => Tokenizer::open(&self.dir)?,
        };
        let (n, vocab) = (tok.vocab_size(), self.config.vocab_size);
        if n > vocab || n < vocab.div_ceil(2) {
            return Err(EngineError::Tokenizer {
                path: tok.path().to_path_buf(),
                message: format!(
                    "has {n} tokens but config.json's vocab_size is {vocab} (expected between {} and {vocab}: a tokenizer of another model?)",
                    vocab.div_ceil(2)
                ),
            });
        }
        Ok(tok)
    }

    /// Tensors of the checkpoint that the model as configured never reads: those of decoder
    /// layers at or past `num_hidden_layers` (a config cut shorter than its checkpoint), less
    /// the multi-token-prediction layers the config declares right after them (deepseek_v3's
    /// `num_nextn_predict_layers`), which are expected there and left out of the forward pass.
    pub fn unused_tensors(&self) -> Vec<String> {
        let layers = self.config.num_hidden_layers + self.config.nextn_predict_layers;
        let mut out: Vec<String> = self
            .weights
            .names()
            .filter(|n| {
                n.strip_prefix("model.layers.")
                    .and_then(|r| r.split('.').next())
                    .and_then(|l| l.parse::<usize>().ok())
                    .is_some_and(|l| l >= layers)
            })
            .map(str::to_string)
            .collect();
        out.sort();
        out
    }

    /// Logs a warning when [`Checkpoint::unused_tensors`] is not empty.
    fn warn_unused(&self) {
        let unused = self.unused_tensors();
        if let Some(first) = unused.first() {
            tracing::warn!(
                "{}: {} tensors are left unused (e.g. `{first}`): config.json's num_hidden_layers = {} is fewer than the checkpoint's layers",
                self.location().display(),
                unused.len(),
                self.config.num_hidden_layers
            );
        }
    }

    /// Stop tokens: generation_config.json's `eos_token_id`, else config.json's.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        if self.generation.eos_token_ids.is_empty() {
            self.config.eos_token_ids.clone()
        } else {
            self.generation.eos_token_ids.clone()
        }
    }
}
