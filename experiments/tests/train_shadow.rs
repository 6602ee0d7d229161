//! `train-shadow` end to end on a fixture's real trace: trains, evaluates every baseline on the
//! same rows (gate-lookahead at depth 0 reproduces the routing exactly), writes a predictor that
//! loads back on the CPU and on wgpu with the same predictions, and refuses bad input.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use std::path::{Path, PathBuf};

use shadowmoe_experiments::collect::{CollectArgs, run as collect};
use shadowmoe_experiments::train_shadow::{ShadowArgs, run};
use shadowmoe_predictor::{BackendChoice, ShadowPredictor};
use shadowmoe_trace::Trace;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn trace(dir: &Path, dataset: &str, hidden: &str, limit: usize) -> PathBuf {
    let out = dir.join(format!("{dataset}-{hidden}.parquet"));
    let a = CollectArgs {
        max_new_tokens: 24,
        hidden_layers: hidden.into(),
        limit: Some(limit),
        threads: 2,
        flush_every: 8,
        ..CollectArgs::new(
            root().join("engine/tests/golden/qwen3_moe").display().to_string(),
            root().join("datasets").join(format!("{dataset}.jsonl")),
            out.clone(),
        )
    };
    collect(&a, false).unwrap();
    out
}

fn args(traces: Vec<PathBuf>, out: &Path) -> ShadowArgs {
    ShadowArgs {
        traces,
        eval_traces: vec![],
        depth: "1,2".into(),
        top_k: 4,
        out: out.to_path_buf(),
        backend: "cpu".into(),
        model: None,
        loss: "both".into(),
        epochs: 3,
        batch: 128,
        lr: 1e-3,
        width: 64,
        patience: 2,
        seed: 0,
        val_share: 0.2,
        test_share: 0.2,
    }
}

#[test]
fn trains_evaluates_and_loads_back() {
    let tmp = tempfile::tempdir().unwrap();
    let t = trace(tmp.path(), "code", "all", 24);
    let heldout = trace(tmp.path(), "heldout", "all", 8);
    let out = tmp.path().join("pred");
    let mut a = args(vec![t.clone()], &out);
    a.eval_traces = vec![heldout];
    let text = run(&a).unwrap();
    for p in [
        "shadow",
        "popularity",
        "previous-token",
        "gate-lookahead",
        "oracle",
    ] {
        assert!(text.contains(p), "{p} missing from\n{text}");
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(
        report["gate_lookahead_depth0_recall"].as_f64(),
        Some(1.0),
        "{text}"
    );
    let oracle = report["reports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["predictor"] == "oracle")
        .unwrap();
    assert_eq!(oracle["by_depth"]["1"]["recall"].as_f64(), Some(1.0));
    for r in report["reports"].as_array().unwrap() {
        for d in ["1", "2"] {
            let rec = r["by_depth"][d]["recall"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&rec), "{r}");
        }
    }
    assert_eq!(report["loss_candidates"].as_array().unwrap().len(), 2);

    // Loads back; the CPU and wgpu backends agree; another model is refused.
    let m = Trace::open(&t).unwrap().manifest;
    let cpu = ShadowPredictor::load(&out, Some(&m.config_sha256), BackendChoice::Cpu).unwrap();
    assert_eq!(cpu.backend(), "cpu");
    let h = m.hidden_size;
    let rows = 8;
    let hidden: Vec<f32> = (0..rows * h)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let src: Vec<u16> = (0..rows).map(|i| (i % 2) as u16).collect();
    let depth = vec![1u8; rows];
    let p_cpu = cpu.predict(&hidden, &src, &depth, 4);
    assert_eq!(p_cpu.len(), rows * 4);
    match ShadowPredictor::load(&out, Some(&m.config_sha256), BackendChoice::Wgpu) {
        Ok(gpu) => {
            assert_eq!(gpu.backend(), "wgpu");
            assert_eq!(
                gpu.predict(&hidden, &src, &depth, 4),
                p_cpu,
                "wgpu and CPU disagree on the top-k"
            );
        }
        Err(e) => {
            assert!(
                std::env::var_os("SHADOWMOE_REQUIRE_WGPU").is_none(),
                "wgpu is required here (install mesa-vulkan-drivers): {e}"
            );
            eprintln!("wgpu not available, its comparison is skipped (CI runs it on lavapipe): {e}");
        }
    }
    let err = ShadowPredictor::load(&out, Some("0000"), BackendChoice::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("another model"), "{err}");

    // Fuzzed predictor files: `predictor.json` and the weights' safetensors header mutated;
    // loading and predicting ends in Ok or a one-line error, never a panic.
    fuzz_predictor_files(&out, &m.config_sha256, &hidden, &src, &depth);

    // At run time: the trained predictor drives the engine's prefetching over a bounded cache
    // reading experts from disk; the output stays exact and prefetches are issued.
    prefetch_with(cpu, &m.config_sha256);
}

fn prefetch_with(predictor: ShadowPredictor, config_sha256: &str) {
    use shadowmoe_engine::offload::{Budget, CacheOptions, IoMode, MissMode, PolicyKind};
    use shadowmoe_engine::predict::Prefetch;
    use shadowmoe_engine::{Checkpoint, GenerateOptions, NoObserver, SamplingParams, generate};
    use std::sync::Arc;

    let ckpt = Checkpoint::open_dir(&root().join("engine/tests/golden/qwen3_moe")).unwrap();
    assert_eq!(ckpt.config_sha256().unwrap(), config_sha256);
    let k = ckpt.config.num_experts_per_tok;
    let prompt: Vec<u32> = (0..12u32).map(|i| (i * 13 + 5) % 200).collect();
    let opts = GenerateOptions {
        max_new_tokens: 16,
        sampling: SamplingParams::default(),
        eos_token_ids: vec![],
    };
    let tokens = |model: &shadowmoe_engine::Model| {
        generate(model, &prompt, &opts, &mut NoObserver, |_| Ok(()))
            .unwrap()
            .0
    };
    let resident = tokens(&ckpt.load_model().unwrap());

    let store = Arc::new(ckpt.expert_store(IoMode::Pread, None, false).unwrap());
    let cache = CacheOptions {
        budget: Budget::PerLayer(2 * k),
        policy: PolicyKind::Lru,
        on_miss: MissMode::Sync,
        io_threads: 2,
        pinned: vec![],
        settle_loads: false,
        prefetch_readers: 0,
    };
    let (model, cached) = ckpt.load_model_cached(store, &cache).unwrap();
    model.set_prefetch(Some(Prefetch {
        predictor: Box::new(predictor),
        depth: 1,
        k,
        span: shadowmoe_engine::predict::PrefetchSpan::All,
        timing: shadowmoe_engine::predict::PredictorTiming::Inline,
    }));
    assert_eq!(tokens(&model), resident, "prefetching changed the output");
    let (s, _) = cached.stats();
    assert!(
        s.prefetch_issued > 0,
        "the shadow predictor issued no prefetch: {s:?}"
    );
    assert!(s.prefetch_used + s.prefetch_wasted <= s.prefetch_issued, "{s:?}");
}

/// On the bundled reference model's traces (its routing is learned), the shadow model beats the
/// baselines that need no model at depth 4, on held-out prompts: popularity (the training
/// split's most routed experts) and previous-token.
#[test]
fn shadow_beats_popularity_and_previous_token_on_the_reference_model() {
    let tmp = tempfile::tempdir().unwrap();
    let model = root().join("models/reference/checkpoint");
    let collect_set = |dataset: &str, limit: usize| {
        let out = tmp.path().join(format!("{dataset}.parquet"));
        collect(
            &CollectArgs {
                max_new_tokens: 8,
                hidden_layers: "all".into(),
                no_chat_template: true,
                limit: Some(limit),
                threads: 2,
                ..CollectArgs::new(
                    model.display().to_string(),
                    root().join("datasets").join(format!("{dataset}.jsonl")),
                    out.clone(),
                )
            },
            false,
        )
        .unwrap();
        out
    };
    let train = vec![collect_set("code", 30), collect_set("chat", 30)];
    let heldout = collect_set("heldout", 8);
    let out = tmp.path().join("pred");
    let a = ShadowArgs {
        eval_traces: vec![heldout],
        depth: "4".into(),
        top_k: 8,
        loss: "softmax".into(),
        epochs: 2,
        width: 128,
        val_share: 0.1,
        test_share: 0.0,
        ..args(train, &out)
    };
    let text = run(&a).unwrap();
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let recall = |name: &str| {
        report["reports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["predictor"] == name)
            .unwrap()["by_depth"]["4"]["recall"]
            .as_f64()
            .unwrap()
    };
    let shadow = recall("shadow");
    for baseline in ["popularity", "previous-token"] {
        assert!(
            shadow > recall(baseline) + 0.05,
            "shadow {shadow:.3} vs {baseline} {:.3}\n{text}",
            recall(baseline)
        );
    }
}

#[test]
fn bad_input_gets_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let no_hidden = trace(tmp.path(), "math", "none", 3);
    let err = run(&args(vec![no_hidden], &tmp.path().join("o")))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no hidden states") && err.contains("--hidden-layers"),
        "{err}"
    );

    let t = trace(tmp.path(), "math", "all", 3);
    let mut a = args(vec![t.clone()], &tmp.path().join("o"));
    a.depth = "5".into();
    let err = run(&a).unwrap_err().to_string();
    assert!(err.starts_with("--depth: 5 is out of range"), "{err}");

    // Flags refused before any training, and no predictor is written (before: --epochs 0 and
    // --width 0 panicked, --val-share 1.5 and --lr NaN trained and wrote a model).
    type Edit = Box<dyn Fn(&mut ShadowArgs)>;
    let bad: Vec<(&str, Edit)> = vec![
        ("--epochs: 0", Box::new(|a| a.epochs = 0)),
        ("--width: 0", Box::new(|a| a.width = 0)),
        ("--val-share: 1.5", Box::new(|a| a.val_share = 1.5)),
        ("--lr: NaN", Box::new(|a| a.lr = f64::NAN)),
        ("--lr: -0.1", Box::new(|a| a.lr = -0.1)),
        (
            "leave no requests to train on",
            Box::new(|a| {
                a.val_share = 0.6;
                a.test_share = 0.5;
            }),
        ),
        (
            "--out: cannot",
            Box::new(|a| a.out = PathBuf::from("/proc/no-such-dir/pred")),
        ),
        (
            "not the model of the traces",
            Box::new(|a| a.model = Some(root().join("engine/tests/golden/olmoe").display().to_string())),
        ),
    ];
    for (want, edit) in bad {
        let out = tmp.path().join("refused");
        let mut a = args(vec![t.clone()], &out);
        edit(&mut a);
        let err = format!("{:#}", run(&a).unwrap_err());
        assert!(err.contains(want), "{want}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            !out.join("predictor.json").exists(),
            "{want}: a predictor was written"
        );
    }

    // A truncated Parquet trace: refused naming the file.
    let cut = tmp.path().join("cut.parquet");
    let bytes = std::fs::read(&t).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = format!(
        "{:#}",
        run(&args(vec![cut.clone()], &tmp.path().join("o"))).unwrap_err()
    );
    assert!(err.contains(cut.to_str().unwrap()), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    // Three prompts cannot fill train, validation and test splits.
    let mut a = args(vec![t], &tmp.path().join("o"));
    a.val_share = 0.0;
    let err = format!("{:#}", run(&a).unwrap_err());
    assert!(err.contains("split is empty"), "{err}");
}

fn fuzz_predictor_files(dir: &Path, sha: &str, hidden: &[f32], src: &[u16], depth: &[u8]) {
    let n = common::fuzz_cases(100);
    let mut next = common::splitmix(0xfeed_u64);
    for file in ["predictor.json", "model.safetensors"] {
        let path = dir.join(file);
        let original = std::fs::read(&path).unwrap();
        let hot = if file.ends_with(".json") {
            original.len()
        } else {
            (8 + u64::from_le_bytes(original[..8].try_into().unwrap()) as usize).min(original.len())
        };
        let (mut refused, mut panics) = (0, Vec::new());
        for case in 0..n {
            let mut v = original.clone();
            for _ in 0..=next() % 2 {
                let at = (next() % hot.max(1)).min(v.len().saturating_sub(1));
                match next() % 4 {
                    0 => v[at] ^= 1 << (next() % 8),
                    1 => v[at] = [b'0', b'9', b'"', b'{', b'-', 0xff][next() % 6],
                    2 => v.truncate(at.max(1)),
                    _ => {
                        let len = (next() % 8).min(v.len() - at);
                        v.drain(at..at + len);
                    }
                }
            }
            std::fs::write(&path, &v).unwrap();
            let hook = std::panic::take_hook();
            std::panic::set_hook(Box::new(|_| {}));
            let r = std::panic::catch_unwind(|| -> Result<Vec<u16>, String> {
                let p =
                    ShadowPredictor::load(dir, Some(sha), BackendChoice::Cpu).map_err(|e| e.to_string())?;
                Ok(p.predict(hidden, src, depth, 4))
            });
            std::panic::set_hook(hook);
            match r {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    refused += 1;
                    assert!(!e.trim().contains('\n'), "{file} case {case}: {e}");
                }
                Err(_) => panics.push(case),
            }
        }
        std::fs::write(&path, &original).unwrap();
        println!("{file}: {n} cases, {refused} refused, {} panics", panics.len());
        assert!(panics.is_empty(), "{file}: cases that panicked: {panics:?}");
    }
}
