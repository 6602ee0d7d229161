//! deepseek_v3's multi-head latent attention (MLA), as transformers' `DeepseekV3Attention`
//! computes it (DeepSeek-V3 / R1, Kimi-K2).
//!
//! Queries: `q_a_proj` → RMSNorm → `q_b_proj` (or one `q_proj` when `q_lora_rank` is null),
//! `Dn + Dr` values per head: a non-rotary part, then a rotary part. Keys and values:
//! `kv_a_proj_with_mqa` yields a latent of `R = kv_lora_rank` values (RMS-normalised) and one
//! rotary key of `Dr` values shared by every head; `kv_b_proj` expands the latent into each
//! head's non-rotary key (`Dn`) and value (`Dv`).
//!
//! llama.cpp's GGUF files (`deepseek2`) store `kv_b_proj` split per head into `k_b`
//! (`[Hq, R, Dn]`, the key rows transposed) and `v_b` (`[Hq, Dv, R]`): there the absorption is
//! two matrix products per head, computed as llama.cpp computes them (the activations rounded to
//! each weight's type).
//!
//! The KV cache keeps what transformers' cache keeps: per position the normalised latent
//! (`LayerKv::k`, `[S, R]`) and the rotated shared key (`LayerKv::v`, `[S, Dr]`) — `R + Dr`
//! values per position and layer (576 for DeepSeek-V3, against 40,960 for expanded keys and
//! values). Attention never expands the cache: `kv_b_proj`'s key rows are absorbed into the
//! query (`q_nope · (W_uk c) = (W_ukᵀ q_nope) · c`) and its value rows applied once to the
//! attention-weighted latent (`Σ a_s W_uv c_s = W_uv Σ a_s c_s`). The same function as
//! transformers' expanded form up to f32 summation order.
//!
//! Dimensions: `T` new tokens, `S` cached + new positions, `Hq` heads, `H` hidden, `R`
//! kv_lora_rank, `Dn` qk_nope_head_dim, `Dr` qk_rope_head_dim, `Dv` v_head_dim.

use ndarray::{Array2, ArrayView2};

use crate::attention::{LayerKv, heads_to_rows};
use crate::config::{MlaConfig, ModelConfig};
use crate::error::{EngineError, Result};
use crate::kernels::{dot, linear, rms_norm, rms_norm_rows, softmax};
use crate::rope::RopeTables;
use crate::weights::{Weight, WeightIndex};

/// The epsilon of `q_a_layernorm` and `kv_a_layernorm` in transformers: `DeepseekV3RMSNorm`'s
/// default, not the config's `rms_norm_eps` ([`MlaConfig::latent_norm_eps`]).
pub const LATENT_NORM_EPS: f32 = 1e-6;

/// `kv_b_proj`, as the checkpoint stores it.
#[derive(Debug, Clone)]
enum KvB {
    /// `[Hq·(Dn+Dv), R]`: per head `Dn` key rows, then `Dv` value rows (Hugging Face).
    Joint(Weight),
    /// llama.cpp's split: `k_b` `[Hq, R, Dn]` and `v_b` `[Hq, Dv, R]`.
    Split { k_b: Weight, v_b: Weight },
}

/// How the queries are projected.
#[derive(Debug, Clone)]
enum QueryProj {
    /// `q_proj` `[Hq·(Dn+Dr), H]` (`q_lora_rank: null`).
    Direct(Weight),
    /// `q_a_proj` `[Q, H]` (with a bias under `attention_bias`) → `q_a_layernorm` `[Q]` →
    /// `q_b_proj` `[Hq·(Dn+Dr), Q]`.
    LowRank {
        a: Weight,
        a_bias: Option<Vec<f32>>,
        norm: Vec<f32>,
        b: Weight,
    },
}

/// Weights and shape of one latent-attention block.
#[derive(Debug, Clone)]
pub struct MlaAttention {
    q: QueryProj,
    /// `[R + Dr, H]`.
    kv_a: Weight,
    kv_a_bias: Option<Vec<f32>>,
    /// `[R]`.
    kv_norm: Vec<f32>,
    kv_b: KvB,
    /// `[H, Hq·Dv]`.
    o_proj: Weight,
    o_bias: Option<Vec<f32>>,
    heads: usize,
    shape: MlaConfig,
}

impl MlaAttention {
    /// Loads `model.layers.{l}.self_attn.*`, checking every shape against the config.
    pub fn load(cfg: &ModelConfig, w: &WeightIndex, l: usize) -> Result<Self> {
        let shape = cfg.mla.ok_or_else(|| {
            EngineError::invalid("config", "latent attention without its shape (kv_lora_rank, …)")
        })?;
        let p = format!("model.layers.{l}.self_attn.");
        let (h, heads) = (cfg.hidden_size, cfg.num_attention_heads);
        let (r, dr) = (shape.kv_lora_rank, shape.qk_rope_head_dim);
        let get = |name: &str, dims: &[usize]| w.get(&format!("{p}{name}"), dims);
        let vec = |name: &str, n: usize| -> Result<Vec<f32>> { Ok(get(name, &[n])?.to_f32_vec()) };
        // attention_bias: q_a_proj, kv_a_proj_with_mqa and o_proj carry biases.
        let bias = |name: &str, n: usize| -> Result<Option<Vec<f32>>> {
            if cfg.qkv_bias {
                vec(name, n).map(Some)
            } else {
                Ok(None)
            }
        };
        let q_rows = heads * shape.qk_head_dim();
        let q = match shape.q_lora_rank {
            None => QueryProj::Direct(get("q_proj.weight", &[q_rows, h])?),
            Some(qr) => QueryProj::LowRank {
                a: get("q_a_proj.weight", &[qr, h])?,
                a_bias: bias("q_a_proj.bias", qr)?,
                norm: vec("q_a_layernorm.weight", qr)?,
                b: get("q_b_proj.weight", &[q_rows, qr])?,
            },
        };
        Ok(Self {
            q,
            kv_a: get("kv_a_proj_with_mqa.weight", &[r + dr, h])?,
            kv_a_bias: bias("kv_a_proj_with_mqa.bias", r + dr)?,
            kv_norm: vec("kv_a_layernorm.weight", r)?,
            kv_b: if w.contains(&format!("{p}k_b_proj.weight")) {
                KvB::Split {
                    k_b: get("k_b_proj.weight", &[heads, r, shape.qk_nope_head_dim])?,
                    v_b: get("v_b_proj.weight", &[heads, shape.v_head_dim, r])?,
                }
            } else {
                KvB::Joint(get(
                    "kv_b_proj.weight",
                    &[heads * (shape.qk_nope_head_dim + shape.v_head_dim), r],
                )?)
            },
            o_proj: get("o_proj.weight", &[h, heads * shape.v_head_dim])?,
            o_bias: bias("o_proj.bias", h)?,
            heads,
            shape,
        })
    }

    /// Rotates one rotary part `x` (`Dr` values) at table row `t`. Interleaved pairs are
    /// gathered into halves first, as transformers' `apply_rotary_pos_emb_interleave` returns
    /// them (queries and keys alike, so their dot products are the rotation's).
    fn rotate(&self, x: &mut [f32], rope: &RopeTables, t: usize) {
        if self.shape.rope_interleave {
            let half = x.len() / 2;
            let pairs: Vec<f32> = x.to_vec();
            for i in 0..half {
                x[i] = pairs[2 * i];
                x[half + i] = pairs[2 * i + 1];
            }
        }
        rope.apply(x, t);
    }

    /// Attends the `T` new rows of `x` (`[T, H]`, already normalised) at `positions` to the
    /// cache plus themselves; appends their latents and rotary keys to `kv`. `positions` must
    /// continue the cache: `kv` holds positions `0..positions[0]`.
    pub fn forward(
        &self,
        x: ArrayView2<'_, f32>,
        rope: &RopeTables,
        positions: &[usize],
        kv: &mut LayerKv,
    ) -> Array2<f32> {
        let t = x.nrows();
        let m = &self.shape;
        let (r, dn, dr) = (m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim);
        let dq = m.qk_head_dim();
        let mut q = match &self.q {
            QueryProj::Direct(w) => linear(x, w, None),
            QueryProj::LowRank { a, a_bias, norm, b } => {
                let mut qa = linear(x, a, a_bias.as_deref()); // (T, Q)
                rms_norm_rows(&mut qa, norm, m.latent_norm_eps);
                linear(qa.view(), b, None)
            }
        }; // (T, Hq·(Dn+Dr))
        let ckv = linear(x, &self.kv_a, self.kv_a_bias.as_deref()); // (T, R + Dr)

        debug_assert_eq!(kv.k.len() / r, positions[0]);
        if kv.reserve > 0 {
            for (m, width) in [(&mut kv.k, r), (&mut kv.v, dr)] {
                let want = kv.reserve.saturating_mul(width);
                if want > m.capacity() {
                    m.reserve_exact(want - m.len());
                }
            }
            kv.reserve = 0;
        }
        for ti in 0..t {
            let row = ckv.row(ti);
            let row = row.as_slice().expect("standard layout");
            let mut latent = row[..r].to_vec();
            rms_norm(&mut latent, &self.kv_norm, m.latent_norm_eps);
            kv.k.extend_from_slice(&latent);
            let mut k_rot = row[r..].to_vec();
            self.rotate(&mut k_rot, rope, ti);
            kv.v.extend_from_slice(&k_rot);
            let mut qr = q.row_mut(ti);
            let qr = qr.as_slice_mut().expect("standard layout");
            for hq in qr.chunks_mut(dq) {
                self.rotate(&mut hq[dn..], rope, ti);
            }
        }

        let q = q.as_slice().expect("standard layout");
        let out = self.attend(q, t, positions, kv); // (T, Hq·Dv)
        let out = Array2::from_shape_vec((t, self.heads * m.v_head_dim), out).expect("shape");
        linear(out.view(), &self.o_proj, self.o_bias.as_deref())
    }

    /// Softmax((q_nope·k_nope + q_rot·k_rot)·scale)·v per head over the causal window, with
    /// `kv_b_proj` absorbed: keys and values stay latent.
    fn attend(&self, q: &[f32], t: usize, positions: &[usize], kv: &LayerKv) -> Vec<f32> {
        let m = &self.shape;
        let (r, dn, dr, dv) = (
            m.kv_lora_rank,
            m.qk_nope_head_dim,
            m.qk_rope_head_dim,
            m.v_head_dim,
        );
        let (hq, dq) = (self.heads, m.qk_head_dim());
        let scale = m.softmax_scale;
        let head = |h: usize| -> Vec<f32> {
            // The queries in the latent's space (W_ukᵀ q_nope), `[T, R]`; and what turns an
            // attention-weighted latent into this head's values.
            let (q_lats, w_uv) = match &self.kv_b {
                KvB::Joint(kv_b) => {
                    // This head's key rows `[Dn, R]` and value rows `[Dv, R]`, in f32.
                    let mut w_uk = vec![0.0f32; dn * r];
                    let mut w_uv = vec![0.0f32; dv * r];
                    let base = h * (dn + dv) * r;
                    kv_b.read_f32(base, &mut w_uk);
                    kv_b.read_f32(base + dn * r, &mut w_uv);
                    let mut q_lats = vec![0.0f32; t * r];
                    for (ti, q_lat) in q_lats.chunks_mut(r).enumerate() {
                        let q_nope = &q[ti * hq * dq + h * dq..][..dn];
                        for (j, &qj) in q_nope.iter().enumerate() {
                            for (ql, wk) in q_lat.iter_mut().zip(&w_uk[j * r..(j + 1) * r]) {
                                *ql += qj * wk;
                            }
                        }
                    }
                    (q_lats, Some(w_uv))
                }
                KvB::Split { k_b, .. } => {
                    let q_nope = Array2::from_shape_fn((t, dn), |(ti, j)| q[ti * hq * dq + h * dq + j]);
                    let q_lats = linear(q_nope.view(), &k_b.index(h), None); // (T, R)
                    (q_lats.into_raw_vec_and_offset().0, None)
                }
            };
            let mut o_lats = vec![0.0f32; t * r];
            let mut scores = Vec::new();
            for ti in 0..t {
                let p = positions[ti];
                let q_rot = &q[ti * hq * dq + h * dq + dn..][..dr];
                let q_lat = &q_lats[ti * r..(ti + 1) * r];
                scores.clear();
                scores.extend((0..=p).map(|s| {
                    let latent = &kv.k[s * r..(s + 1) * r];
                    let k_rot = &kv.v[s * dr..(s + 1) * dr];
                    (dot(q_lat, latent) + dot(q_rot, k_rot)) * scale
                }));
                softmax(&mut scores);
                let o_lat = &mut o_lats[ti * r..(ti + 1) * r];
                for (s, &a) in scores.iter().enumerate() {
                    for (o, c) in o_lat.iter_mut().zip(&kv.k[s * r..(s + 1) * r]) {
                        *o += a * c;
                    }
                }
            }
            match (&self.kv_b, w_uv) {
                (_, Some(w_uv)) => {
                    let mut out = vec![0.0f32; t * dv];
                    for (o_lat, out) in o_lats.chunks(r).zip(out.chunks_mut(dv)) {
                        for (i, o) in out.iter_mut().enumerate() {
                            *o = dot(&w_uv[i * r..(i + 1) * r], o_lat);
                        }
                    }
                    out
                }
                (KvB::Split { v_b, .. }, None) => {
                    let o_lats = Array2::from_shape_vec((t, r), o_lats).expect("shape");
                    linear(o_lats.view(), &v_b.index(h), None)
                        .into_raw_vec_and_offset()
                        .0
                }
                (KvB::Joint(_), None) => unreachable!("joint kv_b has its value rows"),
            }
        };
        let work = (t * (positions[t - 1] + 1) + dn + dv) * r;
        heads_to_rows(hq, t, dv, work, head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rope::RopeConfig;

    /// The absorbed attention equals the expanded one (keys and values built per head from the
    /// latent, as transformers builds them) on random weights, for a prefill and then one
    /// decode position, with and without interleaved rotary pairs, with `kv_b_proj` joint (the
    /// Hugging Face layout) and split into llama.cpp's `k_b` / `v_b`.
    #[test]
    fn absorbed_attention_equals_expanded() {
        let (hidden, heads, r, dn, dr, dv) = (16, 3, 8, 6, 4, 5);
        let mut seed = 7u64;
        let mut rnd = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.8
                })
                .collect()
        };
        for (interleave, split) in [(false, false), (true, false), (true, true)] {
            let shape = MlaConfig {
                q_lora_rank: None,
                kv_lora_rank: r,
                qk_nope_head_dim: dn,
                qk_rope_head_dim: dr,
                v_head_dim: dv,
                rope_interleave: interleave,
                softmax_scale: 0.37,
                latent_norm_eps: LATENT_NORM_EPS,
            };
            let w = |rows: usize, cols: usize, rnd: &mut dyn FnMut(usize) -> Vec<f32>| {
                Weight::from_f32(&rnd(rows * cols), vec![rows, cols])
            };
            let q = QueryProj::Direct(w(heads * (dn + dr), hidden, &mut rnd));
            let kv_a = w(r + dr, hidden, &mut rnd);
            let kv_norm: Vec<f32> = rnd(r).iter().map(|v| 1.0 + v).collect();
            let kv_b = rnd(heads * (dn + dv) * r);
            // llama.cpp's split: k_b[h] = this head's key rows transposed, v_b[h] its value rows.
            let kv_b_split = KvB::Split {
                k_b: Weight::from_f32(
                    &(0..heads * r * dn)
                        .map(|x| {
                            let (h, i, j) = (x / (r * dn), x / dn % r, x % dn);
                            kv_b[(h * (dn + dv) + j) * r + i]
                        })
                        .collect::<Vec<f32>>(),
                    vec![heads, r, dn],
                ),
                v_b: Weight::from_f32(
                    &(0..heads * dv * r)
                        .map(|x| {
                            let (h, i, j) = (x / (dv * r), x / r % dv, x % r);
                            kv_b[(h * (dn + dv) + dn + i) * r + j]
                        })
                        .collect::<Vec<f32>>(),
                    vec![heads, dv, r],
                ),
            };
            let att = MlaAttention {
                q,
                kv_a,
                kv_a_bias: None,
                kv_norm,
                kv_b: if split {
                    kv_b_split
                } else {
                    KvB::Joint(Weight::from_f32(&kv_b, vec![heads * (dn + dv), r]))
                },
                o_proj: w(hidden, heads * dv, &mut rnd),
                o_bias: None,
                heads,
                shape,
            };
            let map = serde_json::from_str(r#"{"max_position_embeddings": 64}"#).unwrap();
            let rope_cfg = RopeConfig::from_config(&map, std::path::Path::new("c"), 100.0, dr).unwrap();
            let x = Array2::from_shape_vec((5, hidden), rnd(5 * hidden)).unwrap();

            // Ours: 4 positions, then one more.
            let mut kv = LayerKv::default();
            let pos: Vec<usize> = (0..4).collect();
            let a = att.forward(
                x.slice(ndarray::s![..4, ..]),
                &RopeTables::new(&rope_cfg, &pos),
                &pos,
                &mut kv,
            );
            let b = att.forward(
                x.slice(ndarray::s![4.., ..]),
                &RopeTables::new(&rope_cfg, &[4]),
                &[4],
                &mut kv,
            );
            assert_eq!(
                (kv.k.len(), kv.v.len()),
                (5 * r, 5 * dr),
                "latent and rotary key cached"
            );

            // Expanded: every position's keys and values per head, then plain attention.
            let all: Vec<usize> = (0..5).collect();
            let tables = RopeTables::new(&rope_cfg, &all);
            let QueryProj::Direct(qw) = &att.q else {
                unreachable!()
            };
            let q = linear(x.view(), qw, None);
            let ckv = linear(x.view(), &att.kv_a, None);
            let mut want = Array2::<f32>::zeros((5, heads * dv));
            for h in 0..heads {
                let mut keys = Vec::new();
                let mut values = Vec::new();
                for s in 0..5 {
                    let row = ckv.row(s).to_vec();
                    let mut c = row[..r].to_vec();
                    rms_norm(&mut c, &att.kv_norm, LATENT_NORM_EPS);
                    let mut k_rot = row[r..].to_vec();
                    att.rotate(&mut k_rot, &tables, s);
                    let lin = |row0: usize| -> f32 { (0..r).map(|i| kv_b[row0 * r + i] * c[i]).sum() };
                    let mut k: Vec<f32> = (0..dn).map(|j| lin(h * (dn + dv) + j)).collect();
                    k.extend(k_rot);
                    keys.push(k);
                    values.push((0..dv).map(|j| lin(h * (dn + dv) + dn + j)).collect::<Vec<f32>>());
                }
                for ti in 0..5 {
                    let mut qh = q.row(ti).to_vec()[h * (dn + dr)..(h + 1) * (dn + dr)].to_vec();
                    att.rotate(&mut qh[dn..], &tables, ti);
                    let mut sc: Vec<f32> = (0..=ti).map(|s| dot(&qh, &keys[s]) * 0.37).collect();
                    softmax(&mut sc);
                    for j in 0..dv {
                        let v: f32 = (0..=ti).map(|s| sc[s] * values[s][j]).sum();
                        want[[ti, h * dv + j]] = v;
                    }
                }
            }
            let want = linear(want.view(), &att.o_proj, None);
            for ti in 0..5 {
                let got = if ti < 4 {
                    a.row(ti).to_vec()
                } else {
                    b.row(0).to_vec()
                };
                for (g, w) in got.iter().zip(want.row(ti)) {
                    assert!(
                        (g - w).abs() < 1e-5,
                        "interleave {interleave}, split {split}, token {ti}: {g} vs {w}"
                    );
                }
            }
        }
    }
}
