//! Expert predictors at run time: after MoE layer L routes a token, a predictor names the
//! experts that layer L + D will want, and the expert provider starts loading them.
//!
//! The engine owns the trait and the baselines that need nothing but the model:
//! [`GateLookahead`] (layer L + D's router applied to the hidden state at L), [`PreviousToken`]
//! (what layer L + D chose for the previous token) and [`Popularity`] (a profile's top experts).
//! The shadow model implements the same trait in the predictor crate.

use std::collections::HashMap;
use std::sync::Mutex;

use ndarray::ArrayView2;

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
    /// in `view`.
    fn predict(&mut self, view: &LayerView<'_>, target: usize, k: usize) -> Result<Vec<u32>>;
}

/// Prefetching: after each MoE layer L, the predictor's top `k` for the MoE layer `depth`
/// layers later are prefetched (decode passes only).
pub struct Prefetch {
    pub predictor: Box<dyn ExpertPredictor>,
    pub depth: usize,
    pub k: usize,
}

impl std::fmt::Debug for Prefetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Prefetch({}, depth {}, k {})",
            self.predictor.name(),
            self.depth,
            self.k
        )
    }
}

/// The prefetch configuration a model holds (behind a lock: the forward pass takes `&self`).
pub type PrefetchSlot = Mutex<Option<Prefetch>>;

/// Experts ranked by router probability, best first (ties: lower id), as the router ranks.
fn rank(router: &Router, hidden: &[f32], k: usize) -> Vec<u32> {
    let x = ArrayView2::from_shape((1, hidden.len()), hidden).expect("one row");
    let logits = crate::kernels::linear(x, &router.weight, None);
    let mut p = logits.row(0).to_vec();
    crate::kernels::softmax(&mut p);
    let mut ids: Vec<u32> = (0..p.len() as u32).collect();
    ids.sort_by(|&a, &b| p[b as usize].total_cmp(&p[a as usize]).then(a.cmp(&b)));
    ids.truncate(k);
    ids
}

/// Layer L + D's router applied to the hidden state at L.
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
            .map(|r| rank(r, view.hidden, k))
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
