//! Mutation fuzzing of every parser of outside bytes the engine has, on stable Rust: real
//! fixture files (a safetensors checkpoint, its `config.json` and `tokenizer.json`, an expert
//! pack's `index.json`, an MLX-quantised checkpoint) are mutated — bits flipped, bytes set to
//! values parsers trip on, numbers rewritten, spans duplicated or cut, files truncated — and
//! opened, loaded and run through a forward pass. Every case must end in `Ok` or a one-line
//! `Err`: a panic, or an error message spanning lines, fails the test with the case's seed.
//! (An out-of-bounds read is a panic in safe Rust; an allocation the process cannot make would
//! abort the test binary, which fails it too.)
//!
//! Budget: `SHADOWMOE_FUZZ_CASES` cases per target (default 300, what CI runs); the long run is
//! `SHADOWMOE_FUZZ_CASES=20000 cargo test --release -p shadowmoe-engine --test fuzz -- --nocapture`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use shadowmoe_engine::offload::{ExpertKey, IoMode, PageBuf};
use shadowmoe_engine::{Checkpoint, LogitsFor, NoObserver, Phase};

mod common;
use common::Rng;

fn golden(arch: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(arch)
}

fn cases() -> usize {
    common::fuzz_cases(300)
}

const INTERESTING: &[&[u8]] = &[
    b"0",
    b"-1",
    b"4294967296",
    b"18446744073709551615",
    b"1e308",
    b"NaN",
    b"null",
    b"\"\"",
    b"[]",
    b"{}",
    b"\"F64\"",
    b"\"I8\"",
    b"\"U32\"",
    b"99999999999",
];

/// One mutation of `bytes`, mostly within `hot` (the region parsers read: a header, a JSON
/// file) and now and then anywhere.
fn mutate(rng: &mut Rng, bytes: &[u8], hot: usize) -> Vec<u8> {
    let mut v = bytes.to_vec();
    let span = if rng.below(10) < 9 {
        hot.min(v.len())
    } else {
        v.len()
    };
    if span == 0 {
        return v;
    }
    for _ in 0..=rng.below(3) {
        let at = rng.below(span.min(v.len()).max(1));
        match rng.below(7) {
            0 => v[at] ^= 1 << rng.below(8),
            1 => v[at] = [0u8, 0xff, b'"', b'{', b'}', b'[', b',', b':', b'9', b'-'][rng.below(10)],
            2 => {
                // A number rewritten: the digits at `at` replaced with an interesting value.
                let end = (at..v.len()).find(|&i| !v[i].is_ascii_digit()).unwrap_or(v.len());
                let val = INTERESTING[rng.below(INTERESTING.len())];
                v.splice(at..end.max(at), val.iter().copied());
            }
            3 => {
                let len = rng.below(32).min(v.len() - at);
                let piece: Vec<u8> = v[at..at + len].to_vec();
                let to = rng.below(v.len());
                v.splice(to..to, piece);
            }
            4 => {
                let len = rng.below(32).min(v.len() - at);
                v.drain(at..at + len);
            }
            5 => v.truncate(at),
            _ => {
                let val = INTERESTING[rng.below(INTERESTING.len())];
                v.splice(at..at, val.iter().copied());
            }
        }
        if v.is_empty() {
            break;
        }
    }
    v
}

/// A copy of the fixture `src` in a new temporary folder.
fn copy_dir(src: &Path) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    tmp
}

/// Open, load and run the checkpoint in `dir` (every step may refuse, none may panic).
fn exercise(dir: &Path) -> shadowmoe_engine::Result<()> {
    let ckpt = Checkpoint::open_dir(dir)?;
    let tok = ckpt.tokenizer()?;
    let ids = tok.encode("def f(x):")?;
    let model = ckpt.load_model()?;
    let ids: Vec<u32> = ids
        .into_iter()
        .map(|t| t % ckpt.config.vocab_size as u32)
        .take(4)
        .collect();
    if ids.is_empty() {
        return Ok(());
    }
    let mut kv = model.new_cache();
    model.forward(&ids, &mut kv, Phase::Prefill, LogitsFor::Last, &mut NoObserver)?;
    Ok(())
}

/// Runs `cases()` mutations of `file` in a copy of `fixture`; returns (cases, refused).
fn fuzz_file(fixture: &Path, file: &str, hot: impl Fn(&[u8]) -> usize, seed: u64) -> (usize, usize) {
    let tmp = copy_dir(fixture);
    let target = tmp.path().join(file);
    let original = std::fs::read(&target).unwrap();
    let hot = hot(&original);
    let mut rng = Rng(seed);
    let mut refused = 0;
    let n = cases();
    for case in 0..n {
        let bytes = mutate(&mut rng, &original, hot);
        std::fs::write(&target, &bytes).unwrap();
        let outcome = std::panic::catch_unwind(|| exercise(tmp.path()));
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                refused += 1;
                let msg = e.to_string();
                assert!(
                    !msg.trim().contains('\n'),
                    "{file}, case {case} (seed {seed}): an error of several lines: {msg}"
                );
            }
            Err(_) => {
                let keep = std::env::temp_dir().join(format!("shadowmoe-fuzz-{file}-{seed}-{case}"));
                std::fs::write(&keep, &bytes).unwrap();
                panic!(
                    "{file}, case {case} (seed {seed}) panicked; the input is in {}",
                    keep.display()
                );
            }
        }
    }
    std::fs::write(&target, &original).unwrap();
    (n, refused)
}

/// The bytes a safetensors parser reads first: the length field and the JSON header.
fn safetensors_header(b: &[u8]) -> usize {
    let len = b
        .get(..8)
        .map_or(0, |h| u64::from_le_bytes(h.try_into().unwrap()) as usize);
    (8 + len).min(b.len())
}

#[test]
fn fuzz_safetensors_headers_configs_and_tokenizers() {
    let dir = golden("qwen3_moe");
    let shard = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("model-") && n.ends_with(".safetensors"))
        .min()
        .unwrap();
    let mut total = 0;
    for (file, seed) in [
        (shard.as_str(), 1u64),
        ("model.safetensors.index.json", 2),
        ("config.json", 3),
        ("tokenizer.json", 4),
    ] {
        let hot = |b: &[u8]| {
            if file.ends_with(".safetensors") {
                safetensors_header(b)
            } else {
                b.len()
            }
        };
        let (n, refused) = fuzz_file(&dir, file, hot, seed);
        println!("{file}: {n} cases, {refused} refused with a one-line error, 0 panics");
        total += n;
    }
    assert!(total >= 4 * cases());
}

#[test]
fn fuzz_mlx_quantised_checkpoint_header_and_config() {
    let dir = golden("mlx").join("qwen3_moe-q4g32");
    if !dir.exists() {
        // Which quantised fixtures exist is the golden script's business; take the first.
        let any = std::fs::read_dir(golden("mlx"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.join("config.json").exists())
            .min()
            .unwrap();
        return fuzz_quantised(&any);
    }
    fuzz_quantised(&dir);
}

fn fuzz_quantised(dir: &Path) {
    for (file, seed) in [("model.safetensors", 11u64), ("config.json", 12)] {
        if !dir.join(file).exists() {
            continue;
        }
        let hot = |b: &[u8]| {
            if file.ends_with(".safetensors") {
                safetensors_header(b)
            } else {
                b.len()
            }
        };
        let (n, refused) = fuzz_file(dir, file, hot, seed);
        println!("{}/{file}: {n} cases, {refused} refused, 0 panics", dir.display());
    }
}

/// The expert pack's index, with its checksum rewritten to match (so the mutations reach the
/// parser behind it), opened and every expert read.
#[test]
fn fuzz_expert_pack_index() {
    let src = golden("qwen3_moe");
    let ckpt = Checkpoint::open_dir(&src).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let pack = tmp.path().join("pack");
    shadowmoe_engine::offload::pack::write_pack(&src, &ckpt.config, &ckpt.weights, &pack, |_, _| {}).unwrap();
    let index = pack.join("index.json");
    let original = std::fs::read(&index).unwrap();
    let sum = std::fs::read_dir(&pack)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".sha256"))
        .expect("the pack's index checksum");
    let sha = ckpt.config_sha256().unwrap();
    let keys: Vec<ExpertKey> = ckpt
        .config
        .moe_layers()
        .iter()
        .flat_map(|&l| (0..ckpt.config.num_experts as u32).map(move |e| ExpertKey::new(l, e)))
        .collect();
    let mut rng = Rng(21);
    let (n, mut refused) = (cases(), 0);
    for case in 0..n {
        let bytes = mutate(&mut rng, &original, original.len());
        std::fs::write(&index, &bytes).unwrap();
        std::fs::write(&sum, shadowmoe_engine::offload::pack::sha256_bytes(&bytes)).unwrap();
        let outcome = std::panic::catch_unwind(|| -> shadowmoe_engine::Result<()> {
            let store = shadowmoe_engine::offload::pack::open_pack(&pack, &ckpt.config, &sha, IoMode::Pread)?;
            let mut buf = PageBuf::zeroed(store.slot_bytes());
            for &k in &keys {
                store.read_into(k, &mut buf)?;
            }
            Ok(())
        });
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                refused += 1;
                assert!(!e.to_string().trim().contains('\n'), "case {case}: {e}");
            }
            Err(_) => {
                let keep = std::env::temp_dir().join(format!("shadowmoe-fuzz-index-{case}.json"));
                std::fs::write(&keep, &bytes).unwrap();
                panic!(
                    "index.json case {case} panicked; the input is in {}",
                    keep.display()
                );
            }
        }
    }
    println!("pack index.json: {n} cases, {refused} refused with a one-line error, 0 panics");
}
