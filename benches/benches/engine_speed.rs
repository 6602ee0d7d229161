//! Engine speed on a real checkpoint, side by side with llama.cpp on the same weights: decode
//! (tg) and prefill (pp) tok/s at 1 thread and at one per core, alternating the two engines
//! repeat by repeat, with the weight bytes each decode token streams and the GB/s that makes,
//! next to the machine's memory-read bandwidth measured in the same run.
//!
//!     SHADOWMOE_BENCH_MODEL=DIR [SHADOWMOE_LLAMA_BENCH=llama-bench SHADOWMOE_LLAMA_GGUF=F.gguf] \
//!         cargo bench -p shadowmoe-benches --bench engine_speed
//!
//! `benches/llama_cpp_compare.sh` builds llama.cpp, converts the checkpoint and runs this.
//! Environment: `SHADOWMOE_BENCH_PP` (prompt tokens, 128), `SHADOWMOE_BENCH_TG` (decode tokens,
//! 64), `SHADOWMOE_BENCH_REPEAT` (3).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Instant;

use shadowmoe_benches::{env_or, memory_read_gbs};
use shadowmoe_engine::kernels::Simd;
use shadowmoe_engine::sampling::argmax;
use shadowmoe_engine::{Checkpoint, LogitsFor, Model, NoObserver, Phase};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
}

/// (prefill tok/s for `pp` tokens, decode tok/s for `tg` tokens after a 1-token prompt), as
/// llama-bench measures them.
fn ours(model: &Model, pp: usize, tg: usize, seed: u32) -> (f64, f64) {
    let vocab = model.config.vocab_size as u32;
    let prompt: Vec<u32> = (0..pp as u32)
        .map(|i| (i * 977 + seed * 131 + 7) % vocab)
        .collect();
    let mut kv = model.new_cache();
    let t = Instant::now();
    model
        .forward(&prompt, &mut kv, Phase::Prefill, LogitsFor::Last, &mut NoObserver)
        .unwrap();
    let prefill = pp as f64 / t.elapsed().as_secs_f64();
    let mut kv = model.new_cache();
    let logits = model
        .forward(
            &prompt[..1],
            &mut kv,
            Phase::Prefill,
            LogitsFor::Last,
            &mut NoObserver,
        )
        .unwrap();
    let mut next = argmax(&Model::last_row(&logits));
    let t = Instant::now();
    for _ in 0..tg {
        let logits = model
            .forward(&[next], &mut kv, Phase::Decode, LogitsFor::Last, &mut NoObserver)
            .unwrap();
        next = argmax(&Model::last_row(&logits));
    }
    (prefill, tg as f64 / t.elapsed().as_secs_f64())
}

/// llama-bench's (pp, tg) tok/s at `threads`.
fn llama(bench: &str, gguf: &str, threads: usize, pp: usize, tg: usize) -> (f64, f64) {
    let out = Command::new(bench)
        .args([
            "-m",
            gguf,
            "-t",
            &threads.to_string(),
            "-p",
            &pp.to_string(),
            "-n",
            &tg.to_string(),
        ])
        .args(["-r", "1", "-o", "json"])
        .output()
        .expect("running llama-bench");
    assert!(
        out.status.success(),
        "llama-bench: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("llama-bench JSON");
    let mut pp_rate = f64::NAN;
    let mut tg_rate = f64::NAN;
    for r in v.as_array().into_iter().flatten() {
        let rate = r["avg_ts"].as_f64().unwrap_or(f64::NAN);
        if r["n_prompt"].as_u64().unwrap_or(0) > 0 {
            pp_rate = rate;
        } else {
            tg_rate = rate;
        }
    }
    (pp_rate, tg_rate)
}

/// Bytes of weights one decode token reads: every non-expert weight but the embedding (one row
/// of it), and top-k experts per MoE layer.
fn bytes_per_token(ckpt: &Checkpoint) -> f64 {
    let c = &ckpt.config;
    let store = ckpt
        .expert_store(shadowmoe_engine::offload::IoMode::Pread, None, false)
        .unwrap();
    let experts = (c.moe_layers().len() * c.num_experts) as u64 * store.expert_bytes();
    let embed = ckpt
        .weights
        .entry("model.embed_tokens.weight")
        .map_or(0, |e| e.dtype.nbytes(&e.shape) as u64);
    let embed = if c.tie_word_embeddings { 0 } else { embed };
    let non_expert = ckpt.weights.total_bytes() - experts - embed;
    (non_expert + (c.moe_layers().len() * c.num_experts_per_tok) as u64 * store.expert_bytes()) as f64
}

fn main() {
    let Ok(dir) = std::env::var("SHADOWMOE_BENCH_MODEL") else {
        println!("engine_speed: set SHADOWMOE_BENCH_MODEL=DIR (see benches/llama_cpp_compare.sh); skipped");
        return;
    };
    let pp = env_or("SHADOWMOE_BENCH_PP", 128);
    let tg = env_or("SHADOWMOE_BENCH_TG", 64);
    let repeat = env_or("SHADOWMOE_BENCH_REPEAT", 3);
    let bench = std::env::var("SHADOWMOE_LLAMA_BENCH").ok();
    let gguf = std::env::var("SHADOWMOE_LLAMA_GGUF").ok();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let model = ckpt.load_model().unwrap();
    let bpt = bytes_per_token(&ckpt);
    let c = &ckpt.config;
    println!(
        "{dir}: hidden {}, {} experts x width {}, top-{}, {} layers; {:.1} MB of weights per decode token",
        c.hidden_size,
        c.num_experts,
        c.moe_intermediate_size,
        c.num_experts_per_tok,
        c.num_hidden_layers,
        bpt / 1e6
    );
    // Every weight once, so that the page cache serves both engines.
    for i in 0..64 {
        let _ = ours(&model, 1, 1, i);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut threads = vec![1];
    if cores > 1 {
        threads.push(cores);
    }
    // The kernel's best instructions and, where those are AVX-512, the AVX2 kernel beside them.
    let best = Simd::supported();
    let avx2 = (best == Simd::Avx512).then_some(Simd::Avx2);
    println!();
    println!(
        "tile kernel: {best:?}{}",
        if avx2.is_some() {
            " (AVX2 column: the same engine on its AVX2 kernel)"
        } else {
            ""
        }
    );
    println!();
    println!(
        "| threads | decode tok/s llama.cpp | shadowmoe | ratio | AVX2 | prefill tok/s llama.cpp | shadowmoe | ratio | AVX2 | decode GB/s llama.cpp / shadowmoe | memory read GB/s | shadowmoe share |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &t in &threads {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap();
        let (mut o_pp, mut o_tg, mut l_pp, mut l_tg) = (vec![], vec![], vec![], vec![]);
        let (mut a_pp, mut a_tg) = (vec![], vec![]);
        for r in 0..repeat {
            best.set();
            let (a, b) = pool.install(|| ours(&model, pp, tg, r as u32));
            o_pp.push(a);
            o_tg.push(b);
            if let Some(lesser) = avx2 {
                lesser.set();
                let (a, b) = pool.install(|| ours(&model, pp, tg, r as u32));
                best.set();
                a_pp.push(a);
                a_tg.push(b);
            }
            if let (Some(bench), Some(gguf)) = (&bench, &gguf) {
                let (a, b) = llama(bench, gguf, t, pp, tg);
                l_pp.push(a);
                l_tg.push(b);
            }
        }
        let mem = pool.install(memory_read_gbs);
        let (otg, opp, ltg, lpp) = (median(o_tg), median(o_pp), median(l_tg), median(l_pp));
        let (atg, app) = (median(a_tg), median(a_pp));
        println!(
            "| {t} | {ltg:.1} | {otg:.1} | {:.2} | {atg:.1} | {lpp:.1} | {opp:.1} | {:.2} | {app:.1} | {:.1} / {:.1} | {mem:.1} | {:.0}% |",
            otg / ltg,
            opp / lpp,
            ltg * bpt / 1e9,
            otg * bpt / 1e9,
            100.0 * otg * bpt / 1e9 / mem
        );
    }
}
