//! The MoE seam: a [`Router`] decides, an [`ExpertProvider`] serves weights, a [`MoeBlock`]
//! composes them. Model code never knows where expert bytes live: the in-memory provider here
//! and the disk tier with its cache serve the same trait.
//!
//! Dimensions: `T` = tokens, `H` = hidden, `E` = experts, `K` = top-k, `I` = expert width.

use std::sync::Arc;

use ndarray::{Array2, ArrayView2, Axis};

use crate::config::{Arch, ClampedSwiglu, ModelConfig, RoutingRule};
use crate::error::{EngineError, Result};
use crate::kernels::{linear, sigmoid, silu_mul, softmax};
use crate::observer::Phase;
use crate::weights::{TensorEntry, Weight, WeightIndex, matrix_from_pieces};

/// The router's top-k decision for every token of a pass.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingDecision {
    /// Experts per token.
    pub k: usize,
    /// `[T, K]` expert ids, best first.
    pub experts: Vec<u32>,
    /// `[T, K]` their weights, as applied to the expert outputs.
    pub weights: Vec<f32>,
}

impl RoutingDecision {
    /// Number of tokens.
    pub fn tokens(&self) -> usize {
        self.experts.len() / self.k
    }

    /// Expert ids of token `t`.
    pub fn experts_of(&self, t: usize) -> &[u32] {
        &self.experts[t * self.k..(t + 1) * self.k]
    }

    /// Weights of token `t`.
    pub fn weights_of(&self, t: usize) -> &[f32] {
        &self.weights[t * self.k..(t + 1) * self.k]
    }
}

/// How a router turns logits into a selection: its family's rule, with what the rule reads
/// besides the logits.
#[derive(Debug, Clone, PartialEq)]
pub enum Selection {
    /// Softmax over all experts, top-k, optionally renormalised: the rule of qwen2_moe,
    /// qwen3_moe, olmoe, qwen3_next (`norm_topk_prob` from the config) and mixtral (always
    /// renormalised).
    Softmax,
    /// deepseek_v3 ([`RoutingRule::SigmoidGrouped`]): sigmoid scores, `bias` added for the
    /// selection only, group-limited top-k, weights (unbiased scores, renormalised if
    /// `norm_topk_prob`) times `scale`.
    Grouped {
        /// `[E]`: `e_score_correction_bias`.
        bias: Vec<f32>,
        n_group: usize,
        topk_group: usize,
        scale: f32,
    },
    /// gpt_oss ([`RoutingRule::TopKSoftmax`]): `bias` (`[E]`, its `router.bias`) added to the
    /// logits, the top k kept, their softmax as weights.
    TopKSoftmax { bias: Vec<f32> },
}

/// A MoE layer's router: the gate matrix and its family's selection rule.
#[derive(Debug, Clone)]
pub struct Router {
    /// `[E, H]`.
    pub weight: Weight,
    pub top_k: usize,
    pub norm_topk_prob: bool,
    pub selection: Selection,
}

impl Router {
    /// Routes every row of `x` (`[T, H]`, the normalised hidden state).
    pub fn route(&self, x: ArrayView2<'_, f32>) -> RoutingDecision {
        let logits = self.logits(x); // (T, E)
        match self.selection {
            Selection::Grouped { .. } => return self.route_grouped(&logits),
            Selection::TopKSoftmax { .. } => return self.route_topk_softmax(&logits),
            Selection::Softmax => {}
        }
        let k = self.top_k;
        let mut experts = Vec::with_capacity(x.nrows() * k);
        let mut weights = Vec::with_capacity(x.nrows() * k);
        let mut order: Vec<u32> = Vec::new();
        for row in logits.rows() {
            let mut probs = row.to_vec();
            softmax(&mut probs);
            order.clear();
            order.extend(0..probs.len() as u32);
            // Descending probability; ties keep the lower id first. The comparison is a total
            // order, so selecting the k best and sorting only those gives the full sort's top k.
            let best_first =
                |a: &u32, b: &u32| probs[*b as usize].total_cmp(&probs[*a as usize]).then(a.cmp(b));
            if k < order.len() {
                order.select_nth_unstable_by(k - 1, best_first);
            }
            order[..k].sort_by(best_first);
            let top = &order[..k];
            let mut w: Vec<f32> = top.iter().map(|&e| probs[e as usize]).collect();
            if self.norm_topk_prob {
                let s: f32 = w.iter().sum();
                w.iter_mut().for_each(|v| *v /= s);
            }
            experts.extend_from_slice(top);
            weights.extend(w);
        }
        RoutingDecision { k, experts, weights }
    }

    /// The router's logits for every row of `x` (`[T, H]` → `[T, E]`), its bias included.
    pub fn logits(&self, x: ArrayView2<'_, f32>) -> Array2<f32> {
        let bias = match &self.selection {
            Selection::TopKSoftmax { bias } => Some(bias.as_slice()),
            _ => None,
        };
        linear(x, &self.weight, bias)
    }

    /// gpt_oss's rule on every row of `logits` (`[T, E]`): the k largest logits (ties: lower
    /// id), weighted by their softmax.
    fn route_topk_softmax(&self, logits: &Array2<f32>) -> RoutingDecision {
        let k = self.top_k;
        let mut experts = Vec::with_capacity(logits.nrows() * k);
        let mut weights = Vec::with_capacity(logits.nrows() * k);
        for row in logits.rows() {
            let row = row.to_vec();
            let top = top_k_ids(&row, k);
            let mut w: Vec<f32> = top.iter().map(|&e| row[e as usize]).collect();
            softmax(&mut w);
            experts.extend_from_slice(&top);
            weights.extend(w);
        }
        RoutingDecision { k, experts, weights }
    }

    /// deepseek_v3's rule on every row of `logits` (`[T, E]`).
    fn route_grouped(&self, logits: &Array2<f32>) -> RoutingDecision {
        let Selection::Grouped { scale, .. } = self.selection else {
            unreachable!("called for grouped routers only")
        };
        let k = self.top_k;
        let mut experts = Vec::with_capacity(logits.nrows() * k);
        let mut weights = Vec::with_capacity(logits.nrows() * k);
        for row in logits.rows() {
            let row = row.to_vec();
            let (scores, order) = self.grouped_order(&row, k);
            let top = &order[..k];
            // The unbiased scores of the chosen experts, as transformers applies them.
            let mut w: Vec<f32> = top.iter().map(|&e| scores[e as usize]).collect();
            if self.norm_topk_prob {
                let s = w.iter().sum::<f32>() + 1e-20;
                w.iter_mut().for_each(|v| *v /= s);
            }
            w.iter_mut().for_each(|v| *v *= scale);
            experts.extend_from_slice(top);
            weights.extend(w);
        }
        RoutingDecision { k, experts, weights }
    }

    /// The sigmoid scores of one token's `logits` and its experts in the order the grouped
    /// rule ranks them: the kept groups' experts by biased score, then the dropped groups'
    /// (ties: lower id); only the first `k` are guaranteed sorted. Groups rank by the sum of
    /// their two best biased scores (ties: lower group).
    fn grouped_order(&self, logits: &[f32], k: usize) -> (Vec<f32>, Vec<u32>) {
        let Selection::Grouped {
            bias,
            n_group,
            topk_group,
            ..
        } = &self.selection
        else {
            unreachable!("called for grouped routers only")
        };
        let scores: Vec<f32> = logits.iter().map(|&l| sigmoid(l)).collect();
        let biased: Vec<f32> = scores.iter().zip(bias).map(|(s, b)| s + b).collect();
        let per = biased.len() / n_group;
        let group_score: Vec<f32> = biased
            .chunks(per)
            .map(|g| {
                let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
                for &v in g {
                    if v > a {
                        b = a;
                        a = v;
                    } else if v > b {
                        b = v;
                    }
                }
                a + b
            })
            .collect();
        let mut groups: Vec<usize> = (0..*n_group).collect();
        groups.sort_by(|&a, &b| group_score[b].total_cmp(&group_score[a]).then(a.cmp(&b)));
        let mut kept = vec![false; *n_group];
        for &g in &groups[..*topk_group] {
            kept[g] = true;
        }
        let mut order: Vec<u32> = (0..biased.len() as u32).collect();
        let best_first = |a: &u32, b: &u32| {
            let (a, b) = (*a as usize, *b as usize);
            kept[b / per]
                .cmp(&kept[a / per])
                .then(biased[b].total_cmp(&biased[a]))
                .then(a.cmp(&b))
        };
        let k = k.min(order.len());
        if k > 0 && k < order.len() {
            order.select_nth_unstable_by(k - 1, best_first);
        }
        order[..k].sort_by(best_first);
        (scores, order)
    }

    /// Every expert, best first, as this router's rule ranks them from `logits` (one token's
    /// `[E]`): its first `top_k` are exactly what [`Router::route`] selects, in that order.
    /// Ties: lower id first. Gate-lookahead ranks with this.
    pub fn rank(&self, logits: &[f32], k: usize) -> Vec<u32> {
        match &self.selection {
            Selection::Softmax => {
                let mut p = logits.to_vec();
                softmax(&mut p);
                let mut ids: Vec<u32> = (0..p.len() as u32).collect();
                ids.sort_by(|&a, &b| p[b as usize].total_cmp(&p[a as usize]).then(a.cmp(&b)));
                ids.truncate(k);
                ids
            }
            Selection::Grouped { .. } => {
                let mut order = self.grouped_order(logits, k).1;
                order.truncate(k);
                order
            }
            // The softmax of the chosen logits keeps their order.
            Selection::TopKSoftmax { .. } => top_k_ids(logits, k),
        }
    }

    /// [`Router::rank`] of the router's logits for one hidden state (`[H]`).
    pub fn rank_hidden(&self, hidden: &[f32], k: usize) -> Vec<u32> {
        let x = ArrayView2::from_shape((1, hidden.len()), hidden).expect("one row");
        let logits = self.logits(x);
        self.rank(logits.row(0).as_slice().expect("standard layout"), k)
    }
}

/// The `k` largest of `values` (ties: lower id first), best first.
fn top_k_ids(values: &[f32], k: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..values.len() as u32).collect();
    let best_first = |a: &u32, b: &u32| values[*b as usize].total_cmp(&values[*a as usize]).then(a.cmp(b));
    let k = k.min(order.len());
    if k > 0 && k < order.len() {
        order.select_nth_unstable_by(k - 1, best_first);
    }
    order.truncate(k);
    order.sort_by(best_first);
    order
}

/// Loads layer `l`'s router: `gate.weight` `[E, H]`, for deepseek_v3 its
/// `gate.e_score_correction_bias` `[E]`, for gpt_oss `router.weight` and `router.bias`.
pub fn load_router(cfg: &ModelConfig, w: &WeightIndex, l: usize) -> Result<Router> {
    let prefix = moe_prefix(cfg, w, l);
    // gpt_oss names its router `router`, the others `gate`.
    let gate = match cfg.routing {
        RoutingRule::TopKSoftmax => "router",
        _ => "gate",
    };
    let selection = match cfg.routing {
        RoutingRule::Softmax => Selection::Softmax,
        RoutingRule::TopKSoftmax => Selection::TopKSoftmax {
            bias: w
                .get(&format!("{prefix}router.bias"), &[cfg.num_experts])?
                .to_f32_vec(),
        },
        RoutingRule::SigmoidGrouped {
            n_group,
            topk_group,
            routed_scaling_factor,
        } => {
            // Read (and checked finite) as any resident weight is.
            let name = format!("{prefix}gate.e_score_correction_bias");
            Selection::Grouped {
                bias: w.get(&name, &[cfg.num_experts])?.to_f32_vec(),
                n_group,
                topk_group,
                scale: routed_scaling_factor,
            }
        }
    };
    Ok(Router {
        weight: w.get(
            &format!("{prefix}{gate}.weight"),
            &[cfg.num_experts, cfg.hidden_size],
        )?,
        top_k: cfg.num_experts_per_tok,
        norm_topk_prob: cfg.norm_topk_prob,
        selection,
    })
}

/// One expert's SwiGLU weights, in the checkpoint's `[out, in]` layout.
#[derive(Debug, Clone)]
pub struct ExpertWeights {
    /// `[I, H]`.
    pub gate: Weight,
    /// `[I, H]`.
    pub up: Weight,
    /// `[H, I]`.
    pub down: Weight,
    /// gpt_oss: the expert's biases and its clamped SwiGLU; none: `silu(gate) · up`.
    pub biases: Option<Box<ExpertBiases>>,
}

/// gpt_oss's expert biases (`[1, I]`, `[1, I]`, `[1, H]`) and activation
/// ([`crate::gpt_oss::expert_forward`]).
#[derive(Debug, Clone)]
pub struct ExpertBiases {
    pub gate: Weight,
    pub up: Weight,
    pub down: Weight,
    pub swiglu: ClampedSwiglu,
}

impl ExpertWeights {
    /// Refuses an expert whose float values (matrices, or a quantised one's scales and
    /// biases) hold NaN or infinity; `what` names it (`model.layers.3.mlp.experts.17`).
    pub fn check_finite(&self, path: &std::path::Path, what: &str) -> Result<()> {
        let mut mats = vec![
            ("gate_proj", &self.gate),
            ("up_proj", &self.up),
            ("down_proj", &self.down),
        ];
        if let Some(b) = &self.biases {
            mats.extend([
                ("gate_proj_bias", &b.gate),
                ("up_proj_bias", &b.up),
                ("down_proj_bias", &b.down),
            ]);
        }
        for (name, m) in mats {
            let tensor = format!("{what}.{name}");
            match m.quant() {
                None => crate::weights::check_finite(path, &tensor, m.dtype(), m.bytes())?,
                Some(q) => {
                    crate::weights::check_finite(
                        path,
                        &format!("{tensor}.scales"),
                        q.scales.dtype(),
                        q.scales.bytes(),
                    )?;
                    crate::weights::check_finite(
                        path,
                        &format!("{tensor}.biases"),
                        q.biases.dtype(),
                        q.biases.bytes(),
                    )?;
                }
            }
        }
        Ok(())
    }

    /// `down(silu(gate(x)) * up(x))` for `x` of `[T, H]`.
    pub fn forward(&self, x: ArrayView2<'_, f32>) -> Array2<f32> {
        self.prefetch_head(false);
        if let Some(b) = &self.biases {
            return crate::gpt_oss::expert_forward(self, b, x);
        }
        let mut g = linear(x, &self.gate, None); // (T, I)
        let u = linear(x, &self.up, None); // (T, I)
        silu_mul(
            g.as_slice_mut().expect("standard layout"),
            u.as_slice().expect("standard layout"),
        );
        linear(g.view(), &self.down, None) // (T, H)
    }

    /// Starts reading the first rows of the up and down matrices (and of the gate matrix with
    /// `gate`), which [`ExpertWeights::forward`] reads after the gate's.
    pub fn prefetch_head(&self, gate: bool) {
        use crate::kernels::{head_bytes, prefetch_head};
        if gate {
            prefetch_head(&self.gate, head_bytes(&self.gate));
        }
        prefetch_head(&self.up, head_bytes(&self.up));
        prefetch_head(&self.down, head_bytes(&self.down));
    }

    /// Bytes of the three matrices (and of gpt_oss's biases).
    pub fn nbytes(&self) -> usize {
        self.gate.nbytes()
            + self.up.nbytes()
            + self.down.nbytes()
            + self
                .biases
                .as_ref()
                .map_or(0, |b| b.gate.nbytes() + b.up.nbytes() + b.down.nbytes())
    }
}

/// An expert id a provider removed from a decision (skip-on-miss): no expert serves that slot.
pub const DROPPED: u32 = u32::MAX;

/// Serves expert weights by (model layer, expert id). The in-memory provider holds them all;
/// the disk tier loads them into a bounded cache behind the same trait.
pub trait ExpertProvider: Send + Sync {
    /// Called once per MoE layer and pass, before any [`ExpertProvider::expert`] call, with the
    /// router's decision, so that a provider can count the activations and start every load at
    /// once. A provider that cannot serve some experts now may replace them by [`DROPPED`] and
    /// renormalise the remaining weights of those tokens.
    fn prepare(&self, _layer: usize, _phase: Phase, _decision: &mut RoutingDecision) -> Result<()> {
        Ok(())
    }

    /// The weights of one expert. They stay valid while the caller holds them, even if the
    /// expert leaves the cache meanwhile (its memory lives until the last view goes).
    fn expert(&self, layer: usize, expert: u32) -> Result<Arc<ExpertWeights>>;

    /// The weights of one expert if they are at hand now, without waiting, loading or
    /// counting a use (for hints such as cache prefetches); None if not, or if the provider
    /// does not say.
    fn resident(&self, _layer: usize, _expert: u32) -> Option<Arc<ExpertWeights>> {
        None
    }

    /// Starts loading `experts` of model layer `layer` ahead of need (a provider that holds
    /// everything ignores it). Returns how many loads it started.
    fn prefetch(&self, _layer: usize, _experts: &[u32]) -> Result<usize> {
        Ok(0)
    }

    /// Drops a prefetch of `expert` at `layer` that nobody has asked for and no reader has
    /// taken yet; true if it was dropped.
    fn cancel_prefetch(&self, _layer: usize, _expert: u32) -> bool {
        false
    }
}

/// Every expert resident (memory-mapped checkpoint views; no copies).
#[derive(Debug)]
pub struct InMemoryExperts {
    /// Indexed by model layer; empty for dense layers.
    layers: Vec<Vec<Arc<ExpertWeights>>>,
}

impl InMemoryExperts {
    /// Finds and shape-checks every expert of every MoE layer in the checkpoint.
    pub fn load(cfg: &ModelConfig, w: &WeightIndex) -> Result<Self> {
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| {
                if cfg.mlp_kinds[l] == crate::config::MlpKind::Moe {
                    (0..cfg.num_experts)
                        .map(|e| {
                            let ew = expert_weights(cfg, w, l, e)?;
                            ew.check_finite(
                                w.file_path(expert_file(cfg, w, l, e)?),
                                &format!("{}experts.{e}", moe_prefix(cfg, w, l)),
                            )?;
                            Ok(Arc::new(ew))
                        })
                        .collect()
                } else {
                    Ok(Vec::new())
                }
            })
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }
}

impl ExpertProvider for InMemoryExperts {
    fn expert(&self, layer: usize, expert: u32) -> Result<Arc<ExpertWeights>> {
        self.resident(layer, expert)
            .ok_or_else(|| EngineError::invalid("expert", format!("no expert {expert} at layer {layer}")))
    }

    fn resident(&self, layer: usize, expert: u32) -> Option<Arc<ExpertWeights>> {
        self.layers
            .get(layer)
            .and_then(|l| l.get(expert as usize))
            .cloned()
    }
}

/// The key prefix of layer `l`'s MoE block (`model.layers.{l}.mlp.` or mixtral's
/// `block_sparse_moe.`, whichever the checkpoint has).
pub fn moe_prefix(cfg: &ModelConfig, w: &WeightIndex, l: usize) -> String {
    let mlp = format!("model.layers.{l}.mlp.");
    if cfg.arch == Arch::Mixtral {
        let legacy = format!("model.layers.{l}.block_sparse_moe.");
        if w.contains(&format!("{legacy}gate.weight")) {
            return legacy;
        }
    }
    mlp
}

/// Names of expert `e`'s (gate, up, down) matrices in the per-expert layout.
fn per_expert_names(cfg: &ModelConfig, prefix: &str, e: usize) -> [String; 3] {
    let p = format!("{prefix}experts.{e}.");
    if cfg.arch == Arch::Mixtral {
        [
            format!("{p}w1.weight"),
            format!("{p}w3.weight"),
            format!("{p}w2.weight"),
        ]
    } else {
        [
            format!("{p}gate_proj.weight"),
            format!("{p}up_proj.weight"),
            format!("{p}down_proj.weight"),
        ]
    }
}

/// Where one expert matrix lies in the checkpoint's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorRef {
    /// Index of the file in the [`WeightIndex`].
    pub file: usize,
    /// Byte offset from the start of the file.
    pub offset: u64,
    /// [`DType::U32`](crate::weights::DType::U32) for a quantised matrix's packed words.
    pub dtype: crate::weights::DType,
    /// `[out, in]` (of the float matrix a quantised one stands for).
    pub shape: [usize; 2],
    /// A quantised matrix's scales and biases.
    pub quant: Option<QuantRef>,
}

/// A float tensor's bytes in the checkpoint's files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub file: usize,
    pub offset: u64,
    pub dtype: crate::weights::DType,
    pub shape: [usize; 2],
}

impl Piece {
    pub fn nbytes(&self) -> u64 {
        self.dtype.nbytes(&self.shape) as u64
    }
}

/// The scales and biases (`[out, in / group]`) of a quantised expert matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantRef {
    pub spec: crate::quant::QuantSpec,
    pub scales: Piece,
    pub biases: Piece,
}

impl TensorRef {
    /// Bytes of the matrix itself (a quantised one's packed words).
    pub fn nbytes(&self) -> u64 {
        match &self.quant {
            Some(q) => (self.shape[0] * q.spec.words_per_row(self.shape[1]) * 4) as u64,
            None => self.dtype.nbytes(&self.shape) as u64,
        }
    }

    /// Bytes of the matrix with its scales and biases.
    pub fn total_bytes(&self) -> u64 {
        self.nbytes() + self.quant.map_or(0, |q| q.scales.nbytes() + q.biases.nbytes())
    }
}

/// Where expert `e` of layer `l` lies: its (gate, up, down) matrices, from per-expert tensors
/// (the Hugging Face hub layout) or as slices of the fused `experts.gate_up_proj` `[E, 2I, H]`
/// / `experts.down_proj` `[E, H, I]` that transformers 5 writes with
/// `save_original_format=False`. Shapes are checked against the config.
pub fn expert_tensor_refs(cfg: &ModelConfig, w: &WeightIndex, l: usize, e: usize) -> Result<[TensorRef; 3]> {
    let (h, i) = (cfg.hidden_size, cfg.moe_intermediate_size);
    let prefix = moe_prefix(cfg, w, l);
    let fused = format!("{prefix}experts.gate_up_proj");
    let entry = |name: &str, shape: &[usize]| w.entry_checked(name, shape);
    let switch = format!("{prefix}switch_mlp.");
    let stacked = ["gate_proj", "up_proj", "down_proj"].iter().any(|n| {
        w.contains(&format!("{switch}{n}.weight")) || w.has_unsupported(&format!("{switch}{n}.weight"))
    });
    if stacked {
        // mlx_lm's stacked experts: `switch_mlp.{gate,up,down}_proj.weight` `[E, out, in]`.
        // Quantised ones (packed words, scales, biases) are sliced the same way.
        let names = ["gate_proj", "up_proj", "down_proj"].map(|n| format!("{switch}{n}.weight"));
        let shapes = [[i, h], [i, h], [h, i]];
        let mut refs = Vec::with_capacity(3);
        for (name, shape) in names.iter().zip(shapes) {
            let stacked = [cfg.num_experts, shape[0], shape[1]];
            if w.is_quantized(name) {
                // Words, scales and biases checked together (their bytes untouched).
                let q = w.quantized_entries(name, &stacked)?;
                let slice = |en: &TensorEntry, cols: usize| Piece {
                    file: en.file,
                    offset: en.offset as u64 + (e * shape[0] * cols * en.dtype.size()) as u64,
                    dtype: en.dtype,
                    shape: [shape[0], cols],
                };
                let words = slice(q.words, q.spec.words_per_row(shape[1]));
                let groups = shape[1] / q.spec.group_size;
                refs.push(TensorRef {
                    file: words.file,
                    offset: words.offset,
                    dtype: words.dtype,
                    shape,
                    quant: Some(QuantRef {
                        spec: q.spec,
                        scales: slice(q.scales, groups),
                        biases: slice(q.biases, groups),
                    }),
                });
                continue;
            }
            let en = entry(name, &stacked)?;
            refs.push(TensorRef {
                file: en.file,
                offset: en.offset as u64 + (e * en.dtype.nbytes(&shape)) as u64,
                dtype: en.dtype,
                shape,
                quant: None,
            });
        }
        return Ok(refs.try_into().expect("three refs"));
    }
    if w.contains(&fused) {
        let down_name = format!("{prefix}experts.down_proj");
        let gu = entry(&fused, &[cfg.num_experts, 2 * i, h])?;
        let dn = entry(&down_name, &[cfg.num_experts, h, i])?;
        let s = gu.dtype.size() as u64;
        let gate_off = gu.offset as u64 + (e * 2 * i * h) as u64 * s;
        return Ok([
            TensorRef {
                file: gu.file,
                offset: gate_off,
                dtype: gu.dtype,
                shape: [i, h],
                quant: None,
            },
            TensorRef {
                file: gu.file,
                offset: gate_off + (i * h) as u64 * s,
                dtype: gu.dtype,
                shape: [i, h],
                quant: None,
            },
            TensorRef {
                file: dn.file,
                offset: dn.offset as u64 + (e * h * i) as u64 * dn.dtype.size() as u64,
                dtype: dn.dtype,
                shape: [h, i],
                quant: None,
            },
        ]);
    }
    let names = per_expert_names(cfg, &prefix, e);
    let shapes = [[i, h], [i, h], [h, i]];
    let mut refs = Vec::with_capacity(3);
    for (name, shape) in names.iter().zip(shapes) {
        let en = entry(name, &shape)?;
        refs.push(TensorRef {
            file: en.file,
            offset: en.offset as u64,
            dtype: en.dtype,
            shape,
            quant: None,
        });
    }
    Ok(refs.try_into().expect("three refs"))
}

/// Index of the file that holds expert `e` of layer `l` (its gate's), for error messages.
pub fn expert_file(cfg: &ModelConfig, w: &WeightIndex, l: usize, e: usize) -> Result<usize> {
    if cfg.clamped_swiglu.is_some() {
        let p = format!("{}experts.", moe_prefix(cfg, w, l));
        return Ok(["gate_up_proj", "gate_up_proj_blocks"]
            .iter()
            .find_map(|n| w.entry(&format!("{p}{n}")).map(|en| en.file))
            .unwrap_or(0));
    }
    Ok(expert_tensor_refs(cfg, w, l, e)?[0].file)
}

/// gpt_oss's expert biases where its experts are stacked as llama.cpp's converter writes them
/// (`switch_mlp.{gate,up,down}_proj.bias`, `[E, I]`, `[E, I]`, `[E, H]`, the matrices already
/// de-interleaved): expert `e`'s three rows. None for other families, and for gpt_oss's hub
/// layouts (rearranged by [`crate::gpt_oss`]).
pub fn stacked_expert_biases(
    cfg: &ModelConfig,
    w: &WeightIndex,
    l: usize,
    e: usize,
) -> Result<Option<[Piece; 3]>> {
    if cfg.clamped_swiglu.is_none() {
        return Ok(None);
    }
    let sw = format!("{}switch_mlp.", moe_prefix(cfg, w, l));
    let gate = format!("{sw}gate_proj.weight");
    if !w.contains(&gate) && !w.has_unsupported(&gate) {
        return Ok(None);
    }
    let (h, i, n) = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts);
    let piece = |name: &str, width: usize| -> Result<Piece> {
        let en = w.entry_checked(&format!("{sw}{name}.bias"), &[n, width])?;
        Ok(Piece {
            file: en.file,
            offset: en.offset as u64 + (e * en.dtype.nbytes(&[width])) as u64,
            dtype: en.dtype,
            shape: [1, width],
        })
    };
    Ok(Some([
        piece("gate_proj", i)?,
        piece("up_proj", i)?,
        piece("down_proj", h)?,
    ]))
}

/// Expert `e` of layer `l` as views into the memory-mapped checkpoint (no copy); gpt_oss's
/// hub layouts rearranged into its own memory ([`crate::gpt_oss::expert_weights`]).
pub fn expert_weights(cfg: &ModelConfig, w: &WeightIndex, l: usize, e: usize) -> Result<ExpertWeights> {
    let stacked_biases = stacked_expert_biases(cfg, w, l, e)?;
    if cfg.clamped_swiglu.is_some() && stacked_biases.is_none() {
        return crate::gpt_oss::expert_weights(cfg, w, l, e);
    }
    let [g, u, d] = expert_tensor_refs(cfg, w, l, e)?;
    let piece = |p: &Piece| ((p.file, p.offset), p.dtype, p.shape);
    let view = |r: TensorRef| {
        matrix_from_pieces(
            r.shape,
            r.dtype,
            (r.file, r.offset),
            r.quant.map(|q| (q.spec, piece(&q.scales), piece(&q.biases))),
            |(file, offset), dtype, shape| {
                Weight::new(w.file_map(file).clone(), offset as usize, dtype, shape)
            },
        )
    };
    let biases = match (stacked_biases, cfg.clamped_swiglu) {
        (Some(b), Some(swiglu)) => {
            let v = |p: &Piece| {
                Weight::new(
                    w.file_map(p.file).clone(),
                    p.offset as usize,
                    p.dtype,
                    p.shape.to_vec(),
                )
            };
            Some(Box::new(ExpertBiases {
                gate: v(&b[0]),
                up: v(&b[1]),
                down: v(&b[2]),
                swiglu,
            }))
        }
        _ => None,
    };
    Ok(ExpertWeights {
        gate: view(g),
        up: view(u),
        down: view(d),
        biases,
    })
}

/// A dense SwiGLU feed-forward (dense layers, and qwen2_moe's shared expert).
pub type Mlp = ExpertWeights;

/// Loads the dense MLP under `prefix` (`gate_proj`, `up_proj`, `down_proj`) of width `width`.
pub fn load_mlp(cfg: &ModelConfig, w: &WeightIndex, prefix: &str, width: usize) -> Result<Mlp> {
    let h = cfg.hidden_size;
    Ok(ExpertWeights {
        gate: w.get(&format!("{prefix}gate_proj.weight"), &[width, h])?,
        up: w.get(&format!("{prefix}up_proj.weight"), &[width, h])?,
        down: w.get(&format!("{prefix}down_proj.weight"), &[h, width])?,
        biases: None,
    })
}

/// The always-on expert: qwen2_moe's and qwen3_next's, scaled by `sigmoid(x · gate)`;
/// deepseek_v3's (`shared_experts`, as wide as its `n_shared_experts` together), added as it is.
#[derive(Debug, Clone)]
pub struct SharedExpert {
    pub mlp: Mlp,
    /// `[1, H]`; none for deepseek_v3.
    pub gate: Option<Weight>,
}

/// One MoE feed-forward block: router, routed experts from the provider, optional shared
/// expert.
#[derive(Debug, Clone)]
pub struct MoeBlock {
    /// Model layer index.
    pub layer: usize,
    pub router: Router,
    pub shared: Option<SharedExpert>,
}

impl MoeBlock {
    /// Loads the router (and shared expert) of layer `l`; experts stay with the provider.
    pub fn load(cfg: &ModelConfig, w: &WeightIndex, l: usize) -> Result<Self> {
        let prefix = moe_prefix(cfg, w, l);
        let router = load_router(cfg, w, l)?;
        let shared = match cfg.shared_expert_intermediate_size {
            Some(width) if cfg.shared_expert_gated => Some(SharedExpert {
                mlp: load_mlp(cfg, w, &format!("{prefix}shared_expert."), width)?,
                gate: Some(w.get(
                    &format!("{prefix}shared_expert_gate.weight"),
                    &[1, cfg.hidden_size],
                )?),
            }),
            Some(width) => Some(SharedExpert {
                mlp: load_mlp(cfg, w, &format!("{prefix}shared_experts."), width)?,
                gate: None,
            }),
            None => None,
        };
        Ok(Self {
            layer: l,
            router,
            shared,
        })
    }

    /// Applies the routed experts of `decision` to `x` (`[T, H]`) and adds the shared expert.
    pub fn forward(
        &self,
        x: ArrayView2<'_, f32>,
        decision: RoutingDecision,
        phase: Phase,
        experts: &dyn ExpertProvider,
    ) -> Result<Array2<f32>> {
        self.forward_timed(x, decision, phase, experts, &mut None)
    }

    /// [`MoeBlock::forward`], adding to `fetch_secs` the time spent getting experts from the
    /// provider (their loads included) when it is `Some`.
    pub fn forward_timed(
        &self,
        x: ArrayView2<'_, f32>,
        mut decision: RoutingDecision,
        phase: Phase,
        experts: &dyn ExpertProvider,
        fetch_secs: &mut Option<f64>,
    ) -> Result<Array2<f32>> {
        let (t, h) = x.dim();
        let mut out = Array2::<f32>::zeros((t, h));
        let timing = fetch_secs.is_some();
        let mut fetched = 0.0;
        let fetch = |e: u32, fetched: &mut f64| -> Result<Arc<ExpertWeights>> {
            if !timing {
                return experts.expert(self.layer, e);
            }
            let t0 = std::time::Instant::now();
            let w = experts.expert(self.layer, e);
            *fetched += t0.elapsed().as_secs_f64();
            w
        };
        let t0 = std::time::Instant::now();
        experts.prepare(self.layer, phase, &mut decision)?;
        if timing {
            fetched += t0.elapsed().as_secs_f64();
        }
        let mut used: Vec<u32> = decision
            .experts
            .iter()
            .copied()
            .filter(|&e| e != DROPPED)
            .collect();
        used.sort_unstable();
        used.dedup();
        // Experts in ascending id order, as transformers accumulates them. With more than one
        // thread, this thread fetches each expert in that order (waiting for its load if it has
        // to) and hands its matmuls to the pool, one expert per task on one thread, so that
        // experts compute in parallel and while later ones load; the outputs are summed in the
        // same order afterwards, so the result is bitwise the serial one.
        let rows_of = |e: u32| -> (Vec<usize>, Vec<f32>) {
            (0..t)
                .filter_map(|ti| {
                    let k = decision.experts_of(ti).iter().position(|&x| x == e)?;
                    Some((ti, decision.weights_of(ti)[k]))
                })
                .unzip()
        };
        let parallel = used.len() > 1 && rayon::current_num_threads() > 1;
        let outputs: Vec<(Vec<usize>, Vec<f32>, Array2<f32>)> = if parallel {
            let slots: Vec<std::sync::Mutex<Option<Array2<f32>>>> =
                used.iter().map(|_| std::sync::Mutex::new(None)).collect();
            let mut routed = Vec::with_capacity(used.len());
            let mut failed = None;
            rayon::scope(|s| {
                for (&e, slot) in used.iter().zip(&slots) {
                    let (rows, scales) = rows_of(e);
                    let weights = match fetch(e, &mut fetched) {
                        Ok(w) => w,
                        Err(err) => {
                            failed = Some(err);
                            break;
                        }
                    };
                    let xe = x.select(Axis(0), &rows); // (Te, H)
                    routed.push((rows, scales));
                    s.spawn(move |_| {
                        let ye = crate::kernels::serial(|| weights.forward(xe.view())); // (Te, H)
                        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(ye);
                    });
                }
            });
            if let Some(err) = failed {
                return Err(err);
            }
            routed
                .into_iter()
                .zip(slots)
                .map(|((rows, scales), slot)| {
                    let ye = slot
                        .into_inner()
                        .unwrap_or_else(|p| p.into_inner())
                        .unwrap_or_else(|| Array2::zeros((0, h)));
                    (rows, scales, ye)
                })
                .collect()
        } else {
            let mut out = Vec::with_capacity(used.len());
            for (i, &e) in used.iter().enumerate() {
                let (rows, scales) = rows_of(e);
                let weights = fetch(e, &mut fetched)?;
                // The next expert's first rows on their way while this one computes, where the
                // provider has it at hand (never waiting for a load here).
                if let Some(w) = used.get(i + 1).and_then(|&n| experts.resident(self.layer, n)) {
                    crate::kernels::prefetch_head(&w.gate, crate::kernels::head_bytes(&w.gate));
                }
                let xe = x.select(Axis(0), &rows); // (Te, H)
                let ye = weights.forward(xe.view()); // (Te, H)
                out.push((rows, scales, ye));
            }
            out
        };
        if let Some(f) = fetch_secs {
            *f += fetched;
        }
        for (rows, scales, ye) in outputs {
            for ((&ti, &s), yrow) in rows.iter().zip(&scales).zip(ye.rows()) {
                for (o, v) in out.row_mut(ti).iter_mut().zip(yrow) {
                    *o += v * s;
                }
            }
        }
        if let Some(shared) = &self.shared {
            let ys = shared.mlp.forward(x); // (T, H)
            match &shared.gate {
                Some(gate) => {
                    let gates = linear(x, gate, None); // (T, 1)
                    for ti in 0..t {
                        let g = sigmoid(gates[[ti, 0]]);
                        for (o, v) in out.row_mut(ti).iter_mut().zip(ys.row(ti)) {
                            *o += g * v;
                        }
                    }
                }
                None => out += &ys,
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn router_picks_top_k_and_renormalises() {
        // 3 experts, hidden 2: logits are x·rows.
        let weight = Weight::from_f32(&[1.0, 0.0, 0.0, 1.0, 0.5, 0.5], vec![3, 2]);
        let r = Router {
            weight,
            top_k: 2,
            norm_topk_prob: true,
            selection: Selection::Softmax,
        };
        let d = r.route(array![[2.0f32, 0.0], [0.0, 3.0]].view());
        assert_eq!(d.experts_of(0), &[0, 2]);
        assert_eq!(d.experts_of(1), &[1, 2]);
        for t in 0..2 {
            assert!((d.weights_of(t).iter().sum::<f32>() - 1.0).abs() < 1e-6);
            assert!(d.weights_of(t)[0] > d.weights_of(t)[1]);
        }
        let raw = Router {
            norm_topk_prob: false,
            ..r
        }
        .route(array![[2.0f32, 0.0]].view());
        assert!(raw.weights_of(0).iter().sum::<f32>() < 1.0);
    }

    /// deepseek_v3's rule: sigmoid scores, the bias only for choosing, the best two of four
    /// groups (each scored by its two best biased scores) kept, top-k within them, weights
    /// renormalised and scaled.
    #[test]
    fn grouped_routing_keeps_the_best_groups_and_weighs_unbiased_scores() {
        // 8 experts in 4 groups of 2; hidden 8 with an identity gate: logits are x.
        let mut eye = vec![0.0f32; 64];
        (0..8).for_each(|i| eye[i * 8 + i] = 1.0);
        let router = |bias: Vec<f32>, norm: bool| Router {
            weight: Weight::from_f32(&eye, vec![8, 8]),
            top_k: 2,
            norm_topk_prob: norm,
            selection: Selection::Grouped {
                bias,
                n_group: 4,
                topk_group: 2,
                scale: 2.5,
            },
        };
        let x = array![[3.0f32, -3.0, 2.2, 2.0, 1.5, 1.5, 2.5, -5.0]];
        let sig = |v: f32| 1.0 / (1.0 + (-v).exp());
        // Group sums: 1.0, 1.78, 1.64, 0.93: groups 1 and 2 kept. Plain top-2 would be 0 and 6.
        let d = router(vec![0.0; 8], true).route(x.view());
        assert_eq!(d.experts_of(0), &[2, 3]);
        let (a, b) = (sig(2.2), sig(2.0));
        let want = [2.5 * a / (a + b), 2.5 * b / (a + b)];
        for (g, w) in d.weights_of(0).iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
        // A bias of 0.5 on expert 4 makes it the first choice; its weight stays its sigmoid.
        let mut bias = vec![0.0; 8];
        bias[4] = 0.5;
        let r = router(bias, false);
        let d = r.route(x.view());
        assert_eq!(d.experts_of(0), &[4, 2]);
        let want = [2.5 * sig(1.5), 2.5 * sig(2.2)];
        for (g, w) in d.weights_of(0).iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
        // Ranked further: the rest of the kept groups, then the dropped groups' experts.
        let logits = x.row(0).to_vec();
        assert_eq!(r.rank(&logits, 8), vec![4, 2, 3, 5, 0, 6, 1, 7]);
        assert_eq!(r.rank(&logits, 2), d.experts_of(0));
        assert_eq!(r.rank_hidden(logits.as_slice(), 3), vec![4, 2, 3]);
    }

    #[test]
    fn top_k_selection_equals_a_full_sort_with_ties() {
        // 64 experts whose logits repeat in runs of 4 (ties everywhere), hidden 1.
        let e = 64;
        let w: Vec<f32> = (0..e).map(|i| ((i / 4) * 7 % 16) as f32 * 0.25).collect();
        for k in [1, 3, 4, 10, 64] {
            let r = Router {
                weight: Weight::from_f32(&w, vec![e, 1]),
                top_k: k,
                norm_topk_prob: false,
                selection: Selection::Softmax,
            };
            let d = r.route(array![[1.0f32], [-1.0]].view());
            for (t, sign) in [(0, 1.0f32), (1, -1.0)] {
                let mut all: Vec<u32> = (0..e as u32).collect();
                all.sort_by(|&a, &b| {
                    (sign * w[b as usize])
                        .total_cmp(&(sign * w[a as usize]))
                        .then(a.cmp(&b))
                });
                assert_eq!(d.experts_of(t), &all[..k], "k {k}, token {t}");
            }
        }
    }
}
