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
        c.insert("model_type".into(), Value::from("gpt_oss"));
    });
    assert_mentions(
        &load_error(&dir),
        &[
            "config.json",
            "unsupported model_type `gpt_oss`",
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
