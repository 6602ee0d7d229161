//! Causal grouped-query self-attention with RoPE (whole or partial), optional q/k norms, an
//! optional output gate (qwen3_next), and a KV cache.
//!
//! Dimensions: `T` = new tokens, `S` = cached + new positions, `Hq` = query heads,
//! `Hkv` = key/value heads, `Dh` = head_dim, `H` = hidden.

use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;

use crate::config::{ModelConfig, QkNorm};
use crate::error::Result;
use crate::kernels::{linear, rms_norm, softmax};
use crate::rope::RopeTables;
use crate::weights::{Weight, WeightIndex};

/// What one layer keeps between passes. Attention layers: keys and values of every position so
/// far, `[S, Hkv * Dh]` each. Latent-attention layers (deepseek_v3): in `k` the normalised
/// latent `[S, kv_lora_rank]`, in `v` the rotated shared key `[S, qk_rope_head_dim]`.
/// Linear-attention layers (qwen3_next): the last `kernel - 1`
/// inputs of the causal convolution, `[kernel - 1, conv_dim]`, and the recurrent state,
/// `[value_heads, key_head_dim, value_head_dim]` (empty until the first pass).
#[derive(Debug, Clone, Default)]
pub struct LayerKv {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub conv: Vec<f32>,
    pub state: Vec<f32>,
    /// Positions to make room for at the next append ([`KvCache::reserve`]): the keys and
    /// values then never move, and a long run's memory grows only by what it writes.
    pub reserve: usize,
}

/// The KV cache of every layer.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub layers: Vec<LayerKv>,
    /// Number of positions cached.
    pub len: usize,
}

impl KvCache {
    /// An empty cache for `layers` layers.
    pub fn new(layers: usize) -> Self {
        Self {
            layers: vec![LayerKv::default(); layers],
            len: 0,
        }
    }

    /// Makes room for `positions` positions in all (cached ones included) at the next pass: a
    /// run that knows its length (prompt + new tokens) allocates its KV cache once instead of
    /// doubling it — a doubled vector's old copy was measured to stay in the process's
    /// resident set (10.4 MiB growth over 1,800 tokens against 7.0 of keys and values).
    /// Untouched reserved pages cost no memory.
    pub fn reserve(&mut self, positions: usize) {
        for l in &mut self.layers {
            l.reserve = l.reserve.max(positions);
        }
    }

    /// Keeps the first `len` positions only (a conversation's shared prefix). Attention keys and
    /// values are cut; a recurrent state (Gated DeltaNet) cannot be rewound, so a cache that
    /// holds one is left as it is and `false` comes back unless `len` is all of it.
    pub fn truncate(&mut self, len: usize) -> bool {
        if len >= self.len {
            return len == self.len;
        }
        if self
            .layers
            .iter()
            .any(|l| !l.conv.is_empty() || !l.state.is_empty())
        {
            return false;
        }
        for l in &mut self.layers {
            let (kw, vw) = (l.k.len() / self.len, l.v.len() / self.len);
            l.k.truncate(len * kw);
            l.v.truncate(len * vw);
        }
        self.len = len;
        true
    }
}

/// Weights and shape of one attention block.
#[derive(Debug, Clone)]
pub struct Attention {
    q_proj: Weight,
    k_proj: Weight,
    v_proj: Weight,
    o_proj: Weight,
    q_bias: Option<Vec<f32>>,
    k_bias: Option<Vec<f32>>,
    v_bias: Option<Vec<f32>>,
    o_bias: Option<Vec<f32>>,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    qk_norm: QkNorm,
    /// q_proj yields, per head, `Dh` query values then `Dh` gate values (qwen3_next).
    output_gate: bool,
    clip_qkv: Option<f32>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f32,
    sliding_window: Option<usize>,
    /// gpt_oss: `[Hq]` learned logits, one per query head, that join each softmax's
    /// denominator (attention that may go "nowhere").
    sinks: Option<Vec<f32>>,
}

impl Attention {
    /// Loads `model.layers.{l}.self_attn.*`, checking every shape against the config.
    pub fn load(cfg: &ModelConfig, w: &WeightIndex, l: usize) -> Result<Self> {
        let p = format!("model.layers.{l}.self_attn.");
        let (h, qw, kvw) = (cfg.hidden_size, cfg.q_width(), cfg.kv_width());
        let vec = |name: &str, n: usize| -> Result<Vec<f32>> {
            Ok(w.get(&format!("{p}{name}"), &[n])?.to_f32_vec())
        };
        let norm = |name: &str, n: usize| -> Result<Vec<f32>> { Ok(norm_weight(cfg, vec(name, n)?)) };
        let bias = |name: &str, n: usize, present: bool| -> Result<Option<Vec<f32>>> {
            if present { vec(name, n).map(Some) } else { Ok(None) }
        };
        let (q_norm, k_norm) = match cfg.qk_norm {
            QkNorm::None => (None, None),
            QkNorm::PerHead => (
                Some(norm("q_norm.weight", cfg.head_dim)?),
                Some(norm("k_norm.weight", cfg.head_dim)?),
            ),
            QkNorm::FullWidth => (
                Some(norm("q_norm.weight", qw)?),
                Some(norm("k_norm.weight", kvw)?),
            ),
        };
        let q_rows = if cfg.attn_output_gate { 2 * qw } else { qw };
        Ok(Self {
            q_proj: w.get(&format!("{p}q_proj.weight"), &[q_rows, h])?,
            k_proj: w.get(&format!("{p}k_proj.weight"), &[kvw, h])?,
            v_proj: w.get(&format!("{p}v_proj.weight"), &[kvw, h])?,
            o_proj: w.get(&format!("{p}o_proj.weight"), &[h, qw])?,
            q_bias: bias("q_proj.bias", qw, cfg.qkv_bias)?,
            k_bias: bias("k_proj.bias", kvw, cfg.qkv_bias)?,
            v_bias: bias("v_proj.bias", kvw, cfg.qkv_bias)?,
            o_bias: bias("o_proj.bias", h, cfg.o_bias)?,
            q_norm,
            k_norm,
            qk_norm: cfg.qk_norm,
            output_gate: cfg.attn_output_gate,
            clip_qkv: cfg.clip_qkv,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            eps: cfg.rms_norm_eps,
            sliding_window: cfg.sliding_windows[l],
            sinks: if cfg.attention_sinks {
                Some(vec("sinks", cfg.num_attention_heads)?)
            } else {
                None
            },
        })
    }

    /// Attends the `T` new rows of `x` (`[T, H]`, already normalised) at `positions` to the
    /// cache plus themselves; appends their keys and values to `kv`. `positions` must continue
    /// the cache: `kv` holds positions `0..positions[0]`.
    pub fn forward(
        &self,
        x: ArrayView2<'_, f32>,
        rope: &RopeTables,
        positions: &[usize],
        kv: &mut LayerKv,
    ) -> Array2<f32> {
        let t = x.nrows();
        let dh = self.head_dim;
        let mut q = linear(x, &self.q_proj, self.q_bias.as_deref()); // (T, Hq*Dh), or (T, Hq*2Dh)
        // With an output gate, each head's 2·Dh values are its query, then its gate.
        let gate = self.output_gate.then(|| {
            let (qd, hq) = (self.heads * dh, self.heads);
            let mut query = Array2::<f32>::zeros((t, qd));
            let mut gate = Array2::<f32>::zeros((t, qd));
            for ti in 0..t {
                for h in 0..hq {
                    for j in 0..dh {
                        query[[ti, h * dh + j]] = q[[ti, h * 2 * dh + j]];
                        gate[[ti, h * dh + j]] = q[[ti, h * 2 * dh + dh + j]];
                    }
                }
            }
            q = query;
            gate
        });
        let mut k = linear(x, &self.k_proj, self.k_bias.as_deref()); // (T, Hkv*Dh)
        let mut v = linear(x, &self.v_proj, self.v_bias.as_deref()); // (T, Hkv*Dh)

        for (m, norm) in [(&mut q, &self.q_norm), (&mut k, &self.k_norm)] {
            let Some(norm) = norm else { continue };
            for mut row in m.rows_mut() {
                let row = row.as_slice_mut().expect("standard layout");
                match self.qk_norm {
                    QkNorm::FullWidth => rms_norm(row, norm, self.eps),
                    QkNorm::PerHead => row.chunks_mut(dh).for_each(|hv| rms_norm(hv, norm, self.eps)),
                    QkNorm::None => {}
                }
            }
        }
        if let Some(c) = self.clip_qkv {
            for m in [&mut q, &mut k, &mut v] {
                m.mapv_inplace(|x| x.clamp(-c, c));
            }
        }
        // The first `rope.head_dim` values of each head rotate (all of them unless partial).
        let rd = rope.head_dim;
        for (ti, (mut qr, mut kr)) in q.rows_mut().into_iter().zip(k.rows_mut()).enumerate() {
            let qr = qr.as_slice_mut().expect("standard layout");
            qr.chunks_mut(dh).for_each(|hv| rope.apply(&mut hv[..rd], ti));
            let kr = kr.as_slice_mut().expect("standard layout");
            kr.chunks_mut(dh).for_each(|hv| rope.apply(&mut hv[..rd], ti));
        }

        debug_assert_eq!(kv.k.len() / (self.kv_heads * dh), positions[0]);
        if kv.reserve > 0 {
            let want = kv.reserve.saturating_mul(self.kv_heads * dh);
            for m in [&mut kv.k, &mut kv.v] {
                if want > m.capacity() {
                    m.reserve_exact(want - m.len());
                }
            }
            kv.reserve = 0;
        }
        kv.k.extend_from_slice(k.as_slice().expect("standard layout"));
        kv.v.extend_from_slice(v.as_slice().expect("standard layout"));

        let out = self.attend(q.as_slice().expect("standard layout"), t, positions, kv); // (T, Hq*Dh)
        let mut out = Array2::from_shape_vec((t, self.heads * dh), out).expect("shape");
        if let Some(gate) = gate {
            out.zip_mut_with(&gate, |o, &g| *o *= crate::kernels::sigmoid(g));
        }
        linear(out.view(), &self.o_proj, self.o_bias.as_deref())
    }

    /// Softmax(q·kᵀ/√Dh)·v per head over the causal (and, if set, sliding) window.
    fn attend(&self, q: &[f32], t: usize, positions: &[usize], kv: &LayerKv) -> Vec<f32> {
        let dh = self.head_dim;
        let (hq, hkv) = (self.heads, self.kv_heads);
        let group = hq / hkv;
        let kvw = hkv * dh;
        let scale = 1.0 / (dh as f32).sqrt();
        let head = |h: usize| -> Vec<f32> {
            let kh = h / group;
            let mut out = vec![0.0f32; t * dh];
            let mut scores = Vec::new();
            for ti in 0..t {
                let p = positions[ti];
                let lo = self.sliding_window.map_or(0, |w| (p + 1).saturating_sub(w));
                let qv = &q[ti * hq * dh + h * dh..][..dh];
                scores.clear();
                scores.extend((lo..=p).map(|s| {
                    let kvec = &kv.k[s * kvw + kh * dh..][..dh];
                    crate::kernels::dot(qv, kvec) * scale
                }));
                match &self.sinks {
                    Some(sinks) => softmax_with_sink(&mut scores, sinks[h]),
                    None => softmax(&mut scores),
                }
                let o = &mut out[ti * dh..(ti + 1) * dh];
                for (s, &a) in (lo..=p).zip(&scores) {
                    let vvec = &kv.v[s * kvw + kh * dh..][..dh];
                    for (oo, vv) in o.iter_mut().zip(vvec) {
                        *oo += a * vv;
                    }
                }
            }
            out
        };
        heads_to_rows(hq, t, dh, t * (positions[t - 1] + 1) * dh, head)
    }
}

/// Runs `head(h)` for each of `hq` heads — in parallel when `work` (per head) makes it worth
/// it — each giving its `[T, d]` output, and lays them out as rows `[T, hq·d]`.
pub(crate) fn heads_to_rows(
    hq: usize,
    t: usize,
    d: usize,
    work: usize,
    head: impl Fn(usize) -> Vec<f32> + Sync + Send,
) -> Vec<f32> {
    let per_head: Vec<Vec<f32>> = if work * hq >= 1 << 16 {
        (0..hq).into_par_iter().map(head).collect()
    } else {
        (0..hq).map(head).collect()
    };
    let mut out = vec![0.0f32; t * hq * d];
    for (h, ho) in per_head.iter().enumerate() {
        for ti in 0..t {
            out[ti * hq * d + h * d..][..d].copy_from_slice(&ho[ti * d..(ti + 1) * d]);
        }
    }
    out
}

/// Softmax over `scores` and one more logit, `sink`, whose share is dropped (gpt_oss's
/// attention sinks, as transformers' eager attention computes them): the weights then sum to
/// less than one.
fn softmax_with_sink(scores: &mut [f32], sink: f32) {
    let max = scores.iter().copied().fold(sink, f32::max);
    let mut sum = (sink - max).exp();
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    scores.iter_mut().for_each(|s| *s /= sum);
}

/// An RMSNorm weight as the kernels use it: zero-centred norms (qwen3_next) scale by
/// `1 + weight`, computed in f32 as transformers does.
pub fn norm_weight(cfg: &ModelConfig, mut w: Vec<f32>) -> Vec<f32> {
    if cfg.norm_zero_centred {
        w.iter_mut().for_each(|v| *v += 1.0);
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sink_takes_its_share_of_the_softmax() {
        let mut s = vec![1.0f32, 2.0];
        softmax_with_sink(&mut s, 0.5);
        let z = 1f32.exp() + 2f32.exp() + 0.5f32.exp();
        assert!((s[0] - 1f32.exp() / z).abs() < 1e-7 && (s[1] - 2f32.exp() / z).abs() < 1e-7);
        // A very low sink leaves the plain softmax.
        let mut s = vec![1.0f32, 2.0];
        softmax_with_sink(&mut s, -1e30);
        assert!((s[0] + s[1] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn truncate_cuts_attention_keys_but_not_a_recurrent_state() {
        let mut c = KvCache::new(2);
        c.len = 3;
        for l in &mut c.layers {
            l.k = (0..12).map(|x| x as f32).collect(); // 3 positions of width 4
            l.v = (0..6).map(|x| x as f32).collect(); // 3 positions of width 2
        }
        assert!(c.truncate(3));
        assert!(!c.truncate(4));
        assert!(c.truncate(1));
        assert_eq!(
            (c.len, c.layers[1].k.len(), c.layers[1].v.as_slice()),
            (1, 4, &[0.0, 1.0][..])
        );
        let mut r = KvCache::new(1);
        r.len = 2;
        r.layers[0].state = vec![1.0; 8];
        assert!(!r.truncate(1));
        assert_eq!(r.len, 2);
    }
}
