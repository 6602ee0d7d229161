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

mod family;
use family::{
    MLA_DEFAULTS_DEEPSEEK_V3, MLA_DEFAULTS_GLM4_MOE_LITE, clamped_swiglu, gpt_oss_default_rope,
    grouped_routing, mixers, mla_shape, mla_softmax_scale, mlp_kinds, quantization, sliding_windows,
};

/// The architectures the engine runs, by `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arch {
    Qwen3Moe,
    Olmoe,
    Mixtral,
    Qwen2Moe,
    Qwen3Next,
    DeepseekV3,
    /// GLM-4.5 / 4.6: grouped-query attention (partial rotary, optional q/k norms and q/k/v
    /// biases) over deepseek_v3's sigmoid group-limited router and shared experts.
    Glm4Moe,
    /// GLM-4.7-Flash: deepseek_v3's latent attention and router, dense/sparse layers by
    /// `mlp_layer_types`.
    Glm4MoeLite,
    GptOss,
}

impl Arch {
    /// Every supported `model_type` string, in the order of the README table.
    pub const SUPPORTED: [&'static str; 9] = [
        "qwen3_moe",
        "olmoe",
        "mixtral",
        "qwen2_moe",
        "qwen3_next",
        "deepseek_v3",
        "glm4_moe",
        "glm4_moe_lite",
        "gpt_oss",
    ];

    /// The architecture for a `model_type` string, if supported. Kimi-K2's checkpoints say
    /// `kimi_k2` for what is DeepSeek-V3's architecture (its model card says to rename it to
    /// `deepseek_v3` for frameworks that do not know the name): taken as `deepseek_v3`.
    pub fn from_model_type(s: &str) -> Option<Self> {
        Some(match s {
            "qwen3_moe" => Arch::Qwen3Moe,
            "olmoe" => Arch::Olmoe,
            "mixtral" => Arch::Mixtral,
            "qwen2_moe" => Arch::Qwen2Moe,
            "qwen3_next" => Arch::Qwen3Next,
            "deepseek_v3" | "kimi_k2" => Arch::DeepseekV3,
            "glm4_moe" => Arch::Glm4Moe,
            "glm4_moe_lite" => Arch::Glm4MoeLite,
            "gpt_oss" => Arch::GptOss,
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
            Arch::DeepseekV3 => "deepseek_v3",
            Arch::Glm4Moe => "glm4_moe",
            Arch::Glm4MoeLite => "glm4_moe_lite",
            Arch::GptOss => "gpt_oss",
        }
    }

    /// DeepSeek's MoE: `n_routed_experts` chosen by sigmoid scores with a selection bias and
    /// groups, ungated `shared_experts`, leading dense layers (deepseek_v3 and the GLM-4 MoEs).
    pub fn deepseek_moe(self) -> bool {
        matches!(self, Arch::DeepseekV3 | Arch::Glm4Moe | Arch::Glm4MoeLite)
    }

    /// Every layer mixes tokens with multi-head latent attention.
    pub fn latent_attention(self) -> bool {
        matches!(self, Arch::DeepseekV3 | Arch::Glm4MoeLite)
    }

    /// Default `rope_theta` of transformers' config class.
    fn default_theta(self) -> f64 {
        match self {
            Arch::Mixtral => 1_000_000.0,
            Arch::GptOss => 150_000.0,
            _ => 10_000.0,
        }
    }

    /// Default `rms_norm_eps` of transformers' config class.
    fn default_eps(self) -> f64 {
        match self {
            Arch::Olmoe | Arch::Mixtral | Arch::Glm4Moe | Arch::Glm4MoeLite | Arch::GptOss => 1e-5,
            Arch::Qwen3Moe | Arch::Qwen2Moe | Arch::Qwen3Next | Arch::DeepseekV3 => 1e-6,
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
    /// deepseek_v3's multi-head latent attention ([`MlaConfig`]).
    LatentAttention,
}

/// Shape of deepseek_v3's multi-head latent attention: queries through a low-rank bottleneck
/// (or one projection), keys and values expanded per head from one compressed latent per
/// position; each query/key head is a non-rotary part and a rotary part, the rotary key shared
/// by all heads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MlaConfig {
    /// `q_a_proj` → `q_a_layernorm` → `q_b_proj` of this inner width; `None` (the config's
    /// null): one `q_proj`.
    pub q_lora_rank: Option<usize>,
    /// Width of the compressed key/value latent (`kv_a_proj_with_mqa` yields it and the rotary
    /// key; `kv_b_proj` expands it per head).
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    /// Rotary values stored as interleaved pairs `(x0, x1), (x2, x3), …` (DeepSeek's layout)
    /// rather than in halves.
    pub rope_interleave: bool,
    /// The softmax scale: `1/√(qk_nope_head_dim + qk_rope_head_dim)`, times
    /// `mscale(factor, mscale_all_dim)²` under a scaled rope with `mscale_all_dim`.
    pub softmax_scale: f32,
    /// Epsilon of `q_a_layernorm` and `kv_a_layernorm`: transformers builds them with its
    /// RMSNorm's default 1e-6, not the config's `rms_norm_eps`; llama.cpp with the file's.
    pub latent_norm_eps: f32,
}

impl MlaConfig {
    /// Width of one query/key head: non-rotary then rotary values.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Values a layer's KV cache keeps per position: the normalised latent and the rotated
    /// shared key.
    pub fn cached_width(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }
}

/// How a router turns its logits into a top-k selection and the weights applied.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RoutingRule {
    /// Softmax over all experts, top-k, renormalised if `norm_topk_prob` (qwen*, olmoe,
    /// mixtral).
    Softmax,
    /// deepseek_v3: sigmoid scores; a per-expert bias (`e_score_correction_bias`) added for the
    /// selection only; the experts in `n_group` groups, each group scored by the sum of its two
    /// best biased scores, the best `topk_group` groups kept and the top-k chosen within them;
    /// the chosen experts' unbiased scores renormalised if `norm_topk_prob`, then multiplied by
    /// `routed_scaling_factor`.
    SigmoidGrouped {
        n_group: usize,
        topk_group: usize,
        routed_scaling_factor: f32,
    },
    /// gpt_oss: the router's logits (with its bias) ranked, the top-k kept, and a softmax over
    /// those k logits alone gives the weights.
    TopKSoftmax,
}

/// gpt_oss's expert activation: `gate_up_proj` yields gate and up values interleaved
/// (`gate = [..., ::2]`, `up = [..., 1::2]`), each with its bias; the gate is clamped above at
/// `limit`, the up values to `±limit`, and `(up + 1) · gate · σ(alpha · gate)` goes to
/// `down_proj` (with its bias).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClampedSwiglu {
    pub alpha: f32,
    pub limit: f32,
    /// The experts' matrices computed as llama.cpp computes them (GGUF files: activations
    /// rounded to each block type's format) rather than on f32 activations (transformers'
    /// arithmetic on the dequantised hub MXFP4 weights).
    pub ggml: bool,
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
    /// Shared expert FFN width: qwen2_moe's and qwen3_next's (`shared_expert.`, with its
    /// sigmoid gate), deepseek_v3's `n_shared_experts × moe_intermediate_size`
    /// (`shared_experts.`, ungated: see [`ModelConfig::shared_expert_gated`]).
    pub shared_expert_intermediate_size: Option<usize>,
    /// The shared expert's output is scaled by `sigmoid(x · shared_expert_gate)` (qwen2_moe,
    /// qwen3_next); deepseek_v3 adds it as it is.
    pub shared_expert_gated: bool,
    /// How the routers select and weigh experts.
    pub routing: RoutingRule,
    /// deepseek_v3's latent attention shape (the layers' mixer is then
    /// [`Mixer::LatentAttention`]).
    pub mla: Option<MlaConfig>,
    /// Multi-token-prediction layers stored after the decoder layers (deepseek_v3's
    /// `num_nextn_predict_layers`): not part of the forward pass, and not reported as unused.
    pub nextn_predict_layers: usize,
    /// gpt_oss: experts with biases and the clamped SwiGLU (none: `silu(gate) · up`, no biases).
    pub clamped_swiglu: Option<ClampedSwiglu>,
    /// gpt_oss: a learned logit per query head (`self_attn.sinks`) joins each softmax's
    /// denominator.
    pub attention_sinks: bool,
    /// gpt_oss: the config's `quantization_config` says MXFP4 (`quant_method: "mxfp4"`): its
    /// experts are the hub's `*_blocks` / `*_scales`.
    pub mxfp4_experts: bool,
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

    /// Values one position occupies in one layer's KV cache: keys and values
    /// (`2 × kv_width`), or under latent attention the latent and the rotary key.
    pub fn kv_cache_width(&self) -> usize {
        match &self.mla {
            Some(m) => m.cached_width(),
            None => 2 * self.kv_width(),
        }
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

    /// A per-layer list under `key` has `len` entries: one per layer, or a one-line error.
    fn one_per_layer(&self, key: &str, len: usize, layers: usize) -> Result<()> {
        if len != layers {
            return Err(EngineError::field(
                self.path,
                key,
                format!("has {len} entries, expected num_hidden_layers = {layers}"),
            ));
        }
        Ok(())
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
    // Latent attention expands the latent into every head: there are no key/value groups.
    if arch.latent_attention() && num_key_value_heads != num_attention_heads {
        return Err(EngineError::field(
            f.path,
            "num_key_value_heads",
            format!(
                "{num_key_value_heads} ≠ num_attention_heads = {num_attention_heads} ({}'s latent attention gives every head its own keys and values)",
                arch.model_type()
            ),
        ));
    }
    let mla = match arch {
        Arch::DeepseekV3 => Some(mla_shape(f, &MLA_DEFAULTS_DEEPSEEK_V3)?),
        Arch::Glm4MoeLite => Some(mla_shape(f, &MLA_DEFAULTS_GLM4_MOE_LITE)?),
        _ => None,
    };
    let head_dim = match (&mla, f.usize_opt(&["head_dim"])?) {
        // deepseek_v3's config says head_dim = qk_rope_head_dim; a query/key head is wider.
        (Some(m), _) => m.qk_head_dim(),
        (None, Some(d)) => d,
        // Without `head_dim`, the heads split the hidden size: say so in the keys the file has.
        (None, None)
            if !hidden_size.is_multiple_of(num_attention_heads)
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
        (None, None) => hidden_size / num_attention_heads,
    };
    if mla.is_none() && (head_dim == 0 || head_dim % 2 != 0) {
        return Err(EngineError::field(
            f.path,
            "head_dim",
            "must be a positive even number",
        ));
    }
    let max_position_embeddings = f.positive(&["max_position_embeddings"])?;

    // deepseek_v3 names its routed experts n_routed_experts (transformers maps
    // num_local_experts onto it).
    let expert_keys: &[&str] = if arch.deepseek_moe() {
        &["n_routed_experts", "num_local_experts"]
    } else {
        &["num_experts", "num_local_experts"]
    };
    let num_experts = f.positive(expert_keys)?;
    if num_experts > MAX_EXPERTS {
        let key = f.lookup(expert_keys).map_or(expert_keys[0], |(k, _)| k);
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
        Arch::Qwen3Moe
        | Arch::Qwen2Moe
        | Arch::Qwen3Next
        | Arch::DeepseekV3
        | Arch::Glm4Moe
        | Arch::Glm4MoeLite => (
            f.usize_opt(&["intermediate_size"])?.unwrap_or(0),
            f.positive(&["moe_intermediate_size"])?,
        ),
        Arch::Mixtral | Arch::Olmoe | Arch::GptOss => {
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
        // deepseek_v3: the biases of q_a_proj, kv_a_proj_with_mqa and o_proj.
        Arch::Qwen3Moe | Arch::Olmoe | Arch::Qwen3Next | Arch::DeepseekV3 | Arch::Glm4MoeLite => {
            let b = f.bool_or("attention_bias", false)?;
            (b, b)
        }
        // glm4_moe: q/k/v carry biases under attention_bias, o_proj never does.
        Arch::Glm4Moe => (f.bool_or("attention_bias", false)?, false),
        // gpt_oss: q, k, v and o biases unless the config says otherwise.
        Arch::GptOss => {
            let b = f.bool_or("attention_bias", true)?;
            (b, b)
        }
    };
    let qk_norm = match arch {
        Arch::Qwen3Moe | Arch::Qwen3Next => QkNorm::PerHead,
        Arch::Olmoe => QkNorm::FullWidth,
        Arch::Mixtral | Arch::Qwen2Moe | Arch::DeepseekV3 | Arch::Glm4MoeLite | Arch::GptOss => QkNorm::None,
        Arch::Glm4Moe if f.bool_or("use_qk_norm", false)? => QkNorm::PerHead,
        Arch::Glm4Moe => QkNorm::None,
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
    // qwen3_next rotates a quarter of each head, glm4_moe half, unless the config says otherwise.
    let partial = match arch {
        Arch::Qwen3Next => Some(0.25),
        Arch::Glm4Moe => Some(0.5),
        _ => None,
    };
    // deepseek_v3 rotates the qk_rope_head_dim values of each head (its rotary part).
    let rotated = mla.map_or(head_dim, |m| m.qk_rope_head_dim);
    let rope = match gpt_oss_default_rope(f, arch) {
        // Without rope keys, gpt_oss's config class supplies its yarn scaling.
        Some(map) => RopeConfig::from_config_partial(&map, f.path, arch.default_theta(), rotated, partial)?,
        None => RopeConfig::from_config_partial(f.map, f.path, arch.default_theta(), rotated, partial)?,
    };
    let mla = match mla {
        Some(m) => Some(MlaConfig {
            softmax_scale: mla_softmax_scale(f, &rope, m.qk_head_dim())?,
            ..m
        }),
        None => None,
    };
    let sliding_windows = sliding_windows(f, arch, num_hidden_layers)?;
    let (mixers, linear_attn) = mixers(f, arch, num_hidden_layers)?;
    let routing = if arch.deepseek_moe() {
        grouped_routing(f, arch, num_experts, num_experts_per_tok)?
    } else if arch == Arch::GptOss {
        RoutingRule::TopKSoftmax
    } else {
        RoutingRule::Softmax
    };
    let clamped_swiglu = match arch {
        Arch::GptOss => Some(clamped_swiglu(f)?),
        _ => None,
    };

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
            Arch::DeepseekV3 | Arch::Glm4Moe | Arch::Glm4MoeLite => f.bool_or("norm_topk_prob", true)?,
            _ => f.bool_or("norm_topk_prob", false)?,
        },
        shared_expert_intermediate_size: match arch {
            Arch::Qwen2Moe | Arch::Qwen3Next => Some(f.positive(&["shared_expert_intermediate_size"])?),
            Arch::DeepseekV3 | Arch::Glm4Moe | Arch::Glm4MoeLite => {
                match f.usize_opt(&["n_shared_experts"])?.unwrap_or(1) {
                    0 => None,
                    n => Some(n.checked_mul(moe_intermediate_size).ok_or_else(|| {
                        EngineError::field(f.path, "n_shared_experts", format!("{n} is absurdly large"))
                    })?),
                }
            }
            _ => None,
        },
        shared_expert_gated: matches!(arch, Arch::Qwen2Moe | Arch::Qwen3Next),
        routing,
        mla,
        nextn_predict_layers: match arch {
            Arch::DeepseekV3 | Arch::Glm4Moe | Arch::Glm4MoeLite => f
                .usize_opt(&["num_nextn_predict_layers", "num_mtp_layers"])?
                .unwrap_or(0),
            _ => 0,
        },
        clamped_swiglu,
        attention_sinks: arch == Arch::GptOss,
        mxfp4_experts: arch == Arch::GptOss
            && ["quantization", "quantization_config"].iter().any(|k| {
                f.map
                    .get(*k)
                    .and_then(|v| v.get("quant_method"))
                    .and_then(Value::as_str)
                    == Some("mxfp4")
            }),
        mlp_kinds,
        sliding_windows,
        mixers,
        linear_attn,
        attn_output_gate: arch == Arch::Qwen3Next,
        norm_zero_centred: arch == Arch::Qwen3Next,
        quantization: quantization(f, arch)?,
        bos_token_id: f.usize_opt(&["bos_token_id"])?.map(|n| n as u32),
        eos_token_ids: f.token_ids("eos_token_id")?,
        path: f.path.to_path_buf(),
    })
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

    /// GLM-4.5's config shape (keys as its config.json spells them: partial_rotary_factor
    /// top-level, rope_theta without rope parameters).
    const GLM4_MOE: &str = r#"{"model_type":"glm4_moe","vocab_size":100,"hidden_size":32,
        "num_hidden_layers":5,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,
        "partial_rotary_factor":0.5,"attention_bias":true,"use_qk_norm":true,
        "max_position_embeddings":131072,"n_routed_experts":16,"num_experts_per_tok":4,
        "n_group":1,"topk_group":1,"moe_intermediate_size":8,"intermediate_size":24,
        "n_shared_experts":1,"first_k_dense_replace":3,"routed_scaling_factor":2.5,
        "norm_topk_prob":true,"num_nextn_predict_layers":1,"rope_theta":1000000,
        "rope_scaling":null,"rms_norm_eps":1e-05}"#;

    #[test]
    fn glm4_moe_attention_and_routing() {
        let c = parse_str(GLM4_MOE).unwrap();
        assert_eq!(c.arch, Arch::Glm4Moe);
        assert_eq!(c.rope.head_dim, 8, "half of head_dim 16 rotates");
        assert_eq!(c.rope.theta, 1e6);
        assert!(c.qkv_bias && !c.o_bias);
        assert_eq!(c.qk_norm, QkNorm::PerHead);
        assert!(c.mla.is_none() && c.mixers.iter().all(|m| *m == Mixer::Attention));
        assert_eq!(c.moe_layers(), vec![3, 4]);
        assert_eq!(c.shared_expert_intermediate_size, Some(8));
        assert!(!c.shared_expert_gated);
        assert_eq!(c.nextn_predict_layers, 1);
        assert_eq!(
            c.routing,
            RoutingRule::SigmoidGrouped {
                n_group: 1,
                topk_group: 1,
                routed_scaling_factor: 2.5
            }
        );
        // GLM-4.5-Air: no q/k norms; a config without partial_rotary_factor rotates half.
        let c = parse_str(
            &GLM4_MOE
                .replace("\"use_qk_norm\":true", "\"use_qk_norm\":false")
                .replace("\"partial_rotary_factor\":0.5,", ""),
        )
        .unwrap();
        assert_eq!(c.qk_norm, QkNorm::None);
        assert_eq!(c.rope.head_dim, 8);
    }

    /// GLM-4.7-Flash's config shape: latent attention, no mlp_layer_types (the first layer
    /// dense, as transformers' default; its first_k_dense_replace is not read).
    const GLM4_MOE_LITE: &str = r#"{"model_type":"glm4_moe_lite","vocab_size":100,
        "hidden_size":32,"num_hidden_layers":4,"num_attention_heads":4,"num_key_value_heads":4,
        "max_position_embeddings":202752,"n_routed_experts":8,"num_experts_per_tok":4,
        "n_group":1,"topk_group":1,"moe_intermediate_size":8,"intermediate_size":24,
        "n_shared_experts":1,"first_k_dense_replace":1,"routed_scaling_factor":1.8,
        "kv_lora_rank":16,"q_lora_rank":24,"qk_nope_head_dim":12,"qk_rope_head_dim":8,
        "v_head_dim":20,"topk_method":"noaux_tc","num_nextn_predict_layers":1,
        "rope_theta":1000000}"#;

    #[test]
    fn glm4_moe_lite_is_latent_attention_with_layer_types() {
        let c = parse_str(GLM4_MOE_LITE).unwrap();
        assert_eq!(c.arch, Arch::Glm4MoeLite);
        let mla = c.mla.unwrap();
        assert_eq!(
            (mla.q_lora_rank, mla.kv_lora_rank, mla.v_head_dim),
            (Some(24), 16, 20)
        );
        assert!(mla.rope_interleave);
        assert_eq!(c.head_dim, 20);
        assert_eq!(c.moe_layers(), vec![1, 2, 3]);
        assert!(c.mixers.iter().all(|m| *m == Mixer::LatentAttention));
        let c = parse_str(&GLM4_MOE_LITE.replace(
            "\"first_k_dense_replace\":1",
            "\"mlp_layer_types\":[\"dense\",\"sparse\",\"dense\",\"sparse\"]",
        ))
        .unwrap();
        assert_eq!(c.moe_layers(), vec![1, 3]);
        // transformers' defaults for absent latent keys are GLM-4.7-Flash's, not DeepSeek's.
        let c = parse_str(&GLM4_MOE_LITE.replace("\"v_head_dim\":20,", "")).unwrap();
        assert_eq!(c.mla.unwrap().v_head_dim, 256);
    }

    /// DeepSeek-V3's own config shape (keys as its config.json spells them).
    const DEEPSEEK: &str = r#"{"model_type":"deepseek_v3","vocab_size":100,"hidden_size":32,
        "num_hidden_layers":6,"num_attention_heads":4,"num_key_value_heads":4,
        "max_position_embeddings":163840,"n_routed_experts":16,"num_experts_per_tok":4,
        "n_group":4,"topk_group":2,"moe_intermediate_size":8,"intermediate_size":24,
        "n_shared_experts":2,"first_k_dense_replace":1,"moe_layer_freq":1,"q_lora_rank":null,
        "kv_lora_rank":16,"qk_rope_head_dim":8,"qk_nope_head_dim":12,"v_head_dim":10,
        "scoring_func":"sigmoid","topk_method":"noaux_tc","num_nextn_predict_layers":1,
        "rope_theta":10000,"rope_scaling":{"type":"yarn","factor":40,"mscale":1.0,
        "mscale_all_dim":1.0,"original_max_position_embeddings":4096,"beta_fast":32,"beta_slow":1}}"#;

    #[test]
    fn deepseek_v3_shape_routing_and_scale() {
        let c = parse_str(DEEPSEEK).unwrap();
        assert_eq!(c.arch, Arch::DeepseekV3);
        assert_eq!(c.moe_layers(), vec![1, 2, 3, 4, 5]);
        assert!(c.mixers.iter().all(|&m| m == Mixer::LatentAttention));
        let m = c.mla.unwrap();
        assert_eq!((m.q_lora_rank, m.qk_head_dim(), m.cached_width()), (None, 20, 24));
        assert!(m.rope_interleave, "transformers' default");
        assert_eq!((c.head_dim, c.rope.head_dim, c.kv_cache_width()), (20, 8, 24));
        let mscale = 0.1 * 40f64.ln() + 1.0;
        assert!((m.softmax_scale as f64 - mscale * mscale / 20f64.sqrt()).abs() < 1e-6);
        match c.rope.scaling {
            crate::rope::RopeScaling::Yarn { attention_factor, .. } => assert_eq!(attention_factor, 1.0),
            ref s => panic!("{s:?}"),
        }
        assert_eq!(
            c.routing,
            RoutingRule::SigmoidGrouped {
                n_group: 4,
                topk_group: 2,
                routed_scaling_factor: 2.5
            }
        );
        assert!(c.norm_topk_prob, "transformers' default");
        assert_eq!(c.shared_expert_intermediate_size, Some(16));
        assert!(!c.shared_expert_gated);
        assert_eq!(c.nextn_predict_layers, 1);

        // DeepSeek's rule for moe_layer_freq; a query bottleneck; Kimi-K2's model_type.
        let c = parse_str(
            &DEEPSEEK
                .replace("\"moe_layer_freq\":1", "\"moe_layer_freq\":2")
                .replace("\"q_lora_rank\":null", "\"q_lora_rank\":24")
                .replace("deepseek_v3", "kimi_k2"),
        )
        .unwrap();
        assert_eq!(c.arch, Arch::DeepseekV3);
        assert_eq!(c.moe_layers(), vec![2, 4]);
        assert_eq!(c.mla.unwrap().q_lora_rank, Some(24));
        // Without mscale_all_dim the scale is plain.
        let c = parse_str(&DEEPSEEK.replace("\"mscale_all_dim\":1.0,", "")).unwrap();
        assert_eq!(c.mla.unwrap().softmax_scale, (20f64.powf(-0.5)) as f32);
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
