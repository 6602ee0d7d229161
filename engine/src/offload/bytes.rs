//! The byte model: how much memory a run needs, from the checkpoint's real storage format —
//! non-expert weights + capacity × expert bytes × MoE layers + KV cache + overhead — and the
//! largest capacity that fits a memory budget.

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};

/// Fixed process overhead the model adds: code, tokenizer, thread stacks, allocator slack
/// (a whole run on the 4 MB test fixtures peaks at 11-12 MiB). Used where the process's own
/// baseline cannot be measured (not Linux, or a model not about to be loaded here).
pub const DEFAULT_OVERHEAD: u64 = 16 << 20;

/// What a run adds to the process's measured baseline besides weights, expert slots and KV
/// cache: the I/O and compute threads' stacks and the allocator's working slack (measured on
/// the bundled model at capacities 32, 160 and 512 over 1,000–2,000 tokens: 0.9–1.1 MiB).
pub const RUN_SLACK: u64 = 1 << 20;

/// The terms of the prediction.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ByteModel {
    /// Weights that are always resident (attention, norms, embeddings, routers, shared experts).
    pub non_expert_bytes: u64,
    /// Bytes one resident expert occupies (its slot).
    pub expert_bytes: u64,
    pub moe_layers: usize,
    /// KV cache bytes per token of context (f32 keys and values, or deepseek_v3's latents and
    /// rotary keys, all layers).
    pub kv_bytes_per_token: u64,
    pub overhead_bytes: u64,
}

impl ByteModel {
    /// The model of a checkpoint whose weights total `total_weight_bytes`, of which each of the
    /// `moe_layers × num_experts` experts stores `stored_expert_bytes`, held in slots of
    /// `slot_bytes`.
    pub fn for_checkpoint(
        cfg: &ModelConfig,
        total_weight_bytes: u64,
        stored_expert_bytes: u64,
        slot_bytes: u64,
    ) -> Self {
        let moe_layers = cfg.moe_layers().len();
        let all_experts = stored_expert_bytes * (moe_layers * cfg.num_experts) as u64;
        Self {
            non_expert_bytes: total_weight_bytes.saturating_sub(all_experts),
            expert_bytes: slot_bytes,
            moe_layers,
            kv_bytes_per_token: (cfg.num_hidden_layers * cfg.kv_cache_width() * 4) as u64,
            overhead_bytes: DEFAULT_OVERHEAD,
        }
    }

    /// The model of a checkpoint that is not here, from its `config.json` alone: every matrix's
    /// shape from the architecture, stored quantised where the config's `quantization` block
    /// says (and its input width is a multiple of the group, mlx-lm's rule), else in
    /// `float_bytes` per value (2: bf16); scales and biases of `float_bytes` each. Expert slots
    /// are their stored bytes. Answers "how much memory would this checkpoint need".
    pub fn from_config(cfg: &ModelConfig, float_bytes: u64) -> Self {
        let bytes = |module: &str, rows: usize, cols: usize| -> u64 {
            let params = (rows * cols) as u64;
            match cfg.quantization.as_ref().and_then(|q| q.spec_for(module)) {
                Some(s) if cols.is_multiple_of(s.group_size) => {
                    quantized_bytes(params, s.bits as u64, s.group_size as u64, float_bytes)
                }
                _ => params * float_bytes,
            }
        };
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let mut non_expert = bytes("model.embed_tokens", v, h) + h as u64 * float_bytes;
        if !cfg.tie_word_embeddings {
            non_expert += bytes("lm_head", v, h);
        }
        let mut expert = 0;
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}.");
            non_expert += 2 * h as u64 * float_bytes; // input and post-attention norms
            non_expert += match cfg.mixers[l] {
                crate::config::Mixer::Attention => {
                    let (qw, kv) = (cfg.q_width(), cfg.kv_width());
                    let q_rows = if cfg.attn_output_gate { 2 * qw } else { qw };
                    let a = format!("{p}self_attn.");
                    let norms = match cfg.qk_norm {
                        crate::config::QkNorm::None => 0,
                        crate::config::QkNorm::PerHead => 2 * cfg.head_dim,
                        crate::config::QkNorm::FullWidth => qw + kv,
                    };
                    let biases =
                        if cfg.qkv_bias { q_rows + 2 * kv } else { 0 } + if cfg.o_bias { h } else { 0 };
                    bytes(&format!("{a}q_proj"), q_rows, h)
                        + 2 * bytes(&format!("{a}k_proj"), kv, h)
                        + bytes(&format!("{a}o_proj"), h, qw)
                        + (norms + biases) as u64 * float_bytes
                        // gpt_oss: a sink logit per head.
                        + if cfg.attention_sinks {
                            cfg.num_attention_heads as u64 * float_bytes
                        } else {
                            0
                        }
                }
                // deepseek_v3: query (low-rank or direct), latent and rotary key, their expansion,
                // output; the latent norms (and the biases under attention_bias).
                crate::config::Mixer::LatentAttention => cfg.mla.map_or(0, |m| {
                    let a = format!("{p}self_attn.");
                    let heads = cfg.num_attention_heads;
                    let (r, dr) = (m.kv_lora_rank, m.qk_rope_head_dim);
                    let q = match m.q_lora_rank {
                        None => bytes(&format!("{a}q_proj"), heads * m.qk_head_dim(), h),
                        Some(qr) => {
                            bytes(&format!("{a}q_a_proj"), qr, h)
                                + bytes(&format!("{a}q_b_proj"), heads * m.qk_head_dim(), qr)
                                + (qr as u64) * float_bytes * (1 + cfg.qkv_bias as u64)
                        }
                    };
                    q + bytes(&format!("{a}kv_a_proj_with_mqa"), r + dr, h)
                        + bytes(
                            &format!("{a}kv_b_proj"),
                            heads * (m.qk_nope_head_dim + m.v_head_dim),
                            r,
                        )
                        + bytes(&format!("{a}o_proj"), h, heads * m.v_head_dim)
                        + (r as u64) * float_bytes
                        + if cfg.qkv_bias {
                            ((r + dr + h) as u64) * float_bytes
                        } else {
                            0
                        }
                }),
                // The config has the shape whenever a layer is linear attention.
                crate::config::Mixer::LinearAttention => cfg.linear_attn.map_or(0, |s| {
                    let a = format!("{p}linear_attn.");
                    let (kd, vd, nv) = (s.key_dim(), s.value_dim(), s.num_value_heads);
                    bytes(&format!("{a}in_proj_qkvz"), 2 * kd + 2 * vd, h)
                        + bytes(&format!("{a}in_proj_ba"), 2 * nv, h)
                        + bytes(&format!("{a}out_proj"), h, vd)
                        + ((s.conv_dim() * s.conv_kernel + 2 * nv + s.value_head_dim) as u64) * float_bytes
                }),
            };
            let m = format!("{p}mlp.");
            match cfg.mlp_kinds[l] {
                crate::config::MlpKind::Dense => {
                    let i = cfg.intermediate_size;
                    non_expert +=
                        2 * bytes(&format!("{m}gate_proj"), i, h) + bytes(&format!("{m}down_proj"), h, i);
                }
                crate::config::MlpKind::Moe => {
                    non_expert += bytes(&format!("{m}gate"), cfg.num_experts, h);
                    match cfg.routing {
                        // e_score_correction_bias (f32 in DeepSeek's checkpoints).
                        crate::config::RoutingRule::SigmoidGrouped { .. } => {
                            non_expert += cfg.num_experts as u64 * 4;
                        }
                        // gpt_oss's router bias.
                        crate::config::RoutingRule::TopKSoftmax => {
                            non_expert += cfg.num_experts as u64 * float_bytes;
                        }
                        crate::config::RoutingRule::Softmax => {}
                    }
                    if let Some(i) = cfg.shared_expert_intermediate_size {
                        let se = if cfg.shared_expert_gated {
                            format!("{m}shared_expert.")
                        } else {
                            format!("{m}shared_experts.")
                        };
                        non_expert += 2 * bytes(&format!("{se}gate_proj"), i, h)
                            + bytes(&format!("{se}down_proj"), h, i);
                        if cfg.shared_expert_gated {
                            non_expert += bytes(&format!("{m}shared_expert_gate"), 1, h);
                        }
                    }
                    let (i, sw) = (cfg.moe_intermediate_size, format!("{m}switch_mlp."));
                    expert = if cfg.mxfp4_experts {
                        // gpt_oss's MXFP4: 17 bytes (16 packed, one E8M0 scale) a block of 32.
                        3 * (i * h / 32 * 17) as u64
                    } else {
                        2 * bytes(&format!("{sw}gate_proj"), i, h) + bytes(&format!("{sw}down_proj"), h, i)
                    };
                    if cfg.clamped_swiglu.is_some() {
                        // gpt_oss's expert biases (gate, up, down).
                        expert += (2 * i + h) as u64 * float_bytes;
                    }
                }
            }
        }
        Self {
            non_expert_bytes: non_expert,
            expert_bytes: expert,
            moe_layers: cfg.moe_layers().len(),
            kv_bytes_per_token: (cfg.num_hidden_layers * cfg.kv_cache_width() * 4) as u64,
            overhead_bytes: DEFAULT_OVERHEAD,
        }
    }

    /// Predicted resident bytes at `capacity` experts per MoE layer with `tokens` of context.
    pub fn predict(&self, capacity: usize, tokens: usize) -> u64 {
        self.predict_slots(capacity * self.moe_layers, tokens)
    }

    /// Predicted resident bytes with `slots` expert slots in all.
    pub fn predict_slots(&self, slots: usize, tokens: usize) -> u64 {
        self.non_expert_bytes
            + slots as u64 * self.expert_bytes
            + tokens as u64 * self.kv_bytes_per_token
            + self.overhead_bytes
    }

    /// The largest capacity per layer (at most `max`) whose prediction fits `budget`.
    pub fn capacity_for(&self, budget: u64, tokens: usize, max: usize) -> Result<usize> {
        let fixed = self.predict_slots(0, tokens);
        let per_capacity = self.expert_bytes * self.moe_layers as u64;
        if budget < fixed + per_capacity {
            return Err(EngineError::invalid(
                "--memory-budget",
                format!(
                    "{} cannot hold even one expert per layer: non-expert weights, KV cache and overhead alone need {}",
                    fmt_bytes(budget),
                    fmt_bytes(fixed)
                ),
            ));
        }
        Ok((((budget - fixed) / per_capacity) as usize).min(max))
    }
}

/// Bytes of a quantised matrix set of `params` weights at `bits` bits, with one scale and one
/// bias of `scale_bytes` each per group of `group` weights (MLX's affine quantisation).
pub fn quantized_bytes(params: u64, bits: u64, group: u64, scale_bytes: u64) -> u64 {
    params * bits / 8 + params / group * 2 * scale_bytes
}

/// Parses `8GiB`, `512MiB`, `20GB`, `1.5G`, `4096` (bytes). Binary (Ki/Mi/Gi/Ti) and decimal
/// (K/M/G/T, kB/MB/GB/TB) suffixes; case-insensitive.
pub fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.trim().parse().map_err(|_| {
        format!("`{s}` is not a size (expected e.g. 8GiB, 512MiB, 20GB or a number of bytes)")
    })?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "ki" | "kib" => 1024.0,
        "mi" | "mib" => 1024f64.powi(2),
        "gi" | "gib" => 1024f64.powi(3),
        "ti" | "tib" => 1024f64.powi(4),
        other => {
            return Err(format!(
                "`{s}`: unknown unit `{other}` (expected B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            ));
        }
    };
    if !(value >= 0.0 && value.is_finite()) {
        return Err(format!("`{s}` is not a size (expected a non-negative number)"));
    }
    Ok((value * mult).round() as u64)
}

/// `1.5 GiB`-style rendering.
pub fn fmt_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1024f64.powi(3) {
        format!("{:.2} GiB", b / 1024f64.powi(3))
    } else if b >= 1024f64.powi(2) {
        format!("{:.1} MiB", b / 1024f64.powi(2))
    } else {
        format!("{b:.0} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// flash-moe's published memory figures for Qwen3-Coder-Next on MLX 4-bit: expert of
    /// hidden 2048 × width 512 (gate, up, down), group 64 with bf16 scale and bias; 48 MoE
    /// layers; 1.39 GB of non-expert weights.
    #[test]
    fn matches_flash_moe_published_numbers() {
        let expert = quantized_bytes(3 * 2048 * 512, 4, 64, 2);
        assert_eq!(expert, 1_769_472);
        let m = ByteModel {
            non_expert_bytes: 1_390_000_000,
            expert_bytes: expert,
            moe_layers: 48,
            kv_bytes_per_token: 0,
            overhead_bytes: 0,
        };
        for (cap, published_gb) in [(160, 14.98), (192, 17.70), (208, 19.06), (256, 23.13)] {
            let gb = m.predict(cap, 0) as f64 / 1e9;
            assert!(
                (gb - published_gb).abs() / published_gb < 0.01,
                "capacity {cap}: {gb:.2} GB vs {published_gb}"
            );
        }
        assert_eq!(m.capacity_for(20_000_000_000, 0, 512).unwrap(), 219);
    }

    /// The same figures from the config alone: Qwen3-Next-80B-A3B's published `config.json`
    /// (Qwen3-Coder-Next has its shape) with the `quantization` block `mlx_lm.convert -q`
    /// writes for it (4-bit group 64; routers and shared-expert gates 8-bit, its
    /// `quant_predicate`), bf16 scales.
    #[test]
    fn qwen3_coder_next_config_gives_flash_moe_published_numbers() {
        let mut quant = serde_json::json!({"group_size": 64, "bits": 4, "mode": "affine"});
        for l in 0..48 {
            for m in ["mlp.gate", "mlp.shared_expert_gate"] {
                quant[format!("model.layers.{l}.{m}")] = serde_json::json!({"group_size": 64, "bits": 8});
            }
        }
        let config = serde_json::json!({
            "model_type": "qwen3_next", "hidden_size": 2048, "num_hidden_layers": 48,
            "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256,
            "intermediate_size": 5120, "moe_intermediate_size": 512,
            "shared_expert_intermediate_size": 512, "num_experts": 512, "num_experts_per_tok": 10,
            "norm_topk_prob": true, "vocab_size": 151936, "max_position_embeddings": 262144,
            "linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_key_head_dim": 128,
            "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "full_attention_interval": 4,
            "partial_rotary_factor": 0.25, "rope_theta": 10000000, "rms_norm_eps": 1e-6,
            "hidden_act": "silu", "tie_word_embeddings": false, "decoder_sparse_step": 1,
            "mlp_only_layers": [], "quantization": quant
        });
        let cfg =
            ModelConfig::from_json_str(&config.to_string(), std::path::Path::new("config.json")).unwrap();
        let m = ByteModel::from_config(&cfg, 2);
        assert_eq!(m.expert_bytes, 1_769_472);
        assert_eq!(m.moe_layers, 48);
        for (cap, published_gb) in [(160, 14.98), (192, 17.70), (208, 19.06), (256, 23.13)] {
            let gb = (m.predict(cap, 0) - m.overhead_bytes) as f64 / 1e9;
            assert!(
                (gb - published_gb).abs() / published_gb < 0.01,
                "capacity {cap}: {gb:.2} GB vs {published_gb} (non-expert {:.3} GB)",
                m.non_expert_bytes as f64 / 1e9
            );
        }
    }

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_bytes("8GiB").unwrap(), 8 << 30);
        assert_eq!(parse_bytes("20GB").unwrap(), 20_000_000_000);
        assert_eq!(parse_bytes("512 MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert_eq!(parse_bytes("1.5g").unwrap(), 1_500_000_000);
        assert!(parse_bytes("lots").unwrap_err().contains("expected e.g. 8GiB"));
        assert!(parse_bytes("3 parsecs").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn budget_too_small_is_an_error() {
        let m = ByteModel {
            non_expert_bytes: 100,
            expert_bytes: 10,
            moe_layers: 2,
            kv_bytes_per_token: 1,
            overhead_bytes: 0,
        };
        assert_eq!(m.capacity_for(140, 10, 64).unwrap(), 1);
        assert!(m.capacity_for(119, 10, 64).is_err());
        assert_eq!(m.capacity_for(1_000_000, 10, 64).unwrap(), 64);
    }
}
