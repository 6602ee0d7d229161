//! Scoring predictions: recall@k, precision@k and exact-set match, overall, per depth and per
//! target layer (DESIGN.md "predictor recall@k at depth D").

use std::collections::BTreeMap;

use serde::Serialize;

use crate::data::Examples;

/// Sums of one group of examples.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Score {
    pub examples: u64,
    pub recall: f64,
    pub precision: f64,
    pub exact: f64,
}

impl Score {
    fn add(&mut self, recall: f64, precision: f64, exact: bool) {
        self.examples += 1;
        self.recall += recall;
        self.precision += precision;
        self.exact += exact as u64 as f64;
    }

    fn mean(&self) -> Score {
        let n = self.examples.max(1) as f64;
        Score {
            examples: self.examples,
            recall: self.recall / n,
            precision: self.precision / n,
            exact: self.exact / n,
        }
    }
}

/// The scores of one predictor: per depth overall and per (depth, target MoE-layer ordinal).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    pub predictor: String,
    pub k: usize,
    pub by_depth: BTreeMap<usize, Score>,
    /// Keyed by (depth, target MoE-layer ordinal); in JSON a list of
    /// `{depth, target_layer, examples, recall, precision, exact}`.
    #[serde(serialize_with = "pairs")]
    pub by_depth_layer: BTreeMap<(usize, usize), Score>,
}

fn pairs<S: serde::Serializer>(m: &BTreeMap<(usize, usize), Score>, s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Entry<'a> {
        depth: usize,
        target_layer: usize,
        #[serde(flatten)]
        score: &'a Score,
    }
    s.collect_seq(m.iter().map(|(&(depth, target_layer), score)| Entry {
        depth,
        target_layer,
        score,
    }))
}

/// Scores `predicted` (`[n, k]`, best first; `u16::MAX` = no prediction) against the examples'
/// targets.
pub fn score(name: &str, ex: &Examples, predicted: &[u16], k: usize) -> Report {
    let mut by_depth: BTreeMap<usize, Score> = BTreeMap::new();
    let mut by_layer: BTreeMap<(usize, usize), Score> = BTreeMap::new();
    for i in 0..ex.len() {
        let truth = ex.target_of(i);
        let pred = &predicted[i * k..(i + 1) * k];
        let hits = pred
            .iter()
            .filter(|p| **p != u16::MAX && truth.contains(p))
            .count();
        let recall = hits as f64 / truth.len() as f64;
        let precision = hits as f64 / k as f64;
        // Exact: the top-|truth| predictions are the truth as a set.
        let m = truth.len().min(k);
        let exact = m == truth.len() && pred[..m].iter().all(|p| truth.contains(p));
        let d = ex.depth[i] as usize;
        by_depth.entry(d).or_default().add(recall, precision, exact);
        by_layer
            .entry((d, ex.target_layer(i)))
            .or_default()
            .add(recall, precision, exact);
    }
    Report {
        predictor: name.to_string(),
        k,
        by_depth: by_depth.into_iter().map(|(d, s)| (d, s.mean())).collect(),
        by_depth_layer: by_layer.into_iter().map(|(d, s)| (d, s.mean())).collect(),
    }
}

/// The reports of several predictors as a text table (rows: predictor × depth).
pub fn table(reports: &[Report]) -> String {
    let mut s = String::new();
    let k = reports.first().map_or(0, |r| r.k);
    s += &format!(
        "{:<16} {:>5} {:>10} {:>10} {:>12} {:>8}\n",
        "predictor",
        "depth",
        format!("recall@{k}"),
        format!("prec@{k}"),
        "exact-set",
        "examples"
    );
    for r in reports {
        for (d, sc) in &r.by_depth {
            s += &format!(
                "{:<16} {:>5} {:>10.4} {:>10.4} {:>12.4} {:>8}\n",
                r.predictor, d, sc.recall, sc.precision, sc.exact, sc.examples
            );
        }
    }
    s
}

/// Per-layer recall as a text table: rows (depth, target layer), one column per predictor.
pub fn layer_table(reports: &[Report], moe_layers: &[usize]) -> String {
    let mut s = format!("{:>5} {:>12}", "depth", "target layer");
    for r in reports {
        s += &format!(" {:>14}", r.predictor);
    }
    s.push('\n');
    if let Some(first) = reports.first() {
        for &(d, l) in first.by_depth_layer.keys() {
            s += &format!("{d:>5} {:>12}", moe_layers.get(l).copied().unwrap_or(l));
            for r in reports {
                s += &format!(
                    " {:>14.4}",
                    r.by_depth_layer.get(&(d, l)).map_or(f64::NAN, |x| x.recall)
                );
            }
            s.push('\n');
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recall_precision_exact() {
        let ex = Examples {
            hidden_size: 1,
            k: 2,
            request: vec![0, 0],
            token: vec![0, 1],
            src: vec![0, 0],
            depth: vec![1, 1],
            hidden: vec![0.0, 0.0],
            target: vec![3, 4, 5, 6],
            prev_target: vec![u16::MAX; 4],
        };
        // k = 3: first example finds both (recall 1, precision 2/3, exact), second one of two.
        let r = score("x", &ex, &[4, 3, 9, 5, 1, 2], 3);
        let s = &r.by_depth[&1];
        assert!((s.recall - 0.75).abs() < 1e-12);
        assert!((s.precision - 0.5).abs() < 1e-12);
        assert!((s.exact - 0.5).abs() < 1e-12);
        assert_eq!(r.by_depth_layer[&(1, 1)].examples, 2);
    }
}
