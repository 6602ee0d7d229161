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
use crate::kernels::{linear, linear_mxfp4, sigmoid};
use crate::moe::{ExpertBiases, ExpertWeights, moe_prefix};
use crate::weights::{AlignedBytes, DType, Weight, WeightIndex};

/// Values per MXFP4 block, and packed bytes per block.
const BLOCK: usize = 32;
const PACKED: usize = 16;

/// `down(clamped_swiglu(gate(x) + b_g, up(x) + b_u)) + b_d` for `x` of `[T, H]`.
pub fn expert_forward(w: &ExpertWeights, b: &ExpertBiases, x: ArrayView2<'_, f32>) -> Array2<f32> {
    let ClampedSwiglu { alpha, limit, ggml } = b.swiglu;
    // GGUF files: as llama.cpp computes them; the hub's: on f32 activations.
    let expert_linear = |x: ArrayView2<'_, f32>, w: &Weight, bias: &[f32]| {
        if ggml {
            linear(x, w, Some(bias))
        } else {
            expert_linear(x, w, bias)
        }
    };
    let mut g = expert_linear(x, &w.gate, &b.gate.to_f32_vec()); // (T, I)
    let u = expert_linear(x, &w.up, &b.up.to_f32_vec()); // (T, I)
    g.zip_mut_with(&u, |g, &u| {
        let gate = g.min(limit);
        let up = u.clamp(-limit, limit);
        *g = (up + 1.0) * gate * sigmoid(gate * alpha);
    });
    expert_linear(g.view(), &w.down, &b.down.to_f32_vec()) // (T, H)
}

/// `x · wᵀ + bias` (`[T, K]` by `[N, K]`) for the hub's experts: MXFP4 matrices on their blocks
/// with the activations in f32 ([`linear_mxfp4`]: each weight exactly its dequantised value, an
/// E2M1 value × 2^e), which is transformers' arithmetic on the dequantised weights; ggml's
/// kernel would first round the activations to Q8_0, as llama.cpp does, and move this fixture's
/// logits by 0.55 (measured). Float matrices go through [`linear`].
fn expert_linear(x: ArrayView2<'_, f32>, w: &Weight, bias: &[f32]) -> Array2<f32> {
    match w.dtype() {
        DType::Block(BlockType::MXFP4) => linear_mxfp4(x, w, Some(bias)),
        _ => linear(x, w, Some(bias)),
    }
}

/// Where one tensor of an expert lies in the checkpoint's files, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawPiece {
    pub file: usize,
    pub offset: u64,
    pub len: u64,
}

/// How an expert's matrices are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawKind {
    /// transformers' float parameters, in this dtype.
    Float(DType),
    /// The hub's MXFP4 blocks and scales.
    Mxfp4,
}

/// One expert's tensors as the checkpoint stores them (slices of the stacked tensors), before
/// rearranging. `pieces`: float — `gate_up_proj` `[H, 2I]`, `down_proj` `[I, H]`; MXFP4 —
/// `gate_up_proj_blocks`, `gate_up_proj_scales`, `down_proj_blocks`, `down_proj_scales`;
/// then both biases, `gate_up_proj_bias` `[2I]` and `down_proj_bias` `[H]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RawExpert {
    pub kind: RawKind,
    pub bias_dtype: DType,
    pub hidden: usize,
    pub width: usize,
    pub pieces: Vec<RawPiece>,
}

/// An expert in the engine's layout: gate and up `[I, H]`, down `[H, I]` (float, or ggml's
/// `block_mxfp4` rows), and the three bias vectors.
#[derive(Debug, Clone, PartialEq)]
pub struct Rearranged {
    pub mat_dtype: DType,
    pub bias_dtype: DType,
    /// gate, up, down, gate bias, up bias, down bias.
    pub bytes: [Vec<u8>; 6],
}

impl RawExpert {
    /// The matrices' dtype once rearranged.
    pub fn mat_dtype(&self) -> DType {
        match self.kind {
            RawKind::Float(d) => d,
            RawKind::Mxfp4 => DType::Block(BlockType::MXFP4),
        }
    }

    /// Shapes of gate, up, down, gate bias, up bias, down bias once rearranged.
    pub fn shapes(&self) -> [[usize; 2]; 6] {
        let (h, i) = (self.hidden, self.width);
        [[i, h], [i, h], [h, i], [1, i], [1, i], [1, h]]
    }

    /// The float pieces as stored (`(name, index into pieces, dtype)`), for the finiteness
    /// check before rearranging.
    pub fn float_pieces(&self) -> Vec<(&'static str, usize, DType)> {
        let mut out = match self.kind {
            RawKind::Float(d) => vec![("gate_up_proj", 0, d), ("down_proj", 1, d)],
            RawKind::Mxfp4 => vec![],
        };
        let b = self.pieces.len() - 2;
        out.push(("gate_up_proj_bias", b, self.bias_dtype));
        out.push(("down_proj_bias", b + 1, self.bias_dtype));
        out
    }

    /// Rearranges the stored bytes (`bytes[k]` = piece `k`'s) into the engine's layout: float
    /// matrices transposed and gate/up de-interleaved; MXFP4 rows repacked into ggml's
    /// `block_mxfp4` (the E8M0 scale byte, then 16 bytes holding value `j` in the low nibble of
    /// byte `j` and value `j + 16` in its high nibble), gate and up from alternate rows.
    pub fn rearrange(&self, bytes: &[&[u8]]) -> Rearranged {
        let (h, i) = (self.hidden, self.width);
        let [gate, up, down] = match self.kind {
            RawKind::Float(d) => {
                let s = d.size();
                let el = |src: &[u8], k: usize| -> [u8; 4] {
                    let mut v = [0u8; 4];
                    v[..s].copy_from_slice(&src[k * s..(k + 1) * s]);
                    v
                };
                let gu = bytes[0]; // [H, 2I]
                let pick = |parity: usize| -> Vec<u8> {
                    let mut out = Vec::with_capacity(i * h * s);
                    for j in 0..i {
                        for k in 0..h {
                            out.extend_from_slice(&el(gu, k * 2 * i + 2 * j + parity)[..s]);
                        }
                    }
                    out
                };
                let dn = bytes[1]; // [I, H]
                let mut down = Vec::with_capacity(h * i * s);
                for o in 0..h {
                    for j in 0..i {
                        down.extend_from_slice(&el(dn, j * h + o)[..s]);
                    }
                }
                [pick(0), pick(1), down]
            }
            RawKind::Mxfp4 => {
                let (gb, hb) = (h / BLOCK, i / BLOCK);
                // `rows` of a matrix of `blocks` blocks a row, in ggml's layout.
                let repack =
                    |data: &[u8], scales: &[u8], blocks: usize, rows: &mut dyn Iterator<Item = usize>| {
                        let mut out = Vec::new();
                        for r in rows {
                            for b in 0..blocks {
                                let at = r * blocks + b;
                                out.push(scales[at]);
                                out.extend(ggml_qs(&data[at * PACKED..(at + 1) * PACKED]));
                            }
                        }
                        out
                    };
                [
                    repack(bytes[0], bytes[1], gb, &mut (0..i).map(|j| 2 * j)),
                    repack(bytes[0], bytes[1], gb, &mut (0..i).map(|j| 2 * j + 1)),
                    repack(bytes[2], bytes[3], hb, &mut (0..h)),
                ]
            }
        };
        let s = self.bias_dtype.size();
        let b = self.pieces.len() - 2;
        let gu = bytes[b];
        let alternate = |parity: usize| -> Vec<u8> {
            gu.chunks(s)
                .skip(parity)
                .step_by(2)
                .flat_map(|v| v.iter().copied())
                .collect()
        };
        Rearranged {
            mat_dtype: self.mat_dtype(),
            bias_dtype: self.bias_dtype,
            bytes: [gate, up, down, alternate(0), alternate(1), bytes[b + 1].to_vec()],
        }
    }
}

impl Rearranged {
    /// The expert over its own copies of the bytes.
    pub fn into_weights(self, raw: &RawExpert, swiglu: ClampedSwiglu) -> ExpertWeights {
        let shapes = raw.shapes();
        let [g, u, d, gb, ub, db] = self.bytes;
        let own = |bytes: Vec<u8>, dtype: DType, shape: [usize; 2]| {
            Weight::new(
                Arc::new(AlignedBytes::copy_from(&bytes)),
                0,
                dtype,
                shape.to_vec(),
            )
        };
        ExpertWeights {
            gate: own(g, self.mat_dtype, shapes[0]),
            up: own(u, self.mat_dtype, shapes[1]),
            down: own(d, self.mat_dtype, shapes[2]),
            biases: Some(Box::new(ExpertBiases {
                gate: own(gb, self.bias_dtype, shapes[3]),
                up: own(ub, self.bias_dtype, shapes[4]),
                down: own(db, self.bias_dtype, shapes[5]),
                swiglu,
            })),
        }
    }
}

/// Where expert `e` of layer `l` lies in the checkpoint (see [`RawExpert`]); shapes checked
/// against the config.
pub fn raw_expert(cfg: &ModelConfig, w: &WeightIndex, l: usize, e: usize) -> Result<RawExpert> {
    let (h, i, n) = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts);
    let p = format!("{}experts.", moe_prefix(cfg, w, l));
    // Element `e`'s slice of a stacked tensor of `per` bytes an expert.
    let slice = |file: usize, offset: usize, per: usize| RawPiece {
        file,
        offset: (offset + e * per) as u64,
        len: per as u64,
    };
    let mut pieces = Vec::with_capacity(6);
    let kind = if w.contains(&format!("{p}gate_up_proj")) {
        let gu = w.entry_checked(&format!("{p}gate_up_proj"), &[n, h, 2 * i])?;
        let dn = w.entry_checked(&format!("{p}down_proj"), &[n, i, h])?;
        pieces.push(slice(gu.file, gu.offset, h * 2 * i * gu.dtype.size()));
        pieces.push(slice(dn.file, dn.offset, i * h * dn.dtype.size()));
        if dn.dtype != gu.dtype {
            return Err(EngineError::Tensor {
                path: w.file_path(dn.file).to_path_buf(),
                tensor: format!("{p}down_proj"),
                message: format!(
                    "dtype {} differs from gate_up_proj's {}",
                    dn.dtype.name(),
                    gu.dtype.name()
                ),
            });
        }
        RawKind::Float(gu.dtype)
    } else {
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
        for (name, shape) in [
            ("gate_up_proj_blocks", vec![n, 2 * i, gb, PACKED]),
            ("gate_up_proj_scales", vec![n, 2 * i, gb]),
            ("down_proj_blocks", vec![n, h, hb, PACKED]),
            ("down_proj_scales", vec![n, h, hb]),
        ] {
            let (file, offset, _) = w.u8_checked(&format!("{p}{name}"), &shape)?;
            pieces.push(slice(file, offset, shape[1..].iter().product()));
        }
        RawKind::Mxfp4
    };
    let bias_gu = w.entry_checked(&format!("{p}gate_up_proj_bias"), &[n, 2 * i])?;
    let bias_dn = w.entry_checked(&format!("{p}down_proj_bias"), &[n, h])?;
    if bias_dn.dtype != bias_gu.dtype {
        return Err(EngineError::Tensor {
            path: w.file_path(bias_dn.file).to_path_buf(),
            tensor: format!("{p}down_proj_bias"),
            message: format!(
                "dtype {} differs from gate_up_proj_bias's {}",
                bias_dn.dtype.name(),
                bias_gu.dtype.name()
            ),
        });
    }
    pieces.push(slice(bias_gu.file, bias_gu.offset, 2 * i * bias_gu.dtype.size()));
    pieces.push(slice(bias_dn.file, bias_dn.offset, h * bias_dn.dtype.size()));
    Ok(RawExpert {
        kind,
        bias_dtype: bias_gu.dtype,
        hidden: h,
        width: i,
        pieces,
    })
}

/// Expert `e` of layer `l`, rearranged into the engine's layout (see the module docs), over
/// its own memory.
pub fn expert_weights(cfg: &ModelConfig, w: &WeightIndex, l: usize, e: usize) -> Result<ExpertWeights> {
    let swiglu = cfg
        .clamped_swiglu
        .ok_or_else(|| EngineError::invalid("gpt_oss", "config without the clamped SwiGLU"))?;
    let raw = raw_expert(cfg, w, l, e)?;
    let bytes: Vec<&[u8]> = raw
        .pieces
        .iter()
        .map(|p| &w.file_map(p.file)[p.offset as usize..(p.offset + p.len) as usize])
        .collect();
    Ok(raw.rearrange(&bytes).into_weights(&raw, swiglu))
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
                ggml: false,
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
