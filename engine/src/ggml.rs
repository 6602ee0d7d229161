//! llama.cpp's block-quantised tensor types, as GGUF files store them: each row of a matrix is
//! a run of blocks, each block a few f16 (or E8M0) scales and the packed values of 32 inputs
//! (`Q4_0` … `Q8_0`, `MXFP4`) or 256 inputs in sub-blocks with quantised scales (the "K"
//! types `Q2_K` … `Q6_K`).
//!
//! The layouts and formulas are those of ggml's `ggml-common.h` and its reference
//! dequantisation (the format's definition); this is our own code for them. Matmuls over a
//! block type round the activations to 8-bit blocks and sum integer products, as llama.cpp
//! does ([`dot`]); dequantisation to f32 serves embedding rows and the tests.

use half::f16;

pub mod dot;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;

/// Values per block of the K types.
pub const QK_K: usize = 256;

/// A ggml block type the engine computes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum BlockType {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    /// 4-bit values through a fixed non-uniform table (llama.cpp's fallback for Q2_K/Q3_K on
    /// rows that are not whole 256-value blocks).
    IQ4_NL,
    MXFP4,
    /// An f16 matrix in a GGUF file: llama.cpp rounds the activations to f16 for it (unlike a
    /// safetensors f16 matrix, computed as transformers does, on f32 activations).
    F16,
    /// A bf16 matrix in a GGUF file: activations rounded to bf16, as llama.cpp does.
    BF16,
}

impl BlockType {
    /// Every type, in ggml's order of type ids.
    pub const ALL: [BlockType; 14] = [
        BlockType::Q4_0,
        BlockType::Q4_1,
        BlockType::Q5_0,
        BlockType::Q5_1,
        BlockType::Q8_0,
        BlockType::Q2_K,
        BlockType::Q3_K,
        BlockType::Q4_K,
        BlockType::Q5_K,
        BlockType::Q6_K,
        BlockType::IQ4_NL,
        BlockType::MXFP4,
        BlockType::F16,
        BlockType::BF16,
    ];

    /// The type of ggml's name for it (`Q4_K`), if the engine computes with it.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Whether values are stored as floats (F16, BF16): computed by the float tile kernel on
    /// activations rounded to the same type, not by integer dot products.
    pub fn is_float(self) -> bool {
        matches!(self, BlockType::F16 | BlockType::BF16)
    }

    /// ggml's name.
    pub fn name(self) -> &'static str {
        match self {
            BlockType::Q4_0 => "Q4_0",
            BlockType::Q4_1 => "Q4_1",
            BlockType::Q5_0 => "Q5_0",
            BlockType::Q5_1 => "Q5_1",
            BlockType::Q8_0 => "Q8_0",
            BlockType::Q2_K => "Q2_K",
            BlockType::Q3_K => "Q3_K",
            BlockType::Q4_K => "Q4_K",
            BlockType::Q5_K => "Q5_K",
            BlockType::Q6_K => "Q6_K",
            BlockType::IQ4_NL => "IQ4_NL",
            BlockType::MXFP4 => "MXFP4",
            BlockType::F16 => "F16",
            BlockType::BF16 => "BF16",
        }
    }

    /// Values per block.
    pub fn block_values(self) -> usize {
        match self {
            BlockType::Q2_K | BlockType::Q3_K | BlockType::Q4_K | BlockType::Q5_K | BlockType::Q6_K => QK_K,
            BlockType::F16 | BlockType::BF16 => 1,
            _ => 32,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            BlockType::Q4_0 | BlockType::IQ4_NL => 2 + 16,
            BlockType::Q4_1 => 2 + 2 + 16,
            BlockType::Q5_0 => 2 + 4 + 16,
            BlockType::Q5_1 => 2 + 2 + 4 + 16,
            BlockType::Q8_0 => 2 + 32,
            BlockType::Q2_K => 16 + 64 + 2 + 2,
            BlockType::Q3_K => 32 + 64 + 12 + 2,
            BlockType::Q4_K => 2 + 2 + 12 + 128,
            BlockType::Q5_K => 2 + 2 + 12 + 32 + 128,
            BlockType::Q6_K => 128 + 64 + 16 + 2,
            BlockType::MXFP4 => 1 + 16,
            BlockType::F16 | BlockType::BF16 => 2,
        }
    }

    /// Bytes of a row of `k` values (`k` a multiple of the block size).
    pub fn row_bytes(self, k: usize) -> usize {
        k / self.block_values() * self.block_bytes()
    }

    /// Byte offsets, within a block, of its f16 scale fields (checked for NaN and infinity).
    fn f16_fields(self) -> &'static [usize] {
        match self {
            BlockType::Q4_0 | BlockType::Q5_0 | BlockType::Q8_0 | BlockType::IQ4_NL | BlockType::F16 => &[0],
            BlockType::Q4_1 | BlockType::Q5_1 | BlockType::Q4_K | BlockType::Q5_K => &[0, 2],
            BlockType::Q2_K => &[80, 82],
            BlockType::Q3_K => &[108],
            BlockType::Q6_K => &[208],
            BlockType::MXFP4 | BlockType::BF16 => &[],
        }
    }

    /// The index of the first block whose f16 scales hold NaN or infinity (an E8M0 exponent
    /// of 0xFF, for MXFP4), if any.
    pub fn first_non_finite_block(self, bytes: &[u8]) -> Option<usize> {
        let fields = self.f16_fields();
        bytes.chunks_exact(self.block_bytes()).position(|b| {
            match self {
                BlockType::MXFP4 => return b[0] == 0xFF,
                BlockType::BF16 => return u16::from_le_bytes([b[0], b[1]]) & 0x7f80 == 0x7f80,
                _ => {}
            }
            fields
                .iter()
                .any(|&o| u16::from_le_bytes([b[o], b[o + 1]]) & 0x7c00 == 0x7c00)
        })
    }

    /// Dequantises one block (`block.len() == block_bytes`, `out.len() == block_values`).
    #[inline(always)]
    pub fn dequantize_block(self, block: &[u8], out: &mut [f32]) {
        debug_assert_eq!(block.len(), self.block_bytes());
        debug_assert_eq!(out.len(), self.block_values());
        match self {
            BlockType::Q4_0 => q4_0(block, out),
            BlockType::Q4_1 => q4_1(block, out),
            BlockType::Q5_0 => q5_0(block, out),
            BlockType::Q5_1 => q5_1(block, out),
            BlockType::Q8_0 => q8_0(block, out),
            BlockType::Q2_K => q2_k(block, out),
            BlockType::Q3_K => q3_k(block, out),
            BlockType::Q4_K => q4_k(block, out),
            BlockType::Q5_K => q5_k(block, out),
            BlockType::Q6_K => q6_k(block, out),
            BlockType::MXFP4 => mxfp4(block, out),
            BlockType::IQ4_NL => iq4_nl(block, out),
            BlockType::F16 => out[0] = half(block, 0),
            BlockType::BF16 => {
                out[0] = f32::from_bits(u32::from(u16::from_le_bytes([block[0], block[1]])) << 16)
            }
        }
    }

    /// Dequantises whole blocks: `bytes` holds `out.len() / block_values` blocks. The same
    /// scalar code compiled for the vector instructions the tile kernel uses (the compiler
    /// vectorises it there); the values are the same whatever the instructions.
    pub fn dequantize(self, bytes: &[u8], out: &mut [f32]) {
        assert_eq!(bytes.len() / self.block_bytes(), out.len() / self.block_values());
        #[cfg(target_arch = "x86_64")]
        match crate::kernels::Simd::detected() {
            // SAFETY (both): the CPU has the instructions (Simd::detected never says more).
            crate::kernels::Simd::Avx512 => return unsafe { dequantize_avx512(self, bytes, out) },
            crate::kernels::Simd::Avx2 => return unsafe { dequantize_avx2(self, bytes, out) },
            crate::kernels::Simd::Portable => {}
        }
        dequantize_blocks(self, bytes, out)
    }

    /// `Σ row·x` for one row of `x.len()` values stored as blocks in `row`.
    pub fn dot_row(self, row: &[u8], x: &[f32]) -> f32 {
        let (bv, bb) = (self.block_values(), self.block_bytes());
        let mut buf = [0.0f32; QK_K];
        let mut sum = 0.0f32;
        for (b, xs) in row.chunks_exact(bb).zip(x.chunks_exact(bv)) {
            self.dequantize_block(b, &mut buf[..bv]);
            sum += crate::kernels::dot(&buf[..bv], xs);
        }
        sum
    }
}

/// Each of `t` tokens' activations (`x` is `[t, k]`) in `ty`'s activation format.
pub fn quantize_tokens(ty: BlockType, x: &[f32], t: usize, k: usize) -> Vec<dot::Acts> {
    (0..t)
        .map(|i| {
            let mut a = dot::Acts::default();
            dot::quantize_acts(ty.act_format(), &x[i * k..(i + 1) * k], &mut a);
            a
        })
        .collect()
}

/// `out[r * t + i] = row r · token i` for `rows` rows of `ty` blocks in `w` and the tokens'
/// rounded activations `acts` (`t = acts.len()`).
pub fn dot_rows(ty: BlockType, w: &[u8], rows: usize, k: usize, acts: &[dot::Acts], out: &mut [f32]) {
    let (t, rb) = (acts.len(), ty.row_bytes(k));
    // The vector kernels for the level the tile kernel runs at (`SHADOWMOE_SIMD` lowers both).
    #[cfg(target_arch = "x86_64")]
    {
        use crate::kernels::Simd;
        let done = match Simd::detected() {
            // SAFETY (both): supported() says the CPU has the instructions.
            Simd::Avx512 if x86::avx512::supported() => unsafe {
                x86::avx512::dot_rows(ty, w, rows, rb, acts, out)
            },
            Simd::Avx512 | Simd::Avx2 if x86::avx2::supported() => unsafe {
                x86::avx2::dot_rows(ty, w, rows, rb, acts, out)
            },
            _ => false,
        };
        if done {
            return;
        }
    }
    for r in 0..rows {
        let row = &w[r * rb..(r + 1) * rb];
        for (i, a) in acts.iter().enumerate() {
            out[r * t + i] = dot::dot_scalar(ty, row, a);
        }
    }
}

#[inline(always)]
fn dequantize_blocks(t: BlockType, bytes: &[u8], out: &mut [f32]) {
    let (bv, bb) = (t.block_values(), t.block_bytes());
    for (b, o) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(bv)) {
        t.dequantize_block(b, o);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn dequantize_avx512(t: BlockType, bytes: &[u8], out: &mut [f32]) {
    dequantize_blocks(t, bytes, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dequantize_avx2(t: BlockType, bytes: &[u8], out: &mut [f32]) {
    dequantize_blocks(t, bytes, out)
}

#[inline(always)]
fn half(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

#[inline(always)]
fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

#[inline(always)]
fn q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (half(b, 0), half(b, 2));
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = (qs[j] & 0x0F) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

#[inline(always)]
fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let h0 = ((qh >> j) << 4) & 0x10;
        let h1 = (qh >> (j + 12)) & 0x10;
        y[j] = ((u32::from(qs[j] & 0x0F) | h0) as i32 - 16) as f32 * d;
        y[j + 16] = ((u32::from(qs[j] >> 4) | h1) as i32 - 16) as f32 * d;
    }
}

#[inline(always)]
fn q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (half(b, 0), half(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let h0 = ((qh >> j) << 4) & 0x10;
        let h1 = (qh >> (j + 12)) & 0x10;
        y[j] = (u32::from(qs[j] & 0x0F) | h0) as f32 * d + m;
        y[j + 16] = (u32::from(qs[j] >> 4) | h1) as f32 * d + m;
    }
}

#[inline(always)]
fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    for (o, &q) in y.iter_mut().zip(&b[2..34]) {
        *o = f32::from(q as i8) * d;
    }
}

/// MXFP4's values (twice the FP4 E2M1 values; the scale is halved to match).
pub(crate) const MXFP4_VALUES: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// `2^(e - 128)`: half of the E8M0 scale `2^(e - 127)`, as a float (subnormal for e < 2).
#[inline(always)]
pub(crate) fn e8m0_half(e: u8) -> f32 {
    let bits = if e < 2 {
        0x0020_0000u32 << e
    } else {
        u32::from(e - 1) << 23
    };
    f32::from_bits(bits)
}

/// IQ4_NL's sixteen values.
const IQ4_NL_VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

#[inline(always)]
fn iq4_nl(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = d * f32::from(IQ4_NL_VALUES[(qs[j] & 0x0F) as usize]);
        y[j + 16] = d * f32::from(IQ4_NL_VALUES[(qs[j] >> 4) as usize]);
    }
}

#[inline(always)]
fn mxfp4(b: &[u8], y: &mut [f32]) {
    let d = e8m0_half(b[0]);
    let qs = &b[1..17];
    for j in 0..16 {
        y[j] = f32::from(MXFP4_VALUES[(qs[j] & 0x0F) as usize]) * d;
        y[j + 16] = f32::from(MXFP4_VALUES[(qs[j] >> 4) as usize]) * d;
    }
}

#[inline(always)]
fn q2_k(b: &[u8], y: &mut [f32]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (half(b, 80), half(b, 82));
    let mut is = 0;
    let mut out = 0;
    for half_block in 0..2 {
        let q = &qs[half_block * 32..half_block * 32 + 32];
        for shift in [0, 2, 4, 6] {
            for part in 0..2 {
                let sc = scales[is];
                is += 1;
                let (dl, ml) = (d * f32::from(sc & 0x0F), dmin * f32::from(sc >> 4));
                for &ql in &q[part * 16..part * 16 + 16] {
                    y[out] = dl * f32::from((ql >> shift) & 3) - ml;
                    out += 1;
                }
            }
        }
    }
}

/// Q3_K's sixteen 6-bit scales from their 12 packed bytes (low 4 bits in bytes 0–7, high 2
/// bits in bytes 8–11), offset by 32.
#[inline(always)]
fn q3_k_scales(packed: &[u8]) -> [i8; 16] {
    let mut s = [0i8; 16];
    for (i, v) in s.iter_mut().enumerate() {
        let low = if i < 8 {
            packed[i] & 0x0F
        } else {
            packed[i - 8] >> 4
        };
        let high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
        *v = ((low | (high << 4)) as i8).wrapping_sub(32);
    }
    s
}

#[inline(always)]
fn q3_k(b: &[u8], y: &mut [f32]) {
    let (hmask, qs) = (&b[0..32], &b[32..96]);
    let scales = q3_k_scales(&b[96..108]);
    let d = half(b, 108);
    let (mut is, mut m, mut out) = (0, 1u8, 0);
    for half_block in 0..2 {
        let q = &qs[half_block * 32..half_block * 32 + 32];
        for shift in [0, 2, 4, 6] {
            for part in 0..2 {
                let dl = d * f32::from(scales[is]);
                is += 1;
                for l in part * 16..part * 16 + 16 {
                    let low = ((q[l] >> shift) & 3) as i8;
                    let v = low - if hmask[l] & m != 0 { 0 } else { 4 };
                    y[out] = dl * f32::from(v);
                    out += 1;
                }
            }
            m <<= 1;
        }
    }
}

/// Scale and min `j` (of 8) of a Q4_K/Q5_K block's 12 packed 6-bit values.
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

#[inline(always)]
fn q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (half(b, 0), half(b, 2));
    let (scales, qs) = (&b[4..16], &b[16..144]);
    for chunk in 0..4 {
        let q = &qs[chunk * 32..chunk * 32 + 32];
        let (s1, m1) = scale_min_k4(2 * chunk, scales);
        let (s2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, m1) = (d * f32::from(s1), dmin * f32::from(m1));
        let (d2, m2) = (d * f32::from(s2), dmin * f32::from(m2));
        let y = &mut y[chunk * 64..chunk * 64 + 64];
        for l in 0..32 {
            y[l] = d1 * f32::from(q[l] & 0x0F) - m1;
            y[l + 32] = d2 * f32::from(q[l] >> 4) - m2;
        }
    }
}

#[inline(always)]
fn q5_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (half(b, 0), half(b, 2));
    let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    for chunk in 0..4 {
        let ql = &qs[chunk * 32..chunk * 32 + 32];
        let (u1, u2) = (1u8 << (2 * chunk), 2u8 << (2 * chunk));
        let (s1, m1) = scale_min_k4(2 * chunk, scales);
        let (s2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, m1) = (d * f32::from(s1), dmin * f32::from(m1));
        let (d2, m2) = (d * f32::from(s2), dmin * f32::from(m2));
        let y = &mut y[chunk * 64..chunk * 64 + 64];
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[l] = d1 * f32::from((ql[l] & 0x0F) + h1) - m1;
            y[l + 32] = d2 * f32::from((ql[l] >> 4) + h2) - m2;
        }
    }
}

#[inline(always)]
fn q6_k(b: &[u8], y: &mut [f32]) {
    let (ql_all, qh_all, sc_all) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = half(b, 208);
    for n in 0..2 {
        let (ql, qh) = (&ql_all[n * 64..n * 64 + 64], &qh_all[n * 32..n * 32 + 32]);
        let sc = &sc_all[n * 8..n * 8 + 8];
        let y = &mut y[n * 128..n * 128 + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i8 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
            y[l] = d * f32::from(sc[is] as i8) * f32::from(q1);
            y[l + 32] = d * f32::from(sc[is + 2] as i8) * f32::from(q2);
            y[l + 64] = d * f32::from(sc[is + 4] as i8) * f32::from(q3);
            y[l + 96] = d * f32::from(sc[is + 6] as i8) * f32::from(q4);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_ggmls() {
        // ggml's type sizes (bytes per block) and block sizes.
        let want = [
            ("Q4_0", 32, 18),
            ("Q4_1", 32, 20),
            ("Q5_0", 32, 22),
            ("Q5_1", 32, 24),
            ("Q8_0", 32, 34),
            ("Q2_K", 256, 84),
            ("Q3_K", 256, 110),
            ("Q4_K", 256, 144),
            ("Q5_K", 256, 176),
            ("Q6_K", 256, 210),
            ("MXFP4", 32, 17),
        ];
        for (name, bv, bb) in want {
            let t = BlockType::from_name(name).expect(name);
            assert_eq!((t.block_values(), t.block_bytes()), (bv, bb), "{name}");
        }
    }

    #[test]
    fn q8_0_is_scale_times_value_and_a_nan_scale_is_found() {
        let mut b = vec![0u8; 34];
        b[..2].copy_from_slice(&f16::from_f32(0.5).to_bits().to_le_bytes());
        for (i, v) in b[2..].iter_mut().enumerate() {
            *v = (i as i8 - 16) as u8;
        }
        let mut y = [0.0; 32];
        BlockType::Q8_0.dequantize_block(&b, &mut y);
        assert!(y.iter().enumerate().all(|(i, v)| *v == (i as f32 - 16.0) * 0.5));
        let x: Vec<f32> = (0..32).map(|i| i as f32).collect();
        let want: f32 = y.iter().zip(&x).map(|(a, b)| a * b).sum();
        assert!((BlockType::Q8_0.dot_row(&b, &x) - want).abs() < 1e-3);
        assert_eq!(BlockType::Q8_0.first_non_finite_block(&b), None);
        let mut two = b.clone();
        two.extend_from_slice(&b);
        two[34..36].copy_from_slice(&f16::NAN.to_bits().to_le_bytes());
        assert_eq!(BlockType::Q8_0.first_non_finite_block(&two), Some(1));
    }
}
