//! A GGUF checkpoint as the engine's models read it: `general.architecture` picks the family,
//! its `{arch}.*` metadata becomes the model's configuration (as a `config.json` would give it,
//! validated by the same code), and llama.cpp's tensor names (`blk.N.attn_q.weight`,
//! `blk.N.ffn_gate_exps.weight` stacked `[E, out, in]`, …) are indexed under the Hugging Face
//! names the model loaders ask for. The stacked experts are the layout mlx_lm writes
//! (`switch_mlp`): each expert is one contiguous slice of each stacked tensor, read from disk as
//! it is stored.
//!
//! llama.cpp's converter permutes the rows of `llama`-family query and key projections (its
//! rotary embedding pairs adjacent dimensions, Hugging Face's pairs the two halves of a head);
//! the index undoes the permutation when those weights are copied into memory, so the engine's
//! rotary embedding is the same for every source.
//!
//! `qwen3next` (Qwen3-Next, Qwen3-Coder-Next): the converter (`Qwen3NextModel.modify_tensors`)
//! changes these tensors, and the engine takes each as stored or undoes the change:
//!
//! | converter                                              | here                                  |
//! |--------------------------------------------------------|---------------------------------------|
//! | every RMSNorm weight but the gated one (`linear_attn.norm`) stored as `1 + w` | the config's zero-centred norms off (as mlx_lm's layout) |
//! | `A_log` stored as `-exp(A_log)` (`ssm_a`)              | read as the decay rate itself (`linear_attn.A`) |
//! | `dt_bias` renamed `dt_proj.bias` (`ssm_dt.bias`)       | `linear_attn.dt_bias`                 |
//! | `conv1d` `[C, 1, K]` squeezed to `[C, K]`              | indexed as `[C, 1, K]` (same bytes)   |
//! | `in_proj_qkvz` (grouped per key head `[q k v z]`) split into `attn_qkv` (all q, all k, all v) and `attn_gate` (z) | `linear_attn.in_proj_qkv` / `in_proj_z`: the layer takes them ungrouped (the two may differ in ggml type); an older file's `ssm_in` is `in_proj_qkvz` as it was |
//! | `in_proj_ba`, `q_proj` (query and gate per head), the rest | as stored                        |
//! | `post_attention_layernorm` named `post_attention_norm` | mapped back                           |
//! | the multi-token-prediction block (`mtp.*`) written as block `n` (`nextn_predict_layers`) | left out: `num_hidden_layers` = block_count − nextn |
//!
//! llama.cpp's qwen3next always renormalises its top-k expert weights (the config says
//! norm_topk_prob true) and takes both head widths of its linear attention from
//! `ssm.state_size` (its loader refuses value heads of another width; the engine takes
//! `ssm.inner_size / ssm.time_step_rank`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value as Json, json};

use super::names::hf_name;

mod family;
use super::{GgufFile, TensorInfo, Value};
use crate::config::{Arch, ModelConfig};
use crate::error::{EngineError, Result};
use crate::weights::{DType, WeightIndex};
use family::{deepseek2, deepseek2_yarn, glm4_moe, gpt_oss_yarn, linear_attention};

/// The families the engine runs, by `general.architecture`.
const ARCHS: [(&str, &str); 8] = [
    ("llama", "mixtral"),
    ("qwen3moe", "qwen3_moe"),
    ("qwen2moe", "qwen2_moe"),
    ("olmoe", "olmoe"),
    ("qwen3next", "qwen3_next"),
    ("glm4moe", "glm4_moe"),
    // DeepSeek-V3/R1, Kimi-K2 and GLM-4.7-Flash: llama.cpp converts all of them to deepseek2.
    ("deepseek2", "deepseek_v3"),
    ("gpt-oss", "gpt_oss"),
];

/// An opened GGUF checkpoint (one file, or every split of one).
#[derive(Debug)]
pub struct GgufCheckpoint {
    pub files: Vec<GgufFile>,
    pub config: ModelConfig,
    /// The configuration as `config.json` text (the checkpoint's identity in packs and traces).
    pub config_json: String,
    pub weights: WeightIndex,
}

/// Whether `path` names a GGUF file (by its extension).
pub fn is_gguf_path(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// The files of a split checkpoint (`name-00001-of-00003.gguf` and its siblings), or the one
/// file.
fn split_paths(path: &Path) -> Vec<PathBuf> {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
    let parts: Vec<&str> = stem.rsplitn(4, '-').collect();
    // rsplitn: ["0000N", "of", "0000i", "name"].
    if let [count, "of", _index, base] = parts.as_slice()
        && let Ok(n) = count.parse::<usize>()
        && n > 1
        && count.len() == 5
    {
        let dir = path.parent().unwrap_or(Path::new(""));
        return (1..=n)
            .map(|i| dir.join(format!("{base}-{i:05}-of-{count}.gguf")))
            .collect();
    }
    vec![path.to_path_buf()]
}

/// Opens the GGUF checkpoint at `path` (any split of a split one).
pub fn open(path: &Path) -> Result<GgufCheckpoint> {
    let paths = split_paths(path);
    let mut files = Vec::with_capacity(paths.len());
    for p in &paths {
        if !p.exists() {
            return Err(EngineError::MissingFile {
                path: p.clone(),
                what: "a split of the GGUF checkpoint (every `-0000i-of-0000N.gguf` must be present)",
            });
        }
        files.push(GgufFile::open(p)?);
    }
    let first = &files[0];
    let bad = |key: &str, m: String| EngineError::field(&first.path, key, m);
    if files.len() > 1 {
        for (i, f) in files.iter().enumerate() {
            let no = f.get("split.no").and_then(Value::as_u64);
            if no != Some(i as u64) {
                return Err(EngineError::field(
                    &f.path,
                    "split.no",
                    format!("expected {i} (its place in the file names), found {no:?}"),
                ));
            }
        }
    }
    let arch = first
        .architecture()
        .ok_or_else(|| bad("general.architecture", "missing (expected a string)".into()))?
        .to_string();
    let Some(&(arch_name, model_type)) = ARCHS.iter().find(|(a, _)| *a == arch) else {
        return Err(bad(
            "general.architecture",
            format!(
                "`{arch}` is not an architecture the engine runs (supported: {})",
                ARCHS.map(|(a, _)| a).join(", ")
            ),
        ));
    };
    let meta = Meta {
        f: first,
        arch: &arch,
    };
    let config_map = config_of(&meta, model_type, &files)?;
    let config_json = serde_json::to_string_pretty(&Json::Object(config_map)).unwrap_or_default();
    let mut config = ModelConfig::from_json_str(&config_json, &first.path)?;
    // llama.cpp multiplies by its norm weights as stored: qwen3next's converter stored its
    // zero-centred norms as `1 + w` (as mlx_lm's sanitize does).
    config.norm_zero_centred = false;
    // llama.cpp's latent norms take the file's epsilon (transformers' a fixed 1e-6).
    let eps = config.rms_norm_eps;
    if let Some(mla) = &mut config.mla {
        mla.latent_norm_eps = eps;
    }
    // gpt-oss's experts as llama.cpp computes them (its MXFP4 on Q8_0 activations).
    if let Some(swiglu) = &mut config.clamped_swiglu {
        swiglu.ggml = true;
    }
    let permute = arch == "llama";
    let mut tensors = Vec::new();
    for (fi, f) in files.iter().enumerate() {
        for t in &f.tensors {
            tensors.push((fi, t.clone()));
        }
    }
    let weights = index(&files, &tensors, &config, permute, arch_name)?;
    Ok(GgufCheckpoint {
        files,
        config,
        config_json,
        weights,
    })
}

/// Typed metadata lookups naming the key in errors.
struct Meta<'a> {
    f: &'a GgufFile,
    arch: &'a str,
}

impl Meta<'_> {
    fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch)
    }

    fn u64_opt(&self, k: &str) -> Result<Option<u64>> {
        let key = self.key(k);
        match self.f.get(&key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                EngineError::field(
                    &self.f.path,
                    &key,
                    format!("expected an unsigned integer, found {}", v.type_name()),
                )
            }),
        }
    }

    fn u64(&self, k: &str) -> Result<u64> {
        self.u64_opt(k)?.ok_or_else(|| {
            EngineError::field(
                &self.f.path,
                self.key(k),
                "missing (required for this architecture)",
            )
        })
    }

    fn f64_opt(&self, k: &str) -> Result<Option<f64>> {
        let key = self.key(k);
        match self.f.get(&key) {
            None => Ok(None),
            Some(v @ (Value::F32(_) | Value::F64(_))) => Ok(v.as_f64()),
            Some(v) => Err(EngineError::field(
                &self.f.path,
                &key,
                format!("expected a float, found {}", v.type_name()),
            )),
        }
    }

    fn bool_opt(&self, k: &str) -> Result<Option<bool>> {
        let key = self.key(k);
        match self.f.get(&key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(EngineError::field(
                &self.f.path,
                &key,
                format!("expected a bool, found {}", v.type_name()),
            )),
        }
    }
}

/// The `config.json` of the checkpoint, from its metadata.
fn config_of(m: &Meta<'_>, model_type: &str, files: &[GgufFile]) -> Result<Map<String, Json>> {
    let f = m.f;
    let find = |name: &str| files.iter().find_map(|f| f.tensor(name));
    let heads = m.u64("attention.head_count")?;
    let hidden = m.u64("embedding_length")?;
    // deepseek2: latent attention, whose shape has its own keys (key_length and value_length
    // describe llama.cpp's MQA view of the latent cache).
    let mla = model_type == "deepseek_v3";
    let head_dim = match m.u64_opt("attention.key_length")? {
        _ if mla => 0,
        Some(k) => k,
        None if heads > 0 => hidden / heads,
        None => 0,
    };
    if let Some(v) = m.u64_opt("attention.value_length")?
        && v != head_dim
        && !mla
    {
        return Err(EngineError::field(
            &f.path,
            m.key("attention.value_length"),
            format!("{v} differs from the key length {head_dim} (not supported)"),
        ));
    }
    // qwen3next and glm4moe rotate a share of each head (partial_rotary_factor = rotated /
    // head size; glm4_moe's config must say 1.0 when all of it turns).
    let mut partial_rotary = None;
    if model_type == "glm4_moe" {
        partial_rotary = Some(1.0);
    }
    if let Some(r) = m.u64_opt("rope.dimension_count")?
        && r != head_dim
        && matches!(model_type, "qwen3_next" | "glm4_moe")
    {
        let factor = r as f64 / head_dim.max(1) as f64;
        if r == 0 || r > head_dim || !r.is_multiple_of(2) || (head_dim as f64 * factor) as u64 != r {
            return Err(EngineError::field(
                &f.path,
                m.key("rope.dimension_count"),
                format!("{r}: expected an even number of rotated values up to the head size {head_dim}"),
            ));
        }
        partial_rotary = Some(factor);
    } else if let Some(r) = m.u64_opt("rope.dimension_count")?
        && r != head_dim
        && !mla
    {
        return Err(EngineError::field(
            &f.path,
            m.key("rope.dimension_count"),
            format!(
                "{r}: partial rotary embeddings are not supported for `{}` (expected the head size {head_dim})",
                m.arch
            ),
        ));
    }
    // Rotary scaling: none, linear (positions divided by the factor), or for deepseek2 yarn.
    let scaling = m.key("rope.scaling.type");
    let rope_scaling = match f.get(&scaling).map(|v| (v, v.as_str())) {
        None | Some((_, Some("none"))) => None,
        Some((_, Some("yarn"))) if mla => Some(deepseek2_yarn(m)?),
        Some((_, Some("yarn"))) if model_type == "gpt_oss" => Some(gpt_oss_yarn(m)?),
        Some((_, Some("linear"))) => {
            let factor = m.f64_opt("rope.scaling.factor")?.ok_or_else(|| {
                EngineError::field(
                    &f.path,
                    m.key("rope.scaling.factor"),
                    "missing (linear rotary scaling needs its factor)",
                )
            })?;
            Some(json!({"rope_type": "linear", "factor": factor}))
        }
        Some((v, _)) => {
            return Err(EngineError::field(
                &f.path,
                &scaling,
                format!(
                    "{v:?}: rotary scaling other than none or linear is not supported for GGUF checkpoints yet"
                ),
            ));
        }
    };
    let vocab = match m.u64_opt("vocab_size")? {
        Some(v) => v,
        None => match (f.get("tokenizer.ggml.tokens"), find("token_embd.weight")) {
            (Some(Value::Array(_, items)), _) => items.len() as u64,
            (_, Some(t)) if t.dims.len() == 2 => t.dims[1],
            _ => {
                return Err(EngineError::field(
                    &f.path,
                    m.key("vocab_size"),
                    "missing, and no tokenizer.ggml.tokens or token_embd.weight to count",
                ));
            }
        },
    };
    // A multi-token-prediction block (nextn) comes after the main layers and is not run by
    // llama.cpp's main pass.
    let blocks = m.u64("block_count")?;
    let nextn = m.u64_opt("nextn_predict_layers")?.unwrap_or(0);
    if nextn >= blocks {
        return Err(EngineError::field(
            &f.path,
            m.key("nextn_predict_layers"),
            format!("{nextn} leaves none of the {blocks} blocks (block_count) to run"),
        ));
    }
    let layers = blocks - nextn;
    let experts = m.u64("expert_count")?;
    if experts == 0 {
        return Err(EngineError::field(
            &f.path,
            m.key("expert_count"),
            "0: a dense model (the engine runs mixture-of-experts models)",
        ));
    }
    let ffn = m.u64_opt("feed_forward_length")?;
    let expert_ffn = m.u64_opt("expert_feed_forward_length")?;
    let mut c = Map::new();
    let mut put = |k: &str, v: Json| {
        c.insert(k.to_string(), v);
    };
    put("model_type", json!(model_type));
    put("hidden_act", json!("silu"));
    put("vocab_size", json!(vocab));
    put("hidden_size", json!(hidden));
    put("num_hidden_layers", json!(layers));
    put("num_attention_heads", json!(heads));
    put(
        "num_key_value_heads",
        json!(m.u64_opt("attention.head_count_kv")?.unwrap_or(heads)),
    );
    if !mla {
        put("head_dim", json!(head_dim));
    }
    if let Some(eps) = m.f64_opt("attention.layer_norm_rms_epsilon")? {
        put("rms_norm_eps", json!(eps));
    }
    put(
        "rope_theta",
        json!(m.f64_opt("rope.freq_base")?.unwrap_or(10_000.0)),
    );
    if let Some(r) = rope_scaling {
        put("rope_scaling", r);
    }
    if let Some(p) = partial_rotary {
        put("partial_rotary_factor", json!(p));
    }
    if let Some(ctx) = m.u64_opt("context_length")? {
        put("max_position_embeddings", json!(ctx));
    }
    put("tie_word_embeddings", json!(find("output.weight").is_none()));
    put("num_local_experts", json!(experts));
    put("num_experts", json!(experts));
    put("num_experts_per_tok", json!(m.u64("expert_used_count")?));
    match model_type {
        // llama.cpp's `llama` with experts is Mixtral: one width, no sliding window (the
        // converter does not carry Mixtral's), biases nowhere.
        "mixtral" => {
            put("intermediate_size", json!(ffn.or(expert_ffn)));
            put("sliding_window", Json::Null);
        }
        "olmoe" => {
            put("intermediate_size", json!(expert_ffn.or(ffn)));
            put(
                "norm_topk_prob",
                json!(m.bool_opt("expert_weights_norm")?.unwrap_or(false)),
            );
            if let Some(c) = m.f64_opt("attention.clamp_kqv")? {
                put("clip_qkv", json!(c));
            }
        }
        "glm4_moe" => {
            for (k, v) in glm4_moe(m, files, expert_ffn, ffn)? {
                put(&k, v);
            }
        }
        "deepseek_v3" => {
            for (k, v) in deepseek2(m, heads, layers, vocab, expert_ffn, ffn)? {
                put(&k, v);
            }
        }
        // llama.cpp's gpt-oss: the experts' width, sliding attention on even layers (its swa
        // pattern 2, transformers' layer_types), biases everywhere, and the clamped SwiGLU at
        // the alpha and limit llama.cpp fixes (1.702, 7.0; the file carries neither).
        "gpt_oss" => {
            put("intermediate_size", json!(expert_ffn.or(ffn)));
            let window = m.u64("attention.sliding_window")?;
            put("sliding_window", json!(window));
            let types: Vec<&str> = (0..layers)
                .map(|l| {
                    if l % 2 == 0 {
                        "sliding_attention"
                    } else {
                        "full_attention"
                    }
                })
                .collect();
            put("layer_types", json!(types));
            put("attention_bias", json!(true));
            put("swiglu_alpha", json!(1.702));
            put("swiglu_limit", json!(7.0));
        }
        "qwen3_next" => {
            put("moe_intermediate_size", json!(expert_ffn.or(ffn)));
            put("intermediate_size", json!(ffn.or(expert_ffn)));
            // llama.cpp's qwen3next: every layer MoE, top-k weights always renormalised, the
            // shared expert as wide as the dense width when its own is not given.
            put("mlp_only_layers", json!([]));
            put("norm_topk_prob", json!(true));
            let shared = m.u64_opt("expert_shared_feed_forward_length")?.filter(|&s| s > 0);
            put("shared_expert_intermediate_size", json!(shared.or(ffn)));
            for (k, v) in linear_attention(m, layers)? {
                put(&k, v);
            }
        }
        _ => {
            put("moe_intermediate_size", json!(expert_ffn.or(ffn)));
            put("intermediate_size", json!(ffn.or(expert_ffn)));
            // qwen3moe always renormalises its top-k weights in llama.cpp; the others say so
            // in `expert_weights_norm` (absent: not).
            let norm = match m.bool_opt("expert_weights_norm")? {
                Some(b) => b,
                None => model_type == "qwen3_moe",
            };
            put("norm_topk_prob", json!(norm));
            if model_type == "qwen2_moe" {
                let shared = m.u64_opt("expert_shared_feed_forward_length")?;
                put("shared_expert_intermediate_size", json!(shared));
            }
            if model_type == "qwen2_moe" {
                put("qkv_bias", json!(find("blk.0.attn_q.bias").is_some()));
            }
        }
    }
    let token = |k: &str| f.get(k).and_then(Value::as_u64);
    if let Some(b) = token("tokenizer.ggml.bos_token_id") {
        put("bos_token_id", json!(b));
    }
    if let Some(e) = token("tokenizer.ggml.eos_token_id") {
        put("eos_token_id", json!(e));
    }
    Ok(c)
}

/// The engine's dtype for a ggml type it computes with as stored.
/// F32 is computed as it is; F16 and BF16 as llama.cpp computes them (activations rounded to
/// the same type: [`crate::ggml::BlockType::F16`]); the block types on 8-bit activations.
fn dtype_of(t: &TensorInfo) -> Option<DType> {
    match t.ty.name {
        "F32" => Some(DType::F32),
        other => crate::ggml::BlockType::from_name(other).map(DType::Block),
    }
}

/// The weight index over the files' tensors under Hugging Face names. Blocks past the
/// config's layers (a multi-token-prediction block) are left out.
fn index(
    files: &[GgufFile],
    tensors: &[(usize, TensorInfo)],
    cfg: &ModelConfig,
    permute: bool,
    arch: &'static str,
) -> Result<WeightIndex> {
    let mut entries = HashMap::new();
    let mut other = HashMap::new();
    let mut heads = HashMap::new();
    for (fi, t) in tensors {
        let Some(name) = hf_name(arch, &t.name) else {
            continue;
        };
        if let Some(layer) = name
            .strip_prefix("model.layers.")
            .and_then(|r| r.split_once('.'))
            .and_then(|(l, _)| l.parse::<usize>().ok())
            && layer >= cfg.num_hidden_layers
        {
            continue;
        }
        // ggml's dims run innermost first; the row-major shape is their reverse.
        let mut shape: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
        // The converter squeezed the conv kernel's middle axis: `[C, K]` is `[C, 1, K]`. A
        // shared expert's gate, one row (`[1, H]` from the converter), is `[H]` after
        // llama-quantize (ggml drops trailing unit dims).
        if (name.ends_with("linear_attn.conv1d.weight") && shape.len() == 2)
            || (name.ends_with("mlp.shared_expert_gate.weight") && shape.len() == 1)
        {
            shape.insert(shape.len() - 1, 1);
        }
        match dtype_of(t) {
            Some(dtype) => {
                if let Some(&k) = shape.last()
                    && !dtype.fits_row(k)
                {
                    return Err(EngineError::Tensor {
                        path: files[*fi].path.clone(),
                        tensor: t.name.clone(),
                        message: format!(
                            "rows of {k} values are not whole {} blocks of {}",
                            dtype.name(),
                            match dtype {
                                DType::Block(b) => b.block_values(),
                                _ => 1,
                            }
                        ),
                    });
                }
                entries.insert(
                    name.clone(),
                    crate::weights::TensorEntry {
                        file: *fi,
                        offset: t.offset as usize,
                        dtype,
                        shape,
                    },
                );
            }
            None => {
                other.insert(name.clone(), (*fi, t.ty.name.to_string()));
            }
        }
        if permute {
            if name.ends_with("self_attn.q_proj.weight") {
                heads.insert(name, cfg.num_attention_heads);
            } else if name.ends_with("self_attn.k_proj.weight") {
                heads.insert(name, cfg.num_key_value_heads);
            }
        }
    }
    if cfg.arch == Arch::Mixtral && !permute {
        tracing::debug!("mixtral-family GGUF without the llama row permutation");
    }
    let maps = files.iter().map(|f| (f.path.clone(), f.map().clone())).collect();
    Ok(WeightIndex::from_gguf(arch, maps, entries, other, heads))
}
