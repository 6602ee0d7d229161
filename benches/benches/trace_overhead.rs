//! Tracing overhead: the same generations on the synthetic checkpoint with the observer off,
//! with the trace writer on without hidden states, and with hidden states of every MoE layer;
//! ratios against the untraced run measured in the same invocation (goal <= 1.05 without
//! hidden states). Writing the Parquet file is timed with it.
//!
//!     cargo bench -p shadowmoe-benches --bench trace_overhead

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use shadowmoe_benches::*;
use shadowmoe_engine::observer::RoutingObserver;
use shadowmoe_engine::{Checkpoint, GenerateOptions, Model, NoObserver, SamplingParams, generate};
use shadowmoe_trace::schema::{Manifest, TRACE_FORMAT};
use shadowmoe_trace::{CollectPlan, TraceWriter};

const REQUESTS: u32 = 4;

fn main() {
    let tokens: usize = std::env::var("SHADOWMOE_BENCH_TOKENS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    let repeat = 3;
    let (dir, _tmp) = bench_dir();
    ensure_checkpoint(&dir);
    prefault(&dir.join("model.safetensors"));
    let ckpt = Checkpoint::open_dir(&dir).unwrap();
    let model = ckpt.load_model().unwrap();
    let moe = ckpt.config.moe_layers();
    let out_dir = tempfile::tempdir().unwrap();

    let mut rows: Vec<(&str, Vec<f64>, u64)> = Vec::new();
    for (name, hidden) in [
        ("observer off", None),
        ("trace, no hidden", Some(vec![])),
        ("trace, all hidden", Some(moe.clone())),
    ] {
        let mut times = Vec::new();
        let mut bytes = 0;
        for rep in 0..repeat {
            let start = Instant::now();
            match &hidden {
                None => {
                    for r in 0..REQUESTS {
                        run_request(&model, r, tokens, &mut NoObserver);
                    }
                }
                Some(h) => {
                    let out = out_dir.path().join(format!("{rep}-{}.parquet", h.len()));
                    let (mut w, _) = TraceWriter::create(plan(&ckpt, &out, h.clone(), tokens)).unwrap();
                    for r in 0..REQUESTS {
                        w.begin_request(r, r);
                        run_request(&model, r, tokens, &mut w);
                        w.end_request().unwrap();
                    }
                    bytes = w.finish().unwrap().bytes;
                }
            }
            times.push(start.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        rows.push((name, times, bytes));
    }
    let base = rows[0].1[repeat / 2];
    println!(
        "tracing overhead: synthetic qwen3_moe (hidden {HIDDEN}, {LAYERS} MoE layers, top-{TOP_K}), {REQUESTS} requests x ({PROMPT} prompt + {tokens} generated) tokens, median of {repeat}"
    );
    println!();
    println!("| run | seconds (median) | ratio to observer off | trace bytes | bytes per token |");
    println!("|---|---:|---:|---:|---:|");
    let per_req_tokens = (PROMPT + tokens) as f64;
    for (name, t, bytes) in &rows {
        let med = t[repeat / 2];
        let per_tok = if *bytes > 0 {
            format!("{:.0}", *bytes as f64 / (REQUESTS as f64 * per_req_tokens))
        } else {
            "-".into()
        };
        println!("| {name} | {med:.3} | {:.3} | {bytes} | {per_tok} |", med / base);
    }
}

fn run_request(model: &Model, r: u32, tokens: usize, obs: &mut dyn RoutingObserver) {
    let prompt: Vec<u32> = (0..PROMPT as u32)
        .map(|i| (i * 977 + r * 131) % VOCAB as u32)
        .collect();
    let opts = GenerateOptions {
        max_new_tokens: tokens,
        sampling: SamplingParams::default(),
        eos_token_ids: vec![],
    };
    generate(model, &prompt, &opts, obs, |_| Ok(())).unwrap();
}

fn plan(ckpt: &Checkpoint, out: &std::path::Path, hidden: Vec<usize>, tokens: usize) -> CollectPlan {
    let c = &ckpt.config;
    CollectPlan {
        out: out.to_path_buf(),
        manifest: Manifest {
            format: TRACE_FORMAT.into(),
            model_id: "synthetic".into(),
            config_sha256: ckpt.config_sha256().unwrap(),
            architecture: c.arch.model_type().into(),
            num_layers: c.num_hidden_layers,
            moe_layers: c.moe_layers(),
            num_experts: c.num_experts,
            top_k: c.num_experts_per_tok,
            hidden_size: c.hidden_size,
            dataset: "synthetic".into(),
            dataset_sha256: String::new(),
            dataset_requests: REQUESTS as usize,
            requests: REQUESTS as usize,
            chat_template: true,
            max_new_tokens: tokens,
            temperature: 0.0,
            sampling_top_k: 0,
            top_p: 1.0,
            seed: 0,
            hidden_layers: hidden,
            hidden_encoding: "f32le".into(),
            shard: "0/1".into(),
            harness_version: env!("CARGO_PKG_VERSION").into(),
            harness_commit: "bench".into(),
            created: shadowmoe_trace::schema::utc_now(),
        },
        resume: false,
        flush_bytes: 64 << 20,
        flush_every: 0,
    }
}
