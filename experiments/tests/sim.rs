//! The simulator on a real fixture trace: the invariants of the cache (LRU's stack property,
//! Belady's optimality, pinning with K = 0, oracle prefetching), and agreement with a live run
//! of the engine over the same prompts: the same cache code gives the same hits, loads,
//! evictions and bytes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use shadowmoe_engine::offload::cache::Budget;
use shadowmoe_engine::offload::{CacheOptions, ExpertKey, IoMode, MissMode, PolicyKind};
use shadowmoe_engine::predict::{Prefetch, PreviousToken};
use shadowmoe_engine::{Checkpoint, GenerateOptions, NoObserver, SamplingParams, generate};
use shadowmoe_experiments::collect::{CollectArgs, run as collect};
use shadowmoe_experiments::dataset;
use shadowmoe_experiments::sim::{IoModel, SimConfig, SimPredictor, simulate};
use shadowmoe_trace::Trace;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

const MODEL: &str = "engine/tests/golden/qwen3_moe";
const LIMIT: usize = 6;
const NEW: usize = 20;

fn trace(dir: &Path) -> PathBuf {
    let out = dir.join("t.parquet");
    let a = CollectArgs {
        max_new_tokens: NEW,
        limit: Some(LIMIT),
        threads: 2,
        flush_every: 8,
        ..CollectArgs::new(
            root().join(MODEL).display().to_string(),
            root().join("datasets/chat.jsonl"),
            out.clone(),
        )
    };
    collect(&a, false).unwrap();
    out
}

fn cfg(budget: Budget, policy: PolicyKind) -> SimConfig {
    SimConfig {
        budget,
        policy,
        pinned: vec![],
        on_miss: MissMode::Sync,
        prefetch_depth: 0,
        prefetch_k: 4,
        predictor: SimPredictor::None,
        io: IoModel {
            gbps: 1.0,
            latency_us: 50.0,
            threads: 2,
            expert_bytes: 12 << 20,
        },
        layer_secs: 1e-3,
        predictor_secs: 0.0,
    }
}

#[test]
fn invariants() {
    let tmp = tempfile::tempdir().unwrap();
    let t = Trace::open(&trace(tmp.path())).unwrap();
    let reqs = t.requests(None).unwrap();
    let m = &t.manifest;
    let e = m.num_experts;
    let mut last = 0.0;
    for cap in m.top_k..=e {
        let lru = simulate(&reqs, &m.moe_layers, &cfg(Budget::PerLayer(cap), PolicyKind::Lru)).unwrap();
        let h = lru.stats.hit_rate().unwrap();
        assert!(
            h >= last,
            "LRU hit rate fell from {last} to {h} at capacity {cap}"
        );
        last = h;
        let belady = simulate(
            &reqs,
            &m.moe_layers,
            &cfg(Budget::PerLayer(cap), PolicyKind::Belady),
        )
        .unwrap();
        for p in [PolicyKind::Lru, PolicyKind::Lfu, PolicyKind::Lcp] {
            let other = simulate(&reqs, &m.moe_layers, &cfg(Budget::PerLayer(cap), p)).unwrap();
            // Belady (MIN) minimises loads: every pass-expert miss counts once. Decode passes
            // have one token, so their hit rate follows; prefill hit rates weight an expert
            // by the prompt tokens that share it, which MIN does not optimise.
            assert!(
                belady.stats.demand_loads <= other.stats.demand_loads,
                "capacity {cap}: belady loads {} > {} {}",
                belady.stats.demand_loads,
                p.name(),
                other.stats.demand_loads
            );
            assert!(
                belady.stats.hit_rate_decode() >= other.stats.hit_rate_decode(),
                "capacity {cap}: belady decode {:?} < {} {:?}",
                belady.stats.hit_rate_decode(),
                p.name(),
                other.stats.hit_rate_decode()
            );
        }
        // Pinning with K = 0 is no pinning.
        let pinned0 = SimConfig {
            pinned: vec![],
            ..cfg(Budget::PerLayer(cap), PolicyKind::Lru)
        };
        let p0 = simulate(&reqs, &m.moe_layers, &pinned0).unwrap();
        assert_eq!(p0.stats, lru.stats);
    }
    assert!(last > 0.0);
    // Oracle prefetching with fast I/O never lowers the decode hit rate.
    let fast = IoModel {
        gbps: 1000.0,
        latency_us: 0.0,
        threads: 4,
        expert_bytes: 1 << 20,
    };
    for cap in [m.top_k + 2, 2 * m.top_k] {
        let base = SimConfig {
            io: fast,
            ..cfg(Budget::PerLayer(cap), PolicyKind::Lru)
        };
        let none = simulate(&reqs, &m.moe_layers, &base).unwrap();
        let oracle = SimConfig {
            prefetch_depth: 1,
            prefetch_k: m.top_k,
            predictor: SimPredictor::Oracle,
            ..base
        };
        let o = simulate(&reqs, &m.moe_layers, &oracle).unwrap();
        assert!(o.stats.prefetch_issued > 0);
        assert!(
            o.stats.hit_rate_decode() >= none.stats.hit_rate_decode(),
            "capacity {cap}: oracle {:?} < none {:?}",
            o.stats.hit_rate_decode(),
            none.stats.hit_rate_decode()
        );
    }
}

/// Live runs of the engine over the trace's prompts, with the bounded cache and sync misses,
/// against the simulator on the trace: equal hits, misses, loads, evictions and bytes. (With
/// prefetching or skip-on-miss, whether a load landed before the next layer is timing, and
/// timing decides which slots may be evicted: those runs are compared in the sweep, not here.)
#[test]
fn simulated_and_live_agree() {
    let tmp = tempfile::tempdir().unwrap();
    let t = Trace::open(&trace(tmp.path())).unwrap();
    let reqs = t.requests(None).unwrap();
    let m = t.manifest.clone();
    let ckpt = Checkpoint::open_dir(&root().join(MODEL)).unwrap();
    let tok = ckpt.tokenizer().unwrap();
    let (prompts, _) = dataset::load(&root().join("datasets/chat.jsonl")).unwrap();
    let pinned = vec![ExpertKey::new(m.moe_layers[0], 5)];
    for (budget, policy, on_miss, prefetch, pins) in [
        (
            Budget::PerLayer(m.top_k),
            PolicyKind::Lru,
            MissMode::Sync,
            false,
            vec![],
        ),
        (
            Budget::PerLayer(m.top_k + 3),
            PolicyKind::Lfu,
            MissMode::Sync,
            false,
            pinned.clone(),
        ),
        (
            Budget::Global(3 * m.top_k),
            PolicyKind::Lcp,
            MissMode::Sync,
            false,
            vec![],
        ),
    ] {
        let what = format!(
            "{budget:?} {} {on_miss:?} prefetch={prefetch} pins={}",
            policy.name(),
            pins.len()
        );
        let store = Arc::new(ckpt.expert_store(IoMode::Pread, None, false).unwrap());
        let opts = CacheOptions {
            budget,
            policy,
            on_miss,
            io_threads: 2,
            pinned: pins.clone(),
            settle_loads: false,
        };
        let (model, cached) = ckpt.load_model_cached(store.clone(), &opts).unwrap();
        if prefetch {
            model.set_prefetch(Some(Prefetch {
                predictor: Box::new(PreviousToken::default()),
                depth: 1,
                k: m.top_k,
            }));
        }
        for p in prompts.iter().take(LIMIT) {
            let ids = p.encode(&tok, true).unwrap();
            let g = GenerateOptions {
                max_new_tokens: NEW,
                sampling: SamplingParams::default(),
                eos_token_ids: ckpt.eos_token_ids(),
            };
            generate(&model, &ids, &g, &mut NoObserver, |_| Ok(())).unwrap();
        }
        cached.wait_idle().unwrap();
        let (live, io) = cached.stats();
        let sim_cfg = SimConfig {
            pinned: pins,
            on_miss,
            prefetch_depth: usize::from(prefetch),
            prefetch_k: m.top_k,
            predictor: if prefetch {
                SimPredictor::PreviousToken
            } else {
                SimPredictor::None
            },
            io: IoModel {
                gbps: 1.0,
                latency_us: 50.0,
                threads: 2,
                expert_bytes: store.expert_bytes(),
            },
            ..cfg(budget, policy)
        };
        let sim = simulate(&reqs, &m.moe_layers, &sim_cfg).unwrap();
        let s = &sim.stats;
        assert_eq!(s.activations_prefill, live.activations_prefill, "{what}");
        assert_eq!(s.activations_decode, live.activations_decode, "{what}");
        assert_eq!(s.prefetch_issued, live.prefetch_issued, "{what}: prefetches");
        assert_eq!(sim.bytes_read, io.bytes_read, "{what}: bytes");
        assert_eq!(s.demand_loads, live.demand_loads, "{what}: demand loads");
        assert_eq!(s.fallbacks, live.fallbacks, "{what}: fallbacks");
        if prefetch {
            // Whether a prefetch landed before its use is timing: compare what the cache held.
            assert_eq!(
                s.hits_decode + s.in_flight_activations,
                live.hits_decode + live.in_flight_activations,
                "{what}"
            );
        } else {
            assert_eq!(
                (s.hits_prefill, s.hits_decode),
                (live.hits_prefill, live.hits_decode),
                "{what}: hits"
            );
            assert_eq!(
                (s.cold_misses, s.capacity_misses),
                (live.cold_misses, live.capacity_misses),
                "{what}"
            );
            assert_eq!(s.evictions, live.evictions, "{what}: evictions");
        }
    }
}

/// `bench-sweep` end to end: every combination becomes one row of `results.parquet` (read back
/// with polars) and of `results.csv`; LRU's stack property holds across the capacities; bad
/// flags get one-line errors.
#[test]
fn sweep_writes_every_combination() {
    use clap::Parser;
    use polars::prelude::*;
    use shadowmoe_experiments::sweep::{SweepArgs, run};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: SweepArgs,
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = trace(tmp.path());
    let out = tmp.path().join("sweep");
    let parse = |extra: &[&str]| {
        let mut argv = vec![
            "bench-sweep".to_string(),
            "--trace".into(),
            t.display().to_string(),
            "--model".into(),
            root().join(MODEL).display().to_string(),
            "--out".into(),
            out.display().to_string(),
        ];
        argv.extend(extra.iter().map(|s| s.to_string()));
        Cli::try_parse_from(argv).unwrap().args
    };
    let a = parse(&[
        "--capacity",
        "4..8:2",
        "--prefetch-depth",
        "0,1",
        "--predictor",
        "none,previous-token,gate-lookahead",
        "--backend",
        "cpu",
    ]);
    let dir = run(&a, false).unwrap();
    // 3 capacities × (none at depth 0 + 2 predictors at depth 1).
    let df = LazyFrame::scan_parquet(
        PlRefPath::new(dir.join("results.parquet").to_string_lossy().as_ref()),
        ScanArgsParquet::default(),
    )
    .unwrap()
    .collect()
    .unwrap();
    assert_eq!(df.height(), 9, "{df}");
    for c in ["harness_version", "model_id", "config_sha256", "trace", "error"] {
        let col = df.column(c).unwrap().str().unwrap().clone();
        assert!(col.iter().all(|v| v.is_some()), "{c}: every row names the run");
    }
    assert_eq!(
        df.column("trace").unwrap().str().unwrap().get(0),
        Some(t.display().to_string().as_str())
    );
    let csv = std::fs::read_to_string(dir.join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 9);
    // The sweep draws the figures its rows feed.
    for f in [
        "fig1_hit_rate_vs_capacity",
        "fig2_prefetch_depth",
        "fig6_time_per_token",
    ] {
        assert!(dir.join("figures").join(format!("{f}.png")).is_file(), "{f}");
    }
    let col = |n: &str| -> Vec<f64> {
        df.column(n)
            .unwrap()
            .cast(&DataType::Float64)
            .unwrap()
            .f64()
            .unwrap()
            .into_no_null_iter()
            .collect()
    };
    let (cap, hit, pred) = (
        col("capacity"),
        col("hit_rate"),
        df.column("predictor").unwrap().clone(),
    );
    assert!(hit.iter().all(|h| (0.0..=1.0).contains(h)), "{df}");
    let none: Vec<(f64, f64)> = (0..df.height())
        .filter(|&i| pred.str().unwrap().get(i) == Some("none"))
        .map(|i| (cap[i], hit[i]))
        .collect();
    assert_eq!(none.len(), 3);
    for w in none.windows(2) {
        assert!(
            w[0].0 < w[1].0 && w[0].1 <= w[1].1,
            "LRU stack property: {none:?}"
        );
    }

    let err = run(&parse(&["--capacity", "4", "--backend", "tpu"]), false)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("--backend: unknown backend `tpu`"), "{err}");
    let err = format!("{:#}", run(&parse(&["--capacity", "9999"]), false).unwrap_err());
    assert!(err.contains("--capacity"), "{err}");
}

fn sweep_cli(argv: &[String]) -> shadowmoe_experiments::sweep::SweepArgs {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: shadowmoe_experiments::sweep::SweepArgs,
    }
    let mut all = vec!["bench-sweep".to_string()];
    all.extend(argv.iter().cloned());
    Cli::try_parse_from(all).unwrap().args
}

fn read_results(dir: &Path) -> polars::prelude::DataFrame {
    use polars::prelude::*;
    LazyFrame::scan_parquet(
        PlRefPath::new(dir.join("results.parquet").to_string_lossy().as_ref()),
        ScanArgsParquet::default(),
    )
    .unwrap()
    .collect()
    .unwrap()
}

/// `bench-sweep --mode live`: one row per configuration and repetition, measured by the engine;
/// skip-on-miss rows carry quality figures that show experts were dropped; the quality pass
/// itself is exact when nothing is dropped (a sync run agrees with the exact model at every
/// position); configurations that need the future are refused before any work.
#[test]
fn live_sweep_measures_and_scores_quality() {
    use polars::prelude::*;
    use shadowmoe_experiments::live::{LiveConfig, LiveSetup};
    use shadowmoe_experiments::sweep::run;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("live");
    let model = root().join(MODEL).display().to_string();
    let base = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "--mode",
            "live",
            "--model",
            &model,
            "--dataset",
            root().join("datasets/chat.jsonl").to_str().unwrap(),
            "--limit",
            "2",
            "--max-new-tokens",
            "6",
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let a = sweep_cli(&base(&[
        "--capacity",
        "4,8",
        "--on-miss",
        "sync,skip",
        "--prefetch-depth",
        "0,1",
        "--predictor",
        "none,previous-token",
        "--repeat",
        "2",
    ]));
    let dir = run(&a, false).unwrap();
    let df = read_results(&dir);
    // 2 capacities × 2 predictor/depth pairs × 2 miss modes × 2 repetitions.
    assert_eq!(df.height(), 16, "{df}");
    let f = |n: &str| -> Vec<Option<f64>> {
        df.column(n)
            .unwrap()
            .cast(&DataType::Float64)
            .unwrap()
            .f64()
            .unwrap()
            .iter()
            .collect()
    };
    let miss = df.column("on_miss").unwrap().str().unwrap().clone();
    let err = df.column("error").unwrap().str().unwrap().clone();
    let (top1, kl, ppl, fb, tok, rss) = (
        f("top1_agreement"),
        f("kl_divergence"),
        f("perplexity"),
        f("fallback_rate"),
        f("decode_tok_s"),
        f("peak_rss_bytes"),
    );
    for i in 0..df.height() {
        assert_eq!(err.get(i), Some(""), "row {i}: {df}");
        assert!(tok[i].unwrap() > 0.0 && rss[i].unwrap() > 0.0, "row {i}");
        if miss.get(i) == Some("skip") {
            assert!(fb[i].unwrap() > 0.0, "row {i}: skip dropped nothing");
            assert!((0.0..=1.0).contains(&top1[i].unwrap()), "row {i}");
            assert!(
                kl[i].unwrap() > 0.0,
                "row {i}: dropping experts left every distribution unchanged"
            );
            assert!(ppl[i].unwrap().is_finite(), "row {i}");
        } else {
            assert_eq!(fb[i], Some(0.0), "row {i}");
            assert_eq!(top1[i], None, "row {i}: quality is measured under skip only");
        }
    }

    // The quality pass against a run that drops nothing: exact at every position.
    let ckpt = shadowmoe_engine::Checkpoint::open(&model).unwrap();
    let tok = ckpt.tokenizer().unwrap();
    let (prompts, _) = dataset::load(&root().join("datasets/chat.jsonl")).unwrap();
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .take(2)
        .map(|p| p.encode(&tok, true).unwrap())
        .collect();
    let setup = LiveSetup::new(ckpt, ids, 4, 2, shadowmoe_predictor::BackendChoice::Cpu, None).unwrap();
    let r = setup
        .run(&LiveConfig {
            capacity: 4,
            policy: PolicyKind::Lru,
            pinned: vec![],
            on_miss: MissMode::Sync,
            prefetch_depth: 0,
            prefetch_k: 4,
            predictor: "none".into(),
            quality: true,
        })
        .unwrap();
    let q = r.quality.unwrap();
    assert!(q.positions > 10);
    assert_eq!(q.top1_agreement, 1.0, "{q:?}");
    assert!(q.kl_divergence.abs() < 1e-6, "{q:?}");
    assert!(
        (q.perplexity - q.perplexity_exact).abs() < 1e-6 * q.perplexity_exact,
        "{q:?}"
    );

    for (extra, want) in [
        (&["--capacity", "4", "--policy", "belady"][..], "--policy belady"),
        (
            &[
                "--capacity",
                "4",
                "--prefetch-depth",
                "1",
                "--predictor",
                "oracle",
            ][..],
            "--predictor oracle",
        ),
        (&["--capacity", "4", "--repeat", "0"][..], "--repeat"),
        (&["--capacity", "9999"][..], "--capacity"),
    ] {
        let e = format!("{:#}", run(&sweep_cli(&base(extra)), false).unwrap_err());
        assert!(e.contains(want), "{extra:?}: {e}");
    }
}

/// Sharded sweeps: the union of the shards' rows is the unsharded sweep; a trace from another
/// model than --model and an unwritable --out are refused before any work.
#[test]
fn shards_union_to_the_whole_sweep_and_bad_inputs_are_refused() {
    use shadowmoe_experiments::sweep::run;
    let tmp = tempfile::tempdir().unwrap();
    let t = trace(tmp.path());
    let model = root().join(MODEL).display().to_string();
    let args = |out: &Path, extra: &[&str]| {
        let mut v: Vec<String> = vec![
            "--trace".into(),
            t.display().to_string(),
            "--model".into(),
            model.clone(),
            "--capacity".into(),
            "4..8:2".into(),
            "--policy".into(),
            "lru,lfu,belady".into(),
            "--pinning".into(),
            "off".into(),
            "--out".into(),
            out.display().to_string(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        sweep_cli(&v)
    };
    let key_rows = |dir: &Path| -> Vec<String> {
        let csv = std::fs::read_to_string(dir.join("results.csv")).unwrap();
        let mut rows: Vec<String> = csv.lines().skip(1).map(str::to_string).collect();
        rows.sort();
        rows
    };
    let whole = key_rows(&run(&args(&tmp.path().join("whole"), &[]), false).unwrap());
    assert_eq!(whole.len(), 9);
    let mut union = Vec::new();
    for i in 0..3 {
        let shard = format!("{i}/3");
        let dir = run(
            &args(&tmp.path().join(format!("s{i}")), &["--shard", &shard]),
            false,
        )
        .unwrap();
        union.extend(key_rows(&dir));
    }
    union.sort();
    assert_eq!(union, whole);

    // A trace of another model: the reference model's config differs from the fixture's.
    let mut other = args(&tmp.path().join("x"), &[]);
    other.model = Some(root().join("models/reference/checkpoint").display().to_string());
    let e = format!("{:#}", run(&other, false).unwrap_err());
    assert!(e.contains("another model"), "{e}");
    // An output folder that cannot be created (a file stands in its path).
    let blocker = tmp.path().join("file");
    std::fs::write(&blocker, b"").unwrap();
    let e = format!("{:#}", run(&args(&blocker.join("out"), &[]), false).unwrap_err());
    assert!(e.starts_with("--out"), "{e}");
}
