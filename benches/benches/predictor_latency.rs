//! Shadow-predictor latency: one call at batch 1, and one batched call for every MoE layer of a
//! token, on Burn's CPU backend and on wgpu (where an adapter answers), next to the engine's
//! per-token decode time on the reference model measured in the same run.
//!
//!     cargo bench -p shadowmoe-benches --bench predictor_latency
//!
//! Environment: `SHADOWMOE_MODEL` (default: models/reference/checkpoint, else the qwen3_moe
//! fixture), `SHADOWMOE_PREDICTOR` (a trained predictor directory; default: a freshly
//! initialised network of the same shape — latency does not depend on the weights).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Instant;

use shadowmoe_engine::{Checkpoint, GenerateOptions, NoObserver, SamplingParams, generate};
use shadowmoe_predictor::data::Examples;
use shadowmoe_predictor::train::{BackendChoice, device, predict_topk};
use shadowmoe_predictor::{ShadowPredictor, ShadowShape};

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let model_dir = std::env::var_os("SHADOWMOE_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let r = root.join("models/reference/checkpoint");
            if r.join("config.json").exists() {
                r
            } else {
                root.join("engine/tests/golden/qwen3_moe")
            }
        });
    let ckpt = Checkpoint::open_dir(&model_dir).unwrap();
    let cfg = &ckpt.config;
    let layers = cfg.moe_layers().len();
    let k = 8.min(cfg.num_experts);

    // Engine decode time per token (median over 64 tokens).
    let model = ckpt.load_model().unwrap();
    let prompt: Vec<u32> = (0..16u32).map(|i| (i * 97) % cfg.vocab_size as u32).collect();
    let mut times = Vec::new();
    let mut last = Instant::now();
    let opts = GenerateOptions {
        max_new_tokens: 65,
        sampling: SamplingParams::default(),
        eos_token_ids: vec![],
    };
    generate(&model, &prompt, &opts, &mut NoObserver, |_| {
        times.push(last.elapsed().as_secs_f64());
        last = Instant::now();
        Ok(())
    })
    .unwrap();
    let decode = median(&mut times[1..].to_vec());

    println!(
        "predictor latency: {} (hidden {}, {} experts, {layers} MoE layers), top-{k}; engine decode {:.3} ms/token",
        model_dir.display(),
        cfg.hidden_size,
        cfg.num_experts,
        decode * 1e3
    );
    println!();
    println!("| backend | call | median ms | p90 ms | vs decode token |");
    println!("|---|---|---:|---:|---:|");
    for choice in [BackendChoice::Cpu, BackendChoice::Wgpu] {
        let Ok((dev, name)) = device(choice) else {
            println!("| wgpu | - | no adapter | - | - |");
            continue;
        };
        let (net, hidden_size) = match std::env::var_os("SHADOWMOE_PREDICTOR") {
            Some(p) => {
                let sp = ShadowPredictor::load(Path::new(&p), None, choice).unwrap();
                let h = sp.meta.shape.hidden_size;
                (Net::Loaded(sp), h)
            }
            None => {
                let shape = ShadowShape {
                    hidden_size: cfg.hidden_size,
                    num_experts: cfg.num_experts,
                    moe_layers: layers,
                    max_depth: 4,
                    width: 512,
                    embed: 32,
                };
                (Net::Fresh(shape.init(&dev), dev.clone()), cfg.hidden_size)
            }
        };
        for (label, n) in [("batch 1", 1usize), ("all layers of a token", layers)] {
            let ex = examples(n, hidden_size, layers);
            for _ in 0..20 {
                net.predict(&ex, k); // warm-up (the first wgpu call compiles shaders)
            }
            let mut t: Vec<f64> = (0..200)
                .map(|_| {
                    let s = Instant::now();
                    std::hint::black_box(net.predict(&ex, k));
                    s.elapsed().as_secs_f64()
                })
                .collect();
            let med = median(&mut t);
            let p90 = t[(t.len() * 9) / 10];
            println!(
                "| {name} | {label} | {:.3} | {:.3} | {:.2} |",
                med * 1e3,
                p90 * 1e3,
                med / decode
            );
        }
    }
}

#[allow(clippy::large_enum_variant)] // one value per backend
enum Net {
    Loaded(ShadowPredictor),
    Fresh(
        shadowmoe_predictor::shadow::ShadowMlp,
        shadowmoe_predictor::burn::prelude::Device,
    ),
}

fn examples(n: usize, h: usize, layers: usize) -> Examples {
    Examples {
        hidden_size: h,
        k: 0,
        request: vec![0; n],
        token: vec![0; n],
        src: (0..n).map(|i| (i % layers) as u16).collect(),
        depth: vec![1; n],
        hidden: (0..n * h).map(|i| ((i * 31 % 97) as f32 / 48.0) - 1.0).collect(),
        target: vec![],
        prev_target: vec![],
    }
}

impl Net {
    fn predict(&self, ex: &Examples, k: usize) -> Vec<u16> {
        match self {
            Net::Loaded(p) => p.predict(&ex.hidden, &ex.src, &ex.depth, k),
            Net::Fresh(m, d) => predict_topk(m, d, ex, k, 4096),
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
