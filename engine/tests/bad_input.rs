//! Broken checkpoints get one clear error naming the file and the field or tensor — never a
//! panic. Each case starts from a real fixture copied to a temporary directory and breaks one
//! thing in it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use shadowmoe_engine::Checkpoint;

/// A copy of fixture `arch` that a test may break.
fn copy_fixture(arch: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(arch);
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(common::fixture_dir(arch)).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    (tmp, dir)
}

/// Rewrites the safetensors header of `path` with `edit`, keeping the data bytes.
fn edit_header(path: &Path, edit: impl FnOnce(&mut Map<String, Value>)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let mut text = serde_json::to_string(&header).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut Map<String, Value>)) {
    let p = dir.join("config.json");
    let mut cfg: Map<String, Value> = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&p, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
}

/// Opens and loads the model; returns the error message, which must be one line.
fn load_error(dir: &Path) -> String {
    let err = match Checkpoint::open_dir(dir).and_then(|c| c.load_model()) {
        Ok(_) => panic!("{} loaded although it is broken", dir.display()),
        Err(e) => e.to_string(),
    };
    assert_eq!(err.lines().count(), 1, "not one line: {err}");
    err
}

fn assert_mentions(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "error does not mention `{p}`: {err}");
    }
}

#[test]
fn missing_weights_file() {
    let (_t, dir) = copy_fixture("olmoe");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    assert_mentions(&load_error(&dir), &["model.safetensors", "not found", "weights"]);
}

#[test]
fn truncated_weights_file() {
    let (_t, dir) = copy_fixture("olmoe");
    let p = dir.join("model.safetensors");
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(len - 1000)
        .unwrap();
    assert_mentions(&load_error(&dir), &["model.safetensors", "truncated"]);
}

#[test]
fn file_too_short_for_a_header() {
    let (_t, dir) = copy_fixture("olmoe");
    std::fs::write(dir.join("model.safetensors"), b"abc").unwrap();
    assert_mentions(&load_error(&dir), &["model.safetensors", "too short"]);
}

#[test]
fn header_that_lies_about_offsets() {
    let (_t, dir) = copy_fixture("olmoe");
    let p = dir.join("model.safetensors");
    // One tensor claims more bytes than its shape needs.
    edit_header(&p, |h| {
        let off = &mut h["model.norm.weight"]["data_offsets"];
        let end = off[1].as_u64().unwrap();
        off[1] = Value::from(end + 4);
    });
    assert_mentions(
        &load_error(&dir),
        &["model.safetensors", "model.norm.weight", "data_offsets"],
    );

    // One tensor points past the end of the file.
    let (_t2, dir2) = copy_fixture("olmoe");
    let p2 = dir2.join("model.safetensors");
    edit_header(&p2, |h| {
        h["model.norm.weight"]["data_offsets"] = serde_json::json!([100_000_000, 100_000_256]);
    });
    assert_mentions(
        &load_error(&dir2),
        &["model.norm.weight", "data_offsets end at 100000256"],
    );
}

#[test]
fn tensor_with_the_wrong_shape_for_the_config() {
    let (_t, dir) = copy_fixture("olmoe");
    // Same bytes, transposed shape: a valid file whose tensor contradicts config.json.
    edit_header(&dir.join("model.safetensors"), |h| {
        let shape = h["model.layers.1.self_attn.q_proj.weight"]["shape"]
            .as_array_mut()
            .unwrap();
        shape.swap(0, 1);
        shape[0] = Value::from(shape[0].as_u64().unwrap() * 2);
        shape[1] = Value::from(shape[1].as_u64().unwrap() / 2);
    });
    assert_mentions(
        &load_error(&dir),
        &[
            "model.safetensors",
            "model.layers.1.self_attn.q_proj.weight",
            "expected [64, 64]",
            "config.json",
        ],
    );
}

#[test]
fn missing_tensor() {
    let (_t, dir) = copy_fixture("mixtral");
    let p = dir.join("model.safetensors");
    // Drop the last tensor by offset, so the remaining offsets still cover the data exactly...
    let mut dropped = String::new();
    edit_header(&p, |h| {
        let last = h
            .iter()
            .filter(|(k, _)| *k != "__metadata__")
            .max_by_key(|(_, v)| v["data_offsets"][1].as_u64().unwrap())
            .map(|(k, _)| k.clone())
            .unwrap();
        h.remove(&last);
        dropped = last;
    });
    // ...and cut its bytes off the end.
    let bytes = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let end = header
        .values()
        .filter_map(|v| v["data_offsets"][1].as_u64())
        .max()
        .unwrap() as usize;
    std::fs::write(&p, &bytes[..8 + n + end]).unwrap();
    assert_mentions(
        &load_error(&dir),
        &[&format!("tensor `{dropped}` not found"), "model.safetensors"],
    );
}

#[test]
fn shard_index_pointing_at_the_wrong_shard() {
    let (_t, dir) = copy_fixture("qwen3_moe");
    let p = dir.join("model.safetensors.index.json");
    let mut index: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    let map = index["weight_map"].as_object_mut().unwrap();
    let other = map
        .values()
        .find(|v| *v != &map["model.norm.weight"])
        .unwrap()
        .clone();
    map.insert("model.norm.weight".into(), other);
    std::fs::write(&p, serde_json::to_string(&index).unwrap()).unwrap();
    assert_mentions(
        &load_error(&dir),
        &[
            "model.norm.weight",
            "not found in this shard",
            "model.safetensors.index.json",
        ],
    );
}

#[test]
fn missing_config_field() {
    let (_t, dir) = copy_fixture("qwen2_moe");
    edit_config(&dir, |c| {
        c.remove("moe_intermediate_size");
    });
    assert_mentions(
        &load_error(&dir),
        &["config.json", "moe_intermediate_size", "missing"],
    );
}

#[test]
fn missing_config_file() {
    let (_t, dir) = copy_fixture("qwen2_moe");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    assert_mentions(&load_error(&dir), &["config.json", "not found"]);
}

#[test]
fn unknown_model_type() {
    let (_t, dir) = copy_fixture("qwen2_moe");
    edit_config(&dir, |c| {
        c.insert("model_type".into(), Value::from("dbrx"));
    });
    assert_mentions(
        &load_error(&dir),
        &[
            "config.json",
            "unsupported model_type `dbrx`",
            "qwen3_moe, olmoe, mixtral, qwen2_moe",
        ],
    );
}

#[test]
fn missing_tokenizer() {
    let (_t, dir) = copy_fixture("mixtral");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    // The model itself loads: only generation from text needs the tokenizer.
    let ckpt = Checkpoint::open_dir(&dir).unwrap();
    let err = ckpt.tokenizer().unwrap_err().to_string();
    assert_eq!(err.lines().count(), 1);
    assert_mentions(&err, &["tokenizer.json", "not found"]);
}

#[test]
fn corrupt_tokenizer() {
    let (_t, dir) = copy_fixture("mixtral");
    std::fs::write(dir.join("tokenizer.json"), "{ not json").unwrap();
    let err = Checkpoint::open_dir(&dir)
        .unwrap()
        .tokenizer()
        .unwrap_err()
        .to_string();
    assert_mentions(&err, &["tokenizer.json", "tokenizer:"]);
}

#[test]
fn unsupported_weight_dtype() {
    let (_t, dir) = copy_fixture("olmoe");
    edit_header(&dir.join("model.safetensors"), |h| {
        // F32 → I32: same size, but not a float the engine computes with.
        h["model.norm.weight"]["dtype"] = Value::from("I32");
    });
    assert_mentions(
        &load_error(&dir),
        &["model.norm.weight", "dtype I32 is not supported"],
    );
}

/// Writes `value` (f32 bits, or its top half for 2-byte dtypes) over element `i` of tensor
/// `name` in the safetensors file `path`.
fn poke(path: &Path, name: &str, i: usize, value: f32) {
    let mut bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let t = &header[name];
    let start = 8 + n + t["data_offsets"][0].as_u64().unwrap() as usize;
    match t["dtype"].as_str().unwrap() {
        "F32" => bytes[start + 4 * i..start + 4 * i + 4].copy_from_slice(&value.to_le_bytes()),
        "BF16" => bytes[start + 2 * i..start + 2 * i + 2]
            .copy_from_slice(&((value.to_bits() >> 16) as u16).to_le_bytes()),
        "F16" => bytes[start + 2 * i..start + 2 * i + 2]
            .copy_from_slice(&half::f16::from_f32(value).to_bits().to_le_bytes()),
        other => panic!("{other}"),
    }
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn nan_in_a_non_expert_weight_is_refused_at_load() {
    for (arch, file, name) in [
        ("olmoe", "model.safetensors", "model.norm.weight"),
        ("olmoe", "model.safetensors", "model.layers.1.mlp.gate.weight"),
        (
            "mixtral",
            "model.safetensors",
            "model.layers.0.self_attn.q_proj.weight",
        ),
    ] {
        let (_t, dir) = copy_fixture(arch);
        poke(&dir.join(file), name, 3, f32::NAN);
        assert_mentions(&load_error(&dir), &[file, name, "NaN or infinite"]);
    }
    let (_t, dir) = copy_fixture("olmoe");
    poke(
        &dir.join("model.safetensors"),
        "model.embed_tokens.weight",
        7,
        f32::INFINITY,
    );
    assert_mentions(
        &load_error(&dir),
        &["model.embed_tokens.weight", "NaN or infinite"],
    );
}

#[test]
fn nan_in_an_expert_is_refused_resident_packed_and_on_first_load() {
    use shadowmoe_engine::offload::{Budget, CacheOptions, IoMode, MissMode, PolicyKind, pack};
    use std::sync::Arc;
    let (_t, dir) = copy_fixture("olmoe");
    // olmoe's fused layout: element 0 of gate_up_proj is expert 0's gate, row 0.
    poke(
        &dir.join("model.safetensors"),
        "model.layers.2.mlp.experts.gate_up_proj",
        0,
        f32::NAN,
    );
    // All experts resident: refused at load.
    assert_mentions(
        &load_error(&dir),
        &["model.layers.2.mlp.experts.0.gate_proj", "NaN or infinite"],
    );
    let ckpt = Checkpoint::open_dir(&dir).unwrap();
    // expert-pack: refused while packing, and no pack is left behind.
    let out = dir.join("x.pack");
    let err = pack::write_pack(&ckpt.dir, &ckpt.config, &ckpt.weights, &out, |_, _| {})
        .unwrap_err()
        .to_string();
    assert_mentions(
        &err,
        &["model.layers.2.mlp.experts.0.gate_proj", "NaN or infinite"],
    );
    assert!(!out.exists(), "a pack was left behind");
    // Experts from disk: refused when the expert is first read, in every read mode.
    for io in [IoMode::Pread, IoMode::Mmap] {
        let store = Arc::new(ckpt.expert_store(io, None, false).unwrap());
        let opts = CacheOptions {
            budget: Budget::PerLayer(16),
            policy: PolicyKind::Lru,
            on_miss: MissMode::Sync,
            io_threads: 1,
            pinned: vec![],
            settle_loads: false,
            prefetch_readers: 0,
        };
        let (model, _) = ckpt.load_model_cached(store, &opts).unwrap();
        let prompt: Vec<u32> = (0..24u32).map(|i| (i * 7 + 3) % 300).collect();
        let mut cache = model.new_cache();
        let err = model
            .forward(
                &prompt,
                &mut cache,
                shadowmoe_engine::Phase::Prefill,
                shadowmoe_engine::LogitsFor::Last,
                &mut shadowmoe_engine::NoObserver,
            )
            .unwrap_err()
            .to_string();
        assert_mentions(
            &err,
            &[
                "layer 2 expert 0 gate_proj",
                "NaN or infinite",
                "model.safetensors",
            ],
        );
    }
}

#[test]
fn resident_weights_do_not_depend_on_the_file_after_load() {
    // Experts from a pack, the rest loaded: truncating model.safetensors under the running model
    // must not kill it (before: SIGBUS from the mapped norms and attention weights).
    use shadowmoe_engine::offload::{Budget, CacheOptions, IoMode, MissMode, PolicyKind, pack};
    use shadowmoe_engine::{GenerateOptions, NoObserver, SamplingParams, generate};
    use std::sync::Arc;
    let (_t, dir) = copy_fixture("mixtral");
    let ckpt = Checkpoint::open_dir(&dir).unwrap();
    let pack_dir = dir.join("experts.pack");
    pack::write_pack(&ckpt.dir, &ckpt.config, &ckpt.weights, &pack_dir, |_, _| {}).unwrap();
    let prompt: Vec<u32> = (0..12u32).map(|i| (i * 13 + 5) % 300).collect();
    let opts = GenerateOptions {
        max_new_tokens: 8,
        sampling: SamplingParams::default(),
        eos_token_ids: vec![],
    };
    let want = generate(
        &ckpt.load_model().unwrap(),
        &prompt,
        &opts,
        &mut NoObserver,
        |_| Ok(()),
    )
    .unwrap()
    .0;
    let store = Arc::new(ckpt.expert_store(IoMode::Pread, Some(&pack_dir), true).unwrap());
    let cache = CacheOptions {
        budget: Budget::PerLayer(4),
        policy: PolicyKind::Lru,
        on_miss: MissMode::Sync,
        io_threads: 1,
        pinned: vec![],
        settle_loads: false,
        prefetch_readers: 0,
    };
    let (model, _) = ckpt.load_model_cached(store, &cache).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("model.safetensors"))
        .unwrap()
        .set_len(0)
        .unwrap();
    let got = generate(&model, &prompt, &opts, &mut NoObserver, |_| Ok(()))
        .unwrap()
        .0;
    assert_eq!(got, want);
}

#[test]
fn bad_rope_and_norm_values_are_refused() {
    for (arch, key, edit) in [
        (
            "mixtral",
            "rope_parameters.rope_theta",
            serde_json::json!({"rope_theta": 0.0, "rope_type": "default"}),
        ),
        (
            "qwen3_moe",
            "rope_parameters.factor",
            serde_json::json!({"factor": 0.0, "original_max_position_embeddings": 64, "rope_theta": 1e6, "rope_type": "yarn"}),
        ),
        (
            "olmoe",
            "rope_parameters.factor",
            serde_json::json!({"factor": -2.0, "rope_theta": 1e4, "rope_type": "linear"}),
        ),
    ] {
        let (_t, dir) = copy_fixture(arch);
        edit_config(&dir, |c| {
            c.insert("rope_parameters".into(), edit);
        });
        assert_mentions(
            &load_error(&dir),
            &["config.json", key, "expected a finite number > 0"],
        );
    }
    let (_t, dir) = copy_fixture("mixtral");
    edit_config(&dir, |c| {
        c.insert("rms_norm_eps".into(), Value::from(-1e-5));
    });
    assert_mentions(&load_error(&dir), &["config.json", "rms_norm_eps", "≥ 0"]);
}

#[test]
fn absurd_or_contradictory_config_counts_are_refused() {
    let (_t, dir) = copy_fixture("mixtral");
    edit_config(&dir, |c| {
        c.insert("num_hidden_layers".into(), Value::from(1u64 << 40));
    });
    assert_mentions(
        &load_error(&dir),
        &["config.json", "num_hidden_layers", "absurdly large"],
    );

    let (_t, dir) = copy_fixture("mixtral");
    edit_config(&dir, |c| {
        c.insert("num_experts_per_tok".into(), Value::from(99));
    });
    assert_mentions(
        &load_error(&dir),
        &[
            "config.json",
            "num_experts_per_tok",
            "exceeds the number of experts",
        ],
    );

    // No head_dim key: the message names the keys that are in the file.
    let (_t, dir) = copy_fixture("mixtral");
    edit_config(&dir, |c| {
        c.insert("num_attention_heads".into(), Value::from(5));
        c.insert("num_key_value_heads".into(), Value::from(5));
    });
    let err = load_error(&dir);
    assert_mentions(&err, &["config.json", "num_attention_heads", "hidden_size = 64"]);
    assert!(!err.contains("field `head_dim`"), "{err}");
}

/// deepseek_v3's routing and attention keys that contradict each other (transformers would
/// fail on them, or pick experts from groups it dropped) are refused by key, in one line.
#[test]
fn contradictory_deepseek_v3_configs_are_refused() {
    for (edits, parts) in [
        (
            vec![("topk_group", Value::from(5))],
            vec!["topk_group", "5 (expected 1 to n_group = 4)"],
        ),
        (
            vec![("n_group", Value::from(3))],
            vec!["n_group", "3 does not divide n_routed_experts = 16"],
        ),
        (
            vec![("n_group", Value::from(16)), ("topk_group", Value::from(4))],
            vec!["n_group", "expected at least 2 per group"],
        ),
        (
            vec![("num_experts_per_tok", Value::from(9))],
            vec![
                "num_experts_per_tok",
                "exceeds the 8 experts that topk_group = 2 groups of 4 leave",
            ],
        ),
        (
            vec![("num_key_value_heads", Value::from(2))],
            vec!["num_key_value_heads", "2 ≠ num_attention_heads = 4"],
        ),
        (
            vec![("q_lora_rank", Value::from(0))],
            vec!["q_lora_rank", "must be at least 1 (or null"],
        ),
        (
            vec![("qk_rope_head_dim", Value::from(7))],
            vec!["qk_rope_head_dim", "expected an even number"],
        ),
        (
            vec![("routed_scaling_factor", Value::from(-1.0))],
            vec!["routed_scaling_factor", "expected a finite number > 0"],
        ),
        (
            vec![("scoring_func", Value::from("softmax"))],
            vec!["scoring_func", "`softmax` is not supported for deepseek_v3"],
        ),
        (
            vec![("moe_layer_freq", Value::from(0))],
            vec!["moe_layer_freq", "must be at least 1"],
        ),
    ] {
        let (_t, dir) = copy_fixture("deepseek_v3");
        edit_config(&dir, |c| {
            for (k, v) in edits {
                c.insert(k.into(), v);
            }
        });
        let mut want = vec!["config.json"];
        want.extend(parts);
        assert_mentions(&load_error(&dir), &want);
    }
    // A latent shape that disagrees with the tensors names the tensor.
    let (_t, dir) = copy_fixture("deepseek_v3");
    edit_config(&dir, |c| {
        c.insert("kv_lora_rank".into(), Value::from(24));
    });
    assert_mentions(
        &load_error(&dir),
        &["model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "[32, 64]"],
    );
    // The selection bias is part of the router: its absence is named (renamed away, so that
    // the offsets still cover the data).
    let (_t, dir) = copy_fixture("deepseek_v3");
    edit_header(&dir.join("model.safetensors"), |h| {
        let name = "model.layers.2.mlp.gate.e_score_correction_bias";
        let entry = h.remove(name).unwrap();
        h.insert(format!("{name}_renamed"), entry);
    });
    assert_mentions(
        &load_error(&dir),
        &["tensor `model.layers.2.mlp.gate.e_score_correction_bias` not found"],
    );
}

/// The GLM-4 MoE keys the engine reads beyond deepseek_v3's: each wrong value named by key.
#[test]
fn contradictory_glm4_moe_configs_are_refused() {
    for (fixture, key, value, parts) in [
        (
            "glm4_moe",
            "use_qk_norm",
            Value::from("yes"),
            vec!["use_qk_norm", "expected true or false"],
        ),
        (
            "glm4_moe",
            "rope_parameters",
            serde_json::json!({"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.3}),
            vec![
                "rope_parameters.partial_rotary_factor",
                "0.3 gives 9 rotated values of head_dim 32",
            ],
        ),
        (
            "glm4_moe",
            "topk_group",
            Value::from(5),
            vec!["topk_group", "n_group = 4"],
        ),
        (
            "glm4_moe_lite",
            "mlp_layer_types",
            Value::from(vec!["sparse", "dense"]),
            vec!["mlp_layer_types", "has 2 entries, expected num_hidden_layers = 3"],
        ),
        (
            "glm4_moe_lite",
            "mlp_layer_types",
            Value::from(vec!["sparse", "moe", "dense"]),
            vec!["mlp_layer_types[1]", "\"moe\" (expected \"dense\" or \"sparse\")"],
        ),
        (
            "glm4_moe_lite",
            "num_key_value_heads",
            Value::from(2),
            vec!["2 ≠ num_attention_heads = 4", "glm4_moe_lite's latent attention"],
        ),
    ] {
        let (_t, dir) = copy_fixture(fixture);
        edit_config(&dir, |c| {
            c.insert(key.into(), value.clone());
        });
        let mut want = vec!["config.json"];
        want.extend(parts);
        assert_mentions(&load_error(&dir), &want);
    }
    // A q/k norm the config asks for but the checkpoint lacks is named.
    let (_t, dir) = copy_fixture("glm4_moe");
    edit_header(&dir.join("model.safetensors"), |h| {
        let name = "model.layers.1.self_attn.k_norm.weight";
        let entry = h.remove(name).unwrap();
        h.insert(format!("{name}_renamed"), entry);
    });
    assert_mentions(
        &load_error(&dir),
        &["tensor `model.layers.1.self_attn.k_norm.weight` not found"],
    );
}

/// gpt_oss's keys and tensors: a non-positive SwiGLU limit, layer types that are not its own
/// or not one per layer, sliding layers without a window, another quantisation method, a
/// missing sink or MXFP4 scale tensor, an expert width that is not whole MXFP4 blocks: one line
/// naming the key or tensor.
#[test]
fn bad_gpt_oss_configs_and_tensors_are_refused() {
    let types = |v: &[&str]| Value::from(v.iter().map(|s| Value::from(*s)).collect::<Vec<_>>());
    for (fixture, edits, parts) in [
        (
            "gpt_oss",
            vec![("swiglu_limit", Value::from(-1.0))],
            vec!["swiglu_limit", "-1 (expected a finite number > 0)"],
        ),
        (
            "gpt_oss",
            vec![("swiglu_alpha", Value::from(0.0))],
            vec!["swiglu_alpha", "expected a finite number > 0"],
        ),
        (
            "gpt_oss",
            vec![(
                "layer_types",
                types(&["sliding_attention", "full_attention", "sliding_attention"]),
            )],
            vec!["layer_types", "has 3 entries, expected num_hidden_layers = 4"],
        ),
        (
            "gpt_oss",
            vec![(
                "layer_types",
                types(&[
                    "sliding_attention",
                    "linear_attention",
                    "sliding_attention",
                    "full_attention",
                ]),
            )],
            vec!["layer_types", "`linear_attention` is not a gpt_oss layer type"],
        ),
        (
            "gpt_oss",
            vec![("sliding_window", Value::Null)],
            vec![
                "sliding_window",
                "missing or 0 (required: some layers are sliding_attention)",
            ],
        ),
        (
            "gpt_oss_mxfp4",
            vec![("quantization_config", serde_json::json!({"quant_method": "fp8"}))],
            vec![
                "quantization_config.quant_method",
                "\"fp8\" checkpoints are not supported",
            ],
        ),
        (
            "gpt_oss_mxfp4",
            vec![("intermediate_size", Value::from(48))],
            vec![
                "model.layers.0.mlp.experts.down_proj_blocks",
                "rows of 48 values are not whole MXFP4 blocks of 32",
            ],
        ),
    ] {
        let (_t, dir) = copy_fixture(fixture);
        edit_config(&dir, |c| {
            for (k, v) in edits {
                c.insert(k.into(), v);
            }
        });
        let err = load_error(&dir);
        if !parts[0].starts_with("model.") {
            assert_mentions(&err, &["config.json"]);
        }
        assert_mentions(&err, &parts);
    }
    // A missing sink, a missing MXFP4 scale tensor: named (renamed away, so that the offsets
    // still cover the data).
    for (fixture, name) in [
        ("gpt_oss", "model.layers.1.self_attn.sinks"),
        ("gpt_oss_mxfp4", "model.layers.2.mlp.experts.gate_up_proj_scales"),
    ] {
        let (_t, dir) = copy_fixture(fixture);
        edit_header(&dir.join("model.safetensors"), |h| {
            let entry = h.remove(name).unwrap();
            h.insert(format!("{name}_renamed"), entry);
        });
        assert_mentions(&load_error(&dir), &[&format!("tensor `{name}` not found")]);
    }
    // A pack of gpt_oss's experts without their biases (its index edited, and its checksum
    // file removed as packs made before it have none): refused by key, not run without them.
    let ckpt = Checkpoint::open_dir(&common::fixture_dir("gpt_oss")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let pack = tmp.path().join("p.pack");
    shadowmoe_engine::offload::pack::write_pack(&ckpt.dir, &ckpt.config, &ckpt.weights, &pack, |_, _| {})
        .unwrap();
    let index = pack.join("index.json");
    let mut j: Map<String, Value> = serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    assert!(j.remove("biases").is_some(), "the pack holds the experts' biases");
    std::fs::write(&index, serde_json::to_string(&j).unwrap()).unwrap();
    std::fs::remove_file(pack.join(shadowmoe_engine::offload::pack::INDEX_SUM)).unwrap();
    let err = ckpt
        .expert_store(shadowmoe_engine::offload::IoMode::Pread, Some(&pack), false)
        .unwrap_err()
        .to_string();
    assert_mentions(&err, &["index.json", "biases", "missing"]);
}

#[test]
fn fewer_layers_in_the_config_than_in_the_checkpoint_are_reported() {
    let (_t, dir) = copy_fixture("mixtral");
    assert!(Checkpoint::open_dir(&dir).unwrap().unused_tensors().is_empty());
    edit_config(&dir, |c| {
        c.insert("num_hidden_layers".into(), Value::from(2));
    });
    let ckpt = Checkpoint::open_dir(&dir).unwrap();
    let unused = ckpt.unused_tensors();
    assert!(
        unused.iter().any(|n| n.starts_with("model.layers.3."))
            && unused.iter().all(|n| !n.starts_with("model.layers.1.")),
        "{unused:?}"
    );
}

#[test]
fn dtype_that_does_not_match_the_byte_length_names_the_tensor() {
    let (_t, dir) = copy_fixture("olmoe");
    edit_header(&dir.join("model.safetensors"), |h| {
        // F32 → I8: a quarter of the bytes the offsets span.
        h["model.norm.weight"]["dtype"] = Value::from("I8");
    });
    assert_mentions(
        &load_error(&dir),
        &[
            "model.safetensors",
            "model.norm.weight",
            "of I8 needs 64 bytes",
            "span 256",
        ],
    );
    let (_t, dir) = copy_fixture("olmoe");
    edit_header(&dir.join("model.safetensors"), |h| {
        h["model.norm.weight"]["shape"] = serde_json::json!([1u64 << 40, 1u64 << 40]);
    });
    assert_mentions(
        &load_error(&dir),
        &["model.norm.weight", "more elements than can be addressed"],
    );
}

#[test]
fn overlapping_offsets_are_refused() {
    let (_t, dir) = copy_fixture("olmoe");
    edit_header(&dir.join("model.safetensors"), |h| {
        // Two tensors of the same size on the same bytes.
        let a = h["model.layers.0.input_layernorm.weight"]["data_offsets"].clone();
        h["model.layers.0.post_attention_layernorm.weight"]["data_offsets"] = a;
    });
    assert_mentions(
        &load_error(&dir),
        &["model.safetensors", "overlap or leave a gap"],
    );
}

#[test]
fn header_length_past_the_end_of_the_file() {
    let (_t, dir) = copy_fixture("olmoe");
    let p = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&p, bytes).unwrap();
    assert_mentions(
        &load_error(&dir),
        &["model.safetensors", "header length field says", "truncated"],
    );
}

#[test]
fn missing_shard_named_by_the_index() {
    let (_t, dir) = copy_fixture("qwen3_moe");
    std::fs::remove_file(dir.join("model-00002-of-00003.safetensors")).unwrap();
    assert_mentions(
        &load_error(&dir),
        &["model-00002-of-00003.safetensors", "not found"],
    );
}

#[test]
fn tokenizer_of_another_vocabulary_is_refused() {
    let (_t, dir) = copy_fixture("mixtral");
    edit_config(&dir, |c| {
        c.insert("vocab_size".into(), Value::from(8192));
    });
    let err = Checkpoint::open_dir(&dir)
        .unwrap()
        .tokenizer()
        .unwrap_err()
        .to_string();
    assert_eq!(err.lines().count(), 1);
    assert_mentions(&err, &["tokenizer.json", "has 352 tokens", "vocab_size is 8192"]);
}

#[test]
fn broken_chat_template_is_blamed_on_its_own_file() {
    let (_t, dir) = copy_fixture("mixtral");
    std::fs::write(
        dir.join("chat_template.jinja"),
        "{% for m in messages %}{{ m.content ",
    )
    .unwrap();
    let tok = Checkpoint::open_dir(&dir).unwrap().tokenizer().unwrap();
    let err = tok
        .encode_chat(&[shadowmoe_engine::ChatMessage::user("hi".to_string())])
        .unwrap_err()
        .to_string();
    assert_mentions(&err, &["chat_template.jinja", "does not parse"]);
    assert!(!err.contains("tokenizer_config.json"), "{err}");
}

/// A fresh pack of the mixtral fixture, with its index edited by `edit`.
fn edited_pack(edit: impl FnOnce(&mut Value)) -> (tempfile::TempDir, Checkpoint, PathBuf) {
    use shadowmoe_engine::offload::pack;
    let (t, dir) = copy_fixture("mixtral");
    let ckpt = Checkpoint::open_dir(&dir).unwrap();
    let pack_dir = dir.join("experts.pack");
    pack::write_pack(&ckpt.dir, &ckpt.config, &ckpt.weights, &pack_dir, |_, _| {}).unwrap();
    let p = pack_dir.join("index.json");
    let mut index: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut index);
    std::fs::write(&p, serde_json::to_string_pretty(&index).unwrap()).unwrap();
    (t, ckpt, pack_dir)
}

fn store_error(ckpt: &Checkpoint, pack_dir: &Path, verify: bool) -> String {
    let err = ckpt
        .expert_store(shadowmoe_engine::offload::IoMode::Pread, Some(pack_dir), verify)
        .unwrap_err()
        .to_string();
    assert_eq!(err.lines().count(), 1, "not one line: {err}");
    err
}

#[test]
fn pack_index_edited_after_packing_is_refused() {
    // An edited offset: caught by the index's own checksum, with or without --verify.
    let (_t, ckpt, pack_dir) = edited_pack(|i| {
        i["parts"][1]["offset"] = Value::from(0);
    });
    for verify in [false, true] {
        assert_mentions(
            &store_error(&ckpt, &pack_dir, verify),
            &["index.json", "modified after packing", "index.json.sha256"],
        );
    }
}

#[test]
fn pack_index_whose_shapes_disagree_with_the_config_is_refused() {
    use shadowmoe_engine::offload::pack::INDEX_SUM;
    // Shapes edited and the checksum removed (as an older pack has none): the shapes are
    // still checked against config.json, and --verify asks for the checksum.
    let (_t, ckpt, pack_dir) = edited_pack(|i| {
        i["parts"][0]["shape"] = serde_json::json!([64, 64]);
    });
    std::fs::remove_file(pack_dir.join(INDEX_SUM)).unwrap();
    assert_mentions(
        &store_error(&ckpt, &pack_dir, false),
        &["index.json", "parts", "gate", "shape [64, 64]", "hidden_size"],
    );
    assert_mentions(
        &store_error(&ckpt, &pack_dir, true),
        &["--verify", INDEX_SUM, "make the pack again"],
    );

    let (_t2, ckpt, pack_dir) = edited_pack(|i| {
        i["experts"][0]["expert"] = Value::from(999);
    });
    std::fs::remove_file(pack_dir.join(INDEX_SUM)).unwrap();
    assert_mentions(
        &store_error(&ckpt, &pack_dir, false),
        &["index.json", "expert 999", "not an expert of this model"],
    );
}
