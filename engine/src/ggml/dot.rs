//! Dot products of block-quantised rows with activations rounded to 8-bit blocks, as llama.cpp
//! computes them: each weight type has its activation format (its `vec_dot_type`: `Q8_0` for
//! the 32-value types, `Q8_1` for those with a min, `Q8_K` for the K types), the integer
//! products of a block are summed exactly, and the block's scales multiply that sum once.
//! Rounding the activations is what makes these files' outputs llama.cpp's (within float
//! summation order); computing in integers is what makes them fast.
//!
//! This file holds the activation formats and a scalar dot product for every type (the
//! reference); `x86.rs` has the vector ones for the common types, tested against these.

use super::{BlockType, QK_K, e8m0_half, half, q3_k_scales, scale_min_k4};

/// Activations of one token in a weight type's activation format.
#[derive(Debug, Clone, Default)]
pub struct Acts {
    /// The rounded values, `k` of them.
    pub q: Vec<i8>,
    /// One scale per block of 32 (`Q8_0`/`Q8_1`: an f16 value, held as f32) or of 256 (`Q8_K`).
    pub d: Vec<f32>,
    /// `Q8_1`: `d · Σq` per block of 32, rounded to f16 (held as f32). `Q8_K`: unused.
    pub s: Vec<f32>,
    /// Σq per 16 values (`Q8_K`), or per 32 (`Q8_0`, for the kernels that need it).
    pub sums: Vec<i32>,
}

/// The activation formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum ActFormat {
    Q8_0,
    Q8_1,
    Q8_K,
}

impl BlockType {
    /// The format activations are rounded to for this weight type.
    pub fn act_format(self) -> ActFormat {
        match self {
            BlockType::Q4_1 | BlockType::Q5_1 => ActFormat::Q8_1,
            BlockType::Q2_K | BlockType::Q3_K | BlockType::Q4_K | BlockType::Q5_K | BlockType::Q6_K => {
                ActFormat::Q8_K
            }
            BlockType::Q4_0 | BlockType::Q5_0 | BlockType::Q8_0 | BlockType::MXFP4 | BlockType::IQ4_NL => {
                ActFormat::Q8_0
            }
            BlockType::F16 | BlockType::BF16 => unreachable!("float blocks are computed by the tile kernel"),
        }
    }
}

/// f32 through f16 and back (round to nearest even), as llama.cpp stores block scales.
#[inline(always)]
fn via_f16(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

/// Round to nearest, ties to even (the rounding of llama.cpp's vectorised quantisers).
#[inline(always)]
fn round_even(v: f32) -> i32 {
    v.round_ties_even() as i32
}

/// `x` (`k` values, `k` a multiple of the format's block) rounded to `format`. The same code
/// compiled for AVX-512 where the CPU has it (its rounding is then one instruction, not a
/// library call); the values are the same.
pub fn quantize_acts(format: ActFormat, x: &[f32], out: &mut Acts) {
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::Simd::detected() == crate::kernels::Simd::Avx512 {
        // SAFETY: Simd::detected says the CPU has AVX-512 (and SSE4.1 with it).
        return unsafe { quantize_acts_avx512(format, x, out) };
    }
    quantize_acts_any(format, x, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,sse4.1,f16c")]
unsafe fn quantize_acts_avx512(format: ActFormat, x: &[f32], out: &mut Acts) {
    quantize_acts_any(format, x, out)
}

#[inline(always)]
fn quantize_acts_any(format: ActFormat, x: &[f32], out: &mut Acts) {
    let k = x.len();
    out.q.clear();
    out.q.resize(k, 0);
    out.d.clear();
    out.s.clear();
    out.sums.clear();
    match format {
        ActFormat::Q8_0 | ActFormat::Q8_1 => {
            for (xs, qs) in x.chunks_exact(32).zip(out.q.chunks_exact_mut(32)) {
                // llama.cpp's vectorised quantiser: d = amax / 127, values x · (127 / amax).
                let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
                let mut sum = 0i32;
                for (q, v) in qs.iter_mut().zip(xs) {
                    *q = round_even(v * id) as i8;
                    sum += i32::from(*q);
                }
                out.d.push(via_f16(d));
                out.sums.push(sum);
                if format == ActFormat::Q8_1 {
                    out.s.push(via_f16(d * sum as f32));
                }
            }
        }
        ActFormat::Q8_K => {
            for (xs, qs) in x.chunks_exact(QK_K).zip(out.q.chunks_exact_mut(QK_K)) {
                // The value of largest magnitude, with its sign.
                let (mut amax, mut max) = (0.0f32, 0.0f32);
                for &v in xs {
                    if v.abs() > amax {
                        amax = v.abs();
                        max = v;
                    }
                }
                if amax == 0.0 {
                    out.d.push(0.0);
                    out.sums.extend([0; QK_K / 16]);
                    continue;
                }
                let iscale = -127.0 / max;
                for (q, v) in qs.iter_mut().zip(xs) {
                    *q = round_even(iscale * v).min(127) as i8;
                }
                for g in qs.chunks_exact(16) {
                    out.sums.push(g.iter().map(|&q| i32::from(q)).sum());
                }
                out.d.push(1.0 / iscale);
            }
        }
    }
}

/// The order a row's block terms are summed in, for every implementation: term `i` goes to
/// lane `i % 8`, each lane sums its terms in block order, and the lanes are added as a tree
/// (this order lets a vector unit add eight blocks at once and still give the scalar sum).
#[derive(Debug, Clone, Copy, Default)]
pub struct Lanes(pub [f32; 8]);

impl Lanes {
    #[inline(always)]
    pub fn add(&mut self, i: usize, term: f32) {
        self.0[i % 8] += term;
    }

    #[inline(always)]
    pub fn total(&self) -> f32 {
        let l = &self.0;
        ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]))
    }
}

/// `row · acts` for one row of `ty` blocks (the scalar reference).
pub fn dot_scalar(ty: BlockType, row: &[u8], a: &Acts) -> f32 {
    let (bb, bv) = (ty.block_bytes(), ty.block_values());
    let mut lanes = Lanes::default();
    for (i, b) in row.chunks_exact(bb).enumerate() {
        let q = &a.q[i * bv..(i + 1) * bv];
        let term = match ty {
            BlockType::Q8_0 => {
                let s: i32 = b[2..34]
                    .iter()
                    .zip(q)
                    .map(|(&w, &x)| i32::from(w as i8) * i32::from(x))
                    .sum();
                s as f32 * (half(b, 0) * a.d[i])
            }
            BlockType::Q4_0 | BlockType::Q5_0 | BlockType::MXFP4 | BlockType::IQ4_NL => {
                let s: i32 = (0..32).map(|j| small_value(ty, b, j) * i32::from(q[j])).sum();
                let scale = if ty == BlockType::MXFP4 {
                    e8m0_half(b[0])
                } else {
                    half(b, 0)
                };
                s as f32 * (scale * a.d[i])
            }
            BlockType::Q4_1 | BlockType::Q5_1 => {
                let s: i32 = (0..32).map(|j| small_value(ty, b, j) * i32::from(q[j])).sum();
                (half(b, 0) * a.d[i]) * s as f32 + half(b, 2) * a.s[i]
            }
            BlockType::Q2_K => q2_k(b, q, a.d[i], &a.sums[i * 16..(i + 1) * 16]),
            BlockType::Q3_K => q3_k(b, q, a.d[i]),
            BlockType::Q4_K => q4_k(b, q, a.d[i], &a.sums[i * 16..(i + 1) * 16]),
            BlockType::Q5_K => q5_k(b, q, a.d[i], &a.sums[i * 16..(i + 1) * 16]),
            BlockType::Q6_K => q6_k(b, q, a.d[i], &a.sums[i * 16..(i + 1) * 16]),
            BlockType::F16 | BlockType::BF16 => unreachable!("float blocks are computed by the tile kernel"),
        };
        lanes.add(i, term);
    }
    lanes.total()
}

/// Value `j` of a 32-value block as the integer its scale multiplies (Q4_0 and Q5_0 centred,
/// Q4_1 and Q5_1 not, MXFP4 from its table).
fn small_value(ty: BlockType, b: &[u8], j: usize) -> i32 {
    let nibble = |qs: &[u8]| i32::from(if j < 16 { qs[j] & 0x0F } else { qs[j - 16] >> 4 });
    let high = |at: usize| ((u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) >> j) & 1) as i32;
    match ty {
        BlockType::Q4_0 => nibble(&b[2..18]) - 8,
        BlockType::Q4_1 => nibble(&b[4..20]),
        BlockType::Q5_0 => (nibble(&b[6..22]) | (high(2) << 4)) - 16,
        BlockType::Q5_1 => nibble(&b[8..24]) | (high(4) << 4),
        BlockType::MXFP4 => i32::from(super::MXFP4_VALUES[nibble(&b[1..17]) as usize]),
        BlockType::IQ4_NL => i32::from(super::IQ4_NL_VALUES[nibble(&b[2..18]) as usize]),
        _ => unreachable!("a 32-value type"),
    }
}

fn q2_k(b: &[u8], q: &[i8], dy: f32, sums: &[i32]) -> f32 {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let mins: i32 = scales
        .iter()
        .zip(sums)
        .map(|(&s, &m)| i32::from(s >> 4) * m)
        .sum();
    let mut isum = 0i32;
    for (g, &sc) in scales.iter().enumerate() {
        // Group g: half g / 8, shift 2·((g % 8) / 2), bytes 16·(g % 2) of that half's 32.
        let (half_block, shift, part) = (g / 8, 2 * ((g % 8) / 2), g % 2);
        let qb = &qs[half_block * 32 + part * 16..half_block * 32 + part * 16 + 16];
        let s: i32 = qb
            .iter()
            .zip(&q[g * 16..g * 16 + 16])
            .map(|(&w, &x)| i32::from((w >> shift) & 3) * i32::from(x))
            .sum();
        isum += i32::from(sc & 0x0F) * s;
    }
    (dy * half(b, 80)) * isum as f32 - (dy * half(b, 82)) * mins as f32
}

fn q3_k(b: &[u8], q: &[i8], dy: f32) -> f32 {
    let (hmask, qs) = (&b[0..32], &b[32..96]);
    let scales = q3_k_scales(&b[96..108]);
    let mut isum = 0i32;
    for (g, &sc) in scales.iter().enumerate() {
        let (half_block, shift_i, part) = (g / 8, (g % 8) / 2, g % 2);
        let m = 1u8 << (half_block * 4 + shift_i);
        let mut s = 0i32;
        for l in part * 16..part * 16 + 16 {
            let low = i32::from((qs[half_block * 32 + l] >> (2 * shift_i)) & 3);
            let v = low - if hmask[l] & m != 0 { 0 } else { 4 };
            s += v * i32::from(q[g * 16 + (l - part * 16)]);
        }
        isum += i32::from(sc) * s;
    }
    (dy * half(b, 108)) * isum as f32
}

fn q4_k(b: &[u8], q: &[i8], dy: f32, sums: &[i32]) -> f32 {
    let scales = &b[4..16];
    let qs = &b[16..144];
    let (mut isum, mut mins) = (0i32, 0i32);
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, scales);
        mins += i32::from(m) * (sums[2 * j] + sums[2 * j + 1]);
        let (chunk, shift) = (j / 2, 4 * (j % 2));
        let s: i32 = qs[chunk * 32..chunk * 32 + 32]
            .iter()
            .zip(&q[j * 32..j * 32 + 32])
            .map(|(&w, &x)| i32::from((w >> shift) & 0x0F) * i32::from(x))
            .sum();
        isum += i32::from(sc) * s;
    }
    (dy * half(b, 0)) * isum as f32 - (dy * half(b, 2)) * mins as f32
}

fn q5_k(b: &[u8], q: &[i8], dy: f32, sums: &[i32]) -> f32 {
    let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    let (mut isum, mut mins) = (0i32, 0i32);
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, scales);
        mins += i32::from(m) * (sums[2 * j] + sums[2 * j + 1]);
        let (chunk, shift) = (j / 2, 4 * (j % 2));
        let s: i32 = (0..32)
            .map(|l| {
                let v = i32::from((qs[chunk * 32 + l] >> shift) & 0x0F)
                    + if qh[l] & (1 << j) != 0 { 16 } else { 0 };
                v * i32::from(q[j * 32 + l])
            })
            .sum();
        isum += i32::from(sc) * s;
    }
    (dy * half(b, 0)) * isum as f32 - (dy * half(b, 2)) * mins as f32
}

fn q6_k(b: &[u8], q: &[i8], dy: f32, sums: &[i32]) -> f32 {
    let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
    let mut isum = 0i32;
    for (g, &s) in sc.iter().enumerate() {
        // Group g of 16: half n = g / 8, quarter c = (g % 8) / 2 (which of q1..q4), part g % 2.
        let (n, c, part) = (g / 8, (g % 8) / 2, g % 2);
        let mut acc = 0i32;
        for l in part * 16..part * 16 + 16 {
            let (lo_byte, lo_shift) = match c {
                0 => (ql[n * 64 + l], 0),
                1 => (ql[n * 64 + l + 32], 0),
                2 => (ql[n * 64 + l], 4),
                _ => (ql[n * 64 + l + 32], 4),
            };
            let v =
                i32::from((lo_byte >> lo_shift) & 0x0F) | (i32::from((qh[n * 32 + l] >> (2 * c)) & 3) << 4);
            acc += v * i32::from(q[n * 128 + c * 32 + l]);
        }
        isum += i32::from(s as i8) * (acc - 32 * sums[g]);
    }
    (dy * half(b, 208)) * isum as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random blocks with sane scales, a random x: each type's integer dot product equals the
    /// dequantised row times the dequantised activations, up to float summation order.
    #[test]
    fn integer_dots_equal_dequantised_products() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        // 416 values: 13 blocks of 32 (eight at once, then five one by one); 512: the K types.
        for (k, ty) in BlockType::ALL
            .into_iter()
            .filter(|t| !t.is_float())
            .flat_map(|t| [512usize, 416, 128, 96].map(|k| (k, t)))
            .filter(|(k, t)| k.is_multiple_of(t.block_values()))
        {
            let x: Vec<f32> = (0..k).map(|_| (next() % 2001) as f32 / 1000.0 - 1.0).collect();
            let mut row: Vec<u8> = (0..ty.row_bytes(k)).map(|_| next() as u8).collect();
            for b in row.chunks_exact_mut(ty.block_bytes()) {
                for &o in ty.f16_fields() {
                    let v = (next() % 1000) as f32 / 1000.0 * if next() % 2 == 0 { 1.0 } else { -1.0 } * 0.1;
                    b[o..o + 2].copy_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes());
                }
                if ty == BlockType::MXFP4 {
                    b[0] = 120 + (next() % 10) as u8;
                }
            }
            let mut a = Acts::default();
            quantize_acts(ty.act_format(), &x, &mut a);
            // The activations as llama.cpp dequantises them.
            let per = if ty.act_format() == ActFormat::Q8_K {
                QK_K
            } else {
                32
            };
            let xq: Vec<f32> =
                a.q.iter()
                    .enumerate()
                    .map(|(i, &q)| f32::from(q) * a.d[i / per])
                    .collect();
            let mut w = vec![0.0f32; k];
            ty.dequantize(&row, &mut w);
            let want: f64 = w
                .iter()
                .zip(&xq)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum();
            let scale: f64 = w
                .iter()
                .zip(&xq)
                .map(|(a, b)| (f64::from(*a) * f64::from(*b)).abs())
                .sum();
            let got = dot_scalar(ty, &row, &a);
            #[cfg(target_arch = "x86_64")]
            {
                use super::super::x86::{avx2, avx512};
                type Kernels = unsafe fn(BlockType, &[u8], usize, usize, &[Acts], &mut [f32]) -> bool;
                let levels: [(&str, bool, Kernels); 2] = [
                    ("AVX-512", avx512::supported(), avx512::dot_rows),
                    ("AVX2", avx2::supported(), avx2::dot_rows),
                ];
                let mut b = Acts::default();
                quantize_acts(
                    ty.act_format(),
                    &x.iter().map(|v| -v * 0.5).collect::<Vec<_>>(),
                    &mut b,
                );
                let four = [b.clone(), a.clone(), b.clone(), b.clone()];
                for (name, ok, kernels) in levels.into_iter().filter(|l| l.1) {
                    let _ = ok;
                    // One token, and the same token among three others.
                    let mut v = [0.0f32; 4];
                    // SAFETY: supported() says the CPU has the instructions.
                    if unsafe { kernels(ty, &row, 1, row.len(), std::slice::from_ref(&a), &mut v) } {
                        assert_eq!(
                            v[0].to_bits(),
                            got.to_bits(),
                            "{ty:?}: {name} {} vs scalar {got}",
                            v[0]
                        );
                        // SAFETY: as above.
                        assert!(unsafe { kernels(ty, &row, 1, row.len(), &four, &mut v) });
                        assert_eq!(v[1].to_bits(), got.to_bits(), "{ty:?}: {name} among others");
                        assert_eq!(
                            v[0].to_bits(),
                            dot_scalar(ty, &row, &b).to_bits(),
                            "{ty:?}: {name}, the other"
                        );
                    }
                }
            }
            assert!(
                (f64::from(got) - want).abs() <= 1e-4 * scale + 1e-6,
                "{ty:?}: {got} vs {want} (scale {scale})"
            );
        }
    }

    /// The 32-value kernels (Q8_0, Q4_0, Q5_0 and the table types MXFP4 and IQ4_NL) at every
    /// vector level against the scalar reference, bit for bit: rows of 1 to 19 blocks (the
    /// eight-block groups, the four-block group and the one-by-one tail in every mix), several
    /// rows, 1 to 9 tokens (the kernels' chunks of four and what is left), and every E8M0 scale
    /// byte (subnormal halves at 0 and 1, overflow to infinity near 255: a NaN must meet a NaN).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn block32_kernels_equal_the_reference_for_every_shape() {
        use super::super::x86::{avx2, avx512};
        type Kernels = unsafe fn(BlockType, &[u8], usize, usize, &[Acts], &mut [f32]) -> bool;
        let levels: [(&str, bool, Kernels); 2] = [
            ("AVX-512", avx512::supported(), avx512::dot_rows),
            ("AVX2", avx2::supported(), avx2::dot_rows),
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let types = [
            BlockType::Q8_0,
            BlockType::Q4_0,
            BlockType::Q5_0,
            BlockType::MXFP4,
            BlockType::IQ4_NL,
        ];
        let (mut exponent, mut seen) = (0u8, [false; 256]);
        for ty in types {
            for blocks in 1..=19usize {
                let (k, rows, t) = (32 * blocks, 3usize, 1 + blocks % 9);
                let rb = ty.row_bytes(k);
                let mut w: Vec<u8> = (0..rows * rb).map(|_| next() as u8).collect();
                for b in w.chunks_exact_mut(ty.block_bytes()) {
                    for &o in ty.f16_fields() {
                        let v = (next() % 2001) as f32 / 1000.0 - 1.0;
                        b[o..o + 2].copy_from_slice(&half::f16::from_f32(v * 0.05).to_bits().to_le_bytes());
                    }
                    if ty == BlockType::MXFP4 {
                        // Mostly trained weights' exponents, and every byte along the way.
                        b[0] = if next() % 2 == 0 {
                            exponent = exponent.wrapping_add(1);
                            exponent
                        } else {
                            118 + (next() % 9) as u8
                        };
                        seen[usize::from(b[0])] = true;
                    }
                }
                let x: Vec<f32> = (0..t * k)
                    .map(|_| (next() % 2001) as f32 / 1000.0 - 1.0)
                    .collect();
                let acts = super::super::quantize_tokens(ty, &x, t, k);
                let want: Vec<f32> = (0..rows * t)
                    .map(|o| dot_scalar(ty, &w[(o / t) * rb..(o / t + 1) * rb], &acts[o % t]))
                    .collect();
                for (name, _, kernels) in levels.into_iter().filter(|l| l.1) {
                    let mut got = vec![0.0f32; rows * t];
                    // SAFETY: supported() says the CPU has the instructions.
                    assert!(
                        unsafe { kernels(ty, &w, rows, rb, &acts, &mut got) },
                        "{ty:?}: {name} has a kernel"
                    );
                    for (o, (g, r)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            g.to_bits() == r.to_bits() || (g.is_nan() && r.is_nan()),
                            "{ty:?} {name}: {blocks} blocks, row {} token {}: {g} vs scalar {r}",
                            o / t,
                            o % t
                        );
                    }
                }
            }
        }
        assert!(seen.iter().all(|&s| s), "every scale byte met");
        // Rows of 13 MXFP4 blocks (a group of eight, of four, and one alone) that all share one
        // scale byte, for every byte: a wrong scale cannot hide under larger blocks' terms.
        let (ty, k) = (BlockType::MXFP4, 13 * 32);
        let x: Vec<f32> = (0..2 * k)
            .map(|_| (next() % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        let acts = super::super::quantize_tokens(ty, &x, 2, k);
        let mut w: Vec<u8> = (0..256 * ty.row_bytes(k)).map(|_| next() as u8).collect();
        for (r, row) in w.chunks_exact_mut(ty.row_bytes(k)).enumerate() {
            for b in row.chunks_exact_mut(17) {
                b[0] = r as u8;
            }
        }
        for (name, _, kernels) in levels.into_iter().filter(|l| l.1) {
            let mut got = vec![0.0f32; 256 * 2];
            // SAFETY: supported() says the CPU has the instructions.
            assert!(unsafe { kernels(ty, &w, 256, ty.row_bytes(k), &acts, &mut got) });
            for (o, g) in got.iter().enumerate() {
                let r = dot_scalar(
                    ty,
                    &w[(o / 2) * ty.row_bytes(k)..(o / 2 + 1) * ty.row_bytes(k)],
                    &acts[o % 2],
                );
                assert!(
                    g.to_bits() == r.to_bits() || (g.is_nan() && r.is_nan()),
                    "MXFP4 {name}: scale byte {} token {}: {g} vs scalar {r}",
                    o / 2,
                    o % 2
                );
            }
        }
    }
}
