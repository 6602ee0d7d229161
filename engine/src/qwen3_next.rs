//! qwen3_next's own block: the Gated DeltaNet linear-attention token mixer (Qwen3-Next,
//! Qwen3-Coder-Next). Its gated full-attention layers are [`crate::attention::Attention`] with
//! an output gate and partial rotary; its MoE block (softmax top-k, shared expert with a
//! sigmoid gate) is [`crate::moe::MoeBlock`]; its norms are zero-centred
//! ([`crate::attention::norm_weight`]).
//!
//! Per token, for value head `h` (key head `h / (Hv / Hk)`):
//! ```text
//! q, k, v   = silu(causal_conv1d(in_proj_qkvz(x)))   q, k L2-normalised, q scaled by Dk^-1/2
//! β         = sigmoid(b),  g = -exp(A_log) · softplus(a + dt_bias)   (b, a = in_proj_ba(x))
//! S         = exp(g) · S                                             S: [Dk, Dv] per head
//! S         = S + k ⊗ β (v − Sᵀk)                                    the delta rule
//! o         = Sᵀq;   y = out_proj(rmsnorm(o) · w · silu(z))
//! ```
//! Prefill runs the same recurrence token by token (transformers' chunked form computes the
//! same function), so prefill-then-decode equals one long prefill. The conv inputs and `S`
//! live in the layer's [`LayerKv`].
//!
//! Dimensions: `T` = tokens, `H` = hidden, `Hk`/`Hv` = key/value heads, `Dk`/`Dv` = their
//! widths, `C` = conv channels (`2·Hk·Dk + Hv·Dv`), `K` = conv kernel.

use ndarray::{Array2, ArrayView2};

use crate::attention::LayerKv;
use crate::config::{LinearAttnConfig, ModelConfig};
use crate::error::{EngineError, Result};
use crate::kernels::{linear, sigmoid};
use crate::weights::{Weight, WeightIndex};

/// The projection of the normalised input to the conv inputs (q, k, v) and the gate z.
#[derive(Debug, Clone)]
enum InProj {
    /// Hugging Face's `in_proj_qkvz`: per key head g the rows `[q_g, k_g, v_g, z_g]`.
    Grouped(Weight),
    /// Ungrouped (llama.cpp's `attn_qkv` and `attn_gate`, Qwen3.5's `in_proj_qkv` and
    /// `in_proj_z`): the rows of every q head, every k head, every v head; and of z.
    Split { qkv: Weight, z: Weight },
}

/// Weights and shape of one Gated DeltaNet layer.
#[derive(Debug, Clone)]
pub struct GatedDeltaNet {
    in_proj: InProj,
    in_proj_ba: Weight,
    /// Depthwise kernel, `[C, K]`.
    conv: Vec<f32>,
    dt_bias: Vec<f32>,
    /// `-exp(A_log)`, per value head.
    neg_a: Vec<f32>,
    /// The gated RMSNorm's weight, `[Dv]` (not zero-centred).
    norm: Vec<f32>,
    out_proj: Weight,
    shape: LinearAttnConfig,
    eps: f32,
}

/// transformers' (torch's) softplus: `log(1 + e^x)`, and `x` itself above 20.
fn softplus(x: f32) -> f32 {
    if x > 20.0 { x } else { x.exp().ln_1p() }
}

fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

/// The values of `a` in row-major order.
fn row_major(a: Array2<f32>) -> Vec<f32> {
    if a.is_standard_layout() {
        a.into_raw_vec_and_offset().0
    } else {
        a.iter().copied().collect()
    }
}

/// `x / sqrt(Σx² + 1e-6)` in place (the FLA kernels' L2 norm).
fn l2norm(x: &mut [f32]) {
    let inv = 1.0 / (x.iter().map(|v| v * v).sum::<f32>() + 1e-6).sqrt();
    x.iter_mut().for_each(|v| *v *= inv);
}

impl GatedDeltaNet {
    /// Loads `model.layers.{l}.linear_attn.*`, checking every shape against the config:
    /// `in_proj_qkvz`, or `in_proj_qkv` and `in_proj_z` (a GGUF file's); `A_log`, or the decay
    /// rate `A` = `-exp(A_log)` itself (a GGUF file's `ssm_a`).
    pub fn load(cfg: &ModelConfig, w: &WeightIndex, l: usize) -> Result<Self> {
        let shape = cfg.linear_attn.ok_or_else(|| {
            EngineError::field(
                &cfg.path,
                "layer_types",
                format!("layer {l} is linear attention but the config has no linear_* shape"),
            )
        })?;
        let p = format!("model.layers.{l}.linear_attn.");
        let h = cfg.hidden_size;
        let (kd, vd, nv) = (shape.key_dim(), shape.value_dim(), shape.num_value_heads);
        let vec = |name: &str, dims: &[usize]| -> Result<Vec<f32>> {
            Ok(w.get(&format!("{p}{name}"), dims)?.to_f32_vec())
        };
        let in_proj = if w.contains(&format!("{p}in_proj_qkv.weight")) {
            InProj::Split {
                qkv: w.get(&format!("{p}in_proj_qkv.weight"), &[2 * kd + vd, h])?,
                z: w.get(&format!("{p}in_proj_z.weight"), &[vd, h])?,
            }
        } else {
            InProj::Grouped(w.get(&format!("{p}in_proj_qkvz.weight"), &[2 * kd + 2 * vd, h])?)
        };
        let neg_a = if w.contains(&format!("{p}A")) {
            vec("A", &[nv])?
        } else {
            vec("A_log", &[nv])?.into_iter().map(|a| -a.exp()).collect()
        };
        Ok(Self {
            in_proj,
            in_proj_ba: w.get(&format!("{p}in_proj_ba.weight"), &[2 * nv, h])?,
            // `[C, 1, K]` as transformers stores it, `[C, K, 1]` as mlx_lm does: the same order.
            conv: {
                let (c, k) = (shape.conv_dim(), shape.conv_kernel);
                let mlx = w
                    .entry(&format!("{p}conv1d.weight"))
                    .is_some_and(|e| e.shape == [c, k, 1]);
                vec("conv1d.weight", &if mlx { [c, k, 1] } else { [c, 1, k] })?
            },
            dt_bias: vec("dt_bias", &[nv])?,
            neg_a,
            norm: vec("norm.weight", &[shape.value_head_dim])?,
            out_proj: w.get(&format!("{p}out_proj.weight"), &[h, vd])?,
            shape,
            eps: cfg.rms_norm_eps,
        })
    }

    /// Mixes the `T` rows of `x` (`[T, H]`, already normalised), continuing from the conv
    /// inputs and recurrent state in `kv` and leaving them after the last row.
    pub fn forward(&self, x: ArrayView2<'_, f32>, kv: &mut LayerKv) -> Array2<f32> {
        let t = x.nrows();
        let s = self.shape;
        let (nk, nv, dk, dv) = (
            s.num_key_heads,
            s.num_value_heads,
            s.key_head_dim,
            s.value_head_dim,
        );
        let r = nv / nk; // value heads per key head
        let (kd, vd, c, kernel) = (s.key_dim(), s.value_dim(), s.conv_dim(), s.conv_kernel);
        let ba = linear(x, &self.in_proj_ba, None); // (T, 2·Hv), grouped by key head

        // The conv input is [q (all heads), k (all heads), v (all heads)].
        let (mixed, z) = match &self.in_proj {
            InProj::Split { qkv, z } => (
                row_major(linear(x, qkv, None)), // (T, C)
                row_major(linear(x, z, None)),   // (T, Hv·Dv)
            ),
            InProj::Grouped(w) => {
                // Ungroup: per key head g the projection holds [q_g, k_g, v_g (r heads),
                // z_g (r heads)].
                let qkvz = linear(x, w, None); // (T, 2·kd + 2·vd)
                let group = 2 * dk + 2 * r * dv;
                let mut mixed = vec![0.0f32; t * c];
                let mut z = vec![0.0f32; t * vd];
                for ti in 0..t {
                    let row = qkvz.row(ti);
                    let row = row.as_slice().expect("standard layout");
                    let m = &mut mixed[ti * c..(ti + 1) * c];
                    for g in 0..nk {
                        let src = &row[g * group..(g + 1) * group];
                        m[g * dk..(g + 1) * dk].copy_from_slice(&src[..dk]);
                        m[kd + g * dk..kd + (g + 1) * dk].copy_from_slice(&src[dk..2 * dk]);
                        m[2 * kd + g * r * dv..2 * kd + (g + 1) * r * dv]
                            .copy_from_slice(&src[2 * dk..2 * dk + r * dv]);
                        z[ti * vd + g * r * dv..ti * vd + (g + 1) * r * dv]
                            .copy_from_slice(&src[2 * dk + r * dv..]);
                    }
                }
                (mixed, z)
            }
        };
        let mut b = vec![0.0f32; t * nv];
        let mut a = vec![0.0f32; t * nv];
        for ti in 0..t {
            let row = ba.row(ti);
            let row = row.as_slice().expect("standard layout");
            for g in 0..nk {
                let src = &row[g * 2 * r..(g + 1) * 2 * r];
                b[ti * nv + g * r..ti * nv + (g + 1) * r].copy_from_slice(&src[..r]);
                a[ti * nv + g * r..ti * nv + (g + 1) * r].copy_from_slice(&src[r..]);
            }
        }

        // Causal depthwise conv over [previous K-1 inputs; these T], then silu.
        let hist = kernel - 1;
        if kv.conv.len() != hist * c {
            kv.conv = vec![0.0; hist * c];
        }
        let mut inputs = std::mem::take(&mut kv.conv);
        inputs.extend_from_slice(&mixed); // (K-1+T, C)
        let mut conv_out = vec![0.0f32; t * c];
        for ti in 0..t {
            for ch in 0..c {
                let w = &self.conv[ch * kernel..(ch + 1) * kernel];
                let mut acc = 0.0f32;
                for (j, wj) in w.iter().enumerate() {
                    acc += wj * inputs[(ti + j) * c + ch];
                }
                conv_out[ti * c + ch] = silu(acc);
            }
        }
        kv.conv = inputs[t * c..].to_vec();

        // The gated delta rule, token by token, per value head.
        if kv.state.len() != nv * dk * dv {
            kv.state = vec![0.0; nv * dk * dv];
        }
        let scale = 1.0 / (dk as f32).sqrt();
        let mut core = vec![0.0f32; t * vd]; // (T, Hv·Dv)
        let mut qh = vec![0.0f32; dk];
        let mut kh = vec![0.0f32; dk];
        let mut delta = vec![0.0f32; dv];
        for ti in 0..t {
            let row = &conv_out[ti * c..(ti + 1) * c];
            for h in 0..nv {
                let g = h / r;
                qh.copy_from_slice(&row[g * dk..(g + 1) * dk]);
                kh.copy_from_slice(&row[kd + g * dk..kd + (g + 1) * dk]);
                l2norm(&mut qh);
                l2norm(&mut kh);
                qh.iter_mut().for_each(|v| *v *= scale);
                let v = &row[2 * kd + h * dv..2 * kd + (h + 1) * dv];
                let beta = sigmoid(b[ti * nv + h]);
                let decay = (self.neg_a[h] * softplus(a[ti * nv + h] + self.dt_bias[h])).exp();
                let st = &mut kv.state[h * dk * dv..(h + 1) * dk * dv]; // (Dk, Dv)
                st.iter_mut().for_each(|x| *x *= decay);
                // delta = β (v − Sᵀk)
                delta.copy_from_slice(v);
                for (i, &ki) in kh.iter().enumerate() {
                    for (dj, sij) in delta.iter_mut().zip(&st[i * dv..(i + 1) * dv]) {
                        *dj -= sij * ki;
                    }
                }
                delta.iter_mut().for_each(|d| *d *= beta);
                // S += k ⊗ delta; o = Sᵀq
                let o = &mut core[ti * vd + h * dv..ti * vd + (h + 1) * dv];
                for (i, (&ki, &qi)) in kh.iter().zip(&qh).enumerate() {
                    let srow = &mut st[i * dv..(i + 1) * dv];
                    for ((sij, dj), oj) in srow.iter_mut().zip(&delta).zip(o.iter_mut()) {
                        *sij += ki * dj;
                        *oj += *sij * qi;
                    }
                }
            }
        }

        // Gated RMSNorm per value head: rmsnorm(o) · w · silu(z).
        for (o, zz) in core.chunks_mut(dv).zip(z.chunks(dv)) {
            let ms = o.iter().map(|v| v * v).sum::<f32>() / dv as f32;
            let inv = 1.0 / (ms + self.eps).sqrt();
            for ((ov, wv), zv) in o.iter_mut().zip(&self.norm).zip(zz) {
                *ov = wv * (*ov * inv) * silu(*zv);
            }
        }
        let core = Array2::from_shape_vec((t, vd), core).expect("shape");
        linear(core.view(), &self.out_proj, None)
    }
}
