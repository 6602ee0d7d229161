//! `trace-collect merge OUT` and `bench-sweep merge OUT`: check the shards a `--slurm N` job
//! array wrote under `OUT/shards/I/` and join them into the result one process would have
//! written.
//!
//! Every shard must come from the same command: the same model (id and config sha256), the same
//! dataset or trace (sha256), the same arguments and harness version, the same shard count N;
//! the indices must be 0..N, each exactly once. Anything else is refused with one line that
//! names the shard. The merged file is written under a temporary name and renamed: a merge
//! that fails leaves nothing under the final name.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use polars::prelude::*;
use shadowmoe_trace::Trace;
use shadowmoe_trace::schema::{MANIFEST_KEY, Manifest};

use crate::args::parse_shard;
use crate::slurm::Kind;

/// A shard folder found under `OUT/shards/`.
#[derive(Debug, Clone)]
pub struct ShardDir {
    /// The folder's name (the array task that wrote it).
    pub name: String,
    pub path: PathBuf,
}

/// The folders under `OUT/shards/`, in numeric order of their names.
pub fn shard_dirs(out: &Path, kind: Kind) -> Result<Vec<ShardDir>> {
    let root = out.join("shards");
    let entries = std::fs::read_dir(&root).map_err(|e| {
        anyhow::anyhow!(
            "{}: no shards ({e}): expected the folder of `{} --slurm N --out {}`",
            root.display(),
            kind.command(),
            out.display()
        )
    })?;
    let mut dirs = Vec::new();
    for e in entries {
        let e = e.with_context(|| root.display().to_string())?;
        if !e.path().is_dir() {
            continue;
        }
        dirs.push(ShardDir {
            name: e.file_name().to_string_lossy().into_owned(),
            path: e.path(),
        });
    }
    dirs.sort_by_key(|d| (d.name.parse::<u64>().unwrap_or(u64::MAX), d.name.clone()));
    if dirs.is_empty() {
        bail!("{}: no shard folders (has the job array run?)", root.display());
    }
    Ok(dirs)
}

/// Refuses a shard folder that another command wrote.
fn check_kind(d: &ShardDir, kind: Kind) -> Result<()> {
    let (mine, theirs) = match kind {
        Kind::TraceCollect => ("traces.parquet", Kind::BenchSweep),
        Kind::BenchSweep => ("manifest.json", Kind::TraceCollect),
    };
    let foreign = match theirs {
        Kind::BenchSweep => ["results.parquet", "manifest.json"]
            .iter()
            .find(|f| d.path.join(f).exists()),
        Kind::TraceCollect => ["traces.parquet", "traces.parquet.parts"]
            .iter()
            .find(|f| d.path.join(f).exists()),
    };
    if let (Some(f), false) = (foreign, d.path.join(mine).exists()) {
        bail!(
            "shard folder {} holds a `{}` shard ({f}), not a `{}` one: merge it with `{} merge`",
            d.path.display(),
            theirs.command(),
            kind.command(),
            theirs.command()
        );
    }
    Ok(())
}

/// Checks that the shards' indices are exactly 0..n, once each. `claims` maps each finished
/// shard folder to the `I/N` its manifest claims; `unfinished` are folders without a result.
fn check_indices(
    out: &Path,
    kind: Kind,
    claims: &[(ShardDir, usize, usize)],
    unfinished: &[ShardDir],
) -> Result<usize> {
    let Some((first, _, n)) = claims.first() else {
        bail!(
            "{}: no shard has finished (no {} in any of {} folders): see their slurm-*.log",
            out.join("shards").display(),
            kind.done_file(),
            unfinished.len()
        );
    };
    let n = *n;
    let mut by_index: BTreeMap<usize, &ShardDir> = BTreeMap::new();
    for (d, i, m) in claims {
        if *m != n {
            bail!(
                "shard {} ({}) is one of {m} shards, but {} is one of {n}: shards of two different --slurm runs",
                d.name,
                d.path.display(),
                first.path.display()
            );
        }
        if let Some(other) = by_index.insert(*i, d) {
            bail!(
                "shards {} and {} both claim shard {i}/{n} ({} and {}): remove the copy",
                other.name,
                d.name,
                other.path.display(),
                d.path.display()
            );
        }
    }
    let missing: Vec<String> = (0..n)
        .filter(|i| !by_index.contains_key(i))
        .map(|i| i.to_string())
        .collect();
    if !missing.is_empty() {
        let script = out.join("slurm.sh");
        let why = if unfinished.is_empty() {
            String::new()
        } else {
            format!(
                " (unfinished: {}; see their slurm-*.log)",
                unfinished
                    .iter()
                    .map(|d| d.path.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        bail!(
            "shard{} {} of {n} missing{why}: resubmit with `sbatch --array={} {}`, then merge again",
            if missing.len() == 1 { "" } else { "s" },
            missing.join(", "),
            missing.join(","),
            script.display()
        );
    }
    Ok(n)
}

/// What a merge wrote.
#[derive(Debug, Clone)]
pub struct Merged {
    pub path: PathBuf,
    pub shards: usize,
    pub rows: u64,
}

/// The first field in which shard manifest `b` differs from `a` (the fields of one collection;
/// not the shard, its request count or the creation time).
fn trace_mismatch(a: &Manifest, b: &Manifest) -> Option<&'static str> {
    let checks: [(&'static str, bool); 17] = [
        ("harness version", a.harness_version == b.harness_version),
        ("format", a.format == b.format),
        ("--model", a.model_id == b.model_id),
        ("model (config sha256)", a.config_sha256 == b.config_sha256),
        ("--dataset", a.dataset == b.dataset),
        ("dataset (sha256)", a.dataset_sha256 == b.dataset_sha256),
        ("dataset (prompts)", a.dataset_requests == b.dataset_requests),
        ("--max-new-tokens", a.max_new_tokens == b.max_new_tokens),
        ("--temperature", a.temperature == b.temperature),
        ("--top-k", a.sampling_top_k == b.sampling_top_k),
        ("--top-p", a.top_p == b.top_p),
        ("--seed", a.seed == b.seed),
        ("--hidden-layers", a.hidden_layers == b.hidden_layers),
        ("--hidden-dtype", a.hidden_encoding == b.hidden_encoding),
        ("--no-chat-template", a.chat_template == b.chat_template),
        ("architecture", a.architecture == b.architecture),
        ("MoE layers", a.moe_layers == b.moe_layers),
    ];
    checks.iter().find(|(_, ok)| !ok).map(|(name, _)| *name)
}

/// `trace-collect merge OUT`: `OUT/shards/I/traces.parquet` for I in 0..N into
/// `OUT/traces.parquet`, in the order of a one-process collection (by request, each request's
/// rows as collected), with a manifest of the whole.
pub fn merge_traces(out: &Path) -> Result<Merged> {
    let kind = Kind::TraceCollect;
    let dirs = shard_dirs(out, kind)?;
    let mut claims = Vec::new();
    let mut unfinished = Vec::new();
    let mut traces = Vec::new();
    for d in dirs {
        check_kind(&d, kind)?;
        let file = d.path.join("traces.parquet");
        if !file.exists() {
            unfinished.push(d);
            continue;
        }
        let t = Trace::open(&file).with_context(|| format!("shard {}", d.name))?;
        let (i, n) = parse_shard("shard", &t.manifest.shard)
            .with_context(|| format!("{}: bad manifest", file.display()))?;
        claims.push((d, i, n));
        traces.push(t);
    }
    let n = check_indices(out, kind, &claims, &unfinished)?;
    let mut shards: Vec<(usize, Trace, &ShardDir)> = claims
        .iter()
        .zip(traces)
        .map(|((d, i, _), t)| (*i, t, d))
        .collect();
    shards.sort_by_key(|s| s.0);
    let first = &shards[0].1;
    for (_, t, d) in &shards[1..] {
        if let Some(field) = trace_mismatch(&first.manifest, &t.manifest) {
            if field == "harness version" {
                bail!(
                    "shard {} ({}) was written by shadowmoe {}, shard 0 ({}) by {}: collect every shard with one build",
                    d.name,
                    t.path.display(),
                    t.manifest.harness_version,
                    first.path.display(),
                    first.manifest.harness_version
                );
            }
            bail!(
                "shard {} ({}) was collected with another {field} than shard 0 ({}): not shares of one collection",
                d.name,
                t.path.display(),
                first.path.display()
            );
        }
    }
    // Shard I of a collection of T requests covers the requests i < T with i % N == I.
    let total: usize = shards.iter().map(|s| s.1.manifest.requests).sum();
    for (i, t, d) in &shards {
        let want = (*i..total).step_by(n).count();
        if t.manifest.requests != want {
            bail!(
                "shard {} ({}) covers {} requests, but {total} requests split {n} ways give shard {i} {want}: collected with another --limit?",
                d.name,
                t.path.display(),
                t.manifest.requests
            );
        }
    }

    let mut manifest = first.manifest.clone();
    manifest.shard = "0/1".into();
    manifest.requests = total;
    manifest.created = shadowmoe_trace::schema::utc_now();
    let json = serde_json::to_string(&manifest)?;
    let path = out.join(kind.result_file());
    let tmp = out.join("traces.parquet.tmp");
    let frames: Vec<LazyFrame> = shards
        .iter()
        .map(|(_, t, _)| t.scan().map_err(anyhow::Error::from))
        .collect::<Result<_>>()?;
    let expected_rows: u64 = shards
        .iter()
        .map(|(_, t, _)| parquet_rows(&t.path))
        .sum::<Result<u64>>()?;
    let result = (|| -> Result<u64> {
        let file = File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
        let schema = frames[0]
            .clone()
            .collect_schema()
            .map_err(|e| anyhow::anyhow!("{}: {e}", shards[0].1.path.display()))?;
        let mut writer = ParquetWriter::new(file)
            .with_compression(ParquetCompression::Zstd(None))
            .with_key_value_metadata(Some(KeyValueMetadata::from_static(vec![(
                MANIFEST_KEY.into(),
                json,
            )])))
            .batched(&schema)
            .map_err(|e| anyhow::anyhow!("{}: {e}", tmp.display()))?;
        // A window of requests at a time from every shard (row groups outside it are skipped
        // by their statistics), so memory stays bounded by the window, not the trace.
        let window = 64 * n;
        let mut rows = 0u64;
        let mut start = 0usize;
        while start < total {
            let end = (start + window).min(total);
            let (a, b) = (start as u32, end as u32);
            let parts: Vec<LazyFrame> = frames
                .iter()
                .map(|f| {
                    f.clone()
                        .filter(col("request").gt_eq(lit(a)).and(col("request").lt(lit(b))))
                })
                .collect();
            let df = concat(parts, UnionArgs::default())?
                .sort(
                    ["request"],
                    SortMultipleOptions::default().with_maintain_order(true),
                )
                .collect()
                .map_err(|e| anyhow::anyhow!("reading the shards of {}: {e}", out.display()))?;
            rows += df.height() as u64;
            writer
                .write_batch(&df)
                .map_err(|e| anyhow::anyhow!("{}: {e}", tmp.display()))?;
            start = end;
        }
        writer
            .finish()
            .map_err(|e| anyhow::anyhow!("{}: {e}", tmp.display()))?;
        Ok(rows)
    })();
    let rows = match result {
        Ok(r) if r == expected_rows => r,
        Ok(r) => {
            let _ = std::fs::remove_file(&tmp);
            bail!(
                "merged {r} rows but the shards hold {expected_rows}: a shard's request column is not the requests its manifest claims"
            );
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(Merged {
        path,
        shards: n,
        rows,
    })
}

/// Rows of a Parquet file, from its footer.
pub fn parquet_rows(path: &Path) -> Result<u64> {
    let f = File::open(path).with_context(|| path.display().to_string())?;
    Ok(ParquetReader::new(f)
        .num_rows()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))? as u64)
}

/// A finished sweep shard: its index, its `manifest.json` and its folder.
pub type SweepShard = (usize, serde_json::Value, ShardDir);

/// For the sweep merge: the shard count and the shards, checked and in index order.
pub fn sweep_shards(out: &Path) -> Result<(usize, Vec<SweepShard>)> {
    let kind = Kind::BenchSweep;
    let mut claims = Vec::new();
    let mut manifests = Vec::new();
    let mut unfinished = Vec::new();
    for d in shard_dirs(out, kind)? {
        check_kind(&d, kind)?;
        let mpath = d.path.join("manifest.json");
        if !mpath.exists() || !d.path.join("results.parquet").exists() {
            unfinished.push(d);
            continue;
        }
        let text = std::fs::read_to_string(&mpath).with_context(|| mpath.display().to_string())?;
        let m: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a sweep manifest", mpath.display()))?;
        let format = m["format"].as_str().unwrap_or_default();
        if format != "shadowmoe-sweep/1" {
            bail!(
                "{}: format `{format}` is not shadowmoe-sweep/1 (not a bench-sweep shard)",
                mpath.display()
            );
        }
        let shard = m["shard"].as_str().unwrap_or_default();
        let (i, n) =
            parse_shard("shard", shard).with_context(|| format!("{}: bad manifest", mpath.display()))?;
        claims.push((d, i, n));
        manifests.push(m);
    }
    let n = check_indices(out, kind, &claims, &unfinished)?;
    let mut shards: Vec<SweepShard> = claims
        .into_iter()
        .zip(manifests)
        .map(|((d, i, _), m)| (i, m, d))
        .collect();
    shards.sort_by_key(|s| s.0);
    let first = &shards[0];
    for (_, m, d) in &shards[1..] {
        if let Some(field) = sweep_mismatch(&first.1, m) {
            let show = |v: &serde_json::Value| -> String {
                let s = lookup(v, &field).map(|x| x.to_string()).unwrap_or("none".into());
                if s.len() > 80 {
                    format!("{}…", &s[..s.char_indices().nth(79).map_or(s.len(), |c| c.0)])
                } else {
                    s
                }
            };
            bail!(
                "shard {} ({}) differs from shard 0 ({}) in {field}: {} vs {}: not shares of one sweep",
                d.name,
                d.path.display(),
                first.2.path.display(),
                show(m),
                show(&first.1)
            );
        }
    }
    Ok((n, shards))
}

/// The value at a dotted path in a JSON object.
fn lookup<'a>(v: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    path.split('.').try_fold(v, |v, k| v.get(k))
}

/// The first field (a dotted path) in which two sweep manifests differ, among those one sweep
/// shares: harness version, mode, model, source (trace or dataset, I/O model), arguments,
/// combinations and repeats.
fn sweep_mismatch(a: &serde_json::Value, b: &serde_json::Value) -> Option<String> {
    for key in [
        "harness_version",
        "format",
        "mode",
        "model_id",
        "config_sha256",
        "combinations",
        "repeat",
        "prefetch_k",
    ] {
        if a.get(key) != b.get(key) {
            return Some(key.into());
        }
    }
    // What a node may differ in without changing what was asked: its core count, and the read
    // mode a filesystem granted (every row names the mode it used).
    const NODE_LOCAL: [&str; 3] = ["threads", "io_mode", "expert_source"];
    for obj in ["source", "args"] {
        let (x, y) = (a.get(obj), b.get(obj));
        let keys: std::collections::BTreeSet<&String> = x
            .and_then(|v| v.as_object())
            .into_iter()
            .chain(y.and_then(|v| v.as_object()))
            .flat_map(|m| m.keys())
            .collect();
        if keys.is_empty() && x != y {
            return Some(obj.into());
        }
        for k in keys {
            if obj == "source" && NODE_LOCAL.contains(&k.as_str()) {
                continue;
            }
            if x.and_then(|v| v.get(k)) != y.and_then(|v| v.get(k)) {
                return Some(format!("{obj}.{k}"));
            }
        }
    }
    let shards = |v: &serde_json::Value| {
        v["shard"]
            .as_str()
            .and_then(|s| s.split_once('/'))
            .map(|(_, n)| n.to_string())
    };
    (shards(a) != shards(b)).then(|| "shard count".into())
}
