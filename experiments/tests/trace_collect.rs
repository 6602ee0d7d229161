//! `trace-collect` and `trace-stats` end to end on the real fixtures: rows read back equal what
//! the observer saw, routing equals the engine's logits pass, a killed collection resumes to
//! exactly the rows of an uninterrupted one, a second reader (pyarrow) reads the file, and bad
//! input gets one-line errors.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use polars::prelude::*;
use shadowmoe_engine::{
    Checkpoint, GenerateOptions, LogitsFor, Phase, RecordingObserver, SamplingParams, generate,
};
use shadowmoe_experiments::collect::{CollectArgs, run};
use shadowmoe_experiments::dataset;
use shadowmoe_trace::Trace;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fixture(arch: &str) -> PathBuf {
    root().join("engine/tests/golden").join(arch)
}

fn args(model: &Path, dataset: &Path, out: &Path) -> CollectArgs {
    CollectArgs {
        max_new_tokens: 6,
        limit: Some(4),
        threads: 1,
        flush_every: 2,
        ..CollectArgs::new(model.display().to_string(), dataset, out)
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Rows read back equal the observer's events: ids and weights exactly, hidden states within
/// f16 rounding; the prefill routing equals the engine's logits pass on the same ids.
#[test]
fn rows_read_back_equal_the_observed_events() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("qwen2_moe");
    let data = root().join("datasets/math.jsonl");
    let out = tmp.path().join("t.parquet");
    let mut a = args(&model, &data, &out);
    a.hidden_layers = "all".into();
    let c = run(&a, false).unwrap();
    assert!(out.exists() && !tmp.path().join("t.parquet.parts").exists());
    let trace = Trace::open(&out).unwrap();
    let m = &trace.manifest;
    let ckpt = Checkpoint::open_dir(&model).unwrap();
    assert_eq!(m.config_sha256, ckpt.config_sha256().unwrap());
    assert_eq!(
        m.dataset_sha256,
        shadowmoe_engine::offload::pack::sha256_file(&data).unwrap()
    );
    assert_eq!(
        (m.requests, m.top_k, m.hidden_size),
        (4, ckpt.config.num_experts_per_tok, ckpt.config.hidden_size)
    );
    assert_eq!(m.moe_layers, ckpt.config.moe_layers());
    assert_eq!(m.hidden_layers, ckpt.config.moe_layers());
    assert_eq!(m.architecture, "qwen2_moe");

    let reqs = trace.requests(None).unwrap();
    assert_eq!(reqs.len(), 4);
    let tok = ckpt.tokenizer().unwrap();
    let model_ = ckpt.load_model().unwrap();
    let (prompts, _) = dataset::load(&data).unwrap();
    let layer0 = m.moe_layers[0];
    let hidden = trace.hidden(layer0, None).unwrap();
    let mut hidden_row = 0;
    let mut total_rows = 0;
    for (r, p) in reqs.iter().zip(&prompts) {
        let ids = p.encode(&tok, true).unwrap();
        let mut obs = RecordingObserver {
            hidden_layers: m.moe_layers.clone(),
            ..Default::default()
        };
        let opts = GenerateOptions {
            max_new_tokens: 6,
            sampling: SamplingParams::default(),
            eos_token_ids: ckpt.eos_token_ids(),
        };
        let (out_ids, _) = generate(&model_, &ids, &opts, &mut obs, |_| Ok(())).unwrap();
        assert_eq!(r.tokens(), ids.len() + out_ids.len() - 1, "request {}", r.request);
        total_rows += obs.events.len();
        let mut events = obs.events.clone();
        events.sort_by_key(|e| (e.position, e.layer));
        for e in &events {
            let l = m.moe_layers.iter().position(|&x| x == e.layer).unwrap();
            let want: Vec<u16> = e.experts.iter().map(|&x| x as u16).collect();
            assert_eq!(r.experts_at(e.position, l), want.as_slice());
            let i = (e.position * r.layers + l) * r.k;
            assert_eq!(&r.weights[i..i + r.k], e.weights.as_slice());
            assert_eq!(r.token_ids[e.position], e.token_id);
            assert_eq!(r.phases[e.position], e.phase as u8);
            if e.layer == layer0 {
                let h = e.hidden.as_ref().unwrap();
                let got = &hidden.values[hidden_row * m.hidden_size..(hidden_row + 1) * m.hidden_size];
                assert_eq!(got, h.as_slice(), "f32 hidden states are stored exactly");
                hidden_row += 1;
            }
        }
        // Prefill routing = the engine's logits pass on the same ids.
        let mut rec = RecordingObserver::default();
        let mut cache = model_.new_cache();
        model_
            .forward(&ids, &mut cache, Phase::Prefill, LogitsFor::All, &mut rec)
            .unwrap();
        for e in &rec.events {
            let l = m.moe_layers.iter().position(|&x| x == e.layer).unwrap();
            let want: Vec<u16> = e.experts.iter().map(|&x| x as u16).collect();
            assert_eq!(r.experts_at(e.position, l), want.as_slice());
        }
    }
    assert_eq!(c.summary.rows as usize, total_rows);
    assert_eq!(hidden_row, hidden.request.len());
}

/// Polars and pyarrow read the same file and agree.
#[test]
fn a_second_reader_reads_the_trace() {
    let python = std::env::var("SHADOWMOE_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_pyarrow = Command::new(&python)
        .args(["-c", "import pyarrow, numpy"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_pyarrow {
        assert!(
            std::env::var_os("SHADOWMOE_REQUIRE_PYARROW").is_none(),
            "pyarrow and numpy are required here: pip install pyarrow numpy (or set SHADOWMOE_PYTHON)"
        );
        eprintln!("pyarrow not installed for {python}: the second-reader check is skipped (CI runs it)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("t.parquet");
    let mut a = args(&fixture("olmoe"), &root().join("datasets/code.jsonl"), &out);
    a.hidden_layers = "1".into();
    a.hidden_dtype = "f16".into();
    run(&a, false).unwrap();
    let o = Command::new(&python)
        .arg(root().join("experiments/tests/read_trace.py"))
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let py: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();

    let df = LazyFrame::scan_parquet(
        PlRefPath::new(out.to_string_lossy().as_ref()),
        ScanArgsParquet::default(),
    )
    .unwrap()
    .collect()
    .unwrap();
    assert_eq!(py["rows"].as_u64().unwrap() as usize, df.height());
    assert_eq!(py["manifest_requests"], 4);
    // polars writes 64-bit list offsets: pyarrow sees large_list.
    assert!(
        py["columns"]["experts"]
            .as_str()
            .unwrap()
            .ends_with("list<element: uint16>"),
        "{py}"
    );
    assert_eq!(py["columns"]["request"], "uint32");
    let trace = Trace::open(&out).unwrap();
    let reqs = trace.requests(None).unwrap();
    let sum_tok: u64 = reqs
        .iter()
        .map(|r| r.token_ids.iter().map(|&t| t as u64).sum::<u64>() * r.layers as u64)
        .sum();
    let sum_exp: u64 = reqs
        .iter()
        .flat_map(|r| r.experts.iter().map(|&e| e as u64))
        .sum();
    let sum_w: f64 = reqs
        .iter()
        .flat_map(|r| r.weights.iter().map(|&w| w as f64))
        .sum();
    assert_eq!(py["sum_token_id"].as_u64().unwrap(), sum_tok);
    assert_eq!(py["sum_experts"].as_u64().unwrap(), sum_exp);
    assert!((py["sum_weights"].as_f64().unwrap() - sum_w).abs() < 1e-6 * sum_w.max(1.0));
    let hidden = trace.hidden(1, None).unwrap();
    assert_eq!(py["hidden_rows"].as_u64().unwrap() as usize, hidden.request.len());
    let first: Vec<f64> = serde_json::from_value(py["first_hidden"].clone()).unwrap();
    for (a, b) in first.iter().zip(&hidden.values[..4]) {
        assert_eq!(*a as f32, *b);
    }
}

/// `trace-collect` on the qwen3_moe fixture and the code prompts into `out`, `new_tokens` per
/// prompt, one prompt per flushed part, one thread, hidden states of layer 2, then `extra`.
fn collect_cmd(out: &Path, new_tokens: &str, extra: &[&str]) -> Command {
    let (model, data) = (fixture("qwen3_moe"), root().join("datasets/code.jsonl"));
    let mut c = Command::new(env!("CARGO_BIN_EXE_trace-collect"));
    c.args([
        "--model",
        model.to_str().unwrap(),
        "--dataset",
        data.to_str().unwrap(),
    ])
    .args(["--out", out.to_str().unwrap(), "--max-new-tokens", new_tokens])
    .args(["--flush-every", "1", "--threads", "1", "--hidden-layers", "2"])
    .args(extra)
    .env("RUST_LOG", "warn");
    c
}

/// A collection killed mid-way leaves no file with the final name; `--resume` then completes
/// it with exactly the rows of an uninterrupted run.
#[test]
fn killed_collection_resumes_to_the_same_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let cmd = |out: &Path, extra: &[&str]| collect_cmd(out, "96", extra);
    let full = tmp.path().join("full.parquet");
    let o = cmd(&full, &[]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));

    let cut = tmp.path().join("cut.parquet");
    let parts = tmp.path().join("cut.parquet.parts");
    let mut child = cmd(&cut, &[]).spawn().unwrap();
    let start = std::time::Instant::now();
    loop {
        let n = std::fs::read_dir(&parts).map(|d| d.count()).unwrap_or(0);
        if n >= 4 || start.elapsed().as_secs() > 60 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "the collection finished before it could be killed: make it longer"
    );
    assert!(
        !cut.exists(),
        "a killed collection left a file with the final name"
    );
    assert!(parts.exists());

    // Without --resume: refused, nothing touched.
    let o = cmd(&cut, &[]).output().unwrap();
    assert!(stderr(&o).contains("--resume"), "{}", stderr(&o));
    let o = cmd(&cut, &["--resume"]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(cut.exists() && !parts.exists());

    let read = |p: &Path| {
        LazyFrame::scan_parquet(
            PlRefPath::new(p.to_string_lossy().as_ref()),
            ScanArgsParquet::default(),
        )
        .unwrap()
        .collect()
        .unwrap()
    };
    let (a, b) = (read(&full), read(&cut));
    assert_eq!(a.height(), b.height());
    assert!(
        a.equals_missing(&b),
        "resumed rows differ from an uninterrupted run"
    );
}

/// A disk that fills while the collection writes (here: a file-size limit on the process, so
/// that writing the final file fails with EFBIG as a full disk fails with ENOSPC): a one-line
/// error, no file under the final name, every part already written kept; `--resume` on a disk
/// with room then completes it with exactly the rows of an uninterrupted run.
#[test]
#[cfg(target_os = "linux")]
fn a_disk_that_fills_loses_nothing_and_resume_completes() {
    use std::os::unix::process::CommandExt;
    let tmp = tempfile::tempdir().unwrap();
    let cmd = |out: &Path, extra: &[&str]| collect_cmd(out, "24", extra);
    let full = tmp.path().join("full.parquet");
    let o = cmd(&full, &[]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let whole = std::fs::metadata(&full).unwrap().len();

    // Room for every part (one prompt each) but not for the final file.
    let cut = tmp.path().join("cut.parquet");
    let parts = tmp.path().join("cut.parquet.parts");
    let limit = whole / 2;
    let mut c = cmd(&cut, &[]);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        c.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let l = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &l) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let o = c.output().unwrap();
    let e = stderr(&o);
    assert!(!o.status.success(), "the collection fitted in {limit} bytes: {e}");
    let last = e.trim().lines().last().unwrap_or_default();
    assert!(last.contains("cut.parquet"), "the error names no file: {e}");
    assert!(!cut.exists(), "a failed write left a file with the final name");
    let kept = std::fs::read_dir(&parts).map(|d| d.count()).unwrap_or(0);
    assert!(
        kept > 0,
        "the parts written before the disk filled were lost: {e}"
    );

    let o = cmd(&cut, &["--resume"]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(cut.exists() && !parts.exists());
    let read = |p: &Path| {
        LazyFrame::scan_parquet(
            PlRefPath::new(p.to_string_lossy().as_ref()),
            ScanArgsParquet::default(),
        )
        .unwrap()
        .collect()
        .unwrap()
    };
    let (a, b) = (read(&full), read(&cut));
    assert!(
        a.equals_missing(&b),
        "resumed rows differ from an uninterrupted run"
    );
}

#[test]
fn sharded_collections_concatenate_to_the_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("mixtral");
    let data = root().join("datasets/chat.jsonl");
    let whole = tmp.path().join("w.parquet");
    run(&args(&model, &data, &whole), false).unwrap();
    let mut rows = 0;
    let mut requests = Vec::new();
    for i in 0..2 {
        let out = tmp.path().join(format!("s{i}.parquet"));
        let mut a = args(&model, &data, &out);
        a.shard = Some(format!("{i}/2"));
        run(&a, false).unwrap();
        let t = Trace::open(&out).unwrap();
        let reqs = t.requests(None).unwrap();
        rows += reqs.iter().map(|r| r.tokens() * r.layers).sum::<usize>();
        requests.extend(reqs.into_iter().map(|r| r.request));
    }
    requests.sort();
    let w = Trace::open(&whole).unwrap().requests(None).unwrap();
    assert_eq!(requests, w.iter().map(|r| r.request).collect::<Vec<_>>());
    assert_eq!(rows, w.iter().map(|r| r.tokens() * r.layers).sum::<usize>());
}

/// `--no-chat-template`: a chat prompt is its messages' contents joined by blank lines, as raw
/// text; the manifest says so.
#[test]
fn chat_prompts_without_the_template() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("qwen3_moe");
    let data = root().join("datasets/tools.jsonl"); // every prompt a chat
    let out = tmp.path().join("raw.parquet");
    let mut a = args(&model, &data, &out);
    a.no_chat_template = true;
    a.limit = Some(2);
    run(&a, false).unwrap();
    let t = Trace::open(&out).unwrap();
    assert!(!t.manifest.chat_template);
    let tok = Checkpoint::open_dir(&model).unwrap().tokenizer().unwrap();
    let first: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&data).unwrap().lines().next().unwrap()).unwrap();
    let text: Vec<&str> = first["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    let want = tok.encode(&text.join("\n\n")).unwrap();
    let reqs = t.requests(None).unwrap();
    let r = reqs.iter().find(|r| r.request == 0).unwrap();
    let prefill: Vec<u32> = r
        .token_ids
        .iter()
        .zip(&r.phases)
        .filter(|(_, p)| **p == 0)
        .map(|(t, _)| *t)
        .collect();
    assert_eq!(prefill, want, "the raw chat prompt's tokens");
}

/// `trace-stats` on a real trace: the table, the outputs, and a profile that `--pin` accepts.
#[test]
fn trace_stats_and_profile() {
    use shadowmoe_experiments::trace_stats::{StatsArgs, run as stats};
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("t.parquet");
    let model = fixture("olmoe");
    run(&args(&model, &root().join("datasets/tools.jsonl"), &out), false).unwrap();
    let profile = tmp.path().join("p.json");
    let a = StatsArgs {
        trace: out.clone(),
        out: Some(tmp.path().join("stats")),
        profile: Some(profile.clone()),
        no_profile: false,
        pin_threshold: 0.5,
        batch: 2,
        by_domain: true,
    };
    let table = stats(&a).unwrap();
    let ckpt = Checkpoint::open_dir(&model).unwrap();
    assert_eq!(
        table.lines().take_while(|l| !l.is_empty()).count(),
        1 + ckpt.config.moe_layers().len(),
        "{table}"
    );
    assert!(table.contains("Jensen-Shannon"), "{table}");
    for f in ["stats.json", "layers.parquet", "coactivation.parquet"] {
        assert!(tmp.path().join("stats").join(f).exists(), "{f}");
    }
    let p = shadowmoe_engine::offload::Profile::read(&profile).unwrap();
    assert_eq!(p.config_sha256, ckpt.config_sha256().unwrap());
    let total: u64 = p.layers.values().map(|l| l.activations.iter().sum::<u64>()).sum();
    let trace = Trace::open(&out).unwrap();
    let rows: u64 = trace
        .requests(None)
        .unwrap()
        .iter()
        .map(|r| (r.tokens() * r.layers * r.k) as u64)
        .sum();
    assert_eq!(total, rows);
    let keys = p
        .top_k(&profile, &ckpt.config.moe_layers(), ckpt.config.num_experts, 2)
        .unwrap();
    assert_eq!(keys.len(), 2 * ckpt.config.moe_layers().len());

    // The locality columns read back from layers.parquet agree with a brute-force count over
    // the trace: every pair of tokens of a request, every pair of tokens 1 and 2 apart.
    assert!(table.contains("lift"), "{table}");
    let layers = LazyFrame::scan_parquet(
        PlRefPath::new(tmp.path().join("stats/layers.parquet").to_string_lossy().as_ref()),
        ScanArgsParquet::default(),
    )
    .unwrap()
    .collect()
    .unwrap();
    let col = |name: &str| -> Vec<f64> {
        let c = layers.column(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        c.f64().unwrap().into_no_null_iter().collect()
    };
    let reqs = trace.requests(None).unwrap();
    let common = |a: &[u16], b: &[u16]| a.iter().filter(|x| b.contains(x)).count() as f64;
    let k = reqs[0].k as f64;
    for l in 0..ckpt.config.moe_layers().len() {
        let (mut pair, mut pairs, mut d, mut dn) = (0.0, 0.0, [0.0; 2], [0.0; 2]);
        for r in &reqs {
            for t in 0..r.tokens() {
                for u in t + 1..r.tokens() {
                    let c = common(r.experts_at(t, l), r.experts_at(u, l));
                    pair += c;
                    pairs += 1.0;
                    if u - t <= 2 {
                        d[u - t - 1] += c;
                        dn[u - t - 1] += 1.0;
                    }
                }
            }
        }
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(
            close(col("request_pair_overlap")[l], pair / pairs / k),
            "layer {l}"
        );
        assert!(close(col("overlap_d1")[l], d[0] / dn[0] / k), "layer {l}");
        assert!(close(col("overlap_d2")[l], d[1] / dn[1] / k), "layer {l}");
        assert!(
            close(col("prev_token_overlap")[l], col("overlap_d1")[l]),
            "layer {l}"
        );
        assert!(close(
            col("locality_lift")[l],
            col("overlap_d1")[l] / col("request_pair_overlap")[l]
        ));
        let cross = col("cross_request_overlap")[l];
        assert!((0.0..=1.0).contains(&cross), "layer {l}: {cross}");
    }
}

/// Bad input: one line on stderr naming the file, line, flag or field; exit status 1.
/// `--max-new-tokens 0` is a teacher-forced trace of the prompts: the same prefill rows as a
/// run that generates (prefill must not depend on generating), and no decode rows. With experts
/// served from disk (`--capacity`) the rows are the same again.
#[test]
fn prefill_only_traces_and_offloaded_collection() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("qwen3_moe");
    let data = root().join("datasets/code.jsonl");
    let rows = |new: usize, capacity: Option<usize>, name: &str| {
        let out = tmp.path().join(name);
        let a = CollectArgs {
            max_new_tokens: new,
            capacity,
            ..args(&model, &data, &out)
        };
        run(&a, false).unwrap();
        Trace::open(&out).unwrap().requests(None).unwrap()
    };
    let zero = rows(0, None, "zero.parquet");
    let one = rows(1, None, "one.parquet");
    let offloaded = rows(3, Some(5), "off.parquet");
    let generated = rows(3, None, "gen.parquet");
    assert_eq!(zero.len(), one.len());
    let mut prefill = 0;
    for (z, o) in zero.iter().zip(&one) {
        assert!(
            z.tokens() > 0 && z.phases.iter().all(|&p| p == 0),
            "decode rows at 0 new tokens"
        );
        assert_eq!(z.tokens(), o.phases.iter().filter(|&&p| p == 0).count());
        for t in 0..z.tokens() {
            for l in 0..z.layers {
                assert_eq!(z.experts_at(t, l), o.experts_at(t, l));
            }
        }
        prefill += z.tokens();
    }
    assert!(prefill > 0);
    for (a, b) in offloaded.iter().zip(&generated) {
        assert_eq!(
            (a.token_ids.clone(), a.experts.clone()),
            (b.token_ids.clone(), b.experts.clone())
        );
    }
}

#[test]
fn bad_input_gets_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_trace-collect");
    let model = fixture("qwen3_moe");
    let good = root().join("datasets/chat.jsonl");
    let not_json = tmp.path().join("bad.jsonl");
    std::fs::write(
        &not_json,
        "{\"id\": \"a\", \"domain\": \"chat\", \"prompt\": \"hi\"}\n{oops\n",
    )
    .unwrap();
    let no_field = tmp.path().join("nofield.jsonl");
    std::fs::write(&no_field, "{\"id\": \"a\", \"domain\": \"chat\"}\n").unwrap();
    let file_as_dir = tmp.path().join("plainfile");
    std::fs::write(&file_as_dir, "x").unwrap();
    let out = tmp.path().join("o.parquet");
    let o_ = out.to_str().unwrap();
    let m = model.to_str().unwrap();
    let cases: Vec<(Vec<String>, String)> = vec![
        (
            vec![not_json.display().to_string(), o_.into()],
            format!("{}:2: not JSON", not_json.display()),
        ),
        (
            vec![no_field.display().to_string(), o_.into()],
            format!("{}:1: needs exactly one of `prompt`", no_field.display()),
        ),
        (
            vec![
                good.display().to_string(),
                format!("{}/x.parquet", file_as_dir.display()),
            ],
            "plainfile".into(),
        ),
        (
            vec!["/no/such.jsonl".into(), o_.into()],
            "--dataset: cannot read /no/such.jsonl".into(),
        ),
    ];
    for (a, want) in cases {
        let o = Command::new(bin)
            .args(["--model", m, "--dataset", &a[0], "--out", &a[1]])
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{a:?}: {err}");
        assert!(err.starts_with("error: ") && err.contains(&want), "{a:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{a:?}: {err}");
    }
    for (flag, value, want) in [
        (
            "--hidden-layers",
            "99",
            "--hidden-layers: layer 99 is not a MoE layer of this model",
        ),
        ("--hidden-layers", "1..x", "--hidden-layers: `x` is not"),
        ("--shard", "3/2", "--shard: `3/2` is not I/N"),
        ("--top-p", "2", "--top-p"),
    ] {
        let o = Command::new(bin)
            .args([
                "--model",
                m,
                "--dataset",
                good.to_str().unwrap(),
                "--out",
                o_,
                flag,
                value,
            ])
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{flag}: {err}");
        assert!(err.contains(want), "{flag}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{flag}: {err}");
    }
    assert!(!out.exists());
}

/// Mutation fuzzing of a real trace file (mostly its Parquet footer, where the manifest JSON
/// lives): opening it and reading its routing must end in `Ok` or a one-line error, never a
/// panic. Budget: `SHADOWMOE_FUZZ_CASES` (default 200).
#[test]
fn fuzzed_traces_are_refused_without_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("t.parquet");
    run(
        &args(&fixture("qwen3_moe"), &root().join("datasets/chat.jsonl"), &out),
        false,
    )
    .unwrap();
    let original = std::fs::read(&out).unwrap();
    let n = common::fuzz_cases(200);
    let mut next = common::splitmix(0x5eed_u64);
    let tail = original.len().min(8192);
    let (mut refused, mut panics) = (0, Vec::new());
    for case in 0..n {
        let mut v = original.clone();
        for _ in 0..=next() % 3 {
            // Nine in ten mutations in the footer.
            let at = if next() % 10 < 9 {
                v.len() - tail.min(v.len()) + next() % tail.min(v.len()).max(1)
            } else {
                next() % v.len()
            }
            .min(v.len() - 1);
            match next() % 4 {
                0 => v[at] ^= 1 << (next() % 8),
                1 => v[at] = [0u8, 0xff, b'"', b'{', b'9'][next() % 5],
                2 => v.truncate(at.max(1)),
                _ => {
                    let len = (next() % 16).min(v.len() - at);
                    v.drain(at..at + len);
                }
            }
        }
        // A new file each case: Polars memory-maps what it reads, and rewriting a file that a
        // mapping still covers would end the process with SIGBUS.
        let target = tmp.path().join(format!("m{case}.parquet"));
        std::fs::write(&target, &v).unwrap();
        let outcome = std::panic::catch_unwind(|| -> anyhow::Result<usize> {
            let t = Trace::open(&target)?;
            Ok(t.requests(None)?.len())
        });
        match outcome {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                refused += 1;
                let msg = format!("{e:#}");
                assert!(!msg.trim().contains('\n'), "case {case}: {msg}");
            }
            Err(_) => panics.push(case),
        }
        let _ = std::fs::remove_file(&target);
    }
    println!(
        "trace: {n} cases, {refused} refused with a one-line error, {} panics",
        panics.len()
    );
    assert!(panics.is_empty(), "cases that panicked: {panics:?}");
}
