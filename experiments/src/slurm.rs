//! `--slurm N`: the Slurm job array that runs the N shares (`--shard I/N`) of a `trace-collect`
//! or `bench-sweep` command, one array task per share, each into `OUT/shards/I/`.
//!
//! The script is plain bash with `#SBATCH` lines, written to `OUT/slurm.sh` so that a user can
//! read it and edit it for their cluster; `--submit` hands it to `sbatch`. A task whose shard is
//! already complete exits at once, so resubmitting the whole array (or `--array=1,3`) only
//! redoes what is missing. `merge` (crate::shards) joins the shards afterwards.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::Args;

/// Flags shared by `trace-collect` and `bench-sweep` for running as a Slurm job array.
#[derive(Args, Debug, Clone, Default)]
pub struct SlurmArgs {
    /// Write a Slurm job array of N tasks to OUT/slurm.sh instead of running: task I runs this
    /// command with --shard I/N into OUT/shards/I/ (then `merge OUT`). Nothing is submitted
    /// without --submit.
    #[arg(long, value_name = "N")]
    pub slurm: Option<String>,
    /// Extra sbatch options for every task, written as an #SBATCH line (e.g. "--partition=cpu
    /// --time=2:00:00 --mem=16G").
    #[arg(long, value_name = "OPTS", allow_hyphen_values = true)]
    pub slurm_opts: Option<String>,
    /// With --slurm: submit the script with sbatch.
    #[arg(long)]
    pub submit: bool,
}

/// Which binary a job array runs; fixes the shard's output and how a task restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    TraceCollect,
    BenchSweep,
}

impl Kind {
    /// The binary's name.
    pub fn command(self) -> &'static str {
        match self {
            Kind::TraceCollect => "trace-collect",
            Kind::BenchSweep => "bench-sweep",
        }
    }

    /// The file a finished shard holds (under `OUT/shards/I/`), and the merged result's name
    /// under `OUT/`.
    pub fn result_file(self) -> &'static str {
        match self {
            Kind::TraceCollect => "traces.parquet",
            Kind::BenchSweep => "results.parquet",
        }
    }

    /// The file whose presence says a shard finished (written last).
    pub fn done_file(self) -> &'static str {
        match self {
            Kind::TraceCollect => "traces.parquet",
            Kind::BenchSweep => "manifest.json",
        }
    }

    /// What the task's command line gets after `--shard I/N`: where it writes, and how it takes
    /// up a shard that an earlier try left unfinished.
    fn shard_flags(self) -> &'static str {
        match self {
            // A collection resumes from its last complete request.
            Kind::TraceCollect => "--out \"$SHARD/traces.parquet\" --resume",
            // A sweep shard continues from the rows it finished (rows.partial/).
            Kind::BenchSweep => "--out \"$SHARD\" --resume",
        }
    }
}

/// What `--slurm` resolved to.
#[derive(Debug, Clone)]
pub struct SlurmPlan {
    pub tasks: usize,
    pub opts: Option<String>,
    pub submit: bool,
}

impl SlurmArgs {
    /// `None` when `--slurm` was not given; errors for `--slurm 0`, a non-number, `--submit` or
    /// `--slurm-opts` without `--slurm`, and `--slurm` with `--shard`.
    pub fn plan(&self, shard: Option<&str>) -> Result<Option<SlurmPlan>> {
        let Some(n) = &self.slurm else {
            if self.submit {
                bail!("--submit: only with --slurm N (it submits the job array --slurm writes)");
            }
            if self.slurm_opts.is_some() {
                bail!("--slurm-opts: only with --slurm N");
            }
            return Ok(None);
        };
        let tasks: usize = n.trim().parse().map_err(|_| {
            anyhow::anyhow!("--slurm: `{n}` is not a number of tasks (expected N >= 1, e.g. --slurm 16)")
        })?;
        if tasks == 0 {
            bail!("--slurm: 0 tasks (expected N >= 1, e.g. --slurm 16)");
        }
        if let Some(s) = shard {
            bail!(
                "--shard {s}: not with --slurm (each task of the job array gets its own --shard I/{tasks})"
            );
        }
        Ok(Some(SlurmPlan {
            tasks,
            opts: self.slurm_opts.clone().filter(|o| !o.trim().is_empty()),
            submit: self.submit,
        }))
    }
}

/// Quotes `s` for bash (single quotes; a bare word when that is safe).
pub fn shell_quote(s: &str) -> String {
    let safe = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if safe {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// The command line of this process without the flags a task must not repeat (`--slurm`,
/// `--slurm-opts`, `--submit`, `--out`, `--shard`, `--resume`, `--replace`), in either
/// `--flag value` or `--flag=value` form; the program name excluded.
pub fn task_args(argv: &[OsString]) -> Result<Vec<String>> {
    const WITH_VALUE: [&str; 4] = ["--slurm", "--slurm-opts", "--out", "--shard"];
    const BARE: [&str; 3] = ["--submit", "--resume", "--replace"];
    let mut out = Vec::new();
    let mut it = argv.iter().skip(1);
    while let Some(a) = it.next() {
        let a = a
            .to_str()
            .with_context(|| format!("argument {a:?} is not UTF-8 (a job script cannot carry it)"))?;
        let name = a.split_once('=').map_or(a, |(n, _)| n);
        if WITH_VALUE.contains(&name) {
            if !a.contains('=') {
                it.next();
            }
            continue;
        }
        if BARE.contains(&a) {
            continue;
        }
        out.push(a.to_string());
    }
    Ok(out)
}

/// The job script: `args` (from [`task_args`]) run by `exe` in `cwd`, one array task per shard.
pub fn script(kind: Kind, plan: &SlurmPlan, exe: &Path, cwd: &Path, args: &[String], out: &Path) -> String {
    let n = plan.tasks;
    let cmd = kind.command();
    let out_q = shell_quote(&out.display().to_string());
    let mut s = String::new();
    s += "#!/bin/bash\n";
    s += &format!(
        "# Slurm job array written by `{cmd} --slurm {n}` (shadowmoe {}, commit {}), {}.\n",
        env!("CARGO_PKG_VERSION"),
        env!("SHADOWMOE_COMMIT"),
        shadowmoe_trace::schema::utc_now()
    );
    s += &format!(
        "# Task I runs the command at the bottom with --shard I/{n}; it writes {}/shards/I/{} and\n",
        out.display(),
        kind.result_file()
    );
    s += "# its log, slurm-<job>_<I>.log, beside it. A task whose shard is complete exits at once.\n#\n";
    s += &format!("#   submit:                         sbatch {out_q}/slurm.sh\n");
    s += &format!(
        "#   resubmit only tasks 1 and 3:    sbatch --array=1,3 {out_q}/slurm.sh   ({})\n",
        match kind {
            Kind::TraceCollect => "a shard resumes from its last complete request",
            Kind::BenchSweep => "a shard resumes from its finished rows",
        }
    );
    s += &format!("#   when every task has finished:   {cmd} merge {out_q}\n#\n");
    s += "# Edit the #SBATCH lines for your cluster (partition, time limit, memory, CPUs per task).\n";
    s += &format!("#SBATCH --job-name=shadowmoe-{cmd}\n");
    s += &format!("#SBATCH --array=0-{}\n", n - 1);
    s += &format!("#SBATCH --output={}/shards/%a/slurm-%A_%a.log\n", out.display());
    if let Some(o) = &plan.opts {
        s += &format!("#SBATCH {}\n", o.trim());
    }
    s += "\nset -euo pipefail\n";
    s += &format!("cd {}\n", shell_quote(&cwd.display().to_string()));
    s += "I=\"$SLURM_ARRAY_TASK_ID\"\n";
    s += &format!("SHARD={out_q}/shards/\"$I\"\n");
    s += "mkdir -p \"$SHARD\"\n";
    s += &format!(
        "if [ -f \"$SHARD/{done}\" ]; then\n  echo \"shard $I/{n} is already complete ($SHARD/{done})\"\n  exit 0\nfi\n",
        done = kind.done_file()
    );
    // One flag (and its value) per line.
    s += &format!("exec {}", shell_quote(&exe.display().to_string()));
    for a in args {
        if a.starts_with("--") {
            s += " \\\n  ";
        } else {
            s += " ";
        }
        s += &shell_quote(a);
    }
    s += &format!(" \\\n  --shard \"$I/{n}\" {}\n", kind.shard_flags());
    s
}

/// Writes `OUT/slurm.sh` (and the shard folders its log lines need) for this process's command
/// line; with `plan.submit`, submits it. Returns the script's path and the job id.
pub fn write_job(kind: Kind, plan: &SlurmPlan, out: &Path) -> Result<(PathBuf, Option<String>)> {
    std::fs::create_dir_all(out).with_context(|| format!("--out: cannot create {}", out.display()))?;
    let out = std::fs::canonicalize(out).with_context(|| format!("--out: {}", out.display()))?;
    let cwd = std::env::current_dir().context("the current folder")?;
    let exe = std::env::current_exe().context("this program's path")?;
    let argv: Vec<OsString> = std::env::args_os().collect();
    let args = task_args(&argv)?;
    for i in 0..plan.tasks {
        let d = out.join("shards").join(i.to_string());
        std::fs::create_dir_all(&d).with_context(|| format!("--out: cannot create {}", d.display()))?;
    }
    let text = script(kind, plan, &exe, &cwd, &args, &out);
    let path = out.join("slurm.sh");
    let tmp = out.join("slurm.sh.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("--out: cannot write {}", tmp.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
            .with_context(|| tmp.display().to_string())?;
    }
    std::fs::rename(&tmp, &path).with_context(|| format!("--out: cannot write {}", path.display()))?;
    let job = if plan.submit { Some(submit(&path)?) } else { None };
    Ok((path, job))
}

/// `sbatch --parsable SCRIPT`; returns the job id.
pub fn submit(script: &Path) -> Result<String> {
    let o = match Command::new("sbatch").arg("--parsable").arg(script).output() {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "--submit: `sbatch` not found on PATH (no Slurm here?); the job script is written: submit it where Slurm runs with `sbatch {}`",
            script.display()
        ),
        Err(e) => return Err(e).context("--submit: cannot run sbatch"),
    };
    let text = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; ")
    };
    if !o.status.success() {
        bail!(
            "--submit: sbatch {} failed ({}): {}",
            script.display(),
            o.status,
            text(&o.stderr)
        );
    }
    let stdout = text(&o.stdout);
    // `--parsable` prints `JOBID` or `JOBID;CLUSTER`.
    let id = stdout.split(';').next().unwrap_or_default().trim().to_string();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
        bail!("--submit: sbatch printed `{stdout}`, not a job id");
    }
    Ok(id)
}

/// What the binaries print after writing (and maybe submitting) a job array.
pub fn report(kind: Kind, plan: &SlurmPlan, script: &Path, job: Option<&str>, out: &Path) -> String {
    let merge = format!("{} merge {}", kind.command(), out.display());
    match job {
        Some(id) => format!(
            "submitted job array {id} ({} tasks, {}); when every task has finished: {merge}",
            plan.tasks,
            script.display()
        ),
        None => format!(
            "wrote {} ({} tasks; not submitted): submit it with `sbatch {}`, then: {merge}",
            script.display(),
            plan.tasks,
            script.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_args_drop_the_launch_flags() {
        let argv: Vec<OsString> = [
            "trace-collect",
            "--model",
            "m",
            "--slurm",
            "4",
            "--slurm-opts=--time=1:00:00",
            "--submit",
            "--out",
            "o",
            "--resume",
            "--limit",
            "8",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        assert_eq!(task_args(&argv).unwrap(), ["--model", "m", "--limit", "8"]);
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("a/b.jsonl"), "a/b.jsonl");
        assert_eq!(shell_quote("it's here"), "'it'\\''s here'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn plans() {
        let p = |n: Option<&str>, submit: bool| SlurmArgs {
            slurm: n.map(String::from),
            slurm_opts: None,
            submit,
        };
        assert!(p(None, false).plan(None).unwrap().is_none());
        assert_eq!(p(Some("4"), true).plan(None).unwrap().unwrap().tasks, 4);
        let e = p(Some("0"), false).plan(None).unwrap_err().to_string();
        assert!(e.starts_with("--slurm: 0 tasks"), "{e}");
        assert!(p(Some("x"), false).plan(None).is_err());
        assert!(p(None, true).plan(None).is_err());
        assert!(p(Some("2"), false).plan(Some("0/2")).is_err());
    }
}
