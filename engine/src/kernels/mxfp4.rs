//! MXFP4 weights against f32 activations: `out[r · T + i] = Σ_k w[r, k] · x[i, k]`, the
//! arithmetic transformers does on the dequantised weights (gpt-oss's experts).
//!
//! Dimensions: `T` = tokens, `K` = input width (whole blocks of 32), `N` = weight rows.
//!
//! Rows are ggml's `block_mxfp4` (an E8M0 scale byte `s`, then 16 bytes holding value `j` in
//! the low nibble of byte `j` and value `j + 16` in its high nibble). Each weight is formed
//! exactly as [`BlockType::dequantize`](crate::ggml::BlockType::dequantize) forms it — twice
//! the E2M1 value times 2^(s − 128), exact in f32 — so a result differs from "dequantise the
//! row, then a dot product" only in the order of the additions.
//!
//! The tile loop is written once, over [`Isa`], and compiled three times: AVX-512 (a block is
//! two 16-lane vectors, looked up with `vpermps` in a register holding the 16 values already
//! scaled), AVX2 (four 8-lane vectors: the nibbles looked up as bytes with `pshufb` and
//! widened, unscaled; each block's partial sum is multiplied by its scale once) and portable
//! code. A tile is a few rows × up to 4 tokens, so a block is decoded
//! once for every token of the tile (prefill).
//!
//! Each (row, token) sum is accumulated in the same order whatever the tile it falls in, so one
//! token alone gets exactly what it gets among others.

use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;

use super::{PARALLEL_MIN_WORK, ROW_BLOCK, SERIAL, Simd, finish};
use crate::ggml::{BlockType, MXFP4_VALUES, e8m0_half};
use crate::weights::{DType, Weight};

/// Values a block holds, and its bytes (the scale, then the nibbles).
const QK: usize = 32;
const BLOCK_BYTES: usize = 17;

/// `x · Wᵀ (+ bias)`: `x` is `[T, K]` in f32, `W` an MXFP4 matrix `[N, K]`, the result
/// `[T, N]`. Blocks of rows in parallel above [`PARALLEL_MIN_WORK`] multiply-adds (up to 4
/// tokens: a few long stretches of rows a thread; more: blocks of 16 rows, which stay in cache
/// while every token passes).
pub fn linear_mxfp4(x: ArrayView2<'_, f32>, w: &Weight, bias: Option<&[f32]>) -> Array2<f32> {
    assert_eq!(
        w.dtype(),
        DType::Block(BlockType::MXFP4),
        "linear_mxfp4 needs an MXFP4 weight"
    );
    let (t, k) = x.dim();
    let (n, wk) = (w.shape()[0], w.shape()[1]);
    assert_eq!(k, wk, "linear_mxfp4: input width {k} != weight width {wk}");
    let x = x.as_standard_layout();
    let x = x.as_slice().expect("standard layout");
    let rb = k / QK * BLOCK_BYTES;
    let parallel =
        n * k * t >= PARALLEL_MIN_WORK && rayon::current_num_threads() > 1 && !SERIAL.with(|s| s.get());
    let rows_per_block = match (t <= 4, parallel) {
        (false, _) => ROW_BLOCK,
        (true, false) => n.max(1),
        (true, true) => (n / (4 * rayon::current_num_threads()))
            .next_multiple_of(ROW_BLOCK)
            .max(ROW_BLOCK),
    };
    let simd = Simd::detected();
    let bytes = w.bytes();
    // yt is [N, T]: each block of rows owns a contiguous stretch of it.
    let mut yt = vec![0.0f32; n * t];
    let block = |(bi, out): (usize, &mut [f32])| {
        let (row0, rows) = (bi * rows_per_block, out.len() / t);
        mxfp4_rows_on(simd, &bytes[row0 * rb..(row0 + rows) * rb], rows, k, x, t, out);
    };
    if parallel {
        yt.par_chunks_mut(rows_per_block * t).enumerate().for_each(block);
    } else {
        yt.chunks_mut(rows_per_block * t).enumerate().for_each(block);
    }
    finish(yt, t, n, bias)
}

/// `out[r * t + i] = W[r] · x[i]` for `rows` MXFP4 rows of width `k` in `w` and `t` tokens
/// (`x` is `[t, k]`), on the given instructions (at most [`Simd::supported`]).
pub fn mxfp4_rows_on(simd: Simd, w: &[u8], rows: usize, k: usize, x: &[f32], t: usize, out: &mut [f32]) {
    assert!(
        (simd as u8) >= (Simd::supported() as u8),
        "{simd:?} is not supported by this CPU"
    );
    assert!(
        k.is_multiple_of(QK),
        "MXFP4 rows of {k} values are not whole blocks"
    );
    assert!(w.len() >= rows * (k / QK) * BLOCK_BYTES && x.len() >= t * k && out.len() >= rows * t);
    // SAFETY (each): the CPU has the instructions (asserted above), and w, x and out hold what
    // the kernels read and write (asserted above).
    #[cfg(target_arch = "x86_64")]
    match simd {
        Simd::Avx512 => return unsafe { rows_avx512(w, rows, k, x, t, out) },
        Simd::Avx2 => return unsafe { rows_avx2(w, rows, k, x, t, out) },
        Simd::Portable => {}
    }
    unsafe { rows_with::<Portable>(w, rows, k, x, t, out) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn rows_avx512(w: &[u8], rows: usize, k: usize, x: &[f32], t: usize, out: &mut [f32]) {
    // SAFETY: as this function's (the CPU has AVX-512; the slices hold what is read).
    unsafe { rows_with::<Avx512>(w, rows, k, x, t, out) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_avx2(w: &[u8], rows: usize, k: usize, x: &[f32], t: usize, out: &mut [f32]) {
    // SAFETY: as this function's (the CPU has AVX2 and FMA; the slices hold what is read).
    unsafe { rows_with::<Avx2>(w, rows, k, x, t, out) }
}

/// What the tile loop needs of a vector unit: a block's 32 weights in registers, and one
/// (row, token) sum in progress.
trait Isa {
    type Block: Copy;
    type Acc: Copy;
    /// Rows a tile holds for 1, 2, 3 and 4 tokens (4, 2 or 1), as the registers allow.
    const ROWS: [usize; 4];
    /// The block at `b` as 32 f32 weights.
    ///
    /// # Safety
    /// `b .. b + 17` is readable; the CPU has the instructions.
    unsafe fn decode(b: *const u8) -> Self::Block;
    /// # Safety
    /// The CPU has the instructions.
    unsafe fn zero() -> Self::Acc;
    /// `acc += w · x[..32]`, lane by lane.
    ///
    /// # Safety
    /// `x .. x + 32` is readable; the CPU has the instructions.
    unsafe fn fma(w: &Self::Block, x: *const f32, acc: &mut Self::Acc);
    /// The sum of the lanes, in a fixed order.
    ///
    /// # Safety
    /// The CPU has the instructions.
    unsafe fn sum(acc: Self::Acc) -> f32;
}

/// [`mxfp4_rows_on`] on `I`, in tiles of `I::ROWS[tn - 1]` rows × `tn` (up to 4) tokens, then
/// single rows for what is left.
///
/// # Safety
/// `w` holds `rows` rows of `k / 32` blocks, `x` `t × k` values, `out` `rows × t`; `k` is a
/// multiple of 32; the CPU has `I`'s instructions.
#[inline(always)]
unsafe fn rows_with<I: Isa>(w: &[u8], rows: usize, k: usize, x: &[f32], t: usize, out: &mut [f32]) {
    let mut t0 = 0;
    while t0 < t {
        let tn = (t - t0).min(4);
        let mut r0 = 0;
        while r0 < rows {
            let r = I::ROWS[tn - 1];
            let r = if rows - r0 >= r { r } else { 1 };
            let at = Tile { w, k, r0, x, t0, t };
            // SAFETY (each): rows r0 .. r0 + R and tokens t0 .. t0 + T are inside w, x and out
            // (R <= rows - r0, T = tn <= t - t0), as micro requires.
            r0 += unsafe {
                match (tn, r) {
                    (1, 4) => micro::<I, 4, 1>(at, out),
                    (1, 2) => micro::<I, 2, 1>(at, out),
                    (1, _) => micro::<I, 1, 1>(at, out),
                    (2, 4) => micro::<I, 4, 2>(at, out),
                    (2, 2) => micro::<I, 2, 2>(at, out),
                    (2, _) => micro::<I, 1, 2>(at, out),
                    (3, 2) => micro::<I, 2, 3>(at, out),
                    (3, _) => micro::<I, 1, 3>(at, out),
                    (_, 2) => micro::<I, 2, 4>(at, out),
                    _ => micro::<I, 1, 4>(at, out),
                }
            };
        }
        t0 += tn;
    }
}

/// Where a tile lies: rows from `r0` of `w` (width `k`), tokens from `t0` of `x`, in an output
/// of `t` tokens a row.
#[derive(Clone, Copy)]
struct Tile<'a> {
    w: &'a [u8],
    k: usize,
    r0: usize,
    x: &'a [f32],
    t0: usize,
    t: usize,
}

/// One `R × T` tile; returns `R`. Each block of each row is decoded once, then multiplied into
/// the `T` tokens' accumulators.
///
/// # Safety
/// As [`rows_with`]'s, and rows `r0 .. r0 + R`, tokens `t0 .. t0 + T` are inside.
#[inline(always)]
unsafe fn micro<I: Isa, const R: usize, const T: usize>(at: Tile<'_>, out: &mut [f32]) -> usize {
    let Tile { w, k, r0, x, t0, t } = at;
    let (blocks, rb) = (k / QK, k / QK * BLOCK_BYTES);
    // SAFETY: the caller's (the CPU has I's instructions).
    let mut acc = [[unsafe { I::zero() }; T]; R];
    let (wp, xp) = (w.as_ptr().wrapping_add(r0 * rb), x.as_ptr().wrapping_add(t0 * k));
    // The next tile's rows (contiguous after these), read ahead at this tile's pace: with the
    // hardware prefetcher alone this loop waited on DRAM (gpt-oss's 2880 × 2880 at one token,
    // one thread, AVX-512: 6 GB/s of weights without, 20 GB/s with).
    let (next, ahead) = (wp.wrapping_add(R * rb), r0 + 2 * R <= w.len() / rb.max(1));
    for b in 0..blocks {
        if ahead {
            super::prefetch_stretch(next.wrapping_add(b * R * BLOCK_BYTES), R * BLOCK_BYTES);
        }
        for (r, accr) in acc.iter_mut().enumerate() {
            // SAFETY: block b of row r0 + r is inside w; token t0 + j's values b·32 .. b·32 + 32
            // are inside x (the caller's bounds).
            unsafe {
                let wb = I::decode(wp.add(r * rb + b * BLOCK_BYTES));
                for (j, a) in accr.iter_mut().enumerate() {
                    I::fma(&wb, xp.add(j * k + b * QK), a);
                }
            }
        }
    }
    for (r, accr) in acc.iter().enumerate() {
        for (j, a) in accr.iter().enumerate() {
            // SAFETY: the caller's (the CPU has I's instructions).
            out[(r0 + r) * t + t0 + j] = unsafe { I::sum(*a) };
        }
    }
    R
}

/// Scalar code the compiler vectorises as the build target allows: 32 lanes, lane `j` summing
/// value `j` of every block, then a pairwise sum.
struct Portable;

impl Isa for Portable {
    type Block = [f32; QK];
    type Acc = [f32; QK];
    const ROWS: [usize; 4] = [1, 1, 1, 1];

    #[inline(always)]
    unsafe fn decode(b: *const u8) -> [f32; QK] {
        // SAFETY: the caller's 17 readable bytes.
        let b = unsafe { std::slice::from_raw_parts(b, BLOCK_BYTES) };
        let d = e8m0_half(b[0]);
        std::array::from_fn(|j| {
            let q = b[1 + j % 16];
            let nib = if j < 16 { q & 0x0F } else { q >> 4 };
            f32::from(MXFP4_VALUES[nib as usize]) * d
        })
    }

    #[inline(always)]
    unsafe fn zero() -> [f32; QK] {
        [0.0; QK]
    }

    #[inline(always)]
    unsafe fn fma(w: &[f32; QK], x: *const f32, acc: &mut [f32; QK]) {
        // SAFETY: the caller's 32 readable values.
        let x = unsafe { std::slice::from_raw_parts(x, QK) };
        for ((a, w), x) in acc.iter_mut().zip(w).zip(x) {
            *a += w * x;
        }
    }

    #[inline(always)]
    unsafe fn sum(mut acc: [f32; QK]) -> f32 {
        let mut w = QK;
        while w > 1 {
            w /= 2;
            for i in 0..w {
                acc[i] += acc[i + w];
            }
        }
        acc[0]
    }
}

/// The 16 E2M1 values (half of [`MXFP4_VALUES`]), for the AVX-512 lookup.
#[cfg(target_arch = "x86_64")]
static E2M1: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// The E8M0 scale of the block at `b`, 2^(s − 127), as f32 bits in every lane, computed in the
/// vector unit (a scalar conversion and broadcast per block cost as much as the rest of the
/// decode): `s << 23` is the float 2^(s − 127) for s in 1..=254, and the max with `0x0040_0000`
/// gives s = 0 its subnormal 2^-127 (every `s << 23` above 0 is larger).
///
/// # Safety
/// `b .. b + 4` is readable (a block is 17 bytes); the CPU has AVX-512.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn scale16(b: *const u8) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    // SAFETY: the caller's 4 readable bytes and AVX-512.
    unsafe {
        let s = _mm512_and_si512(
            _mm512_set1_epi32(std::ptr::read_unaligned(b.cast::<i32>())),
            _mm512_set1_epi32(0xFF),
        );
        _mm512_max_epu32(_mm512_slli_epi32::<23>(s), _mm512_set1_epi32(0x0040_0000))
    }
}

/// [`scale16`] in eight lanes.
///
/// # Safety
/// `b .. b + 4` is readable; the CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn scale8(b: *const u8) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    // SAFETY: the caller's 4 readable bytes and AVX2.
    unsafe {
        let s = _mm256_and_si256(
            _mm256_set1_epi32(std::ptr::read_unaligned(b.cast::<i32>())),
            _mm256_set1_epi32(0xFF),
        );
        _mm256_max_epu32(_mm256_slli_epi32::<23>(s), _mm256_set1_epi32(0x0040_0000))
    }
}

/// AVX-512: a block is two 16-lane vectors (values 0..16 from the low nibbles, 16..32 from the
/// high), each (row, token) two accumulators; 4 rows × 1–2 tokens or 2 rows × 3–4 (8–16 of the
/// 32 registers).
#[cfg(target_arch = "x86_64")]
struct Avx512;

#[cfg(target_arch = "x86_64")]
impl Isa for Avx512 {
    type Block = [std::arch::x86_64::__m512; 2];
    type Acc = [std::arch::x86_64::__m512; 2];
    const ROWS: [usize; 4] = [4, 4, 2, 2];

    #[inline(always)]
    unsafe fn decode(b: *const u8) -> Self::Block {
        use std::arch::x86_64::*;
        // SAFETY: the caller's 17 readable bytes and AVX-512.
        unsafe {
            // The 16 values times this block's scale (each product exact, as the reference's),
            // then a lookup: vpermps reads only the low 4 bits of each index.
            let table = _mm512_mul_ps(_mm512_loadu_ps(E2M1.as_ptr()), _mm512_castsi512_ps(scale16(b)));
            let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(b.add(1).cast::<__m128i>()));
            [
                _mm512_permutexvar_ps(q, table),
                _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(q), table),
            ]
        }
    }

    #[inline(always)]
    unsafe fn zero() -> Self::Acc {
        // SAFETY: the caller's AVX-512.
        unsafe { [std::arch::x86_64::_mm512_setzero_ps(); 2] }
    }

    #[inline(always)]
    unsafe fn fma(w: &Self::Block, x: *const f32, acc: &mut Self::Acc) {
        use std::arch::x86_64::*;
        // SAFETY: the caller's 32 readable values and AVX-512.
        unsafe {
            acc[0] = _mm512_fmadd_ps(w[0], _mm512_loadu_ps(x), acc[0]);
            acc[1] = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(x.add(16)), acc[1]);
        }
    }

    #[inline(always)]
    unsafe fn sum(acc: Self::Acc) -> f32 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's AVX-512.
        unsafe { _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1])) }
    }
}

/// AVX2: a block is four 8-lane vectors of its unscaled values (`MXFP4_VALUES`, small integers:
/// looked up as bytes with `pshufb`, widened, converted, all exact) and a fifth holding the
/// block's scale 2^(s − 128). Each (row, token) sum takes the block's 32 products unscaled into
/// one 8-lane partial, then adds the partial times the scale into one accumulator: one
/// multiply per block and token instead of one per weight. The weights are the same values as
/// the other levels' (a partial times a power of two is exact, short of underflow), only the
/// order of the additions differs. 4 rows × 1 token, 2 × 2 or 1 × 3–4.
#[cfg(target_arch = "x86_64")]
struct Avx2;

#[cfg(target_arch = "x86_64")]
impl Isa for Avx2 {
    type Block = [std::arch::x86_64::__m256; 5];
    type Acc = std::arch::x86_64::__m256;
    const ROWS: [usize; 4] = [4, 2, 1, 1];

    #[inline(always)]
    unsafe fn decode(b: *const u8) -> Self::Block {
        use std::arch::x86_64::*;
        // SAFETY: the caller's 17 readable bytes and AVX2.
        unsafe {
            // 2^(s − 128), to scale MXFP4_VALUES (twice E2M1's): exact.
            let d = _mm256_mul_ps(_mm256_castsi256_ps(scale8(b)), _mm256_set1_ps(0.5));
            let q = _mm_loadu_si128(b.add(1).cast::<__m128i>());
            let table = _mm_loadu_si128(MXFP4_VALUES.as_ptr().cast::<__m128i>());
            let m = _mm_set1_epi8(0x0F);
            let lo = _mm_shuffle_epi8(table, _mm_and_si128(q, m));
            let hi = _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16::<4>(q), m));
            // Eight i8 values widened to f32 (exact), left unscaled.
            let f = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
            [
                f(lo),
                f(_mm_unpackhi_epi64(lo, lo)),
                f(hi),
                f(_mm_unpackhi_epi64(hi, hi)),
                d,
            ]
        }
    }

    #[inline(always)]
    unsafe fn zero() -> Self::Acc {
        // SAFETY: the caller's AVX2.
        unsafe { std::arch::x86_64::_mm256_setzero_ps() }
    }

    #[inline(always)]
    unsafe fn fma(w: &Self::Block, x: *const f32, acc: &mut Self::Acc) {
        use std::arch::x86_64::*;
        // SAFETY: the caller's 32 readable values and AVX2 with FMA.
        unsafe {
            let p = _mm256_mul_ps(w[0], _mm256_loadu_ps(x));
            let p = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(x.add(8)), p);
            let p = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(x.add(16)), p);
            let p = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(x.add(24)), p);
            *acc = _mm256_fmadd_ps(p, w[4], *acc);
        }
    }

    #[inline(always)]
    unsafe fn sum(acc: Self::Acc) -> f32 {
        // SAFETY: the caller's AVX2.
        unsafe { super::hsum(acc) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The levels this CPU runs, best first (the portable one last).
    fn levels() -> Vec<Simd> {
        [Simd::Avx512, Simd::Avx2, Simd::Portable]
            .into_iter()
            .filter(|s| (*s as u8) >= (Simd::supported() as u8))
            .collect()
    }

    /// Deterministic pseudo-random 64-bit words (SplitMix64).
    fn words(seed: u64) -> impl FnMut() -> u64 {
        let mut z = seed;
        move || {
            z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut v = z;
            v = (v ^ (v >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            v = (v ^ (v >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            v ^ (v >> 31)
        }
    }

    /// `rows` rows of `k / 32` random blocks, scale bytes drawn from `scales`.
    fn random_rows(rows: usize, k: usize, scales: std::ops::Range<u8>, seed: u64) -> Vec<u8> {
        let mut next = words(seed);
        let span = u64::from(scales.end - scales.start);
        let mut w = Vec::with_capacity(rows * k / QK * BLOCK_BYTES);
        for _ in 0..rows * k / QK {
            w.push(scales.start + (next() % span) as u8);
            w.extend(next().to_le_bytes());
            w.extend(next().to_le_bytes());
        }
        w
    }

    fn random_x(t: usize, k: usize, seed: u64) -> Vec<f32> {
        let mut next = words(seed);
        (0..t * k)
            .map(|_| (next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
            .collect()
    }

    fn dequantised(w: &[u8], rows: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0.0f32; rows * k];
        BlockType::MXFP4.dequantize(w, &mut out);
        out
    }

    /// Every level against the portable code, and the portable code against an exact (f64)
    /// sum, on random blocks with scales 2^-27 .. 2^33 (bytes 100..160), odd row counts and
    /// 1..7 tokens. The weights are the same exact f32 values in every kernel, so they differ
    /// only in the order of the additions, and each order's rounding error is at most
    /// `(roundings a product passes through) · 2^-24 · Σ|w·x|`: `k/32 + 6` for the portable
    /// code (the product, k/32 additions a lane, 5 levels over 32 lanes), `k/32 + 5` on
    /// AVX-512 (fused products, k/32 additions a lane, one add of two accumulators, 4 levels),
    /// `k/32 + 7` on AVX2 (within a block the first product rounded and 3 fused additions into
    /// the block's partial, its multiplication by the power-of-two scale exact, then k/32
    /// fused additions of partials a lane and 3 levels over 8 lanes): at most `k/32 + 7` for
    /// the vector ones. Two kernels may differ by the sum of theirs.
    #[test]
    fn every_level_matches_the_portable_code_within_its_rounding() {
        let u = f64::from(f32::EPSILON) / 2.0;
        for (rows, k) in [(1, 32), (3, 64), (5, 96), (7, 320), (13, 2880), (37, 160)] {
            let w = random_rows(rows, k, 100..160, (rows * k) as u64);
            let vals = dequantised(&w, rows, k);
            let x = random_x(7, k, k as u64);
            for t in 1..=7 {
                let mut want = vec![0.0f32; rows * t];
                mxfp4_rows_on(Simd::Portable, &w, rows, k, &x, t, &mut want);
                let (vals, xs) = (&vals[..], &x[..]);
                let terms = |r: usize, i: usize| {
                    (0..k).map(move |j| f64::from(vals[r * k + j]) * f64::from(xs[i * k + j]))
                };
                for r in 0..rows {
                    for i in 0..t {
                        let exact: f64 = terms(r, i).sum();
                        let mag: f64 = terms(r, i).map(f64::abs).sum();
                        let got = f64::from(want[r * t + i]);
                        let bound = (k / 32 + 6) as f64 * u * mag;
                        assert!(
                            (got - exact).abs() <= bound,
                            "portable {rows}x{k} t {t} ({r},{i}): {got} vs exact {exact}"
                        );
                    }
                }
                for &simd in &levels() {
                    let mut got = vec![0.0f32; rows * t];
                    mxfp4_rows_on(simd, &w, rows, k, &x, t, &mut got);
                    for r in 0..rows {
                        for i in 0..t {
                            let mag: f64 = terms(r, i).map(f64::abs).sum();
                            let bound = ((k / 32 + 6) + (k / 32 + 7)) as f64 * u * mag;
                            let (g, p) = (got[r * t + i], want[r * t + i]);
                            assert!(
                                (f64::from(g) - f64::from(p)).abs() <= bound,
                                "{simd:?} {rows}x{k} t {t} ({r},{i}): {g} vs portable {p}, bound {bound:e}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// One-hot inputs read each weight back exactly, for every finite scale byte whose values
    /// stay finite (0..=252: subnormal scales included) and every nibble in both halves.
    #[test]
    fn one_hot_inputs_read_back_the_dequantised_weights_for_every_scale() {
        let (rows, k) = (253, 64);
        let mut w = random_rows(rows, k, 0..1, 7);
        for (i, b) in w.chunks_exact_mut(BLOCK_BYTES).enumerate() {
            b[0] = (i / 2) as u8; // both blocks of row r at scale r
        }
        let vals = dequantised(&w, rows, k);
        // Token j is the unit vector e_j.
        let x: Vec<f32> = (0..k * k)
            .map(|i| if i / k == i % k { 1.0 } else { 0.0 })
            .collect();
        for simd in levels() {
            let mut out = vec![0.0f32; rows * k];
            mxfp4_rows_on(simd, &w, rows, k, &x, k, &mut out);
            for r in 0..rows {
                for j in 0..k {
                    assert_eq!(out[r * k + j], vals[r * k + j], "{simd:?}: scale {r}, value {j}");
                }
            }
        }
    }

    #[test]
    fn a_token_alone_gets_what_it_gets_among_others() {
        let (rows, k) = (11, 96);
        let w = random_rows(rows, k, 110..140, 3);
        let x = random_x(7, k, 4);
        for simd in levels() {
            for t in 1..=7 {
                let mut many = vec![0.0f32; rows * t];
                mxfp4_rows_on(simd, &w, rows, k, &x, t, &mut many);
                for i in 0..t {
                    let mut one = vec![0.0f32; rows];
                    mxfp4_rows_on(simd, &w, rows, k, &x[i * k..(i + 1) * k], 1, &mut one);
                    for r in 0..rows {
                        assert_eq!(one[r], many[r * t + i], "{simd:?}: token {i} of {t}, row {r}");
                    }
                }
            }
        }
    }

    /// The whole matmul (blocks of rows in parallel, bias, `[T, N]` out) against its rows.
    #[test]
    fn linear_mxfp4_is_its_rows_plus_the_bias() {
        use crate::weights::AlignedBytes;
        use std::sync::Arc;
        let (n, k) = (300, 288);
        let bytes = random_rows(n, k, 120..135, 9);
        let w = Weight::new(
            Arc::new(AlignedBytes::copy_from(&bytes)),
            0,
            DType::Block(BlockType::MXFP4),
            vec![n, k],
        );
        let bias: Vec<f32> = (0..n).map(|i| i as f32 / 7.0).collect();
        for t in [1, 3, 6] {
            let x = random_x(t, k, 5);
            let xa = Array2::from_shape_vec((t, k), x.clone()).expect("shape");
            let y = linear_mxfp4(xa.view(), &w, Some(&bias));
            let mut yt = vec![0.0f32; n * t];
            mxfp4_rows_on(Simd::detected(), &bytes, n, k, &x, t, &mut yt);
            for i in 0..t {
                for r in 0..n {
                    assert_eq!(y[[i, r]], yt[r * t + i] + bias[r], "token {i}, row {r}");
                }
            }
        }
    }
}
