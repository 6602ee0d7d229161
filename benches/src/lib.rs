//! Shared pieces of the benchmarks: the synthetic mid-size checkpoint they run on.
//!
//! Benchmarks live in `benches/`; each prints a table next to a baseline measured in the same
//! run.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// The shape of the synthetic checkpoint (qwen3_moe layout, bf16).
pub const HIDDEN: usize = 2048;
pub const EXPERTS: usize = 64;
pub const EXPERT_WIDTH: usize = 1024;
pub const TOP_K: usize = 8;
pub const LAYERS: usize = 4;
pub const HEADS: usize = 16;
pub const KV_HEADS: usize = 4;
pub const HEAD_DIM: usize = 128;
pub const VOCAB: usize = 16384;
pub const PROMPT: usize = 16;

/// The directory the benchmarks keep their synthetic checkpoint in: `$SHADOWMOE_BENCH_DIR`, or
/// a temporary directory that is removed afterwards (returned so the caller keeps it alive).
pub fn bench_dir() -> (PathBuf, Option<tempfile::TempDir>) {
    match std::env::var_os("SHADOWMOE_BENCH_DIR") {
        Some(d) => (PathBuf::from(d), None),
        None => {
            let t = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
            (t.path().to_path_buf(), Some(t))
        }
    }
}

/// Writes the synthetic checkpoint into `dir` unless it is there already.
pub fn ensure_checkpoint(dir: &Path) {
    if !dir.join("model.safetensors").exists() {
        let t = std::time::Instant::now();
        write_checkpoint(dir);
        eprintln!(
            "wrote synthetic checkpoint to {} in {:.1}s",
            dir.display(),
            t.elapsed().as_secs_f64()
        );
    }
}

/// Weights read per decode token with all experts resident: per layer attention, norms, router
/// and top-k experts; then the final norm and LM head; plus one embedding row.
pub fn weight_bytes_per_decode_token() -> usize {
    let q = HEADS * HEAD_DIM;
    let kv = KV_HEADS * HEAD_DIM;
    let attn = HIDDEN * q + 2 * HIDDEN * kv + q * HIDDEN + 2 * HEAD_DIM + 2 * HIDDEN;
    let router = EXPERTS * HIDDEN;
    let experts = TOP_K * 3 * HIDDEN * EXPERT_WIDTH;
    let per_layer = attn + router + experts;
    (LAYERS * per_layer + HIDDEN + VOCAB * HIDDEN + HIDDEN) * 2
}

/// Reads the file once so that its pages are in the page cache.
pub fn prefault(path: &Path) {
    use std::io::Read;
    let mut f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 1 << 24];
    while f.read(&mut buf).unwrap() > 0 {}
}

/// A tensor of the synthetic checkpoint.
struct Spec {
    name: String,
    shape: Vec<usize>,
    /// Uniform in ±scale, or ones (norms) when `None`.
    scale: Option<f32>,
}

pub fn write_checkpoint(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::json!({
        "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"],
        "vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0,
        "num_experts": EXPERTS, "num_experts_per_tok": TOP_K, "moe_intermediate_size": EXPERT_WIDTH,
        "intermediate_size": 4 * EXPERT_WIDTH, "norm_topk_prob": true, "tie_word_embeddings": false,
        "hidden_act": "silu", "dtype": "bfloat16"
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();

    let lin = |name: String, out: usize, inp: usize| Spec {
        name,
        shape: vec![out, inp],
        scale: Some((3.0 / inp as f32).sqrt()),
    };
    let norm = |name: String, n: usize| Spec {
        name,
        shape: vec![n],
        scale: None,
    };
    let mut specs = vec![
        Spec {
            name: "model.embed_tokens.weight".into(),
            shape: vec![VOCAB, HIDDEN],
            scale: Some(1.0),
        },
        lin("lm_head.weight".into(), VOCAB, HIDDEN),
        norm("model.norm.weight".into(), HIDDEN),
    ];
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}.");
        specs.push(norm(format!("{p}input_layernorm.weight"), HIDDEN));
        specs.push(norm(format!("{p}post_attention_layernorm.weight"), HIDDEN));
        specs.push(lin(
            format!("{p}self_attn.q_proj.weight"),
            HEADS * HEAD_DIM,
            HIDDEN,
        ));
        specs.push(lin(
            format!("{p}self_attn.k_proj.weight"),
            KV_HEADS * HEAD_DIM,
            HIDDEN,
        ));
        specs.push(lin(
            format!("{p}self_attn.v_proj.weight"),
            KV_HEADS * HEAD_DIM,
            HIDDEN,
        ));
        specs.push(lin(
            format!("{p}self_attn.o_proj.weight"),
            HIDDEN,
            HEADS * HEAD_DIM,
        ));
        specs.push(norm(format!("{p}self_attn.q_norm.weight"), HEAD_DIM));
        specs.push(norm(format!("{p}self_attn.k_norm.weight"), HEAD_DIM));
        specs.push(lin(format!("{p}mlp.gate.weight"), EXPERTS, HIDDEN));
        for e in 0..EXPERTS {
            let q = format!("{p}mlp.experts.{e}.");
            specs.push(lin(format!("{q}gate_proj.weight"), EXPERT_WIDTH, HIDDEN));
            specs.push(lin(format!("{q}up_proj.weight"), EXPERT_WIDTH, HIDDEN));
            specs.push(lin(format!("{q}down_proj.weight"), HIDDEN, EXPERT_WIDTH));
        }
    }

    // Header, then the data streamed tensor by tensor (never the whole file in memory).
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for s in &specs {
        let n = s.shape.iter().product::<usize>() * 2;
        header.insert(
            s.name.clone(),
            serde_json::json!({"dtype": "BF16", "shape": s.shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    let mut text = serde_json::to_string(&header).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let tmp = dir.join("model.safetensors.tmp");
    let mut w = BufWriter::with_capacity(1 << 22, std::fs::File::create(&tmp).unwrap());
    w.write_all(&(text.len() as u64).to_le_bytes()).unwrap();
    w.write_all(text.as_bytes()).unwrap();
    let mut rng = shadowmoe_engine::sampling::Rng::new(42);
    let mut buf = Vec::new();
    for s in &specs {
        let n: usize = s.shape.iter().product();
        buf.clear();
        for _ in 0..n {
            let v = match s.scale {
                Some(a) => (rng.next_f32() * 2.0 - 1.0) * a,
                None => 1.0,
            };
            buf.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes());
        }
        w.write_all(&buf).unwrap();
    }
    w.flush().unwrap();
    drop(w);
    std::fs::rename(&tmp, dir.join("model.safetensors")).unwrap();
}

/// The environment variable `key` as a number, else `default`.
pub fn env_or(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Plain read of a 1 GiB buffer on the current rayon pool's threads (sum of u64 words), GB/s, best of 3.
pub fn memory_read_gbs() -> f64 {
    use rayon::prelude::*;
    let words: Vec<u64> = (0..(1usize << 27)).map(|i| i as u64).collect();
    let mut best = 0.0f64;
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let s: u64 = words
            .par_chunks(1 << 16)
            .map(|c| c.iter().fold(0u64, |a, &b| a.wrapping_add(b)))
            .sum();
        std::hint::black_box(s);
        best = best.max((words.len() * 8) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}
