//! gpt_oss (gpt-oss-20b, gpt-oss-120b): what the family adds to the shared blocks. Its
//! attention is the shared [`Attention`](crate::attention::Attention) with q/k/v/o biases,
//! per-head sinks and sliding windows on alternate layers; its router ranks biased logits and
//! softmaxes the top k ([`Selection::TopKSoftmax`](crate::moe::Selection::TopKSoftmax)). Here:
//! its experts, stored fused with gate and up values interleaved, with biases, in bf16 or as
//! the hub's MXFP4 blocks, and their clamped SwiGLU.
//!
//! Dimensions: `T` = tokens, `H` = hidden, `E` = experts, `I` = expert width.
//!
//! Expert layouts, by tensor name under `model.layers.{l}.mlp.experts.`:
//! - float (transformers' parameters): `gate_up_proj` `[E, H, 2I]` (`x · W`: input-major, gate
//!   and up in alternate columns), `down_proj` `[E, I, H]`;
//! - MXFP4 (the hub checkpoints): `gate_up_proj_blocks` `[E, 2I, H/32, 16]` (u8, two E2M1
//!   values a byte, the even one in the low nibble) with `gate_up_proj_scales` `[E, 2I, H/32]`
//!   (u8 E8M0: the block's values times 2^(s − 127)), gate and up in alternate rows;
//!   `down_proj_blocks` `[E, H, I/32, 16]`, `down_proj_scales` `[E, H, I/32]`;
//! - both: `gate_up_proj_bias` `[E, 2I]` (interleaved likewise), `down_proj_bias` `[E, H]`.
//!
//! An expert is rearranged once, on load, into the engine's `[out, in]` gate, up and down
//! matrices (MXFP4 ones into ggml's `block_mxfp4`, still 4.25 bits a value, computed by
//! [`crate::ggml`]) and its three bias vectors: the in-memory provider, `expert-pack` and the
//! disk tier then see an ordinary expert that carries [`ExpertBiases`].

use std::sync::Arc;

use ndarray::{Array2, ArrayView2};

use crate::config::{ClampedSwiglu, ModelConfig};
use crate::error::{EngineError, Result};
use crate::ggml::BlockType;
use crate::kernels::{linear, sigmoid};
use crate::moe::{ExpertBiases, ExpertWeights, moe_prefix};
use crate::weights::{AlignedBytes, DType, Weight, WeightIndex};

/// Values per MXFP4 block, and packed bytes per block.
const BLOCK: usize = 32;
const PACKED: usize = 16;

/// `down(clamped_swiglu(gate(x) + b_g, up(x) + b_u)) + b_d` for `x` of `[T, H]`.
pub fn expert_forward(w: &ExpertWeights, b: &ExpertBiases, x: ArrayView2<'_, f32>) -> Array2<f32> {
    let ClampedSwiglu { alpha, limit } = b.swiglu;
    let mut g = expert_linear(x, &w.gate, &b.gate.to_f32_vec()); // (T, I)
    let u = expert_linear(x, &w.up, &b.up.to_f32_vec()); // (T, I)
    g.zip_mut_with(&u, |g, &u| {
        let gate = g.min(limit);
        let up = u.clamp(-limit, limit);
        *g = (up + 1.0) * gate * sigmoid(gate * alpha);
    });
    expert_linear(g.view(), &w.down, &b.down.to_f32_vec()) // (T, H)
}

/// `x · wᵀ + bias` (`[T, K]` by `[N, K]`). MXFP4 matrices are computed on their blocks with
/// the activations in f32 — each block dequantised once (exact: E2M1 × 2^e is an f32) and
/// dotted with every token — which is transformers' arithmetic on the dequantised weights;
/// ggml's kernel would first round the activations to Q8_0, as llama.cpp does, and move this
/// fixture's logits by 0.55 (measured). Float matrices go through [`linear`].
fn expert_linear(x: ArrayView2<'_, f32>, w: &Weight, bias: &[f32]) -> Array2<f32> {
    use rayon::prelude::*;
    let DType::Block(ty) = w.dtype() else {
        return linear(x, w, Some(bias));
    };
    let x = x.as_standard_layout();
    let (t, k) = x.dim();
    let n = w.shape()[0];
    let xs = x.as_slice().expect("standard layout");
    let rb = ty.row_bytes(k);
    // yt[r * t + i] = row r · token i.
    let mut yt = vec![0.0f32; n * t];
    let row = |(r, out): (usize, &mut [f32])| {
        let mut deq = vec![0.0f32; k];
        ty.dequantize(&w.bytes()[r * rb..(r + 1) * rb], &mut deq);
        for (i, o) in out.iter_mut().enumerate() {
            *o = crate::kernels::dot(&deq, &xs[i * k..(i + 1) * k]) + bias[r];
        }
    };
    if n * t * k >= 1 << 16 {
        yt.par_chunks_mut(t).enumerate().for_each(row);
    } else {
        yt.chunks_mut(t).enumerate().for_each(row);
    }
    Array2::from_shape_fn((t, n), |(i, r)| yt[r * t + i])
}

/// Expert `e` of layer `l`, rearranged into the engine's layout (see the module docs).
pub fn expert_weights(cfg: &ModelConfig, w: &WeightIndex, l: usize, e: usize) -> Result<ExpertWeights> {
    let (h, i, n) = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts);
    let p = format!("{}experts.", moe_prefix(cfg, w, l));
    let swiglu = cfg
        .clamped_swiglu
        .ok_or_else(|| EngineError::invalid("gpt_oss", "config without the clamped SwiGLU"))?;
    let (gate, up, down) = if w.contains(&format!("{p}gate_up_proj")) {
        float_expert(w, &p, e, [n, h, i])?
    } else {
        mxfp4_expert(w, &p, e, [n, h, i])?
    };
    let bias_gu = w.entry_checked(&format!("{p}gate_up_proj_bias"), &[n, 2 * i])?;
    let bias_dn = w.entry_checked(&format!("{p}down_proj_bias"), &[n, h])?;
    let map = |en: &crate::weights::TensorEntry| &w.file_map(en.file)[en.offset..];
    let gu = elements(map(bias_gu), bias_gu.dtype, e * 2 * i, 2 * i);
    let biases = ExpertBiases {
        gate: owned(
            gu.iter().step_by(2).flat_map(|v| v.iter()).copied().collect(),
            bias_gu.dtype,
            [1, i],
        ),
        up: owned(
            gu.iter()
                .skip(1)
                .step_by(2)
                .flat_map(|v| v.iter())
                .copied()
                .collect(),
            bias_gu.dtype,
            [1, i],
        ),
        down: owned(
            elements(map(bias_dn), bias_dn.dtype, e * h, h).concat(),
            bias_dn.dtype,
            [1, h],
        ),
        swiglu,
    };
    Ok(ExpertWeights {
        gate,
        up,
        down,
        biases: Some(Box::new(biases)),
    })
}

/// `count` elements of `dtype` from element `from` of `bytes`, one slice per element.
fn elements(bytes: &[u8], dtype: DType, from: usize, count: usize) -> Vec<&[u8]> {
    let s = dtype.size();
    bytes[from * s..(from + count) * s].chunks(s).collect()
}

/// A weight over its own copy of `bytes`.
fn owned(bytes: Vec<u8>, dtype: DType, shape: [usize; 2]) -> Weight {
    Weight::new(
        Arc::new(AlignedBytes::copy_from(&bytes)),
        0,
        dtype,
        shape.to_vec(),
    )
}

/// Float experts (`[E, H, 2I]` and `[E, I, H]`): transposed and de-interleaved into gate and
/// up `[I, H]` and down `[H, I]`, in the file's dtype.
fn float_expert(
    w: &WeightIndex,
    p: &str,
    e: usize,
    [n, h, i]: [usize; 3],
) -> Result<(Weight, Weight, Weight)> {
    let gu = w.entry_checked(&format!("{p}gate_up_proj"), &[n, h, 2 * i])?;
    let dn = w.entry_checked(&format!("{p}down_proj"), &[n, i, h])?;
    let el = |en: &crate::weights::TensorEntry, rows: usize, cols: usize| {
        elements(
            &w.file_map(en.file)[en.offset..],
            en.dtype,
            e * rows * cols,
            rows * cols,
        )
    };
    let src = el(gu, h, 2 * i); // [H, 2I]
    let pick = |parity: usize| -> Vec<u8> {
        (0..i)
            .flat_map(|j| (0..h).map(move |k| (j, k)))
            .flat_map(|(j, k)| src[k * 2 * i + 2 * j + parity].iter().copied())
            .collect()
    };
    let gate = owned(pick(0), gu.dtype, [i, h]);
    let up = owned(pick(1), gu.dtype, [i, h]);
    let src = el(dn, i, h); // [I, H]
    let down: Vec<u8> = (0..h)
        .flat_map(|o| (0..i).map(move |j| (o, j)))
        .flat_map(|(o, j)| src[j * h + o].iter().copied())
        .collect();
    Ok((gate, up, owned(down, dn.dtype, [h, i])))
}

/// MXFP4 experts: the rows of gate, up and down repacked into ggml's `block_mxfp4` (the E8M0
/// scale byte, then 16 bytes holding value `j` in the low nibble of byte `j` and value `j + 16`
/// in its high nibble).
fn mxfp4_expert(
    w: &WeightIndex,
    p: &str,
    e: usize,
    [n, h, i]: [usize; 3],
) -> Result<(Weight, Weight, Weight)> {
    for (name, k) in [("gate_up_proj", h), ("down_proj", i)] {
        if !k.is_multiple_of(BLOCK) {
            return Err(EngineError::Tensor {
                path: w.file_path(0).to_path_buf(),
                tensor: format!("{p}{name}_blocks"),
                message: format!("rows of {k} values are not whole MXFP4 blocks of {BLOCK}"),
            });
        }
    }
    let (gb, hb) = (h / BLOCK, i / BLOCK);
    let (_, _, gu_blocks) = w.u8_checked(&format!("{p}gate_up_proj_blocks"), &[n, 2 * i, gb, PACKED])?;
    let (_, _, gu_scales) = w.u8_checked(&format!("{p}gate_up_proj_scales"), &[n, 2 * i, gb])?;
    let (_, _, dn_blocks) = w.u8_checked(&format!("{p}down_proj_blocks"), &[n, h, hb, PACKED])?;
    let (_, _, dn_scales) = w.u8_checked(&format!("{p}down_proj_scales"), &[n, h, hb])?;
    let ty = BlockType::MXFP4;
    // Rows `rows` of expert e (of `per` rows of `blocks` blocks each) in ggml's layout.
    let repack =
        |data: &[u8], scales: &[u8], per: usize, blocks: usize, rows: &mut dyn Iterator<Item = usize>| {
            let mut out = Vec::new();
            for r in rows {
                let row = e * per + r;
                for b in 0..blocks {
                    let at = row * blocks + b;
                    out.push(scales[at]);
                    out.extend(ggml_qs(&data[at * PACKED..(at + 1) * PACKED]));
                }
            }
            out
        };
    let gate = repack(gu_blocks, gu_scales, 2 * i, gb, &mut (0..i).map(|j| 2 * j));
    let up = repack(gu_blocks, gu_scales, 2 * i, gb, &mut (0..i).map(|j| 2 * j + 1));
    let down = repack(dn_blocks, dn_scales, h, hb, &mut (0..h));
    let dt = DType::Block(ty);
    Ok((
        owned(gate, dt, [i, h]),
        owned(up, dt, [i, h]),
        owned(down, dt, [h, i]),
    ))
}

/// One block's 16 packed bytes from the hub's order (value `2m` low, `2m + 1` high in byte
/// `m`, as transformers' `convert_moe_packed_tensors` reads them) into ggml's.
fn ggml_qs(hub: &[u8]) -> [u8; PACKED] {
    let nib = |k: usize| (hub[k / 2] >> (4 * (k % 2))) & 0x0F;
    std::array::from_fn(|j| nib(j) | (nib(j + PACKED) << 4))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The repacked block dequantises, through ggml's MXFP4 code, to what transformers'
    /// `convert_moe_packed_tensors` makes of the hub's bytes: E2M1 value of nibble `2m` low /
    /// `2m + 1` high, times 2^(scale − 127).
    #[test]
    fn repacked_blocks_dequantise_as_transformers_reads_the_hub_bytes() {
        const FP4: [f32; 16] = [
            0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
        ];
        let hub: Vec<u8> = (0..16u8).map(|m| m.wrapping_mul(37).wrapping_add(11)).collect();
        for scale in [120u8, 127, 130] {
            let mut block = vec![scale];
            block.extend(ggml_qs(&hub));
            let mut got = [0f32; 32];
            BlockType::MXFP4.dequantize_block(&block, &mut got);
            for (k, g) in got.iter().enumerate() {
                let nib = (hub[k / 2] >> (4 * (k % 2))) & 0x0F;
                let want = FP4[nib as usize] * 2f32.powi(scale as i32 - 127);
                assert_eq!(*g, want, "value {k} at scale {scale}");
            }
        }
    }

    #[test]
    fn clamped_swiglu_clamps_gate_above_and_up_both_ways() {
        // One expert with H = I = 1: gate = x, up = x, down = 1, no biases.
        let one = |v: f32| Weight::from_f32(&[v], vec![1, 1]);
        let w = ExpertWeights {
            gate: one(1.0),
            up: one(1.0),
            down: one(1.0),
            biases: None,
        };
        let b = ExpertBiases {
            gate: one(0.0),
            up: one(0.0),
            down: one(0.0),
            swiglu: ClampedSwiglu {
                alpha: 1.702,
                limit: 7.0,
            },
        };
        let x = ndarray::array![[2.0f32], [9.0], [-9.0]];
        let y = expert_forward(&w, &b, x.view());
        let f = |g: f32, u: f32| (u + 1.0) * g * sigmoid(1.702 * g);
        for (got, want) in y.iter().zip([f(2.0, 2.0), f(7.0, 7.0), f(-9.0, -7.0)]) {
            assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        }
    }
}
