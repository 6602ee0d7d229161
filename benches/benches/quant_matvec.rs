//! The quantised mat-vec against bf16 on the same shapes: one decode token through the experts
//! of Qwen3-Coder-Next (gate and up `[512, 2048]`, down `[2048, 512]`), MLX 4-bit and 8-bit
//! (group 64, bf16 scales and biases, as the hub's checkpoints hold them) next to bf16, all
//! through the engine's `linear` at one token. Each run cycles over more distinct experts than
//! any cache holds, so the weights stream from DRAM as they do in decode. Prints per format the
//! bytes of one expert, µs per expert (its three mat-vecs), the GB/s of weights streamed, the
//! expert-compute tok/s of Qwen3-Coder-Next (48 MoE layers × top-10 experts per token), the
//! ratio against bf16, and this machine's memory-read bandwidth measured in the same run.
//!
//! Then gpt-oss-20b's experts (gate, up and down all `[2880, 2880]`) at 1 and 8 tokens: MXFP4
//! (ggml's `block_mxfp4`, f32 activations) through the engine's kernel (`linear_mxfp4`, at the
//! detected vector level and, where that is AVX-512, at AVX2 too), through the path it replaced
//! (each row dequantised into a buffer, then one f32 dot product per token: the baseline), and
//! bf16 through `linear`, all with the expert's biases; µs per expert, GB/s of weights and the
//! ratios against the baseline and bf16.
//!
//! Then the same experts as GGUF files hold them, computed as llama.cpp computes them (each
//! token's activations rounded to Q8_0, integer dot products per 32-value block): MXFP4 (as
//! gpt-oss's GGUF files ship their experts) and Q8_0, each through the scalar reference
//! (`SHADOWMOE_SIMD=portable`'s path), the AVX2 kernels and the AVX-512 VNNI kernels (all give
//! the same bits), at 1 and 8 tokens; µs per expert, GB/s and the ratio against the scalar
//! reference of the same type.
//!
//!     cargo bench --profile dev -p shadowmoe-benches --bench quant_matvec
//!
//! (`dev` is the workspace's optimised profile: our crates at opt-level 3, see Cargo.toml.)
//!
//! Environment: `SHADOWMOE_BENCH_REPEAT` (runs per row, median; default 5),
//! `SHADOWMOE_BENCH_EXPERTS` (distinct experts cycled; default 192),
//! `SHADOWMOE_BENCH_GPT_OSS_EXPERTS` (distinct gpt-oss experts cycled; default 8: 106 MB of
//! MXFP4, 398 MB of bf16).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Instant;

use ndarray::Array2;
use shadowmoe_benches::{env_or, memory_read_gbs};
use shadowmoe_engine::ggml::BlockType;
use shadowmoe_engine::kernels::{Simd, linear, linear_mxfp4};
use shadowmoe_engine::quant::QuantSpec;
use shadowmoe_engine::weights::{AlignedBytes, DType, QuantParts, Weight};

const HIDDEN: usize = 2048;
const WIDTH: usize = 512;
/// Expert mat-vecs per decode token of Qwen3-Coder-Next: 48 MoE layers × 10 experts.
const EXPERTS_PER_TOKEN: usize = 480;

/// Deterministic bytes (SplitMix64).
fn random_bytes(len: usize, seed: u64) -> AlignedBytes {
    let mut out = AlignedBytes::zeroed(len);
    let mut z = seed;
    for chunk in out.as_mut_slice().chunks_mut(8) {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut v = z;
        v = (v ^ (v >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        v = (v ^ (v >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        v ^= v >> 31;
        for (d, s) in chunk.iter_mut().zip(v.to_le_bytes()) {
            *d = s;
        }
    }
    out
}

/// bf16 values of magnitude below 2 (finite): random mantissa and sign, a small exponent.
fn bf16_weight(rows: usize, cols: usize, seed: u64) -> Weight {
    let mut b = random_bytes(rows * cols * 2, seed);
    for v in b.as_mut_slice().chunks_exact_mut(2) {
        let bits = u16::from_le_bytes([v[0], v[1]]);
        let bits = (bits & 0x807F) | (0x3C00 + ((bits >> 7) & 0x3) * 0x80);
        v.copy_from_slice(&bits.to_le_bytes());
    }
    Weight::new(Arc::new(b), 0, DType::BF16, vec![rows, cols])
}

fn quant_weight(rows: usize, cols: usize, bits: u32, seed: u64) -> Weight {
    let spec = QuantSpec::new(bits, 64, "bench").unwrap();
    let wpr = spec.words_per_row(cols);
    let words = Weight::new(
        Arc::new(random_bytes(rows * wpr * 4, seed)),
        0,
        DType::U32,
        vec![rows, wpr],
    );
    let groups = cols / spec.group_size;
    Weight::quantized(
        words,
        vec![rows, cols],
        QuantParts {
            spec,
            scales: bf16_weight(rows, groups, seed ^ 1),
            biases: bf16_weight(rows, groups, seed ^ 2),
        },
    )
}

struct Expert {
    gate: Weight,
    up: Weight,
    down: Weight,
}

impl Expert {
    fn bytes(&self) -> usize {
        let one = |w: &Weight| w.nbytes() + w.quant().map_or(0, |q| q.scales.nbytes() + q.biases.nbytes());
        one(&self.gate) + one(&self.up) + one(&self.down)
    }
}

fn experts(format: &str, n: usize) -> Vec<Expert> {
    (0..n as u64)
        .map(|i| {
            let make = |rows, cols, s| match format {
                "bf16" => bf16_weight(rows, cols, s),
                "4-bit" => quant_weight(rows, cols, 4, s),
                _ => quant_weight(rows, cols, 8, s),
            };
            Expert {
                gate: make(WIDTH, HIDDEN, i * 3),
                up: make(WIDTH, HIDDEN, i * 3 + 1),
                down: make(HIDDEN, WIDTH, i * 3 + 2),
            }
        })
        .collect()
}

/// Seconds per expert (gate, up, down mat-vecs on one token), median of `repeat` passes over
/// all of `set`.
fn time_experts(set: &[Expert], repeat: usize) -> f64 {
    let x = Array2::from_shape_fn((1, HIDDEN), |(_, j)| ((j * 37 % 101) as f32 / 50.0) - 1.0);
    let h = Array2::from_shape_fn((1, WIDTH), |(_, j)| ((j * 53 % 97) as f32 / 48.0) - 1.0);
    let mut runs = Vec::new();
    for _ in 0..repeat + 1 {
        let t = Instant::now();
        for e in set {
            std::hint::black_box(linear(x.view(), &e.gate, None));
            std::hint::black_box(linear(x.view(), &e.up, None));
            std::hint::black_box(linear(h.view(), &e.down, None));
        }
        runs.push(t.elapsed().as_secs_f64() / set.len() as f64);
    }
    runs.remove(0); // the first pass warms the pool and the page tables
    runs.sort_by(f64::total_cmp);
    runs[runs.len() / 2]
}

/// gpt-oss-20b: hidden size and expert width.
const GPT_OSS: usize = 2880;

/// An MXFP4 matrix of random nibbles, scales 2^-9 .. 2^-1 (E8M0 bytes 118..126, the range
/// trained weights use).
fn mxfp4_weight(rows: usize, cols: usize, seed: u64) -> Weight {
    let mut b = random_bytes(rows * cols / 32 * 17, seed);
    for block in b.as_mut_slice().chunks_exact_mut(17) {
        block[0] = 118 + block[0] % 8;
    }
    Weight::new(Arc::new(b), 0, DType::Block(BlockType::MXFP4), vec![rows, cols])
}

/// How a gpt-oss expert's matrices are computed.
#[derive(Clone, Copy, PartialEq)]
enum Path {
    /// `linear` (bf16 weights).
    Linear,
    /// `linear_mxfp4` at this vector level.
    Mxfp4(Simd),
    /// What `gpt_oss::expert_linear` did before `linear_mxfp4`: each row dequantised into a
    /// fresh buffer, one f32 dot product per token, rows in parallel.
    Dequantise,
    /// `linear` on ggml blocks (Q8_0 activations, integer dots) at this vector level
    /// (`Portable`: the scalar reference).
    Ggml(Simd),
}

fn dequantise_then_dot(x: ndarray::ArrayView2<'_, f32>, w: &Weight, bias: &[f32]) -> Array2<f32> {
    use rayon::prelude::*;
    let DType::Block(ty) = w.dtype() else {
        unreachable!("an MXFP4 weight")
    };
    let x = x.as_standard_layout();
    let (t, k) = x.dim();
    let n = w.shape()[0];
    let xs = x.as_slice().unwrap();
    let rb = ty.row_bytes(k);
    let mut yt = vec![0.0f32; n * t];
    let row = |(r, out): (usize, &mut [f32])| {
        let mut deq = vec![0.0f32; k];
        ty.dequantize(&w.bytes()[r * rb..(r + 1) * rb], &mut deq);
        for (i, o) in out.iter_mut().enumerate() {
            *o = shadowmoe_engine::kernels::dot(&deq, &xs[i * k..(i + 1) * k]) + bias[r];
        }
    };
    if n * t * k >= 1 << 16 {
        yt.par_chunks_mut(t).enumerate().for_each(row);
    } else {
        yt.chunks_mut(t).enumerate().for_each(row);
    }
    Array2::from_shape_fn((t, n), |(i, r)| yt[r * t + i])
}

/// Seconds per gpt-oss expert (its three `[2880, 2880]` matrices with biases, on `t` tokens),
/// median of `repeat` passes over all of `set`.
fn time_gpt_oss(set: &[Expert], path: Path, t: usize, repeat: usize) -> f64 {
    let x = Array2::from_shape_fn((t, GPT_OSS), |(i, j)| {
        ((j * 37 + i * 11) % 101) as f32 / 50.0 - 1.0
    });
    let bias = vec![0.01f32; GPT_OSS];
    let before = Simd::detected();
    if let Path::Mxfp4(simd) | Path::Ggml(simd) = path {
        simd.set();
    }
    let run = |w: &Weight| match path {
        Path::Linear | Path::Ggml(_) => linear(x.view(), w, Some(&bias)),
        Path::Mxfp4(_) => linear_mxfp4(x.view(), w, Some(&bias)),
        Path::Dequantise => dequantise_then_dot(x.view(), w, &bias),
    };
    let mut runs = Vec::new();
    for _ in 0..repeat + 1 {
        let start = Instant::now();
        for e in set {
            std::hint::black_box(run(&e.gate));
            std::hint::black_box(run(&e.up));
            std::hint::black_box(run(&e.down));
        }
        runs.push(start.elapsed().as_secs_f64() / set.len() as f64);
    }
    before.set();
    runs.remove(0); // the first pass warms the pool and the page tables
    runs.sort_by(f64::total_cmp);
    runs[runs.len() / 2]
}

/// The gpt-oss-20b table: per thread count and token count, the baseline (dequantise, then
/// dot), the MXFP4 kernel at each level, bf16.
fn gpt_oss_table(repeat: usize, counts: &[usize]) {
    let n: usize = env_or("SHADOWMOE_BENCH_GPT_OSS_EXPERTS", 8);
    let make = |f: fn(usize, usize, u64) -> Weight| -> Vec<Expert> {
        (0..n as u64)
            .map(|i| Expert {
                gate: f(GPT_OSS, GPT_OSS, 100 + i * 3),
                up: f(GPT_OSS, GPT_OSS, 100 + i * 3 + 1),
                down: f(GPT_OSS, GPT_OSS, 100 + i * 3 + 2),
            })
            .collect()
    };
    let (mx, bf) = (make(mxfp4_weight), make(bf16_weight));
    let best = Simd::supported();
    let mut rows = vec![("mxfp4 dequant+dot", Path::Dequantise, &mx)];
    rows.push((
        if best == Simd::Avx512 {
            "mxfp4 avx512"
        } else {
            "mxfp4 kernel"
        },
        Path::Mxfp4(best),
        &mx,
    ));
    if best == Simd::Avx512 {
        rows.push(("mxfp4 avx2", Path::Mxfp4(Simd::Avx2), &mx));
    }
    rows.push(("bf16", Path::Linear, &bf));
    println!();
    println!(
        "gpt-oss-20b experts (gate, up, down [{GPT_OSS}, {GPT_OSS}], biases), {n} distinct experts cycled, median of {repeat}"
    );
    println!();
    println!(
        "{:>7} {:>6} {:>18} {:>13} {:>11} {:>9} {:>12} {:>9}",
        "threads", "tokens", "path", "bytes/expert", "µs/expert", "GB/s", "vs baseline", "vs bf16"
    );
    for &threads in counts {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            for t in [1, 8] {
                let secs: Vec<f64> = rows
                    .iter()
                    .map(|(_, path, set)| time_gpt_oss(set, *path, t, repeat))
                    .collect();
                let bf16_secs = secs[secs.len() - 1];
                for ((name, _, set), s) in rows.iter().zip(&secs) {
                    let bytes = set[0].bytes();
                    println!(
                        "{threads:>7} {t:>6} {name:>18} {bytes:>13} {:>11.1} {:>9.2} {:>11.2}x {:>8.2}x",
                        s * 1e6,
                        bytes as f64 / s / 1e9,
                        secs[0] / s,
                        bf16_secs / s
                    );
                }
            }
        });
    }
}

/// A Q8_0 matrix (ggml's `block_q8_0`): random values, f16 scales of magnitude at most 1/128.
fn q8_0_weight(rows: usize, cols: usize, seed: u64) -> Weight {
    let mut b = random_bytes(rows * cols / 32 * 34, seed);
    for block in b.as_mut_slice().chunks_exact_mut(34) {
        let d = half::f16::from_f32(f32::from(block[0]) / 16384.0 - 1.0 / 128.0);
        block[..2].copy_from_slice(&d.to_bits().to_le_bytes());
    }
    Weight::new(Arc::new(b), 0, DType::Block(BlockType::Q8_0), vec![rows, cols])
}

/// The GGUF table: gpt-oss-20b's expert shape in MXFP4 and Q8_0 blocks on Q8_0 activations,
/// per thread count and token count, at each vector level against the scalar reference.
fn gguf_table(repeat: usize, counts: &[usize]) {
    let n: usize = env_or("SHADOWMOE_BENCH_GPT_OSS_EXPERTS", 8);
    let make = |f: fn(usize, usize, u64) -> Weight| -> Vec<Expert> {
        (0..n as u64)
            .map(|i| Expert {
                gate: f(GPT_OSS, GPT_OSS, 200 + i * 3),
                up: f(GPT_OSS, GPT_OSS, 200 + i * 3 + 1),
                down: f(GPT_OSS, GPT_OSS, 200 + i * 3 + 2),
            })
            .collect()
    };
    let (mx, q8) = (make(mxfp4_weight), make(q8_0_weight));
    let mut levels = vec![("scalar", Simd::Portable)];
    if Simd::supported() != Simd::Portable {
        levels.push(("avx2", Simd::Avx2));
    }
    if Simd::supported() == Simd::Avx512 {
        levels.push(("avx512", Simd::Avx512));
    }
    println!();
    println!(
        "GGUF blocks on Q8_0 activations (llama.cpp's computation), gpt-oss-20b expert shape (gate, up, down [{GPT_OSS}, {GPT_OSS}], biases), {n} distinct experts cycled, median of {repeat}"
    );
    println!();
    println!(
        "{:>7} {:>6} {:>6} {:>7} {:>13} {:>11} {:>9} {:>11}",
        "threads", "tokens", "type", "level", "bytes/expert", "µs/expert", "GB/s", "vs scalar"
    );
    for &threads in counts {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            for t in [1, 8] {
                for (ty, set) in [("MXFP4", &mx), ("Q8_0", &q8)] {
                    let bytes = set[0].bytes();
                    let mut scalar = None;
                    for &(level, simd) in &levels {
                        let s = time_gpt_oss(set, Path::Ggml(simd), t, repeat);
                        let base = *scalar.get_or_insert(s);
                        println!(
                            "{threads:>7} {t:>6} {ty:>6} {level:>7} {bytes:>13} {:>11.1} {:>9.2} {:>10.2}x",
                            s * 1e6,
                            bytes as f64 / s / 1e9,
                            base / s
                        );
                    }
                }
            }
        });
    }
}

fn main() {
    let repeat: usize = env_or("SHADOWMOE_BENCH_REPEAT", 5);
    let n: usize = env_or("SHADOWMOE_BENCH_EXPERTS", 192);
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let formats = ["bf16", "4-bit", "8-bit"];
    let sets: Vec<(&str, Vec<Expert>)> = formats.iter().map(|f| (*f, experts(f, n))).collect();
    println!(
        "quantised mat-vec: Qwen3-Coder-Next experts (gate/up [{WIDTH}, {HIDDEN}], down [{HIDDEN}, {WIDTH}]), one token, {n} distinct experts cycled, median of {repeat}"
    );
    println!(
        "MLX affine quantisation, group 64, bf16 scales and biases; the engine's `linear` (bf16: register tiles; quantised: packed dot products)"
    );
    println!();
    println!(
        "{:>7} {:>8} {:>13} {:>11} {:>9} {:>14} {:>10} {:>12}",
        "threads", "format", "bytes/expert", "µs/expert", "GB/s", "expert tok/s", "vs bf16", "vs mem read"
    );
    let mut counts = vec![1];
    if cores > 1 {
        counts.push(cores);
    }
    for &threads in &counts {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mem = memory_read_gbs();
            let mut bf16_secs = None;
            for (format, set) in &sets {
                let secs = time_experts(set, repeat);
                let bytes = set[0].bytes();
                let gbs = bytes as f64 / secs / 1e9;
                let base = *bf16_secs.get_or_insert(secs);
                println!(
                    "{threads:>7} {format:>8} {bytes:>13} {:>11.1} {gbs:>9.2} {:>14.1} {:>9.2}x {:>11.2}",
                    secs * 1e6,
                    1.0 / (secs * EXPERTS_PER_TOKEN as f64),
                    base / secs,
                    gbs / mem
                );
            }
            println!("{threads:>7} memory read {mem:.2} GB/s (same threads, same run)");
        });
    }
    gpt_oss_table(repeat, &counts);
    gguf_table(repeat, &counts);
}
