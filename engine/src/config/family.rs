//! What each family's `config.json` keys mean beyond the shared ones: deepseek_v3's latent
//! attention shape and grouped router, gpt_oss's SwiGLU and default rope, MLX's quantization
//! block, and the per-layer patterns (dense or MoE feed-forward, sliding windows, token mixers).

use serde_json::Value;

use super::{Arch, ClampedSwiglu, Fields, LinearAttnConfig, Mixer, MlaConfig, MlpKind, RoutingRule};
use crate::error::{EngineError, Result};
use crate::rope::RopeConfig;

/// The latent-attention shape transformers' config class assumes for absent keys.
pub(super) struct MlaDefaults {
    q_lora_rank: usize,
    kv_lora_rank: usize,
    qk_rope_head_dim: usize,
    qk_nope_head_dim: usize,
    v_head_dim: usize,
}

/// `DeepseekV3Config`'s defaults (DeepSeek-V3's shape).
pub(super) const MLA_DEFAULTS_DEEPSEEK_V3: MlaDefaults = MlaDefaults {
    q_lora_rank: 1536,
    kv_lora_rank: 512,
    qk_rope_head_dim: 64,
    qk_nope_head_dim: 128,
    v_head_dim: 128,
};

/// `Glm4MoeLiteConfig`'s defaults (GLM-4.7-Flash's shape).
pub(super) const MLA_DEFAULTS_GLM4_MOE_LITE: MlaDefaults = MlaDefaults {
    q_lora_rank: 768,
    kv_lora_rank: 512,
    qk_rope_head_dim: 64,
    qk_nope_head_dim: 192,
    v_head_dim: 256,
};

/// gpt_oss's `swiglu_alpha` and `swiglu_limit` (transformers' defaults 1.702 and 7.0).
pub(super) fn clamped_swiglu(f: &Fields<'_>) -> Result<ClampedSwiglu> {
    let mut out = [0.0f32; 2];
    for (o, (key, default)) in out
        .iter_mut()
        .zip([("swiglu_alpha", 1.702), ("swiglu_limit", 7.0)])
    {
        let v = f.f64_opt(&[key])?.unwrap_or(default);
        if !(v.is_finite() && v > 0.0) {
            return Err(EngineError::field(
                f.path,
                key,
                format!("{v} (expected a finite number > 0)"),
            ));
        }
        *o = v as f32;
    }
    Ok(ClampedSwiglu {
        alpha: out[0],
        limit: out[1],
        ggml: false,
    })
}

/// gpt_oss's config class fills in this yarn scaling when the file has no rope keys; the map
/// with it added, for gpt_oss configs without `rope_parameters` and `rope_scaling`.
pub(super) fn gpt_oss_default_rope(f: &Fields<'_>, arch: Arch) -> Option<serde_json::Map<String, Value>> {
    if arch != Arch::GptOss || f.map.contains_key("rope_parameters") || f.map.contains_key("rope_scaling") {
        return None;
    }
    let mut map = f.map.clone();
    map.insert(
        "rope_scaling".into(),
        serde_json::json!({"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "truncate": false, "original_max_position_embeddings": 4096}),
    );
    Some(map)
}

/// The latent attention shape (the softmax scale is filled in once the rope is read). Absent
/// keys take transformers' defaults; `q_lora_rank: null` means one `q_proj`.
pub(super) fn mla_shape(f: &Fields<'_>, d: &MlaDefaults) -> Result<MlaConfig> {
    let q_lora_rank = match f.map.get("q_lora_rank") {
        Some(Value::Null) => None,
        None => Some(d.q_lora_rank),
        Some(_) => match f.usize_opt(&["q_lora_rank"])? {
            Some(0) => {
                return Err(EngineError::field(
                    f.path,
                    "q_lora_rank",
                    "must be at least 1 (or null: one q_proj without a low-rank bottleneck)",
                ));
            }
            r => r,
        },
    };
    let at_least_one = |key: &str, default: usize| -> Result<usize> {
        let n = f.usize_opt(&[key])?.unwrap_or(default);
        if n == 0 {
            return Err(EngineError::field(f.path, key, "must be at least 1"));
        }
        Ok(n)
    };
    let qk_rope_head_dim = at_least_one("qk_rope_head_dim", d.qk_rope_head_dim)?;
    if !qk_rope_head_dim.is_multiple_of(2) {
        return Err(EngineError::field(
            f.path,
            "qk_rope_head_dim",
            format!("{qk_rope_head_dim} (expected an even number: rotary values turn in pairs)"),
        ));
    }
    Ok(MlaConfig {
        q_lora_rank,
        kv_lora_rank: at_least_one("kv_lora_rank", d.kv_lora_rank)?,
        qk_nope_head_dim: f.usize_opt(&["qk_nope_head_dim"])?.unwrap_or(d.qk_nope_head_dim),
        qk_rope_head_dim,
        v_head_dim: at_least_one("v_head_dim", d.v_head_dim)?,
        rope_interleave: f.bool_or("rope_interleave", true)?,
        softmax_scale: 0.0,
        latent_norm_eps: crate::deepseek_v3::LATENT_NORM_EPS,
    })
}

/// transformers' `yarn_apply_mscale`: `1/√qk_head_dim`, times `mscale(factor,
/// mscale_all_dim)²` when the rope is scaled and `mscale_all_dim` is set (not 0).
pub(super) fn mla_softmax_scale(f: &Fields<'_>, rope: &RopeConfig, qk_head_dim: usize) -> Result<f32> {
    use crate::rope::RopeScaling;
    let params = ["rope_parameters", "rope_scaling"]
        .into_iter()
        .find_map(|k| f.map.get(k).and_then(Value::as_object).map(|p| (k, p)));
    let mscale_all_dim = match params.and_then(|(k, p)| p.get("mscale_all_dim").map(|v| (k, v))) {
        None | Some((_, Value::Null)) => 0.0,
        Some((k, v)) => v
            .as_f64()
            .ok_or_else(|| EngineError::field(f.path, format!("{k}.mscale_all_dim"), "expected a number"))?,
    };
    let factor = match rope.scaling {
        RopeScaling::Default => None,
        RopeScaling::Linear { factor }
        | RopeScaling::Dynamic { factor }
        | RopeScaling::Yarn { factor, .. }
        | RopeScaling::Llama3 { factor, .. } => Some(factor),
    };
    let mut scale = (qk_head_dim as f64).powf(-0.5);
    if let Some(factor) = factor
        && mscale_all_dim != 0.0
    {
        let m = if factor <= 1.0 {
            1.0
        } else {
            0.1 * mscale_all_dim * factor.ln() + 1.0
        };
        scale *= m * m;
    }
    Ok(scale as f32)
}

/// deepseek_v3's router: group-limited top-k over sigmoid scores. Contradictions that would
/// make transformers fail, or pick experts from dropped groups, are refused by key.
pub(super) fn grouped_routing(
    f: &Fields<'_>,
    arch: Arch,
    experts: usize,
    top_k: usize,
) -> Result<RoutingRule> {
    if let Some(func) = f.str_opt("scoring_func")?
        && func != "sigmoid"
    {
        return Err(EngineError::field(
            f.path,
            "scoring_func",
            format!(
                "`{func}` is not supported for {} (expected \"sigmoid\")",
                arch.model_type()
            ),
        ));
    }
    if let Some(method) = f.str_opt("topk_method")?
        && method != "noaux_tc"
    {
        return Err(EngineError::field(
            f.path,
            "topk_method",
            format!(
                "`{method}` is not supported for {} (expected \"noaux_tc\": group-limited top-k with a selection bias)",
                arch.model_type()
            ),
        ));
    }
    let n_group = f.usize_opt(&["n_group"])?.unwrap_or(8);
    let topk_group = f.usize_opt(&["topk_group"])?.unwrap_or(4);
    if n_group == 0 || !experts.is_multiple_of(n_group) {
        return Err(EngineError::field(
            f.path,
            "n_group",
            format!("{n_group} does not divide n_routed_experts = {experts} into equal groups"),
        ));
    }
    let per_group = experts / n_group;
    if per_group < 2 {
        return Err(EngineError::field(
            f.path,
            "n_group",
            format!(
                "{n_group} groups of {experts} experts hold {per_group} each (a group is scored by its two best experts: expected at least 2 per group)"
            ),
        ));
    }
    if topk_group == 0 || topk_group > n_group {
        return Err(EngineError::field(
            f.path,
            "topk_group",
            format!("{topk_group} (expected 1 to n_group = {n_group})"),
        ));
    }
    if top_k > topk_group * per_group {
        return Err(EngineError::field(
            f.path,
            "num_experts_per_tok",
            format!(
                "{top_k} exceeds the {} experts that topk_group = {topk_group} groups of {per_group} leave to choose from",
                topk_group * per_group
            ),
        ));
    }
    let routed_scaling_factor = f.f64_opt(&["routed_scaling_factor"])?.unwrap_or(2.5);
    if !(routed_scaling_factor.is_finite() && routed_scaling_factor > 0.0) {
        return Err(EngineError::field(
            f.path,
            "routed_scaling_factor",
            format!("{routed_scaling_factor} (expected a finite number > 0)"),
        ));
    }
    Ok(RoutingRule::SigmoidGrouped {
        n_group,
        topk_group,
        routed_scaling_factor: routed_scaling_factor as f32,
    })
}

/// MLX's `quantization` block, or its copy `quantization_config`; other quantisation formats
/// (transformers' `quant_method`: fp8, gptq, awq, …) are refused by name.
pub(super) fn quantization(f: &Fields<'_>, arch: Arch) -> Result<Option<crate::quant::QuantConfig>> {
    let (key, v) = match (f.map.get("quantization"), f.map.get("quantization_config")) {
        (Some(v), _) => ("quantization", v),
        (None, Some(v)) => ("quantization_config", v),
        (None, None) => return Ok(None),
    };
    // gpt_oss's hub checkpoints: MXFP4 experts (`*_blocks` and `*_scales`), read as they are.
    if arch == Arch::GptOss && v.get("quant_method").and_then(Value::as_str) == Some("mxfp4") {
        return Ok(None);
    }
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
pub(super) fn mlp_kinds(f: &Fields<'_>, arch: Arch, layers: usize, experts: usize) -> Result<Vec<MlpKind>> {
    match arch {
        Arch::Mixtral | Arch::Olmoe | Arch::GptOss => Ok(vec![MlpKind::Moe; layers]),
        // DeepSeek's rule (its modeling_deepseek.py): MoE from layer first_k_dense_replace on,
        // every moe_layer_freq-th layer (transformers reads first_k_dense_replace only; every
        // released checkpoint has moe_layer_freq 1, where the two agree).
        Arch::DeepseekV3 => {
            let first = f.usize_opt(&["first_k_dense_replace"])?.unwrap_or(3);
            let freq = f.usize_opt(&["moe_layer_freq"])?.unwrap_or(1);
            if freq == 0 {
                return Err(EngineError::field(f.path, "moe_layer_freq", "must be at least 1"));
            }
            Ok((0..layers)
                .map(|l| {
                    if l >= first && l % freq == 0 {
                        MlpKind::Moe
                    } else {
                        MlpKind::Dense
                    }
                })
                .collect())
        }
        // transformers' Glm4MoeDecoderLayer: MoE from layer first_k_dense_replace on.
        Arch::Glm4Moe => {
            let first = f.usize_opt(&["first_k_dense_replace"])?.unwrap_or(1);
            Ok((0..layers)
                .map(|l| if l >= first { MlpKind::Moe } else { MlpKind::Dense })
                .collect())
        }
        // Glm4MoeLiteConfig: `mlp_layer_types` ("dense" / "sparse"), by default the first layer
        // dense and the rest sparse (transformers ignores first_k_dense_replace here).
        Arch::Glm4MoeLite => match f.lookup(&["mlp_layer_types"]) {
            None => Ok((0..layers)
                .map(|l| if l == 0 { MlpKind::Dense } else { MlpKind::Moe })
                .collect()),
            Some((k, Value::Array(items))) => {
                f.one_per_layer(k, items.len(), layers)?;
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| match v.as_str() {
                        Some("dense") => Ok(MlpKind::Dense),
                        Some("sparse") => Ok(MlpKind::Moe),
                        _ => Err(EngineError::field(
                            f.path,
                            format!("{k}[{i}]"),
                            format!("{v} (expected \"dense\" or \"sparse\")"),
                        )),
                    })
                    .collect()
            }
            Some((k, _)) => Err(EngineError::field(f.path, k, "expected a list of strings")),
        },
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
pub(super) fn sliding_windows(f: &Fields<'_>, arch: Arch, layers: usize) -> Result<Vec<Option<usize>>> {
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
        (Arch::Qwen3Next | Arch::DeepseekV3 | Arch::Glm4Moe | Arch::Glm4MoeLite, _) => vec![false; layers],
        (_, Some(types)) if arch == Arch::Qwen2Moe || use_sliding => {
            f.one_per_layer("layer_types", types.len(), layers)?;
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
        // gpt_oss: `layer_types`, else sliding and full attention alternating from layer 0.
        (Arch::GptOss, types) => {
            let sliding: Vec<bool> = match types {
                Some(types) => {
                    f.one_per_layer("layer_types", types.len(), layers)?;
                    types
                        .iter()
                        .map(|t| match t.as_str() {
                            "sliding_attention" => Ok(true),
                            "full_attention" => Ok(false),
                            other => Err(EngineError::field(
                                f.path,
                                "layer_types",
                                format!(
                                    "`{other}` is not a gpt_oss layer type (expected \"sliding_attention\" or \"full_attention\")"
                                ),
                            )),
                        })
                        .collect::<Result<_>>()?
                }
                None => (0..layers).map(|i| i % 2 == 0).collect(),
            };
            if sliding.contains(&true) && window.is_none() {
                return Err(EngineError::field(
                    f.path,
                    "sliding_window",
                    "missing or 0 (required: some layers are sliding_attention)",
                ));
            }
            sliding
        }
        (Arch::Qwen2Moe, Some(_)) => unreachable!("handled by the first arm"),
    };
    Ok(per_layer
        .into_iter()
        .map(|sliding| if sliding { window } else { None })
        .collect())
}

/// Per layer, what mixes tokens (qwen3_next: `layer_types`, or a full-attention layer every
/// `full_attention_interval` layers), and the linear-attention shape when any layer has it.
pub(super) fn mixers(
    f: &Fields<'_>,
    arch: Arch,
    layers: usize,
) -> Result<(Vec<Mixer>, Option<LinearAttnConfig>)> {
    if arch.latent_attention() {
        return Ok((vec![Mixer::LatentAttention; layers], None));
    }
    if arch != Arch::Qwen3Next {
        return Ok((vec![Mixer::Attention; layers], None));
    }
    let mixers: Vec<Mixer> = match f.lookup(&["layer_types"]) {
        Some((k, Value::Array(items))) => {
            f.one_per_layer(k, items.len(), layers)?;
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
