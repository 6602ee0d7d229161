//! Routing statistics of a trace, accumulated request by request (bounded memory): per-layer
//! expert frequency and prompt coverage, entropy, the share of activations the top 10% / 20%
//! of experts serve, expert-set overlap between tokens 1..64 apart and its two baselines (token
//! pairs of the same request, token pairs of different requests), reuse distances, and
//! co-activation across adjacent MoE layers. Also the expert profile that `--pin` reads.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use shadowmoe_engine::offload::profile::{LayerProfile, PROFILE_FORMAT, Profile};

use crate::reader::RequestRouting;
use crate::schema::Manifest;

/// Reuse-distance buckets (tokens since the same expert was last routed at the same layer in
/// the same request); the last counts first uses.
pub const REUSE_BUCKETS: [&str; 9] = ["1", "2", "3-4", "5-8", "9-16", "17-32", "33-64", "65+", "first"];

/// Token distances at which the overlap of expert sets is measured (1 = previous token).
pub const OVERLAP_DISTANCES: [usize; 7] = [1, 2, 4, 8, 16, 32, 64];

fn reuse_bucket(d: usize) -> usize {
    match d {
        1 => 0,
        2 => 1,
        3..=4 => 2,
        5..=8 => 3,
        9..=16 => 4,
        17..=32 => 5,
        33..=64 => 6,
        _ => 7,
    }
}

/// Accumulates statistics over requests.
#[derive(Debug, Clone)]
pub struct TraceStats {
    pub moe_layers: Vec<usize>,
    pub num_experts: usize,
    pub k: usize,
    pub requests: u64,
    pub tokens: u64,
    /// `[L][E]` activations.
    pub counts: Vec<Vec<u64>>,
    /// `[L][E]` requests that routed to the expert at least once.
    pub coverage: Vec<Vec<u64>>,
    /// `[L][distance]`: Σ |E_t ∩ E_{t-d}| and the number of such pairs, d in [`OVERLAP_DISTANCES`].
    overlap_common: Vec<[u64; 7]>,
    overlap_pairs: Vec<[u64; 7]>,
    /// `[L]`: Σ over requests of Σ_e c(c−1)/2 (c: tokens of the request routed to e), i.e. the
    /// common experts summed over all token pairs of one request; and the number of those pairs.
    request_pair_common: Vec<u64>,
    request_pairs: Vec<u64>,
    /// `[L][bucket]`.
    pub reuse: Vec<[u64; 9]>,
    /// Per adjacent MoE-layer pair `(l, l+1)`: (expert at l, expert at l+1) → count.
    pub coactivation: Vec<HashMap<(u16, u16), u64>>,
}

/// One row of the per-layer table.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LayerStats {
    pub layer: usize,
    pub activations: u64,
    /// Shannon entropy of expert popularity, bits.
    pub entropy_bits: f64,
    /// Entropy over its maximum, log2(E).
    pub entropy_norm: f64,
    pub top10_share: f64,
    pub top20_share: f64,
    /// Mean |E_t ∩ E_{t-1}| / k over consecutive tokens of a request.
    pub prev_token_overlap: f64,
    /// Mean |E_t ∩ E_{t-d}| / k for each d in [`OVERLAP_DISTANCES`] (the first is
    /// `prev_token_overlap`); NaN where no request is longer than d.
    pub overlap_by_distance: Vec<f64>,
    /// Mean overlap / k of two different tokens of the same request, any distance apart: what the
    /// request's own expert popularity gives without any order.
    pub request_pair_overlap: f64,
    /// Mean overlap / k of two tokens of different requests: what the layer's expert popularity
    /// gives. NaN with one request.
    pub cross_request_overlap: f64,
    /// `prev_token_overlap / request_pair_overlap`: how much more a token shares with the one
    /// before it than with a random token of its request (1: no temporal locality).
    pub locality_lift: f64,
    /// Share of activations whose expert was used in the previous 1 / 8 tokens.
    pub reuse_within_1: f64,
    pub reuse_within_8: f64,
    /// Activation-weighted mean over experts e at this layer of max_e' P(e' at next layer | e);
    /// `None` for the last MoE layer.
    pub next_layer_top1: Option<f64>,
}

impl TraceStats {
    pub fn new(m: &Manifest) -> Self {
        let l = m.moe_layers.len();
        let e = m.num_experts;
        Self {
            moe_layers: m.moe_layers.clone(),
            num_experts: e,
            k: m.top_k,
            requests: 0,
            tokens: 0,
            counts: vec![vec![0; e]; l],
            coverage: vec![vec![0; e]; l],
            overlap_common: vec![[0; 7]; l],
            overlap_pairs: vec![[0; 7]; l],
            request_pair_common: vec![0; l],
            request_pairs: vec![0; l],
            reuse: vec![[0; 9]; l],
            coactivation: vec![HashMap::new(); l.saturating_sub(1)],
        }
    }

    /// Adds one request.
    pub fn add(&mut self, r: &RequestRouting) {
        self.requests += 1;
        self.tokens += r.tokens() as u64;
        let (layers, e) = (r.layers, self.num_experts);
        let mut last_use = vec![vec![usize::MAX; e]; layers];
        let mut in_request = vec![vec![0u64; e]; layers];
        for t in 0..r.tokens() {
            for l in 0..layers {
                let ex = r.experts_at(t, l);
                for &x in ex {
                    let x = x as usize;
                    self.counts[l][x] += 1;
                    in_request[l][x] += 1;
                    let b = match last_use[l][x] {
                        usize::MAX => 8,
                        prev => reuse_bucket(t - prev),
                    };
                    self.reuse[l][b] += 1;
                    last_use[l][x] = t;
                }
                for (i, &d) in OVERLAP_DISTANCES.iter().enumerate() {
                    if t < d {
                        break;
                    }
                    let before = r.experts_at(t - d, l);
                    self.overlap_common[l][i] += ex.iter().filter(|x| before.contains(x)).count() as u64;
                    self.overlap_pairs[l][i] += 1;
                }
                if l + 1 < layers {
                    let next = r.experts_at(t, l + 1);
                    for &a in ex {
                        for &b in next {
                            *self.coactivation[l].entry((a, b)).or_insert(0) += 1;
                        }
                    }
                }
            }
        }
        let n = r.tokens() as u64;
        for (l, c) in in_request.iter().enumerate() {
            self.request_pair_common[l] += c.iter().map(|&c| c * c.saturating_sub(1) / 2).sum::<u64>();
            self.request_pairs[l] += n * n.saturating_sub(1) / 2;
        }
        for (cov, counts) in self.coverage.iter_mut().zip(&in_request) {
            for (c, &n) in cov.iter_mut().zip(counts) {
                *c += (n > 0) as u64;
            }
        }
    }

    /// The per-layer table.
    pub fn layers(&self) -> Vec<LayerStats> {
        (0..self.moe_layers.len()).map(|l| self.layer_stats(l)).collect()
    }

    fn layer_stats(&self, l: usize) -> LayerStats {
        let counts = &self.counts[l];
        let total: u64 = counts.iter().sum();
        let tf = total.max(1) as f64;
        let entropy_bits: f64 = counts
            .iter()
            .filter(|&&c| c > 0)
            .map(|&c| {
                let p = c as f64 / tf;
                -p * p.log2()
            })
            .sum();
        let mut sorted = counts.clone();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        let top_share = |frac: f64| {
            let n = ((self.num_experts as f64 * frac).ceil() as usize).max(1);
            sorted[..n].iter().sum::<u64>() as f64 / tf
        };
        let reuse = &self.reuse[l];
        let next_layer_top1 = self.coactivation.get(l).map(|pairs| {
            let mut best: HashMap<u16, (u64, u64)> = HashMap::new(); // a -> (max count, total)
            for (&(a, _), &c) in pairs {
                let e = best.entry(a).or_insert((0, 0));
                e.0 = e.0.max(c);
                e.1 += c;
            }
            let all: u64 = best.values().map(|v| v.1).sum();
            best.values().map(|&(m, _)| m as f64).sum::<f64>() / all.max(1) as f64
        });
        let k = self.k.max(1) as f64;
        let mean = |common: u64, pairs: u64| {
            if pairs == 0 {
                f64::NAN
            } else {
                common as f64 / pairs as f64 / k
            }
        };
        let overlap_by_distance: Vec<f64> = (0..OVERLAP_DISTANCES.len())
            .map(|i| mean(self.overlap_common[l][i], self.overlap_pairs[l][i]))
            .collect();
        let request_pair_overlap = mean(self.request_pair_common[l], self.request_pairs[l]);
        // All pairs of tokens at this layer, less the pairs inside one request.
        let tokens = total / self.k.max(1) as u64;
        let all_common: u64 = counts.iter().map(|&c| c * c.saturating_sub(1) / 2).sum();
        let cross_request_overlap = mean(
            all_common - self.request_pair_common[l],
            tokens * tokens.saturating_sub(1) / 2 - self.request_pairs[l],
        );
        LayerStats {
            layer: self.moe_layers[l],
            activations: total,
            entropy_bits,
            entropy_norm: entropy_bits / (self.num_experts as f64).log2().max(f64::MIN_POSITIVE),
            top10_share: top_share(0.10),
            top20_share: top_share(0.20),
            prev_token_overlap: overlap_by_distance[0],
            locality_lift: overlap_by_distance[0] / request_pair_overlap,
            overlap_by_distance,
            request_pair_overlap,
            cross_request_overlap,
            reuse_within_1: reuse[0] as f64 / tf,
            reuse_within_8: reuse[..4].iter().sum::<u64>() as f64 / tf,
            next_layer_top1,
        }
    }

    /// The expert profile: activation counts and prompt coverage per layer, and per layer the
    /// smallest set of most-used experts that covers `threshold` of its activations.
    pub fn profile(&self, m: &Manifest, threshold: f64) -> Profile {
        let mut layers = BTreeMap::new();
        let mut pinned = BTreeMap::new();
        for (l, &layer) in self.moe_layers.iter().enumerate() {
            let counts = &self.counts[l];
            let req = self.requests.max(1) as f64;
            layers.insert(
                layer.to_string(),
                LayerProfile {
                    activations: counts.clone(),
                    prompt_coverage: self.coverage[l].iter().map(|&c| c as f64 / req).collect(),
                },
            );
            let mut ids: Vec<u32> = (0..self.num_experts as u32).collect();
            ids.sort_by_key(|&e| (std::cmp::Reverse(counts[e as usize]), e));
            let total: u64 = counts.iter().sum();
            let mut acc = 0;
            let set: Vec<u32> = ids
                .into_iter()
                .take_while(|&e| {
                    let take = (acc as f64) < threshold * total as f64;
                    acc += counts[e as usize];
                    take
                })
                .collect();
            pinned.insert(layer.to_string(), set);
        }
        Profile {
            format: PROFILE_FORMAT.into(),
            model_id: m.model_id.clone(),
            config_sha256: m.config_sha256.clone(),
            dataset: m.dataset.clone(),
            dataset_sha256: m.dataset_sha256.clone(),
            layers,
            pinned,
            pin_threshold: Some(threshold),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(layers: usize, experts: usize, k: usize) -> Manifest {
        Manifest {
            format: crate::schema::TRACE_FORMAT.into(),
            model_id: "m".into(),
            config_sha256: "c".into(),
            architecture: "qwen3_moe".into(),
            num_layers: layers,
            moe_layers: (0..layers).collect(),
            num_experts: experts,
            top_k: k,
            hidden_size: 4,
            dataset: "d".into(),
            dataset_sha256: "s".into(),
            dataset_requests: 1,
            requests: 1,
            chat_template: true,
            max_new_tokens: 0,
            temperature: 0.0,
            sampling_top_k: 0,
            top_p: 1.0,
            seed: 0,
            hidden_layers: vec![],
            hidden_encoding: "f32le".into(),
            shard: "0/1".into(),
            harness_version: "0".into(),
            harness_commit: "x".into(),
            created: "now".into(),
        }
    }

    /// 2 layers, 4 experts, top-2, three tokens.
    fn request() -> RequestRouting {
        RequestRouting {
            request: 0,
            k: 2,
            layers: 2,
            token_ids: vec![1, 2, 3],
            phases: vec![0, 0, 1],
            // t0: L0 {0,1} L1 {2,3}; t1: L0 {0,2} L1 {2,3}; t2: L0 {0,1} L1 {3,0}
            experts: vec![0, 1, 2, 3, 0, 2, 2, 3, 0, 1, 3, 0],
            weights: vec![0.5; 12],
        }
    }

    #[test]
    fn counts_overlap_reuse_and_coactivation() {
        let m = manifest(2, 4, 2);
        let mut s = TraceStats::new(&m);
        s.add(&request());
        assert_eq!(s.counts[0], vec![3, 2, 1, 0]);
        assert_eq!(s.counts[1], vec![1, 0, 2, 3]);
        let t = s.layers();
        // L0 overlaps: t1 vs t0 {0} = 1/2; t2 vs t1 {0} = 1/2.
        assert!((t[0].prev_token_overlap - 0.5).abs() < 1e-12);
        // L1: t1 vs t0 {2,3} = 1; t2 vs t1 {3} = 1/2.
        assert!((t[1].prev_token_overlap - 0.75).abs() < 1e-12);
        // L0 reuse: expert 0 at t1 (d=1) and t2 (d=1); expert 1 at t2 (d=2); 3 first uses.
        assert_eq!(s.reuse[0][0], 2);
        assert_eq!(s.reuse[0][1], 1);
        assert_eq!(s.reuse[0][8], 3);
        assert_eq!(s.coactivation[0][&(0, 3)], 3);
        assert_eq!(t[0].top10_share, 0.5); // ceil(0.4) = 1 expert: 3 of 6
        assert!(t[0].entropy_bits > 0.0 && t[0].entropy_norm < 1.0);
        assert_eq!(s.coverage[0], vec![1, 1, 1, 0]);
        // L0 at distance 2: t2 {0,1} vs t0 {0,1} = 1; nothing 4 or more apart.
        assert_eq!(t[0].overlap_by_distance[0], t[0].prev_token_overlap);
        assert!((t[0].overlap_by_distance[1] - 1.0).abs() < 1e-12);
        assert!(t[0].overlap_by_distance[2].is_nan());
        // L0 pairs of the request: (t0,t1) 1, (t1,t2) 1, (t0,t2) 2 common of 3 pairs × k = 2.
        assert!((t[0].request_pair_overlap - 4.0 / 6.0).abs() < 1e-12);
        assert!((t[0].locality_lift - 0.5 / (4.0 / 6.0)).abs() < 1e-12);
        assert!(
            t[0].cross_request_overlap.is_nan(),
            "one request: no cross-request pairs"
        );
    }

    #[test]
    fn cross_request_overlap_counts_only_pairs_across_requests() {
        let m = manifest(2, 4, 2);
        let mut s = TraceStats::new(&m);
        s.add(&request());
        let mut other = request();
        other.request = 1;
        // The second request routes L0 to {2,3} at every token: no expert in common with the
        // first request's L0 sets except expert 2 at its t1.
        other.experts = vec![2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3];
        s.add(&other);
        let t = s.layers();
        // 9 cross pairs at L0; common: t1 of request 0 ({0,2}) with each of 3 tokens = 3.
        assert!((t[0].cross_request_overlap - 3.0 / 9.0 / 2.0).abs() < 1e-12);
        // Within requests: request 0 has 4 common over 3 pairs, request 1 has 2 × 3 = 6.
        assert!((t[0].request_pair_overlap - 10.0 / 6.0 / 2.0).abs() < 1e-12);
        // Consecutive pairs: request 0: 1 + 1, request 1: 2 + 2, over 4 pairs.
        assert!((t[0].prev_token_overlap - 6.0 / 4.0 / 2.0).abs() < 1e-12);
    }

    #[test]
    fn profile_pins_the_smallest_covering_set() {
        let m = manifest(2, 4, 2);
        let mut s = TraceStats::new(&m);
        s.add(&request());
        let p = s.profile(&m, 0.5);
        assert_eq!(p.pinned["0"], vec![0]); // 3 of 6
        assert_eq!(p.pinned["1"], vec![3]); // 3 of 6
        assert_eq!(p.layers["1"].activations, vec![1, 0, 2, 3]);
        let keys = p.top_k(std::path::Path::new("p"), &[0, 1], 4, 2).unwrap();
        assert_eq!(keys.len(), 4);
    }
}
