//! The integer dot products of [`super::dot`] on AVX-512 VNNI (`vpdpbusd` on 256-bit lanes:
//! 32 byte products per instruction) for the types Q8_0 and Q4_K_M files are made of: Q8_0,
//! Q4_0, Q5_0, Q4_K and Q6_K.
//!
//! Only the integer sums are vectorised: they are exact, and each block's float arithmetic is
//! the scalar reference's, in the same order, so every result is bit for bit what
//! [`super::dot::dot_scalar`] gives (a test holds them to it). That keeps a GGUF model's output
//! the same on every CPU, and as close to llama.cpp's as the reference is.

use std::arch::x86_64::*;

use super::dot::Acts;
use super::{BlockType, scale_min_k4};

/// Whether this CPU has what these kernels need.
pub(crate) fn supported() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        use std::arch::is_x86_feature_detected as has;
        has!("avx512f")
            && has!("avx512bw")
            && has!("avx512vl")
            && has!("avx512vnni")
            && has!("avx2")
            && has!("f16c")
    })
}

/// `row · a` for one row of `ty` blocks; None for a type without a kernel here.
///
/// # Safety
/// [`supported`] is true.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,f16c")]
pub(crate) unsafe fn dot(ty: BlockType, row: &[u8], a: &Acts) -> Option<f32> {
    // SAFETY (each): the features are the caller's promise; the row and activations have the
    // sizes the kernels read (checked by the callers' shapes: k values, whole blocks).
    unsafe {
        Some(match ty {
            BlockType::Q8_0 => q8_0(row, a),
            BlockType::Q4_0 => q4_0(row, a),
            BlockType::Q5_0 => q5_0(row, a),
            BlockType::Q4_K => q4_k(row, a),
            BlockType::Q6_K => q6_k(row, a),
            _ => return None,
        })
    }
}

/// The f16 at byte `at` of `b`, as f32 (exact; F16C, with no runtime check).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,f16c")]
#[inline]
fn half(b: &[u8], at: usize) -> f32 {
    let bits = u16::from_le_bytes([b[at], b[at + 1]]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
}

/// The sum of eight i32 lanes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,f16c")]
#[inline]
fn hsum(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

/// Σ w·x over 32 unsigned `w` (0..=255) and signed `x`, as 8 partial sums.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,f16c")]
#[inline]
fn dot_u8_i8(w: __m256i, x: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x)
}

/// Thirty-two bytes at `p`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,f16c")]
#[inline]
unsafe fn load32(p: *const u8) -> __m256i {
    // SAFETY: the caller's 32 readable bytes.
    unsafe { _mm256_loadu_si256(p.cast::<__m256i>()) }
}

/// A 32-value block's 16 bytes of nibbles as 32 bytes: low nibbles first, then high.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,f16c")]
#[inline]
unsafe fn nibbles16(p: *const u8) -> __m256i {
    // SAFETY: the caller's 16 readable bytes.
    let q = unsafe { _mm_loadu_si128(p.cast::<__m128i>()) };
    let m = _mm_set1_epi8(0x0F);
    _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16::<4>(q), m), _mm_and_si128(q, m))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,f16c")]
unsafe fn q8_0(row: &[u8], a: &Acts) -> f32 {
    // SAFETY: as blocks32's.
    unsafe {
        blocks32::<34, _>(row, a, |b, x, _| {
            let w = load32(b.add(2));
            // |w| · (x with w's sign): unsigned times signed, what vpdpbusd multiplies.
            dot_u8_i8(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w))
        })
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,f16c")]
unsafe fn q4_0(row: &[u8], a: &Acts) -> f32 {
    // SAFETY: as blocks32's.
    unsafe { blocks32::<18, _>(row, a, |b, x, _| dot_u8_i8(nibbles16(b.add(2)), x)) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,f16c")]
unsafe fn q5_0(row: &[u8], a: &Acts) -> f32 {
    // SAFETY: as blocks32's.
    unsafe {
        blocks32::<22, _>(row, a, |b, x, _| {
            let qh = std::ptr::read_unaligned(b.add(2).cast::<u32>());
            // Byte j gets 0x10 where bit j of qh is set.
            let high = _mm256_and_si256(_mm256_movm_epi8(qh), _mm256_set1_epi8(0x10));
            dot_u8_i8(_mm256_or_si256(nibbles16(b.add(6)), high), x)
        })
    }
}

/// The offset each 32-value type's values carry (Q4_0: 8, Q5_0: 16; Q8_0: none).
const fn offset_of(block_bytes: usize) -> i32 {
    match block_bytes {
        18 => 8,
        22 => 16,
        _ => 0,
    }
}

/// A row of 32-value blocks of `BB` bytes, each with its f16 scale first: `partial(block,
/// activations, i)` gives the block's eight partial integer sums; eight blocks at a time are
/// reduced to eight sums together, scaled (the scalar reference's float operations, lane by
/// lane) and added to [`Lanes`], so the result is the reference's bit for bit.
///
/// # Safety
/// The CPU has the features of this file; `row` is whole blocks whose activations are in `a`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,f16c")]
#[inline]
unsafe fn blocks32<const BB: usize, P: Fn(*const u8, __m256i, usize) -> __m256i>(
    row: &[u8],
    a: &Acts,
    partial: P,
) -> f32 {
    let n = row.len() / BB;
    assert!(a.q.len() >= n * 32 && a.d.len() >= n && a.sums.len() >= n);
    let (rp, xp) = (row.as_ptr(), a.q.as_ptr().cast::<u8>());
    let mut lanes = _mm256_setzero_ps();
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: blocks i .. i + 8 are inside the row and their activations inside a.q.
        let p: [__m256i; 8] = std::array::from_fn(|j| unsafe {
            partial(rp.add((i + j) * BB), load32(xp.add(32 * (i + j))), i + j)
        });
        // Eight 8-lane partial sums to eight sums: horizontal adds, then the two halves.
        let h01 = _mm256_hadd_epi32(p[0], p[1]);
        let h23 = _mm256_hadd_epi32(p[2], p[3]);
        let h45 = _mm256_hadd_epi32(p[4], p[5]);
        let h67 = _mm256_hadd_epi32(p[6], p[7]);
        let (h0123, h4567) = (_mm256_hadd_epi32(h01, h23), _mm256_hadd_epi32(h45, h67));
        let mut s = _mm256_add_epi32(
            _mm256_permute2x128_si256::<0x20>(h0123, h4567),
            _mm256_permute2x128_si256::<0x31>(h0123, h4567),
        );
        // SAFETY (both loads): blocks i .. i + 8 have their activation sums and scales.
        let off = offset_of(BB);
        if off != 0 {
            let sums = unsafe { _mm256_loadu_si256(a.sums.as_ptr().add(i).cast::<__m256i>()) };
            s = _mm256_sub_epi32(s, _mm256_mullo_epi32(sums, _mm256_set1_epi32(off)));
        }
        let dx = unsafe { _mm256_loadu_ps(a.d.as_ptr().add(i)) };
        let dws: [i16; 8] = std::array::from_fn(|j| {
            // SAFETY: block i + j's first two bytes.
            unsafe { std::ptr::read_unaligned(rp.add((i + j) * BB).cast::<i16>()) }
        });
        let dw = _mm256_cvtph_ps(_mm_setr_epi16(
            dws[0], dws[1], dws[2], dws[3], dws[4], dws[5], dws[6], dws[7],
        ));
        // The reference: term = s as f32 · (dw · dx), added to lane i % 8 (i is a multiple of 8).
        lanes = _mm256_add_ps(lanes, _mm256_mul_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dw, dx)));
        i += 8;
    }
    let mut l = [0.0f32; 8];
    // SAFETY: eight floats.
    unsafe { _mm256_storeu_ps(l.as_mut_ptr(), lanes) };
    let mut out = super::dot::Lanes(l);
    while i < n {
        // SAFETY: block i is inside the row, its activations inside a.q.
        let s =
            hsum(unsafe { partial(rp.add(i * BB), load32(xp.add(32 * i)), i) }) - offset_of(BB) * a.sums[i];
        out.add(i, s as f32 * (half(&row[i * BB..], 0) * a.d[i]));
        i += 1;
    }
    out.total()
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,f16c")]
unsafe fn q4_k(row: &[u8], a: &Acts) -> f32 {
    let m = _mm256_set1_epi8(0x0F);
    let mut sum = 0.0f32;
    for (i, b) in row.chunks_exact(144).enumerate() {
        let scales = &b[4..16];
        let sums = &a.sums[i * 16..(i + 1) * 16];
        let (mut acc, mut mins) = (_mm256_setzero_si256(), 0i32);
        for c in 0..4 {
            // SAFETY: 32 bytes of chunk c; 64 activations of block i from 64·c.
            let (q, x_lo, x_hi) = unsafe {
                let xp = a.q.as_ptr().add(i * 256 + 64 * c).cast::<u8>();
                (
                    load32(b.as_ptr().add(16 + 32 * c)),
                    load32(xp),
                    load32(xp.add(32)),
                )
            };
            for (half_i, (w, x)) in [
                (_mm256_and_si256(q, m), x_lo),
                (_mm256_and_si256(_mm256_srli_epi16::<4>(q), m), x_hi),
            ]
            .into_iter()
            .enumerate()
            {
                let j = 2 * c + half_i;
                let (sc, mn) = scale_min_k4(j, scales);
                mins += i32::from(mn) * (sums[2 * j] + sums[2 * j + 1]);
                acc = _mm256_add_epi32(
                    acc,
                    _mm256_mullo_epi32(dot_u8_i8(w, x), _mm256_set1_epi32(i32::from(sc))),
                );
            }
        }
        let dy = a.d[i];
        sum += (dy * half(b, 0)) * hsum(acc) as f32 - (dy * half(b, 2)) * mins as f32;
    }
    sum
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,f16c")]
unsafe fn q6_k(row: &[u8], a: &Acts) -> f32 {
    let (m4, m2) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(3));
    let mut sum = 0.0f32;
    for (i, b) in row.chunks_exact(210).enumerate() {
        let sc = &b[192..208];
        let sums = &a.sums[i * 16..(i + 1) * 16];
        let mut acc = _mm256_setzero_si256();
        let mut offset = 0i32;
        for n in 0..2 {
            // SAFETY: ql bytes 64n..64n+64, qh bytes 32n..32n+32 of the block; 128
            // activations of block i from 128n.
            let (qa, qb, qh) = unsafe {
                (
                    load32(b.as_ptr().add(64 * n)),
                    load32(b.as_ptr().add(64 * n + 32)),
                    load32(b.as_ptr().add(128 + 32 * n)),
                )
            };
            let values = [
                _mm256_or_si256(
                    _mm256_and_si256(qa, m4),
                    _mm256_slli_epi16::<4>(_mm256_and_si256(qh, m2)),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(qb, m4),
                    _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<2>(qh), m2)),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(qa), m4),
                    _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<4>(qh), m2)),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(qb), m4),
                    _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<6>(qh), m2)),
                ),
            ];
            for (c, w) in values.into_iter().enumerate() {
                // Groups g and g + 1 (16 values each) of this quarter: their scales.
                let g = 8 * n + 2 * c;
                let (s0, s1) = (i32::from(sc[g] as i8), i32::from(sc[g + 1] as i8));
                offset += 32 * (s0 * sums[g] + s1 * sums[g + 1]);
                // SAFETY: 32 activations of block i from 128n + 32c.
                let x = unsafe { load32(a.q.as_ptr().add(i * 256 + 128 * n + 32 * c).cast::<u8>()) };
                let scale = _mm256_setr_epi32(s0, s0, s0, s0, s1, s1, s1, s1);
                acc = _mm256_add_epi32(acc, _mm256_mullo_epi32(dot_u8_i8(w, x), scale));
            }
        }
        sum += (a.d[i] * half(b, 208)) * (hsum(acc) - offset) as f32;
    }
    sum
}
