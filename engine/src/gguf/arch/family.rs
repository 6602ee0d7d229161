//! Family-specific `{arch}.*` metadata as `config.json` keys: glm4moe's and deepseek2's
//! DeepSeek-style MoE, deepseek2's latent attention, the yarn of deepseek2 and gpt-oss as
//! llama.cpp computes it, qwen3next's Gated DeltaNet shape.

use serde_json::{Value as Json, json};

use super::super::{GgufFile, Value};
use super::Meta;
use crate::error::{EngineError, Result};

/// glm4moe's MoE and attention keys as `config.json` has them: the router as llama.cpp's
/// metadata describes it (sigmoid gating required; groups where `expert_group_count` says, as
/// the converter copies `n_group` / `topk_group`; `expert_weights_scale` 0 or absent is no
/// scaling), the shared experts and leading dense layers; q/k/v biases and q/k norms where the
/// file has them.
pub(super) fn glm4_moe(
    m: &Meta<'_>,
    files: &[GgufFile],
    expert_ffn: Option<u64>,
    ffn: Option<u64>,
) -> Result<Vec<(String, Json)>> {
    let find = |name: &str| files.iter().any(|f| f.tensor(name).is_some());
    // llama_expert_gating_func_type: 1 softmax, 2 sigmoid (llama.cpp's glm4moe takes absent as
    // sigmoid).
    match m.u64_opt("expert_gating_func")? {
        None | Some(2) => {}
        Some(g) => {
            return Err(EngineError::field(
                &m.f.path,
                m.key("expert_gating_func"),
                format!("{g}: expected 2 (sigmoid), the gating glm4_moe's router applies"),
            ));
        }
    }
    let mut out = deepseek_moe(m, expert_ffn, ffn)?;
    out.push(("attention_bias".into(), json!(find("blk.0.attn_q.bias"))));
    out.push(("use_qk_norm".into(), json!(find("blk.0.attn_q_norm.weight"))));
    Ok(out)
}

/// DeepSeek's MoE keys, as glm4moe and deepseek2 files describe them: expert widths, shared
/// experts, leading dense blocks, renormalisation, the weights' scale (`expert_weights_scale`
/// 0 or absent: none, as llama.cpp), groups where `expert_group_count` says (the converter
/// copies `n_group` / `topk_group`); the multi-token-prediction block not run (block_count
/// counts it).
pub(super) fn deepseek_moe(
    m: &Meta<'_>,
    expert_ffn: Option<u64>,
    ffn: Option<u64>,
) -> Result<Vec<(String, Json)>> {
    let scale = m
        .f64_opt("expert_weights_scale")?
        .filter(|&s| s != 0.0)
        .unwrap_or(1.0);
    let groups = m.u64_opt("expert_group_count")?.filter(|&g| g > 1).unwrap_or(1);
    let groups_used = if groups > 1 {
        m.u64_opt("expert_group_used_count")?.unwrap_or(groups)
    } else {
        1
    };
    let out = vec![
        ("moe_intermediate_size", json!(expert_ffn.or(ffn))),
        ("intermediate_size", json!(ffn.or(expert_ffn))),
        (
            "n_shared_experts",
            json!(m.u64_opt("expert_shared_count")?.unwrap_or(0)),
        ),
        (
            "first_k_dense_replace",
            json!(m.u64_opt("leading_dense_block_count")?.unwrap_or(0)),
        ),
        (
            "norm_topk_prob",
            json!(m.bool_opt("expert_weights_norm")?.unwrap_or(false)),
        ),
        ("routed_scaling_factor", json!(scale)),
        ("n_group", json!(groups)),
        ("topk_group", json!(groups_used)),
        ("num_nextn_predict_layers", json!(0)),
    ];
    Ok(out.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

/// deepseek2's latent attention and router as `config.json` (deepseek_v3) keys. The file
/// holds llama.cpp's view: one key/value head (the latent), key_length_mla / value_length_mla
/// the per-head widths, rope.dimension_count the rotary part, q_lora_rank absent without a
/// query bottleneck; rotary pairs interleaved (llama.cpp's deepseek2 rope), as DeepSeek's
/// own checkpoints store them. The router: sigmoid gating required (absent, llama.cpp takes
/// softmax but for GLM-4.7-Flash's shape — 47 or 48 layers, 154,880 tokens —, where it takes
/// sigmoid: so here), groups from `expert_group_count`, `expert_weights_scale` 0 or absent is
/// no scaling.
pub(super) fn deepseek2(
    m: &Meta<'_>,
    heads: u64,
    layers: u64,
    vocab: u64,
    expert_ffn: Option<u64>,
    ffn: Option<u64>,
) -> Result<Vec<(String, Json)>> {
    let path = &m.f.path;
    let rope = m.u64("rope.dimension_count")?;
    let k_mla = m.u64("attention.key_length_mla")?;
    if rope == 0 || !rope.is_multiple_of(2) || k_mla <= rope {
        return Err(EngineError::field(
            path,
            m.key("attention.key_length_mla"),
            format!(
                "{k_mla} with {rope} rotary values (rope.dimension_count): expected more than the rotary part, which must be even"
            ),
        ));
    }
    let glm_flash = matches!(layers, 47 | 48) && vocab == 154_880;
    match m.u64_opt("expert_gating_func")? {
        Some(2) => {}
        None if glm_flash => {}
        other => {
            return Err(EngineError::field(
                path,
                m.key("expert_gating_func"),
                format!(
                    "{}: expected 2 (sigmoid, DeepSeek-V3's router); softmax gating (DeepSeek-V2) is not supported",
                    other.map_or("absent (llama.cpp takes softmax)".into(), |g| g.to_string())
                ),
            ));
        }
    }
    let q_lora = m.u64_opt("attention.q_lora_rank")?.filter(|&q| q > 0);
    let mut out = deepseek_moe(m, expert_ffn, ffn)?;
    out.extend(
        [
            ("num_key_value_heads", json!(heads)),
            ("q_lora_rank", json!(q_lora)),
            ("kv_lora_rank", json!(m.u64("attention.kv_lora_rank")?)),
            ("qk_rope_head_dim", json!(rope)),
            ("qk_nope_head_dim", json!(k_mla - rope)),
            ("v_head_dim", json!(m.u64("attention.value_length_mla")?)),
            ("rope_interleave", json!(true)),
            ("moe_layer_freq", json!(1)),
            ("scoring_func", json!("sigmoid")),
            ("topk_method", json!("noaux_tc")),
        ]
        .map(|(k, v)| (k.to_string(), v)),
    );
    Ok(out)
}

/// deepseek2's yarn as transformers' `rope_scaling` reads it: the factor, the original context,
/// beta_fast / beta_slow (llama.cpp's defaults 32 / 1), and DeepSeek's mscale from the file's
/// `yarn_log_multiplier` (the converter writes 0.1 × mscale_all_dim; the file does not carry
/// mscale, which llama.cpp takes equal to it, as DeepSeek-V3's and Kimi-K2's configs have it).
pub(super) fn deepseek2_yarn(m: &Meta<'_>) -> Result<Json> {
    let need = |k: &str| -> Result<f64> {
        m.f64_opt(k)?
            .ok_or_else(|| EngineError::field(&m.f.path, m.key(k), "missing (yarn rotary scaling needs it)"))
    };
    let factor = need("rope.scaling.factor")?;
    let original = m.u64("rope.scaling.original_context_length")?;
    let mscale = need("rope.scaling.yarn_log_multiplier")? / 0.1;
    Ok(json!({
        "rope_type": "yarn",
        "factor": factor,
        "original_max_position_embeddings": original,
        "beta_fast": m.f64_opt("rope.scaling.yarn_beta_fast")?.unwrap_or(32.0),
        "beta_slow": m.f64_opt("rope.scaling.yarn_beta_slow")?.unwrap_or(1.0),
        "mscale": mscale,
        "mscale_all_dim": mscale,
    }))
}

/// gpt-oss's yarn as llama.cpp computes it: ggml's correction range is rounded to whole
/// dimensions (transformers' `truncate: true`; gpt-oss's own config says false, and llama.cpp
/// moves its logits by up to 0.017 on the fixture for it, measured).
pub(super) fn gpt_oss_yarn(m: &Meta<'_>) -> Result<Json> {
    let factor = m.f64_opt("rope.scaling.factor")?.ok_or_else(|| {
        EngineError::field(&m.f.path, m.key("rope.scaling.factor"), "missing (yarn needs it)")
    })?;
    Ok(json!({
        "rope_type": "yarn",
        "factor": factor,
        "original_max_position_embeddings": m.u64("rope.scaling.original_context_length")?,
        "beta_fast": m.f64_opt("rope.scaling.yarn_beta_fast")?.unwrap_or(32.0),
        "beta_slow": m.f64_opt("rope.scaling.yarn_beta_slow")?.unwrap_or(1.0),
        "truncate": true,
    }))
}

/// qwen3next's Gated DeltaNet shape and layer pattern as `config.json` keys: the `ssm.*`
/// metadata (group count = key heads, time-step rank = value heads, state size = key head
/// width, inner size = value heads × value head width, conv kernel) and which layers are
/// recurrent (`attention.recurrent_layers`, else a full-attention layer every
/// `full_attention_interval` layers, 4 by default, as llama.cpp reads them).
pub(super) fn linear_attention(m: &Meta<'_>, layers: u64) -> Result<Vec<(String, Json)>> {
    let key_heads = m.u64("ssm.group_count")?;
    let value_heads = m.u64("ssm.time_step_rank")?;
    let inner = m.u64("ssm.inner_size")?;
    if value_heads == 0 || !inner.is_multiple_of(value_heads) {
        return Err(EngineError::field(
            &m.f.path,
            m.key("ssm.inner_size"),
            format!("{inner} is not a whole number of value heads of ssm.time_step_rank = {value_heads}"),
        ));
    }
    let mut out = vec![
        ("linear_num_key_heads".to_string(), json!(key_heads)),
        ("linear_num_value_heads".to_string(), json!(value_heads)),
        ("linear_key_head_dim".to_string(), json!(m.u64("ssm.state_size")?)),
        ("linear_value_head_dim".to_string(), json!(inner / value_heads)),
        (
            "linear_conv_kernel_dim".to_string(),
            json!(m.u64("ssm.conv_kernel")?),
        ),
    ];
    let key = m.key("attention.recurrent_layers");
    match m.f.get(&key) {
        Some(Value::Array(_, items)) => {
            if (items.len() as u64) < layers {
                return Err(EngineError::field(
                    &m.f.path,
                    &key,
                    format!("has {} entries, expected one per layer ({layers})", items.len()),
                ));
            }
            let types = items
                .iter()
                .take(layers as usize)
                .map(|v| match v {
                    Value::Bool(true) => Ok(json!("linear_attention")),
                    Value::Bool(false) => Ok(json!("full_attention")),
                    other => Err(EngineError::field(
                        &m.f.path,
                        &key,
                        format!("expected an array of bools, found {}", other.type_name()),
                    )),
                })
                .collect::<Result<Vec<_>>>()?;
            out.push(("layer_types".to_string(), Json::Array(types)));
        }
        Some(v) => {
            return Err(EngineError::field(
                &m.f.path,
                &key,
                format!("expected an array of bools, found {}", v.type_name()),
            ));
        }
        None => {
            let interval = m.u64_opt("full_attention_interval")?.unwrap_or(4);
            out.push(("full_attention_interval".to_string(), json!(interval)));
        }
    }
    Ok(out)
}
