//! The paper-style figures, drawn with plotters from results alone (PNG and SVG), with a font
//! shipped in the binary so that a machine without fonts renders text.
//!
//! A run folder is what `experiments/pipeline.sh` writes: sweep folders (`*/results.parquet`,
//! sim and/or live), `shadow/report.json` (train-shadow), `profile.json` and `stats/stats.json`
//! (trace-stats). Each figure draws from what it needs and is skipped, with the reason, when
//! that is missing.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use plotters::coord::Shift;
use plotters::prelude::*;
use polars::prelude::*;
use serde_json::Value;

/// DejaVu Sans (fonts-dejavu-core; free licence, see `assets/LICENSE-DejaVu`).
static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
const SANS: &str = "sans-serif";

fn register_font() -> Result<()> {
    static ONCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *ONCE.get_or_init(|| plotters::style::register_font(SANS, FontStyle::Normal, FONT).is_ok());
    if !ok {
        bail!("the bundled font could not be loaded");
    }
    Ok(())
}

/// Every figure, in the order: (file stem, what it shows).
pub const FIGURES: [(&str, &str); 8] = [
    (
        "fig1_hit_rate_vs_capacity",
        "decode hit rate vs capacity per eviction policy, with Belady and pinning",
    ),
    (
        "fig2_prefetch_depth",
        "decode hit rate and decode tok/s vs capacity per prefetch depth",
    ),
    (
        "fig3_predictor_recall",
        "predictor recall@k vs depth: shadow and the baselines",
    ),
    ("fig4_popularity_heatmap", "expert popularity, MoE layer × expert"),
    ("fig5_reuse_distance_cdf", "reuse-distance CDF per MoE layer"),
    (
        "fig6_time_per_token",
        "per-token decode time: compute, I/O stall, predictor",
    ),
    (
        "fig7_memory_vs_capacity",
        "memory vs capacity, modelled and measured",
    ),
    (
        "fig8_quality_under_skip",
        "quality vs capacity under skip-on-miss",
    ),
];

/// One row of a sweep's results (the columns figures use; absent columns read as NaN/empty).
#[derive(Debug, Clone, Default)]
pub struct Res {
    pub mode: String,
    pub capacity: f64,
    pub pinning: String,
    pub prefetch_depth: f64,
    pub predictor: String,
    pub policy: String,
    pub on_miss: String,
    pub hit_rate_decode: f64,
    pub fallback_rate: f64,
    pub est_decode_tok_s: f64,
    pub decode_tok_s: f64,
    pub compute_ms: f64,
    pub stall_ms: f64,
    pub predictor_ms: f64,
    pub modelled_cache_bytes: f64,
    pub peak_rss_bytes: f64,
    pub modelled_total_bytes: f64,
    pub top1: f64,
    pub kl: f64,
    pub ppl: f64,
    pub ppl_exact: f64,
    pub error: String,
}

impl Res {
    /// Decode tok/s: measured (live) or modelled (sim).
    fn tok_s(&self) -> f64 {
        if self.mode == "live" {
            self.decode_tok_s
        } else {
            self.est_decode_tok_s
        }
    }
}

/// Reads every `results.parquet` in `dir` and its sub-folders (one level).
pub fn read_results(dir: &Path) -> Result<Vec<Res>> {
    let mut files = Vec::new();
    if dir.join("results.parquet").is_file() {
        files.push(dir.join("results.parquet"));
    }
    let mut subs: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("--results: cannot read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path().join("results.parquet")))
        .filter(|p| p.is_file())
        .collect();
    subs.sort();
    files.extend(subs);
    let mut out = Vec::new();
    for f in files {
        let df = LazyFrame::scan_parquet(
            PlRefPath::new(f.to_string_lossy().as_ref()),
            ScanArgsParquet::default(),
        )
        .and_then(LazyFrame::collect)
        .map_err(|e| anyhow::anyhow!("{}: not a results file: {e}", f.display()))?;
        let fl = |name: &str| -> Vec<f64> {
            df.column(name)
                .ok()
                .and_then(|c| c.cast(&DataType::Float64).ok())
                .and_then(|c| {
                    c.f64()
                        .ok()
                        .map(|a| a.iter().map(|v| v.unwrap_or(f64::NAN)).collect())
                })
                .unwrap_or_else(|| vec![f64::NAN; df.height()])
        };
        let st = |name: &str| -> Vec<String> {
            df.column(name)
                .ok()
                .and_then(|c| {
                    c.str()
                        .ok()
                        .map(|a| a.iter().map(|v| v.unwrap_or("").to_string()).collect())
                })
                .unwrap_or_else(|| vec![String::new(); df.height()])
        };
        let (mode, pinning, predictor, policy, on_miss, error) = (
            st("mode"),
            st("pinning"),
            st("predictor"),
            st("policy"),
            st("on_miss"),
            st("error"),
        );
        let c = |n| fl(n);
        let (cap, depth, hit, fb, est, tok, comp, stall, pred) = (
            c("capacity"),
            c("prefetch_depth"),
            c("hit_rate_decode"),
            c("fallback_rate"),
            c("est_decode_tok_s"),
            c("decode_tok_s"),
            c("compute_ms_per_token"),
            c("stall_ms_per_token"),
            c("predictor_ms_per_token"),
        );
        let (cache, rss, total, top1, kl, ppl, ppl_exact) = (
            c("modelled_cache_bytes"),
            c("peak_rss_bytes"),
            c("modelled_total_bytes"),
            c("top1_agreement"),
            c("kl_divergence"),
            c("perplexity"),
            c("perplexity_exact"),
        );
        for i in 0..df.height() {
            out.push(Res {
                mode: mode[i].clone(),
                capacity: cap[i],
                pinning: pinning[i].clone(),
                prefetch_depth: depth[i],
                predictor: predictor[i].clone(),
                policy: policy[i].clone(),
                on_miss: on_miss[i].clone(),
                hit_rate_decode: hit[i],
                fallback_rate: fb[i],
                est_decode_tok_s: est[i],
                decode_tok_s: tok[i],
                compute_ms: comp[i],
                stall_ms: stall[i],
                predictor_ms: pred[i],
                modelled_cache_bytes: cache[i],
                peak_rss_bytes: rss[i],
                modelled_total_bytes: total[i],
                top1: top1[i],
                kl: kl[i],
                ppl: ppl[i],
                ppl_exact: ppl_exact[i],
                error: error[i].clone(),
            });
        }
    }
    Ok(out.into_iter().filter(|r| r.error.is_empty()).collect())
}

/// A short name for a pinning or predictor value (profile paths → their file name).
fn short(s: &str) -> String {
    if let Some(p) = s.strip_prefix("shadow:") {
        let _ = p;
        return "shadow".into();
    }
    match s.rsplit_once('/') {
        Some((_, tail)) => format!("pin {tail}"),
        None => s.to_string(),
    }
}

/// Median of the finite values.
fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Points (x, median y) of `rows` by x, sorted by x.
fn by_x(rows: &[&Res], x: impl Fn(&Res) -> f64, y: impl Fn(&Res) -> f64) -> Vec<(f64, f64)> {
    let mut xs: Vec<f64> = rows.iter().map(|r| x(r)).filter(|v| v.is_finite()).collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    xs.into_iter()
        .map(|xv| {
            (
                xv,
                median(rows.iter().filter(|r| x(r) == xv).map(|r| y(r)).collect()),
            )
        })
        .filter(|(_, y)| y.is_finite())
        .collect()
}

// ---------------------------------------------------------------- drawing

const PALETTE: [RGBColor; 8] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(86, 180, 233),
    RGBColor(230, 159, 0),
    RGBColor(120, 120, 120),
    RGBColor(0, 0, 0),
];

#[derive(Debug, Clone)]
struct Line {
    label: String,
    pts: Vec<(f64, f64)>,
    color: usize,
    dashed: bool,
}

#[derive(Debug, Clone, Default)]
struct Panel {
    title: String,
    x: String,
    y: String,
    lines: Vec<Line>,
    /// Category labels: x values are their indices.
    x_cats: Option<Vec<String>>,
    y_range: Option<(f64, f64)>,
    legend_upper: bool,
    /// Legend at the right edge, halfway up (over neither end of the lines).
    legend_middle: bool,
}

fn range(vals: impl Iterator<Item = f64>, pad: f64) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in vals.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        return (lo - 0.5, hi + 0.5);
    }
    let d = (hi - lo) * pad;
    (lo - d, hi + d)
}

type DrawResult = std::result::Result<(), String>;

fn e<E: std::fmt::Debug>(err: E) -> String {
    format!("{err:?}")
}

fn draw_lines<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, p: &Panel) -> DrawResult {
    let (x0, x1) = match &p.x_cats {
        Some(c) => (-0.3, c.len() as f64 - 0.7),
        None => range(p.lines.iter().flat_map(|l| l.pts.iter().map(|q| q.0)), 0.03),
    };
    let (y0, y1) = p
        .y_range
        .unwrap_or_else(|| range(p.lines.iter().flat_map(|l| l.pts.iter().map(|q| q.1)), 0.08));
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, (SANS, 17))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(e)?;
    let cats = p.x_cats.clone();
    let integral = p.lines.iter().flat_map(|l| &l.pts).all(|q| q.0.fract() == 0.0);
    let fmt = move |v: &f64| match &cats {
        Some(c) => {
            let i = v.round();
            if (v - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < c.len() {
                c[i as usize].clone()
            } else {
                String::new()
            }
        }
        None if integral && v.fract().abs() > 1e-9 => String::new(),
        None => {
            if v.abs() >= 100.0 || (v.fract().abs() < 1e-9 && v.abs() >= 1.0) {
                format!("{v:.0}")
            } else {
                format!("{v:.2}")
            }
        }
    };
    let mut mesh = chart.configure_mesh();
    mesh.x_desc(&p.x)
        .y_desc(&p.y)
        .label_style((SANS, 13))
        .axis_desc_style((SANS, 14))
        .x_label_formatter(&fmt)
        .light_line_style(RGBColor(235, 235, 235));
    if let Some(c) = &p.x_cats {
        mesh.x_labels(c.len() * 4 + 1);
    }
    mesh.draw().map_err(e)?;
    for l in &p.lines {
        let color = PALETTE[l.color % PALETTE.len()];
        let style = ShapeStyle {
            color: color.to_rgba(),
            filled: true,
            stroke_width: 2,
        };
        let series = if l.dashed {
            chart
                .draw_series(DashedLineSeries::new(l.pts.clone(), 7, 5, style))
                .map_err(e)?
        } else {
            chart
                .draw_series(LineSeries::new(l.pts.clone(), style))
                .map_err(e)?
        };
        series
            .label(l.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], style));
        chart
            .draw_series(l.pts.iter().map(|&q| Circle::new(q, 3, style.filled())))
            .map_err(e)?;
    }
    if !p.lines.is_empty() {
        chart
            .configure_series_labels()
            .position(if p.legend_middle {
                SeriesLabelPosition::MiddleRight
            } else if p.legend_upper {
                SeriesLabelPosition::UpperRight
            } else {
                SeriesLabelPosition::LowerRight
            })
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .label_font((SANS, 12))
            .draw()
            .map_err(e)?;
    }
    Ok(())
}

/// Writes `stem.png` and `stem.svg`, drawn by `f` on a titled canvas.
fn save(
    out: &Path,
    stem: &str,
    size: (u32, u32),
    title: &str,
    f: &dyn Fn(&DrawingArea<BitMapBackend<'_>, Shift>) -> DrawResult,
    g: &dyn Fn(&DrawingArea<SVGBackend<'_>, Shift>) -> DrawResult,
) -> Result<()> {
    let png = out.join(format!("{stem}.png"));
    let mut rgb = vec![0u8; size.0 as usize * size.1 as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, size).into_drawing_area();
        root.fill(&WHITE)
            .map_err(|x| anyhow::anyhow!("{}: {x:?}", png.display()))?;
        let area = root
            .titled(title, (SANS, 20))
            .map_err(|x| anyhow::anyhow!("{}: {x:?}", png.display()))?;
        f(&area).map_err(|x| anyhow::anyhow!("{}: {x}", png.display()))?;
        root.present()
            .map_err(|x| anyhow::anyhow!("{}: {x:?}", png.display()))?;
    }
    write_png(&png, size, &rgb)?;
    let svg = out.join(format!("{stem}.svg"));
    {
        let root = SVGBackend::new(&svg, size).into_drawing_area();
        root.fill(&WHITE)
            .map_err(|x| anyhow::anyhow!("{}: {x:?}", svg.display()))?;
        let area = root
            .titled(title, (SANS, 20))
            .map_err(|x| anyhow::anyhow!("{}: {x:?}", svg.display()))?;
        g(&area).map_err(|x| anyhow::anyhow!("{}: {x}", svg.display()))?;
        root.present()
            .map_err(|x| anyhow::anyhow!("{}: {x:?}", svg.display()))?;
    }
    Ok(())
}

/// Writes an 8-bit RGB PNG (zlib through flate2; written to a temporary name, then renamed).
pub fn write_png(path: &Path, (w, h): (u32, u32), rgb: &[u8]) -> Result<()> {
    use std::io::Write;
    let row = w as usize * 3;
    if rgb.len() != row * h as usize {
        bail!("{}: {} bytes of pixels for {w}×{h}", path.display(), rgb.len());
    }
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    for line in rgb.chunks(row) {
        z.write_all(&[0])?;
        z.write_all(line)?;
    }
    let idat = z.finish()?;
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, data) in [(b"IHDR", &ihdr[..]), (b"IDAT", &idat[..]), (b"IEND", &[][..])] {
        png.extend_from_slice(&(data.len() as u32).to_be_bytes());
        png.extend_from_slice(kind);
        png.extend_from_slice(data);
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        png.extend_from_slice(&crc.sum().to_be_bytes());
    }
    let tmp = path.with_extension("png.tmp");
    std::fs::write(&tmp, &png).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn save_panels(out: &Path, stem: &str, title: &str, panels: &[Panel]) -> Result<()> {
    let w = 620 * panels.len() as u32;
    save(
        out,
        stem,
        (w.max(700), 480),
        title,
        &|a| {
            for (area, p) in a.split_evenly((1, panels.len())).iter().zip(panels) {
                draw_lines(area, p)?;
            }
            Ok(())
        },
        &|a| {
            for (area, p) in a.split_evenly((1, panels.len())).iter().zip(panels) {
                draw_lines(area, p)?;
            }
            Ok(())
        },
    )
}

// ---------------------------------------------------------------- the figures

/// What a figure needs and did not find.
pub type Skip = String;

fn sim_or_live(rows: &[Res]) -> Vec<&Res> {
    let sim: Vec<&Res> = rows.iter().filter(|r| r.mode == "sim").collect();
    if sim.is_empty() {
        rows.iter().collect()
    } else {
        sim
    }
}

/// The most informative predictor in the rows: shadow, else gate-lookahead, else any.
fn main_predictor(rows: &[&Res]) -> Option<String> {
    let preds: Vec<&str> = rows.iter().map(|r| r.predictor.as_str()).collect();
    preds
        .iter()
        .find(|p| p.starts_with("shadow:"))
        .or_else(|| preds.iter().find(|p| **p == "gate-lookahead"))
        .or_else(|| preds.iter().find(|p| **p != "none" && **p != "oracle"))
        .map(|p| p.to_string())
}

fn fig1(rows: &[Res], out: &Path, stem: &str) -> Result<std::result::Result<(), Skip>> {
    let base: Vec<&Res> = sim_or_live(rows)
        .into_iter()
        .filter(|r| r.prefetch_depth == 0.0 && r.on_miss == "sync")
        .collect();
    if base.is_empty() {
        return Ok(Err("no rows without prefetching and with sync misses".into()));
    }
    let mut keys: Vec<(String, String)> = base
        .iter()
        .map(|r| (r.policy.clone(), r.pinning.clone()))
        .collect();
    keys.sort();
    keys.dedup();
    let policies: Vec<String> = {
        let mut p: Vec<String> = keys.iter().map(|k| k.0.clone()).collect();
        p.dedup();
        p
    };
    let pinnings: Vec<String> = {
        let mut p: Vec<String> = keys.iter().map(|k| k.1.clone()).collect();
        p.sort();
        p.dedup();
        p
    };
    let mut lines = Vec::new();
    for (policy, pinning) in &keys {
        let sel: Vec<&Res> = base
            .iter()
            .copied()
            .filter(|r| &r.policy == policy && &r.pinning == pinning)
            .collect();
        let color = policies.iter().position(|p| p == policy).unwrap_or(0);
        let pin_i = pinnings.iter().position(|p| p == pinning).unwrap_or(0);
        lines.push(Line {
            label: if pinnings.len() > 1 {
                format!("{policy}, {}", short(pinning))
            } else {
                policy.clone()
            },
            pts: by_x(&sel, |r| r.capacity, |r| r.hit_rate_decode),
            color,
            dashed: pin_i > 0,
        });
    }
    let p = Panel {
        title: "No prefetching, sync misses (dashed: pinned)".into(),
        x: "capacity (experts per MoE layer)".into(),
        y: "decode hit rate".into(),
        lines,
        ..Default::default()
    };
    save_panels(out, stem, "Hit rate vs cache capacity by eviction policy", &[p])?;
    Ok(Ok(()))
}

fn fig2(rows: &[Res], out: &Path, stem: &str) -> Result<std::result::Result<(), Skip>> {
    let base: Vec<&Res> = sim_or_live(rows)
        .into_iter()
        .filter(|r| r.on_miss == "sync" && r.pinning == "off" && r.policy == "lru")
        .collect();
    let Some(pred) = main_predictor(&base) else {
        return Ok(Err("no prefetching rows (lru, pinning off, sync)".into()));
    };
    let mut depths: Vec<f64> = base.iter().map(|r| r.prefetch_depth).collect();
    depths.sort_by(f64::total_cmp);
    depths.dedup();
    let sel = |d: f64| -> Vec<&Res> {
        base.iter()
            .copied()
            .filter(|r| {
                r.prefetch_depth == d
                    && (if d == 0.0 {
                        r.predictor == "none"
                    } else {
                        r.predictor == pred
                    })
            })
            .collect()
    };
    let mk = |y: &dyn Fn(&Res) -> f64| -> Vec<Line> {
        depths
            .iter()
            .enumerate()
            .map(|(i, &d)| Line {
                label: if d == 0.0 {
                    "no prefetch".into()
                } else {
                    format!("depth {d}")
                },
                pts: by_x(&sel(d), |r| r.capacity, y),
                color: i,
                dashed: false,
            })
            .filter(|l| !l.pts.is_empty())
            .collect()
    };
    let mode = if base.iter().any(|r| r.mode == "live") {
        "measured"
    } else {
        "modelled"
    };
    let hit = Panel {
        title: format!("{} prefetching (lru, sync)", short(&pred)),
        x: "capacity (experts per MoE layer)".into(),
        y: "decode hit rate".into(),
        lines: mk(&|r| r.hit_rate_decode),
        ..Default::default()
    };
    let tok = Panel {
        title: format!("decode throughput ({mode})"),
        x: "capacity (experts per MoE layer)".into(),
        y: "decode tokens/s".into(),
        lines: mk(&|r| r.tok_s()),
        ..Default::default()
    };
    // Every predictor at the deepest depth.
    let dmax = depths.iter().copied().fold(0.0, f64::max);
    let mut preds: Vec<String> = base
        .iter()
        .filter(|r| r.prefetch_depth == dmax && r.predictor != "none")
        .map(|r| r.predictor.clone())
        .collect();
    preds.sort();
    preds.dedup();
    let mut lines = vec![Line {
        label: "no prefetch".into(),
        pts: by_x(&sel(0.0), |r| r.capacity, |r| r.hit_rate_decode),
        color: 7,
        dashed: true,
    }];
    for (i, p) in preds.iter().enumerate() {
        let s: Vec<&Res> = base
            .iter()
            .copied()
            .filter(|r| r.prefetch_depth == dmax && &r.predictor == p)
            .collect();
        lines.push(Line {
            label: short(p),
            pts: by_x(&s, |r| r.capacity, |r| r.hit_rate_decode),
            color: i,
            dashed: false,
        });
    }
    let cmp = Panel {
        title: format!("every predictor at depth {dmax}"),
        x: "capacity (experts per MoE layer)".into(),
        y: "decode hit rate".into(),
        lines,
        ..Default::default()
    };
    save_panels(
        out,
        stem,
        "Prefetching: hit rate and throughput vs capacity",
        &[hit, tok, cmp],
    )?;
    Ok(Ok(()))
}

fn fig3(report: Option<&Value>, out: &Path, stem: &str) -> Result<std::result::Result<(), Skip>> {
    let Some(reports) = report.and_then(|r| r.get("reports")).and_then(Value::as_array) else {
        return Ok(Err("no train-shadow report (shadow/report.json)".into()));
    };
    let k = reports
        .first()
        .and_then(|r| r.get("k"))
        .and_then(Value::as_u64)
        .unwrap_or(8);
    let mut lines = Vec::new();
    for (i, r) in reports.iter().enumerate() {
        let name = r
            .get("predictor")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string();
        let mut pts: Vec<(f64, f64)> = r
            .get("by_depth")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(d, v)| Some((d.parse::<f64>().ok()?, v.get("recall")?.as_f64()?)))
                    .collect()
            })
            .unwrap_or_default();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        lines.push(Line {
            dashed: name == "oracle",
            label: name,
            pts,
            color: i,
        });
    }
    let p = Panel {
        title: "held-out traces".into(),
        x: "prediction depth D (MoE layers ahead)".into(),
        y: format!("recall@{k}"),
        lines,
        y_range: Some((0.0, 1.02)),
        legend_middle: true,
        ..Default::default()
    };
    save_panels(out, stem, &format!("Predictor recall@{k} vs depth"), &[p])?;
    Ok(Ok(()))
}

fn fig4(profile: Option<&Value>, out: &Path, stem: &str) -> Result<std::result::Result<(), Skip>> {
    let Some(layers) = profile.and_then(|p| p.get("layers")).and_then(Value::as_object) else {
        return Ok(Err("no expert profile (profile.json)".into()));
    };
    let mut rows: Vec<(usize, Vec<f64>)> = layers
        .iter()
        .filter_map(|(l, v)| {
            Some((
                l.parse().ok()?,
                v.get("activations")?
                    .as_array()?
                    .iter()
                    .map(|x| x.as_f64().unwrap_or(0.0))
                    .collect(),
            ))
        })
        .collect();
    rows.sort_by_key(|r| r.0);
    let experts = rows.iter().map(|r| r.1.len()).max().unwrap_or(0);
    if rows.is_empty() || experts == 0 {
        return Ok(Err("the profile has no activation counts".into()));
    }
    // log2(count / the layer's mean count), clamped to ±4.
    let cells: Vec<Vec<f64>> = rows
        .iter()
        .map(|(_, c)| {
            let mean = c.iter().sum::<f64>() / c.len().max(1) as f64;
            c.iter()
                .map(|&x| ((x + 0.5) / mean.max(1e-9)).log2().clamp(-4.0, 4.0))
                .collect()
        })
        .collect();
    let names: Vec<usize> = rows.iter().map(|r| r.0).collect();
    let color = |v: f64| -> RGBColor {
        // Diverging: blue (rare) – white (mean) – red (popular).
        let t = (v / 4.0).clamp(-1.0, 1.0);
        let (r, g, b) = if t < 0.0 {
            (1.0 + t * 0.8, 1.0 + t * 0.55, 1.0)
        } else {
            (1.0, 1.0 - t * 0.8, 1.0 - t * 0.85)
        };
        RGBColor((r * 255.0) as u8, (g * 255.0) as u8, (b * 255.0) as u8)
    };
    fn draw<DB: DrawingBackend>(
        a: &DrawingArea<DB, Shift>,
        cells: &[Vec<f64>],
        names: &[usize],
        experts: usize,
        color: &dyn Fn(f64) -> RGBColor,
    ) -> DrawResult {
        let (main, bar) = a.split_horizontally(a.dim_in_pixel().0 as i32 - 110);
        let mut chart = ChartBuilder::on(&main)
            .caption("colour: log2(activations / layer mean)", (SANS, 15))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..experts as f64, 0.0..cells.len() as f64)
            .map_err(e)?;
        let yfmt = |v: &f64| {
            let i = v.floor() as usize;
            if (v - v.floor() - 0.5).abs() < 1e-6 && i < names.len() {
                format!("{}", names[i])
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("expert id")
            .y_desc("MoE layer")
            .label_style((SANS, 13))
            .axis_desc_style((SANS, 14))
            .y_labels(cells.len() * 2 + 1)
            .y_label_formatter(&yfmt)
            .x_label_formatter(&|v| format!("{v:.0}"))
            .draw()
            .map_err(e)?;
        for (l, row) in cells.iter().enumerate() {
            chart
                .draw_series(row.iter().enumerate().map(|(x, &v)| {
                    Rectangle::new(
                        [(x as f64, l as f64), (x as f64 + 1.0, l as f64 + 1.0)],
                        color(v).filled(),
                    )
                }))
                .map_err(e)?;
        }
        let mut cb = ChartBuilder::on(&bar)
            .margin_top(40)
            .margin_bottom(56)
            .margin_right(10)
            .y_label_area_size(40)
            .build_cartesian_2d(0.0..1.0, -4.0..4.0)
            .map_err(e)?;
        cb.configure_mesh()
            .disable_mesh()
            .disable_x_axis()
            .label_style((SANS, 12))
            .y_label_formatter(&|v| format!("{v:+.0}"))
            .draw()
            .map_err(e)?;
        cb.draw_series((0..80).map(|i| {
            let v = -4.0 + 8.0 * f64::from(i) / 80.0;
            Rectangle::new([(0.0, v), (1.0, v + 0.1)], color(v + 0.05).filled())
        }))
        .map_err(e)?;
        Ok(())
    }
    save(
        out,
        stem,
        (1300, 520),
        "Expert popularity per MoE layer",
        &|a| draw(a, &cells, &names, experts, &color),
        &|a| draw(a, &cells, &names, experts, &color),
    )?;
    Ok(Ok(()))
}

fn fig5(stats: Option<&Value>, out: &Path, stem: &str) -> Result<std::result::Result<(), Skip>> {
    let Some(rd) = stats
        .and_then(|s| s.get("reuse_distance"))
        .and_then(Value::as_array)
    else {
        return Ok(Err("no trace statistics (stats/stats.json)".into()));
    };
    let mut cats: Vec<String> = Vec::new();
    let mut lines = Vec::new();
    for (i, layer) in rd.iter().enumerate() {
        let (Some(buckets), Some(counts)) = (
            layer.get("buckets").and_then(Value::as_array),
            layer.get("counts").and_then(Value::as_array),
        ) else {
            continue;
        };
        let pairs: Vec<(String, f64)> = buckets
            .iter()
            .zip(counts)
            .filter_map(|(b, c)| Some((b.as_str()?.to_string(), c.as_f64()?)))
            .filter(|(b, _)| b != "first")
            .collect();
        let total: f64 = pairs.iter().map(|p| p.1).sum();
        if total <= 0.0 {
            continue;
        }
        cats = pairs.iter().map(|p| p.0.clone()).collect();
        let mut acc = 0.0;
        let pts = pairs
            .iter()
            .enumerate()
            .map(|(j, (_, c))| {
                acc += c;
                (j as f64, acc / total)
            })
            .collect();
        let l = layer.get("layer").and_then(Value::as_u64).unwrap_or(i as u64);
        lines.push(Line {
            label: format!("layer {l}"),
            pts,
            color: i,
            dashed: i >= PALETTE.len(),
        });
    }
    if lines.is_empty() {
        return Ok(Err("the statistics have no reuse distances".into()));
    }
    let p = Panel {
        title: "re-uses of an expert (first uses left out)".into(),
        x: "reuse distance (tokens since the expert's last use)".into(),
        y: "cumulative share of re-uses".into(),
        lines,
        x_cats: Some(cats),
        y_range: Some((0.0, 1.02)),
        ..Default::default()
    };
    save_panels(out, stem, "Reuse-distance CDF per MoE layer", &[p])?;
    Ok(Ok(()))
}

fn fig6(rows: &[Res], out: &Path, stem: &str) -> Result<std::result::Result<(), Skip>> {
    let live: Vec<&Res> = rows.iter().filter(|r| r.mode == "live").collect();
    let (base, how) = if live.iter().any(|r| r.compute_ms.is_finite()) {
        (live, "measured (live)")
    } else {
        (
            rows.iter().filter(|r| r.mode == "sim").collect(),
            "modelled (sim)",
        )
    };
    let base: Vec<&Res> = base
        .into_iter()
        .filter(|r| {
            r.on_miss == "sync" && r.pinning == "off" && r.policy == "lru" && r.compute_ms.is_finite()
        })
        .collect();
    if base.is_empty() {
        return Ok(Err(
            "no rows with a per-token time breakdown (lru, pinning off, sync)".into(),
        ));
    }
    let pred = main_predictor(&base);
    let dmax = base.iter().map(|r| r.prefetch_depth).fold(0.0, f64::max);
    let mut groups: Vec<(String, Vec<&Res>)> = vec![(
        "no prefetch".into(),
        base.iter().copied().filter(|r| r.predictor == "none").collect(),
    )];
    if let Some(p) = &pred {
        groups.push((
            format!("{} at depth {dmax}", short(p)),
            base.iter()
                .copied()
                .filter(|r| &r.predictor == p && r.prefetch_depth == dmax)
                .collect(),
        ));
    }
    groups.retain(|g| !g.1.is_empty());
    let mut caps: Vec<f64> = base.iter().map(|r| r.capacity).collect();
    caps.sort_by(f64::total_cmp);
    caps.dedup();
    // Per group and capacity: median compute, stall, predictor ms.
    let stacks: Vec<(String, Vec<[f64; 3]>)> = groups
        .iter()
        .map(|(name, rs)| {
            let v = caps
                .iter()
                .map(|&c| {
                    let at: Vec<&&Res> = rs.iter().filter(|r| r.capacity == c).collect();
                    let m = |f: &dyn Fn(&Res) -> f64| {
                        let x = median(at.iter().map(|r| f(r)).collect());
                        if x.is_finite() { x } else { 0.0 }
                    };
                    [m(&|r| r.compute_ms), m(&|r| r.stall_ms), m(&|r| r.predictor_ms)]
                })
                .collect();
            (name.clone(), v)
        })
        .collect();
    let ymax = stacks
        .iter()
        .flat_map(|(_, v)| v.iter().map(|s| s.iter().sum::<f64>()))
        .fold(0.0, f64::max)
        * 1.15;
    fn draw<DB: DrawingBackend>(
        a: &DrawingArea<DB, Shift>,
        stacks: &[(String, Vec<[f64; 3]>)],
        caps: &[f64],
        ymax: f64,
    ) -> DrawResult {
        let segs = ["compute", "I/O stall", "predictor"];
        let colors = [PALETTE[0], PALETTE[1], PALETTE[2]];
        for (area, (name, v)) in a.split_evenly((1, stacks.len())).iter().zip(stacks) {
            let mut chart = ChartBuilder::on(area)
                .caption(name, (SANS, 17))
                .margin(12)
                .x_label_area_size(44)
                .y_label_area_size(64)
                .build_cartesian_2d(-0.6..caps.len() as f64 - 0.4, 0.0..ymax.max(1e-6))
                .map_err(e)?;
            let fmt = |x: &f64| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < caps.len() {
                    format!("{:.0}", caps[i as usize])
                } else {
                    String::new()
                }
            };
            chart
                .configure_mesh()
                .x_desc("capacity (experts per MoE layer)")
                .y_desc("ms per decode token")
                .label_style((SANS, 13))
                .axis_desc_style((SANS, 14))
                .x_labels(caps.len() * 4 + 1)
                .x_label_formatter(&fmt)
                .light_line_style(RGBColor(235, 235, 235))
                .draw()
                .map_err(e)?;
            for s in 0..3 {
                let c = colors[s];
                chart
                    .draw_series(v.iter().enumerate().map(|(i, st)| {
                        let lo: f64 = st[..s].iter().sum();
                        let x = i as f64;
                        Rectangle::new([(x - 0.3, lo), (x + 0.3, lo + st[s])], c.filled())
                    }))
                    .map_err(e)?
                    .label(segs[s])
                    .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], c.filled()));
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(180, 180, 180))
                .label_font((SANS, 12))
                .draw()
                .map_err(e)?;
        }
        Ok(())
    }
    let title = format!("Per-token decode time, {how}");
    save(
        out,
        stem,
        (620 * stacks.len() as u32, 480),
        &title,
        &|a| draw(a, &stacks, &caps, ymax),
        &|a| draw(a, &stacks, &caps, ymax),
    )?;
    Ok(Ok(()))
}

fn fig7(rows: &[Res], out: &Path, stem: &str) -> Result<std::result::Result<(), Skip>> {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    let mut panels = Vec::new();
    let sim: Vec<&Res> = rows
        .iter()
        .filter(|r| r.mode == "sim" && r.modelled_cache_bytes > 0.0)
        .collect();
    if !sim.is_empty() {
        panels.push(Panel {
            title: "expert cache, modelled (sim expert size)".into(),
            x: "capacity (experts per MoE layer)".into(),
            y: "GiB".into(),
            lines: vec![Line {
                label: "resident experts".into(),
                pts: by_x(&sim, |r| r.capacity, |r| r.modelled_cache_bytes / GIB),
                color: 0,
                dashed: false,
            }],
            legend_upper: false,
            ..Default::default()
        });
    }
    let live: Vec<&Res> = rows
        .iter()
        .filter(|r| r.mode == "live" && r.peak_rss_bytes.is_finite())
        .collect();
    if !live.is_empty() {
        panels.push(Panel {
            title: "whole process, live".into(),
            x: "capacity (experts per MoE layer)".into(),
            y: "MiB".into(),
            lines: vec![
                Line {
                    label: "peak RSS (measured)".into(),
                    pts: by_x(&live, |r| r.capacity, |r| r.peak_rss_bytes / MIB),
                    color: 1,
                    dashed: false,
                },
                Line {
                    label: "byte model (predicted)".into(),
                    pts: by_x(&live, |r| r.capacity, |r| r.modelled_total_bytes / MIB),
                    color: 0,
                    dashed: true,
                },
            ],
            ..Default::default()
        });
    }
    if panels.is_empty() {
        return Ok(Err("no rows with memory figures".into()));
    }
    save_panels(out, stem, "Memory vs cache capacity", &panels)?;
    Ok(Ok(()))
}

fn fig8(rows: &[Res], out: &Path, stem: &str) -> Result<std::result::Result<(), Skip>> {
    let skip: Vec<&Res> = rows
        .iter()
        .filter(|r| r.mode == "live" && r.on_miss == "skip" && r.top1.is_finite())
        .collect();
    if skip.is_empty() {
        return Ok(Err("no live rows with --on-miss skip".into()));
    }
    let mut keys: Vec<(String, String, f64)> = skip
        .iter()
        .map(|r| (r.predictor.clone(), r.pinning.clone(), r.prefetch_depth))
        .collect();
    keys.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.total_cmp(&b.2)));
    keys.dedup();
    let label = |k: &(String, String, f64)| {
        let mut s = if k.0 == "none" {
            "no prefetch".to_string()
        } else {
            format!("{} D{}", short(&k.0), k.2)
        };
        if k.1 != "off" {
            s += &format!(", {}", short(&k.1));
        }
        s
    };
    let lines = |y: &dyn Fn(&Res) -> f64| -> Vec<Line> {
        keys.iter()
            .enumerate()
            .map(|(i, k)| {
                let sel: Vec<&Res> = skip
                    .iter()
                    .copied()
                    .filter(|r| r.predictor == k.0 && r.pinning == k.1 && r.prefetch_depth == k.2)
                    .collect();
                Line {
                    label: label(k),
                    pts: by_x(&sel, |r| r.capacity, y),
                    color: i,
                    dashed: false,
                }
            })
            .collect()
    };
    let exact = median(skip.iter().map(|r| r.ppl_exact).collect());
    let mut ppl = lines(&|r| r.ppl);
    if exact.is_finite() {
        let (lo, hi) = range(skip.iter().map(|r| r.capacity), 0.0);
        ppl.push(Line {
            label: "exact model".into(),
            pts: vec![(lo, exact), (hi, exact)],
            color: 7,
            dashed: true,
        });
    }
    let panels = [
        Panel {
            title: "top-1 agreement with the exact model".into(),
            x: "capacity (experts per MoE layer)".into(),
            y: "share of positions".into(),
            lines: lines(&|r| r.top1),
            ..Default::default()
        },
        Panel {
            title: "KL(exact ‖ skip) of next-token distributions".into(),
            x: "capacity (experts per MoE layer)".into(),
            y: "mean KL (nats)".into(),
            lines: lines(&|r| r.kl),
            legend_upper: true,
            ..Default::default()
        },
        Panel {
            title: "perplexity on the dataset's text".into(),
            x: "capacity (experts per MoE layer)".into(),
            y: "perplexity".into(),
            lines: ppl,
            legend_upper: true,
            ..Default::default()
        },
    ];
    save_panels(
        out,
        stem,
        "Quality under skip-on-miss (flash-moe's fallback), measured",
        &panels,
    )?;
    Ok(Ok(()))
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(Some(
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?,
    ))
}

/// Draws the figures named in `only` (all when empty) from the run folder `results` into `out`;
/// returns, per figure, `Ok(files)` or `Err(why it was skipped)`.
pub fn draw(
    results: &Path,
    out: &Path,
    only: &[&str],
) -> Result<Vec<(String, std::result::Result<(), Skip>)>> {
    register_font()?;
    if !results.is_dir() {
        bail!(
            "--results: {} is not a folder (expected a run folder of experiments/pipeline.sh or bench-sweep)",
            results.display()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("--out: cannot create {}", out.display()))?;
    let rows = read_results(results)?;
    let report = read_json(&results.join("shadow/report.json"))?.or(read_json(&results.join("report.json"))?);
    let profile = read_json(&results.join("profile.json"))?;
    let stats = read_json(&results.join("stats/stats.json"))?.or(read_json(&results.join("stats.json"))?);
    let mut done = Vec::new();
    for (stem, _) in FIGURES {
        if !only.is_empty() && !only.iter().any(|o| stem.starts_with(o)) {
            continue;
        }
        let r = match &stem[..4] {
            "fig1" => fig1(&rows, out, stem)?,
            "fig2" => fig2(&rows, out, stem)?,
            "fig3" => fig3(report.as_ref(), out, stem)?,
            "fig4" => fig4(profile.as_ref(), out, stem)?,
            "fig5" => fig5(stats.as_ref(), out, stem)?,
            "fig6" => fig6(&rows, out, stem)?,
            "fig7" => fig7(&rows, out, stem)?,
            _ => fig8(&rows, out, stem)?,
        };
        done.push((stem.to_string(), r));
    }
    Ok(done)
}
