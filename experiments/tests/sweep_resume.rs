//! `bench-sweep --resume`: a sweep keeps each finished row in `rows.partial/`; a resumed sweep
//! reads those back and runs only the rest, and its results equal an uninterrupted run's.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use shadowmoe_experiments::collect::{CollectArgs, run as collect};
use shadowmoe_experiments::sweep::{SweepArgs, run};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

const MODEL: &str = "engine/tests/golden/qwen3_moe";

fn trace(dir: &Path) -> PathBuf {
    let out = dir.join("t.parquet");
    let a = CollectArgs {
        max_new_tokens: 12,
        limit: Some(4),
        threads: 2,
        flush_every: 8,
        ..CollectArgs::new(
            root().join(MODEL).display().to_string(),
            root().join("datasets/chat.jsonl"),
            out.clone(),
        )
    };
    collect(&a, false).unwrap();
    out
}

fn sweep_cli(argv: &[String]) -> SweepArgs {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: SweepArgs,
    }
    let mut all = vec!["bench-sweep".to_string()];
    all.extend(argv.iter().cloned());
    Cli::try_parse_from(all).unwrap().args
}

fn row_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("rows.partial"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "args.json")
        .collect();
    v.sort();
    v
}

/// A sweep whose final files could not be written keeps its rows; with some of them deleted (a
/// task killed after a few rows) `--resume` runs only the missing ones, and results.csv is
/// byte-identical to an uninterrupted sweep's. Kept rows are read back, not rerun; other
/// arguments are refused in one line naming the flag; a finished sweep is left as it is.
#[test]
fn resume_equals_an_uninterrupted_sweep() {
    let tmp = tempfile::tempdir().unwrap();
    let t = trace(tmp.path());
    let argv = |out: &Path, capacity: &str, policy: &str, extra: &[&str]| {
        let mut v: Vec<String> = [
            "--trace",
            &t.display().to_string(),
            "--capacity",
            capacity,
            "--policy",
            policy,
            "--out",
            &out.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        sweep_cli(&v)
    };
    let args = |out: &Path, extra: &[&str]| argv(out, "2..6:2", "lru,lfu,belady", extra);
    let csv = |dir: &Path| std::fs::read(dir.join("results.csv")).unwrap();

    let whole = run(&args(&tmp.path().join("whole"), &[]), false).unwrap();
    assert!(
        !whole.join("rows.partial").exists(),
        "kept rows are removed at the end"
    );

    // The final write fails (a folder stands where results.parquet's temporary file goes):
    // every row is kept.
    let out = tmp.path().join("resumed");
    std::fs::create_dir_all(out.join("results.parquet.tmp")).unwrap();
    assert!(run(&args(&out, &[]), false).is_err());
    std::fs::remove_dir(out.join("results.parquet.tmp")).unwrap();
    let kept = row_files(&out);
    assert_eq!(kept.len(), 9, "{kept:?}");

    // A copy whose kept row 0-0 is marked: the resumed results show the mark (read back, not
    // run again).
    let marked = tmp.path().join("marked");
    std::fs::create_dir_all(marked.join("rows.partial")).unwrap();
    for e in std::fs::read_dir(out.join("rows.partial")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), marked.join("rows.partial").join(e.file_name())).unwrap();
    }
    let p = marked.join("rows.partial/0-0.json");
    let text = std::fs::read_to_string(&p).unwrap();
    // Floats as bits: a NaN (no prefetching, no precision) is kept as NaN.
    assert!(text.contains(&f64::NAN.to_bits().to_string()), "{text}");
    let mut row: serde_json::Value = serde_json::from_str(&text).unwrap();
    row["evictions"] = 987654321.into();
    std::fs::write(&p, row.to_string()).unwrap();
    run(&args(&marked, &["--resume"]), false).unwrap();
    let text = String::from_utf8(csv(&marked)).unwrap();
    assert!(text.contains(",987654321,"), "{text}");

    // Interrupted after three rows: the others are gone.
    for name in &kept[3..] {
        std::fs::remove_file(out.join("rows.partial").join(name)).unwrap();
    }
    // Not without --resume (or --replace).
    let e = format!("{:#}", run(&args(&out, &[]), false).unwrap_err());
    assert!(e.contains("unfinished sweep") && e.contains("--resume"), "{e}");
    // Not with other arguments: one line naming the flag.
    let other = argv(&out, "2..6:2", "lru,lfu", &["--resume"]);
    let e = format!("{:#}", run(&other, false).unwrap_err());
    assert!(
        e.starts_with("--resume:") && e.contains("another --policy") && !e.contains('\n'),
        "{e}"
    );
    let e = format!(
        "{:#}",
        run(&args(&out, &["--resume", "--shard", "0/2"]), false).unwrap_err()
    );
    assert!(e.contains("another --shard"), "{e}");
    assert_eq!(row_files(&out).len(), 3, "a refused resume keeps the rows");

    run(&args(&out, &["--resume"]), false).unwrap();
    assert_eq!(
        csv(&out),
        csv(&whole),
        "the resumed results equal the uninterrupted ones"
    );
    assert!(!out.join("rows.partial").exists());

    // Finished: --resume runs nothing (the manifest, with its creation time, stays).
    let manifest = std::fs::read(out.join("manifest.json")).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    run(&args(&out, &["--resume"]), false).unwrap();
    assert_eq!(std::fs::read(out.join("manifest.json")).unwrap(), manifest);
    assert!(!out.join("rows.partial").exists());
    let e = format!(
        "{:#}",
        run(&argv(&out, "2", "lru,lfu,belady", &["--resume"]), false).unwrap_err()
    );
    assert!(e.contains("another --capacity") && !e.contains('\n'), "{e}");
    // --resume and --replace together make no sense.
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: SweepArgs,
    }
    assert!(Cli::try_parse_from(["bench-sweep", "--capacity", "2", "--resume", "--replace"]).is_err());
}
