//! `config.json` of a Hugging Face MoE checkpoint, read into one typed [`ModelConfig`].
//!
//! Field names are the checkpoint's own. Keys that transformers renamed between releases are
//! accepted under both spellings (`num_experts` / `num_local_experts`, `rope_parameters` /
//! `rope_scaling` + `rope_theta`). Where a key is absent, the default is the one transformers'
//! config class for that `model_type` uses, so a config that transformers loads loads here too.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{EngineError, Result};
use crate::rope::RopeConfig;

/// The architectures the engine runs, by `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arch {
    Qwen3Moe,
    Olmoe,
    Mixtral,
    Qwen2Moe,
    Qwen3Next,
}

impl Arch {
    /// Every supported `model_type` string, in the order of the README table.
    pub const SUPPORTED: [&'static str; 5] = ["qwen3_moe", "olmoe", "mixtral", "qwen2_moe", "qwen3_next"];

    /// The architecture for a `model_type` string, if supported.
    pub fn from_model_type(s: &str) -> Option<Self> {
        Some(match s {
            "qwen3_moe" => Arch::Qwen3Moe,
            "olmoe" => Arch::Olmoe,
            "mixtral" => Arch::Mixtral,
            "qwen2_moe" => Arch::Qwen2Moe,
            "qwen3_next" => Arch::Qwen3Next,
            _ => return None,
        })
    }

    /// The `model_type` string.
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Qwen3Moe => "qwen3_moe",
            Arch::Olmoe => "olmoe",
            Arch::Mixtral => "mixtral",
            Arch::Qwen2Moe => "qwen2_moe",
            Arch::Qwen3Next => "qwen3_next",
        }
    }

    /// Default `rope_theta` of transformers' config class.
    fn default_theta(self) -> f64 {
        match self {
            Arch::Mixtral => 1_000_000.0,
            _ => 10_000.0,
        }
    }

    /// Default `rms_norm_eps` of transformers' config class.
    fn default_eps(self) -> f64 {
        match self {
            Arch::Olmoe | Arch::Mixtral => 1e-5,
            Arch::Qwen3Moe | Arch::Qwen2Moe | Arch::Qwen3Next => 1e-6,
        }
    }
}

/// Where the query/key RMSNorms sit, if the architecture has them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// Over each head's `head_dim` after the reshape (Qwen3).
    PerHead,
    /// Over the whole projection width before the reshape (OLMoE).
    FullWidth,
}

/// What mixes the tokens in one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mixer {
    /// Softmax attention over the KV cache.
    Attention,
    /// qwen3_next's Gated DeltaNet: a causal conv1d and a recurrent state per layer.
    LinearAttention,
}

/// Shape of qwen3_next's Gated DeltaNet layers (`linear_*` keys of its config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearAttnConfig {
    pub num_key_heads: usize,
    pub num_value_heads: usize,
    pub key_head_dim: usize,
    pub value_head_dim: usize,
    /// Width of the depthwise causal convolution over q, k and v.
    pub conv_kernel: usize,
}

impl LinearAttnConfig {
    /// `num_key_heads * key_head_dim`.
    pub fn key_dim(&self) -> usize {
        self.num_key_heads * self.key_head_dim
    }

    /// `num_value_heads * value_head_dim`.
    pub fn value_dim(&self) -> usize {
        self.num_value_heads * self.value_head_dim
    }

    /// Channels of the convolution: q, k and v side by side.
    pub fn conv_dim(&self) -> usize {
        2 * self.key_dim() + self.value_dim()
    }
}

/// What the feed-forward block of one layer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlpKind {
    Dense,
    Moe,
}

/// The typed configuration of one checkpoint.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub rope: RopeConfig,
    /// Bias on q/k/v projections.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    pub qk_norm: QkNorm,
    /// OLMoE's `clip_qkv`: clamp q, k, v to ±this.
    pub clip_qkv: Option<f32>,
    /// Dense FFN width (dense layers of qwen*_moe).
    pub intermediate_size: usize,
    /// Routed expert FFN width.
    pub moe_intermediate_size: usize,
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    pub norm_topk_prob: bool,
    /// Shared expert FFN width (qwen2_moe), with its sigmoid gate.
    pub shared_expert_intermediate_size: Option<usize>,
    /// Per layer: dense or MoE feed-forward.
    pub mlp_kinds: Vec<MlpKind>,
    /// Per layer: the sliding attention window, if the layer has one.
    pub sliding_windows: Vec<Option<usize>>,
    /// Per layer: attention or linear attention (only qwen3_next has the latter).
    pub mixers: Vec<Mixer>,
    /// The linear-attention shape, when some layer has one.
    pub linear_attn: Option<LinearAttnConfig>,
    /// qwen3_next: q_proj also yields a gate per query value; the attention output is scaled
    /// by its sigmoid before o_proj.
    pub attn_output_gate: bool,
    /// qwen3_next: every RMSNorm but the gated one scales by `1 + weight` (zero-centred).
    pub norm_zero_centred: bool,
    /// MLX's `quantization` block (or its copy `quantization_config`), when the checkpoint
    /// holds quantised weights.
    pub quantization: Option<crate::quant::QuantConfig>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The file this was read from.
    pub path: PathBuf,
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => EngineError::MissingFile {
                path: path.to_path_buf(),
                what: "the model's config.json",
            },
            _ => EngineError::io(path, e),
        })?;
        Self::from_json_str(&text, path)
    }

    /// Parses `config.json` text; `path` is used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|e| EngineError::Json {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let Value::Object(map) = value else {
            return Err(EngineError::field(path, "<root>", "expected a JSON object"));
        };
        parse(&Fields { map: &map, path })
    }

    /// Indices of the layers whose feed-forward is a MoE block, in order.
    pub fn moe_layers(&self) -> Vec<usize> {
        (0..self.num_hidden_layers)
            .filter(|&l| self.mlp_kinds[l] == MlpKind::Moe)
            .collect()
    }

    /// Width of the query projection (`heads * head_dim`).
    pub fn q_width(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of the key/value projections (`kv_heads * head_dim`).
    pub fn kv_width(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }
}

/// Typed access to the JSON object, with errors that name the file and field.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    path: &'a Path,
}

impl Fields<'_> {
    /// The first of `keys` present (and not null).
    fn lookup<'k>(&self, keys: &[&'k str]) -> Option<(&'k str, &Value)> {
        keys.iter().find_map(|k| match self.map.get(*k) {
            None | Some(Value::Null) => None,
            Some(v) => Some((*k, v)),
        })
    }

    fn usize_opt(&self, keys: &[&str]) -> Result<Option<usize>> {
        match self.lookup(keys) {
            None => Ok(None),
            Some((k, v)) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| EngineError::field(self.path, k, "expected a non-negative integer")),
        }
    }

    fn usize(&self, keys: &[&str]) -> Result<usize> {
        self.usize_opt(keys)?.ok_or_else(|| {
            EngineError::field(
                self.path,
                keys.join(" / "),
                "missing (required by this model_type)",
            )
        })
    }

    fn positive(&self, keys: &[&str]) -> Result<usize> {
        let n = self.usize(keys)?;
        if n == 0 {
            return Err(EngineError::field(self.path, keys[0], "must be at least 1"));
        }
        Ok(n)
    }

    fn f64_opt(&self, keys: &[&str]) -> Result<Option<f64>> {
        match self.lookup(keys) {
            None => Ok(None),
            Some((k, v)) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| EngineError::field(self.path, k, "expected a number")),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.lookup(&[key]) {
            None => Ok(default),
            Some((k, v)) => v
                .as_bool()
                .ok_or_else(|| EngineError::field(self.path, k, "expected true or false")),
        }
    }

    fn str_opt(&self, key: &str) -> Result<Option<&str>> {
        match self.lookup(&[key]) {
            None => Ok(None),
            Some((k, v)) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| EngineError::field(self.path, k, "expected a string")),
        }
    }

    fn usize_list(&self, key: &str) -> Result<Vec<usize>> {
        match self.lookup(&[key]) {
            None => Ok(Vec::new()),
            Some((k, Value::Array(items))) => items
                .iter()
                .map(|v| {
                    v.as_u64()
                        .map(|n| n as usize)
                        .ok_or_else(|| EngineError::field(self.path, k, "expected a list of integers"))
                })
                .collect(),
            Some((k, _)) => Err(EngineError::field(self.path, k, "expected a list of integers")),
        }
    }

    /// An integer or a list of integers (`eos_token_id`).
    fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
        match self.lookup(&[key]) {
            None => Ok(Vec::new()),
            Some((_, Value::Number(n))) if n.as_u64().is_some() => {
                Ok(vec![n.as_u64().unwrap_or_default() as u32])
            }
            Some((k, Value::Array(_))) => Ok(self.usize_list(k)?.into_iter().map(|n| n as u32).collect()),
            Some((k, _)) => Err(EngineError::field(
                self.path,
                k,
                "expected a token id or a list of token ids",
            )),
        }
    }
}

/// The most decoder layers a config may declare (the largest public MoE has 94).
pub const MAX_LAYERS: usize = 4096;
/// The most experts per layer a config may declare (expert ids are u16 in traces).
pub const MAX_EXPERTS: usize = 65_536;

fn parse(f: &Fields<'_>) -> Result<ModelConfig> {
    let model_type = f
        .str_opt("model_type")?
        .ok_or_else(|| EngineError::field(f.path, "model_type", "missing"))?;
    let arch = Arch::from_model_type(model_type).ok_or_else(|| EngineError::UnsupportedModelType {
        path: f.path.to_path_buf(),
        got: model_type.to_string(),
        supported: Arch::SUPPORTED.to_vec(),
    })?;

    if let Some(act) = f.str_opt("hidden_act")?
        && act != "silu"
    {
        return Err(EngineError::field(
            f.path,
            "hidden_act",
            format!("`{act}` is not supported (expected \"silu\")"),
        ));
    }

    let hidden_size = f.positive(&["hidden_size"])?;
    let num_hidden_layers = f.positive(&["num_hidden_layers"])?;
    // Per-layer tables are allocated from these counts before any tensor is read: an absurd
    // value must be refused here, not abort the process on allocation.
    if num_hidden_layers > MAX_LAYERS {
        return Err(EngineError::field(
            f.path,
            "num_hidden_layers",
            format!("{num_hidden_layers} is absurdly large (expected at most {MAX_LAYERS})"),
        ));
    }
    let num_attention_heads = f.positive(&["num_attention_heads"])?;
    let num_key_value_heads = f
        .usize_opt(&["num_key_value_heads"])?
        .unwrap_or(num_attention_heads);
    if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
        return Err(EngineError::field(
            f.path,
            "num_key_value_heads",
            format!("{num_key_value_heads} does not divide num_attention_heads = {num_attention_heads}"),
        ));
    }
    let head_dim = match f.usize_opt(&["head_dim"])? {
        Some(d) => d,
        // Without `head_dim`, the heads split the hidden size: say so in the keys the file has.
        None if !hidden_size.is_multiple_of(num_attention_heads)
            || !(hidden_size / num_attention_heads).is_multiple_of(2) =>
        {
            return Err(EngineError::field(
                f.path,
                "num_attention_heads",
                format!(
                    "{num_attention_heads} heads do not split hidden_size = {hidden_size} into heads of an even width (and there is no head_dim key to say otherwise)"
                ),
            ));
        }
        None => hidden_size / num_attention_heads,
    };
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(EngineError::field(
            f.path,
            "head_dim",
            "must be a positive even number",
        ));
    }
    let max_position_embeddings = f.positive(&["max_position_embeddings"])?;

    let num_experts = f.positive(&["num_experts", "num_local_experts"])?;
    if num_experts > MAX_EXPERTS {
        let key = f
            .lookup(&["num_experts", "num_local_experts"])
            .map_or("num_experts", |(k, _)| k);
        return Err(EngineError::field(
            f.path,
            key,
            format!(
                "{num_experts} is absurdly large (expected at most {MAX_EXPERTS}: traces store expert ids as u16)"
            ),
        ));
    }
    let num_experts_per_tok = f.positive(&["num_experts_per_tok"])?;
    if num_experts_per_tok > num_experts {
        return Err(EngineError::field(
            f.path,
            "num_experts_per_tok",
            format!("{num_experts_per_tok} exceeds the number of experts ({num_experts})"),
        ));
    }

    // Expert width: qwen*_moe name it moe_intermediate_size; mixtral and olmoe use
    // intermediate_size for their experts (they have no dense layers).
    let (intermediate_size, moe_intermediate_size) = match arch {
        Arch::Qwen3Moe | Arch::Qwen2Moe | Arch::Qwen3Next => (
            f.usize_opt(&["intermediate_size"])?.unwrap_or(0),
            f.positive(&["moe_intermediate_size"])?,
        ),
        Arch::Mixtral | Arch::Olmoe => {
            let i = f.positive(&["intermediate_size"])?;
            (i, i)
        }
    };

    let mlp_kinds = mlp_kinds(f, arch, num_hidden_layers, num_experts)?;
    if intermediate_size == 0 && mlp_kinds.contains(&MlpKind::Dense) {
        return Err(EngineError::field(
            f.path,
            "intermediate_size",
            "missing (required: some layers are dense)",
        ));
    }

    let (qkv_bias, o_bias) = match arch {
        Arch::Qwen2Moe => (f.bool_or("qkv_bias", true)?, false),
        Arch::Mixtral => (false, false),
        Arch::Qwen3Moe | Arch::Olmoe | Arch::Qwen3Next => {
            let b = f.bool_or("attention_bias", false)?;
            (b, b)
        }
    };
    let qk_norm = match arch {
        Arch::Qwen3Moe | Arch::Qwen3Next => QkNorm::PerHead,
        Arch::Olmoe => QkNorm::FullWidth,
        Arch::Mixtral | Arch::Qwen2Moe => QkNorm::None,
    };
    if arch == Arch::Olmoe && hidden_size != num_attention_heads * head_dim {
        let key = if f.lookup(&["head_dim"]).is_some() {
            "head_dim"
        } else {
            "num_attention_heads"
        };
        return Err(EngineError::field(
            f.path,
            key,
            format!(
                "olmoe needs num_attention_heads × head_dim = hidden_size ({num_attention_heads} × {head_dim} ≠ {hidden_size})"
            ),
        ));
    }
    let rms_norm_eps = f.f64_opt(&["rms_norm_eps"])?.unwrap_or(arch.default_eps());
    if !(rms_norm_eps.is_finite() && rms_norm_eps >= 0.0) {
        return Err(EngineError::field(
            f.path,
            "rms_norm_eps",
            format!("{rms_norm_eps} (expected a finite number ≥ 0)"),
        ));
    }

    // qwen3_next rotates a quarter of each head unless its config says otherwise.
    let partial = (arch == Arch::Qwen3Next).then_some(0.25);
    let rope = RopeConfig::from_config_partial(f.map, f.path, arch.default_theta(), head_dim, partial)?;
    let sliding_windows = sliding_windows(f, arch, num_hidden_layers)?;
    let (mixers, linear_attn) = mixers(f, arch, num_hidden_layers)?;

    Ok(ModelConfig {
        arch,
        vocab_size: f.positive(&["vocab_size"])?,
        hidden_size,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps: rms_norm_eps as f32,
        max_position_embeddings,
        tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
        rope,
        qkv_bias,
        o_bias,
        qk_norm,
        clip_qkv: match arch {
            Arch::Olmoe => f.f64_opt(&["clip_qkv"])?.map(|c| c as f32),
            _ => None,
        },
        intermediate_size,
        moe_intermediate_size,
        num_experts,
        num_experts_per_tok,
        norm_topk_prob: match arch {
            Arch::Mixtral => true,
            _ => f.bool_or("norm_topk_prob", false)?,
        },
        shared_expert_intermediate_size: match arch {
            Arch::Qwen2Moe | Arch::Qwen3Next => Some(f.positive(&["shared_expert_intermediate_size"])?),
            _ => None,
        },
        mlp_kinds,
        sliding_windows,
        mixers,
        linear_attn,
        attn_output_gate: arch == Arch::Qwen3Next,
        norm_zero_centred: arch == Arch::Qwen3Next,
        quantization: quantization(f)?,
        bos_token_id: f.usize_opt(&["bos_token_id"])?.map(|n| n as u32),
        eos_token_ids: f.token_ids("eos_token_id")?,
        path: f.path.to_path_buf(),
    })
}

/// MLX's `quantization` block, or its copy `quantization_config`; other quantisation formats
/// (transformers' `quant_method`: fp8, gptq, awq, …) are refused by name.
fn quantization(f: &Fields<'_>) -> Result<Option<crate::quant::QuantConfig>> {
    let (key, v) = match (f.map.get("quantization"), f.map.get("quantization_config")) {
        (Some(v), _) => ("quantization", v),
        (None, Some(v)) => ("quantization_config", v),
        (None, None) => return Ok(None),
    };
    if let Some(method) = v.get("quant_method") {
        return Err(EngineError::field(
            f.path,
            format!("{key}.quant_method"),
            format!(
                "{method} checkpoints are not supported (expected MLX's affine quantisation: bits and group_size)"
            ),
        ));
    }
    crate::quant::QuantConfig::parse(v, f.path, key).map(Some)
}

/// Dense or MoE per layer, as transformers' decoder layer decides it.
fn mlp_kinds(f: &Fields<'_>, arch: Arch, layers: usize, experts: usize) -> Result<Vec<MlpKind>> {
    match arch {
        Arch::Mixtral | Arch::Olmoe => Ok(vec![MlpKind::Moe; layers]),
        Arch::Qwen3Moe | Arch::Qwen2Moe | Arch::Qwen3Next => {
            let only_dense = f.usize_list("mlp_only_layers")?;
            let step = f.usize_opt(&["decoder_sparse_step"])?.unwrap_or(1);
            if step == 0 {
                return Err(EngineError::field(
                    f.path,
                    "decoder_sparse_step",
                    "must be at least 1",
                ));
            }
            Ok((0..layers)
                .map(|l| {
                    if !only_dense.contains(&l) && experts > 0 && (l + 1) % step == 0 {
                        MlpKind::Moe
                    } else {
                        MlpKind::Dense
                    }
                })
                .collect())
        }
    }
}

/// The sliding attention window of each layer, as transformers' config classes derive it.
fn sliding_windows(f: &Fields<'_>, arch: Arch, layers: usize) -> Result<Vec<Option<usize>>> {
    let window = f.usize_opt(&["sliding_window"])?.filter(|&w| w > 0);
    let use_sliding = f.bool_or("use_sliding_window", false)?;
    let explicit: Option<Vec<String>> = match f.lookup(&["layer_types"]) {
        None => None,
        Some((k, Value::Array(items))) => Some(
            items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| EngineError::field(f.path, k, "expected a list of strings"))
                })
                .collect::<Result<_>>()?,
        ),
        Some((k, _)) => return Err(EngineError::field(f.path, k, "expected a list of strings")),
    };
    let per_layer: Vec<bool> = match (arch, explicit) {
        // qwen3_next's layer_types name its token mixers; it has no sliding windows.
        (Arch::Qwen3Next, _) => vec![false; layers],
        (_, Some(types)) if arch == Arch::Qwen2Moe || use_sliding => {
            if types.len() != layers {
                return Err(EngineError::field(
                    f.path,
                    "layer_types",
                    format!(
                        "has {} entries, expected num_hidden_layers = {layers}",
                        types.len()
                    ),
                ));
            }
            types.iter().map(|t| t == "sliding_attention").collect()
        }
        (Arch::Qwen2Moe, None) => {
            let max_window_layers = f.usize_opt(&["max_window_layers"])?.unwrap_or(28);
            (0..layers)
                .map(|i| use_sliding && (i + 1) % 2 == 1 && i < max_window_layers)
                .collect()
        }
        (Arch::Qwen3Moe, _) => vec![use_sliding; layers],
        (Arch::Mixtral, _) => vec![window.is_some(); layers],
        (Arch::Olmoe, _) => vec![false; layers],
        (Arch::Qwen2Moe, Some(_)) => unreachable!("handled by the first arm"),
    };
    Ok(per_layer
        .into_iter()
        .map(|sliding| if sliding { window } else { None })
        .collect())
}

/// Per layer, what mixes tokens (qwen3_next: `layer_types`, or a full-attention layer every
/// `full_attention_interval` layers), and the linear-attention shape when any layer has it.
fn mixers(f: &Fields<'_>, arch: Arch, layers: usize) -> Result<(Vec<Mixer>, Option<LinearAttnConfig>)> {
    if arch != Arch::Qwen3Next {
        return Ok((vec![Mixer::Attention; layers], None));
    }
    let mixers: Vec<Mixer> = match f.lookup(&["layer_types"]) {
        Some((k, Value::Array(items))) => {
            if items.len() != layers {
                return Err(EngineError::field(
                    f.path,
                    k,
                    format!(
                        "has {} entries, expected num_hidden_layers = {layers}",
                        items.len()
                    ),
                ));
            }
            items
                .iter()
                .enumerate()
                .map(|(i, v)| match v.as_str() {
                    Some("full_attention") => Ok(Mixer::Attention),
                    Some("linear_attention") => Ok(Mixer::LinearAttention),
                    other => Err(EngineError::field(
                        f.path,
                        format!("{k}[{i}]"),
                        format!(
                            "{} is not a layer type this engine knows (expected \"linear_attention\" or \"full_attention\")",
                            other.map_or_else(|| v.to_string(), |s| format!("\"{s}\""))
                        ),
                    )),
                })
                .collect::<Result<_>>()?
        }
        Some((k, _)) => return Err(EngineError::field(f.path, k, "expected a list of strings")),
        None => {
            let interval = f.usize_opt(&["full_attention_interval"])?.unwrap_or(4);
            if interval == 0 {
                return Err(EngineError::field(
                    f.path,
                    "full_attention_interval",
                    "must be at least 1",
                ));
            }
            (0..layers)
                .map(|i| {
                    if (i + 1) % interval == 0 {
                        Mixer::Attention
                    } else {
                        Mixer::LinearAttention
                    }
                })
                .collect()
        }
    };
    let at_least_one = |key: &str, default: usize| -> Result<usize> {
        let n = f.usize_opt(&[key])?.unwrap_or(default);
        if n == 0 {
            return Err(EngineError::field(f.path, key, "must be at least 1"));
        }
        Ok(n)
    };
    let linear = LinearAttnConfig {
        num_key_heads: at_least_one("linear_num_key_heads", 16)?,
        num_value_heads: at_least_one("linear_num_value_heads", 32)?,
        key_head_dim: at_least_one("linear_key_head_dim", 128)?,
        value_head_dim: at_least_one("linear_value_head_dim", 128)?,
        conv_kernel: at_least_one("linear_conv_kernel_dim", 4)?,
    };
    if !linear.num_value_heads.is_multiple_of(linear.num_key_heads) {
        return Err(EngineError::field(
            f.path,
            "linear_num_value_heads",
            format!(
                "{} is not a multiple of linear_num_key_heads = {}",
                linear.num_value_heads, linear.num_key_heads
            ),
        ));
    }
    let any_linear = mixers.contains(&Mixer::LinearAttention);
    Ok((mixers, any_linear.then_some(linear)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> Result<ModelConfig> {
        ModelConfig::from_json_str(s, Path::new("config.json"))
    }

    const QWEN3: &str = r#"{"model_type":"qwen3_moe","vocab_size":100,"hidden_size":32,
        "num_hidden_layers":4,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,
        "max_position_embeddings":64,"num_experts":8,"num_experts_per_tok":2,
        "moe_intermediate_size":16,"intermediate_size":48,"mlp_only_layers":[0],
        "decoder_sparse_step":1,"norm_topk_prob":true,"rope_theta":1000000.0}"#;

    #[test]
    fn qwen3_dense_layers_follow_mlp_only_layers() {
        let c = parse_str(QWEN3).unwrap();
        assert_eq!(c.arch, Arch::Qwen3Moe);
        assert_eq!(c.moe_layers(), vec![1, 2, 3]);
        assert_eq!(c.qk_norm, QkNorm::PerHead);
        assert_eq!(c.rope.theta, 1_000_000.0);
        assert!(c.norm_topk_prob);
    }

    #[test]
    fn renamed_keys_are_accepted() {
        let s = QWEN3.replace("\"num_experts\"", "\"num_local_experts\"").replace(
            "\"rope_theta\":1000000.0",
            "\"rope_parameters\":{\"rope_type\":\"default\",\"rope_theta\":5000.0}",
        );
        let c = parse_str(&s).unwrap();
        assert_eq!(c.num_experts, 8);
        assert_eq!(c.rope.theta, 5000.0);
    }

    #[test]
    fn unknown_model_type_lists_supported() {
        let err = parse_str(&QWEN3.replace("qwen3_moe", "llama"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unsupported model_type `llama`"), "{err}");
        assert!(err.contains("qwen3_moe, olmoe, mixtral, qwen2_moe"), "{err}");
    }

    #[test]
    fn missing_field_is_named() {
        let err = parse_str(&QWEN3.replace("\"hidden_size\":32,", ""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("config.json: field `hidden_size`: missing"), "{err}");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = parse_str(&QWEN3.replace("\"num_experts_per_tok\":2", "\"num_experts_per_tok\":\"2\""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`num_experts_per_tok`: expected a non-negative integer"),
            "{err}"
        );
    }

    const QWEN3_NEXT: &str = r#"{"model_type":"qwen3_next","vocab_size":100,"hidden_size":32,
        "num_hidden_layers":8,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,
        "max_position_embeddings":64,"num_experts":8,"num_experts_per_tok":2,
        "moe_intermediate_size":16,"shared_expert_intermediate_size":16,"norm_topk_prob":true,
        "linear_num_key_heads":2,"linear_num_value_heads":4,"linear_key_head_dim":8,
        "linear_value_head_dim":12,"rope_theta":10000000.0,"partial_rotary_factor":0.25}"#;

    #[test]
    fn qwen3_next_layers_follow_the_interval() {
        let c = parse_str(QWEN3_NEXT).unwrap();
        assert_eq!(c.arch, Arch::Qwen3Next);
        let full: Vec<usize> = (0..8).filter(|&l| c.mixers[l] == Mixer::Attention).collect();
        assert_eq!(full, vec![3, 7], "default full_attention_interval is 4");
        assert_eq!(c.rope.head_dim, 4, "a quarter of head_dim 16 rotates");
        assert_eq!(c.rope.theta, 1e7);
        let lin = c.linear_attn.unwrap();
        assert_eq!((lin.key_dim(), lin.value_dim(), lin.conv_dim()), (16, 48, 80));
        assert!(c.attn_output_gate && c.norm_zero_centred);
        assert_eq!(c.shared_expert_intermediate_size, Some(16));
        let c = parse_str(&QWEN3_NEXT.replace(
            "\"num_hidden_layers\":8",
            "\"num_hidden_layers\":4,\"full_attention_interval\":2",
        ))
        .unwrap();
        assert_eq!(
            c.mixers,
            vec![
                Mixer::LinearAttention,
                Mixer::Attention,
                Mixer::LinearAttention,
                Mixer::Attention
            ]
        );
    }

    #[test]
    fn qwen3_next_bad_layer_type_is_named() {
        let s = QWEN3_NEXT.replace(
            "\"num_hidden_layers\":8",
            "\"num_hidden_layers\":2,\"layer_types\":[\"linear_attention\",\"sliding_attention\"]",
        );
        let err = parse_str(&s).unwrap_err().to_string();
        assert!(
            err.contains("layer_types[1]") && err.contains("\"sliding_attention\" is not a layer type"),
            "{err}"
        );
        let err =
            parse_str(&QWEN3_NEXT.replace("\"linear_num_value_heads\":4", "\"linear_num_value_heads\":3"))
                .unwrap_err()
                .to_string();
        assert!(err.contains("linear_num_value_heads"), "{err}");
    }

    #[test]
    fn partial_rotary_is_refused_where_unsupported() {
        let s = QWEN3.replace(
            "\"rope_theta\":1000000.0",
            "\"rope_theta\":1000000.0,\"partial_rotary_factor\":0.5",
        );
        let err = parse_str(&s).unwrap_err().to_string();
        assert!(err.contains("partial_rotary_factor"), "{err}");
    }

    #[test]
    fn qwen2_sliding_layers_follow_transformers_rule() {
        let s = QWEN3
            .replace("qwen3_moe", "qwen2_moe")
            .replace("\"head_dim\":16,", "\"use_sliding_window\":true,\"sliding_window\":8,\"max_window_layers\":3,\"shared_expert_intermediate_size\":24,");
        let c = parse_str(&s).unwrap();
        assert_eq!(c.sliding_windows, vec![Some(8), None, Some(8), None]);
        assert!(c.qkv_bias);
    }
}
