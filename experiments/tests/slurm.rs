//! Past one machine: `--slurm N` job arrays and `merge`. The job script that `--slurm` writes is
//! run task by task (as Slurm would run it) and by a real single-node Slurm cluster that this
//! test starts (`.ci/slurm/cluster.sh`); the merged trace and the merged sweep equal the
//! one-process runs of the same commands row for row; shards that do not belong together get
//! one-line errors and no merged file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use polars::prelude::*;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

const COLLECT: &str = env!("CARGO_BIN_EXE_trace-collect");
const SWEEP: &str = env!("CARGO_BIN_EXE_bench-sweep");

/// A small collection: the qwen3_moe fixture on 7 chat prompts, 8 new tokens, hidden states.
fn collect_args(out: &Path) -> Vec<String> {
    let model = root().join("engine/tests/golden/qwen3_moe");
    let data = root().join("datasets/chat.jsonl");
    [
        "--model",
        model.to_str().unwrap(),
        "--dataset",
        data.to_str().unwrap(),
        "--limit",
        "7",
        "--max-new-tokens",
        "8",
        "--threads",
        "1",
        "--hidden-layers",
        "all",
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A small simulated sweep of `trace`: 18 configurations.
fn sweep_args(trace: &Path, out: &Path) -> Vec<String> {
    let model = root().join("engine/tests/golden/qwen3_moe");
    [
        "--trace",
        trace.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--capacity",
        "4..8:2",
        "--policy",
        "lru,lfu,belady",
        "--prefetch-depth",
        "0,1",
        "--predictor",
        "none,oracle",
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn cmd(bin: &str, args: &[String], extra: &[&str]) -> Command {
    let mut c = Command::new(bin);
    c.args(args).args(extra).env("RUST_LOG", "warn");
    c
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(mut c: Command) -> String {
    let o = c.output().unwrap();
    assert!(o.status.success(), "{c:?}: {}", stderr(&o));
    stderr(&o)
}

/// Runs `c`, which must fail with one line that contains `want`.
fn refused(mut c: Command, want: &str) -> String {
    let o = c.output().unwrap();
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{c:?} did not fail: {e}");
    assert!(
        e.starts_with("error: ") && e.contains(want),
        "{c:?}: {e}\nwanted: {want}"
    );
    assert_eq!(e.trim_end().lines().count(), 1, "{c:?}: {e}");
    eprint!("refused as expected: {e}");
    e
}

fn merge(bin: &str, dir: &Path) -> Command {
    let mut c = Command::new(bin);
    c.arg("merge").arg(dir).env("RUST_LOG", "warn");
    c
}

fn read(path: &Path) -> DataFrame {
    LazyFrame::scan_parquet(
        PlRefPath::new(path.to_string_lossy().as_ref()),
        ScanArgsParquet::default(),
    )
    .unwrap()
    .collect()
    .unwrap()
}

/// The merged trace equals the one-process trace row for row (same order, every column).
fn assert_same_trace(merged: &Path, one: &Path) {
    let (a, b) = (read(merged), read(one));
    assert!(a.height() > 0);
    assert_eq!(a.height(), b.height(), "rows");
    assert!(
        a.equals_missing(&b),
        "the merged trace differs from the one-process trace"
    );
    let m = shadowmoe_trace::Trace::open(merged).unwrap().manifest;
    let o = shadowmoe_trace::Trace::open(one).unwrap().manifest;
    assert_eq!((m.shard.as_str(), m.requests), (o.shard.as_str(), o.requests));
}

/// The merged sweep equals the one-process sweep row for row: the CSV twin renders every
/// column of every row (NaN included, which frame equality would not match).
fn assert_same_sweep(merged: &Path, one: &Path) {
    let (a, b) = (
        read(&merged.join("results.parquet")),
        read(&one.join("results.parquet")),
    );
    assert_eq!(a.height(), 18);
    assert_eq!(a.height(), b.height());
    assert_eq!(a.get_column_names(), b.get_column_names());
    let csv = |d: &Path| std::fs::read_to_string(d.join("results.csv")).unwrap();
    assert_eq!(
        csv(merged),
        csv(one),
        "the merged sweep differs from the one-process sweep"
    );
    let summary = |d: &Path| std::fs::read_to_string(d.join("summary.txt")).unwrap();
    assert_eq!(summary(merged), summary(one));
    assert!(merged.join("figures/fig1_hit_rate_vs_capacity.png").exists());
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(merged.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["shard"], "0/1");
    assert_eq!(m["rows"], 18);
}

/// Runs every task of `dir/slurm.sh` here, one after the other, as Slurm would run them.
fn run_tasks_here(dir: &Path, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let o = Command::new("bash")
                .arg(dir.join("slurm.sh"))
                .env("SLURM_ARRAY_TASK_ID", i.to_string())
                .env("RUST_LOG", "warn")
                .output()
                .unwrap();
            assert!(o.status.success(), "task {i}: {}", stderr(&o));
            String::from_utf8_lossy(&o.stdout).into_owned()
        })
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// A copy of the shards of `run` (without any merged result) in a fresh folder.
fn shards_copy(run: &Path, to: &Path) -> PathBuf {
    copy_dir(&run.join("shards"), &to.join("shards"));
    std::fs::copy(run.join("slurm.sh"), to.join("slurm.sh")).unwrap();
    to.to_path_buf()
}

/// Rewrites a trace shard with its manifest's harness version changed (as another build of the
/// harness would have written it).
fn rewrite_harness_version(file: &Path, version: &str) {
    use shadowmoe_trace::schema::MANIFEST_KEY;
    let mut m = shadowmoe_trace::Trace::open(file).unwrap().manifest;
    m.harness_version = version.into();
    let mut df = read(file);
    let tmp = file.with_extension("tmp");
    ParquetWriter::new(std::fs::File::create(&tmp).unwrap())
        .with_key_value_metadata(Some(KeyValueMetadata::from_static(vec![(
            MANIFEST_KEY.into(),
            serde_json::to_string(&m).unwrap(),
        )])))
        .finish(&mut df)
        .unwrap();
    std::fs::rename(&tmp, file).unwrap();
}

/// `--slurm N` writes a plain job script; run task by task, its shards merge into exactly the
/// one-process trace and sweep; a finished task exits at once when resubmitted; bad shards and
/// bad flags get one-line errors and never a merged file.
#[test]
fn job_scripts_merge_to_the_one_process_result_and_bad_shards_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let one = t.join("one.parquet");
    ok(cmd(COLLECT, &collect_args(&one), &[]));

    // The trace in 3 shares (3, 2 and 2 prompts).
    let run = t.join("run");
    let e = ok(cmd(COLLECT, &collect_args(&run), &["--slurm", "3"]));
    assert!(e.contains("not submitted"), "{e}");
    let script = std::fs::read_to_string(run.join("slurm.sh")).unwrap();
    for want in [
        "#SBATCH --array=0-2",
        "--shard \"$I/3\" --out \"$SHARD/traces.parquet\" --resume",
        "sbatch --array=1,3",
        "trace-collect merge",
    ] {
        assert!(script.contains(want), "no `{want}` in the script:\n{script}");
    }
    let task = script.split("\nexec ").nth(1).unwrap_or_default();
    for flag in ["--slurm", "--submit", "--shard 0", "--out /"] {
        assert!(!task.contains(flag), "the task repeats {flag}:\n{script}");
    }
    run_tasks_here(&run, 3);
    let pristine = shards_copy(&run, &t.join("pristine"));
    ok(merge(COLLECT, &run));
    assert_same_trace(&run.join("traces.parquet"), &one);
    // A resubmitted task whose shard is complete does nothing.
    let again = run_tasks_here(&run, 1);
    assert!(again[0].contains("already complete"), "{again:?}");

    // The sweep of the one-process trace in 4 shares (5, 5, 4, 4 configurations).
    let sweep_one = t.join("sweep-one");
    ok(cmd(SWEEP, &sweep_args(&one, &sweep_one), &[]));
    let sweep = t.join("sweep");
    ok(cmd(
        SWEEP,
        &sweep_args(&one, &sweep),
        &["--slurm", "4", "--slurm-opts", "--time=10"],
    ));
    let script = std::fs::read_to_string(sweep.join("slurm.sh")).unwrap();
    assert!(script.contains("#SBATCH --time=10\n"), "{script}");
    assert!(script.contains("--out \"$SHARD\" --resume"), "{script}");
    run_tasks_here(&sweep, 4);
    let sweep_pristine = shards_copy(&sweep, &t.join("sweep-pristine"));
    ok(merge(SWEEP, &sweep));
    assert_same_sweep(&sweep, &sweep_one);

    // Bad shards: each case on a fresh copy; the merge refuses with one line and writes nothing
    // under the final name.
    let case = |name: &str, from: &Path, bin: &str, want: &str, spoil: &dyn Fn(&Path)| {
        let dir = shards_copy(from, &t.join(name));
        spoil(&dir);
        refused(merge(bin, &dir), want);
        for f in [
            "traces.parquet",
            "results.parquet",
            "traces.parquet.tmp",
            "results.parquet.tmp",
        ] {
            assert!(!dir.join(f).exists(), "{name}: a refused merge left {f}");
        }
    };
    case(
        "missing",
        &pristine,
        COLLECT,
        "shard 1 of 3 missing (unfinished: ",
        &|d| std::fs::remove_file(d.join("shards/1/traces.parquet")).unwrap(),
    );
    case(
        "missing-two",
        &sweep_pristine,
        SWEEP,
        "sbatch --array=0,3 ",
        &|d| {
            std::fs::remove_file(d.join("shards/0/manifest.json")).unwrap();
            std::fs::remove_dir_all(d.join("shards/3")).unwrap();
        },
    );
    case("twice", &pristine, COLLECT, "both claim shard 0/3", &|d| {
        copy_dir(&d.join("shards/0"), &d.join("shards/3"))
    });
    case(
        "other-command",
        &pristine,
        COLLECT,
        "holds a `bench-sweep` shard",
        &|d| {
            std::fs::remove_dir_all(d.join("shards/2")).unwrap();
            copy_dir(&sweep_pristine.join("shards/2"), &d.join("shards/2"));
        },
    );
    case(
        "other-command-2",
        &sweep_pristine,
        SWEEP,
        "holds a `trace-collect` shard",
        &|d| {
            std::fs::remove_dir_all(d.join("shards/1")).unwrap();
            copy_dir(&pristine.join("shards/1"), &d.join("shards/1"));
        },
    );
    case(
        "other-version",
        &pristine,
        COLLECT,
        "was written by shadowmoe 0.0.0-other, shard 0 (",
        &|d| rewrite_harness_version(&d.join("shards/2/traces.parquet"), "0.0.0-other"),
    );
    case(
        "other-version-sweep",
        &sweep_pristine,
        SWEEP,
        "in harness_version: \"0.0.0-other\" vs",
        &|d| {
            let p = d.join("shards/2/manifest.json");
            let text = std::fs::read_to_string(&p).unwrap();
            let edited = text.replace(
                &format!("\"harness_version\": \"{}\"", env!("CARGO_PKG_VERSION")),
                "\"harness_version\": \"0.0.0-other\"",
            );
            assert_ne!(text, edited);
            std::fs::write(&p, edited).unwrap();
        },
    );
    case(
        "other-arguments",
        &sweep_pristine,
        SWEEP,
        "in args.capacity",
        &|d| {
            let p = d.join("shards/1/manifest.json");
            let text = std::fs::read_to_string(&p).unwrap();
            std::fs::write(&p, text.replace("\"4..8:2\"", "\"4..6:2\"")).unwrap();
        },
    );
    case("no-shards", &pristine, COLLECT, "no shards", &|d| {
        std::fs::remove_dir_all(d.join("shards")).unwrap()
    });

    // Bad flags.
    let out = t.join("bad");
    let flags: [(&[&str], &str); 4] = [
        (&["--slurm", "0"], "--slurm: 0 tasks"),
        (&["--slurm", "two"], "--slurm: `two` is not a number of tasks"),
        (
            &["--slurm", "2", "--shard", "0/2"],
            "--shard 0/2: not with --slurm",
        ),
        (&["--submit"], "--submit: only with --slurm N"),
    ];
    for (extra, want) in flags {
        refused(cmd(COLLECT, &collect_args(&out), extra), want);
        refused(cmd(SWEEP, &sweep_args(&one, &out), extra), want);
    }
    refused(
        cmd(COLLECT, &collect_args(&t.join("x.parquet")), &["--slurm", "2"]),
        "with --slurm, give a run folder",
    );
    // What every task would fail on is refused before a job array is written.
    let never = t.join("never");
    refused(
        cmd(
            SWEEP,
            &sweep_args(&one, &never),
            &["--slurm", "2", "--threads", "1"],
        ),
        "--threads applies to --mode live only",
    );
    refused(
        cmd(
            SWEEP,
            &sweep_args(&one, &never),
            &["--slurm", "2", "--on-miss", "never"],
        ),
        "--on-miss",
    );
    // ... and what needs the inputs: a trace that is not there, a trace from another model, a
    // prefetch depth past the model's MoE layers.
    let with = |flag: &str, value: &str| -> Vec<String> {
        let mut v = sweep_args(&one, &never);
        let at = v.iter().position(|x| x == flag).unwrap();
        v[at + 1] = value.to_string();
        v
    };
    refused(
        cmd(
            SWEEP,
            &with("--trace", "/no/such/trace.parquet"),
            &["--slurm", "2"],
        ),
        "/no/such/trace.parquet",
    );
    let olmoe = root().join("engine/tests/golden/olmoe");
    refused(
        cmd(
            SWEEP,
            &with("--model", olmoe.to_str().unwrap()),
            &["--slurm", "2"],
        ),
        "was collected from another model",
    );
    refused(
        cmd(SWEEP, &with("--prefetch-depth", "0,9"), &["--slurm", "2"]),
        "--prefetch-depth",
    );
    assert!(
        !never.exists(),
        "a job array was written for a sweep that cannot run"
    );
    // `--submit` where there is no sbatch: the script is written, the error says how to submit.
    let no_slurm = t.join("empty-path");
    std::fs::create_dir_all(&no_slurm).unwrap();
    let mut c = cmd(COLLECT, &collect_args(&out), &["--slurm", "2", "--submit"]);
    c.env("PATH", &no_slurm);
    refused(c, "--submit: `sbatch` not found on PATH");
    assert!(out.join("slurm.sh").exists());
}

/// A private single-node Slurm cluster (`.ci/slurm/cluster.sh`), stopped when dropped.
struct Cluster {
    dir: tempfile::TempDir,
    conf: PathBuf,
}

impl Cluster {
    /// Starts one, or says why it cannot.
    fn start() -> Result<Cluster, String> {
        for b in ["munged", "slurmctld", "slurmd", "sbatch", "squeue"] {
            let found = std::env::var_os("PATH")
                .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(b).is_file()));
            if !found {
                return Err(format!("`{b}` not found (apt-get install slurm-wlm munge)"));
            }
        }
        // SAFETY: getuid has no preconditions.
        if unsafe { libc::getuid() } != 0 {
            return Err("the private cluster's daemons run as root; this test is not root".into());
        }
        let dir = tempfile::Builder::new().prefix("slurm-").tempdir().unwrap();
        let o = Command::new("bash")
            .arg(root().join(".ci/slurm/cluster.sh"))
            .arg("start")
            .arg(dir.path())
            .output()
            .unwrap();
        let cluster = Cluster {
            conf: dir.path().join("slurm.conf"),
            dir,
        };
        if !o.status.success() {
            return Err(format!("the cluster did not start: {}", stderr(&o)));
        }
        Ok(cluster)
    }

    fn cmd(&self, bin: &str, args: &[String], extra: &[&str]) -> Command {
        let mut c = cmd(bin, args, extra);
        c.env("SLURM_CONF", &self.conf);
        c
    }

    /// Waits (at most `limit`) until job `id` has left the queue.
    fn wait(&self, id: &str, limit: Duration, logs: &Path) {
        let start = Instant::now();
        loop {
            let o = Command::new("squeue")
                .args(["-h", "-j", id, "-o", "%i %T"])
                .env("SLURM_CONF", &self.conf)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&o.stdout).trim().to_string();
            if text.is_empty() {
                return;
            }
            if start.elapsed() > limit {
                let log = |f: &str| {
                    std::fs::read_to_string(self.dir.path().join(f))
                        .unwrap_or_default()
                        .lines()
                        .rev()
                        .take(8)
                        .collect::<Vec<_>>()
                        .join("\n")
                };
                panic!(
                    "Slurm job {id} still queued after {limit:?}: {text}\nslurmctld.log (last lines, newest first):\n{}\nslurmd.log:\n{}\nshard logs under {}",
                    log("slurmctld.log"),
                    log("slurmd.log"),
                    logs.display()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(root().join(".ci/slurm/cluster.sh"))
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}

/// The job id in `--submit`'s report.
fn job_id(report: &str) -> String {
    report
        .split("submitted job array ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no job id in: {report}"))
        .to_string()
}

/// A real Slurm: a 4-task array collects a small trace and another sweeps it; each merges into
/// the one-process result. Without Slurm this test is skipped, except under
/// SHADOWMOE_REQUIRE_SLURM=1 (set by .ci/run), where a missing Slurm is a failure.
#[test]
fn slurm_job_arrays_collect_and_sweep_like_one_process() {
    let cluster = match Cluster::start() {
        Ok(c) => c,
        Err(why) => {
            assert!(
                std::env::var_os("SHADOWMOE_REQUIRE_SLURM").is_none(),
                "SHADOWMOE_REQUIRE_SLURM is set but no Slurm cluster could be started: {why}"
            );
            eprintln!("skipped: no Slurm cluster here ({why}); CI runs it (bash .ci/run)");
            return;
        }
    };
    let limit = Duration::from_secs(240);
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();

    let run = t.join("run");
    let e = ok(cluster.cmd(COLLECT, &collect_args(&run), &["--slurm", "4", "--submit"]));
    cluster.wait(&job_id(&e), limit, &run.join("shards"));
    let one = t.join("one.parquet");
    ok(cmd(COLLECT, &collect_args(&one), &[]));
    ok(merge(COLLECT, &run));
    assert_same_trace(&run.join("traces.parquet"), &one);
    for i in 0..4 {
        let logs = std::fs::read_dir(run.join(format!("shards/{i}")))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("slurm-")
            })
            .count();
        assert_eq!(logs, 1, "task {i} wrote no Slurm log beside its shard");
    }

    let trace = run.join("traces.parquet");
    let sweep = t.join("sweep");
    let e = ok(cluster.cmd(SWEEP, &sweep_args(&trace, &sweep), &["--slurm", "4", "--submit"]));
    cluster.wait(&job_id(&e), limit, &sweep.join("shards"));
    let sweep_one = t.join("sweep-one");
    ok(cmd(SWEEP, &sweep_args(&trace, &sweep_one), &[]));
    ok(merge(SWEEP, &sweep));
    assert_same_sweep(&sweep, &sweep_one);
}
