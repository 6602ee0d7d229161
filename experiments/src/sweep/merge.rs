//! `bench-sweep merge OUT`: the shards of a `--slurm N` sweep (`OUT/shards/I/`) joined into
//! `OUT/results.parquet` (+ CSV, summary, manifest, figures), row for row what one process
//! running the whole sweep writes.

use super::rows::{rows_for_summary, summary};
use super::*;
use crate::shards::{Merged, sweep_shards};

/// Checks the shards (crate::shards) and writes the merged run into `out`.
pub fn merge(out: &Path) -> Result<Merged> {
    let (n, shards) = sweep_shards(out)?;
    let first = &shards[0].1;
    let count = |key: &str| -> Result<usize> {
        first[key]
            .as_u64()
            .map(|v| v as usize)
            .with_context(|| format!("{}: manifest has no `{key}`", shards[0].2.path.display()))
    };
    let (combos, repeats) = (count("combinations")?, count("repeat")?);
    // A one-process sweep writes repetition-major rows over every configuration; shard I
    // holds configurations I, I + N, … in the same order. Row j of shard I is repetition
    // j / len_I of configuration (j % len_I) · N + I.
    let mut frames = Vec::new();
    for (i, _, d) in &shards {
        let path = d.path.join("results.parquet");
        let df = ParquetReader::new(File::open(&path).with_context(|| path.display().to_string())?)
            .finish()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let len = (*i..combos).step_by(n).count();
        if df.height() != len * repeats {
            bail!(
                "shard {} ({}) has {} rows, but shard {i}/{n} of {combos} configurations × {repeats} repeats has {}: an incomplete or edited shard",
                d.name,
                path.display(),
                df.height(),
                len * repeats
            );
        }
        let order: Vec<u64> = (0..df.height())
            .map(|j| {
                let (rep, k) = (j / len.max(1), j % len.max(1));
                (rep * combos + k * n + i) as u64
            })
            .collect();
        let mut df = df;
        df.with_column(Column::new("__order".into(), order))?;
        frames.push(df);
    }
    let mut all = frames[0].clone();
    for (df, (_, _, d)) in frames.iter().zip(&shards).skip(1) {
        all.vstack_mut(df).map_err(|e| {
            anyhow::anyhow!(
                "shard {} ({}): its columns differ from shard 0's: {e}",
                d.name,
                d.path.display()
            )
        })?;
    }
    let mut df = all
        .sort(["__order"], SortMultipleOptions::default())?
        .drop("__order")?;
    let rows = df.height() as u64;
    let mut manifest = first.clone();
    if let Some(m) = manifest.as_object_mut() {
        m.insert("shard".into(), "0/1".into());
        m.insert("rows".into(), rows.into());
        m.insert("created".into(), shadowmoe_trace::schema::utc_now().into());
        m.insert(
            "merged_from".into(),
            shards
                .iter()
                .map(|(_, m, d)| {
                    serde_json::json!({
                        "folder": d.path.display().to_string(),
                        "shard": m["shard"],
                        "created": m["created"],
                        "harness_commit": m["harness_commit"],
                    })
                })
                .collect(),
        );
    }
    let summary = summary(&rows_for_summary(&df)?);
    write_run(out, &mut df, &summary, &manifest)?;
    Ok(Merged {
        path: out.join("results.parquet"),
        shards: n,
        rows,
    })
}
