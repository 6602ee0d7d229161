//! The simulator on a real fixture trace: the invariants of the cache (LRU's stack property,
//! Belady's optimality, pinning with K = 0, oracle prefetching), and agreement with a live run
//! of the engine over the same prompts: the same cache code gives the same hits, loads,
//! evictions and bytes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use shadowmoe_engine::offload::cache::Budget;
use shadowmoe_engine::offload::profile::{LayerProfile, Profile};
use shadowmoe_engine::offload::{CacheOptions, ExpertKey, IoMode, MissMode, PolicyKind};
use shadowmoe_engine::predict::{
    ExpertPredictor, GateLookahead, LayerView, PredictorTiming, Prefetch, PrefetchSpan, PreviousToken,
};
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
    trace_of(MODEL, dir)
}

fn trace_of(model: &str, dir: &Path) -> PathBuf {
    let out = dir.join("t.parquet");
    let a = CollectArgs {
        max_new_tokens: NEW,
        limit: Some(LIMIT),
        threads: 2,
        flush_every: 8,
        hidden_layers: "all".into(),
        ..CollectArgs::new(
            root().join(model).display().to_string(),
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
        prefetch_span: PrefetchSpan::Target,
        predictor: SimPredictor::None,
        timing: PredictorTiming::Inline,
        io: IoModel::independent(1.0, 50.0, 2, 12 << 20),
        layer_secs: 1e-3,
        predictor_secs: 0.0,
        settle_loads: false,
        compute_threads: 1,
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
        // Pinning a profile's top K = 0 is no pinning; its top 2 is not.
        let profile = profile_of(&reqs, m);
        let pins = |k: usize| profile.top_k(Path::new("p.json"), &m.moe_layers, e, k).unwrap();
        assert!(pins(0).is_empty());
        let p0 = simulate(
            &reqs,
            &m.moe_layers,
            &SimConfig {
                pinned: pins(0),
                ..cfg(Budget::PerLayer(cap), PolicyKind::Lru)
            },
        )
        .unwrap();
        assert_eq!(p0.stats, lru.stats);
        if cap > 3 && cap < e {
            let p2 = simulate(
                &reqs,
                &m.moe_layers,
                &SimConfig {
                    pinned: pins(2),
                    ..cfg(Budget::PerLayer(cap), PolicyKind::Lru)
                },
            )
            .unwrap();
            assert_ne!(p2.stats, lru.stats, "capacity {cap}: pinning 2 changed nothing");
        }
    }
    assert!(last > 0.0);
    // Oracle prefetching with fast I/O never lowers the decode hit rate.
    let fast = IoModel::independent(1000.0, 0.0, 4, 1 << 20);
    for cap in [m.top_k + 2, 2 * m.top_k] {
        let base = SimConfig {
            io: fast.clone(),
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

/// A profile of the trace's own routing (the pinning tests' input).
/// With more than one compute thread a layer's experts compute while later ones load (the
/// engine's parallel experts): the same cache events, less time, and never more saved than the
/// serial run stalled.
#[test]
fn expert_compute_overlaps_loads_with_threads() {
    let tmp = tempfile::tempdir().unwrap();
    let t = Trace::open(&trace(tmp.path())).unwrap();
    let reqs = t.requests(None).unwrap();
    let m = &t.manifest;
    let serial_cfg = cfg(Budget::PerLayer(m.top_k + 2), PolicyKind::Lru);
    let serial = simulate(&reqs, &m.moe_layers, &serial_cfg).unwrap();
    let overlap = simulate(
        &reqs,
        &m.moe_layers,
        &SimConfig {
            compute_threads: 2,
            ..serial_cfg.clone()
        },
    )
    .unwrap();
    assert_eq!(overlap.stats, serial.stats);
    assert_eq!(overlap.bytes_read, serial.bytes_read);
    let saved = serial.total_secs - overlap.total_secs;
    assert!(
        saved > 0.0,
        "overlap saved nothing: {} vs {}",
        overlap.total_secs,
        serial.total_secs
    );
    assert!(
        saved <= serial.stall_secs + 1e-9,
        "saved {saved} s, more than the {} s stalled",
        serial.stall_secs
    );
}

fn profile_of(reqs: &[shadowmoe_trace::RequestRouting], m: &shadowmoe_trace::Manifest) -> Profile {
    let mut layers = std::collections::BTreeMap::new();
    for (li, &l) in m.moe_layers.iter().enumerate() {
        let mut a = vec![0u64; m.num_experts];
        for r in reqs {
            for t in 0..r.tokens() {
                for &e in r.experts_at(t, li) {
                    a[e as usize] += 1;
                }
            }
        }
        layers.insert(
            l.to_string(),
            LayerProfile {
                activations: a,
                prompt_coverage: vec![],
            },
        );
    }
    Profile {
        format: shadowmoe_engine::offload::profile::PROFILE_FORMAT.into(),
        model_id: m.model_id.clone(),
        config_sha256: m.config_sha256.clone(),
        dataset: String::new(),
        dataset_sha256: String::new(),
        layers,
        pinned: Default::default(),
        pin_threshold: None,
    }
}

/// gate-lookahead's predictions from the trace's stored router inputs, as the sweep makes them.
fn gate_lookahead_predictions(
    t: &Trace,
    ckpt: &Checkpoint,
    depth: usize,
    span: PrefetchSpan,
    k: usize,
) -> SimPredictor {
    let m = &t.manifest;
    let n = m.moe_layers.len();
    let mut gl = GateLookahead::new(ckpt.load_model().unwrap().routers());
    let mut map = std::collections::HashMap::new();
    for (li, &layer) in m.moe_layers.iter().enumerate() {
        let rows = t.hidden(layer, None).unwrap();
        let h = rows.hidden_size;
        for i in 0..rows.request.len() {
            let view = LayerView {
                layer,
                hidden: &rows.values[i * h..(i + 1) * h],
                experts: &[],
            };
            for (ord, _) in shadowmoe_engine::predict::prefetch_targets(li, n, depth, span) {
                let p = gl.predict(&view, m.moe_layers[ord], k).unwrap();
                map.insert(
                    (rows.request[i], rows.token[i], li as u16, ord as u16),
                    p.into_iter().map(|e| e as u16).collect(),
                );
            }
        }
    }
    SimPredictor::Precomputed(map)
}

/// Live runs of the engine over the trace's prompts, with the bounded cache, against the
/// simulator on the trace. With sync misses and no prefetching the two agree on every count
/// whatever the timing. With prefetching, timing decides whether a prefetch lands before its
/// use; made deterministic (the predictor inline, every load landed before a layer looks up its
/// experts: `settle_loads`), the event order is the same, and so is every count: hits, misses,
/// loads, evictions, prefetches issued, used and wasted, bytes.
#[test]
fn simulated_and_live_agree() {
    agree(MODEL);
}

/// The same agreement on qwen3_next (linear-attention layers, a shared expert, a dense layer
/// between MoE layers).
#[test]
fn simulated_and_live_agree_on_qwen3_next() {
    agree("engine/tests/golden/qwen3_next");
}

fn agree(model_dir: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let t = Trace::open(&trace_of(model_dir, tmp.path())).unwrap();
    let reqs = t.requests(None).unwrap();
    let m = t.manifest.clone();
    let ckpt = Checkpoint::open_dir(&root().join(model_dir)).unwrap();
    let tok = ckpt.tokenizer().unwrap();
    let (prompts, _) = dataset::load(&root().join("datasets/chat.jsonl")).unwrap();
    let pinned = vec![ExpertKey::new(m.moe_layers[0], 5)];
    let k = m.top_k;
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum P {
        None,
        Prev,
        Gate,
    }
    let cases = [
        (
            Budget::PerLayer(k),
            PolicyKind::Lru,
            P::None,
            0,
            PrefetchSpan::Target,
            vec![],
        ),
        (
            Budget::PerLayer(k + 3),
            PolicyKind::Lfu,
            P::None,
            0,
            PrefetchSpan::Target,
            pinned.clone(),
        ),
        (
            Budget::Global(3 * k),
            PolicyKind::Lcp,
            P::None,
            0,
            PrefetchSpan::Target,
            vec![],
        ),
        (
            Budget::PerLayer(k + 2),
            PolicyKind::Lru,
            P::Prev,
            1,
            PrefetchSpan::Target,
            vec![],
        ),
        (
            Budget::PerLayer(k + 2),
            PolicyKind::Lru,
            P::Prev,
            2,
            PrefetchSpan::Wrap,
            vec![],
        ),
        (
            Budget::PerLayer(k + 3),
            PolicyKind::Lfu,
            P::Gate,
            2,
            PrefetchSpan::All,
            pinned.clone(),
        ),
        (
            Budget::Global(3 * k),
            PolicyKind::Lru,
            P::Gate,
            2,
            PrefetchSpan::Wrap,
            vec![],
        ),
    ];
    for (budget, policy, pred, depth, span, pins) in cases {
        let prefetch = pred != P::None;
        let what = format!(
            "{budget:?} {} {pred:?} depth {depth} {} pins={}",
            policy.name(),
            span.name(),
            pins.len()
        );
        let store = Arc::new(ckpt.expert_store(IoMode::Pread, None, false).unwrap());
        let opts = CacheOptions {
            budget,
            policy,
            on_miss: MissMode::Sync,
            io_threads: 2,
            pinned: pins.clone(),
            settle_loads: prefetch,
            prefetch_readers: 0,
        };
        let (model, cached) = ckpt.load_model_cached(store.clone(), &opts).unwrap();
        if prefetch {
            let predictor: Box<dyn ExpertPredictor> = match pred {
                P::Gate => Box::new(GateLookahead::new(model.routers())),
                _ => Box::new(PreviousToken::default()),
            };
            model.set_prefetch(Some(Prefetch {
                predictor,
                depth,
                k,
                span,
                timing: PredictorTiming::Inline,
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
        let ps = model.prefetch_stats();
        cached.wait_idle().unwrap();
        let (live, io) = cached.stats();
        let sim_cfg = SimConfig {
            pinned: pins,
            prefetch_depth: depth,
            prefetch_k: k,
            prefetch_span: span,
            predictor: match pred {
                P::None => SimPredictor::None,
                P::Prev => SimPredictor::PreviousToken,
                P::Gate => gate_lookahead_predictions(&t, &ckpt, depth, span, k),
            },
            // A slow modelled disk (12 MiB experts: 12 ms a read, 1 ms a layer), so that
            // without settling the simulator's prefetches would land late.
            io: IoModel::independent(1.0, 50.0, 2, 12 << 20),
            settle_loads: prefetch,
            ..cfg(budget, policy)
        };
        let sim = simulate(&reqs, &m.moe_layers, &sim_cfg).unwrap();
        assert_eq!(sim.stats, live, "{what}: cache counters");
        assert_eq!(
            sim.bytes_read / (12 << 20),
            io.bytes_read / store.expert_bytes(),
            "{what}: experts read"
        );
        if prefetch {
            let ps = ps.unwrap();
            assert!(
                live.prefetch_issued > 0 && live.prefetch_used > 0,
                "{what}: {live:?}"
            );
            assert_eq!(
                (sim.predict.calls, sim.predict.predictions, sim.predict.issued),
                (ps.calls, ps.predictions, ps.issued),
                "{what}: predictor counters"
            );
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

    // A folder that already holds a sweep is not silently replaced.
    let err = format!("{:#}", run(&parse(&["--capacity", "4"]), false).unwrap_err());
    assert!(
        err.contains("already holds a sweep") && err.contains("--replace"),
        "{err}"
    );
    run(&parse(&["--capacity", "4", "--replace"]), false).unwrap();
    assert_eq!(read_results(&out).height(), 1, "--replace: only the new rows");

    // Configurations that can never prefetch are refused before any row runs.
    let err = format!(
        "{:#}",
        run(
            &parse(&[
                "--capacity",
                "4",
                "--prefetch-depth",
                "99",
                "--predictor",
                "previous-token",
                "--replace"
            ]),
            false
        )
        .unwrap_err()
    );
    assert!(err.starts_with("--prefetch-depth: 99 is out of range"), "{err}");
    let bare = tmp.path().join("bare");
    std::fs::create_dir(&bare).unwrap();
    let no_hidden = bare.join("t.parquet");
    collect(
        &CollectArgs {
            max_new_tokens: NEW,
            limit: Some(2),
            threads: 2,
            hidden_layers: "none".into(),
            ..CollectArgs::new(
                root().join(MODEL).display().to_string(),
                root().join("datasets/chat.jsonl"),
                no_hidden.clone(),
            )
        },
        false,
    )
    .unwrap();
    let mut a = parse(&[
        "--capacity",
        "4",
        "--prefetch-depth",
        "1",
        "--predictor",
        "gate-lookahead",
        "--replace",
    ]);
    a.trace = Some(no_hidden);
    let err = format!("{:#}", run(&a, false).unwrap_err());
    assert!(
        err.contains("no hidden states") && err.contains("--hidden-layers"),
        "{err}"
    );

    // Every row failed (popularity without a profile): the rows are written, the run fails.
    let err = format!(
        "{:#}",
        run(
            &parse(&[
                "--capacity",
                "4,6",
                "--prefetch-depth",
                "1",
                "--predictor",
                "popularity",
                "--replace"
            ]),
            false
        )
        .unwrap_err()
    );
    assert!(
        err.contains("every one of the 2 configurations failed") && err.contains("--profile"),
        "{err}"
    );
    assert_eq!(read_results(&out).height(), 2);
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

    // Repetition of the generations: under sync misses the exact model's greedy tokens, so the
    // same figure as the engine's own generate gives for those prompts.
    let rep = f("repetition");
    let ckpt = shadowmoe_engine::Checkpoint::open(&model).unwrap();
    let tok = ckpt.tokenizer().unwrap();
    let (prompts, _) = dataset::load(&root().join("datasets/chat.jsonl")).unwrap();
    let m = ckpt.load_model().unwrap();
    let want: f64 = prompts
        .iter()
        .take(2)
        .map(|p| {
            let ids = p.encode(&tok, true).unwrap();
            let opts = GenerateOptions {
                max_new_tokens: 6,
                sampling: SamplingParams::default(),
                eos_token_ids: ckpt.eos_token_ids(),
            };
            let (out, _) = generate(&m, &ids, &opts, &mut NoObserver, |_| Ok(())).unwrap();
            shadowmoe_engine::repetition(&out, 4, 200)
        })
        .sum::<f64>()
        / 2.0;
    for (i, r) in rep.iter().enumerate() {
        let r = r.unwrap_or_else(|| panic!("row {i}: no repetition"));
        assert!((0.0..=1.0).contains(&r), "row {i}: {r}");
        if miss.get(i) == Some("sync") {
            assert!((r - want).abs() < 1e-12, "row {i}: {r}, the exact model's {want}");
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
    let io = shadowmoe_experiments::live::LiveIo {
        mode: IoMode::Direct,
        pack: None,
        threads: 2,
        prefetch_readers: 0,
    };
    let setup = LiveSetup::new(ckpt, ids, 4, io, shadowmoe_predictor::BackendChoice::Cpu, None).unwrap();
    let r = setup
        .run(&LiveConfig {
            capacity: 4,
            policy: PolicyKind::Lru,
            pin: None,
            on_miss: MissMode::Sync,
            prefetch_depth: 0,
            prefetch_k: 4,
            prefetch_span: PrefetchSpan::Target,
            timing: PredictorTiming::Async,
            settle_loads: false,
            predictor: "none".into(),
            quality: true,
        })
        .unwrap();
    assert_eq!(r.io_mode, "direct", "/tmp refused O_DIRECT?");
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
        // Flags of the simulator are refused live, not ignored.
        (
            &["--capacity", "4", "--ssd-gbps", "2"][..],
            "--ssd-gbps applies to --mode sim only",
        ),
        (
            &["--capacity", "4", "--layer-ms", "2"][..],
            "--layer-ms applies to --mode sim only",
        ),
        (
            &["--capacity", "4", "--io", "tape"][..],
            "--io: unknown I/O mode `tape`",
        ),
        (
            &["--capacity", "4", "--pack", "/nonexistent/pack"][..],
            "/nonexistent/pack",
        ),
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

/// `bench-sweep calibrate` on a real checkpoint: the file reads back, every predictor carries
/// the decode compute measured beside it, and a simulated sweep with `--io-profile` charges
/// each configuration the compute of its own predictor (the plain compute without one).
#[test]
fn calibration_times_compute_beside_each_predictor_and_the_simulator_uses_it() {
    use polars::prelude::*;
    use shadowmoe_experiments::calibrate::{CalibrateArgs, Calibration, run as calibrate};
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("cal.json");
    let model = root().join(MODEL).display().to_string();
    let a = CalibrateArgs {
        model: model.clone(),
        pack: None,
        io: "pread".into(),
        depths: "1..2".into(),
        reads: 8,
        control_file: None,
        trace: None,
        capacity: 4,
        tokens: 4,
        threads: 0,
        predictor: "gate-lookahead,previous-token".into(),
        targets: 1,
        backend: "cpu".into(),
        out: file.clone(),
    };
    let written = calibrate(&a).unwrap();
    let cal = Calibration::read(&file).unwrap();
    assert_eq!((&cal.model, &cal.machine), (&written.model, &written.machine));
    assert!((cal.compute.token_ms - written.compute.token_ms).abs() < 1e-9);
    assert!(cal.compute.token_ms > 0.0);
    for name in ["gate-lookahead", "previous-token"] {
        let p = &cal.predictors[name];
        let ms = p
            .compute_token_ms
            .unwrap_or_else(|| panic!("{name}: no compute beside it"));
        assert!(ms > 0.0 && ms.is_finite(), "{name}: {ms}");
        let layers = cal.compute.token_ms / cal.compute.layer_ms;
        assert!((p.compute_layer_ms.unwrap() * layers - ms).abs() < 1e-9);
    }

    let t = trace(tmp.path());
    let out = tmp.path().join("sweep");
    let args = sweep_cli(&[
        "--mode".into(),
        "sim".into(),
        "--trace".into(),
        t.display().to_string(),
        "--model".into(),
        model,
        "--io-profile".into(),
        file.display().to_string(),
        "--capacity".into(),
        "4".into(),
        "--prefetch-depth".into(),
        "0,1".into(),
        "--predictor".into(),
        "none,gate-lookahead,previous-token".into(),
        "--out".into(),
        out.display().to_string(),
    ]);
    shadowmoe_experiments::sweep::run(&args, false).unwrap();
    let df = read_results(&out);
    let pred = df.column("predictor").unwrap().str().unwrap().clone();
    let depth = df
        .column("prefetch_depth")
        .unwrap()
        .cast(&DataType::Int64)
        .unwrap();
    let depth = depth.i64().unwrap();
    let compute = df.column("compute_ms_per_token").unwrap().f64().unwrap().clone();
    let mut seen = 0;
    for i in 0..df.height() {
        let (p, d, c) = (
            pred.get(i).unwrap(),
            depth.get(i).unwrap(),
            compute.get(i).unwrap(),
        );
        let want = if d == 0 {
            cal.compute.token_ms
        } else {
            cal.predictors[p].compute_token_ms.unwrap()
        };
        assert!(
            (c - want).abs() < 1e-6 * want.max(1.0),
            "{p} at depth {d}: {c} ms, expected {want}"
        );
        seen += 1;
    }
    assert_eq!(seen, 3, "rows: {df}");
}
