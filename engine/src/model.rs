//! The decoder-only MoE transformer, read top to bottom: embeddings, decoder layers
//! (a token mixer — attention, or qwen3_next's Gated DeltaNet — then a dense or MoE
//! feed-forward, each pre-normed with a residual), final norm, LM head.
//!
//! Dimensions: `T` = tokens in the pass, `H` = hidden, `V` = vocabulary.

use std::sync::Arc;

use ndarray::{Array2, Axis, s};

use crate::attention::{Attention, KvCache, norm_weight};
use crate::config::{Mixer, MlpKind, ModelConfig};
use crate::deepseek_v3::MlaAttention;
use crate::error::{EngineError, Result};
use crate::kernels::{linear, rms_norm_rows};
use crate::moe::{ExpertProvider, InMemoryExperts, Mlp, MoeBlock, load_mlp};
use crate::observer::{Phase, RouteEvent, RoutingObserver};
use crate::predict::{PredictStats, Prefetch};
use crate::prefetcher::Prefetcher;
use crate::qwen3_next::GatedDeltaNet;
use crate::rope::RopeTables;
use crate::weights::{Weight, WeightIndex};

/// The feed-forward half of a decoder layer.
#[derive(Debug, Clone)]
pub enum FeedForward {
    Dense(Mlp),
    Moe(MoeBlock),
}

/// The token-mixing half of a decoder layer.
#[derive(Debug, Clone)]
pub enum TokenMixer {
    Attention(Attention),
    /// qwen3_next's linear attention.
    GatedDeltaNet(GatedDeltaNet),
    /// deepseek_v3's multi-head latent attention.
    LatentAttention(MlaAttention),
}

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub input_layernorm: Vec<f32>,
    pub mixer: TokenMixer,
    pub post_attention_layernorm: Vec<f32>,
    pub mlp: FeedForward,
}

/// Which rows of the pass need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// Every token of the pass (`[T, V]`).
    All,
    /// Only the last token (`[1, V]`): generation.
    Last,
}

/// Where forward passes spent their time (when [`Model::set_op_profile`] is on), in seconds.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct OpProfile {
    pub passes: u64,
    pub tokens: u64,
    pub embed_secs: f64,
    /// Input norm, the token mixer (q/k/v, rope, attention, o_proj; or the linear
    /// attention), residual.
    pub attention_secs: f64,
    /// Post-attention norm, router, observer, handing the router input to the predictor.
    pub router_secs: f64,
    /// Routed experts: prepare, fetching each expert (its load included), their matmuls.
    pub experts_secs: f64,
    /// Of `experts_secs`: on the forward thread, getting experts from the provider (waiting
    /// for loads included); the rest is their matmuls (in parallel with the fetching when
    /// threads > 1).
    pub expert_fetch_secs: f64,
    /// Dense MLP layers and shared experts.
    pub dense_secs: f64,
    /// Inline predictor after each layer.
    pub predictor_secs: f64,
    /// Final norm and LM head.
    pub head_secs: f64,
}

impl OpProfile {
    /// One line per part, milliseconds per pass.
    pub fn table(&self) -> String {
        let n = self.passes.max(1) as f64;
        let total = self.embed_secs
            + self.attention_secs
            + self.router_secs
            + self.experts_secs
            + self.dense_secs
            + self.predictor_secs
            + self.head_secs;
        let mut out = String::from("| part | ms per pass | share |\n|---|---:|---:|\n");
        for (name, v) in [
            ("embedding", self.embed_secs),
            (
                "attention (norm, q/k/v, rope, scores, o_proj)",
                self.attention_secs,
            ),
            (
                "router (norm, gate, top-k, observer, predictor hand-off)",
                self.router_secs,
            ),
            ("routed experts", self.experts_secs),
            (
                "  of which fetching experts (loads included)",
                self.expert_fetch_secs,
            ),
            ("dense MLP / shared expert", self.dense_secs),
            ("predictor (inline)", self.predictor_secs),
            ("final norm + LM head", self.head_secs),
        ] {
            out += &format!(
                "| {name} | {:.3} | {:.1}% |\n",
                v / n * 1e3,
                100.0 * v / total.max(1e-12)
            );
        }
        out += &format!("| total | {:.3} | 100% |\n", total / n * 1e3);
        out
    }
}

/// A loaded model: non-expert weights resident, experts served by an [`ExpertProvider`].
pub struct Model {
    pub config: ModelConfig,
    embed_tokens: Weight,
    layers: Vec<DecoderLayer>,
    norm: Vec<f32>,
    lm_head: Weight,
    experts: Arc<dyn ExpertProvider>,
    prefetch: std::sync::Mutex<Option<Prefetcher>>,
    /// Forward passes so far (the predictor's clock).
    passes: std::sync::atomic::AtomicU64,
    op_profile: std::sync::Mutex<Option<OpProfile>>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("arch", &self.config.arch)
            .field("layers", &self.layers.len())
            .finish_non_exhaustive()
    }
}

impl Model {
    /// Loads every non-expert weight and checks its shape; experts stay in the checkpoint and
    /// are served by `experts`.
    pub fn load_with(cfg: ModelConfig, w: &WeightIndex, experts: Arc<dyn ExpertProvider>) -> Result<Self> {
        let h = cfg.hidden_size;
        let embed_tokens = w.get("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let lm_head = if cfg.tie_word_embeddings && !w.contains("lm_head.weight") {
            embed_tokens.clone()
        } else {
            w.get("lm_head.weight", &[cfg.vocab_size, h])?
        };
        let norm_vec =
            |name: &str| -> Result<Vec<f32>> { Ok(norm_weight(&cfg, w.get(name, &[h])?.to_f32_vec())) };
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| {
                let p = format!("model.layers.{l}.");
                Ok(DecoderLayer {
                    input_layernorm: norm_vec(&format!("{p}input_layernorm.weight"))?,
                    mixer: match cfg.mixers[l] {
                        Mixer::Attention => TokenMixer::Attention(Attention::load(&cfg, w, l)?),
                        Mixer::LinearAttention => TokenMixer::GatedDeltaNet(GatedDeltaNet::load(&cfg, w, l)?),
                        Mixer::LatentAttention => {
                            TokenMixer::LatentAttention(MlaAttention::load(&cfg, w, l)?)
                        }
                    },
                    post_attention_layernorm: norm_vec(&format!("{p}post_attention_layernorm.weight"))?,
                    mlp: match cfg.mlp_kinds[l] {
                        MlpKind::Dense => {
                            FeedForward::Dense(load_mlp(&cfg, w, &format!("{p}mlp."), cfg.intermediate_size)?)
                        }
                        MlpKind::Moe => FeedForward::Moe(MoeBlock::load(&cfg, w, l)?),
                    },
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            norm: norm_vec("model.norm.weight")?,
            embed_tokens,
            lm_head,
            layers,
            config: cfg,
            experts,
            prefetch: std::sync::Mutex::new(None),
            passes: std::sync::atomic::AtomicU64::new(0),
            op_profile: std::sync::Mutex::new(None),
        })
    }

    /// Loads the model with every expert resident in memory.
    pub fn load(cfg: ModelConfig, w: &WeightIndex) -> Result<Self> {
        let experts = Arc::new(InMemoryExperts::load(&cfg, w)?);
        Self::load_with(cfg, w, experts)
    }

    /// The expert provider this model asks.
    pub fn experts(&self) -> &Arc<dyn ExpertProvider> {
        &self.experts
    }

    /// Turns prefetching on (or off with `None`): as each MoE layer of a pass routes, the
    /// predictor sees its router input, and in decode passes its predictions for the later
    /// layers the [`Prefetch`] names go to the provider.
    pub fn set_prefetch(&self, prefetch: Option<Prefetch>) {
        let new = prefetch.map(|p| Prefetcher::new(p, self.config.moe_layers(), self.experts.clone()));
        // The old one (and its thread) goes after the lock is released.
        let old = std::mem::replace(&mut *self.prefetch_lock(), new);
        drop(old);
    }

    fn prefetch_lock(&self) -> std::sync::MutexGuard<'_, Option<Prefetcher>> {
        self.prefetch.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What prediction has cost and done so far (None without prefetching). Waits for the
    /// predictor to finish what it was handed.
    pub fn prefetch_stats(&self) -> Option<PredictStats> {
        let guard = self.prefetch_lock();
        guard.as_ref().map(|p| {
            p.flush();
            p.stats()
        })
    }

    /// Turns the per-part timing of forward passes on (from zero) or off.
    pub fn set_op_profile(&self, on: bool) {
        *self.op_profile.lock().unwrap_or_else(|e| e.into_inner()) = on.then(OpProfile::default);
    }

    /// The per-part timing so far (None when off).
    pub fn op_profile(&self) -> Option<OpProfile> {
        self.op_profile.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The router of every MoE layer, by model layer index.
    pub fn routers(&self) -> std::collections::HashMap<usize, crate::moe::Router> {
        self.layers
            .iter()
            .enumerate()
            .filter_map(|(l, layer)| match &layer.mlp {
                FeedForward::Moe(b) => Some((l, b.router.clone())),
                FeedForward::Dense(_) => None,
            })
            .collect()
    }

    /// A fresh KV cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    /// Runs `tokens` at positions `cache.len..`, appends them to `cache`, reports every routing
    /// decision to `observer`, and returns logits (`[T, V]` or `[1, V]`).
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        phase: Phase,
        logits_for: LogitsFor,
        observer: &mut dyn RoutingObserver,
    ) -> Result<Array2<f32>> {
        let cfg = &self.config;
        if tokens.is_empty() {
            return Err(EngineError::invalid("tokens", "no tokens to run"));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(EngineError::invalid(
                "tokens",
                format!(
                    "token id {bad} is outside the vocabulary (vocab_size = {})",
                    cfg.vocab_size
                ),
            ));
        }
        let t = tokens.len();
        let h = cfg.hidden_size;
        let positions: Vec<usize> = (cache.len..cache.len + t).collect();
        let prefetching = {
            let guard = self.prefetch_lock();
            match guard.as_ref() {
                Some(p) => {
                    p.error()?;
                    true
                }
                None => false,
            }
        };
        let pass = self.passes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut moe_ordinal = 0;
        let profiling = self.op_profile.lock().is_ok_and(|p| p.is_some());
        let mut prof = OpProfile::default();
        let mut clock = profiling.then(std::time::Instant::now);
        // Adds the time since the last mark to `slot`.
        let mut mark = |slot: &mut f64| {
            if let Some(c) = clock.as_mut() {
                let now = std::time::Instant::now();
                *slot += (now - *c).as_secs_f64();
                *c = now;
            }
        };
        let rope = RopeTables::new(&cfg.rope, &positions);

        let mut x = Array2::<f32>::zeros((t, h)); // (T, H)
        for (mut row, &tok) in x.rows_mut().into_iter().zip(tokens) {
            self.embed_tokens
                .read_f32(tok as usize * h, row.as_slice_mut().expect("standard layout"));
        }
        mark(&mut prof.embed_secs);

        for (l, layer) in self.layers.iter().enumerate() {
            let mut hn = x.clone();
            rms_norm_rows(&mut hn, &layer.input_layernorm, cfg.rms_norm_eps);
            let attn = match &layer.mixer {
                TokenMixer::Attention(a) => a.forward(hn.view(), &rope, &positions, &mut cache.layers[l]),
                TokenMixer::GatedDeltaNet(d) => d.forward(hn.view(), &mut cache.layers[l]),
                TokenMixer::LatentAttention(a) => {
                    a.forward(hn.view(), &rope, &positions, &mut cache.layers[l])
                }
            };
            x += &attn;
            mark(&mut prof.attention_secs);

            let mut hn = x.clone();
            rms_norm_rows(&mut hn, &layer.post_attention_layernorm, cfg.rms_norm_eps);
            let ff = match &layer.mlp {
                FeedForward::Dense(mlp) => {
                    let y = mlp.forward(hn.view());
                    mark(&mut prof.dense_secs);
                    y
                }
                FeedForward::Moe(block) => {
                    let decision = block.router.route(hn.view());
                    let want_hidden = observer.wants_hidden(l);
                    for ti in 0..t {
                        observer.on_route(&RouteEvent {
                            position: positions[ti],
                            token_id: tokens[ti],
                            phase,
                            layer: l,
                            experts: decision.experts_of(ti),
                            weights: decision.weights_of(ti),
                            hidden: want_hidden.then(|| hn.row(ti).to_slice().expect("standard layout")),
                        });
                    }
                    if prefetching && let Some(p) = self.prefetch_lock().as_mut() {
                        let hidden = hn.row(t - 1);
                        let hidden = hidden.as_slice().expect("standard layout");
                        p.routed(pass, moe_ordinal, phase, hidden, decision.experts_of(t - 1));
                    }
                    moe_ordinal += 1;
                    mark(&mut prof.router_secs);
                    let mut fetch = profiling.then_some(0.0);
                    let out =
                        block.forward_timed(hn.view(), decision, phase, self.experts.as_ref(), &mut fetch)?;
                    prof.expert_fetch_secs += fetch.unwrap_or(0.0);
                    mark(&mut prof.experts_secs);
                    if prefetching && let Some(p) = self.prefetch_lock().as_mut() {
                        p.after_layer()?;
                    }
                    mark(&mut prof.predictor_secs);
                    out
                }
            };
            x += &ff;
        }
        cache.len += t;

        let mut last = match logits_for {
            LogitsFor::All => x,
            LogitsFor::Last => x.slice(s![t - 1.., ..]).to_owned(),
        };
        rms_norm_rows(&mut last, &self.norm, cfg.rms_norm_eps);
        let logits = linear(last.view(), &self.lm_head, None);
        mark(&mut prof.head_secs);
        if profiling && let Some(p) = self.op_profile.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            p.passes += 1;
            p.tokens += t as u64;
            p.embed_secs += prof.embed_secs;
            p.attention_secs += prof.attention_secs;
            p.router_secs += prof.router_secs;
            p.experts_secs += prof.experts_secs;
            p.expert_fetch_secs += prof.expert_fetch_secs;
            p.dense_secs += prof.dense_secs;
            p.predictor_secs += prof.predictor_secs;
            p.head_secs += prof.head_secs;
        }
        Ok(logits)
    }

    /// Logits of the last row as a plain vector.
    pub fn last_row(logits: &Array2<f32>) -> Vec<f32> {
        logits.index_axis(Axis(0), logits.nrows() - 1).to_vec()
    }
}
