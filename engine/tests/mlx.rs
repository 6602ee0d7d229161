//! MLX-quantised checkpoints, refereed by mlx-lm.
//!
//! `tests/golden/mlx/<arch>-q<bits>g<group>/` were written by `tests/golden/make_mlx.py`
//! (pinned mlx + mlx-lm): `mlx_lm.convert -q` of the transformers fixtures (packed U32 weights,
//! scales and biases, experts stacked as `switch_mlp`, layers whose input is not a multiple of
//! the group left in float), and what mlx-lm itself computed on them. The engine loads the
//! converted files through its real loading code and computes on the quantised values; it must
//! reproduce mlx-lm's logits at every prompt position within `LOGIT_TOL` and its 16 greedy
//! tokens exactly.
//!
//! Tolerance: both runtimes dequantise to the same f32 weights (`scale · q + bias`, scales and
//! biases stored in f32), but sum in different orders — mlx-lm's quantised matmul accumulates
//! `Σ scale·q·x + bias·x` per element, the engine `scale·Σq·x + bias·Σx` per group — so the
//! logits (scale ~5) agree to f32 rounding, not bitwise: measured at most 4.9e-6 on qwen3_moe;
//! on qwen3_next's 8-bit file within 2e-5 with the AVX2 kernel (8 lanes) and 2.3e-5 with the
//! AVX-512 one (16 lanes), 5e-6 of the logit scale: float summation order, hence 5e-5.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use common::MlxGolden;

use shadowmoe_engine::{Checkpoint, GenerateOptions, LogitsFor, NoObserver, Phase, SamplingParams, generate};

const LOGIT_TOL: f32 = 5e-5;

fn mlx_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/mlx")
        .join(name)
}

fn check(name: &str) {
    let dir = mlx_dir(name);
    let golden = MlxGolden::read(&dir);
    let ckpt = Checkpoint::open_dir(&dir).unwrap();
    let q = ckpt.config.quantization.as_ref().expect("a quantization block");
    assert_eq!(
        (q.default.bits as u64, q.default.group_size as u64),
        (golden.bits, golden.group),
        "{name}: the config's default spec"
    );
    // The weights really are quantised where mlx-lm quantised them.
    assert!(ckpt.weights.is_quantized("model.embed_tokens.weight"), "{name}");
    assert!(ckpt.weights.mlx_layout(), "{name}: experts stacked as switch_mlp");

    let model = ckpt.load_model().unwrap();
    let mut cache = model.new_cache();
    let logits = model
        .forward(
            &golden.prompt_ids,
            &mut cache,
            Phase::Prefill,
            LogitsFor::All,
            &mut NoObserver,
        )
        .unwrap();
    assert_eq!(logits.dim(), (golden.prompt_ids.len(), golden.vocab));
    let max_diff = logits
        .iter()
        .zip(&golden.logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    let scale = golden.logits.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    assert!(
        max_diff <= LOGIT_TOL,
        "{name}: logits differ from mlx-lm's by {max_diff:e} (> {LOGIT_TOL:e}; logit scale {scale})"
    );

    let opts = GenerateOptions {
        max_new_tokens: golden.generated.len(),
        sampling: SamplingParams::default(),
        eos_token_ids: Vec::new(),
    };
    let (generated, _) = generate(&model, &golden.prompt_ids, &opts, &mut NoObserver, |_| Ok(())).unwrap();
    assert_eq!(generated, golden.generated, "{name}: greedy tokens");
}

#[test]
fn qwen3_moe_4bit_group_64_matches_mlx_lm() {
    check("qwen3_moe-q4g64");
}

#[test]
fn qwen3_moe_8bit_group_64_matches_mlx_lm() {
    check("qwen3_moe-q8g64");
}

#[test]
fn qwen3_moe_4bit_group_32_matches_mlx_lm() {
    check("qwen3_moe-q4g32");
}

/// Quantised experts served from disk through a cache of 4 per layer (of 16), read with
/// O_DIRECT, pread and mmap: they stay quantised all the way (the slot holds words, scales and
/// biases; an expert's bytes are the quantised ones) and give mlx-lm's greedy tokens.
#[test]
fn quantised_experts_from_disk_match_mlx_lm() {
    use shadowmoe_engine::offload::{IoMode, OffloadConfig};
    for name in ["qwen3_moe-q4g64", "qwen3_next-q4g64", "qwen3_moe-q8g64"] {
        let dir = mlx_dir(name);
        let golden = MlxGolden::read(&dir);
        let ckpt = Checkpoint::open_dir(&dir).unwrap();
        let (h, i) = (ckpt.config.hidden_size, ckpt.config.moe_intermediate_size);
        for io in [IoMode::Direct, IoMode::Pread, IoMode::Mmap] {
            let off = ckpt
                .offload(&OffloadConfig {
                    io,
                    ..OffloadConfig::per_layer(4)
                })
                .unwrap();
            // gate and up [i, h] quantised (h = 64 is a multiple of the group); down [h, i]
            // stays float (i = 32 is not): mlx-lm's rule, and the bytes that go to disk.
            let spec = ckpt.config.quantization.as_ref().unwrap().default;
            let quantised = spec.matrix_bytes(i, h, 4) as u64;
            assert_eq!(
                off.store.expert_bytes(),
                2 * quantised + (h * i * 4) as u64,
                "{name} {io:?}: bytes of one expert"
            );
            let opts = GenerateOptions {
                max_new_tokens: golden.generated.len(),
                sampling: SamplingParams::default(),
                eos_token_ids: Vec::new(),
            };
            let (generated, _) =
                generate(&off.model, &golden.prompt_ids, &opts, &mut NoObserver, |_| Ok(())).unwrap();
            assert_eq!(
                generated, golden.generated,
                "{name} {io:?}: greedy tokens from disk"
            );
            let (cache, _) = off.cached.stats();
            assert!(cache.evictions > 0, "{name} {io:?}: the cache was exercised");
        }
    }
}

#[test]
fn qwen3_next_4bit_group_64_matches_mlx_lm() {
    check("qwen3_next-q4g64");
}

#[test]
fn qwen3_next_8bit_group_64_matches_mlx_lm() {
    check("qwen3_next-q8g64");
}

/// A copy of an MLX fixture whose `model.safetensors` went through `edit` (name → (dtype,
/// shape, bytes)) and whose config.json went through `config`.
fn edited(
    name: &str,
    edit: impl FnOnce(&mut std::collections::BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>),
    config: impl FnOnce(&mut serde_json::Value),
) -> tempfile::TempDir {
    let src = mlx_dir(name);
    let tmp = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap().path();
        let n = f.file_name().unwrap().to_str().unwrap().to_string();
        if n != "model.safetensors" && n != "model.safetensors.index.json" {
            std::fs::copy(&f, tmp.path().join(&n)).unwrap();
        }
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut map: std::collections::BTreeMap<_, _> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect();
    edit(&mut map);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = map
        .iter()
        .map(|(n, (d, s, b))| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &tmp.path().join("model.safetensors")).unwrap();
    let cpath = tmp.path().join("config.json");
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cpath).unwrap()).unwrap();
    config(&mut c);
    std::fs::write(&cpath, serde_json::to_string(&c).unwrap()).unwrap();
    tmp
}

/// Tensor `name` as `[rows, words]` packed words (its first bytes).
fn packed_width(
    m: &mut std::collections::BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>,
    name: &str,
    words: usize,
) {
    let (_, s, b) = m.get_mut(name).unwrap();
    s[1] = words;
    b.truncate(s[0] * words * 4);
}

fn load_error(dir: &Path) -> String {
    match Checkpoint::open_dir(dir).and_then(|c| c.load_model()) {
        Ok(_) => panic!("{}: loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_quantised_tensors_are_named() {
    let q = "model.layers.1.self_attn.q_proj";
    // Missing biases.
    let d = edited(
        "qwen3_moe-q4g64",
        |m| drop(m.remove(&format!("{q}.biases"))),
        |_| {},
    );
    let e = load_error(d.path());
    assert!(e.contains(&format!("{q}.biases")) && e.contains("missing"), "{e}");
    // Packed words whose width fits no supported bit count (K = 64: 8 words is 4-bit; 6 is 3-bit).
    let d = edited(
        "qwen3_moe-q4g64",
        |m| packed_width(m, &format!("{q}.weight"), 6),
        |_| {},
    );
    let e = load_error(d.path());
    assert!(e.contains(&format!("{q}.weight")) && e.contains("3-bit"), "{e}");
    // Words that do not divide into the weight's width at all.
    let d = edited(
        "qwen3_moe-q4g64",
        |m| packed_width(m, &format!("{q}.weight"), 7),
        |_| {},
    );
    let e = load_error(d.path());
    assert!(
        e.contains(&format!("{q}.weight")) && e.contains("does not fit"),
        "{e}"
    );
    // A config that says otherwise than the tensors.
    let d = edited(
        "qwen3_moe-q4g64",
        |_| {},
        |c| c["quantization"]["bits"] = 8.into(),
    );
    let e = load_error(d.path());
    assert!(
        e.contains("stored as 4-bit group 64") && e.contains("8-bit"),
        "{e}"
    );
    // An unsupported bit count in the config.
    let d = edited(
        "qwen3_moe-q4g64",
        |_| {},
        |c| c["quantization"]["bits"] = 2.into(),
    );
    let e = load_error(d.path());
    assert!(e.contains("config.json") && e.contains("2-bit"), "{e}");
    // Another format's block (transformers' fp8/gptq/awq checkpoints).
    let d = edited(
        "qwen3_moe-q4g64",
        |_| {},
        |c| {
            c.as_object_mut().unwrap().remove("quantization");
            c["quantization_config"] =
                serde_json::json!({"quant_method": "fp8", "weight_block_size": [128, 128]});
        },
    );
    let e = load_error(d.path());
    assert!(
        e.contains("quantization_config.quant_method") && e.contains("fp8"),
        "{e}"
    );
}

/// An expert pack of quantised experts: words, scales and biases in one aligned extent per
/// expert, checksummed; read back through the cache (O_DIRECT, checksums verified) it gives
/// mlx-lm's greedy tokens, and each expert is exactly as large as in the checkpoint.
#[test]
fn expert_pack_keeps_quantised_experts_quantised() {
    use shadowmoe_engine::offload::{IoMode, OffloadConfig, pack};
    for name in ["qwen3_next-q4g64", "qwen3_moe-q8g64"] {
        let dir = mlx_dir(name);
        let golden = MlxGolden::read(&dir);
        let ckpt = Checkpoint::open_dir(&dir).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("pack");
        let summary = pack::write_pack(&dir, &ckpt.config, &ckpt.weights, &out, |_, _| {}).unwrap();
        let from_files = ckpt
            .expert_store(IoMode::Pread, None, false)
            .unwrap()
            .expert_bytes();
        assert_eq!(summary.expert_bytes, from_files, "{name}: bytes of one expert");
        let off = ckpt
            .offload(&OffloadConfig {
                io: IoMode::Direct,
                pack: Some(out.clone()),
                verify: true,
                ..OffloadConfig::per_layer(4)
            })
            .unwrap();
        let opts = GenerateOptions {
            max_new_tokens: golden.generated.len(),
            sampling: SamplingParams::default(),
            eos_token_ids: Vec::new(),
        };
        let (generated, _) =
            generate(&off.model, &golden.prompt_ids, &opts, &mut NoObserver, |_| Ok(())).unwrap();
        assert_eq!(generated, golden.generated, "{name}: greedy tokens from the pack");
    }
}
