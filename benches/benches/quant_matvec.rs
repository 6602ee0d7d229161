//! The quantised mat-vec against bf16 on the same shapes: one decode token through the experts
//! of Qwen3-Coder-Next (gate and up `[512, 2048]`, down `[2048, 512]`), MLX 4-bit and 8-bit
//! (group 64, bf16 scales and biases, as the hub's checkpoints hold them) next to bf16, all
//! through the engine's `linear` at one token. Each run cycles over more distinct experts than
//! any cache holds, so the weights stream from DRAM as they do in decode. Prints per format the
//! bytes of one expert, µs per expert (its three mat-vecs), the GB/s of weights streamed, the
//! expert-compute tok/s of Qwen3-Coder-Next (48 MoE layers × top-10 experts per token), the
//! ratio against bf16, and this machine's memory-read bandwidth measured in the same run.
//!
//!     cargo bench -p shadowmoe-benches --bench quant_matvec
//!
//! Environment: `SHADOWMOE_BENCH_REPEAT` (runs per row, median; default 5),
//! `SHADOWMOE_BENCH_EXPERTS` (distinct experts cycled; default 192).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Instant;

use ndarray::Array2;
use shadowmoe_benches::{env_or, memory_read_gbs};
use shadowmoe_engine::kernels::linear;
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
    for threads in counts {
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
}
