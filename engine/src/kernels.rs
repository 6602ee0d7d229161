//! Numeric kernels of the forward pass, on f32 activations and f32/f16/bf16 weights.
//!
//! Dimensions: `T` = tokens in the pass, `K` = input width, `N` = output width.
//! Weights keep the checkpoint's `[N, K]` layout (one output row per weight row): a row-wise
//! dot product streams each weight row once, which is what decode (T = 1) is bound by.

use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;

use crate::ggml::BlockType;
use crate::quant;
use crate::weights::{DType, QuantParts, Weight};

#[cfg(target_arch = "x86_64")]
mod avx512;
mod mxfp4;

pub use mxfp4::{linear_mxfp4, mxfp4_rows_on};

/// Rows of W converted and multiplied together: x[t] stays in L1 across the block.
const ROW_BLOCK: usize = 16;
/// Accumulators per dot product: 8 AVX2 vectors in flight.
const LANES: usize = 64;
/// Below this many multiply-adds a matmul runs on the calling thread.
const PARALLEL_MIN_WORK: usize = 1 << 16;

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
///
/// Every T runs through the same tile kernel (up to 4 tokens per weight load, blocks of rows in
/// parallel). A GEMM path (the `gemm` crate's packed f32 micro-kernels over blocks of weight
/// rows converted to f32) used to take over from T = 8: measured on this 2-core machine it ran
/// 16–75 GFLOP/s against the tile kernel's 120–160 on bf16 projections of 512–4096 × 2048 at
/// T = 8–256, and an expert of Qwen3-Coder-Next's shape (2048 × 128) took 1.6 ms instead of
/// 0.19 at T = 8 — so prefill ran at a third of the speed it could.
pub fn linear(x: ArrayView2<'_, f32>, w: &Weight, bias: Option<&[f32]>) -> Array2<f32> {
    let (t, k) = x.dim();
    assert_eq!(w.shape().len(), 2, "linear needs a 2-D weight");
    let (n, wk) = (w.shape()[0], w.shape()[1]);
    assert_eq!(k, wk, "linear: input width {k} != weight width {wk}");
    let x = x.as_standard_layout();
    let x = x.as_slice().expect("standard layout");

    let parallel =
        n * k * t >= PARALLEL_MIN_WORK && rayon::current_num_threads() > 1 && !SERIAL.with(|s| s.get());
    if let Some(q) = w.quant() {
        return finish(quant_rows(w, q, k, x, t, n, parallel), t, n, bias);
    }
    // yt is [N, T]: each block of weight rows owns a contiguous stretch of it. Up to 4 tokens
    // (one pass of tiles over the rows), long runs of rows, since the tile kernel prefetches
    // each tile's successor: all of them on one thread, a few blocks per thread otherwise.
    // More tokens: blocks of ROW_BLOCK rows, which stay in cache while every token passes.
    // GGUF f16/bf16 matrices: the activations rounded to the same type first (llama.cpp's
    // arithmetic for them); other block types: rounded to their 8-bit format.
    let rounded;
    let x = match w.dtype() {
        DType::Block(BlockType::F16) => {
            rounded = x
                .iter()
                .map(|&v| half::f16::from_f32(v).to_f32())
                .collect::<Vec<f32>>();
            &rounded[..]
        }
        DType::Block(BlockType::BF16) => {
            rounded = x
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_f32())
                .collect::<Vec<f32>>();
            &rounded[..]
        }
        _ => x,
    };
    let acts = match w.dtype() {
        DType::Block(b) if !b.is_float() => Some(crate::ggml::quantize_tokens(b, x, t, k)),
        _ => None,
    };
    let mut yt = vec![0.0f32; n * t];
    let rows_per_block = match (t <= 4, parallel) {
        (false, _) => ROW_BLOCK,
        (true, false) => n.max(1),
        (true, true) => (n / (4 * rayon::current_num_threads()))
            .next_multiple_of(ROW_BLOCK)
            .max(ROW_BLOCK),
    };
    let block = |(bi, out): (usize, &mut [f32])| {
        let row0 = bi * rows_per_block;
        let rows = out.len() / t;
        match w.dtype() {
            // f32 and bf16 rows are read as they are (bf16 widened in registers).
            DType::F32 => tile(
                Rows::F32(&w.as_f32()[row0 * k..(row0 + rows) * k]),
                rows,
                k,
                x,
                t,
                out,
            ),
            DType::BF16 | DType::Block(BlockType::BF16) => tile(
                Rows::Bf16(&w.as_u16()[row0 * k..(row0 + rows) * k]),
                rows,
                k,
                x,
                t,
                out,
            ),
            // f16 converted ROW_BLOCK rows at a time.
            DType::F16 | DType::U32 | DType::Block(BlockType::F16) => {
                let mut buf = vec![0.0; ROW_BLOCK.min(rows) * k];
                for (sub, o) in out.chunks_mut(ROW_BLOCK * t).enumerate() {
                    let (r, m) = (row0 + sub * ROW_BLOCK, o.len() / t);
                    w.read_f32(r * k, &mut buf[..m * k]);
                    tile(Rows::F32(&buf[..m * k]), m, k, x, t, o);
                }
            }
            // ggml blocks: each token's activations rounded to the type's 8-bit format once
            // (below), then integer dot products row by row, as llama.cpp computes them.
            DType::Block(b) => {
                let rb = b.row_bytes(k);
                let bytes = &w.bytes()[row0 * rb..(row0 + rows) * rb];
                crate::ggml::dot_rows(b, bytes, rows, k, acts.as_deref().unwrap_or(&[]), out);
            }
        }
    };
    if parallel {
        yt.par_chunks_mut(rows_per_block * t).enumerate().for_each(block);
    } else {
        yt.chunks_mut(rows_per_block * t).enumerate().for_each(block);
    }
    finish(yt, t, n, bias)
}

/// Asks the CPU to start reading the `len` bytes at `at` (a hint: never faults, whatever the
/// address).
#[inline(always)]
pub(crate) fn prefetch_stretch(at: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let mut b = 0;
        while b < len {
            // SAFETY: a prefetch reads nothing architecturally and never faults; the address
            // is formed with wrapping arithmetic.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    at.wrapping_add(b).cast::<i8>(),
                )
            };
            b += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (at, len);
}

/// Asks the CPU to start reading the first `bytes` of `w` (a hint; never faults). A matrix's
/// first rows are read before the hardware prefetcher has found the stream, so the forward pass
/// names the next matrices it will read while it computes the current one.
pub fn prefetch_head(w: &Weight, bytes: usize) {
    let b = w.bytes();
    prefetch_stretch(b.as_ptr(), bytes.min(b.len()));
}

/// Bytes of the first tile [`linear`] reads of `w` (8 rows), or of its first 16 KiB if more.
pub fn head_bytes(w: &Weight) -> usize {
    (w.nbytes() / w.shape().first().copied().unwrap_or(1).max(1) * 8).min(16 << 10)
}

/// `yt` (`[N, T]`) as `y` (`[T, N]`), plus the bias.
fn finish(yt: Vec<f32>, t: usize, n: usize, bias: Option<&[f32]>) -> Array2<f32> {
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

/// A quantised weight's rows against `t` tokens (`yt`, `[N, T]`): each row's dot product on
/// its packed values ([`quant::dot_row`]), scales and biases converted a block of rows at a
/// time; the weight is never widened to f32 as a whole. One sum per (row, token), so a token
/// alone gets what it gets among others.
fn quant_rows(
    w: &Weight,
    q: &QuantParts,
    k: usize,
    x: &[f32],
    t: usize,
    n: usize,
    parallel: bool,
) -> Vec<f32> {
    let spec = q.spec;
    let (wpr, groups) = (spec.words_per_row(k), k / spec.group_size);
    let xs: Vec<&[f32]> = x.chunks_exact(k).collect();
    let sums: Vec<Vec<f32>> = xs.iter().map(|x| quant::group_sums(x, spec.group_size)).collect();
    let words = w.as_u32();
    let block = |(bi, out): (usize, &mut [f32])| {
        let row0 = bi * ROW_BLOCK;
        let rows = out.len() / t;
        let (mut sc, mut bs) = (vec![0.0; rows * groups], vec![0.0; rows * groups]);
        q.scales.read_f32(row0 * groups, &mut sc);
        q.biases.read_f32(row0 * groups, &mut bs);
        for r in 0..rows {
            let wr = &words[(row0 + r) * wpr..(row0 + r + 1) * wpr];
            let (s, b) = (
                &sc[r * groups..(r + 1) * groups],
                &bs[r * groups..(r + 1) * groups],
            );
            for ti in 0..t {
                out[r * t + ti] = quant::dot_row(spec, wr, s, b, xs[ti], &sums[ti]);
            }
        }
    };
    let mut yt = vec![0.0f32; n * t];
    if parallel {
        yt.par_chunks_mut(ROW_BLOCK * t).enumerate().for_each(block);
    } else {
        yt.chunks_mut(ROW_BLOCK * t).enumerate().for_each(block);
    }
    yt
}

/// Weight rows as a tile kernel reads them.
#[derive(Clone, Copy)]
enum Rows<'a> {
    F32(&'a [f32]),
    /// bf16 bits, widened to f32 in registers.
    Bf16(&'a [u16]),
}

/// [`Simd::detected`]'s answer plus one (0: not decided yet).
static SIMD: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// The vector instructions the tile kernel runs on, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Simd {
    /// 16-wide f32 FMAs (avx512f, avx512bw and avx512vl).
    Avx512,
    /// 8-wide f32 FMAs (avx2 and fma).
    Avx2,
    /// Scalar code the compiler vectorises as the build target allows.
    Portable,
}

impl Simd {
    /// What the tile kernel runs on: the best this CPU supports, unless `SHADOWMOE_SIMD`
    /// (`avx512`, `avx2`, `portable`) or [`Simd::set`] asked for a lesser one.
    pub fn detected() -> Simd {
        match SIMD.load(std::sync::atomic::Ordering::Relaxed) {
            0 => {
                let asked = match std::env::var("SHADOWMOE_SIMD").ok().as_deref() {
                    Some("avx2") => Simd::Avx2,
                    Some("portable") => Simd::Portable,
                    _ => Simd::supported(),
                };
                asked.set()
            }
            1 => Simd::Avx512,
            2 => Simd::Avx2,
            _ => Simd::Portable,
        }
    }

    /// Makes every later matmul of the process run on `self` (or the best the CPU supports,
    /// if that is less), to compare them side by side in a benchmark; returns what was set.
    pub fn set(self) -> Simd {
        let level = if (self as u8) < (Simd::supported() as u8) {
            Simd::supported()
        } else {
            self
        };
        SIMD.store(level as u8 + 1, std::sync::atomic::Ordering::Relaxed);
        level
    }

    /// The best this CPU supports.
    pub fn supported() -> Simd {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") && has!("avx512bw") && has!("avx512vl") {
                return Simd::Avx512;
            }
            if has!("avx2") && has!("fma") {
                return Simd::Avx2;
            }
        }
        Simd::Portable
    }
}

/// `out[r * t + ti] = W[r] · x[ti]` for `rows` weight rows of width `k` and `t` tokens (`x` is
/// `[t, k]` row-major). Each (row, token) sum is accumulated in the same order whatever the
/// tile it falls in, so one token alone gets exactly what it gets among others.
fn tile(w: Rows<'_>, rows: usize, k: usize, x: &[f32], t: usize, out: &mut [f32]) {
    tile_on(Simd::detected(), w, rows, k, x, t, out)
}

/// [`tile`] on the given instructions (at most [`Simd::supported`]).
fn tile_on(simd: Simd, w: Rows<'_>, rows: usize, k: usize, x: &[f32], t: usize, out: &mut [f32]) {
    assert!(
        (simd as u8) >= (Simd::supported() as u8),
        "{simd:?} is not supported by this CPU"
    );
    #[cfg(target_arch = "x86_64")]
    match simd {
        // SAFETY (both): the CPU supports the instructions (asserted above).
        Simd::Avx512 => {
            unsafe {
                match w {
                    Rows::F32(s) => avx512::tiles(s, rows, k, x, t, out),
                    Rows::Bf16(s) => avx512::tiles(s, rows, k, x, t, out),
                }
            }
            return;
        }
        Simd::Avx2 => {
            unsafe { tile_avx2(w, rows, k, x, t, out) };
            return;
        }
        Simd::Portable => {}
    }
    for r in 0..rows {
        for ti in 0..t {
            let xt = &x[ti * k..(ti + 1) * k];
            out[r * t + ti] = match w {
                Rows::F32(w) => dot_portable(&w[r * k..(r + 1) * k], xt),
                Rows::Bf16(w) => dot_bf16_portable(&w[r * k..(r + 1) * k], xt),
            };
        }
    }
}

/// Tiles of `R` rows × `T` tokens: each 8 weights are loaded (and widened) once for `T` tokens,
/// each 8 inputs once for `R` rows, with `R·T` independent accumulators in flight (8 or 12 of
/// the 16 vector registers).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2(w: Rows<'_>, rows: usize, k: usize, x: &[f32], t: usize, out: &mut [f32]) {
    // SAFETY: as this function's (the CPU supports avx2 and fma).
    unsafe {
        match w {
            Rows::F32(s) => tiles_avx2(s, rows, k, x, t, out),
            Rows::Bf16(s) => tiles_avx2(s, rows, k, x, t, out),
        }
    }
}

/// [`tile_avx2`] over one element type.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tiles_avx2<W: Lane>(w: &[W], rows: usize, k: usize, x: &[f32], t: usize, out: &mut [f32]) {
    debug_assert!(x.len() >= t * k && out.len() >= rows * t && w.len() >= rows * k);
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
                    2 if left >= 4 => micro::<4, 2, W>(w, rows, k, r0, x, t0, out, t),
                    2 => micro::<1, 2, W>(w, rows, k, r0, x, t0, out, t),
                    3 if left >= 4 => micro::<4, 3, W>(w, rows, k, r0, x, t0, out, t),
                    3 => micro::<1, 3, W>(w, rows, k, r0, x, t0, out, t),
                    _ if left >= 2 => micro::<2, 4, W>(w, rows, k, r0, x, t0, out, t),
                    _ => micro::<1, 4, W>(w, rows, k, r0, x, t0, out, t),
                }
            };
        }
        t0 += tn;
    }
}

/// A weight element type the tile kernel widens to f32.
#[cfg(target_arch = "x86_64")]
trait Lane: Copy {
    /// Eight weights from `p` as f32.
    ///
    /// # Safety
    /// `p .. p + 8` must be readable; the CPU must support avx2.
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    fn to_f32(self) -> f32;
}

#[cfg(target_arch = "x86_64")]
impl Lane for f32 {
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller guarantees 8 readable values.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

#[cfg(target_arch = "x86_64")]
impl Lane for u16 {
    #[inline(always)]
    unsafe fn load8(p: *const u16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 8 readable values (16 bytes) and avx2.
        unsafe {
            let v = _mm_loadu_si128(p.cast::<__m128i>());
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(v)))
        }
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self as u32) << 16)
    }
}

/// One `R × T` tile at rows `r0..`, tokens `t0..`; returns `R`. One accumulator per (row,
/// token) over `k` in steps of 8, then the lanes' sum, then the scalar tail.
///
/// # Safety
/// `w` holds rows `r0 .. r0 + R` of width `k`, `x` tokens `t0 .. t0 + T`, `out` is
/// `[rows, t]` with those entries inside; the CPU supports avx2 and fma.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro<const R: usize, const T: usize, W: Lane>(
    w: &[W],
    rows: usize,
    k: usize,
    r0: usize,
    x: &[f32],
    t0: usize,
    out: &mut [f32],
    t: usize,
) -> usize {
    use std::arch::x86_64::*;
    let body = k / 8 * 8;
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    // The next tile's rows, read ahead at this tile's pace (see avx512::micro).
    let next = wp.wrapping_add((r0 + R) * k).cast::<u8>();
    let ahead = r0 + 2 * R <= rows;
    let per_step = R * 8 * std::mem::size_of::<W>();
    let mut i = 0;
    while i < body {
        if ahead {
            prefetch_stretch(next.wrapping_add(i / 8 * per_step), per_step);
        }
        let mut xv = [_mm256_setzero_ps(); T];
        for (j, v) in xv.iter_mut().enumerate() {
            // SAFETY: token t0 + j < t and i + 8 <= k: inside x.
            *v = unsafe { _mm256_loadu_ps(xp.add((t0 + j) * k + i)) };
        }
        for (r, accr) in acc.iter_mut().enumerate() {
            // SAFETY: row r0 + r is inside w and i + 8 <= k.
            let wv = unsafe { W::load8(wp.add((r0 + r) * k + i)) };
            for (a, xj) in accr.iter_mut().zip(&xv) {
                *a = _mm256_fmadd_ps(wv, *xj, *a);
            }
        }
        i += 8;
    }
    for (r, accr) in acc.iter().enumerate() {
        let wr = &w[(r0 + r) * k..(r0 + r + 1) * k];
        for (j, a) in accr.iter().enumerate() {
            let xt = &x[(t0 + j) * k..(t0 + j + 1) * k];
            let mut s = hsum(*a);
            for (wk, xk) in wr[body..].iter().zip(&xt[body..]) {
                s += wk.to_f32() * xk;
            }
            out[(r0 + r) * t + t0 + j] = s;
        }
    }
    R
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
        // Every tile shape (t = 1..4, then 4 + 1..3) with remainder rows and a scalar tail;
        // t = 9 is a GEMM.
        for t in [1, 2, 3, 4, 5, 7, 9] {
            check_linear(37, 19, t);
        }
        check_linear(64, 2048, 3);
    }

    #[test]
    fn a_token_alone_gets_what_it_gets_among_others() {
        use crate::weights::AlignedBytes;
        use std::sync::Arc;
        let (n, k) = (45, 203);
        let bits: Vec<u8> = (0..n * k)
            .flat_map(|i| half::bf16::from_f32(((i * 37) % 61) as f32 / 30.0 - 1.0).to_le_bytes())
            .collect();
        let w = Weight::new(
            Arc::new(AlignedBytes::copy_from(&bits)),
            0,
            DType::BF16,
            vec![n, k],
        );
        let x = Array2::from_shape_fn((7, k), |(i, j)| ((i * 13 + j * 7) % 17) as f32 / 8.0 - 1.0);
        for t in 1..=7 {
            let many = linear(x.slice(ndarray::s![..t, ..]), &w, None);
            for ti in 0..t {
                let one = linear(x.slice(ndarray::s![ti..ti + 1, ..]), &w, None);
                assert_eq!(one.row(0), many.row(ti), "token {ti} of {t}");
            }
        }
    }

    #[test]
    fn every_simd_level_matches_an_f64_reference_and_keeps_tokens_apart() {
        let levels: Vec<Simd> = [Simd::Avx512, Simd::Avx2, Simd::Portable]
            .into_iter()
            .filter(|s| (*s as u8) >= (Simd::supported() as u8))
            .collect();
        // Widths with and without a tail after 8- and 16-wide steps; rows past every tile.
        for (n, k) in [(37, 19), (16, 1024), (45, 203), (9, 7), (24, 33)] {
            let wv: Vec<f32> = (0..n * k)
                .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
                .collect();
            let wb: Vec<u16> = wv.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
            let wbf: Vec<f32> = wb.iter().map(|&b| f32::from_bits(u32::from(b) << 16)).collect();
            let x: Vec<f32> = (0..7 * k).map(|i| ((i * 13) % 17) as f32 / 8.0 - 1.0).collect();
            for &simd in &levels {
                for t in 1..=7 {
                    for (rows, vals) in [(Rows::F32(&wv), &wv), (Rows::Bf16(&wb), &wbf)] {
                        let mut out = vec![0.0f32; n * t];
                        tile_on(simd, rows, n, k, &x, t, &mut out);
                        for r in 0..n {
                            for ti in 0..t {
                                let terms =
                                    (0..k).map(|j| f64::from(vals[r * k + j]) * f64::from(x[ti * k + j]));
                                let want: f64 = terms.clone().sum();
                                let scale: f64 = terms.map(f64::abs).sum::<f64>() + 1.0;
                                let got = out[r * t + ti];
                                assert!(
                                    (f64::from(got) - want).abs() < 1e-5 * scale,
                                    "{simd:?} {n}x{k} t {t}: {got} vs {want}"
                                );
                                let mut one = vec![0.0f32; n];
                                tile_on(simd, rows, n, k, &x[ti * k..(ti + 1) * k], 1, &mut one);
                                assert_eq!(one[r], got, "{simd:?}: token {ti} alone, of {t}");
                            }
                        }
                    }
                }
            }
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
                // An f64 reference; f32 sums in any order stay within a few ulps of Σ|w·x|.
                let terms = (0..k).map(|j| f64::from(wv[ni * k + j]) * f64::from(x[[ti, j]]));
                let want = terms.clone().sum::<f64>() + f64::from(bias[ni]);
                let scale: f64 = terms.map(f64::abs).sum::<f64>() + 1.0;
                let err = (f64::from(y[[ti, ni]]) - want).abs();
                assert!(err < 1e-5 * scale, "{ti},{ni}: {} vs {want}", y[[ti, ni]]);
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
