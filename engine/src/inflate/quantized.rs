//! The inflation of an MLX-quantised checkpoint, done on the quantised values themselves.
//!
//! A quantised matrix is rows of groups: `G` inputs share one `(scale, bias)` and their packed
//! `bits`-bit values (`G · bits / 32` words). The float construction (see the module above)
//! carries over group by group, exactly:
//! - a real group is copied with its words unchanged and its scale and bias multiplied by the
//!   rule's power of two (`1/c`, `2^-m`): exact in every float format;
//! - a group that must read as zero (the padded rows of the blocks that write the residual
//!   stream, the embedding's padded dimensions, the padded expert units' up rows on the real
//!   dimensions) gets scale 0 and bias 0, and random words: `0 · q + 0 = 0`;
//! - a group that multiplies zeros (padded columns) gets random words, scale and bias.
//!
//! mlx-lm leaves a matrix in float when its input width is not a multiple of the group size
//! (the bundled model's expert `down_proj`, 16 inputs): at the inflated width it is quantised
//! here, the real inputs of a row in their own groups (`scale = (max − min) / (2^bits − 1)`,
//! `bias = min`, rounded to the scales' dtype; the padded units' columns of the last real group
//! hold random values, which multiply the padded units' zero activations). That one rounding
//! is the only place the inflated model departs from its source, and it is the same at every
//! width: the copy computes the function of the source with its down projections quantised —
//! which is what `inflate` at the source's own hidden size writes, a small checkpoint that
//! mlx-lm itself can run (`tests/golden/make_mlx.py --inflated`).

use super::{Rng, Rule, encode};
use crate::error::{EngineError, Result};
use crate::quant::QuantSpec;
use crate::weights::{DType, WeightIndex};

/// A source matrix as rows of groups: `e` stacked matrices of `rows × k`.
#[derive(Debug)]
pub(super) struct Source {
    spec: QuantSpec,
    e: usize,
    rows: usize,
    k: usize,
    kind: SourceKind,
}

#[derive(Debug)]
enum SourceKind {
    /// Packed words (`e · rows · k / per_word`), scales and biases (`e · rows · k / G`).
    Quantised {
        words: Vec<u32>,
        scales: Vec<f32>,
        biases: Vec<f32>,
    },
    /// Float values, to be quantised with `spec` (`e · rows · k`).
    Float(Vec<f32>),
}

impl Source {
    /// The matrix `name` (`stem.weight`) of `w`: quantised with `spec` when its scales are
    /// there, else float (it will be quantised with `spec`).
    pub(super) fn read(w: &WeightIndex, name: &str, spec: QuantSpec) -> Result<Self> {
        let stem = name.strip_suffix(".weight").unwrap_or(name);
        let weight = w.get_stored(name)?;
        let shape = weight.shape().to_vec();
        let (rows, last) = match shape.as_slice() {
            [.., r, l] => (*r, *l),
            _ => {
                return Err(EngineError::invalid(
                    name,
                    format!("expected a matrix, found shape {shape:?}"),
                ));
            }
        };
        let e = shape[..shape.len() - 2].iter().product::<usize>();
        if !w.is_quantized(name) {
            return Ok(Self {
                spec,
                e,
                rows,
                k: last,
                kind: SourceKind::Float(weight.to_f32_vec()),
            });
        }
        let words: Vec<u32> = weight
            .bytes()
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let k = last * spec.per_word();
        let scales = w.get_any(&format!("{stem}.scales"))?.to_f32_vec();
        let biases = w.get_any(&format!("{stem}.biases"))?.to_f32_vec();
        let groups = e * rows * (k / spec.group_size);
        if !k.is_multiple_of(spec.group_size) || scales.len() != groups || biases.len() != groups {
            return Err(EngineError::invalid(
                format!("{stem}.scales"),
                format!(
                    "{} scales and {} biases for {e}×{rows} rows of {k} inputs at {}-bit group {} (expected {groups})",
                    scales.len(),
                    biases.len(),
                    spec.bits,
                    spec.group_size
                ),
            ));
        }
        Ok(Self {
            spec,
            e,
            rows,
            k,
            kind: SourceKind::Quantised {
                words,
                scales,
                biases,
            },
        })
    }

    fn groups(&self) -> usize {
        self.k.div_ceil(self.spec.group_size)
    }
}

/// An output matrix being written: `e` stacked matrices of `rows × k`, group by group.
#[derive(Debug)]
struct Out {
    spec: QuantSpec,
    sdt: DType,
    rows: usize,
    k: usize,
    words: Vec<u32>,
    scales: Vec<u8>,
    biases: Vec<u8>,
}

impl Out {
    fn new(spec: QuantSpec, sdt: DType, e: usize, rows: usize, k: usize) -> Self {
        let groups = e * rows * (k / spec.group_size);
        Self {
            spec,
            sdt,
            rows,
            k,
            words: vec![0; e * rows * spec.words_per_row(k)],
            scales: vec![0; groups * sdt.size()],
            biases: vec![0; groups * sdt.size()],
        }
    }

    fn gpr(&self) -> usize {
        self.k / self.spec.group_size
    }

    fn wpg(&self) -> usize {
        self.spec.words_per_row(self.spec.group_size)
    }

    /// Index of group `g` of row `r` of matrix `e`.
    fn at(&self, e: usize, r: usize, g: usize) -> usize {
        (e * self.rows + r) * self.gpr() + g
    }

    fn words_mut(&mut self, i: usize) -> &mut [u32] {
        let w = self.wpg();
        &mut self.words[i * w..(i + 1) * w]
    }

    fn put(&mut self, i: usize, scale: f32, bias: f32, name: &str) -> Result<()> {
        let n = self.sdt.size();
        for (v, dst) in [(scale, &mut self.scales), (bias, &mut self.biases)] {
            if !encode(v, self.sdt, &mut dst[i * n..(i + 1) * n]) {
                return Err(EngineError::invalid(
                    name,
                    format!(
                        "the scale or bias {v} does not survive in {} (it underflows): inflate to a smaller ratio",
                        self.sdt.name()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Random words, scale and bias: a group that multiplies zeros.
    fn random(&mut self, i: usize, rng: &mut Rng) {
        for w in self.words_mut(i) {
            *w = rng.next() as u32;
        }
        let n = self.sdt.size();
        rng.fill(&mut self.scales[i * n..(i + 1) * n], self.sdt);
        rng.fill(&mut self.biases[i * n..(i + 1) * n], self.sdt);
    }

    /// Random words with scale and bias 0: a group that reads as exactly zero.
    fn zero(&mut self, i: usize, rng: &mut Rng) {
        for w in self.words_mut(i) {
            *w = rng.next() as u32;
        }
        let n = self.sdt.size();
        self.scales[i * n..(i + 1) * n].fill(0);
        self.biases[i * n..(i + 1) * n].fill(0);
    }

    /// Group `i` holds the source's group `[matrix, row, group]`, scaled by `f` (a power of
    /// two).
    fn copy(
        &mut self,
        i: usize,
        src: &Source,
        [se, sr, sg]: [usize; 3],
        f: f32,
        rng: &mut Rng,
        name: &str,
    ) -> Result<()> {
        let gs = self.spec.group_size;
        match &src.kind {
            SourceKind::Quantised {
                words,
                scales,
                biases,
            } => {
                let j = (se * src.rows + sr) * (src.k / gs) + sg;
                let w = self.wpg();
                self.words_mut(i).copy_from_slice(&words[j * w..(j + 1) * w]);
                self.put(i, scales[j] * f, biases[j] * f, name)
            }
            SourceKind::Float(vals) => {
                let row = &vals[(se * src.rows + sr) * src.k..][..src.k];
                let real = &row[sg * gs..((sg + 1) * gs).min(src.k)];
                self.quantize(i, real, f, rng, name)
            }
        }
    }

    /// Quantises `real · f` (at most one group of values) into group `i`; the group's remaining
    /// values are random (they multiply zeros).
    fn quantize(&mut self, i: usize, real: &[f32], f: f32, rng: &mut Rng, name: &str) -> Result<()> {
        let levels = ((1u32 << self.spec.bits) - 1) as f32;
        let (lo, hi) = real
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v * f), hi.max(v * f))
            });
        let round = |v: f32| -> f32 {
            let mut b = [0u8; 4];
            let dst = &mut b[..self.sdt.size()];
            encode_rounded(v, self.sdt, dst)
        };
        let bias = round(lo);
        let scale = round((hi - bias) / levels).max(0.0);
        let bits = self.spec.bits;
        let per_word = self.spec.per_word();
        let mask = (1u32 << bits) - 1;
        let words = self.words_mut(i);
        for (wi, w) in words.iter_mut().enumerate() {
            let r = rng.next() as u32;
            let mut word = 0u32;
            for s in 0..per_word {
                let j = wi * per_word + s;
                let q = match real.get(j) {
                    Some(&v) if scale > 0.0 => ((v * f - bias) / scale).round().clamp(0.0, levels) as u32,
                    Some(_) => 0,
                    None => (r >> (s as u32 * bits)) & mask,
                };
                word |= q << (s as u32 * bits);
            }
            *w = word;
        }
        self.put(i, scale, bias, name)
    }

    fn into_bytes(self) -> [Vec<u8>; 3] {
        let words = self.words.iter().flat_map(|w| w.to_le_bytes()).collect();
        [words, self.scales, self.biases]
    }
}

/// `v` rounded to the nearest value of `dtype` (written into `dst`), as f32.
fn encode_rounded(v: f32, dtype: DType, dst: &mut [u8]) -> f32 {
    match dtype {
        DType::BF16 => {
            let x = half::bf16::from_f32(v);
            dst.copy_from_slice(&x.to_bits().to_le_bytes());
            x.to_f32()
        }
        DType::F16 => {
            let x = half::f16::from_f32(v);
            dst.copy_from_slice(&x.to_bits().to_le_bytes());
            x.to_f32()
        }
        DType::F32 | DType::U32 | DType::Block(_) => v,
    }
}

/// The output geometry of a quantised matrix under `rule`: (rows, k) from the source's.
pub(super) fn out_dims(rule: Rule, rows: usize, k: usize, hidden: usize, width: usize) -> (usize, usize) {
    match rule {
        Rule::Reader { .. } | Rule::Embed => (rows, hidden),
        Rule::WriterRows => (hidden, k),
        Rule::ExpertGate | Rule::ExpertUp => (width, hidden),
        Rule::ExpertDown => (hidden, width),
        Rule::Copy | Rule::Norm { .. } => (rows, k),
    }
}

/// Builds the words, scales and biases of the inflated matrix. `h` is the source hidden size,
/// `c` the copies of it, `hidden`/`width` the target sizes, `sdt` the scales' dtype.
#[allow(clippy::too_many_arguments)]
pub(super) fn build(
    rule: Rule,
    src: &Source,
    name: &str,
    h: usize,
    c: usize,
    hidden: usize,
    width: usize,
    sdt: DType,
    seed: u64,
) -> Result<[Vec<u8>; 3]> {
    let gs = src.spec.group_size;
    let (rows, k) = out_dims(rule, src.rows, src.k, hidden, width);
    if !k.is_multiple_of(gs) {
        return Err(EngineError::invalid(
            name,
            format!("{k} inputs per row is not a multiple of the group size {gs}"),
        ));
    }
    let mut out = Out::new(src.spec, sdt, src.e, rows, k);
    let mut rng = Rng::new(seed, name);
    let gpr = k / gs;
    // Groups of one real copy of the hidden dimensions.
    let hg = h / gs;
    let reads_hidden = matches!(
        rule,
        Rule::Reader { .. } | Rule::Embed | Rule::ExpertGate | Rule::ExpertUp
    );
    if reads_hidden && (src.k != h || !h.is_multiple_of(gs)) {
        return Err(EngineError::invalid(
            name,
            format!(
                "{} inputs per row, expected the hidden size {h} in whole groups of {gs}",
                src.k
            ),
        ));
    }
    // A row that reads the hidden state: `c` copies of the source row's groups scaled by `f`,
    // then `pad` groups.
    let hidden_row =
        |out: &mut Out, rng: &mut Rng, e: usize, r: usize, sr: usize, f: f32, zero_pad: bool| -> Result<()> {
            for copy in 0..c {
                for g in 0..hg {
                    out.copy(out.at(e, r, copy * hg + g), src, [e, sr, g], f, rng, name)?;
                }
            }
            for g in c * hg..gpr {
                let i = out.at(e, r, g);
                if zero_pad {
                    out.zero(i, rng)
                } else {
                    out.random(i, rng)
                }
            }
            Ok(())
        };
    for e in 0..src.e {
        match rule {
            Rule::Reader { scale } => {
                for r in 0..rows {
                    hidden_row(&mut out, &mut rng, e, r, r, scale, false)?;
                }
            }
            Rule::Embed => {
                for r in 0..rows {
                    hidden_row(&mut out, &mut rng, e, r, r, 1.0, true)?;
                }
            }
            Rule::WriterRows => {
                for r in 0..rows {
                    for g in 0..gpr {
                        let i = out.at(e, r, g);
                        if r < c * h {
                            out.copy(i, src, [e, r % h, g], 1.0, &mut rng, name)?;
                        } else {
                            out.zero(i, &mut rng);
                        }
                    }
                }
            }
            Rule::ExpertGate | Rule::ExpertUp => {
                for u in 0..rows {
                    if u < src.rows {
                        hidden_row(&mut out, &mut rng, e, u, u, 1.0 / c as f32, false)?;
                        continue;
                    }
                    for g in 0..gpr {
                        let i = out.at(e, u, g);
                        // A padded unit's up row reads exactly zero from the real dimensions.
                        if rule == Rule::ExpertUp && g < c * hg {
                            out.zero(i, &mut rng);
                        } else {
                            out.random(i, &mut rng);
                        }
                    }
                }
            }
            Rule::ExpertDown => {
                let real = src.groups();
                for r in 0..rows {
                    for g in 0..gpr {
                        let i = out.at(e, r, g);
                        match (r < c * h, g < real) {
                            (true, true) => out.copy(i, src, [e, r % h, g], 1.0, &mut rng, name)?,
                            (false, true) => out.zero(i, &mut rng),
                            _ => out.random(i, &mut rng),
                        }
                    }
                }
            }
            Rule::Copy | Rule::Norm { .. } => {
                return Err(EngineError::invalid(name, "norm weights are never quantised"));
            }
        }
    }
    Ok(out.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dequant(out: &Out, i: usize) -> Vec<f32> {
        let n = out.sdt.size();
        let f = |b: &[u8]| half::bf16::from_le_bytes([b[0], b[1]]).to_f32();
        let (s, b) = (f(&out.scales[i * n..]), f(&out.biases[i * n..]));
        let w = out.wpg();
        let per = out.spec.per_word();
        let mask = (1u32 << out.spec.bits) - 1;
        out.words[i * w..(i + 1) * w]
            .iter()
            .flat_map(|word| (0..per).map(move |j| ((word >> (j as u32 * out.spec.bits)) & mask) as f32))
            .map(|q| s * q + b)
            .collect()
    }

    #[test]
    fn quantize_keeps_real_values_within_half_a_step_and_zero_groups_read_zero() {
        for bits in [4, 8] {
            let spec = QuantSpec::new(bits, 64, "t").unwrap_or(QuantSpec { bits, group_size: 64 });
            let mut out = Out::new(spec, DType::BF16, 1, 2, 64);
            let mut rng = Rng::new(1, "q");
            let real: Vec<f32> = (0..16).map(|j| (j as f32 * 0.37).sin() * 0.05).collect();
            out.quantize(0, &real, 1.0, &mut rng, "t").unwrap_or_default();
            let d = dequant(&out, 0);
            let step = 0.1 / ((1u32 << bits) - 1) as f32;
            for (a, b) in real.iter().zip(&d) {
                assert!(
                    (a - b).abs() <= step * 0.51 + 1e-3 * a.abs(),
                    "{bits}-bit: {a} vs {b}"
                );
            }
            out.zero(1, &mut rng);
            assert!(dequant(&out, 1).iter().all(|&v| v == 0.0));
            assert!(
                out.words[out.wpg()..].iter().any(|&w| w != 0),
                "zero groups keep random words"
            );
        }
    }
}
