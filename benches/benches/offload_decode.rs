//! Decode with experts on disk: tok/s at a cache of 25%, 50% and 100% of the experts of the
//! synthetic checkpoint (its experts total 4x the 25% budget), read with O_DIRECT, next to the
//! all-resident run measured in the same invocation; with each run's peak RSS beside the byte
//! model's prediction, and a check that every run generates the resident run's tokens.
//!
//!     cargo bench -p shadowmoe-benches --bench offload_decode
//!
//! Each configuration runs in a child process (this same binary), so that each peak RSS is its
//! own. Environment: `SHADOWMOE_BENCH_DIR`, `SHADOWMOE_BENCH_TOKENS` (decode steps, default 32).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use shadowmoe_benches::*;
use shadowmoe_engine::offload::{Budget, CacheOptions, IoMode, MissMode, PolicyKind};
use shadowmoe_engine::{Checkpoint, GenerateOptions, NoObserver, SamplingParams, generate, peak_rss_bytes};

const CHILD: &str = "SHADOWMOE_BENCH_CHILD";

fn main() {
    let tokens: usize = std::env::var("SHADOWMOE_BENCH_TOKENS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    if let Ok(spec) = std::env::var(CHILD) {
        let dir = std::env::var("SHADOWMOE_BENCH_CHILD_DIR").unwrap();
        child(std::path::Path::new(&dir), &spec, tokens);
        return;
    }
    let (dir, _tmp) = bench_dir();
    ensure_checkpoint(&dir);
    let specs = [
        "resident".to_string(),
        format!("{}", EXPERTS / 4),
        format!("{}", EXPERTS / 2),
        format!("{EXPERTS}"),
    ];
    let mut rows = Vec::new();
    for spec in &specs {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .env(CHILD, spec)
            .env("SHADOWMOE_BENCH_CHILD_DIR", &dir)
            .env("SHADOWMOE_BENCH_TOKENS", tokens.to_string())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "child {spec}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8(out.stdout).unwrap();
        rows.push(serde_json::from_str::<serde_json::Value>(line.trim()).unwrap());
    }
    let resident = &rows[0];
    let base_rate = resident["decode_tok_s"].as_f64().unwrap();
    let expert_total = EXPERTS * LAYERS * 3 * HIDDEN * EXPERT_WIDTH * 2;
    println!(
        "decode with experts on disk: synthetic qwen3_moe, {EXPERTS} experts x {LAYERS} layers ({:.2} GB of experts), top-{TOP_K}, O_DIRECT, {tokens} decode tokens",
        expert_total as f64 / 1e9
    );
    println!();
    println!(
        "| cache | experts resident | decode tok/s | vs resident | decode hit rate | stall s | GB read | peak RSS GB | byte model GB | RSS / model | same tokens |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for r in &rows {
        let rate = r["decode_tok_s"].as_f64().unwrap();
        let rss = r["peak_rss"].as_f64().unwrap() / 1e9;
        let model = r["predicted_rss"].as_f64().map(|b| b / 1e9);
        println!(
            "| {} | {} | {rate:.2} | {:.2} | {} | {:.2} | {:.2} | {rss:.3} | {} | {} | {} |",
            r["spec"].as_str().unwrap(),
            r["resident_share"].as_str().unwrap(),
            rate / base_rate,
            r["hit_rate_decode"]
                .as_f64()
                .map_or("-".into(), |h| format!("{:.1}%", h * 100.0)),
            r["stall_secs"].as_f64().unwrap_or(0.0),
            r["bytes_read"].as_f64().unwrap_or(0.0) / 1e9,
            model.map_or("-".into(), |m| format!("{m:.3}")),
            model.map_or("-".into(), |m| format!("{:.3}", rss / m)),
            r["tokens"] == resident["tokens"],
        );
    }
}

/// One configuration, in its own process: prints one JSON line.
fn child(dir: &std::path::Path, spec: &str, tokens: usize) {
    let ckpt = Checkpoint::open_dir(dir).unwrap();
    let prompt: Vec<u32> = (0..PROMPT as u32).map(|i| (i * 977) % VOCAB as u32).collect();
    let context = PROMPT + tokens + 1;
    let (model, cached, predicted, share) = if spec == "resident" {
        prefault(&dir.join("model.safetensors"));
        (ckpt.load_model().unwrap(), None, None, "100% (mmap)".to_string())
    } else {
        let cap: usize = spec.parse().unwrap();
        let store = Arc::new(ckpt.expert_store(IoMode::Direct, None, false).unwrap());
        let predicted = ckpt.byte_model(&store).predict(cap, context);
        let opts = CacheOptions {
            budget: Budget::PerLayer(cap),
            policy: PolicyKind::Lru,
            on_miss: MissMode::Sync,
            io_threads: 4,
            pinned: vec![],
            settle_loads: false,
            prefetch_readers: 0,
        };
        let (model, cached) = ckpt.load_model_cached(store, &opts).unwrap();
        (
            model,
            Some(cached),
            Some(predicted),
            format!("{}%", cap * 100 / EXPERTS),
        )
    };
    let opts = GenerateOptions {
        max_new_tokens: tokens + 1,
        sampling: SamplingParams::default(),
        eos_token_ids: vec![],
    };
    let start = Instant::now();
    let (generated, stats) = generate(&model, &prompt, &opts, &mut NoObserver, |_| Ok(())).unwrap();
    let _total = start.elapsed();
    let (hit, stall, read) = match &cached {
        Some(c) => {
            let (s, io) = c.stats();
            (s.hit_rate_decode(), io.stall.as_secs_f64(), io.bytes_read)
        }
        None => (None, 0.0, 0),
    };
    println!(
        "{}",
        json!({
            "spec": if spec == "resident" { "all resident".to_string() } else { format!("capacity {spec}") },
            "resident_share": share,
            "decode_tok_s": stats.decode_tok_s(),
            "hit_rate_decode": hit,
            "stall_secs": stall,
            "bytes_read": read,
            "peak_rss": peak_rss_bytes(),
            "predicted_rss": predicted,
            "tokens": generated,
        })
    );
}
