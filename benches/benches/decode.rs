//! Decode benchmark: a synthetic mid-size MoE checkpoint, made here (not committed), all in
//! memory. Prints decode tok/s and the effective GB/s of weights read per token, next to a plain
//! memory-read bandwidth measured in the same run with the same threads, as a ratio.
//!
//!     cargo bench -p shadowmoe-benches --bench decode
//!
//! Environment: `SHADOWMOE_BENCH_DIR` (where the ~3.4 GB checkpoint is written; default: a
//! temporary directory, removed afterwards), `SHADOWMOE_BENCH_TOKENS` (decode steps per run,
//! default 24), `SHADOWMOE_BENCH_REPEAT` (runs, default 5).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::Instant;

use shadowmoe_engine::{Checkpoint, LogitsFor, NoObserver, Phase, Sampler, SamplingParams};

/// The shape of the synthetic checkpoint (qwen3_moe layout, bf16).
const HIDDEN: usize = 2048;
const EXPERTS: usize = 64;
const EXPERT_WIDTH: usize = 1024;
const TOP_K: usize = 8;
const LAYERS: usize = 4;
const HEADS: usize = 16;
const KV_HEADS: usize = 4;
const HEAD_DIM: usize = 128;
const VOCAB: usize = 16384;
const PROMPT: usize = 16;

fn main() {
    let tokens: usize = env_or("SHADOWMOE_BENCH_TOKENS", 24);
    let repeat: usize = env_or("SHADOWMOE_BENCH_REPEAT", 5);
    let keep = std::env::var_os("SHADOWMOE_BENCH_DIR");
    let tmp = tempfile::tempdir().unwrap();
    let dir = keep.as_ref().map_or(tmp.path(), Path::new).to_path_buf();
    if !dir.join("model.safetensors").exists() {
        let t = Instant::now();
        write_checkpoint(&dir);
        eprintln!(
            "wrote synthetic checkpoint to {} in {:.1}s",
            dir.display(),
            t.elapsed().as_secs_f64()
        );
    }
    let ckpt = Checkpoint::open_dir(&dir).unwrap();
    let model = ckpt.load_model().unwrap();

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut thread_counts = vec![1];
    if cores > 1 {
        thread_counts.push(cores);
    }
    let bytes_per_token = weight_bytes_per_decode_token();
    println!(
        "decode benchmark: qwen3_moe, hidden {HIDDEN}, {EXPERTS} experts x width {EXPERT_WIDTH}, top-{TOP_K}, {LAYERS} layers, bf16, vocab {VOCAB}"
    );
    println!(
        "weights read per decode token: {:.1} MB; {tokens} decode tokens per run, median of {repeat} runs",
        bytes_per_token as f64 / 1e6
    );
    println!();
    println!(
        "| threads | decode tok/s (median) | spread (min..max) | weights GB/s | memory read GB/s | ratio |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for threads in thread_counts {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let (rates, mem_gbs) = pool.install(|| {
            // Touch every expert once so that the page cache, not the disk, serves the run.
            prefault(&dir.join("model.safetensors"));
            let mut rates = Vec::new();
            for r in 0..repeat {
                rates.push(decode_rate(&model, tokens, r as u64));
            }
            (rates, memory_read_gbs())
        });
        let mut sorted = rates.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        let gbs = median * bytes_per_token as f64 / 1e9;
        println!(
            "| {threads} | {median:.2} | {:.2}..{:.2} | {gbs:.2} | {mem_gbs:.2} | {:.2} |",
            sorted[0],
            sorted[sorted.len() - 1],
            gbs / mem_gbs
        );
    }
}

fn env_or(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Decode tokens per second after a prefill of `PROMPT` tokens.
fn decode_rate(model: &shadowmoe_engine::Model, tokens: usize, seed: u64) -> f64 {
    let prompt: Vec<u32> = (0..PROMPT as u32)
        .map(|i| (i * 977 + seed as u32 * 131) % VOCAB as u32)
        .collect();
    let mut cache = model.new_cache();
    let logits = model
        .forward(
            &prompt,
            &mut cache,
            Phase::Prefill,
            LogitsFor::Last,
            &mut NoObserver,
        )
        .unwrap();
    let mut sampler = Sampler::new(SamplingParams {
        temperature: 1.0,
        seed,
        ..Default::default()
    });
    let mut next = sampler.sample(logits.row(0).as_slice().unwrap());
    let start = Instant::now();
    for _ in 0..tokens {
        let logits = model
            .forward(
                &[next],
                &mut cache,
                Phase::Decode,
                LogitsFor::Last,
                &mut NoObserver,
            )
            .unwrap();
        next = sampler.sample(logits.row(0).as_slice().unwrap());
    }
    tokens as f64 / start.elapsed().as_secs_f64()
}

/// Bytes of weights one decode token reads: per layer attention, norms, router and top-k
/// experts; then the final norm and LM head; plus one embedding row.
fn weight_bytes_per_decode_token() -> usize {
    let q = HEADS * HEAD_DIM;
    let kv = KV_HEADS * HEAD_DIM;
    let attn = HIDDEN * q + 2 * HIDDEN * kv + q * HIDDEN + 2 * HEAD_DIM + 2 * HIDDEN;
    let router = EXPERTS * HIDDEN;
    let experts = TOP_K * 3 * HIDDEN * EXPERT_WIDTH;
    let per_layer = attn + router + experts;
    (LAYERS * per_layer + HIDDEN + VOCAB * HIDDEN + HIDDEN) * 2
}

/// Plain parallel read of a 1 GiB buffer (sum of u64 words), GB/s, best of 3.
fn memory_read_gbs() -> f64 {
    use rayon::prelude::*;
    let words: Vec<u64> = (0..(1usize << 27)).map(|i| i as u64).collect();
    let mut best = 0.0f64;
    for _ in 0..3 {
        let t = Instant::now();
        let s: u64 = words
            .par_chunks(1 << 16)
            .map(|c| c.iter().fold(0u64, |a, &b| a.wrapping_add(b)))
            .sum();
        std::hint::black_box(s);
        best = best.max((words.len() * 8) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// Reads the file once so that its pages are resident.
fn prefault(path: &Path) {
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

fn write_checkpoint(dir: &Path) {
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
