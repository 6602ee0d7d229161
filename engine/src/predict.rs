//! Expert predictors at run time: after MoE layer L routes a token, a predictor names the
//! experts that layer L + D will want, and the expert provider starts loading them.
//!
//! The engine owns the trait and the baselines that need nothing but the model:
//! [`GateLookahead`] (layer L + D's router applied to the hidden state at L), [`PreviousToken`]
//! (what layer L + D chose for the previous token) and [`Popularity`] (a profile's top experts).
//! The shadow model implements the same trait in the predictor crate.

use std::collections::HashMap;

use crate::error::Result;
use crate::moe::Router;

/// What a predictor sees after a MoE layer routed the last token of a pass.
#[derive(Debug, Clone, Copy)]
pub struct LayerView<'a> {
    /// Model layer index.
    pub layer: usize,
    /// The router input of that token at this layer (`H` values).
    pub hidden: &'a [f32],
    /// Its routed experts, best first.
    pub experts: &'a [u32],
}

/// Predicts which experts a later MoE layer will route to.
pub trait ExpertPredictor: Send {
    fn name(&self) -> String;

    /// Called for every MoE layer of every pass, in order, before any `predict` for it.
    fn observe(&mut self, _view: &LayerView<'_>) {}

    /// Up to `k` experts (best first) that model layer `target` will choose for the token seen
    /// in `view`; a `target` at or before `view.layer` means that layer of the next token
    /// (the first layers of a token predicted from the last layers of the one before). A
    /// predictor that cannot look across tokens returns nothing for those.
    fn predict(&mut self, view: &LayerView<'_>, target: usize, k: usize) -> Result<Vec<u32>>;

    /// Predictions for several targets at once (one batched call where the predictor can).
    fn predict_many(&mut self, view: &LayerView<'_>, targets: &[usize], k: usize) -> Result<Vec<Vec<u32>>> {
        targets.iter().map(|&t| self.predict(view, t, k)).collect()
    }
}

/// Which later MoE layers a prediction made at layer L is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PrefetchSpan {
    /// Only layer L + D (the layers before D get no prefetch).
    Target,
    /// Each of L + 1 … L + D within the token.
    All,
    /// Each of L + 1 … L + D, continuing into the first layers of the next token.
    Wrap,
}

impl PrefetchSpan {
    pub const NAMES: [&'static str; 3] = ["target", "all", "wrap"];

    pub fn name(self) -> &'static str {
        match self {
            PrefetchSpan::Target => "target",
            PrefetchSpan::All => "all",
            PrefetchSpan::Wrap => "wrap",
        }
    }
}

impl std::str::FromStr for PrefetchSpan {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "target" => Ok(PrefetchSpan::Target),
            "all" => Ok(PrefetchSpan::All),
            "wrap" => Ok(PrefetchSpan::Wrap),
            _ => Err(format!(
                "unknown prefetch span `{s}` (expected one of {})",
                Self::NAMES.join(", ")
            )),
        }
    }
}

/// The targets of a prediction made at MoE-layer ordinal `li` of `n`: (target ordinal, passes
/// ahead: 0 for this token, 1 for the next), nearest first. The simulator and the engine both
/// ask this function.
pub fn prefetch_targets(li: usize, n: usize, depth: usize, span: PrefetchSpan) -> Vec<(usize, usize)> {
    let d = depth.min(n.saturating_sub(1));
    match span {
        PrefetchSpan::Target => {
            if depth > 0 && li + depth < n {
                vec![(li + depth, 0)]
            } else {
                Vec::new()
            }
        }
        PrefetchSpan::All => (1..=d)
            .map(|x| li + x)
            .filter(|&t| t < n)
            .map(|t| (t, 0))
            .collect(),
        PrefetchSpan::Wrap => (1..=d).map(|x| li + x).map(|t| (t % n, t / n)).collect(),
    }
}

/// Where the predictor runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PredictorTiming {
    /// On the forward thread, after each MoE layer (deterministic: the simulator's order).
    Inline,
    /// On its own thread, fed the router input as soon as a layer routes; its answers become
    /// prefetches when they arrive, and those that arrive after their target layer routed are
    /// counted late and dropped. The forward thread never waits for it.
    Async,
}

impl std::str::FromStr for PredictorTiming {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "inline" => Ok(PredictorTiming::Inline),
            "async" => Ok(PredictorTiming::Async),
            _ => Err(format!(
                "unknown predictor timing `{s}` (expected async or inline)"
            )),
        }
    }
}

/// Prefetching: after MoE layer L routes, the predictor's top `k` for the layers `span` names
/// (up to `depth` layers later) are prefetched (decode passes only).
pub struct Prefetch {
    pub predictor: Box<dyn ExpertPredictor>,
    pub depth: usize,
    pub k: usize,
    pub span: PrefetchSpan,
    pub timing: PredictorTiming,
}

impl Prefetch {
    /// Layer L + `depth` only, on the predictor's own thread.
    pub fn new(predictor: Box<dyn ExpertPredictor>, depth: usize, k: usize) -> Self {
        Self {
            predictor,
            depth,
            k,
            span: PrefetchSpan::Target,
            timing: PredictorTiming::Async,
        }
    }
}

impl std::fmt::Debug for Prefetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Prefetch({}, depth {}, k {}, span {}, {:?})",
            self.predictor.name(),
            self.depth,
            self.k,
            self.span.name(),
            self.timing
        )
    }
}

/// What prediction cost and did (DESIGN.md's names where it has them).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct PredictStats {
    /// Predictor calls (one per routed decode layer it reached, all its targets at once).
    pub calls: u64,
    /// Routed layers the predictor never reached: a newer one arrived first (async only).
    pub skipped: u64,
    /// (call, target) predictions made.
    pub predictions: u64,
    /// Predictions that arrived after their target layer had routed: dropped.
    pub late: u64,
    /// Prefetch loads the predictions started.
    pub issued: u64,
    /// Prefetches dropped before a reader took them because a newer prediction for the same
    /// target no longer named them.
    pub cancelled: u64,
    /// Time inside the predictor (its own thread when async).
    pub predictor_secs: f64,
    /// Time the forward thread spent on prediction: handing the router input over (async) or
    /// running the predictor (inline).
    pub forward_secs: f64,
    /// Of the above, in decode passes.
    pub forward_decode_secs: f64,
}

/// Layer L + D's router applied to the hidden state at L, ranking experts by that router's own
/// rule ([`Router::rank`]: softmax probability, or deepseek_v3's biased, group-limited
/// selection), so that at depth 0 it reproduces the routing.
#[derive(Debug, Clone)]
pub struct GateLookahead {
    routers: HashMap<usize, Router>,
}

impl GateLookahead {
    /// From the routers of the model's MoE layers (by model layer index).
    pub fn new(routers: HashMap<usize, Router>) -> Self {
        Self { routers }
    }
}

impl ExpertPredictor for GateLookahead {
    fn name(&self) -> String {
        "gate-lookahead".into()
    }

    fn predict(&mut self, view: &LayerView<'_>, target: usize, k: usize) -> Result<Vec<u32>> {
        Ok(self
            .routers
            .get(&target)
            .map(|r| r.rank_hidden(view.hidden, k))
            .unwrap_or_default())
    }
}

/// What the target layer chose for the previous token.
#[derive(Debug, Clone, Default)]
pub struct PreviousToken {
    last: HashMap<usize, Vec<u32>>,
}

impl ExpertPredictor for PreviousToken {
    fn name(&self) -> String {
        "previous-token".into()
    }

    fn observe(&mut self, view: &LayerView<'_>) {
        self.last.insert(view.layer, view.experts.to_vec());
    }

    fn predict(&mut self, _view: &LayerView<'_>, target: usize, k: usize) -> Result<Vec<u32>> {
        // Layer `target` has not run yet for this token: its entry is the previous token's.
        Ok(self
            .last
            .get(&target)
            .map(|e| e.iter().copied().take(k).collect())
            .unwrap_or_default())
    }
}

/// A fixed ranking per layer (a profile's most activated experts).
#[derive(Debug, Clone, Default)]
pub struct Popularity {
    pub ranked: HashMap<usize, Vec<u32>>,
}

impl ExpertPredictor for Popularity {
    fn name(&self) -> String {
        "popularity".into()
    }

    fn predict(&mut self, _view: &LayerView<'_>, target: usize, k: usize) -> Result<Vec<u32>> {
        Ok(self
            .ranked
            .get(&target)
            .map(|e| e.iter().copied().take(k).collect())
            .unwrap_or_default())
    }
}
