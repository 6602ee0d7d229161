//! Every figure program, run as users run it, on a run folder made by the real pipeline steps
//! (trace-collect, trace-stats, bench-sweep sim and live) on the fixture model: each writes a
//! PNG that a second decoder (flate2 inflating the IDAT stream, checked against the header's
//! size) reads back with something drawn on it, and an SVG with its axis labels; a figure whose
//! input is missing fails with a one-line reason.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;
use shadowmoe_experiments::collect::{CollectArgs, run as collect};
use shadowmoe_experiments::sweep::{SweepArgs, run as sweep};
use shadowmoe_experiments::trace_stats::{StatsArgs, run as stats};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

const MODEL: &str = "engine/tests/golden/qwen3_moe";

fn sweep_args(argv: &[&str]) -> SweepArgs {
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: SweepArgs,
    }
    let mut all = vec!["bench-sweep"];
    all.extend_from_slice(argv);
    Cli::try_parse_from(all).unwrap().args
}

/// (width, height, share of pixels that are not white) of an 8-bit RGB PNG.
fn read_png(path: &Path) -> (u32, u32, f64) {
    use std::io::Read;
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "{}", path.display());
    let (mut at, mut idat, mut size) = (8, Vec::new(), (0u32, 0u32));
    while at < b.len() {
        let len = u32::from_be_bytes(b[at..at + 4].try_into().unwrap()) as usize;
        let kind = &b[at + 4..at + 8];
        let data = &b[at + 8..at + 8 + len];
        let mut crc = flate2::Crc::new();
        crc.update(&b[at + 4..at + 8 + len]);
        let want = u32::from_be_bytes(b[at + 8 + len..at + 12 + len].try_into().unwrap());
        assert_eq!(crc.sum(), want, "{}: bad CRC", path.display());
        match kind {
            b"IHDR" => {
                size = (
                    u32::from_be_bytes(data[0..4].try_into().unwrap()),
                    u32::from_be_bytes(data[4..8].try_into().unwrap()),
                );
                assert_eq!(&data[8..10], &[8, 2], "8-bit RGB");
            }
            b"IDAT" => idat.extend_from_slice(data),
            _ => {}
        }
        at += 12 + len;
    }
    let mut raw = Vec::new();
    flate2::read::ZlibDecoder::new(&idat[..])
        .read_to_end(&mut raw)
        .unwrap();
    let (w, h) = size;
    assert_eq!(raw.len(), h as usize * (1 + 3 * w as usize), "{}", path.display());
    let ink = raw
        .chunks(1 + 3 * w as usize)
        .flat_map(|row| row[1..].chunks(3))
        .filter(|px| px != &[255, 255, 255])
        .count();
    (w, h, ink as f64 / f64::from(w * h))
}

#[test]
fn every_figure_program_draws_from_a_real_run_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    let model = root().join(MODEL).display().to_string();
    let trace = run.join("heldout.parquet");
    collect(
        &CollectArgs {
            max_new_tokens: 12,
            limit: Some(4),
            threads: 2,
            flush_every: 8,
            // gate-lookahead in the prefetch sweep reads the router inputs.
            hidden_layers: "all".into(),
            ..CollectArgs::new(model.clone(), root().join("datasets/chat.jsonl"), trace.clone())
        },
        false,
    )
    .unwrap();
    let profile = run.join("profile.json");
    stats(&StatsArgs {
        trace: trace.clone(),
        out: Some(run.join("stats")),
        profile: Some(profile.clone()),
        no_profile: false,
        pin_threshold: 0.5,
        batch: 256,
        by_domain: false,
    })
    .unwrap();
    let (t, p) = (trace.to_str().unwrap(), format!("off,{}:2", profile.display()));
    let out = |d: &str| run.join(d).display().to_string();
    let common = ["--trace", t, "--model", &model, "--capacity", "4..16:4"];
    let policy = out("sweep-policy");
    let mut a = common.to_vec();
    a.extend(["--policy", "lru,lfu,belady", "--pinning", &p, "--out", &policy]);
    sweep(&sweep_args(&a), false).unwrap();
    let prefetch = out("sweep-prefetch");
    let mut a = common.to_vec();
    a.extend([
        "--prefetch-depth",
        "0,1",
        "--predictor",
        "none,previous-token,gate-lookahead,oracle",
        "--predictor-ms",
        "0.2",
        "--out",
        &prefetch,
    ]);
    sweep(&sweep_args(&a), false).unwrap();
    let (live, ds) = (out("sweep-live"), root().join("datasets/chat.jsonl"));
    sweep(
        &sweep_args(&[
            "--mode",
            "live",
            "--model",
            &model,
            "--dataset",
            ds.to_str().unwrap(),
            "--limit",
            "2",
            "--max-new-tokens",
            "4",
            "--capacity",
            "4,8,16",
            "--on-miss",
            "sync,skip",
            "--out",
            &live,
        ]),
        false,
    )
    .unwrap();

    let figs = tmp.path().join("figures");
    let programs = [
        (
            "fig1_hit_rate_vs_capacity",
            env!("CARGO_BIN_EXE_fig1_hit_rate_vs_capacity"),
        ),
        ("fig2_prefetch_depth", env!("CARGO_BIN_EXE_fig2_prefetch_depth")),
        (
            "fig3_predictor_recall",
            env!("CARGO_BIN_EXE_fig3_predictor_recall"),
        ),
        (
            "fig4_popularity_heatmap",
            env!("CARGO_BIN_EXE_fig4_popularity_heatmap"),
        ),
        (
            "fig5_reuse_distance_cdf",
            env!("CARGO_BIN_EXE_fig5_reuse_distance_cdf"),
        ),
        ("fig6_time_per_token", env!("CARGO_BIN_EXE_fig6_time_per_token")),
        (
            "fig7_memory_vs_capacity",
            env!("CARGO_BIN_EXE_fig7_memory_vs_capacity"),
        ),
        (
            "fig8_quality_under_skip",
            env!("CARGO_BIN_EXE_fig8_quality_under_skip"),
        ),
        ("fig9_headline", env!("CARGO_BIN_EXE_fig9_headline")),
    ];
    for (stem, exe) in programs {
        let o = Command::new(exe)
            .arg(&run)
            .arg(&figs)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        if stem.starts_with("fig3") {
            // No shadow predictor was trained in this run folder.
            assert!(!o.status.success());
            assert!(err.contains("train-shadow report"), "{err}");
            assert_eq!(err.trim().lines().count(), 1, "{err}");
            continue;
        }
        assert!(o.status.success(), "{stem}: {err}");
        let (w, h, ink) = read_png(&figs.join(format!("{stem}.png")));
        assert!(w >= 600 && h >= 400, "{stem}: {w}×{h}");
        assert!(ink > 0.01, "{stem}: almost nothing drawn ({ink})");
        let svg = std::fs::read_to_string(figs.join(format!("{stem}.svg"))).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
            "{stem}"
        );
        let label = if stem.starts_with("fig4") {
            "expert id"
        } else if stem.starts_with("fig5") {
            "reuse distance"
        } else {
            "capacity (experts per MoE layer)"
        };
        assert!(svg.contains(label), "{stem}: no `{label}` axis label in the SVG");
        if stem.starts_with("fig5") {
            // trace-stats' locality measures feed a second panel.
            assert!(
                svg.contains("token distance d"),
                "{stem}: no expert-set overlap panel"
            );
        }
    }
    // Without a run folder: one line naming the flag's value.
    let o = Command::new(programs[0].1)
        .arg(tmp.path().join("nothing"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("nothing"), "{err}");
}
