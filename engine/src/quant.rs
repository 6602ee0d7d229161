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

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

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

/// A checkpoint's `quantization` block (`config.json`; `quantization_config` is its copy for
/// the hub): the default bits and group size, and per-module entries that override them
/// (`{"group_size": 64, "bits": 8}`) or leave a module unquantised (`false`). A module is
/// quantised exactly when its `scales` tensor is in the weights, as mlx-lm decides.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantConfig {
    pub default: QuantSpec,
    /// Module path (`model.layers.0.mlp.gate`) → its spec, or `None`: left unquantised.
    pub overrides: HashMap<String, Option<QuantSpec>>,
}

impl QuantConfig {
    /// Parses the block at `key` of `config.json` (`path`, for errors).
    pub fn parse(v: &Value, path: &Path, key: &str) -> Result<Self> {
        let Value::Object(map) = v else {
            return Err(EngineError::field(
                path,
                key,
                "expected an object with group_size and bits",
            ));
        };
        let spec_of = |m: &serde_json::Map<String, Value>, at: &str| -> Result<QuantSpec> {
            if let Some(mode) = m.get("mode")
                && mode.as_str() != Some("affine")
            {
                return Err(EngineError::field(
                    path,
                    format!("{at}.mode"),
                    format!(
                        "{mode} quantisation is not supported (expected \"affine\", what mlx_lm.convert -q writes)"
                    ),
                ));
            }
            let int = |name: &str| -> Result<u64> {
                m.get(name).and_then(Value::as_u64).ok_or_else(|| {
                    EngineError::field(
                        path,
                        format!("{at}.{name}"),
                        "missing or not a non-negative integer",
                    )
                })
            };
            let (bits, group) = (int("bits")?, int("group_size")?);
            QuantSpec::new(bits as u32, group as usize, &format!("{}: {at}", path.display()))
        };
        let default = spec_of(map, key)?;
        let mut overrides = HashMap::new();
        for (name, val) in map {
            if matches!(name.as_str(), "group_size" | "bits" | "mode") {
                continue;
            }
            let at = format!("{key}.{name}");
            let spec = match val {
                Value::Bool(false) => None,
                Value::Bool(true) => Some(default),
                Value::Object(m) => {
                    let mut m = m.clone();
                    for k in ["bits", "group_size"] {
                        if !m.contains_key(k) {
                            m.insert(k.into(), map[k].clone());
                        }
                    }
                    Some(spec_of(&m, &at)?)
                }
                _ => {
                    return Err(EngineError::field(
                        path,
                        at,
                        "expected a module's {group_size, bits} or false",
                    ));
                }
            };
            overrides.insert(name.clone(), spec);
        }
        Ok(Self { default, overrides })
    }

    /// The spec of module `module` (its path without `.weight`) if it is listed, else the
    /// default.
    pub fn spec_for(&self, module: &str) -> Option<QuantSpec> {
        self.overrides.get(module).copied().unwrap_or(Some(self.default))
    }
}

/// Per-group sums of `x` (`K / G` values).
pub fn group_sums(x: &[f32], group_size: usize) -> Vec<f32> {
    x.chunks(group_size).map(|g| g.iter().sum()).collect()
}

/// One row's dot product with `x`: `words` holds the row's packed values, `scales`/`biases`
/// its groups, `xsum` the group sums of `x` ([`group_sums`]). AVX2 + FMA where the CPU has
/// them (eight values widened in registers per step), else portable.
pub fn dot_row(
    spec: QuantSpec,
    words: &[u32],
    scales: &[f32],
    biases: &[f32],
    x: &[f32],
    xsum: &[f32],
) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::kernels::Simd;
        match Simd::detected() {
            // SAFETY: Simd::detected says the CPU has AVX-512 (F, BW, VL).
            Simd::Avx512 => return unsafe { dot_row_avx512(spec, words, scales, biases, x, xsum) },
            // SAFETY: the CPU has AVX2 and FMA.
            Simd::Avx2 => return unsafe { dot_row_avx2(spec, words, scales, biases, x, xsum) },
            Simd::Portable => {}
        }
    }
    dot_row_portable(spec, words, scales, biases, x, xsum)
}

/// [`dot_row`] on AVX-512: sixteen values a step (two 4-bit words spread over the 16 lanes and
/// shifted into their values, or 16 bytes widened), four accumulators per group, the group's
/// scale applied once; the biases' part alongside, as on AVX2. Monomorphised per bit width and
/// group size, so that a group's steps unroll and its accumulators stay in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn dot_row_avx512(
    spec: QuantSpec,
    words: &[u32],
    scales: &[f32],
    biases: &[f32],
    x: &[f32],
    xsum: &[f32],
) -> f32 {
    // SAFETY (each): as this function's.
    unsafe {
        match (spec.bits, spec.group_size) {
            (4, 32) => row_avx512::<4, 32>(words, scales, biases, x, xsum),
            (4, 64) => row_avx512::<4, 64>(words, scales, biases, x, xsum),
            (4, _) => row_avx512::<4, 128>(words, scales, biases, x, xsum),
            (_, 32) => row_avx512::<8, 32>(words, scales, biases, x, xsum),
            (_, 64) => row_avx512::<8, 64>(words, scales, biases, x, xsum),
            _ => row_avx512::<8, 128>(words, scales, biases, x, xsum),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
#[inline]
unsafe fn row_avx512<const BITS: u32, const G: usize>(
    words: &[u32],
    scales: &[f32],
    biases: &[f32],
    x: &[f32],
    xsum: &[f32],
) -> f32 {
    use std::arch::x86_64::*;
    let groups = x.len() / G;
    let per_word = (32 / BITS) as usize;
    assert!(words.len() >= groups * G / per_word && scales.len() >= groups && biases.len() >= groups);
    let mut total = _mm512_setzero_ps();
    let mut bias_part = 0.0f32;
    // SAFETY (whole body): every load reads inside `words` / `x`, whose lengths cover
    // `groups` groups (asserted above); unaligned loads are used throughout.
    unsafe {
        let shifts = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
        let spread = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        let nibble = _mm512_set1_epi32(0xF);
        for gi in 0..groups {
            let xg = x.as_ptr().add(gi * G);
            let wg = words.as_ptr().add(gi * G / per_word);
            let mut acc = [_mm512_setzero_ps(); 4];
            for j in 0..G / 16 {
                let q = if BITS == 4 {
                    let two = _mm512_castsi128_si512(_mm_loadl_epi64(wg.add(2 * j).cast()));
                    _mm512_and_si512(
                        _mm512_srlv_epi32(_mm512_permutexvar_epi32(spread, two), shifts),
                        nibble,
                    )
                } else {
                    _mm512_cvtepu8_epi32(_mm_loadu_si128(wg.cast::<u8>().add(j * 16).cast()))
                };
                acc[j % 4] =
                    _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), _mm512_loadu_ps(xg.add(j * 16)), acc[j % 4]);
            }
            let acc = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
            total = _mm512_fmadd_ps(_mm512_set1_ps(scales[gi]), acc, total);
            bias_part += biases[gi] * xsum[gi];
        }
        _mm512_reduce_add_ps(total) + bias_part
    }
}

/// [`dot_row`] on AVX2: per group, `Σ q·x` in four 8-lane accumulators (a 4-bit word is
/// broadcast and shifted into its 8 values; 8 bytes of an 8-bit row are widened), scaled into
/// the row's sum; the biases' part `Σ_g bias_g · xsum_g` alongside. Monomorphised per bit width
/// and group size, as the AVX-512 one.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_row_avx2(
    spec: QuantSpec,
    words: &[u32],
    scales: &[f32],
    biases: &[f32],
    x: &[f32],
    xsum: &[f32],
) -> f32 {
    // SAFETY (each): as this function's.
    unsafe {
        match (spec.bits, spec.group_size) {
            (4, 32) => row_avx2::<4, 32>(words, scales, biases, x, xsum),
            (4, 64) => row_avx2::<4, 64>(words, scales, biases, x, xsum),
            (4, _) => row_avx2::<4, 128>(words, scales, biases, x, xsum),
            (_, 32) => row_avx2::<8, 32>(words, scales, biases, x, xsum),
            (_, 64) => row_avx2::<8, 64>(words, scales, biases, x, xsum),
            _ => row_avx2::<8, 128>(words, scales, biases, x, xsum),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn row_avx2<const BITS: u32, const G: usize>(
    words: &[u32],
    scales: &[f32],
    biases: &[f32],
    x: &[f32],
    xsum: &[f32],
) -> f32 {
    use std::arch::x86_64::*;
    let groups = x.len() / G;
    let per_word = (32 / BITS) as usize;
    assert!(words.len() >= groups * G / per_word && scales.len() >= groups && biases.len() >= groups);
    let mut total = _mm256_setzero_ps();
    let mut bias_part = 0.0f32;
    // SAFETY (whole body): every load reads inside `words` / `x`, whose lengths cover
    // `groups` groups (asserted above); unaligned loads are used throughout.
    unsafe {
        let shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
        let nibble = _mm256_set1_epi32(0xF);
        for gi in 0..groups {
            let xg = x.as_ptr().add(gi * G);
            let wg = words.as_ptr().add(gi * G / per_word);
            // Four accumulators: the FMAs of one group do not wait on each other.
            let mut acc = [_mm256_setzero_ps(); 4];
            for j in 0..G / 8 {
                let q = if BITS == 4 {
                    let w = _mm256_set1_epi32(*wg.add(j) as i32);
                    _mm256_and_si256(_mm256_srlv_epi32(w, shifts), nibble)
                } else {
                    _mm256_cvtepu8_epi32(_mm_loadl_epi64(wg.cast::<u8>().add(j * 8).cast()))
                };
                acc[j % 4] =
                    _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), _mm256_loadu_ps(xg.add(j * 8)), acc[j % 4]);
            }
            let acc = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            total = _mm256_fmadd_ps(_mm256_set1_ps(scales[gi]), acc, total);
            bias_part += biases[gi] * xsum[gi];
        }
        let hi = _mm256_extractf128_ps(total, 1);
        let lo = _mm256_castps256_ps128(total);
        let s4 = _mm_add_ps(hi, lo);
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
        _mm_cvtss_f32(s1) + bias_part
    }
}

fn dot_row_portable(
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
                let sums = group_sums(&x, g);
                let got = dot_row(spec, &words, &scales, &biases, &x, &sums);
                let portable = dot_row_portable(spec, &words, &scales, &biases, &x, &sums);
                let mut all = vec![got, portable];
                #[cfg(target_arch = "x86_64")]
                {
                    use crate::kernels::Simd;
                    if Simd::supported() == Simd::Avx512 {
                        // SAFETY: the CPU has AVX-512.
                        all.push(unsafe { dot_row_avx512(spec, &words, &scales, &biases, &x, &sums) });
                    }
                    if std::arch::is_x86_feature_detected!("avx2") {
                        // SAFETY: the CPU has AVX2 and FMA.
                        all.push(unsafe { dot_row_avx2(spec, &words, &scales, &biases, &x, &sums) });
                    }
                }
                for got in all {
                    assert!(
                        (got - want).abs() < 1e-4 * want.abs().max(1.0),
                        "{bits}-bit g{g}: {got} vs {want}"
                    );
                }
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
    fn quantization_block_with_overrides() {
        let v: Value = serde_json::from_str(
            r#"{"group_size": 64, "bits": 4, "mode": "affine",
                "model.layers.0.mlp.gate": {"group_size": 64, "bits": 8},
                "model.layers.1.mlp.gate": {"bits": 8},
                "lm_head": false}"#,
        )
        .unwrap();
        let q = QuantConfig::parse(&v, Path::new("config.json"), "quantization").unwrap();
        let four = QuantSpec::new(4, 64, "t").unwrap();
        let eight = QuantSpec::new(8, 64, "t").unwrap();
        assert_eq!(q.spec_for("model.layers.0.self_attn.q_proj"), Some(four));
        assert_eq!(q.spec_for("model.layers.0.mlp.gate"), Some(eight));
        assert_eq!(q.spec_for("model.layers.1.mlp.gate"), Some(eight));
        assert_eq!(q.spec_for("lm_head"), None);
        for (text, want) in [
            (r#"{"group_size": 64, "bits": 3}"#, "3-bit"),
            (r#"{"group_size": 64}"#, "quantization.bits"),
            (
                r#"{"group_size": 32, "bits": 4, "mode": "mxfp4"}"#,
                "quantization.mode",
            ),
            (
                r#"{"group_size": 64, "bits": 4, "x": {"bits": 5}}"#,
                "quantization.x",
            ),
            (r#"{"group_size": 64, "bits": 4, "x": 3}"#, "quantization.x"),
        ] {
            let v: Value = serde_json::from_str(text).unwrap();
            let e = QuantConfig::parse(&v, Path::new("config.json"), "quantization")
                .unwrap_err()
                .to_string();
            assert!(e.contains(want) && e.contains("config.json"), "{text}: {e}");
        }
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
