//! MLX's affine quantisation (what `mlx_lm.convert -q` writes), computed as it is stored.
//!
//! A quantised linear `[N, K]` is three tensors: `weight` (u32, `[N, K·bits/32]`: each word
//! holds `32/bits` values, the first in the lowest bits), `scales` and `biases` (`[N, K/G]`, one
//! pair per group of `G = group_size` consecutive inputs). A weight is `scale · q + bias`, with
//! `q` the unsigned `bits`-bit value. Supported: bits 4 and 8, group sizes 32, 64, 128.
//!
//! A row's dot product with `x` never materialises the row in f32:
//! `Σ_g scale_g · Σ_{j∈g} q_j x_j + bias_g · Σ_{j∈g} x_j`, with the group sums of `x` computed
//! once per input and shared by every row.

use crate::error::{EngineError, Result};

/// Bits and group size of one quantised tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QuantSpec {
    pub bits: u32,
    pub group_size: usize,
}

impl QuantSpec {
    /// Checks the combination; `what` names the config key or tensor in the error.
    pub fn new(bits: u32, group_size: usize, what: &str) -> Result<Self> {
        if !matches!(bits, 4 | 8) {
            return Err(EngineError::invalid(
                what,
                format!("{bits}-bit quantisation is not supported (expected 4 or 8)"),
            ));
        }
        if !matches!(group_size, 32 | 64 | 128) {
            return Err(EngineError::invalid(
                what,
                format!("group size {group_size} is not supported (expected 32, 64 or 128)"),
            ));
        }
        Ok(Self { bits, group_size })
    }

    /// Values per u32 word.
    pub fn per_word(self) -> usize {
        (32 / self.bits) as usize
    }

    /// u32 words of one row of `k` inputs.
    pub fn words_per_row(self, k: usize) -> usize {
        k / self.per_word()
    }

    /// Bytes of an `[n, k]` quantised matrix with `scale_bytes`-byte scales and biases: what it
    /// occupies on disk and in the cache.
    pub fn matrix_bytes(self, n: usize, k: usize, scale_bytes: usize) -> usize {
        n * (self.words_per_row(k) * 4 + 2 * (k / self.group_size) * scale_bytes)
    }
}

/// Per-group sums of `x` (`K / G` values).
pub fn group_sums(x: &[f32], group_size: usize) -> Vec<f32> {
    x.chunks(group_size).map(|g| g.iter().sum()).collect()
}

/// One row's dot product with `x`: `words` holds the row's packed values, `scales`/`biases`
/// its groups, `xsum` the group sums of `x` ([`group_sums`]).
pub fn dot_row(
    spec: QuantSpec,
    words: &[u32],
    scales: &[f32],
    biases: &[f32],
    x: &[f32],
    xsum: &[f32],
) -> f32 {
    let g = spec.group_size;
    let per_word = spec.per_word();
    let words_per_group = g / per_word;
    let mask = (1u32 << spec.bits) - 1;
    let mut total = 0.0f32;
    for (gi, ((wg, xg), (&s, &b))) in words
        .chunks_exact(words_per_group)
        .zip(x.chunks_exact(g))
        .zip(scales.iter().zip(biases))
        .enumerate()
    {
        // Several accumulators, so that the compiler can keep independent sums in flight.
        let mut acc = [0.0f32; 8];
        for (w, xw) in wg.iter().zip(xg.chunks_exact(per_word)) {
            for (j, xv) in xw.iter().enumerate() {
                let q = (w >> (j as u32 * spec.bits)) & mask;
                acc[j % 8] += q as f32 * xv;
            }
        }
        let qx: f32 = acc.iter().sum();
        total += s * qx + b * xsum[gi];
    }
    total
}

/// The `k` values of one row in f32 (prefill converts a block of rows at a time).
pub fn dequantize_row(spec: QuantSpec, words: &[u32], scales: &[f32], biases: &[f32], out: &mut [f32]) {
    let per_word = spec.per_word();
    let mask = (1u32 << spec.bits) - 1;
    for (i, o) in out.iter_mut().enumerate() {
        let w = words[i / per_word];
        let q = (w >> ((i % per_word) as u32 * spec.bits)) & mask;
        let gi = i / spec.group_size;
        *o = scales[gi] * q as f32 + biases[gi];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MLX's affine rule, for the tests: per group, scale = (max − min) / (2^bits − 1),
    /// bias = min, q = round((w − bias) / scale).
    fn quantize(spec: QuantSpec, w: &[f32]) -> (Vec<u32>, Vec<f32>, Vec<f32>) {
        let levels = ((1u32 << spec.bits) - 1) as f32;
        let mut words = vec![0u32; w.len() / spec.per_word()];
        let (mut scales, mut biases) = (vec![], vec![]);
        for (gi, grp) in w.chunks(spec.group_size).enumerate() {
            let lo = grp.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = grp.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let s = ((hi - lo) / levels).max(1e-8);
            scales.push(s);
            biases.push(lo);
            for (j, &v) in grp.iter().enumerate() {
                let q = (((v - lo) / s).round() as u32).min(levels as u32);
                let i = gi * spec.group_size + j;
                words[i / spec.per_word()] |= q << ((i % spec.per_word()) as u32 * spec.bits);
            }
        }
        (words, scales, biases)
    }

    #[test]
    fn dot_equals_the_dequantised_dot() {
        for bits in [4, 8] {
            for g in [32, 64, 128] {
                let spec = QuantSpec::new(bits, g, "test").unwrap();
                let k = 256;
                let w: Vec<f32> = (0..k)
                    .map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * 0.3)
                    .collect();
                let x: Vec<f32> = (0..k).map(|i| ((i * 53 % 97) as f32 / 48.0) - 1.0).collect();
                let (words, scales, biases) = quantize(spec, &w);
                let mut deq = vec![0.0; k];
                dequantize_row(spec, &words, &scales, &biases, &mut deq);
                // Dequantisation is within half a step of the original.
                for (a, (b, gi)) in deq.iter().zip(w.iter().zip((0..k).map(|i| i / g))) {
                    assert!(
                        (a - b).abs() <= scales[gi] * 0.5 + 1e-6,
                        "{bits}-bit g{g}: {a} vs {b}"
                    );
                }
                let want: f32 = deq.iter().zip(&x).map(|(a, b)| a * b).sum();
                let got = dot_row(spec, &words, &scales, &biases, &x, &group_sums(&x, g));
                assert!(
                    (got - want).abs() < 1e-4 * want.abs().max(1.0),
                    "{bits}-bit g{g}: {got} vs {want}"
                );
                assert_eq!(spec.words_per_row(k), words.len());
            }
        }
    }

    #[test]
    fn bytes_of_a_qwen3_coder_next_expert() {
        // gate, up [512, 2048] and down [2048, 512] at 4 bits, group 64, bf16 scales/biases.
        let s = QuantSpec::new(4, 64, "test").unwrap();
        let bytes = 2 * s.matrix_bytes(512, 2048, 2) + s.matrix_bytes(2048, 512, 2);
        assert_eq!(bytes, 1_769_472);
    }

    #[test]
    fn unsupported_specs_are_named() {
        let e = QuantSpec::new(3, 64, "quantization.bits")
            .unwrap_err()
            .to_string();
        assert!(e.contains("quantization.bits") && e.contains("3-bit"), "{e}");
        let e = QuantSpec::new(4, 16, "quantization.group_size")
            .unwrap_err()
            .to_string();
        assert!(e.contains("group size 16"), "{e}");
    }
}
