//! GGUF checkpoints computed against llama.cpp itself (engine/tests/golden/make_gguf.py wrote
//! the files with llama.cpp's converter and `llama-quantize`, and llama.cpp's outputs on them
//! through llama-cpp-python): block dequantisation against gguf-py's, and for every file the
//! tokenizer, the logits of every prompt position and the greedy continuation against
//! llama.cpp's.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use shadowmoe_engine::ggml::BlockType;
use shadowmoe_engine::ggml::dot::{ActFormat, Acts, quantize_acts};
use shadowmoe_engine::sampling::argmax;
use shadowmoe_engine::{Checkpoint, LogitsFor, Model, NoObserver, Phase};

mod common;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/gguf")
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn dequantisation_equals_gguf_py_bit_for_bit() {
    let bytes = std::fs::read(dir().join("dequant.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("dequant.json")).unwrap()).unwrap();
    let mut checked = Vec::new();
    for (name, info) in meta["types"].as_object().unwrap() {
        let Some(ty) = BlockType::from_name(name) else {
            continue;
        };
        assert_eq!(
            ty.block_values() as u64,
            info["block_size"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(
            ty.block_bytes() as u64,
            info["type_size"].as_u64().unwrap(),
            "{name}"
        );
        let raw = st.tensor(&format!("{name}.bytes")).unwrap();
        let want = f32s(st.tensor(&format!("{name}.values")).unwrap().data());
        let mut got = vec![0.0f32; want.len()];
        ty.dequantize(raw.data(), &mut got);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{name} value {i}: {g} vs gguf-py {w}");
        }
        // One block at a time (the scalar path) gives the same.
        let mut one = vec![0.0f32; ty.block_values()];
        for (b, w) in raw
            .data()
            .chunks_exact(ty.block_bytes())
            .zip(want.chunks_exact(ty.block_values()))
        {
            ty.dequantize_block(b, &mut one);
            assert!(
                one.iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{name}"
            );
        }
        checked.push(name.clone());
    }
    assert_eq!(checked.len(), BlockType::ALL.len(), "types checked: {checked:?}");
}

/// The activations as ggml lays them out (`Q8_0`: f16 d + 32 i8; `Q8_1`: f16 d, f16 s + 32 i8;
/// `Q8_K`: f32 d + 256 i8 + 16 i16 sums).
fn ggml_bytes(format: ActFormat, a: &Acts) -> Vec<u8> {
    let h = |v: f32| half::f16::from_f32(v).to_bits().to_le_bytes();
    let mut out = Vec::new();
    match format {
        ActFormat::Q8_0 | ActFormat::Q8_1 => {
            for (i, q) in a.q.chunks_exact(32).enumerate() {
                out.extend(h(a.d[i]));
                if format == ActFormat::Q8_1 {
                    out.extend(h(a.s[i]));
                }
                out.extend(q.iter().map(|&v| v as u8));
            }
        }
        ActFormat::Q8_K => {
            for (i, q) in a.q.chunks_exact(256).enumerate() {
                out.extend(a.d[i].to_le_bytes());
                out.extend(q.iter().map(|&v| v as u8));
                for s in &a.sums[i * 16..(i + 1) * 16] {
                    out.extend((*s as i16).to_le_bytes());
                }
            }
        }
    }
    out
}

/// Against ggml's own CPU kernels (called by make_gguf.py through llama-cpp-python's
/// libggml-cpu): every type's activation rounding byte for byte, including rounding ties, zero
/// blocks and tied maxima, and its dot products within 1e-6 of the row's magnitude (the
/// summation order is ours; the integer sums are exact).
#[test]
fn activation_rounding_and_dot_products_equal_ggmls() {
    let bytes = std::fs::read(dir().join("dequant.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut checked = 0;
    for ty in BlockType::ALL.into_iter().filter(|t| !t.is_float()) {
        let name = ty.name();
        // IQ4_NL has dequantisation golden values but no dot products yet.
        let Ok(rows) = st.tensor(&format!("{name}.dot_rows")) else {
            assert_eq!(ty, BlockType::IQ4_NL, "{name}: no dot golden");
            continue;
        };
        let x = f32s(st.tensor(&format!("{name}.dot_x")).unwrap().data());
        let xq = st.tensor(&format!("{name}.dot_xq")).unwrap();
        let want = f32s(st.tensor(&format!("{name}.dot")).unwrap().data());
        let (r, t, k) = (rows.shape()[0], xq.shape()[0], x.len() / xq.shape()[0]);
        let rb = rows.shape()[1];
        assert_eq!(rb, ty.row_bytes(k), "{name}");
        let acts: Vec<Acts> = (0..t)
            .map(|i| {
                let mut a = Acts::default();
                quantize_acts(ty.act_format(), &x[i * k..(i + 1) * k], &mut a);
                a
            })
            .collect();
        for (i, a) in acts.iter().enumerate() {
            let ours = ggml_bytes(ty.act_format(), a);
            let theirs = &xq.data()[i * ours.len()..(i + 1) * ours.len()];
            assert!(
                ours == theirs,
                "{name}: token {i}'s {:?} activations differ from ggml's",
                ty.act_format()
            );
        }
        let mut got = vec![0.0f32; r * t];
        shadowmoe_engine::ggml::dot_rows(ty, rows.data(), r, k, &acts, &mut got);
        for row in 0..r {
            let w = {
                let mut v = vec![0.0f32; k];
                ty.dequantize(&rows.data()[row * rb..(row + 1) * rb], &mut v);
                v
            };
            for tok in 0..t {
                let mag: f32 = w
                    .iter()
                    .zip(&x[tok * k..(tok + 1) * k])
                    .map(|(a, b)| (a * b).abs())
                    .sum();
                let (g, e) = (got[row * t + tok], want[row * t + tok]);
                assert!(
                    (g - e).abs() <= 1e-6 * mag + 1e-30,
                    "{name} row {row} token {tok}: {g} vs ggml {e}"
                );
            }
        }
        checked += 1;
    }
    assert_eq!(checked, 11);
}

/// llama.cpp's outputs on one GGUF file.
struct Referee {
    prompt_ids: Vec<u32>,
    generated: Vec<u32>,
    prompt: String,
    prompt_tokens: Vec<u32>,
    chat_text: String,
    chat_tokens: Vec<u32>,
    /// `[T, V]`.
    logits: Vec<f32>,
    types: serde_json::Map<String, serde_json::Value>,
}

impl Referee {
    fn read(gguf: &Path) -> Self {
        let stem = gguf.with_extension("");
        let j: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(stem.with_extension("llama.json")).unwrap())
                .unwrap();
        let ids = |k: &str| -> Vec<u32> {
            j[k].as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect()
        };
        let st_bytes = std::fs::read(stem.with_extension("llama.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&st_bytes).unwrap();
        Referee {
            prompt_ids: ids("prompt_ids"),
            generated: ids("generated"),
            prompt: j["prompt"].as_str().unwrap().to_string(),
            prompt_tokens: ids("prompt_tokens"),
            chat_text: j["chat_text"].as_str().unwrap().to_string(),
            chat_tokens: ids("chat_tokens"),
            logits: f32s(st.tensor("logits").unwrap().data()),
            types: j["types"].as_object().unwrap().clone(),
        }
    }
}

fn referee_files() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .filter(|p| p.with_extension("llama.json").exists())
        .collect();
    v.sort();
    assert!(v.len() >= 9, "referee files: {v:?}");
    v
}

/// Greedy continuation from the prompt, one decode pass per token.
fn greedy(model: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut kv = model.new_cache();
    let logits = model
        .forward(prompt, &mut kv, Phase::Prefill, LogitsFor::Last, &mut NoObserver)
        .unwrap();
    let mut next = argmax(&Model::last_row(&logits));
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(next);
        let logits = model
            .forward(&[next], &mut kv, Phase::Decode, LogitsFor::Last, &mut NoObserver)
            .unwrap();
        next = argmax(&Model::last_row(&logits));
    }
    out
}

/// Files on which the engine gives llama.cpp's logits at every prompt position (within 1e-4):
/// their float sums differ from llama.cpp's only in summation order, and no 8-bit activation
/// rounds differently. (qwen3_next_gguf-bf16 has one position, 34, where a bf16 activation
/// rounds the other way: 1.9e-4 there, at most 5e-7 at the others.)
const EXACT: [&str; 11] = [
    "mixtral-f32",
    "mixtral-bf16",
    "mixtral-q4_k_m",
    "glm4_moe_gguf-q4_k_m",
    "deepseek_v3_gguf-f32",
    "gpt_oss_gguf-f32",
    "gpt_oss_mxfp4-f32",
    "qwen3_moe_gguf-q8_0",
    "qwen3_moe_gguf-q4_k_m",
    "qwen3_moe_wide-q4_k_m",
    "qwen3_next_gguf-q8_0",
];

/// Files of the sigmoid-routed families (glm4moe, deepseek2), whose routing is these fixtures'
/// most fragile: sigmoid scores plus a selection bias leave selection margins near 1e-4
/// (golden.json), which one activation rounding the other way upstream crosses. Measured
/// (2026-12-06, one-off patches to `ggml::dot::quantize_acts` and the bf16 rounding in
/// `kernels::linear` moving every other activation by one ulp before it is rounded): the
/// engine against itself diverges — glm4moe Q8_0 from position 24 (1.5 at most, three argmax
/// changes), Q4_K_M from 2; deepseek2 Q8_0 from 1 (1.4), Q4_K_M from 0 (1.9), bf16 from 21
/// (0.019) — where mixtral's bf16 and the Q8_0 files of qwen3_moe_gguf, mixtral and olmoe do
/// not move at all (glm4moe's bf16: from 16; and under `SHADOWMOE_SIMD=avx2` or `portable`,
/// whose bf16 sums run in another order, 1.4e-2 / 1.8e-2 from llama.cpp where AVX-512 gives
/// 3.9e-3). Against llama.cpp: glm4moe Q8_0 exact for 22 positions, deepseek2 bf16 for
/// 6 (then ≤ 0.017), Q8_0 for 34, Q4_K_M for 4 (then ≤ 1.8); glm4moe's Q4_K_M and deepseek2's
/// f32 exact everywhere (in [`EXACT`]). Asserted here: the first four positions and 90 % of
/// the argmaxes, not the greedy tokens.
const ROUTING_SENSITIVE: [&str; 5] = [
    "glm4_moe_gguf-bf16",
    "glm4_moe_gguf-q8_0",
    "deepseek_v3_gguf-bf16",
    "deepseek_v3_gguf-q8_0",
    "deepseek_v3_gguf-q4_k_m",
];

/// Every GGUF file against llama.cpp: tokenization exactly; logits within 1e-4 at every
/// position for [`EXACT`]; for the others, the positions before the first one where an 8-bit
/// activation rounds the other way (a float summed in another order lands on the other side of
/// a rounding boundary; these small models, whose routers are decisive, then move a logit by up
/// to 0.5 and carry it to later positions through attention) — and for f16 and bf16 files
/// within 1e-3 of the logit scale everywhere (llama.cpp's f16 path still differs from ours by
/// that much). Everywhere: the argmax at 90 % of positions and the first four greedy tokens.
#[test]
fn gguf_files_match_llama_cpp() {
    let mut report = Vec::new();
    for path in referee_files() {
        let stem = path.file_stem().unwrap().to_string_lossy().to_string();
        report.push(against_llama_cpp(&path, EXACT.contains(&stem.as_str())));
    }
    for line in &report {
        println!("{line}");
    }
}

/// One GGUF file against llama.cpp's referee outputs beside it, as [`gguf_files_match_llama_cpp`]
/// says (`exact`: within 1e-4 at every position); its report line.
fn against_llama_cpp(path: &Path, exact: bool) -> String {
    let stem = path.file_stem().unwrap().to_string_lossy().to_string();
    let name = stem.as_str();
    let r = Referee::read(path);
    let ckpt = Checkpoint::open(path.to_str().unwrap()).unwrap();
    let tok = ckpt.tokenizer().unwrap();
    assert_eq!(
        tok.encode(&r.prompt).unwrap(),
        r.prompt_tokens,
        "{name}: prompt tokens"
    );
    assert_eq!(
        tok.encode_with(&r.chat_text, false).unwrap(),
        r.chat_tokens,
        "{name}: chat tokens"
    );
    let model = ckpt.load_model().unwrap();
    let mut kv = model.new_cache();
    let logits = model
        .forward(
            &r.prompt_ids,
            &mut kv,
            Phase::Prefill,
            LogitsFor::All,
            &mut NoObserver,
        )
        .unwrap();
    let (t, v) = logits.dim();
    assert_eq!(t * v, r.logits.len(), "{name}");
    let ours = logits.as_slice().unwrap();
    let scale = r.logits.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let per_position: Vec<f32> = (0..t)
        .map(|i| {
            (0..v)
                .map(|j| (ours[i * v + j] - r.logits[i * v + j]).abs())
                .fold(0.0f32, f32::max)
        })
        .collect();
    let worst = per_position.iter().copied().fold(0.0f32, f32::max);
    let leading = per_position.iter().take_while(|d| **d <= 1e-4).count();
    if exact {
        assert_eq!(
            leading, t,
            "{name}: logits differ by {worst:e} (position {leading})"
        );
    } else if ROUTING_SENSITIVE.contains(&name) {
        assert!(
            leading >= 4,
            "{name}: logits differ within the first four positions ({per_position:?})"
        );
    } else if name.ends_with("-f16") || name.ends_with("-bf16") {
        assert!(
            worst <= 1e-3 * scale,
            "{name}: logits differ by {worst:e} (scale {scale})"
        );
    } else {
        assert!(
            leading >= 2,
            "{name}: logits differ from the first positions ({per_position:?})"
        );
    }
    let agree = (0..t)
        .filter(|&i| argmax(&ours[i * v..(i + 1) * v]) == argmax(&r.logits[i * v..(i + 1) * v]))
        .count();
    let sensitive = ROUTING_SENSITIVE.contains(&name);
    assert!(
        agree * 10 >= t * 9,
        "{name}: argmax agrees at {agree}/{t} positions"
    );
    let generated = greedy(&model, &r.prompt_ids, r.generated.len());
    let same = generated
        .iter()
        .zip(&r.generated)
        .take_while(|(a, b)| a == b)
        .count();
    assert!(
        sensitive || same >= 4,
        "{name}: greedy {generated:?} vs llama.cpp {:?}",
        r.generated
    );
    format!(
        "{name}: max |Δlogit| {worst:.1e} (scale {scale:.1}), first {leading}/{t} positions within 1e-4, argmax {agree}/{t}, greedy prefix {same}/{} ({:?})",
        r.generated.len(),
        r.types
    )
}

/// The bundled reference model as llama.cpp users would run it (make_gguf.py --reference:
/// models/reference/checkpoint converted to bf16 by llama.cpp's converter, then
/// `llama-quantize` Q8_0) against llama.cpp's outputs on that file, as every other GGUF file.
#[test]
fn reference_q8_0_gguf_matches_llama_cpp() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/reference/checkpoint-q8_0.gguf");
    println!("{}", against_llama_cpp(&path, false));
}

/// The float GGUF files against transformers' golden outputs for the checkpoints they were
/// converted from: mixtral's f32 file within 1e-4 before its sliding window (9) comes into
/// play (llama.cpp's converter does not carry Mixtral's window, so the file attends to every
/// position, as llama.cpp does); qwen3_moe's f16 file within 5e-3 everywhere (activations are
/// rounded to f16 for its matrices, as llama.cpp does) with transformers' greedy tokens.
#[test]
fn float_gguf_files_match_transformers() {
    for (file, fixture, positions, tol) in [
        ("mixtral-f32", "mixtral", 9, 1e-4f32),
        ("qwen3_moe_gguf-f16", "qwen3_moe_gguf", usize::MAX, 5e-3),
        // DeepSeek-V3 through llama.cpp's deepseek2 layout (k_b / v_b split, yarn from
        // yarn_log_multiplier, groups from expert_group_count): transformers' function.
        ("deepseek_v3_gguf-f32", "deepseek_v3_gguf", usize::MAX, 1e-4),
    ] {
        let golden = common::Golden::read(&common::fixture_dir(fixture));
        let path = dir().join(format!("{file}.gguf"));
        let ckpt = Checkpoint::open(path.to_str().unwrap()).unwrap();
        let model = ckpt.load_model().unwrap();
        let mut kv = model.new_cache();
        let logits = model
            .forward(
                &golden.prompt_ids,
                &mut kv,
                Phase::Prefill,
                LogitsFor::All,
                &mut NoObserver,
            )
            .unwrap();
        let v = golden.vocab;
        let n = positions.min(golden.prompt_ids.len());
        let ours = &logits.as_slice().unwrap()[..n * v];
        let diff = ours
            .iter()
            .zip(&golden.logits[..n * v])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            diff <= tol,
            "{file} vs transformers: logits differ by {diff:e} over {n} positions"
        );
        if positions == usize::MAX {
            let generated = greedy(&model, &golden.prompt_ids, golden.generated.len());
            assert_eq!(
                generated, golden.generated,
                "{file}: greedy tokens vs transformers"
            );
        }
    }
}

/// llama.cpp's pre-tokenizers the engine builds from `tokenizer.ggml.pre` — qwen2, llama3,
/// gpt-2, glm4 (GLM-4.5/4.7), gpt-4o (gpt-oss), deepseek-v3 (DeepSeek-V3/R1), kimi-k2 — on a
/// vocabulary
/// whose merges cross every boundary a split rule draws (make_gguf.py `pretok_golden`: the
/// pre-tokenizers give different ids on most texts): the engine's ids are llama.cpp's, text by
/// text.
#[test]
fn pre_tokenizers_split_as_llama_cpp_does() {
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("pretok/pretok.json")).unwrap()).unwrap();
    let texts: Vec<&str> = golden["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let ids = golden["ids"].as_object().unwrap();
    assert_eq!(ids.len(), 7, "{:?}", ids.keys());
    for (pre, want) in ids {
        let file = shadowmoe_engine::gguf::GgufFile::open(&dir().join(format!("pretok/{pre}.gguf"))).unwrap();
        let tok = shadowmoe_engine::tokenizer::Tokenizer::from_gguf(&file).unwrap();
        for (text, want) in texts.iter().zip(want.as_array().unwrap()) {
            let want: Vec<u32> = want
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(tok.encode_with(text, false).unwrap(), want, "{pre}: {text:?}");
        }
        // With special tokens: BOS first, as the file's add_bos_token asks.
        let want: Vec<u32> = golden["ids_add_special"][pre.as_str()]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(texts[0]).unwrap(), want, "{pre}: with BOS");
    }
}
