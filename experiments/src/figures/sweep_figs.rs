//! Figures 1, 2, 6, 7 and 8: drawn from sweep rows.

use super::*;

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

pub(super) fn fig1(rows: &[Res], out: &Path, stem: &str) -> Result<std::result::Result<(), Skip>> {
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

pub(super) fn fig2(rows: &[Res], out: &Path, stem: &str) -> Result<std::result::Result<(), Skip>> {
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

pub(super) fn fig6(rows: &[Res], out: &Path, stem: &str) -> Result<std::result::Result<(), Skip>> {
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
    // (A shard of a sweep may hold lru rows of neither kind: nothing to stack, and a figure
    // zero panels wide.)
    if groups.is_empty() {
        return Ok(Err(
            "no lru rows without prefetching or with the main predictor at its deepest depth".into(),
        ));
    }
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
            legend(&mut chart, SeriesLabelPosition::UpperRight)?;
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

pub(super) fn fig7(rows: &[Res], out: &Path, stem: &str) -> Result<std::result::Result<(), Skip>> {
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

pub(super) fn fig8(rows: &[Res], out: &Path, stem: &str) -> Result<std::result::Result<(), Skip>> {
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
    // The exact model's own repetition (sync rows generate its greedy tokens).
    let mut rep = lines(&|r| r.repetition);
    let rep_exact = median(
        rows.iter()
            .filter(|r| r.mode == "live" && r.on_miss == "sync")
            .map(|r| r.repetition)
            .filter(|v| v.is_finite())
            .collect(),
    );
    if rep_exact.is_finite() {
        let (lo, hi) = range(skip.iter().map(|r| r.capacity), 0.0);
        rep.push(Line {
            label: "exact model (sync)".into(),
            pts: vec![(lo, rep_exact), (hi, rep_exact)],
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
        Panel {
            title: "repetition of the generated text".into(),
            x: "capacity (experts per MoE layer)".into(),
            y: "repeated 4-grams, last 200 tokens".into(),
            lines: rep,
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
