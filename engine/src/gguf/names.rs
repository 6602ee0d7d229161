//! llama.cpp's tensor names and the Hugging Face names the model loaders ask for, both ways:
//! the block stems every family shares, and each family's own whole names (qwen3next's Gated
//! DeltaNet, glm4moe's and deepseek2's router bias and shared experts, deepseek2's split latent
//! projections, gpt-oss's router and sinks).

/// llama.cpp's block tensor stems and the Hugging Face modules they are (the suffix, `.weight`
/// or `.bias`, carries over).
const STEMS: [(&str, &str); 19] = [
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("ffn_gate_inp", "mlp.gate"),
    ("ffn_gate_exps", "mlp.switch_mlp.gate_proj"),
    ("ffn_up_exps", "mlp.switch_mlp.up_proj"),
    ("ffn_down_exps", "mlp.switch_mlp.down_proj"),
    ("ffn_gate_shexp", "mlp.shared_expert.gate_proj"),
    ("ffn_up_shexp", "mlp.shared_expert.up_proj"),
    ("ffn_down_shexp", "mlp.shared_expert.down_proj"),
    ("ffn_gate_inp_shexp", "mlp.shared_expert_gate"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// qwen3next's own block tensors, whole names (see the module's table): its post-attention
/// norm and its Gated DeltaNet. `linear_attn.A` is the decay rate `-exp(A_log)` as the
/// converter stores it; `in_proj_qkv` / `in_proj_z` are `in_proj_qkvz` ungrouped (Qwen3.5's
/// Hugging Face names for that layout).
const QWEN3NEXT: [(&str, &str); 10] = [
    ("post_attention_norm.weight", "post_attention_layernorm.weight"),
    ("attn_qkv.weight", "linear_attn.in_proj_qkv.weight"),
    ("attn_gate.weight", "linear_attn.in_proj_z.weight"),
    ("ssm_in.weight", "linear_attn.in_proj_qkvz.weight"),
    ("ssm_ba.weight", "linear_attn.in_proj_ba.weight"),
    ("ssm_conv1d.weight", "linear_attn.conv1d.weight"),
    ("ssm_dt.bias", "linear_attn.dt_bias"),
    ("ssm_a", "linear_attn.A"),
    ("ssm_norm.weight", "linear_attn.norm.weight"),
    ("ssm_out.weight", "linear_attn.out_proj.weight"),
];

/// glm4moe's own block tensor names: its post-attention norm, the router's selection bias, the
/// (ungated, plural) shared experts.
const GLM4MOE: [(&str, &str); 5] = [
    ("post_attention_norm.weight", "post_attention_layernorm.weight"),
    ("exp_probs_b.bias", "mlp.gate.e_score_correction_bias"),
    ("ffn_gate_shexp.weight", "mlp.shared_experts.gate_proj.weight"),
    ("ffn_up_shexp.weight", "mlp.shared_experts.up_proj.weight"),
    ("ffn_down_shexp.weight", "mlp.shared_experts.down_proj.weight"),
];

/// deepseek2's own block tensor names: its latent attention (`kv_b_proj` split per head into
/// `attn_k_b` and `attn_v_b`, or whole in older files), the router's selection bias, the
/// (plural) shared experts.
const DEEPSEEK2: [(&str, &str); 12] = [
    ("attn_q_a.weight", "self_attn.q_a_proj.weight"),
    ("attn_q_a_norm.weight", "self_attn.q_a_layernorm.weight"),
    ("attn_q_b.weight", "self_attn.q_b_proj.weight"),
    ("attn_kv_a_mqa.weight", "self_attn.kv_a_proj_with_mqa.weight"),
    ("attn_kv_a_norm.weight", "self_attn.kv_a_layernorm.weight"),
    ("attn_k_b.weight", "self_attn.k_b_proj.weight"),
    ("attn_v_b.weight", "self_attn.v_b_proj.weight"),
    ("attn_kv_b.weight", "self_attn.kv_b_proj.weight"),
    ("exp_probs_b.bias", "mlp.gate.e_score_correction_bias"),
    ("ffn_gate_shexp.weight", "mlp.shared_experts.gate_proj.weight"),
    ("ffn_up_shexp.weight", "mlp.shared_experts.up_proj.weight"),
    ("ffn_down_shexp.weight", "mlp.shared_experts.down_proj.weight"),
];

/// gpt-oss's own block tensor names: its router (with its bias), its attention sinks, its
/// post-attention norm. Stacked experts and their biases are [`STEMS`]'.
const GPT_OSS: [(&str, &str); 4] = [
    ("ffn_gate_inp.weight", "mlp.router.weight"),
    ("ffn_gate_inp.bias", "mlp.router.bias"),
    ("attn_sinks.weight", "self_attn.sinks"),
    ("post_attention_norm.weight", "post_attention_layernorm.weight"),
];

/// Whole block-tensor names an architecture renames beyond [`STEMS`].
fn own_names(arch: &str) -> &'static [(&'static str, &'static str)] {
    match arch {
        "qwen3next" => &QWEN3NEXT,
        "glm4moe" => &GLM4MOE,
        "deepseek2" => &DEEPSEEK2,
        "gpt-oss" => &GPT_OSS,
        _ => &[],
    }
}

/// The Hugging Face name of a llama.cpp tensor name in a file of architecture `arch` (None for
/// one the engine does not read).
pub fn hf_name(arch: &str, gguf: &str) -> Option<String> {
    let top = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(t.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    if let Some((_, hf)) = own_names(arch).iter().find(|(g, _)| *g == rest) {
        return Some(format!("model.layers.{layer}.{hf}"));
    }
    let (stem, suffix) = rest.rsplit_once('.')?;
    let (_, mapped) = STEMS.iter().find(|(g, _)| *g == stem)?;
    Some(format!("model.layers.{layer}.{mapped}.{suffix}"))
}

/// The llama.cpp name of a Hugging Face name in a file of architecture `arch` (for messages
/// about a missing tensor).
pub fn gguf_name(arch: &str, hf: &str) -> Option<String> {
    let top = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(t.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    if let Some((g, _)) = own_names(arch).iter().find(|(_, h)| *h == rest) {
        return Some(format!("blk.{layer}.{g}"));
    }
    let (stem, suffix) = rest.rsplit_once('.')?;
    let (mapped, _) = STEMS.iter().find(|(_, h)| *h == stem)?;
    Some(format!("blk.{layer}.{mapped}.{suffix}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        for arch in ["qwen3moe", "qwen3next", "glm4moe"] {
            for (g, _) in STEMS {
                for suffix in ["weight", "bias"] {
                    let name = format!("blk.7.{g}.{suffix}");
                    let hf = hf_name(arch, &name).unwrap();
                    let back = gguf_name(arch, &hf).unwrap();
                    // qwen3next and glm4moe name their post-attention norm
                    // post_attention_norm; glm4moe's shared experts are its own.
                    if arch != "qwen3moe" && g == "ffn_norm" && suffix == "weight" {
                        assert_eq!(back, format!("blk.7.post_attention_norm.{suffix}"));
                    } else if arch == "glm4moe"
                        && GLM4MOE.iter().any(|(own, _)| *own == format!("{g}.{suffix}"))
                    {
                        assert!(hf.contains("mlp.shared_experts."), "{hf}");
                        assert_eq!(back, name, "{arch}");
                    } else {
                        assert_eq!(back, name, "{arch}");
                    }
                }
            }
        }
        for (g, h) in QWEN3NEXT {
            let name = format!("blk.2.{g}");
            assert_eq!(
                hf_name("qwen3next", &name).unwrap(),
                format!("model.layers.2.{h}")
            );
            assert_eq!(
                gguf_name("qwen3next", &format!("model.layers.2.{h}")).unwrap(),
                name
            );
        }
        for (g, h) in GLM4MOE {
            let name = format!("blk.3.{g}");
            assert_eq!(hf_name("glm4moe", &name).unwrap(), format!("model.layers.3.{h}"));
            assert_eq!(
                gguf_name("glm4moe", &format!("model.layers.3.{h}")).unwrap(),
                name
            );
        }
        // Not qwen3next's: not read.
        assert_eq!(hf_name("qwen3moe", "blk.0.ssm_a"), None);
        assert_eq!(hf_name("qwen3next", "blk.4.nextn.eh_proj.weight"), None);
        assert_eq!(
            hf_name("qwen3next", "blk.0.ssm_a").as_deref(),
            Some("model.layers.0.linear_attn.A")
        );
    }
}
