//! Simulator throughput: activations replayed per second on one core, for the configurations a
//! sweep runs (LRU at two capacities, Belady, prefetching with previous-token and the oracle),
//! next to a plain pass over the same routing (reading every activation once) measured in the
//! same run. Goal: ≥ 10 million activations per second per core.
//!
//!     cargo bench --workspace --bench sim_throughput
//!
//! The trace is collected at bench time from the reference model (`SHADOWMOE_MODEL` to choose
//! another) on the held-out prompts; `SHADOWMOE_SIM_COPIES` (default 20) replays it that many
//! times back to back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Instant;

use shadowmoe_engine::offload::cache::Budget;
use shadowmoe_engine::offload::{MissMode, PolicyKind};
use shadowmoe_engine::predict::{PredictorTiming, PrefetchSpan};
use shadowmoe_experiments::collect::{CollectArgs, run as collect};
use shadowmoe_experiments::sim::{IoModel, SimConfig, SimPredictor, simulate};
use shadowmoe_trace::Trace;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = std::env::var_os("SHADOWMOE_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("models/reference/checkpoint"));
    let copies: usize = std::env::var("SHADOWMOE_SIM_COPIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("t.parquet");
    collect(
        &CollectArgs {
            max_new_tokens: 32,
            no_chat_template: true,
            limit: Some(12),
            threads: 2,
            flush_every: 64,
            ..CollectArgs::new(
                model.display().to_string(),
                root.join("datasets/heldout.jsonl"),
                path.clone(),
            )
        },
        false,
    )
    .unwrap();
    let trace = Trace::open(&path).unwrap();
    let m = trace.manifest.clone();
    let one = trace.requests(None).unwrap();
    let mut reqs = Vec::new();
    for c in 0..copies {
        for r in &one {
            let mut r = r.clone();
            r.request += (c * one.len()) as u32;
            reqs.push(r);
        }
    }
    let activations: usize = reqs.iter().map(|r| r.experts.len()).sum();
    let e = m.num_experts;
    println!(
        "simulator throughput: {} ({} MoE layers, {e} experts, top-{}), {} requests, {} activations, one thread",
        model.display(),
        m.moe_layers.len(),
        m.top_k,
        reqs.len(),
        activations
    );

    // Baseline: one pass reading every activation (a histogram of experts).
    let t = Instant::now();
    let mut hist = vec![0u64; e];
    for r in &reqs {
        for &x in &r.experts {
            hist[x as usize] += 1;
        }
    }
    let base = t.elapsed().as_secs_f64();
    assert_eq!(hist.iter().sum::<u64>() as usize, activations);

    let cfg = |cap: usize, policy: PolicyKind, depth: usize, predictor: SimPredictor| SimConfig {
        budget: Budget::PerLayer(cap.min(e)),
        policy,
        pinned: vec![],
        on_miss: MissMode::Sync,
        prefetch_depth: depth,
        prefetch_k: m.top_k,
        prefetch_span: PrefetchSpan::Target,
        predictor,
        timing: PredictorTiming::Inline,
        io: IoModel::independent(1.0, 100.0, 4, 1_769_472),
        layer_secs: 5e-4,
        predictor_secs: 0.0,
        settle_loads: false,
        compute_threads: 1,
    };
    let (small, large) = (e * 5 / 16, e / 2);
    let runs = [
        (
            format!("lru, capacity {small}"),
            cfg(small, PolicyKind::Lru, 0, SimPredictor::None),
        ),
        (
            format!("lru, capacity {large}"),
            cfg(large, PolicyKind::Lru, 0, SimPredictor::None),
        ),
        (
            format!("lcp, capacity {large}"),
            cfg(large, PolicyKind::Lcp, 0, SimPredictor::None),
        ),
        (
            format!("belady, capacity {large}"),
            cfg(large, PolicyKind::Belady, 0, SimPredictor::None),
        ),
        (
            format!("lru {large}, previous-token depth 4"),
            cfg(large, PolicyKind::Lru, 4, SimPredictor::PreviousToken),
        ),
        (
            format!("lru {large}, oracle depth 4"),
            cfg(large, PolicyKind::Lru, 4, SimPredictor::Oracle),
        ),
    ];
    println!();
    println!("| configuration | seconds | M activations/s | vs one plain pass |");
    println!("|---|---:|---:|---:|");
    println!(
        "| plain pass (histogram) | {base:.4} | {:.1} | 1 |",
        activations as f64 / base / 1e6
    );
    for (name, c) in runs {
        let t = Instant::now();
        let r = simulate(&reqs, &m.moe_layers, &c).unwrap();
        let s = t.elapsed().as_secs_f64();
        assert_eq!(r.stats.activations() as usize, activations);
        println!(
            "| {name} | {s:.3} | {:.2} | {:.0}× slower |",
            activations as f64 / s / 1e6,
            s / base
        );
    }
}
