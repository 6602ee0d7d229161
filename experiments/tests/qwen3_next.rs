//! The pipeline on qwen3_next (and deepseek_v3, glm4_moe, gpt_oss), unchanged: trace-collect, trace-stats, train-shadow and
//! bench-sweep (simulated and live) on the transformers-checked fixture, whose layers mix Gated
//! DeltaNet and gated attention, whose MoE layers carry a shared expert and skip a dense layer
//! (MoE layers 0, 1, 3) — in transformers' bf16 layout, and as mlx_lm.convert writes it in 4-bit
//! (the quantised experts go through the cache, the traces and the sweeps as they are).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use polars::prelude::*;
use shadowmoe_engine::{Checkpoint, LogitsFor, Phase, RecordingObserver};
use shadowmoe_experiments::collect::{CollectArgs, run as collect};
use shadowmoe_experiments::dataset;
use shadowmoe_experiments::sweep::{SweepArgs, run as sweep};
use shadowmoe_experiments::trace_stats::{StatsArgs, run as stats};
use shadowmoe_experiments::train_shadow::{ShadowArgs, run as train};
use shadowmoe_trace::Trace;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn sweep_args(argv: &[&str]) -> SweepArgs {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: SweepArgs,
    }
    let mut all = vec!["bench-sweep".to_string()];
    all.extend(argv.iter().map(|s| s.to_string()));
    Cli::try_parse_from(all).unwrap().args
}

fn results(dir: &Path) -> DataFrame {
    LazyFrame::scan_parquet(
        PlRefPath::new(dir.join("results.parquet").to_string_lossy().as_ref()),
        ScanArgsParquet::default(),
    )
    .unwrap()
    .collect()
    .unwrap()
}

#[test]
fn pipeline_runs_on_qwen3_next() {
    pipeline(
        &root().join("engine/tests/golden/qwen3_next"),
        "qwen3_next",
        &[0, 1, 3],
    );
}

#[test]
fn pipeline_runs_on_qwen3_next_mlx_4bit() {
    pipeline(
        &root().join("engine/tests/golden/mlx/qwen3_next-q4g64"),
        "qwen3_next",
        &[0, 1, 3],
    );
}

/// deepseek_v3 (latent attention, group-limited sigmoid routing with a selection bias, shared
/// expert, a dense first layer: MoE layers 1, 2, 3): the traces hold what its router chose,
/// and gate-lookahead at depth 0 — applying the family's own rule — reproduces it.
#[test]
fn pipeline_runs_on_deepseek_v3() {
    pipeline(
        &root().join("engine/tests/golden/deepseek_v3"),
        "deepseek_v3",
        &[1, 2, 3],
    );
}

/// glm4_moe (grouped-query attention with partial rotary and q/k norms over deepseek_v3's
/// router and a shared expert; a dense first layer: MoE layers 1, 2, 3) and glm4_moe_lite.
#[test]
fn pipeline_runs_on_glm4_moe() {
    pipeline(
        &root().join("engine/tests/golden/glm4_moe"),
        "glm4_moe",
        &[1, 2, 3],
    );
    // GLM-4.7-Flash's stack: latent attention, a dense layer between MoE layers 0 and 2.
    pipeline(
        &root().join("engine/tests/golden/glm4_moe_lite"),
        "glm4_moe_lite",
        &[0, 2],
    );
}

/// gpt_oss (attention sinks, alternating sliding and full attention, a biased router with a
/// softmax over its top k, experts with biases and the clamped SwiGLU), in bf16 and with the
/// hub's MXFP4 experts: experts read as stored and rearranged in their slots, packs holding
/// the biases; every layer MoE.
#[test]
fn pipeline_runs_on_gpt_oss() {
    for fixture in ["gpt_oss", "gpt_oss_mxfp4"] {
        pipeline(
            &root().join("engine/tests/golden").join(fixture),
            "gpt_oss",
            &[0, 1, 2, 3],
        );
    }
}

/// A GGUF file goes wherever a checkpoint directory goes: llama.cpp's Q8_0 file of the
/// qwen3_moe fixture (experts read from the file as stacked Q8_0 slices).
#[test]
fn pipeline_runs_on_a_gguf_file() {
    pipeline(
        &root().join("engine/tests/golden/gguf/qwen3_moe_gguf-q8_0.gguf"),
        "qwen3_moe",
        &[0, 1, 2, 3],
    );
    // gpt-oss as llama.cpp users hold it: MXFP4 experts stacked with their biases.
    pipeline(
        &root().join("engine/tests/golden/gguf/gpt_oss_mxfp4-q8_0.gguf"),
        "gpt_oss",
        &[0, 1, 2, 3],
    );
}

fn pipeline(model: &Path, arch: &str, moe_layers: &[usize]) {
    let model = || model.to_path_buf();
    let tmp = tempfile::tempdir().unwrap();
    let data = root().join("datasets/code.jsonl");

    // trace-collect: the routing of the first prompt's prefill is the engine's own pass.
    let trace_path = tmp.path().join("t.parquet");
    let a = CollectArgs {
        max_new_tokens: 16,
        limit: Some(12),
        threads: 2,
        flush_every: 4,
        hidden_layers: "all".into(),
        ..CollectArgs::new(model().display().to_string(), &data, &trace_path)
    };
    collect(&a, false).unwrap();
    let trace = Trace::open(&trace_path).unwrap();
    let m = trace.manifest.clone();
    assert_eq!(m.architecture, arch);
    assert_eq!(m.moe_layers, moe_layers);
    assert_eq!(m.hidden_layers, m.moe_layers);
    let reqs = trace.requests(None).unwrap();
    assert_eq!(reqs.len(), 12);
    let ckpt = Checkpoint::open(model().to_str().unwrap()).unwrap();
    let tok = ckpt.tokenizer().unwrap();
    let (prompts, _) = dataset::load(&data).unwrap();
    let ids = prompts[0].encode(&tok, true).unwrap();
    let engine = ckpt.load_model().unwrap();
    let mut obs = RecordingObserver::default();
    let mut cache = engine.new_cache();
    engine
        .forward(&ids, &mut cache, Phase::Prefill, LogitsFor::Last, &mut obs)
        .unwrap();
    let r0 = &reqs[0];
    assert_eq!(&r0.token_ids[..ids.len()], &ids[..]);
    assert!(r0.tokens() > ids.len(), "decode rows follow the prompt");
    for ev in &obs.events {
        let li = m.moe_layers.iter().position(|&l| l == ev.layer).unwrap();
        let got: Vec<u32> = r0.experts_at(ev.position, li).iter().map(|&e| e as u32).collect();
        assert_eq!(got, ev.experts, "layer {} token {}", ev.layer, ev.position);
    }

    // trace-stats: a table over the three MoE layers and a profile.
    let profile = tmp.path().join("profile.json");
    let text = stats(&StatsArgs {
        trace: trace_path.clone(),
        out: Some(tmp.path().join("stats")),
        profile: Some(profile.clone()),
        no_profile: false,
        pin_threshold: 0.5,
        batch: 4,
        by_domain: false,
    })
    .unwrap();
    assert!(tmp.path().join("stats/stats.json").is_file(), "{text}");
    // A --profile that cannot be written fails before the stats folder is written.
    let err = format!(
        "{:#}",
        stats(&StatsArgs {
            trace: trace_path.clone(),
            out: Some(tmp.path().join("stats2")),
            profile: Some(PathBuf::from("/proc/no-such-dir/profile.json")),
            no_profile: false,
            pin_threshold: 0.5,
            batch: 4,
            by_domain: false,
        })
        .unwrap_err()
    );
    assert!(err.starts_with("--profile: cannot"), "{err}");
    assert!(
        !tmp.path().join("stats2").exists(),
        "a stats folder was left behind"
    );
    let p: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&profile).unwrap()).unwrap();
    assert_eq!(p["layers"].as_object().unwrap().len(), moe_layers.len(), "{p}");

    // train-shadow: trains, and gate-lookahead at depth 0 reproduces the routing exactly.
    // (Depth 2 needs three MoE layers.)
    let depths = if moe_layers.len() > 2 { "1,2" } else { "1" };
    let shadow = tmp.path().join("shadow");
    let text = train(&ShadowArgs {
        traces: vec![trace_path.clone()],
        eval_traces: vec![],
        depth: depths.into(),
        top_k: 4,
        out: shadow.clone(),
        backend: "cpu".into(),
        model: Some(model().display().to_string()),
        loss: "softmax".into(),
        epochs: 2,
        batch: 64,
        lr: 1e-3,
        width: 32,
        patience: 2,
        seed: 0,
        val_share: 0.2,
        test_share: 0.2,
    })
    .unwrap();
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(shadow.join("report.json")).unwrap()).unwrap();
    assert_eq!(
        report["gate_lookahead_depth0_recall"].as_f64(),
        Some(1.0),
        "{text}"
    );
    assert!(shadow.join("predictor.json").is_file());

    // bench-sweep, simulated: every combination is a row; the shadow model drives prefetching.
    let sim_out = tmp.path().join("sim");
    let shadow_arg = format!("shadow:{}", shadow.display());
    let (t, mdl, po) = (
        trace_path.display().to_string(),
        model().display().to_string(),
        profile.display().to_string(),
    );
    let dir = sweep(
        &sweep_args(&[
            "--trace",
            &t,
            "--model",
            &mdl,
            "--profile",
            &po,
            "--out",
            sim_out.to_str().unwrap(),
            "--capacity",
            "4,8",
            "--prefetch-depth",
            "0,1",
            "--predictor",
            &format!("none,gate-lookahead,{shadow_arg}"),
            "--backend",
            "cpu",
        ]),
        false,
    )
    .unwrap();
    let df = results(&dir);
    assert_eq!(df.height(), 2 * 3, "{df}");
    let errors = df.column("error").unwrap().str().unwrap().clone();
    assert!(errors.iter().all(|e| e == Some("")), "{df}");
    // A depth the shadow model was not trained for is refused up front (before: no prefetch
    // at all, reported as "no gain").
    let untrained = if moe_layers.len() > 2 { "3" } else { "2" };
    let err = format!(
        "{:#}",
        sweep(
            &sweep_args(&[
                "--trace",
                &t,
                "--model",
                &mdl,
                "--out",
                tmp.path().join("sim3").to_str().unwrap(),
                "--capacity",
                "4",
                "--prefetch-depth",
                untrained,
                "--prefetch-span",
                "wrap",
                "--predictor",
                &shadow_arg,
                "--backend",
                "cpu",
            ]),
            false,
        )
        .unwrap_err()
    );
    assert!(
        err.contains(&format!("--prefetch-depth {untrained}"))
            && err.contains(&format!("trained for depths [{}]", depths.replace(',', ", "))),
        "{err}"
    );

    // bench-sweep, live: the engine itself over a bounded cache with experts read from disk.
    let live_out = tmp.path().join("live");
    let dir = sweep(
        &sweep_args(&[
            "--mode",
            "live",
            "--model",
            &mdl,
            "--dataset",
            data.to_str().unwrap(),
            "--limit",
            "2",
            "--max-new-tokens",
            "6",
            "--profile",
            &po,
            "--out",
            live_out.to_str().unwrap(),
            "--capacity",
            "4,8",
            "--prefetch-depth",
            "0,1",
            "--predictor",
            "none,previous-token",
            "--io",
            "pread",
            "--backend",
            "cpu",
        ]),
        false,
    )
    .unwrap();
    let df = results(&dir);
    assert_eq!(df.height(), 2 * 2, "{df}");
    let errors = df.column("error").unwrap().str().unwrap().clone();
    assert!(errors.iter().all(|e| e == Some("")), "{df}");
    // Every live row carries the read time its loads saw on the I/O workers.
    let p50 = df.column("read_ms_p50").unwrap().f64().unwrap().clone();
    let gbps = df.column("read_gbps").unwrap().f64().unwrap().clone();
    assert!(p50.iter().all(|v| v.is_some_and(|ms| ms > 0.0)), "{df}");
    assert!(gbps.iter().all(|v| v.is_some_and(|g| g > 0.0)), "{df}");
    let hits = df.column("hit_rate").unwrap().cast(&DataType::Float64).unwrap();
    assert!(
        hits.f64()
            .unwrap()
            .into_no_null_iter()
            .all(|h| (0.0..1.0).contains(&h)),
        "{df}"
    );
}
