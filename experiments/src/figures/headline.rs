//! Figure 9, the headline: decode tok/s and I/O stall per token vs capacity, one colour per
//! predictor (at its best depth by measured tok/s), live (solid, median of the repeats) and
//! simulated (dashed) on the same axes.

use super::*;

/// The rows of the headline comparison: LRU, sync misses, no pinning, one span.
fn base(rows: &[Res]) -> Vec<&Res> {
    rows.iter()
        .filter(|r| {
            r.policy == "lru" && r.on_miss == "sync" && r.pinning == "off" && r.prefetch_span == "target"
        })
        .collect()
}

pub(super) fn fig9(rows: &[Res], out: &Path, stem: &str) -> Result<std::result::Result<(), Skip>> {
    let rows = base(rows);
    let live: Vec<&Res> = rows.iter().copied().filter(|r| r.mode == "live").collect();
    let sim: Vec<&Res> = rows.iter().copied().filter(|r| r.mode == "sim").collect();
    if live.is_empty() || sim.is_empty() {
        return Ok(Err(
            "needs live and simulated rows of one sweep (lru, sync, pinning off)".into(),
        ));
    }
    let mut preds: Vec<String> = live.iter().map(|r| r.predictor.clone()).collect();
    preds.sort();
    preds.dedup();
    // "none" first, then the others by name.
    preds.sort_by_key(|p| (p != "none", p.clone()));
    // Each predictor at its best depth: the highest median live tok/s summed over capacities.
    let best_depth = |p: &str| -> f64 {
        let mut depths: Vec<f64> = live
            .iter()
            .filter(|r| r.predictor == p)
            .map(|r| r.prefetch_depth)
            .collect();
        depths.sort_by(f64::total_cmp);
        depths.dedup();
        depths
            .into_iter()
            .map(|d| {
                let s: Vec<&Res> = live
                    .iter()
                    .copied()
                    .filter(|r| r.predictor == p && r.prefetch_depth == d)
                    .collect();
                (
                    d,
                    by_x(&s, |r| r.capacity, |r| r.decode_tok_s)
                        .iter()
                        .map(|q| q.1)
                        .sum::<f64>(),
                )
            })
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map_or(0.0, |x| x.0)
    };
    let mut tok = Vec::new();
    let mut stall = Vec::new();
    for (i, p) in preds.iter().enumerate() {
        let d = best_depth(p);
        let label = if p == "none" {
            "no prefetch".to_string()
        } else {
            format!("{} (depth {d})", short(p))
        };
        let pick = |set: &[&Res]| -> Vec<Res> {
            set.iter()
                .filter(|r| &r.predictor == p && r.prefetch_depth == d)
                .map(|r| (*r).clone())
                .collect()
        };
        let (l, s) = (pick(&live), pick(&sim));
        let (l, s): (Vec<&Res>, Vec<&Res>) = (l.iter().collect(), s.iter().collect());
        for (lines, y) in [
            (&mut tok, (|r: &Res| r.tok_s()) as fn(&Res) -> f64),
            (&mut stall, |r: &Res| r.stall_ms),
        ] {
            lines.push(Line {
                label: format!("{label}, live"),
                pts: by_x(&l, |r| r.capacity, y),
                color: i,
                dashed: false,
            });
            lines.push(Line {
                label: format!("{label}, sim"),
                pts: by_x(&s, |r| r.capacity, y),
                color: i,
                dashed: true,
            });
        }
    }
    let tok = Panel {
        title: "decode throughput (solid: live, dashed: simulated)".into(),
        x: "capacity (experts per MoE layer)".into(),
        y: "decode tokens/s".into(),
        lines: tok.into_iter().filter(|l| !l.pts.is_empty()).collect(),
        legend_upper: true,
        ..Default::default()
    };
    let stall = Panel {
        title: "I/O stall per decode token".into(),
        x: "capacity (experts per MoE layer)".into(),
        y: "stall, ms per token".into(),
        lines: stall.into_iter().filter(|l| !l.pts.is_empty()).collect(),
        ..Default::default()
    };
    save_panels(
        out,
        stem,
        "Offloaded decode: live against the calibrated simulator",
        &[tok, stall],
    )?;
    Ok(Ok(()))
}
