//! The baseline predictors of DESIGN.md, computed on the same examples as the shadow model:
//! `popularity` (the training split's most used experts of the target layer), `previous-token`
//! (the last token's experts at the target layer), `gate-lookahead` (the target layer's router
//! applied to the hidden state at the source layer) and `oracle` (the truth).

use ndarray::Array2;
use shadowmoe_engine::Checkpoint;
use shadowmoe_engine::moe::{Router, load_router};

use crate::data::Examples;

/// Experts ranked by count, most used first (ties: lower id).
pub fn rank_by_count(counts: &[u64]) -> Vec<u16> {
    let mut ids: Vec<u16> = (0..counts.len() as u16).collect();
    ids.sort_by_key(|&e| (std::cmp::Reverse(counts[e as usize]), e));
    ids
}

/// Per target layer: the top-k of `ranked[layer]`.
pub fn popularity(ranked: &[Vec<u16>], ex: &Examples, k: usize) -> Vec<u16> {
    (0..ex.len())
        .flat_map(|i| ranked[ex.target_layer(i)][..k].iter().copied())
        .collect()
}

/// The previous token's experts at the target layer, then popular ones to fill k.
pub fn previous_token(ranked: &[Vec<u16>], ex: &Examples, k: usize) -> Vec<u16> {
    let mut out = Vec::with_capacity(ex.len() * k);
    for i in 0..ex.len() {
        let prev: Vec<u16> = ex.prev_target[i * ex.k..(i + 1) * ex.k]
            .iter()
            .copied()
            .filter(|&e| e != u16::MAX)
            .collect();
        out.extend(fill(&prev, &ranked[ex.target_layer(i)], k));
    }
    out
}

/// `first`, then `rest` without repeats, cut to `k`.
fn fill(first: &[u16], rest: &[u16], k: usize) -> Vec<u16> {
    let mut v: Vec<u16> = first.iter().copied().take(k).collect();
    for &e in rest {
        if v.len() >= k {
            break;
        }
        if !v.contains(&e) {
            v.push(e);
        }
    }
    v
}

/// The truth, padded with popular experts when k exceeds the model's top-k.
pub fn oracle(ranked: &[Vec<u16>], ex: &Examples, k: usize) -> Vec<u16> {
    (0..ex.len())
        .flat_map(|i| fill(ex.target_of(i), &ranked[ex.target_layer(i)], k))
        .collect()
}

/// The routers of every MoE layer (`[E, H]` each, with their family's selection rule), read
/// from the checkpoint through the engine.
pub fn routers(ckpt: &Checkpoint) -> shadowmoe_engine::Result<Vec<Router>> {
    let c = &ckpt.config;
    c.moe_layers()
        .into_iter()
        .map(|l| load_router(c, &ckpt.weights, l))
        .collect()
}

/// The target layer's router applied to the hidden state at the source layer; experts ranked
/// as the engine's router ranks them ([`Router::rank`]: by probability, or by deepseek_v3's
/// biased, group-limited selection; ties: lower id). At depth 0 this is the model's own
/// routing.
pub fn gate_lookahead(routers: &[Router], ex: &Examples, k: usize) -> Vec<u16> {
    let mut out = vec![u16::MAX; ex.len() * k];
    let h = ex.hidden_size;
    for (tl, router) in routers.iter().enumerate() {
        let rows: Vec<usize> = (0..ex.len()).filter(|&i| ex.target_layer(i) == tl).collect();
        if rows.is_empty() {
            continue;
        }
        let x = Array2::from_shape_fn((rows.len(), h), |(r, j)| ex.hidden_of(rows[r])[j]);
        let logits = router.logits(x.view()); // (n, E), the router's bias included
        for (r, &i) in rows.iter().enumerate() {
            let row = logits.row(r).to_vec();
            let ids = router.rank(&row, k);
            for (o, e) in out[i * k..(i + 1) * k].iter_mut().zip(ids) {
                *o = e as u16;
            }
        }
    }
    out
}
