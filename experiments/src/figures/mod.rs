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

mod headline;
mod stats_figs;
mod sweep_figs;
use stats_figs::{fig3, fig4, fig5};
use sweep_figs::{fig1, fig2, fig6, fig7, fig8};

/// DejaVu Sans (fonts-dejavu-core; free licence, see `assets/LICENSE-DejaVu`).
static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");
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
pub const FIGURES: [(&str, &str); 9] = [
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
    (
        "fig9_headline",
        "decode tok/s and stall vs capacity per predictor, live and simulated on one chart",
    ),
];

/// One row of a sweep's results (the columns figures use; absent columns read as NaN/empty).
#[derive(Debug, Clone, Default)]
pub struct Res {
    pub mode: String,
    pub capacity: f64,
    pub pinning: String,
    pub prefetch_depth: f64,
    pub prefetch_span: String,
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
    /// Repeated 4-grams in the last 200 generated tokens (live rows).
    pub repetition: f64,
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
        let span = st("prefetch_span");
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
        let rep = c("repetition");
        for i in 0..df.height() {
            out.push(Res {
                mode: mode[i].clone(),
                capacity: cap[i],
                pinning: pinning[i].clone(),
                prefetch_depth: depth[i],
                prefetch_span: if span[i].is_empty() {
                    "target".into()
                } else {
                    span[i].clone()
                },
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
                repetition: rep[i],
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
        legend(
            &mut chart,
            if p.legend_middle {
                SeriesLabelPosition::MiddleRight
            } else if p.legend_upper {
                SeriesLabelPosition::UpperRight
            } else {
                SeriesLabelPosition::LowerRight
            },
        )?;
    }
    Ok(())
}

/// Draws the chart's series labels at `pos` in the figures' legend style.
fn legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    pos: SeriesLabelPosition,
) -> DrawResult {
    chart
        .configure_series_labels()
        .position(pos)
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(180, 180, 180))
        .label_font((SANS, 12))
        .draw()
        .map_err(e)
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
    paint(
        BitMapBackend::with_buffer(&mut rgb, size).into_drawing_area(),
        &png,
        title,
        f,
    )?;
    write_png(&png, size, &rgb)?;
    let svg = out.join(format!("{stem}.svg"));
    paint(SVGBackend::new(&svg, size).into_drawing_area(), &svg, title, g)
}

/// Fills `root` white, draws `title` and then `f` below it, and presents it; errors name `path`.
fn paint<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    path: &Path,
    title: &str,
    f: &dyn Fn(&DrawingArea<DB, Shift>) -> DrawResult,
) -> Result<()> {
    let err = |x: &dyn std::fmt::Debug| anyhow::anyhow!("{}: {x:?}", path.display());
    root.fill(&WHITE).map_err(|x| err(&x))?;
    let area = root.titled(title, (SANS, 20)).map_err(|x| err(&x))?;
    f(&area).map_err(|x| anyhow::anyhow!("{}: {x}", path.display()))?;
    root.present().map_err(|x| err(&x))
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

/// What a figure needs and did not find.
pub type Skip = String;

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
            "fig8" => fig8(&rows, out, stem)?,
            _ => headline::fig9(&rows, out, stem)?,
        };
        done.push((stem.to_string(), r));
    }
    Ok(done)
}
