//! Figures 3, 4 and 5: drawn from train-shadow's report and trace-stats' outputs.

use super::*;
pub(super) fn fig3(report: Option<&Value>, out: &Path, stem: &str) -> Result<std::result::Result<(), Skip>> {
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

pub(super) fn fig4(profile: Option<&Value>, out: &Path, stem: &str) -> Result<std::result::Result<(), Skip>> {
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

pub(super) fn fig5(stats: Option<&Value>, out: &Path, stem: &str) -> Result<std::result::Result<(), Skip>> {
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
    let mut panels = vec![p];
    panels.extend(stats.and_then(locality_panel));
    save_panels(
        out,
        stem,
        "Reuse across tokens: reuse-distance CDF per MoE layer, expert-set overlap by distance",
        &panels,
    )?;
    Ok(Ok(()))
}

/// The mean over layers of the overlap of expert sets between tokens d apart, next to its two
/// baselines (two tokens of one request, tokens of different requests); `None` for statistics
/// written before trace-stats measured it.
fn locality_panel(stats: &Value) -> Option<Panel> {
    let dists: Vec<u64> = stats
        .get("overlap_distances")?
        .as_array()?
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    let layers = stats.get("layers")?.as_array()?;
    let mean = |f: &dyn Fn(&Value) -> Option<f64>| {
        let v: Vec<f64> = layers.iter().filter_map(f).filter(|x| x.is_finite()).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    let overlap: Vec<(f64, f64)> = (0..dists.len())
        .filter_map(|i| {
            Some((
                i as f64,
                mean(&|l| l.get("overlap_by_distance")?.get(i)?.as_f64())?,
            ))
        })
        .collect();
    if overlap.is_empty() {
        return None;
    }
    let last = (dists.len() - 1) as f64;
    let mut lines = vec![Line {
        label: "two tokens d apart".into(),
        pts: overlap,
        color: 0,
        dashed: false,
    }];
    for (i, (field, label)) in [
        ("request_pair_overlap", "any two tokens of a request"),
        ("cross_request_overlap", "tokens of different requests"),
    ]
    .into_iter()
    .enumerate()
    {
        if let Some(y) = mean(&|l| l.get(field)?.as_f64()) {
            lines.push(Line {
                label: label.into(),
                pts: vec![(0.0, y), (last, y)],
                color: i + 1,
                dashed: true,
            });
        }
    }
    let lift = mean(&|l| l.get("locality_lift")?.as_f64());
    Some(Panel {
        title: format!(
            "expert-set overlap, mean over layers{}",
            lift.map_or(String::new(), |x| format!(" (locality lift {x:.2})"))
        ),
        x: "token distance d".into(),
        y: "|E_t ∩ E_t-d| / k".into(),
        lines,
        x_cats: Some(dists.iter().map(u64::to_string).collect()),
        legend_upper: true,
        ..Default::default()
    })
}
