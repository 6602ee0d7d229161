//! `trace-stats`: routing statistics of a trace, printed as a table and written as JSON and
//! Parquet, plus the expert profile that `--pin` reads.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use polars::prelude::*;
use shadowmoe_trace::stats::{LayerStats, OVERLAP_DISTANCES, REUSE_BUCKETS, TraceStats};
use shadowmoe_trace::{Manifest, Trace};

/// Flags of `trace-stats`.
#[derive(Args, Debug, Clone)]
pub struct StatsArgs {
    /// The trace (written by trace-collect).
    #[arg(long)]
    pub trace: PathBuf,
    /// Directory for stats.json, layers.parquet and coactivation.parquet.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Where to write the expert profile (default: profiles/<model-slug>.json).
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// Do not write a profile.
    #[arg(long, conflicts_with = "profile")]
    pub no_profile: bool,
    /// The profile's pinned set per layer covers this share of the layer's activations.
    #[arg(long, default_value_t = 0.5)]
    pub pin_threshold: f64,
    /// Requests read at a time (bounds memory).
    #[arg(long, default_value_t = 256)]
    pub batch: u32,
    /// Also statistics per dataset domain and the divergence of expert popularity between
    /// domains (reads the trace's dataset, checked by sha256).
    #[arg(long)]
    pub by_domain: bool,
}

/// `Org/Name` → `org--name`; a path → its last component.
pub fn model_slug(model_id: &str) -> String {
    let parts: Vec<&str> = model_id
        .trim_end_matches('/')
        .split('/')
        .filter(|p| !p.is_empty())
        .collect();
    let slug = if parts.len() == 2 && !model_id.starts_with(['/', '.']) {
        format!("{}--{}", parts[0], parts[1])
    } else {
        parts.last().copied().unwrap_or("model").to_string()
    };
    slug.to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// Computes the statistics of a trace.
pub fn compute(trace: &Trace, batch: u32) -> Result<TraceStats> {
    let mut stats = TraceStats::new(&trace.manifest);
    trace.for_each_batch(batch, |reqs| {
        for r in &reqs {
            stats.add(r);
        }
        Ok(())
    })?;
    Ok(stats)
}

/// The per-layer table as text.
pub fn table(rows: &[LayerStats]) -> String {
    let mut s = String::from(
        "layer  activations  entropy(bits)  entropy/max  top10%  top20%  prev-token  reuse<=1  reuse<=8  next-layer top1\n",
    );
    for r in rows {
        s += &format!(
            "{:>5}  {:>11}  {:>13.3}  {:>11.3}  {:>6.3}  {:>6.3}  {:>10.3}  {:>8.3}  {:>8.3}  {:>15}\n",
            r.layer,
            r.activations,
            r.entropy_bits,
            r.entropy_norm,
            r.top10_share,
            r.top20_share,
            r.prev_token_overlap,
            r.reuse_within_1,
            r.reuse_within_8,
            r.next_layer_top1.map_or("-".into(), |x| format!("{x:.3}")),
        );
    }
    s
}

/// The temporal-locality table as text: expert-set overlap (|E_t ∩ E_t−d| / k) by token
/// distance, next to the overlap of two random tokens of the same request and of two different
/// requests, and the locality lift (d = 1 over same request).
pub fn locality_table(rows: &[LayerStats]) -> String {
    let mut s = String::from("layer");
    for d in OVERLAP_DISTANCES {
        s += &format!("  {:>6}", format!("d={d}"));
    }
    s += "  same-request  other-request  lift\n";
    for r in rows {
        s += &format!("{:>5}", r.layer);
        for x in &r.overlap_by_distance {
            s += &format!("  {x:>6.3}");
        }
        s += &format!(
            "  {:>12.3}  {:>13.3}  {:>4.2}\n",
            r.request_pair_overlap, r.cross_request_overlap, r.locality_lift
        );
    }
    s
}

fn write_parquet(path: &Path, df: &mut DataFrame) -> Result<()> {
    let tmp = path.with_extension("parquet.tmp");
    let f = File::create(&tmp).with_context(|| format!("--out: cannot write {}", tmp.display()))?;
    ParquetWriter::new(f)
        .with_compression(ParquetCompression::Zstd(None))
        .finish(df)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Writes stats.json, layers.parquet and coactivation.parquet into `dir`.
pub fn write_outputs(dir: &Path, m: &Manifest, stats: &TraceStats, rows: &[LayerStats]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("--out: cannot create {}", dir.display()))?;
    let reuse: Vec<serde_json::Value> = stats
        .moe_layers
        .iter()
        .zip(&stats.reuse)
        .map(|(l, h)| serde_json::json!({"layer": l, "buckets": REUSE_BUCKETS, "counts": h.to_vec()}))
        .collect();
    let json = serde_json::json!({
        "trace_manifest": m,
        "requests": stats.requests,
        "tokens": stats.tokens,
        "layers": rows,
        "reuse_distance": reuse,
        "overlap_distances": OVERLAP_DISTANCES,
    });
    std::fs::write(dir.join("stats.json"), serde_json::to_string_pretty(&json)?)?;

    let col_f = |name: &str, f: &dyn Fn(&LayerStats) -> f64| {
        Float64Chunked::from_vec(name.into(), rows.iter().map(f).collect()).into_column()
    };
    let mut layers = DataFrame::new(
        rows.len(),
        vec![
            UInt32Chunked::from_vec("layer".into(), rows.iter().map(|r| r.layer as u32).collect())
                .into_column(),
            UInt64Chunked::from_vec("activations".into(), rows.iter().map(|r| r.activations).collect())
                .into_column(),
            col_f("entropy_bits", &|r| r.entropy_bits),
            col_f("entropy_norm", &|r| r.entropy_norm),
            col_f("top10_share", &|r| r.top10_share),
            col_f("top20_share", &|r| r.top20_share),
            col_f("prev_token_overlap", &|r| r.prev_token_overlap),
            col_f("reuse_within_1", &|r| r.reuse_within_1),
            col_f("reuse_within_8", &|r| r.reuse_within_8),
            col_f("next_layer_top1", &|r| r.next_layer_top1.unwrap_or(f64::NAN)),
            col_f("request_pair_overlap", &|r| r.request_pair_overlap),
            col_f("cross_request_overlap", &|r| r.cross_request_overlap),
            col_f("locality_lift", &|r| r.locality_lift),
        ],
    )?;
    for (i, d) in OVERLAP_DISTANCES.iter().enumerate() {
        layers.with_column(col_f(&format!("overlap_d{d}"), &|r| r.overlap_by_distance[i]))?;
    }
    write_parquet(&dir.join("layers.parquet"), &mut layers)?;

    let (mut l0, mut l1, mut e0, mut e1, mut cnt) = (vec![], vec![], vec![], vec![], vec![]);
    for (i, pairs) in stats.coactivation.iter().enumerate() {
        let mut sorted: Vec<_> = pairs.iter().collect();
        sorted.sort();
        for (&(a, b), &c) in sorted {
            l0.push(stats.moe_layers[i] as u32);
            l1.push(stats.moe_layers[i + 1] as u32);
            e0.push(a as u32);
            e1.push(b as u32);
            cnt.push(c);
        }
    }
    let n = cnt.len();
    let mut co = DataFrame::new(
        n,
        vec![
            UInt32Chunked::from_vec("layer".into(), l0).into_column(),
            UInt32Chunked::from_vec("next_layer".into(), l1).into_column(),
            UInt32Chunked::from_vec("expert".into(), e0).into_column(),
            UInt32Chunked::from_vec("next_expert".into(), e1).into_column(),
            UInt64Chunked::from_vec("count".into(), cnt).into_column(),
        ],
    )?;
    write_parquet(&dir.join("coactivation.parquet"), &mut co)?;
    Ok(())
}

/// Jensen-Shannon divergence (bits) between two count vectors' distributions.
pub fn js_divergence(a: &[u64], b: &[u64]) -> f64 {
    let (sa, sb) = (
        a.iter().sum::<u64>().max(1) as f64,
        b.iter().sum::<u64>().max(1) as f64,
    );
    let mut js = 0.0;
    for (&x, &y) in a.iter().zip(b) {
        let (p, q) = (x as f64 / sa, y as f64 / sb);
        let m = (p + q) / 2.0;
        if p > 0.0 {
            js += 0.5 * p * (p / m).log2();
        }
        if q > 0.0 {
            js += 0.5 * q * (q / m).log2();
        }
    }
    js
}

/// Statistics per dataset domain (the trace's dataset, checked by its sha256), and the mean
/// over layers of the Jensen-Shannon divergence of expert popularity between each pair of
/// domains.
pub fn by_domain(trace: &Trace, batch: u32) -> Result<(Vec<(String, TraceStats)>, String)> {
    let m = &trace.manifest;
    let (prompts, sha) = crate::dataset::load(Path::new(&m.dataset))
        .with_context(|| format!("--by-domain: the trace's dataset {}", m.dataset))?;
    if sha != m.dataset_sha256 {
        anyhow::bail!(
            "--by-domain: {} changed since the trace was collected (sha256 differs)",
            m.dataset
        );
    }
    let mut per: Vec<(String, TraceStats)> = Vec::new();
    trace.for_each_batch(batch, |reqs| {
        for r in &reqs {
            let d = prompts.get(r.request as usize).map_or("?", |p| p.domain.as_str());
            let i = match per.iter().position(|(n, _)| n == d) {
                Some(i) => i,
                None => {
                    per.push((d.to_string(), TraceStats::new(m)));
                    per.len() - 1
                }
            };
            per[i].1.add(r);
        }
        Ok(())
    })?;
    per.sort_by(|a, b| a.0.cmp(&b.0));
    let mut text = String::from("domain      requests  top10%(mean over layers)  prev-token(mean)\n");
    for (d, s) in &per {
        let rows = s.layers();
        let n = rows.len().max(1) as f64;
        text += &format!(
            "{d:<10} {:>9}  {:>24.3}  {:>16.3}\n",
            s.requests,
            rows.iter().map(|r| r.top10_share).sum::<f64>() / n,
            rows.iter().map(|r| r.prev_token_overlap).sum::<f64>() / n
        );
    }
    text += "\nJensen-Shannon divergence of expert popularity between domains (bits, mean over layers):\n";
    for i in 0..per.len() {
        for j in i + 1..per.len() {
            let (a, b) = (&per[i].1, &per[j].1);
            let js: f64 = a
                .counts
                .iter()
                .zip(&b.counts)
                .map(|(x, y)| js_divergence(x, y))
                .sum::<f64>()
                / a.counts.len().max(1) as f64;
            text += &format!("  {} vs {}: {js:.4}\n", per[i].0, per[j].0);
        }
    }
    Ok((per, text))
}

/// Runs `trace-stats`; returns the printed table.
pub fn run(a: &StatsArgs) -> Result<String> {
    if !(0.0..=1.0).contains(&a.pin_threshold) {
        anyhow::bail!("--pin-threshold: {} is not a share in [0, 1]", a.pin_threshold);
    }
    let trace = Trace::open(&a.trace)?;
    let m = &trace.manifest;
    // --profile is checked before anything is written: a run that fails on it must not leave a
    // complete-looking stats folder behind.
    let profile_path = (!a.no_profile).then(|| {
        a.profile
            .clone()
            .unwrap_or_else(|| PathBuf::from("profiles").join(format!("{}.json", model_slug(&m.model_id))))
    });
    if let Some(path) = &profile_path {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("--profile: cannot create {}", parent.display()))?;
        }
        let probe = path.with_extension("json.write-test");
        std::fs::write(&probe, b"").with_context(|| format!("--profile: cannot write {}", path.display()))?;
        let _ = std::fs::remove_file(&probe);
    }
    let stats = compute(&trace, a.batch)?;
    let rows = stats.layers();
    let mut text = table(&rows);
    text += "\nexpert-set overlap by token distance (|E_t ∩ E_t-d| / k; baselines: two tokens of the same request, of different requests):\n";
    text += &locality_table(&rows);
    if a.by_domain {
        text += "\n";
        text += &by_domain(&trace, a.batch)?.1;
    }
    if let Some(dir) = &a.out {
        write_outputs(dir, m, &stats, &rows)?;
    }
    if let Some(path) = profile_path {
        if m.dataset.contains("heldout") {
            tracing::warn!(
                "building a profile from the held-out set {}: profiles should come from the other sets",
                m.dataset
            );
        }
        let profile = stats.profile(m, a.pin_threshold);
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&profile)?)
            .with_context(|| format!("--profile: cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path)?;
        eprintln!("wrote profile {}", path.display());
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    #[test]
    fn js_divergence_bounds() {
        assert_eq!(super::js_divergence(&[1, 2, 3], &[2, 4, 6]), 0.0);
        assert!((super::js_divergence(&[1, 0], &[0, 1]) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn slugs() {
        assert_eq!(super::model_slug("Qwen/Qwen3-30B-A3B"), "qwen--qwen3-30b-a3b");
        assert_eq!(super::model_slug("engine/tests/golden/qwen3_moe"), "qwen3_moe");
        assert_eq!(super::model_slug("/data/OLMoE-1B-7B/"), "olmoe-1b-7b");
    }
}
