//! The `shadowmoe` binary end to end: its `logits` output, read back with the safetensors
//! crate, matches what transformers computed; bad input gets a one-line error, not a panic.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_shadowmoe"))
}

fn fixture(arch: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../engine/tests/golden")
        .join(arch)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn i64s(b: &[u8]) -> Vec<i64> {
    b.chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn logits_command_matches_the_golden_file() {
    for arch in ["mixtral", "qwen3_moe", "qwen3_next"] {
        let dir = fixture(arch);
        let golden_bytes = std::fs::read(dir.join("golden.safetensors")).unwrap();
        let golden = safetensors::SafeTensors::deserialize(&golden_bytes).unwrap();
        let ids = i64s(golden.tensor("prompt_ids").unwrap().data());
        let want_gen = i64s(golden.tensor("generated").unwrap().data());
        let tokens = ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",");

        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out.safetensors");
        let o = bin()
            .args([
                "logits",
                "--model",
                dir.to_str().unwrap(),
                "--tokens",
                &tokens,
                "--threads",
                "2",
            ])
            .args([
                "--generate",
                &want_gen.len().to_string(),
                "--out",
                out.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{arch}: {}", stderr(&o));
        assert!(
            !out.with_extension("safetensors.tmp").exists(),
            "temporary file left behind"
        );

        let ours_bytes = std::fs::read(&out).unwrap();
        let ours = safetensors::SafeTensors::deserialize(&ours_bytes).unwrap();
        let l = ours.tensor("logits").unwrap();
        assert_eq!(l.dtype(), safetensors::Dtype::F32);
        assert_eq!(l.shape(), golden.tensor("logits").unwrap().shape());
        let diff = f32s(l.data())
            .iter()
            .zip(f32s(golden.tensor("logits").unwrap().data()))
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(diff <= 1e-4, "{arch}: logits differ by {diff:e}");
        let re = ours.tensor("router_experts").unwrap();
        assert_eq!(re.dtype(), safetensors::Dtype::I64);
        assert_eq!(re.shape(), golden.tensor("router_experts").unwrap().shape());
        assert_eq!(
            i64s(re.data()),
            i64s(golden.tensor("router_experts").unwrap().data()),
            "{arch}"
        );
        assert_eq!(
            i64s(ours.tensor("generated").unwrap().data()),
            want_gen,
            "{arch}: greedy tokens"
        );
    }
}

/// With a small expert cache read from disk (and from an expert pack), `logits` still
/// matches transformers exactly; the metrics file says what happened.
#[test]
fn logits_through_the_expert_cache_match_the_golden_file() {
    let dir = fixture("qwen2_moe");
    let golden_bytes = std::fs::read(dir.join("golden.safetensors")).unwrap();
    let golden = safetensors::SafeTensors::deserialize(&golden_bytes).unwrap();
    let ids = i64s(golden.tensor("prompt_ids").unwrap().data());
    let want_gen = i64s(golden.tensor("generated").unwrap().data());
    let tokens = ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    let tmp = tempfile::tempdir().unwrap();
    let pack = tmp.path().join("pack");
    let o = bin()
        .args([
            "expert-pack",
            "--model",
            dir.to_str().unwrap(),
            "--out",
            pack.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    for extra in [
        vec!["--io", "pread"],
        vec!["--io", "direct", "--pack", pack.to_str().unwrap(), "--verify"],
        // Prefetching never changes the output.
        vec![
            "--io",
            "pread",
            "--predictor",
            "gate-lookahead",
            "--prefetch-depth",
            "1",
            // Inline: its prefetches are issued whatever the machine's load (an async
            // predictor starved of CPU may issue none in a run this short).
            "--predictor-timing",
            "inline",
        ],
    ] {
        let out = tmp.path().join("out.safetensors");
        let metrics = tmp.path().join("metrics.json");
        let o = bin()
            .args([
                "logits",
                "--model",
                dir.to_str().unwrap(),
                "--tokens",
                &tokens,
                "--capacity",
                "3",
            ])
            .args([
                "--generate",
                &want_gen.len().to_string(),
                "--out",
                out.to_str().unwrap(),
            ])
            .args(["--metrics-out", metrics.to_str().unwrap()])
            .args(&extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{extra:?}: {}", stderr(&o));
        let ours_bytes = std::fs::read(&out).unwrap();
        let ours = safetensors::SafeTensors::deserialize(&ours_bytes).unwrap();
        let diff = f32s(ours.tensor("logits").unwrap().data())
            .iter()
            .zip(f32s(golden.tensor("logits").unwrap().data()))
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(diff <= 1e-4, "{extra:?}: logits differ by {diff:e}");
        assert_eq!(
            i64s(ours.tensor("generated").unwrap().data()),
            want_gen,
            "{extra:?}"
        );
        let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&metrics).unwrap()).unwrap();
        assert_eq!(m["capacity"], 3);
        assert!(m["capacity_misses"].as_u64().unwrap() > 0, "{m}");
        assert_eq!(
            m["expert_source"],
            if extra.contains(&"--pack") {
                "pack"
            } else {
                "safetensors"
            }
        );
        if extra.contains(&"--predictor") {
            assert!(m["prefetch_issued"].as_u64().unwrap() > 0, "{m}");
            assert!(m["prefetch_used"].as_u64().unwrap() > 0, "{m}");
        }
        let acts = m["activations"].as_u64().unwrap();
        let parts = m["hits"].as_u64().unwrap()
            + m["cold_misses"].as_u64().unwrap()
            + m["capacity_misses"].as_u64().unwrap();
        assert_eq!(acts, parts, "{m}");
    }
    for (extra, want) in [
        (vec!["--predictor", "shadow:x"], "bench-sweep --mode live"),
        (vec!["--predictor", "popularity"], "--profile"),
        (
            vec!["--predictor", "gate-lookahead", "--prefetch-depth", "99"],
            "--prefetch-depth: 99",
        ),
        (vec!["--predictor", "oracle"], "--predictor: unknown `oracle`"),
    ] {
        let o = bin()
            .args(["logits", "--model", dir.to_str().unwrap(), "--tokens", &tokens])
            .args([
                "--capacity",
                "3",
                "--out",
                tmp.path().join("x.safetensors").to_str().unwrap(),
            ])
            .args(&extra)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        let err = stderr(&o);
        assert!(!o.status.success() && err.contains(want), "{extra:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}

#[test]
fn generate_streams_text_and_reports_speed() {
    let o = bin()
        .args([
            "generate",
            "--model",
            fixture("qwen3_moe").to_str().unwrap(),
            "--chat",
            "Which experts?",
        ])
        .args([
            "--max-new-tokens",
            "8",
            "--temperature",
            "0.7",
            "--top-k",
            "50",
            "--top-p",
            "0.9",
            "--seed",
            "1",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("prefill:") && err.contains("decode:") && err.contains("peak RSS"),
        "{err}"
    );
    assert!(!o.stdout.is_empty());
}

/// Each bad input: exit status 1, one line on stderr naming what is wrong, no panic.
#[test]
fn bad_input_gets_one_line_errors() {
    let model = fixture("olmoe");
    let m = model.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.safetensors");
    let o_ = out.to_str().unwrap();
    let tmp_dir = tmp.path().to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["logits", "--model", m, "--tokens", "1,two,3", "--out", o_],
            "--tokens: `two` is not a token id",
        ),
        (
            vec!["logits", "--model", m, "--tokens", "1,99999", "--out", o_],
            "--tokens: token id 99999 is outside the vocabulary",
        ),
        (
            vec![
                "logits",
                "--model",
                "/nonexistent/dir",
                "--tokens",
                "1",
                "--out",
                o_,
            ],
            "not a hub id",
        ),
        (
            vec![
                "logits",
                "--model",
                "NoSuchOrg/NoSuchModel",
                "--tokens",
                "1",
                "--out",
                o_,
            ],
            "no network is used",
        ),
        (
            vec!["generate", "--model", m, "--prompt", "hi", "--top-p", "0"],
            "--top-p",
        ),
        (
            vec![
                "logits",
                "--model",
                m,
                "--tokens",
                "1",
                "--out",
                "/nonexistent/dir/x.safetensors",
            ],
            "--out",
        ),
        (
            vec!["generate", "--model", m, "--prompt", "hi", "--threads", "10000"],
            "--threads: 10000 is more than this machine can use",
        ),
        (
            // A negative number is a value (before: clap read `-1` as a flag).
            vec!["generate", "--model", m, "--prompt", "hi", "--temperature", "-1"],
            "--temperature: expected a number >= 0",
        ),
        (
            vec!["logits", "--model", m, "--tokens", "1", "--out", tmp_dir],
            "is a folder",
        ),
    ];
    for (args, want) in cases {
        let o = bin()
            .args(&args)
            .env("HF_HUB_CACHE", tmp.path())
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.starts_with("error: ") && err.contains(want),
            "{args:?}: {err}"
        );
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: not one line: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    assert!(!out.exists());
    // Nothing half-written that looks complete.
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// `--pin PROFILE:K` with a real profile file: pinned experts load before the run and the
/// output stays exact; a profile of another model is refused.
#[test]
fn pinning_from_a_profile() {
    use sha2::Digest;
    let dir = fixture("olmoe");
    let sha: String = sha2::Sha256::digest(std::fs::read(dir.join("config.json")).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let layers = cfg["num_hidden_layers"].as_u64().unwrap();
    let experts = cfg["num_experts"].as_u64().unwrap();
    let layer_map: serde_json::Map<String, serde_json::Value> = (0..layers)
        .map(|l| {
            (
                l.to_string(),
                serde_json::json!({"activations": (0..experts).map(|e| (e * 7 + l) % 5).collect::<Vec<_>>()}),
            )
        })
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let write = |name: &str, sha: &str| {
        let p = tmp.path().join(name);
        let v = serde_json::json!({"format": "shadowmoe-profile/1", "model_id": "fixture", "config_sha256": sha, "layers": layer_map});
        std::fs::write(&p, v.to_string()).unwrap();
        p
    };
    let good = write("good.json", &sha);
    let other = write("other.json", "0000");
    let golden_bytes = std::fs::read(dir.join("golden.safetensors")).unwrap();
    let golden = safetensors::SafeTensors::deserialize(&golden_bytes).unwrap();
    let want_gen = i64s(golden.tensor("generated").unwrap().data());
    let tokens = i64s(golden.tensor("prompt_ids").unwrap().data())
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let out = tmp.path().join("o.safetensors");
    let metrics = tmp.path().join("m.json");
    let run = |pin: &std::path::Path| {
        bin()
            .args([
                "logits",
                "--model",
                dir.to_str().unwrap(),
                "--tokens",
                &tokens,
                "--generate",
                "16",
            ])
            .args(["--out", out.to_str().unwrap(), "--capacity", "4", "--io", "pread"])
            .args([
                "--pin",
                &format!("{}:2", pin.display()),
                "--metrics-out",
                metrics.to_str().unwrap(),
            ])
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    let o = run(&good);
    assert!(o.status.success(), "{}", stderr(&o));
    let ours_bytes = std::fs::read(&out).unwrap();
    let ours = safetensors::SafeTensors::deserialize(&ours_bytes).unwrap();
    assert_eq!(i64s(ours.tensor("generated").unwrap().data()), want_gen);
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&metrics).unwrap()).unwrap();
    assert_eq!(m["pinned_experts"].as_u64().unwrap(), 2 * layers);
    let o = run(&other);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("profile of another model"), "{}", stderr(&o));
}

/// `perplexity` on the golden prompt: the summed NLL equals the one transformers' logits give
/// (the referee's golden file); with experts behind a small cache it is the same under sync
/// misses (exact, bit for bit, in one pass per window or per token) and differs under skip.
#[test]
fn perplexity_matches_transformers_and_sync_misses_are_exact() {
    let dir = fixture("qwen3_moe");
    let golden_bytes = std::fs::read(dir.join("golden.safetensors")).unwrap();
    let golden = safetensors::SafeTensors::deserialize(&golden_bytes).unwrap();
    let ids = i64s(golden.tensor("prompt_ids").unwrap().data());
    let lt = golden.tensor("logits").unwrap();
    let vocab = lt.shape()[1];
    let logits = f32s(lt.data());
    let want: f64 = (0..ids.len() - 1)
        .map(|p| {
            let row = &logits[p * vocab..(p + 1) * vocab];
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let z: f64 = row.iter().map(|&x| f64::from(x - m).exp()).sum();
            z.ln() - f64::from(row[ids[p + 1] as usize] - m)
        })
        .sum();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("prompt.txt");
    std::fs::write(&text, meta["prompt"].as_str().unwrap()).unwrap();
    let run = |name: &str, extra: &[&str]| -> serde_json::Value {
        let out = tmp.path().join(format!("{name}.json"));
        let o = bin()
            .args(["perplexity", "--model", dir.to_str().unwrap(), "--threads", "2"])
            .args(["--text", text.to_str().unwrap(), "--out", out.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap()
    };
    let exact = run("exact", &[]);
    assert_eq!(
        exact["predicted_tokens"].as_u64().unwrap() as usize,
        ids.len() - 1
    );
    let nll = exact["nll_sum"].as_f64().unwrap();
    assert!(
        (nll - want).abs() < 1e-3 * (ids.len() as f64),
        "NLL {nll} against transformers' {want}"
    );
    let ppl = exact["perplexity"].as_f64().unwrap();
    assert!((ppl - (want / (ids.len() - 1) as f64).exp()).abs() / ppl < 1e-3);
    let cache = ["--capacity", "2", "--io", "pread"];
    let sync = run("sync", &cache);
    assert_eq!(sync["nll_sum"], exact["nll_sum"], "sync misses must be exact");
    let per_token = run("per_token", &[&cache[..], &["--per-token"]].concat());
    assert_eq!(per_token["passes"], "token");
    assert!((per_token["nll_sum"].as_f64().unwrap() - nll).abs() < 1e-4 * nll);
    let skip = run("skip", &[&cache[..], &["--on-miss", "skip"]].concat());
    assert_eq!(skip["passes"], "token");
    assert_ne!(
        skip["nll_sum"], exact["nll_sum"],
        "skip at capacity 2 dropped nothing?"
    );

    // Bad input: one-line errors naming the flag, nothing written.
    for (args, want) in [
        (vec!["--ctx", "1"], "--ctx"),
        (vec!["--text", "/nonexistent/t.txt"], "--text"),
    ] {
        let o = bin()
            .args(["perplexity", "--model", dir.to_str().unwrap()])
            .args(if args[0] == "--text" {
                vec![]
            } else {
                vec!["--text", text.to_str().unwrap()]
            })
            .args(&args)
            .output()
            .unwrap();
        assert!(!o.status.success());
        let e = stderr(&o);
        assert!(e.contains(want) && e.trim().lines().count() == 1, "{e}");
    }
}

/// A long generation's memory stays bounded: `generate --rss-every` prints the resident set
/// every N tokens beside the byte model's prediction; from token 200 to 1,000 the process may
/// grow by no more than what the byte model says the KV cache adds (reserved once: it never
/// moves), plus a fifth and 1 MiB of slack.
#[test]
fn long_generation_memory_grows_only_with_the_kv_cache() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/reference/checkpoint");
    let o = bin()
        .args(["generate", "--model", model.to_str().unwrap(), "--threads", "2"])
        .args(["--prompt", "def parse_args(argv):", "--max-new-tokens", "1000"])
        .args(["--capacity", "160", "--io", "pread", "--rss-every", "200"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    // "rss: token N: X MiB (byte model Y MiB)"
    let points: Vec<(usize, f64, f64)> = e
        .lines()
        .filter_map(|l| l.strip_prefix("rss: token "))
        .map(|l| {
            let n: Vec<f64> = l
                .split(|c: char| !(c.is_ascii_digit() || c == '.'))
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().unwrap())
                .collect();
            (n[0] as usize, n[1], n[2])
        })
        .collect();
    if points.len() < 5 {
        // Generation may end early at an end-of-sequence token; the bundled model's greedy
        // continuation of this prompt does not.
        panic!("expected RSS lines every 200 tokens up to 1,000: {e}");
    }
    let (first, last) = (points[0], points[points.len() - 1]);
    assert_eq!((first.0, last.0), (200, 1000), "{e}");
    let grew = last.1 - first.1;
    let kv = last.2 - first.2;
    assert!(kv > 0.0, "the byte model's KV term did not grow: {e}");
    assert!(
        grew <= 1.2 * kv + 1.0,
        "RSS grew {grew:.1} MiB, the KV cache {kv:.1}: {e}"
    );
    // And the byte model predicts the resident set itself, within 5 % at every point (its
    // overhead is the process's measured baseline before the weights load).
    for (n, rss, predicted) in &points {
        assert!(
            (rss - predicted).abs() <= 0.05 * predicted,
            "token {n}: RSS {rss:.1} MiB vs byte model {predicted:.1}: {e}"
        );
    }
}
