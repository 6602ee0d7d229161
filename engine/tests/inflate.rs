//! `inflate` against the outside referee: the bundled reference model inflated to a larger
//! hidden size and expert width must still reproduce what transformers computed on the
//! original (models/reference/checkpoint/golden.*): logits within 1e-4, the same routing, the
//! same greedy tokens — from experts read straight off the inflated files with O_DIRECT. Its
//! MLX 4-bit copy, inflated on the quantised values, is judged by mlx-lm the same way.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{Golden, MlxGolden};
use shadowmoe_engine::inflate::{InflateOptions, check_no_holes, inflate, plan};
use shadowmoe_engine::offload::{Budget, CacheOptions, IoMode, MissMode, PolicyKind};
use shadowmoe_engine::{
    Checkpoint, GenerateOptions, LogitsFor, Phase, RecordingObserver, SamplingParams, generate,
};

fn reference() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/reference/checkpoint")
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Hidden 64 → 512 (two copies, norm shift 1: both halves of the construction) and expert width
/// 16 → 24 (padded units).
#[test]
fn inflated_reference_model_computes_the_same_function() {
    let src = Checkpoint::open_dir(&reference()).unwrap();
    let golden = Golden::read(&reference());
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("inflated");
    let opts = InflateOptions {
        hidden: 512,
        moe_intermediate: 24,
        seed: 3,
    };
    let p = plan(&src, &opts).unwrap();
    assert_eq!((p.copies, p.shift), (2, 1));
    let summary = inflate(&src, &out, &opts, &|_, _| {}).unwrap();
    assert_eq!(summary.expert_bytes, 3 * 512 * 24 * 2);
    assert_eq!(summary.experts, 8 * 512);
    assert!(!Path::new(&format!("{}.partial", out.display())).exists());

    // Real bytes: no holes, no zero pages in the expert shards.
    let (checked, zero) = check_no_holes(&out, 256).unwrap();
    assert!(checked >= 8 * 200, "{checked}");
    assert_eq!(zero, 0, "zero pages among {checked}");

    let big = Checkpoint::open_dir(&out).unwrap();
    assert_eq!(big.config.hidden_size, 512);
    assert_eq!(big.config.moe_intermediate_size, 24);
    assert_ne!(big.config_sha256().unwrap(), src.config_sha256().unwrap());

    // Experts from disk with O_DIRECT (pread where the filesystem refuses it), a small cache.
    let store = Arc::new(big.expert_store(IoMode::Direct, None, false).unwrap());
    assert_eq!(store.expert_bytes(), summary.expert_bytes);
    let opts = CacheOptions {
        budget: Budget::PerLayer(64),
        policy: PolicyKind::Lru,
        on_miss: MissMode::Sync,
        io_threads: 2,
        pinned: Vec::new(),
        settle_loads: false,
        prefetch_readers: 0,
    };
    let (model, _cached) = big.load_model_cached(store, &opts).unwrap();
    let moe = big.config.moe_layers();
    let mut obs = RecordingObserver {
        hidden_layers: vec![moe[0]],
        ..Default::default()
    };
    let mut kv = model.new_cache();
    let logits = model
        .forward(
            &golden.prompt_ids,
            &mut kv,
            Phase::Prefill,
            LogitsFor::All,
            &mut obs,
        )
        .unwrap();
    let d = max_diff(logits.as_slice().unwrap(), &golden.logits);
    assert!(d <= 1e-4, "logits differ from transformers' by {d:e}");

    let t = golden.prompt_ids.len();
    let k = big.config.num_experts_per_tok;
    for (li, _) in moe.iter().enumerate() {
        for ti in 0..t {
            let ev = &obs.events[li * t + ti];
            assert_eq!(
                ev.experts,
                &golden.router_experts[(li * t + ti) * k..][..k],
                "routing at MoE layer {li}, token {ti}"
            );
            if let Some(hid) = &ev.hidden {
                // The router input: the original's in each copy, zero in the padding.
                let want = &golden.router_hidden[ti * 64..(ti + 1) * 64];
                assert!(max_diff(&hid[..64], want) < 1e-4);
                assert!(max_diff(&hid[64..128], want) < 1e-4);
                assert!(hid[128..].iter().all(|&v| v == 0.0));
            }
        }
    }

    let gen_opts = GenerateOptions {
        max_new_tokens: golden.generated.len(),
        sampling: SamplingParams::default(),
        eos_token_ids: Vec::new(),
    };
    let (generated, _) = generate(
        &model,
        &golden.prompt_ids,
        &gen_opts,
        &mut shadowmoe_engine::NoObserver,
        |_| Ok(()),
    )
    .unwrap();
    assert_eq!(generated, golden.generated, "greedy tokens");
}

/// The bundled model's MLX 4-bit copy (`models/reference/checkpoint-4bit`), inflated on its
/// quantised values. mlx-lm is the referee (`tests/golden/mlx/inflated-q4g64`, made by
/// `make_mlx.py --inflated`): it ran the copies at hidden 64 and 512, width 64 (the source's
/// 16-wide float down projections then quantised: the one rounding inflate adds) and found
/// them equal. The engine must reproduce mlx-lm's logits on both — the wide one with its
/// quantised experts read with O_DIRECT through a small cache — route the same tokens to the
/// same experts at both widths, and give mlx-lm's greedy tokens.
#[test]
fn inflated_4bit_model_computes_what_mlx_lm_computes() {
    let src_dir = reference().join("../checkpoint-4bit");
    let src = Checkpoint::open_dir(&src_dir).unwrap();
    let golden =
        MlxGolden::read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/mlx/inflated-q4g64"));
    let tmp = tempfile::tempdir().unwrap();
    // At Qwen3-Coder-Next's widths an expert is its 1,769,472 bytes.
    let full = plan(
        &src,
        &InflateOptions {
            hidden: 2048,
            moe_intermediate: 512,
            seed: 0,
        },
    )
    .unwrap();
    assert_eq!(full.expert_bytes, 1_769_472);
    assert_eq!(full.quant.map(|q| (q.bits, q.group_size)), Some((4, 64)));

    let mut routes = Vec::new();
    for (hidden, seed) in [(64, 1), (512, 2)] {
        let out = tmp.path().join(format!("h{hidden}"));
        let opts = InflateOptions {
            hidden,
            moe_intermediate: 64,
            seed,
        };
        let summary = inflate(&src, &out, &opts, &|_, _| {}).unwrap();
        // 4-bit words plus bf16 scales and biases per group of 64, three matrices.
        let matrix = |n: usize, k: usize| (n * k / 2 + 2 * n * (k / 64) * 2) as u64;
        assert_eq!(summary.expert_bytes, 2 * matrix(64, hidden) + matrix(hidden, 64));
        let (checked, zero) = check_no_holes(&out, 256).unwrap();
        assert!(checked >= 8 * 200, "{checked}");
        assert_eq!(zero, 0, "zero pages among {checked}");

        let ck = Checkpoint::open_dir(&out).unwrap();
        assert!(ck.weights.mlx_layout());
        for l in 0..ck.config.num_hidden_layers {
            for m in ["gate_proj", "up_proj", "down_proj"] {
                let name = format!("model.layers.{l}.mlp.switch_mlp.{m}.weight");
                assert!(ck.weights.is_quantized(&name), "{name} is quantised");
            }
        }
        let store = Arc::new(ck.expert_store(IoMode::Direct, None, false).unwrap());
        assert_eq!(store.expert_bytes(), summary.expert_bytes);
        let cache = CacheOptions {
            budget: Budget::PerLayer(64),
            policy: PolicyKind::Lru,
            on_miss: MissMode::Sync,
            io_threads: 2,
            pinned: Vec::new(),
            settle_loads: false,
            prefetch_readers: 0,
        };
        let (model, _cached) = ck.load_model_cached(store, &cache).unwrap();
        let mut obs = RecordingObserver::default();
        let mut kv = model.new_cache();
        let logits = model
            .forward(
                &golden.prompt_ids,
                &mut kv,
                Phase::Prefill,
                LogitsFor::All,
                &mut obs,
            )
            .unwrap();
        assert_eq!(logits.dim(), (golden.prompt_ids.len(), golden.vocab));
        let d = max_diff(logits.as_slice().unwrap(), &golden.logits);
        assert!(d <= 1e-4, "hidden {hidden}: logits differ from mlx-lm's by {d:e}");
        eprintln!("hidden {hidden}: logits within {d:e} of mlx-lm's");
        routes.push(obs.events.iter().map(|e| e.experts.clone()).collect::<Vec<_>>());

        let gen_opts = GenerateOptions {
            max_new_tokens: golden.generated.len(),
            sampling: SamplingParams::default(),
            eos_token_ids: Vec::new(),
        };
        let (generated, _) = generate(
            &model,
            &golden.prompt_ids,
            &gen_opts,
            &mut shadowmoe_engine::NoObserver,
            |_| Ok(()),
        )
        .unwrap();
        assert_eq!(generated, golden.generated, "hidden {hidden}: greedy tokens");
    }
    assert!(!routes[0].is_empty());
    assert_eq!(routes[0], routes[1], "routing at hidden 64 and 512");
}

#[test]
fn inflate_refuses_what_it_cannot_do() {
    let src = Checkpoint::open_dir(&reference()).unwrap();
    let err = |hidden, moe_intermediate| {
        plan(
            &src,
            &InflateOptions {
                hidden,
                moe_intermediate,
                seed: 0,
            },
        )
        .unwrap_err()
        .to_string()
    };
    assert!(err(32, 16).contains("smaller than the model"), "{}", err(32, 16));
    assert!(err(64, 8).contains("smaller than the model"));
    assert!(err(192, 16).contains("power of two"), "{}", err(192, 16));
    // An existing output is never overwritten.
    let tmp = tempfile::tempdir().unwrap();
    let e = inflate(
        &src,
        tmp.path(),
        &InflateOptions {
            hidden: 128,
            moe_intermediate: 16,
            seed: 0,
        },
        &|_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("already exists"), "{e}");
    // Another architecture.
    let olmoe = Checkpoint::open_dir(&common::fixture_dir("olmoe")).unwrap();
    let e = plan(
        &olmoe,
        &InflateOptions {
            hidden: 4 * olmoe.config.hidden_size,
            moe_intermediate: olmoe.config.moe_intermediate_size,
            seed: 0,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("qwen3_moe"), "{e}");
    // A quantised source needs whole groups at the new expert width.
    let q4 = Checkpoint::open_dir(&reference().join("../checkpoint-4bit")).unwrap();
    let e = plan(
        &q4,
        &InflateOptions {
            hidden: 128,
            moe_intermediate: 96,
            seed: 0,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("--moe-intermediate") && e.contains("group size 64"),
        "{e}"
    );
}
