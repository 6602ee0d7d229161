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

use std::time::Instant;

use shadowmoe_benches::*;
use shadowmoe_engine::{Checkpoint, LogitsFor, NoObserver, Phase, Sampler, SamplingParams};

fn main() {
    let tokens: usize = env_or("SHADOWMOE_BENCH_TOKENS", 24);
    let repeat: usize = env_or("SHADOWMOE_BENCH_REPEAT", 5);
    let (dir, _tmp) = bench_dir();
    ensure_checkpoint(&dir);
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
