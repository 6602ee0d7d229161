//! Numeric kernels of the forward pass, on f32 activations and f32/f16/bf16 weights.
//!
//! Dimensions: `T` = tokens in the pass, `K` = input width, `N` = output width.
//! Weights keep the checkpoint's `[N, K]` layout (one output row per weight row): a row-wise
//! dot product streams each weight row once, which is what decode (T = 1) is bound by.

use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;

use crate::weights::{DType, Weight};

/// Rows of W converted and multiplied together: x[t] stays in L1 across the block.
const ROW_BLOCK: usize = 16;
/// Accumulators per dot product: 8 AVX2 vectors in flight.
const LANES: usize = 64;
/// Up to this many tokens, bf16 weights are converted inside the dot product.
const FUSED_BF16_MAX_T: usize = 4;
/// Below this many multiply-adds a matmul runs on the calling thread.
const PARALLEL_MIN_WORK: usize = 1 << 16;
/// From this many tokens on, a matmul is a GEMM (the `gemm` crate's packed micro-kernels) over
/// blocks of `GEMM_ROWS` weight rows converted to f32 a block at a time.
const GEMM_MIN_T: usize = 8;
const GEMM_ROWS: usize = 128;

thread_local! {
    /// Set while a task that is itself one of several running in parallel computes: its
    /// matmuls stay on its thread (no nested fork/join).
    static SERIAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with every [`linear`] inside it on the calling thread.
pub fn serial<T>(f: impl FnOnce() -> T) -> T {
    let was = SERIAL.with(|s| s.replace(true));
    let out = f();
    SERIAL.with(|s| s.set(was));
    out
}

/// `y = x · Wᵀ (+ b)`: x is `[T, K]`, W is `[N, K]`, the result `[T, N]`.
pub fn linear(x: ArrayView2<'_, f32>, w: &Weight, bias: Option<&[f32]>) -> Array2<f32> {
    let (t, k) = x.dim();
    assert_eq!(w.shape().len(), 2, "linear needs a 2-D weight");
    let (n, wk) = (w.shape()[0], w.shape()[1]);
    assert_eq!(k, wk, "linear: input width {k} != weight width {wk}");
    let x = x.as_standard_layout();
    let x = x.as_slice().expect("standard layout");

    if t >= GEMM_MIN_T {
        return linear_gemm(x, t, k, w, n, bias);
    }
    // yt is [N, T]: each block of weight rows owns a contiguous stretch of it.
    let mut yt = vec![0.0f32; n * t];
    let block = |(bi, out): (usize, &mut [f32])| {
        let row0 = bi * ROW_BLOCK;
        let rows = out.len() / t;
        // bf16 with few tokens: convert inside the dot (each weight is used only t times).
        if w.dtype() == DType::BF16 && t <= FUSED_BF16_MAX_T {
            let wb = &w.as_u16()[row0 * k..(row0 + rows) * k];
            for r in 0..rows {
                let wr = &wb[r * k..(r + 1) * k];
                for ti in 0..t {
                    out[r * t + ti] = dot_bf16(wr, &x[ti * k..(ti + 1) * k]);
                }
            }
            return;
        }
        let mut buf = Vec::new();
        let wrows: &[f32] = match w.dtype() {
            DType::F32 => &w.as_f32()[row0 * k..(row0 + rows) * k],
            _ => {
                buf.resize(rows * k, 0.0);
                w.read_f32(row0 * k, &mut buf);
                &buf
            }
        };
        for ti in 0..t {
            let xt = &x[ti * k..(ti + 1) * k];
            for r in 0..rows {
                out[r * t + ti] = dot(&wrows[r * k..(r + 1) * k], xt);
            }
        }
    };
    if n * k * t >= PARALLEL_MIN_WORK && rayon::current_num_threads() > 1 && !SERIAL.with(|s| s.get()) {
        yt.par_chunks_mut(ROW_BLOCK * t).enumerate().for_each(block);
    } else {
        yt.chunks_mut(ROW_BLOCK * t).enumerate().for_each(block);
    }

    let mut y = if t == 1 {
        Array2::from_shape_vec((1, n), yt).expect("shape")
    } else {
        Array2::from_shape_vec((n, t), yt)
            .expect("shape")
            .reversed_axes()
            .as_standard_layout()
            .into_owned()
    };
    if let Some(b) = bias {
        for mut row in y.rows_mut() {
            for (v, bb) in row.iter_mut().zip(b) {
                *v += bb;
            }
        }
    }
    y
}

/// Many tokens: `y[T, N] = x[T, K] · W[N, K]ᵀ` as GEMMs over blocks of weight rows, each block
/// converted to f32 once and used for every token; the blocks run in parallel.
fn linear_gemm(x: &[f32], t: usize, k: usize, w: &Weight, n: usize, bias: Option<&[f32]>) -> Array2<f32> {
    let mut y = vec![0.0f32; t * n]; // (T, N), row-major
    let blocks = n.div_ceil(GEMM_ROWS);
    // Column blocks of y are not contiguous: each block writes its own [T, rows] buffer.
    let block = |bi: usize| -> Vec<f32> {
        let row0 = bi * GEMM_ROWS;
        let rows = GEMM_ROWS.min(n - row0);
        let mut conv = Vec::new();
        let wrows: &[f32] = match w.dtype() {
            DType::F32 => &w.as_f32()[row0 * k..(row0 + rows) * k],
            _ => {
                conv.resize(rows * k, 0.0);
                w.read_f32(row0 * k, &mut conv);
                &conv
            }
        };
        let mut out = vec![0.0f32; t * rows]; // (T, rows)
        // SAFETY: every pointer covers its matrix for the strides given: out is T×rows
        // row-major (rs = rows, cs = 1), x is T×K row-major (rs = k, cs = 1), and wrows is
        // rows×K row-major, read as its transpose K×rows (rs = 1, cs = k).
        unsafe {
            gemm::gemm(
                t,
                rows,
                k,
                out.as_mut_ptr(),
                1,
                rows as isize,
                false,
                x.as_ptr(),
                1,
                k as isize,
                wrows.as_ptr(),
                k as isize,
                1,
                0.0f32,
                1.0f32,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        out
    };
    let parallel =
        n * k * t >= PARALLEL_MIN_WORK && rayon::current_num_threads() > 1 && !SERIAL.with(|s| s.get());
    let outs: Vec<Vec<f32>> = if parallel {
        (0..blocks).into_par_iter().map(block).collect()
    } else {
        (0..blocks).map(block).collect()
    };
    for (bi, out) in outs.iter().enumerate() {
        let row0 = bi * GEMM_ROWS;
        let rows = out.len() / t;
        for ti in 0..t {
            y[ti * n + row0..ti * n + row0 + rows].copy_from_slice(&out[ti * rows..(ti + 1) * rows]);
        }
    }
    if let Some(b) = bias {
        for row in y.chunks_mut(n) {
            for (v, bb) in row.iter_mut().zip(b) {
                *v += bb;
            }
        }
    }
    Array2::from_shape_vec((t, n), y).expect("shape")
}

/// Dot product of two equal-length f32 slices.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports avx2 and fma (checked just above).
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

/// Four 8-wide FMA accumulators, 32 values a step (one f32 vector of weights and one of x per
/// accumulator); the tail in scalar.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    debug_assert_eq!(a.len(), b.len());
    let n = a.len().min(b.len());
    let body = n / 32 * 32;
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i < body {
        for (j, accj) in acc.iter_mut().enumerate() {
            // SAFETY: i + 8j + 8 <= body <= n, so both 8-value loads are inside the slices.
            let (x, y) = unsafe {
                (
                    _mm256_loadu_ps(ap.add(i + 8 * j)),
                    _mm256_loadu_ps(bp.add(i + 8 * j)),
                )
            };
            *accj = _mm256_fmadd_ps(x, y, *accj);
        }
        i += 32;
    }
    let mut s = hsum(_mm256_add_ps(
        _mm256_add_ps(acc[0], acc[1]),
        _mm256_add_ps(acc[2], acc[3]),
    ));
    for (x, y) in a[body..n].iter().zip(&b[body..n]) {
        s += x * y;
    }
    s
}

/// Sum of the eight lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn hsum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    let q = _mm_add_ss(q, _mm_shuffle_ps::<1>(q, q));
    _mm_cvtss_f32(q)
}

/// Dot product of bf16 weights (as bits) with f32 values.
#[inline]
pub fn dot_bf16(w: &[u16], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports avx2 and fma (checked just above).
            return unsafe { dot_bf16_avx2(w, x) };
        }
    }
    dot_bf16_portable(w, x)
}

/// As [`dot_avx2`], each 8 bf16 weights widened to f32 in registers (zero-extend, shift 16).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_bf16_avx2(w: &[u16], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    debug_assert_eq!(w.len(), x.len());
    let n = w.len().min(x.len());
    let body = n / 32 * 32;
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i < body {
        for (j, accj) in acc.iter_mut().enumerate() {
            // SAFETY: i + 8j + 8 <= body <= n: the 8 u16 (16 bytes) and 8 f32 loaded are inside
            // the slices.
            let (wv, xv) = unsafe {
                (
                    _mm_loadu_si128(wp.add(i + 8 * j).cast::<__m128i>()),
                    _mm256_loadu_ps(xp.add(i + 8 * j)),
                )
            };
            let wf = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(wv)));
            *accj = _mm256_fmadd_ps(wf, xv, *accj);
        }
        i += 32;
    }
    let mut s = hsum(_mm256_add_ps(
        _mm256_add_ps(acc[0], acc[1]),
        _mm256_add_ps(acc[2], acc[3]),
    ));
    for (wk, xk) in w[body..n].iter().zip(&x[body..n]) {
        s += f32::from_bits((*wk as u32) << 16) * xk;
    }
    s
}

#[inline(always)]
fn dot_bf16_portable(w: &[u16], x: &[f32]) -> f32 {
    debug_assert_eq!(w.len(), x.len());
    let mut acc = [0.0f32; LANES];
    let (wc, wt) = w.split_at(w.len() / LANES * LANES);
    let (xc, xt) = x.split_at(wc.len());
    for (a, b) in wc.chunks_exact(LANES).zip(xc.chunks_exact(LANES)) {
        for i in 0..LANES {
            acc[i] += f32::from_bits((a[i] as u32) << 16) * b[i];
        }
    }
    let mut s = 0.0;
    for (a, b) in wt.iter().zip(xt) {
        s += f32::from_bits((*a as u32) << 16) * b;
    }
    reduce(acc) + s
}

/// Pairwise sum of the accumulators.
#[inline(always)]
fn reduce(mut acc: [f32; LANES]) -> f32 {
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            acc[i] += acc[i + w];
        }
    }
    acc[0]
}

/// Independent accumulators, so that the compiler vectorises the loop and the additions of
/// several vectors overlap instead of waiting on one another.
#[inline(always)]
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; LANES];
    let (ac, at) = a.split_at(a.len() / LANES * LANES);
    let (bc, bt) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(LANES).zip(bc.chunks_exact(LANES)) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = 0.0;
    for (x, y) in at.iter().zip(bt) {
        s += x * y;
    }
    reduce(acc) + s
}

/// RMSNorm of each row of `x` in place: `w * x / sqrt(mean(x²) + eps)`.
pub fn rms_norm_rows(x: &mut Array2<f32>, w: &[f32], eps: f32) {
    for mut row in x.rows_mut() {
        rms_norm(row.as_slice_mut().expect("standard layout"), w, eps);
    }
}

/// RMSNorm of one vector in place.
pub fn rms_norm(x: &mut [f32], w: &[f32], eps: f32) {
    debug_assert_eq!(x.len(), w.len());
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    for (v, g) in x.iter_mut().zip(w) {
        *v = g * (*v * inv);
    }
}

/// `silu(a) * b` elementwise, into `a`.
pub fn silu_mul(a: &mut [f32], b: &[f32]) {
    for (g, u) in a.iter_mut().zip(b) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// Softmax in place (max-subtracted).
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

/// Logistic sigmoid.
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn linear_matches_naive_for_every_dtype() {
        // t = 1 and 3 take the fused bf16 path, t = 7 the converting one.
        for t in [1, 3, 7] {
            check_linear(37, 19, t);
        }
    }

    fn check_linear(n: usize, k: usize, t: usize) {
        use crate::weights::AlignedBytes;
        use std::sync::Arc;
        let wv: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let x = Array2::from_shape_fn((t, k), |(i, j)| (i as f32 - j as f32) / 10.0);
        let bias: Vec<f32> = (0..n).map(|i| i as f32 / 100.0).collect();
        let w32 = Weight::from_f32(&wv, vec![n, k]);
        let y = linear(x.view(), &w32, Some(&bias));
        for ti in 0..t {
            for ni in 0..n {
                let want: f32 = (0..k).map(|j| wv[ni * k + j] * x[[ti, j]]).sum::<f32>() + bias[ni];
                assert!((y[[ti, ni]] - want).abs() < 1e-4, "{ti},{ni}");
            }
        }
        // bf16 and f16 weights give what their f32 values give.
        let bits: Vec<u8> = wv
            .iter()
            .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
            .collect();
        let wb = Weight::new(
            Arc::new(AlignedBytes::copy_from(&bits)),
            0,
            DType::BF16,
            vec![n, k],
        );
        let wb_f32 = Weight::from_f32(&wb.to_f32_vec(), vec![n, k]);
        assert_eq!(linear(x.view(), &wb, None), linear(x.view(), &wb_f32, None));
        let h: Vec<u8> = wv
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let wh = Weight::new(Arc::new(AlignedBytes::copy_from(&h)), 0, DType::F16, vec![n, k]);
        let wh_f32 = Weight::from_f32(&wh.to_f32_vec(), vec![n, k]);
        assert_eq!(linear(x.view(), &wh, None), linear(x.view(), &wh_f32, None));
    }

    #[test]
    fn rms_norm_unit_rows() {
        let mut x = array![[3.0f32, 4.0], [0.0, 2.0]];
        rms_norm_rows(&mut x, &[1.0, 2.0], 0.0);
        let r = (12.5f32).sqrt();
        assert!((x[[0, 0]] - 3.0 / r).abs() < 1e-6);
        assert!((x[[0, 1]] - 8.0 / r).abs() < 1e-6);
        assert!((x[[1, 1]] - 2.0 * 2.0 / 2.0f32.sqrt()).abs() < 1e-6);
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut v = [1.0, 2.0, 3.0, 1000.0];
        softmax(&mut v);
        assert!((v.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(v[3] > 0.99);
    }
}
