//! Training and evaluation examples from traces: for every (request, token, source MoE layer
//! L) with a stored hidden state and every depth D, the input is the router input at L and the
//! target is the set of experts routed D MoE layers later. Splits are by request, never by
//! token.
//!
//! Dimensions: `n` examples, `H` hidden, `K` the model's top-k.

use std::ops::Range;

use shadowmoe_trace::{Result, Trace, TraceError};

/// Which split a request belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Val,
    Test,
}

/// Assigns requests to splits by a seeded hash: `val` and `test` are shares in [0, 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Splitter {
    pub seed: u64,
    pub val: f64,
    pub test: f64,
}

impl Splitter {
    pub fn split(&self, request: u32) -> Split {
        // SplitMix64 of (seed, request): stable across versions and platforms.
        let mut z = self.seed ^ (request as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let u = (z >> 11) as f64 / (1u64 << 53) as f64;
        if u < self.test {
            Split::Test
        } else if u < self.test + self.val {
            Split::Val
        } else {
            Split::Train
        }
    }
}

/// A batch of examples.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Examples {
    pub hidden_size: usize,
    /// The model's top-k (targets per example).
    pub k: usize,
    pub request: Vec<u32>,
    pub token: Vec<u32>,
    /// Source MoE layer, as an ordinal into the trace's `moe_layers`.
    pub src: Vec<u16>,
    /// Depth in MoE layers (target = src + depth).
    pub depth: Vec<u8>,
    /// `[n, H]`: the router input at the source layer.
    pub hidden: Vec<f32>,
    /// `[n, K]`: experts routed at the target layer, best first.
    pub target: Vec<u16>,
    /// `[n, K]`: experts routed at the target layer for the previous token of the request
    /// (`u16::MAX` for a request's first token).
    pub prev_target: Vec<u16>,
}

impl Examples {
    pub fn len(&self) -> usize {
        self.src.len()
    }

    pub fn is_empty(&self) -> bool {
        self.src.is_empty()
    }

    pub fn hidden_of(&self, i: usize) -> &[f32] {
        &self.hidden[i * self.hidden_size..(i + 1) * self.hidden_size]
    }

    pub fn target_of(&self, i: usize) -> &[u16] {
        &self.target[i * self.k..(i + 1) * self.k]
    }

    /// Target MoE-layer ordinal of example `i`.
    pub fn target_layer(&self, i: usize) -> usize {
        self.src[i] as usize + self.depth[i] as usize
    }

    /// Examples `idx` (in that order).
    pub fn select(&self, idx: &[usize]) -> Examples {
        let (h, k) = (self.hidden_size, self.k);
        Examples {
            hidden_size: h,
            k,
            request: idx.iter().map(|&i| self.request[i]).collect(),
            token: idx.iter().map(|&i| self.token[i]).collect(),
            src: idx.iter().map(|&i| self.src[i]).collect(),
            depth: idx.iter().map(|&i| self.depth[i]).collect(),
            hidden: idx
                .iter()
                .flat_map(|&i| self.hidden_of(i).iter().copied())
                .collect(),
            target: idx
                .iter()
                .flat_map(|&i| self.target_of(i).iter().copied())
                .collect(),
            prev_target: idx
                .iter()
                .flat_map(|&i| self.prev_target[i * k..(i + 1) * k].iter().copied())
                .collect(),
        }
    }

    /// Appends `other`'s examples.
    pub fn append(&mut self, other: Examples) {
        self.request.extend(other.request);
        self.token.extend(other.token);
        self.src.extend(other.src);
        self.depth.extend(other.depth);
        self.hidden.extend(other.hidden);
        self.target.extend(other.target);
        self.prev_target.extend(other.prev_target);
    }
}

/// Builds the examples of requests `range` of `trace` for `depths`, keeping those whose
/// request falls in a split `keep` accepts.
pub fn examples(
    trace: &Trace,
    range: Range<u32>,
    depths: &[usize],
    keep: &dyn Fn(u32) -> bool,
) -> Result<Examples> {
    let m = &trace.manifest;
    let layers = m.moe_layers.len();
    let reqs = trace.requests(Some(range.clone()))?;
    let mut out = Examples {
        hidden_size: m.hidden_size,
        k: m.top_k,
        ..Default::default()
    };
    for (src, &model_layer) in m.moe_layers.iter().enumerate() {
        if !m.hidden_layers.contains(&model_layer) || depths.iter().all(|&d| src + d >= layers) {
            continue;
        }
        let hidden = trace.hidden(model_layer, Some(range.clone()))?;
        let mut row = 0;
        for r in &reqs {
            for t in 0..r.tokens() {
                // Hidden rows are sorted by (request, token) like the requests.
                if hidden.request.get(row) != Some(&r.request) || hidden.token.get(row) != Some(&(t as u32)) {
                    return Err(TraceError::format(
                        &trace.path,
                        format!(
                            "hidden states of layer {model_layer} do not line up with routing at request {} token {t}",
                            r.request
                        ),
                    ));
                }
                let h = &hidden.values[row * m.hidden_size..(row + 1) * m.hidden_size];
                row += 1;
                if !keep(r.request) {
                    continue;
                }
                for &d in depths {
                    let tl = src + d;
                    if tl >= layers {
                        continue;
                    }
                    let mut one = Examples {
                        hidden_size: m.hidden_size,
                        k: m.top_k,
                        ..Default::default()
                    };
                    one.request.push(r.request);
                    one.token.push(t as u32);
                    one.src.push(src as u16);
                    one.depth.push(d as u8);
                    one.hidden.extend_from_slice(h);
                    one.target.extend_from_slice(r.experts_at(t, tl));
                    if t > 0 {
                        one.prev_target.extend_from_slice(r.experts_at(t - 1, tl));
                    } else {
                        one.prev_target.extend(std::iter::repeat_n(u16::MAX, m.top_k));
                    }
                    out.append(one);
                }
            }
        }
    }
    Ok(out)
}

/// All examples of `trace` for `depths` in the splits `keep` accepts, read `batch` requests at a
/// time.
pub fn all_examples(
    trace: &Trace,
    depths: &[usize],
    batch: u32,
    keep: &dyn Fn(u32) -> bool,
) -> Result<Examples> {
    let m = &trace.manifest;
    let mut out = Examples {
        hidden_size: m.hidden_size,
        k: m.top_k,
        ..Default::default()
    };
    let n = m.dataset_requests as u32;
    let mut start = 0;
    while start < n {
        let end = (start + batch.max(1)).min(n);
        out.append(examples(trace, start..end, depths, keep)?);
        start = end;
    }
    Ok(out)
}
