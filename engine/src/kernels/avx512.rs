//! The tile kernel on AVX-512 (`avx512f` with `avx512bw`/`avx512vl` for the masked 16-bit
//! loads): 16 weights a step, the tail of a row by a masked load instead of a scalar loop, and
//! twice the accumulators of the AVX2 kernel (32 vector registers).
//!
//! Measured on this machine's Zen 5 cores (2026-12-06, one thread, bf16 expert matrices of
//! 256 × 1024): prefill tiles (4 rows × 4 tokens) ran 1.7–2.1× the AVX2 kernel's GFLOP/s; decode
//! (8 rows × 1 token) streams weights at memory speed either way.
//!
//! Each (row, token) sum is accumulated in the same order whatever the tile it falls in (16
//! lanes, then the masked tail into the same lanes, then one fixed reduction), so one token
//! alone gets exactly what it gets among others, as with the AVX2 kernel.

use std::arch::x86_64::*;

/// A weight element type widened to f32, 16 at a time.
pub(super) trait Lane16: Copy {
    /// Sixteen weights from `p` as f32.
    ///
    /// # Safety
    /// `p .. p + 16` must be readable; the CPU must support avx512f, avx512bw and avx512vl.
    unsafe fn load16(p: *const Self) -> __m512;
    /// The first `n` (< 16) weights from `p` as f32, zeros after them.
    ///
    /// # Safety
    /// `p .. p + n` must be readable; the CPU must support avx512f, avx512bw and avx512vl.
    unsafe fn load_tail(p: *const Self, n: usize) -> __m512;
}

/// The mask of the first `n` of 16 lanes.
#[inline(always)]
fn first(n: usize) -> u16 {
    ((1u32 << n) - 1) as u16
}

impl Lane16 for f32 {
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> __m512 {
        // SAFETY: the caller guarantees 16 readable values and avx512f.
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn load_tail(p: *const f32, n: usize) -> __m512 {
        // SAFETY: masked-off lanes are not read; the caller guarantees the first n.
        unsafe { _mm512_maskz_loadu_ps(first(n), p) }
    }
}

impl Lane16 for u16 {
    #[inline(always)]
    unsafe fn load16(p: *const u16) -> __m512 {
        // SAFETY: the caller guarantees 16 readable values (32 bytes) and avx512f.
        unsafe {
            let v = _mm256_loadu_si256(p.cast::<__m256i>());
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(v)))
        }
    }
    #[inline(always)]
    unsafe fn load_tail(p: *const u16, n: usize) -> __m512 {
        // SAFETY: masked-off lanes are not read (avx512bw + avx512vl); the caller guarantees
        // the first n.
        unsafe {
            let v = _mm256_maskz_loadu_epi16(first(n), p.cast::<i16>());
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(v)))
        }
    }
}

/// `out[r * t + ti] = W[r] · x[ti]` for `rows` rows of width `k` and `t` tokens, in tiles of
/// up to 4 tokens: 8 rows × 1 or 2 tokens, 8 × 3, 4 × 4 (16–24 accumulators), single rows for
/// what is left.
///
/// # Safety
/// `w` holds `rows × k` values, `x` `t × k`, `out` `rows × t`; the CPU supports avx512f,
/// avx512bw and avx512vl.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn tiles<W: Lane16>(w: &[W], rows: usize, k: usize, x: &[f32], t: usize, out: &mut [f32]) {
    assert!(x.len() >= t * k && out.len() >= rows * t && w.len() >= rows * k);
    let mut t0 = 0;
    while t0 < t {
        let tn = (t - t0).min(4);
        let mut r0 = 0;
        while r0 < rows {
            let left = rows - r0;
            // SAFETY (every call): rows r0 .. r0 + R and tokens t0 .. t0 + T are inside w, x
            // and out (R <= left, T = tn <= t - t0), as micro requires.
            r0 += unsafe {
                match tn {
                    1 if left >= 8 => micro::<8, 1, W>(w, rows, k, r0, x, t0, out, t),
                    1 => micro::<1, 1, W>(w, rows, k, r0, x, t0, out, t),
                    2 if left >= 8 => micro::<8, 2, W>(w, rows, k, r0, x, t0, out, t),
                    2 => micro::<1, 2, W>(w, rows, k, r0, x, t0, out, t),
                    3 if left >= 8 => micro::<8, 3, W>(w, rows, k, r0, x, t0, out, t),
                    3 => micro::<1, 3, W>(w, rows, k, r0, x, t0, out, t),
                    _ if left >= 4 => micro::<4, 4, W>(w, rows, k, r0, x, t0, out, t),
                    _ => micro::<1, 4, W>(w, rows, k, r0, x, t0, out, t),
                }
            };
        }
        t0 += tn;
    }
}

/// One `R × T` tile at rows `r0..`, tokens `t0..`; returns `R`.
///
/// # Safety
/// As [`tiles`], with rows `r0 .. r0 + R` and tokens `t0 .. t0 + T` inside.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro<const R: usize, const T: usize, W: Lane16>(
    w: &[W],
    rows: usize,
    k: usize,
    r0: usize,
    x: &[f32],
    t0: usize,
    out: &mut [f32],
    t: usize,
) -> usize {
    let body = k / 16 * 16;
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    // The next tile's rows, prefetched at the pace this one reads its own: a tile reads R rows
    // side by side, short streams that the hardware prefetcher keeps losing (one thread read
    // 256 × 1024 bf16 matrices at 31 GB/s without this, 39 with it, against 37 for a plain
    // sequential read).
    let next = wp.wrapping_add((r0 + R) * k).cast::<u8>();
    let ahead = r0 + 2 * R <= rows;
    let per_step = R * 16 * std::mem::size_of::<W>();
    let mut i = 0;
    while i < body {
        if ahead {
            super::prefetch_stretch(next.wrapping_add(i / 16 * per_step), per_step);
        }
        let mut xv = [_mm512_setzero_ps(); T];
        for (j, v) in xv.iter_mut().enumerate() {
            // SAFETY: token t0 + j < t and i + 16 <= k: inside x.
            *v = unsafe { _mm512_loadu_ps(xp.add((t0 + j) * k + i)) };
        }
        for (r, accr) in acc.iter_mut().enumerate() {
            // SAFETY: row r0 + r is inside w and i + 16 <= k.
            let wv = unsafe { W::load16(wp.add((r0 + r) * k + i)) };
            for (a, xj) in accr.iter_mut().zip(&xv) {
                *a = _mm512_fmadd_ps(wv, *xj, *a);
            }
        }
        i += 16;
    }
    let tail = k - body;
    if tail > 0 {
        let mut xv = [_mm512_setzero_ps(); T];
        for (j, v) in xv.iter_mut().enumerate() {
            // SAFETY: the first `tail` values after `body` of token t0 + j are inside x.
            *v = unsafe { f32::load_tail(xp.add((t0 + j) * k + body), tail) };
        }
        for (r, accr) in acc.iter_mut().enumerate() {
            // SAFETY: the first `tail` values after `body` of row r0 + r are inside w.
            let wv = unsafe { W::load_tail(wp.add((r0 + r) * k + body), tail) };
            for (a, xj) in accr.iter_mut().zip(&xv) {
                *a = _mm512_fmadd_ps(wv, *xj, *a);
            }
        }
    }
    for (r, accr) in acc.iter().enumerate() {
        for (j, a) in accr.iter().enumerate() {
            out[(r0 + r) * t + t0 + j] = _mm512_reduce_add_ps(*a);
        }
    }
    R
}
