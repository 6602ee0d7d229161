//! The GGUF reader against llama.cpp's own: files written by llama.cpp's converter from the
//! repo's fixtures, and what gguf-py's GGUFReader read in them (engine/tests/golden/make_gguf.py
//! writes both). Every metadata key, type and value, every tensor's name, dims, type, offset,
//! length and bytes must be the same; damaged files get one-line errors, never a panic.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use sha2::Digest;
use shadowmoe_engine::gguf::{GgufFile, Value};

mod common;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/gguf")
}

fn goldens() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no golden GGUF files");
    v
}

fn to_json(v: &Value) -> serde_json::Value {
    use serde_json::json;
    match v {
        Value::U8(x) => json!(x),
        Value::I8(x) => json!(x),
        Value::U16(x) => json!(x),
        Value::I16(x) => json!(x),
        Value::U32(x) => json!(x),
        Value::I32(x) => json!(x),
        Value::F32(x) => json!(f64::from(*x)),
        Value::Bool(x) => json!(x),
        Value::String(x) => json!(x),
        Value::Array(_, items) => serde_json::Value::Array(items.iter().map(to_json).collect()),
        Value::U64(x) => json!(x),
        Value::I64(x) => json!(x),
        Value::F64(x) => json!(x),
    }
}

#[test]
fn reads_what_llama_cpp_wrote_as_gguf_py_reads_it() {
    for path in goldens() {
        let want: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path.with_extension("json")).unwrap()).unwrap();
        let f = GgufFile::open(&path).unwrap();
        let name = path.display();
        assert_eq!(u64::from(f.version), want["version"].as_u64().unwrap(), "{name}");
        assert_eq!(f.alignment, want["alignment"].as_u64().unwrap(), "{name}");
        assert_eq!(f.data_offset, want["data_offset"].as_u64().unwrap(), "{name}");
        let meta = want["metadata"].as_object().unwrap();
        assert_eq!(f.metadata.len(), meta.len(), "{name}");
        for (k, v) in &f.metadata {
            let w = &meta[k];
            assert_eq!(v.type_name(), w["type"].as_str().unwrap(), "{name}: {k}");
            if let Value::Array(item, _) = v {
                assert_eq!(*item, w["item_type"].as_str().unwrap(), "{name}: {k}");
            }
            assert_eq!(to_json(v), w["value"], "{name}: {k}");
        }
        let tensors = want["tensors"].as_array().unwrap();
        assert_eq!(f.tensors.len(), tensors.len(), "{name}");
        for (t, w) in f.tensors.iter().zip(tensors) {
            assert_eq!(t.name, w["name"].as_str().unwrap(), "{name}");
            let dims: Vec<u64> = w["dims"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .collect();
            assert_eq!(t.dims, dims, "{name}: {}", t.name);
            assert_eq!(t.ty.name, w["type"].as_str().unwrap(), "{name}: {}", t.name);
            assert_eq!(t.offset, w["offset"].as_u64().unwrap(), "{name}: {}", t.name);
            assert_eq!(t.n_bytes, w["n_bytes"].as_u64().unwrap(), "{name}: {}", t.name);
            let sha = format!("{:x}", sha2::Sha256::digest(f.data(t)));
            assert_eq!(sha, w["sha256"].as_str().unwrap(), "{name}: {}", t.name);
        }
        let arch = &meta["general.architecture"]["value"];
        assert_eq!(f.architecture(), arch.as_str(), "{name}");
        // Experts somewhere (glm4moe's first block is dense).
        assert!(
            f.tensors
                .iter()
                .any(|t| t.name.ends_with(".ffn_gate_exps.weight")),
            "{name}"
        );
    }
}

/// Damaged copies: one-line errors naming the file (and the tensor where one is at fault).
#[test]
fn damaged_files_get_one_line_errors() {
    let src = goldens()
        .into_iter()
        .find(|p| p.to_string_lossy().contains("bf16"))
        .unwrap();
    let bytes = std::fs::read(&src).unwrap();
    let good = GgufFile::open(&src).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("x.gguf");
    let try_open = |b: &[u8]| -> String {
        std::fs::write(&p, b).unwrap();
        let e = GgufFile::open(&p).unwrap_err().to_string();
        assert!(e.contains("x.gguf") && !e.contains('\n'), "{e}");
        e
    };
    let mut b = bytes.clone();
    b[0] = b'X';
    assert!(try_open(&b).contains("not a GGUF file"));
    let mut b = bytes.clone();
    b[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert!(try_open(&b).contains("version 1"));
    let last = good.tensors.last().unwrap();
    let e = try_open(&bytes[..(last.offset + last.n_bytes - 1) as usize]);
    assert!(
        e.contains("not within the file bounds") && e.contains(&last.name),
        "{e}"
    );
    let e = try_open(&bytes[..100]);
    assert!(e.contains("left in the file"), "{e}");
    // A metadata count no file could hold.
    let mut b = bytes.clone();
    b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(try_open(&b).contains("cannot fit"));

    // Mutations anywhere in the header: Ok or a one-line error, never a panic.
    let header = good.data_offset as usize;
    let mut rng = common::Rng(7);
    let n = common::fuzz_cases(300);
    let mut refused = 0;
    for case in 0..n {
        let mut b = bytes.clone();
        for _ in 0..=rng.below(3) {
            let at = rng.below(header);
            match rng.below(3) {
                0 => b[at] ^= 1 << rng.below(8),
                1 => b[at] = [0u8, 0xff, 0x7f, 0x80, 9][rng.below(5)],
                _ => {
                    let len = rng.below(8).min(b.len() - at);
                    b.drain(at..at + len);
                }
            }
        }
        std::fs::write(&p, &b).unwrap();
        let r = std::panic::catch_unwind(|| GgufFile::open(&p).map(|f| f.tensors.len()));
        match r {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                refused += 1;
                assert!(!e.to_string().contains('\n'), "case {case}: {e}");
            }
            Err(_) => panic!("GGUF case {case} panicked"),
        }
    }
    println!("gguf header: {n} cases, {refused} refused with a one-line error, 0 panics");
}

/// The position of tensor `name`'s ggml type id in a GGUF header (after its name, dimension
/// count and dimensions).
fn type_id_at(bytes: &[u8], name: &str, dims: usize) -> usize {
    let mut key = (name.len() as u64).to_le_bytes().to_vec();
    key.extend_from_slice(name.as_bytes());
    let at = bytes
        .windows(key.len())
        .position(|w| w == key.as_slice())
        .unwrap_or_else(|| panic!("{name} not in the header"));
    at + key.len() + 4 + 8 * dims
}

/// The position of metadata key `key`'s value type.
fn value_type_at(bytes: &[u8], key: &str) -> usize {
    let mut k = (key.len() as u64).to_le_bytes().to_vec();
    k.extend_from_slice(key.as_bytes());
    bytes.windows(k.len()).position(|w| w == k.as_slice()).unwrap() + k.len()
}

/// Checkpoints that parse as GGUF but cannot be run: one-line errors naming the tensor or key.
#[test]
fn unrunnable_gguf_checkpoints_get_one_line_errors() {
    use shadowmoe_engine::Checkpoint;
    let tmp = tempfile::tempdir().unwrap();
    let open = |name: &str, bytes: &[u8]| -> String {
        let p = tmp.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let e = match Checkpoint::open(p.to_str().unwrap()).and_then(|c| c.load_model().map(|_| ())) {
            Ok(()) => panic!("{name} was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(!e.contains('\n') && e.contains(name), "{e}");
        e
    };
    let mix = std::fs::read(dir().join("qwen3_moe_wide-mix.gguf")).unwrap();
    // A type the engine does not compute with: Q3_K's blocks relabelled IQ3_S (same geometry).
    let mut b = mix.clone();
    let at = type_id_at(&b, "blk.0.ffn_up_exps.weight", 3);
    assert_eq!(u32::from_le_bytes(b[at..at + 4].try_into().unwrap()), 11, "Q3_K");
    b[at..at + 4].copy_from_slice(&21u32.to_le_bytes());
    let e = open("iq3s.gguf", &b);
    assert!(
        e.contains("IQ3_S") && e.contains("blk.0.ffn_up_exps.weight"),
        "{e}"
    );
    // Metadata of the wrong type: block_count as f32.
    let mut b = mix.clone();
    let at = value_type_at(&b, "qwen3moe.block_count");
    b[at..at + 4].copy_from_slice(&6u32.to_le_bytes());
    let e = open("f32count.gguf", &b);
    assert!(
        e.contains("qwen3moe.block_count") && e.contains("unsigned integer"),
        "{e}"
    );
    // An architecture the engine does not run.
    let mut b = mix.clone();
    let at = value_type_at(&b, "general.architecture") + 4 + 8;
    b[at..at + 8].copy_from_slice(b"qwen3zzz");
    let e = open("arch.gguf", &b);
    assert!(
        e.contains("general.architecture") && e.contains("qwen3zzz"),
        "{e}"
    );
    // Rows that are not whole blocks: a Q4_0 matrix of 256-wide rows relabelled Q4_K (256 values
    // per block) is fine, but relabelled to a 256-value type on 64-wide rows is not.
    let small = std::fs::read(dir().join("qwen3_moe_gguf-q8_0.gguf")).unwrap();
    let mut b = small.clone();
    let at = type_id_at(&b, "blk.0.attn_q.weight", 2);
    b[at..at + 4].copy_from_slice(&12u32.to_le_bytes());
    let p = tmp.path().join("blocks.gguf");
    std::fs::write(&p, &b).unwrap();
    let e = Checkpoint::open(p.to_str().unwrap()).unwrap_err().to_string();
    assert!(
        !e.contains('\n') && e.contains("blocks.gguf") && e.contains("blk.0.attn_q.weight"),
        "{e}"
    );
    // qwen3next: a multi-token-prediction count that leaves no layer to run, and a layer
    // pattern of the wrong type.
    let next = std::fs::read(dir().join("qwen3_next_gguf-q8_0.gguf")).unwrap();
    let mut b = next.clone();
    let at = value_type_at(&b, "qwen3next.nextn_predict_layers");
    assert_eq!(u32::from_le_bytes(b[at..at + 4].try_into().unwrap()), 4, "UINT32");
    b[at + 4..at + 8].copy_from_slice(&5u32.to_le_bytes());
    let e = open("nextn.gguf", &b);
    assert!(e.contains("qwen3next.nextn_predict_layers"), "{e}");
    let mut b = next.clone();
    let at = value_type_at(&b, "qwen3next.attention.recurrent_layers");
    assert_eq!(
        u32::from_le_bytes(b[at + 4..at + 8].try_into().unwrap()),
        7,
        "array of BOOL"
    );
    b[at + 4..at + 8].copy_from_slice(&0u32.to_le_bytes()); // UINT8 items, one byte each
    let e = open("recurrent.gguf", &b);
    assert!(
        e.contains("qwen3next.attention.recurrent_layers") && e.contains("bools"),
        "{e}"
    );
    // glm4moe: a router gating other than sigmoid.
    let glm = std::fs::read(dir().join("glm4_moe_gguf-q8_0.gguf")).unwrap();
    let mut b = glm.clone();
    let at = value_type_at(&b, "glm4moe.expert_gating_func");
    assert_eq!(u32::from_le_bytes(b[at..at + 4].try_into().unwrap()), 4, "UINT32");
    b[at + 4..at + 8].copy_from_slice(&1u32.to_le_bytes());
    let e = open("gating.gguf", &b);
    assert!(
        e.contains("glm4moe.expert_gating_func") && e.contains("expected 2 (sigmoid)"),
        "{e}"
    );
    // deepseek2: softmax gating (DeepSeek-V2's router), which the engine does not run.
    let ds = std::fs::read(dir().join("deepseek_v3_gguf-q8_0.gguf")).unwrap();
    let mut b = ds.clone();
    let at = value_type_at(&b, "deepseek2.expert_gating_func");
    assert_eq!(u32::from_le_bytes(b[at..at + 4].try_into().unwrap()), 4, "UINT32");
    b[at + 4..at + 8].copy_from_slice(&1u32.to_le_bytes());
    let e = open("ds-gating.gguf", &b);
    assert!(
        e.contains("deepseek2.expert_gating_func") && e.contains("softmax gating (DeepSeek-V2)"),
        "{e}"
    );
    // A missing split.
    let p = tmp.path().join("model-00001-of-00002.gguf");
    std::fs::write(&p, &mix).unwrap();
    let e = Checkpoint::open(p.to_str().unwrap()).unwrap_err().to_string();
    assert!(e.contains("model-00002-of-00002.gguf"), "{e}");
}

/// glm4moe files (llama.cpp's converter on the glm4_moe_gguf fixture): the configuration from
/// `glm4moe.*` metadata and the tensors present is the fixture's own — partial rotary, q/k
/// norms, q/k/v biases, sigmoid routing with its scale and renormalisation, the shared expert,
/// the dense first layer.
#[test]
fn glm4moe_config_is_the_fixtures() {
    use shadowmoe_engine::Checkpoint;
    let src = Checkpoint::open_dir(&common::fixture_dir("glm4_moe_gguf")).unwrap();
    let want = &src.config;
    for file in ["glm4_moe_gguf-bf16", "glm4_moe_gguf-q8_0", "glm4_moe_gguf-q4_k_m"] {
        let path = dir().join(format!("{file}.gguf"));
        let c = Checkpoint::open(path.to_str().unwrap()).unwrap().config;
        assert_eq!(c.arch, want.arch, "{file}");
        assert_eq!(c.num_hidden_layers, want.num_hidden_layers, "{file}");
        assert_eq!(c.head_dim, want.head_dim, "{file}");
        assert_eq!(c.rope.head_dim, 16, "{file}: half of each head rotated");
        assert_eq!(c.rope.theta, want.rope.theta, "{file}");
        assert_eq!((c.qkv_bias, c.o_bias), (true, false), "{file}");
        assert_eq!(c.qk_norm, want.qk_norm, "{file}");
        assert_eq!(c.routing, want.routing, "{file}");
        assert_eq!(c.norm_topk_prob, want.norm_topk_prob, "{file}");
        assert_eq!(c.mlp_kinds, want.mlp_kinds, "{file}");
        assert_eq!(
            c.shared_expert_intermediate_size, want.shared_expert_intermediate_size,
            "{file}"
        );
        assert!(!c.shared_expert_gated, "{file}");
        assert_eq!(c.moe_intermediate_size, want.moe_intermediate_size, "{file}");
        assert_eq!(c.intermediate_size, want.intermediate_size, "{file}");
    }
}

/// deepseek2 files (llama.cpp's converter on the deepseek_v3_gguf fixture): the latent
/// attention shape, yarn and its softmax scale, the grouped sigmoid router, shared expert and
/// dense first layer come back from `deepseek2.*` metadata as the fixture's own config has
/// them; `kv_b_proj` is read split (`attn_k_b` / `attn_v_b`); the latent norms take the file's
/// epsilon (llama.cpp's).
#[test]
fn deepseek2_config_is_the_fixtures() {
    use shadowmoe_engine::Checkpoint;
    let src = Checkpoint::open_dir(&common::fixture_dir("deepseek_v3_gguf")).unwrap();
    let want = &src.config;
    for file in [
        "deepseek_v3_gguf-f32",
        "deepseek_v3_gguf-bf16",
        "deepseek_v3_gguf-q8_0",
        "deepseek_v3_gguf-q4_k_m",
    ] {
        let path = dir().join(format!("{file}.gguf"));
        let ckpt = Checkpoint::open(path.to_str().unwrap()).unwrap();
        let c = &ckpt.config;
        assert_eq!(c.arch, want.arch, "{file}");
        assert_eq!(c.num_key_value_heads, want.num_attention_heads, "{file}");
        let (m, w) = (c.mla.unwrap(), want.mla.unwrap());
        assert_eq!(
            (
                m.q_lora_rank,
                m.kv_lora_rank,
                m.qk_nope_head_dim,
                m.qk_rope_head_dim,
                m.v_head_dim
            ),
            (
                w.q_lora_rank,
                w.kv_lora_rank,
                w.qk_nope_head_dim,
                w.qk_rope_head_dim,
                w.v_head_dim
            ),
            "{file}"
        );
        assert!(m.rope_interleave, "{file}");
        assert!((m.softmax_scale - w.softmax_scale).abs() < 1e-6, "{file}");
        assert_eq!(m.latent_norm_eps, c.rms_norm_eps, "{file}");
        assert_eq!(c.rope.scaling, want.rope.scaling, "{file}");
        assert_eq!(c.routing, want.routing, "{file}");
        assert_eq!(c.norm_topk_prob, want.norm_topk_prob, "{file}");
        assert_eq!(c.mlp_kinds, want.mlp_kinds, "{file}");
        assert_eq!(
            c.shared_expert_intermediate_size, want.shared_expert_intermediate_size,
            "{file}"
        );
        assert!(
            ckpt.weights.contains("model.layers.1.self_attn.k_b_proj.weight"),
            "{file}"
        );
        assert!(
            !ckpt.weights.contains("model.layers.1.self_attn.kv_b_proj.weight"),
            "{file}"
        );
    }
}

/// gpt-oss files (llama.cpp's converter on the gpt_oss_gguf and gpt_oss_mxfp4 fixtures): the
/// sliding/full layer pattern, the window, the sinks, biases and clamped SwiGLU come back from
/// `gpt-oss.*` metadata as the fixtures' configs have them; yarn as llama.cpp computes it
/// (truncated correction range); the experts computed as llama.cpp computes them.
#[test]
fn gpt_oss_config_is_the_fixtures() {
    use shadowmoe_engine::Checkpoint;
    for (fixture, files) in [
        ("gpt_oss_gguf", ["gpt_oss_gguf-f32", "gpt_oss_gguf-q8_0"]),
        ("gpt_oss_mxfp4", ["gpt_oss_mxfp4-f32", "gpt_oss_mxfp4-q8_0"]),
    ] {
        let src = Checkpoint::open_dir(&common::fixture_dir(fixture)).unwrap();
        let want = &src.config;
        for file in files {
            let path = dir().join(format!("{file}.gguf"));
            let c = Checkpoint::open(path.to_str().unwrap()).unwrap().config;
            assert_eq!(c.arch, want.arch, "{file}");
            assert_eq!(c.head_dim, want.head_dim, "{file}");
            assert_eq!(c.sliding_windows, want.sliding_windows, "{file}");
            assert!(c.attention_sinks && c.qkv_bias && c.o_bias, "{file}");
            assert_eq!(c.routing, want.routing, "{file}");
            let (s, w) = (c.clamped_swiglu.unwrap(), want.clamped_swiglu.unwrap());
            assert_eq!((s.alpha, s.limit), (w.alpha, w.limit), "{file}");
            assert!(
                s.ggml && !w.ggml,
                "{file}: llama.cpp's arithmetic for the GGUF's experts"
            );
            assert_eq!(c.rope.theta, want.rope.theta, "{file}");
            assert_eq!(c.moe_intermediate_size, want.moe_intermediate_size, "{file}");
        }
    }
}

/// qwen3next files (llama.cpp's converter on the qwen3_next_gguf fixture): the configuration
/// from `qwen3next.*` metadata is the fixture's own, whether or not the file carries the
/// multi-token-prediction block (the q8_0 file does: block_count 5, nextn_predict_layers 1),
/// and that block's tensors are left out of the index.
#[test]
fn qwen3next_config_is_the_fixtures() {
    use shadowmoe_engine::Checkpoint;
    use shadowmoe_engine::config::Mixer;
    let src = Checkpoint::open_dir(&common::fixture_dir("qwen3_next_gguf")).unwrap();
    let want = &src.config;
    for file in [
        "qwen3_next_gguf-bf16",
        "qwen3_next_gguf-q8_0",
        "qwen3_next_gguf-q4_k_m",
    ] {
        let path = dir().join(format!("{file}.gguf"));
        let ckpt = Checkpoint::open(path.to_str().unwrap()).unwrap();
        let c = &ckpt.config;
        assert_eq!(c.arch, want.arch, "{file}");
        assert_eq!(c.num_hidden_layers, 4, "{file}");
        assert_eq!(c.mixers, want.mixers, "{file}");
        assert_eq!(c.mixers[3], Mixer::Attention, "{file}");
        assert_eq!(c.linear_attn, want.linear_attn, "{file}");
        assert_eq!(c.rope.head_dim, 8, "{file}: a quarter of each head rotated");
        assert_eq!(c.rope.head_dim, want.rope.head_dim, "{file}");
        assert_eq!(c.rope.theta, want.rope.theta, "{file}");
        assert_eq!(
            (
                c.hidden_size,
                c.head_dim,
                c.num_attention_heads,
                c.num_key_value_heads
            ),
            (
                want.hidden_size,
                want.head_dim,
                want.num_attention_heads,
                want.num_key_value_heads
            ),
            "{file}"
        );
        assert_eq!(
            (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size),
            (
                want.num_experts,
                want.num_experts_per_tok,
                want.moe_intermediate_size
            ),
            "{file}"
        );
        assert_eq!(
            c.shared_expert_intermediate_size, want.shared_expert_intermediate_size,
            "{file}"
        );
        assert_eq!(c.mlp_kinds, want.mlp_kinds, "{file}");
        assert_eq!(c.rms_norm_eps, want.rms_norm_eps, "{file}");
        assert!(c.norm_topk_prob && c.attn_output_gate, "{file}");
        // The converter stored the zero-centred norms as 1 + w.
        assert!(want.norm_zero_centred && !c.norm_zero_centred, "{file}");
        assert!(
            ckpt.unused_tensors().is_empty(),
            "{file}: {:?}",
            ckpt.unused_tensors()
        );
        assert!(
            !ckpt.weights.names().any(|n| n.starts_with("model.layers.4.")),
            "{file}: the MTP block is not indexed"
        );
    }
    let f = GgufFile::open(&dir().join("qwen3_next_gguf-q8_0.gguf")).unwrap();
    assert_eq!(f.get("qwen3next.block_count").and_then(Value::as_u64), Some(5));
    assert!(f.tensor("blk.4.nextn.eh_proj.weight").is_some());
}
