//! `inflate`: a copy of a checkpoint at a larger hidden size and expert width that computes the
//! same function, with real, incompressible bytes on disk — so that a small trained model can
//! stand in for a big one wherever what matters is the size of what is read (its routing is
//! the small model's, its experts weigh what a big model's weigh).
//!
//! Dimensions: `h` / `H` = source / target hidden size, `I` / `I'` = source / target expert
//! width, `c` = copies of the real hidden dimensions, `m` = the norm shift (`H = c·h·4^m`).
//!
//! The construction, all of it exact up to f32 summation order:
//! - The residual stream is `[x, x (c times), 0 …]`: the blocks that write it (the embedding,
//!   `o_proj`, the experts' and dense MLPs' `down_proj`) repeat their rows `c` times and write
//!   zeros into the padded dimensions, which therefore stay exactly zero.
//! - RMSNorm then sees a mean of squares `4^m` times smaller: `rms_norm_eps` is divided by
//!   `4^m` and the norm weights by `2^m` (powers of two: exact in every float format), so every
//!   normalised real dimension equals the source's. Padded dimensions of the norm weights hold
//!   random values (they multiply zeros).
//! - Blocks that read a normalised state (q/k/v, the router, the experts' gate and up, the LM
//!   head) take each real column divided by `c` (in each copy) and random values in the padded
//!   columns (they multiply zeros). Qwen3's per-head q/k norms share `rms_norm_eps`, so q and k
//!   are divided by `2^m` as well: the norm undoes it exactly.
//! - Padded expert units (`I..I'`) have random gate rows, up rows that are zero on the real
//!   dimensions and random on the padded ones (so `up·x` is exactly zero whatever the gate
//!   gives), and random `down` columns; the `down` rows of padded dimensions are zero only in
//!   the real units' columns. An expert's bytes are thus random except a few scattered short
//!   runs (never a zero 4 KiB page): nothing a filesystem or a virtual disk can store as a hole.
//!
//! `H / h` must be a power of two (then `c` is 1 or 2). Every expert is written as one
//! contiguous, 4 KiB-aligned extent (gate, up, down), one shard per MoE layer, so the store
//! reads one expert with one O_DIRECT read. The checkpoint is written under `OUT.partial` and
//! renamed when complete.
//!
//! An MLX-quantised source (`mlx_lm.convert -q`, experts stacked as `switch_mlp`) is inflated
//! on its quantised values, group by group ([`quantized`]), into the same layout: every
//! expert matrix quantised (at hidden 2048 / width 512, 4-bit group 64, an expert is
//! Qwen3-Coder-Next's 1,769,472 bytes), each of an expert's nine pieces at a 4 KiB boundary
//! at that size.

mod quantized;

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::{Value, json};

use crate::checkpoint::Checkpoint;
use crate::config::{Arch, QkNorm};
use crate::error::{EngineError, Result};
use crate::offload::ALIGN;
use crate::quant::QuantSpec;
use crate::weights::{DType, Weight};

/// What to inflate to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InflateOptions {
    pub hidden: usize,
    pub moe_intermediate: usize,
    /// Seed of the padding's random values.
    pub seed: u64,
}

/// The shape of the construction for one source config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InflatePlan {
    pub hidden: usize,
    pub moe_intermediate: usize,
    /// Copies of the real hidden dimensions (1 or 2).
    pub copies: usize,
    /// `H = copies · h · 4^shift`.
    pub shift: u32,
    pub rms_norm_eps: f64,
    /// The quantisation every expert matrix of the copy gets (MLX-quantised sources): the
    /// source's default bits and group size.
    pub quant: Option<QuantSpec>,
    /// Bytes of one expert of the copy (its three matrices, with scales and biases).
    pub expert_bytes: u64,
}

/// What [`inflate`] wrote.
#[derive(Debug, Clone)]
pub struct InflateSummary {
    pub dir: PathBuf,
    pub plan: InflatePlan,
    pub files: usize,
    pub total_bytes: u64,
    pub expert_bytes: u64,
    pub experts: usize,
}

/// Checks that `src` can be inflated to `opts` and works out the construction.
pub fn plan(src: &Checkpoint, opts: &InflateOptions) -> Result<InflatePlan> {
    let cfg = &src.config;
    if cfg.arch != Arch::Qwen3Moe {
        return Err(EngineError::invalid(
            "--model",
            format!(
                "inflate supports qwen3_moe checkpoints (this one is {})",
                cfg.arch.model_type()
            ),
        ));
    }
    if cfg.tie_word_embeddings {
        return Err(EngineError::invalid(
            "--model",
            "inflate needs separate input and output embeddings (tie_word_embeddings is true)",
        ));
    }
    let h = cfg.hidden_size;
    if opts.hidden < h || opts.moe_intermediate < cfg.moe_intermediate_size {
        return Err(EngineError::invalid(
            "--hidden/--moe-intermediate",
            format!(
                "the target ({} hidden, {} expert width) is smaller than the model ({h}, {}): inflate only grows a model",
                opts.hidden, opts.moe_intermediate, cfg.moe_intermediate_size
            ),
        ));
    }
    let ratio = opts.hidden / h;
    if !opts.hidden.is_multiple_of(h) || !ratio.is_power_of_two() {
        return Err(EngineError::invalid(
            "--hidden",
            format!(
                "{} is not the model's hidden size {h} times a power of two (e.g. {}, {}, {})",
                opts.hidden,
                h * 4,
                h * 16,
                h * 32
            ),
        ));
    }
    let bits = ratio.trailing_zeros();
    let (copies, shift) = if bits.is_multiple_of(2) {
        (1, bits / 2)
    } else {
        (2, bits / 2)
    };
    if src.weights.is_gguf() {
        return Err(EngineError::invalid(
            "--model",
            format!(
                "{}: inflate reads Hugging Face or MLX safetensors checkpoints, not GGUF files",
                src.location().display()
            ),
        ));
    }
    let quant = cfg.quantization.as_ref().map(|q| q.default);
    let mlx = src.weights.mlx_layout();
    if mlx && quant.is_none() {
        return Err(EngineError::invalid(
            "--model",
            format!(
                "{}: experts stacked as switch_mlp but unquantised; inflate the Hugging Face checkpoint it was converted from",
                src.dir.display()
            ),
        ));
    }
    if quant.is_some() && !mlx {
        return Err(EngineError::invalid(
            "--model",
            format!(
                "{}: quantised, but its experts are not stacked as mlx_lm writes them (switch_mlp)",
                src.dir.display()
            ),
        ));
    }
    let (hh, ii) = (opts.hidden, opts.moe_intermediate);
    let expert_bytes = match quant {
        Some(q) => {
            if !ii.is_multiple_of(q.group_size) {
                return Err(EngineError::invalid(
                    "--moe-intermediate",
                    format!(
                        "{ii} is not a multiple of the checkpoint's quantisation group size {}",
                        q.group_size
                    ),
                ));
            }
            let sdt = scales_dtype(src);
            (2 * q.matrix_bytes(ii, hh, sdt.size()) + q.matrix_bytes(hh, ii, sdt.size())) as u64
        }
        None => {
            let dt = src
                .weights
                .names()
                .find(|n| n.contains(".mlp.experts."))
                .and_then(|n| src.weights.entry(n))
                .map_or(2, |e| e.dtype.size());
            (3 * hh * ii * dt) as u64
        }
    };
    Ok(InflatePlan {
        hidden: hh,
        moe_intermediate: ii,
        copies,
        shift,
        rms_norm_eps: f64::from(cfg.rms_norm_eps) / 4f64.powi(shift as i32),
        quant,
        expert_bytes,
    })
}

/// The dtype of a quantised checkpoint's scales and biases (the first `.scales` tensor's).
fn scales_dtype(src: &Checkpoint) -> DType {
    src.weights
        .names()
        .filter(|n| n.ends_with(".scales"))
        .min()
        .and_then(|n| src.weights.entry(n))
        .map_or(DType::BF16, |e| e.dtype)
}

/// How one tensor is rewritten.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Rule {
    /// Unchanged (per-head q/k norm weights).
    Copy,
    /// `[h]` → `[H]`: real dimensions scaled, padded ones random.
    Norm {
        scale: f32,
    },
    /// `[N, h]` → `[N, H]`: each row's columns in `c` copies scaled, padded columns random.
    Reader {
        scale: f32,
    },
    /// `[h, K]` → `[H, K]`: rows repeated `c` times, padded rows zero (embedding: `[V, h]`
    /// → `[V, H]` along columns, see `Embed`).
    WriterRows,
    /// `[V, h]` → `[V, H]`: each row's values in `c` copies, zeros after.
    Embed,
    ExpertGate,
    ExpertUp,
    ExpertDown,
}

/// One output tensor.
#[derive(Debug, Clone)]
struct OutTensor {
    name: String,
    rule: Rule,
    dtype: DType,
    shape: Vec<usize>,
}

impl OutTensor {
    fn nbytes(&self) -> u64 {
        (self.shape.iter().product::<usize>() * self.dtype.size()) as u64
    }
}

/// Decides each source tensor's rule; any tensor the construction does not know is refused.
fn rule_of(name: &str, qk_norm: QkNorm, p: &InflatePlan) -> Option<Rule> {
    let c = p.copies as f32;
    let norm_scale = 1.0 / 2f32.powi(p.shift as i32);
    let reader = Rule::Reader { scale: 1.0 / c };
    if name == "model.embed_tokens.weight" {
        return Some(Rule::Embed);
    }
    if name == "lm_head.weight" {
        return Some(reader);
    }
    if name == "model.norm.weight" || name.ends_with("layernorm.weight") {
        return Some(Rule::Norm { scale: norm_scale });
    }
    let tail = name.split_once(".layers.").map(|(_, t)| t)?;
    let (_, tail) = tail.split_once('.')?;
    Some(match tail {
        "self_attn.q_proj.weight" | "self_attn.k_proj.weight" => match qk_norm {
            QkNorm::PerHead => Rule::Reader {
                scale: norm_scale / c,
            },
            _ => reader,
        },
        "self_attn.v_proj.weight" | "mlp.gate.weight" | "mlp.gate_proj.weight" | "mlp.up_proj.weight" => {
            reader
        }
        "self_attn.o_proj.weight" | "mlp.down_proj.weight" => Rule::WriterRows,
        "self_attn.q_norm.weight" | "self_attn.k_norm.weight" => Rule::Copy,
        t if t.starts_with("mlp.experts.") || t.starts_with("mlp.switch_mlp.") => {
            match t.rsplit('.').nth(1)? {
                "gate_proj" => Rule::ExpertGate,
                "up_proj" => Rule::ExpertUp,
                "down_proj" => Rule::ExpertDown,
                _ => return None,
            }
        }
        _ => return None,
    })
}

/// A small, fast generator (SplitMix64): the padding needs many values, not secrecy.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64, name: &str) -> Self {
        let mut s = seed ^ 0x9e37_79b9_7f4a_7c15;
        for b in name.bytes() {
            s = (s ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        Self(s)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Random nonzero finite values of magnitude 2^-15 .. 4 (random sign, exponent and
    /// mantissa), encoded in `dtype`, filling `dst`.
    fn fill(&mut self, dst: &mut [u8], dtype: DType) {
        match dtype {
            DType::BF16 | DType::F16 => {
                for chunk in dst.chunks_mut(8) {
                    let r = self.next();
                    for (i, v) in chunk.chunks_exact_mut(2).enumerate() {
                        let b = (r >> (16 * i)) as u16;
                        let bits = if dtype == DType::BF16 {
                            (b & 0x8000) | ((0x70 + ((b >> 7) & 0xF)) << 7) | (b & 0x7F)
                        } else {
                            (b & 0x8000) | ((1 + ((b >> 10) & 0xF)) << 10) | (b & 0x3FF)
                        };
                        v.copy_from_slice(&bits.to_le_bytes());
                    }
                }
            }
            DType::F32 => {
                for chunk in dst.chunks_mut(8) {
                    let r = self.next();
                    for (i, v) in chunk.chunks_exact_mut(4).enumerate() {
                        let b = (r >> (32 * i)) as u32;
                        let bits = (b & 0x8000_0000) | ((0x70 + ((b >> 23) & 0xF)) << 23) | (b & 0x7F_FFFF);
                        v.copy_from_slice(&bits.to_le_bytes());
                    }
                }
            }
            DType::U32 | DType::Block(_) => unreachable!("inflate refuses quantised checkpoints up front"),
        }
    }
}

/// Encodes `v` in `dtype`, which must hold it exactly.
fn encode(v: f32, dtype: DType, dst: &mut [u8]) -> bool {
    match dtype {
        DType::F32 => {
            dst.copy_from_slice(&v.to_le_bytes());
            true
        }
        DType::BF16 => {
            let bits = v.to_bits();
            dst.copy_from_slice(&((bits >> 16) as u16).to_le_bytes());
            bits & 0xFFFF == 0
        }
        DType::F16 => {
            let x = half::f16::from_f32(v);
            dst.copy_from_slice(&x.to_bits().to_le_bytes());
            x.to_f32() == v
        }
        DType::U32 | DType::Block(_) => unreachable!("inflate refuses quantised checkpoints up front"),
    }
}

/// Writes `src · scale` into `dst` (bytes of `dtype`), checking exactness.
fn put_scaled(src: &[f32], scale: f32, dtype: DType, dst: &mut [u8], name: &str) -> Result<()> {
    let n = dtype.size();
    for (v, d) in src.iter().zip(dst.chunks_exact_mut(n)) {
        if !encode(v * scale, dtype, d) {
            return Err(EngineError::invalid(
                name,
                format!(
                    "the value {v} does not survive scaling by {scale} in {} (it underflows): inflate to a smaller ratio",
                    dtype.name()
                ),
            ));
        }
    }
    Ok(())
}

/// One unit of work: a float tensor, or a quantised matrix (its words, scales and biases,
/// built together and written in that order).
#[derive(Debug, Clone)]
struct Item {
    /// The source tensor (a quantised matrix's words).
    src: String,
    rule: Rule,
    out: Vec<OutTensor>,
    /// The bits and group size of the output matrix (quantised items).
    quant: Option<QuantSpec>,
}

/// The bytes of `it`'s output tensors.
fn build_item(it: &Item, src: &Checkpoint, p: &InflatePlan, seed: u64) -> Result<Vec<Vec<u8>>> {
    let h = src.config.hidden_size;
    match it.quant {
        Some(spec) => {
            let source = quantized::Source::read(&src.weights, &it.src, spec)?;
            let sdt = it.out[1].dtype;
            let [w, s, b] = quantized::build(
                it.rule,
                &source,
                &it.src,
                h,
                p.copies,
                p.hidden,
                p.moe_intermediate,
                sdt,
                seed,
            )?;
            Ok(vec![w, s, b])
        }
        None => Ok(vec![build(
            &it.out[0],
            &src.weights.get_any(&it.src)?,
            p,
            h,
            seed,
        )?]),
    }
}

/// The bytes of one output tensor.
fn build(t: &OutTensor, src: &Weight, p: &InflatePlan, h: usize, seed: u64) -> Result<Vec<u8>> {
    let dt = t.dtype;
    let es = dt.size();
    let (c, hh) = (p.copies, p.hidden);
    let mut out = vec![0u8; t.nbytes() as usize];
    let mut rng = Rng::new(seed, &t.name);
    let name = t.name.as_str();
    let vals = src.to_f32_vec();
    // One row of `H` values: `c` copies of `real · scale`, then random or zero padding.
    let hidden_row =
        |rng: &mut Rng, dst: &mut [u8], real: &[f32], scale: f32, random_pad: bool| -> Result<()> {
            let (copies, pad) = dst.split_at_mut(c * h * es);
            for copy in copies.chunks_exact_mut(h * es) {
                put_scaled(real, scale, dt, copy, name)?;
            }
            if random_pad {
                rng.fill(pad, dt);
            }
            Ok(())
        };
    match t.rule {
        Rule::Copy => out.copy_from_slice(src.bytes()),
        Rule::Norm { scale } => hidden_row(&mut rng, &mut out, &vals, scale, true)?,
        Rule::Reader { scale } => {
            for (dst, real) in out.chunks_exact_mut(hh * es).zip(vals.chunks_exact(h)) {
                hidden_row(&mut rng, dst, real, scale, true)?;
            }
        }
        Rule::Embed => {
            for (dst, real) in out.chunks_exact_mut(hh * es).zip(vals.chunks_exact(h)) {
                hidden_row(&mut rng, dst, real, 1.0, false)?;
            }
        }
        Rule::WriterRows => {
            let k = src.shape()[1];
            let block = h * k * es;
            for copy in out[..c * block].chunks_exact_mut(block) {
                put_scaled(&vals, 1.0, dt, copy, name)?;
            }
        }
        Rule::ExpertGate | Rule::ExpertUp => {
            let real_units = src.shape()[0];
            let row = hh * es;
            let (real, pad) = out.split_at_mut(real_units * row);
            for (dst, r) in real.chunks_exact_mut(row).zip(vals.chunks_exact(h)) {
                hidden_row(&mut rng, dst, r, 1.0 / c as f32, true)?;
            }
            for dst in pad.chunks_exact_mut(row) {
                if t.rule == Rule::ExpertGate {
                    rng.fill(dst, dt);
                } else {
                    // Zero on the real dimensions (so up·x is exactly 0), random elsewhere.
                    rng.fill(&mut dst[c * h * es..], dt);
                }
            }
        }
        Rule::ExpertDown => {
            let real_units = src.shape()[1];
            let wide = p.moe_intermediate;
            let row = wide * es;
            for (r, dst) in out.chunks_exact_mut(row).enumerate() {
                let (real, pad) = dst.split_at_mut(real_units * es);
                if r < c * h {
                    let src_row = &vals[(r % h) * real_units..][..real_units];
                    put_scaled(src_row, 1.0, dt, real, name)?;
                }
                rng.fill(pad, dt);
            }
        }
    }
    Ok(out)
}

fn out_shape(rule: Rule, src: &[usize], p: &InflatePlan) -> Vec<usize> {
    let (hh, ii) = (p.hidden, p.moe_intermediate);
    match rule {
        Rule::Copy => src.to_vec(),
        Rule::Norm { .. } => vec![hh],
        Rule::Reader { .. } | Rule::Embed => vec![src[0], hh],
        Rule::WriterRows => vec![hh, src[1]],
        Rule::ExpertGate | Rule::ExpertUp => vec![ii, hh],
        Rule::ExpertDown => vec![hh, ii],
    }
}

/// A safetensors header for `tensors` (in order), padded with spaces so that the data starts
/// on a 4 KiB boundary.
fn header(tensors: &[&OutTensor], metadata: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    let mut map = serde_json::Map::new();
    map.insert("__metadata__".into(), json!(metadata));
    let mut at = 0u64;
    for t in tensors {
        let end = at + t.nbytes();
        map.insert(
            t.name.clone(),
            json!({"dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [at, end]}),
        );
        at = end;
    }
    let mut text = serde_json::to_vec(&Value::Object(map))
        .map_err(|e| EngineError::invalid("safetensors header", e.to_string()))?;
    let padded = (8 + text.len()).div_ceil(ALIGN) * ALIGN - 8;
    text.resize(padded, b' ');
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    Ok(out)
}

/// Free bytes on the filesystem holding `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes into the zeroed struct we own; `c` is a valid C string.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        (libc::statvfs(c.as_ptr(), &mut s) == 0).then(|| s.f_bavail as u64 * s.f_frsize as u64)
    }
}

/// Writes the inflated copy of `src` to `out` (which must not exist). `progress` is called
/// with the bytes written so far and the total.
pub fn inflate(
    src: &Checkpoint,
    out: &Path,
    opts: &InflateOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<InflateSummary> {
    let p = plan(src, opts)?;
    let cfg = &src.config;
    if out.exists() {
        return Err(EngineError::invalid(
            "--out",
            format!(
                "{} already exists (inflate never overwrites a checkpoint)",
                out.display()
            ),
        ));
    }
    // Every tensor gets its rule; experts go to one shard per MoE layer, the rest to the first.
    // A quantised matrix's scales and biases travel with its words.
    let mut names: Vec<&str> = src.weights.names().collect();
    names.sort();
    let sdt = scales_dtype(src);
    let mut base = Vec::new();
    let mut experts: BTreeMap<usize, Vec<Item>> = BTreeMap::new();
    for name in names {
        if let Some(stem) = name
            .strip_suffix(".scales")
            .or_else(|| name.strip_suffix(".biases"))
            && src.weights.contains(&format!("{stem}.weight"))
        {
            continue;
        }
        let entry = src.weights.entry(name).expect("listed");
        let tensor_err = |message: String| EngineError::Tensor {
            path: src.weights.file_path(entry.file).to_path_buf(),
            tensor: name.to_string(),
            message,
        };
        let rule = rule_of(name, cfg.qk_norm, &p)
            .ok_or_else(|| tensor_err("inflate does not know how to grow this tensor".into()))?;
        let is_expert = matches!(rule, Rule::ExpertGate | Rule::ExpertUp | Rule::ExpertDown);
        let quantised = src.weights.is_quantized(name);
        let item = match (p.quant, &cfg.quantization) {
            (Some(_), Some(qc)) if quantised || is_expert => {
                let module = name.strip_suffix(".weight").unwrap_or(name);
                let spec = qc.spec_for(module).ok_or_else(|| {
                    tensor_err(format!(
                        "config.json's quantization leaves {module} unquantised; inflate quantises every expert matrix"
                    ))
                })?;
                let mut logical = entry.shape.clone();
                if quantised && let Some(last) = logical.last_mut() {
                    *last *= spec.per_word();
                }
                let [.., rows, k] = logical[..] else {
                    return Err(tensor_err(format!(
                        "expected a matrix, found shape {:?}",
                        entry.shape
                    )));
                };
                let lead = &logical[..logical.len() - 2];
                let (orows, ok) = quantized::out_dims(rule, rows, k, p.hidden, p.moe_intermediate);
                let stem = name.strip_suffix(".weight").unwrap_or(name);
                let sd = src
                    .weights
                    .entry(&format!("{stem}.scales"))
                    .map_or(sdt, |e| e.dtype);
                let shape = |cols: usize| [lead, &[orows, cols]].concat();
                Item {
                    src: name.to_string(),
                    rule,
                    quant: Some(spec),
                    out: vec![
                        OutTensor {
                            name: name.to_string(),
                            rule,
                            dtype: DType::U32,
                            shape: shape(spec.words_per_row(ok)),
                        },
                        OutTensor {
                            name: format!("{stem}.scales"),
                            rule,
                            dtype: sd,
                            shape: shape(ok / spec.group_size),
                        },
                        OutTensor {
                            name: format!("{stem}.biases"),
                            rule,
                            dtype: sd,
                            shape: shape(ok / spec.group_size),
                        },
                    ],
                }
            }
            _ => {
                if quantised {
                    return Err(tensor_err(
                        "quantised, but config.json has no quantization block".into(),
                    ));
                }
                Item {
                    src: name.to_string(),
                    rule,
                    quant: None,
                    out: vec![OutTensor {
                        name: name.to_string(),
                        rule,
                        dtype: entry.dtype,
                        shape: out_shape(rule, &entry.shape, &p),
                    }],
                }
            }
        };
        if is_expert {
            let layer: usize = name
                .split('.')
                .nth(2)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| EngineError::invalid(name, "no layer index in the tensor name"))?;
            experts.entry(layer).or_default().push(item);
        } else {
            base.push(item);
        }
    }
    // Within a layer: expert by expert, gate, up, down: one contiguous extent each (stacked
    // experts: the gate, up and down tensors in that order).
    let part_rank = |r: Rule| match r {
        Rule::ExpertGate => 0,
        Rule::ExpertUp => 1,
        _ => 2,
    };
    let expert_of = |n: &str| -> usize { n.split('.').nth(5).and_then(|s| s.parse().ok()).unwrap_or(0) };
    for list in experts.values_mut() {
        list.sort_by_key(|it| (expert_of(&it.src), part_rank(it.rule)));
    }
    let n_files = 1 + experts.len();
    let file_name = |i: usize| format!("model-{:05}-of-{n_files:05}.safetensors", i + 1);
    let mut metadata = BTreeMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    metadata.insert("shadowmoe_inflated_from".to_string(), src.config_sha256()?);
    let shards: Vec<&[Item]> = std::iter::once(base.as_slice())
        .chain(experts.values().map(Vec::as_slice))
        .collect();
    let headers = shards
        .iter()
        .map(|s| header(&s.iter().flat_map(|it| &it.out).collect::<Vec<_>>(), &metadata))
        .collect::<Result<Vec<_>>>()?;
    let total: u64 = shards
        .iter()
        .zip(&headers)
        .map(|(s, hd)| hd.len() as u64 + s.iter().flat_map(|it| &it.out).map(|t| t.nbytes()).sum::<u64>())
        .sum();

    let parent = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| EngineError::io(&parent, e))?;
    if let Some(free) = free_bytes(&parent)
        && free < total + (64 << 20)
    {
        return Err(EngineError::invalid(
            "--out",
            format!(
                "{} has {:.1} GB free; the inflated checkpoint needs {:.1} GB",
                parent.display(),
                free as f64 / 1e9,
                total as f64 / 1e9
            ),
        ));
    }
    let partial = PathBuf::from(format!("{}.partial", out.display()));
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(|e| EngineError::io(&partial, e))?;
    }
    std::fs::create_dir_all(&partial).map_err(|e| EngineError::io(&partial, e))?;

    let h = cfg.hidden_size;
    let written = std::sync::atomic::AtomicU64::new(0);
    let bump = |n: u64| {
        let now = written.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
        progress(now, total);
    };
    let mut weight_map = BTreeMap::new();
    for (i, (shard, hd)) in shards.iter().zip(&headers).enumerate() {
        let path = partial.join(file_name(i));
        let file = std::fs::File::create(&path).map_err(|e| EngineError::io(&path, e))?;
        let mut w = BufWriter::with_capacity(8 << 20, file);
        let io = |e| EngineError::io(&path, e);
        w.write_all(hd).map_err(io)?;
        bump(hd.len() as u64);
        // Batches of tensors built in parallel, written in order.
        for batch in shard.chunks(48) {
            let bytes = batch
                .par_iter()
                .map(|it| build_item(it, src, &p, opts.seed))
                .collect::<Result<Vec<_>>>()?;
            for (it, bufs) in batch.iter().zip(bytes) {
                for (t, b) in it.out.iter().zip(bufs) {
                    w.write_all(&b).map_err(io)?;
                    bump(b.len() as u64);
                    weight_map.insert(t.name.clone(), file_name(i));
                }
            }
        }
        let file = w
            .into_inner()
            .map_err(|e| EngineError::io(&path, e.into_error()))?;
        file.sync_all().map_err(io)?;
    }

    // config.json: the new widths, the shifted eps, head_dim made explicit, provenance.
    let cfg_path = src.dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| EngineError::io(&cfg_path, e))?;
    let mut c: Value = serde_json::from_str(&text).map_err(|e| EngineError::Json {
        path: cfg_path.clone(),
        message: e.to_string(),
    })?;
    let obj = c
        .as_object_mut()
        .ok_or_else(|| EngineError::field(&cfg_path, "(root)", "expected a JSON object"))?;
    obj.insert("hidden_size".into(), json!(p.hidden));
    obj.insert("moe_intermediate_size".into(), json!(p.moe_intermediate));
    obj.insert("rms_norm_eps".into(), json!(p.rms_norm_eps));
    obj.insert("head_dim".into(), json!(cfg.head_dim));
    let expert_bytes = p.expert_bytes;
    obj.insert(
        "shadowmoe_inflate".into(),
        json!({
            "source_config_sha256": src.config_sha256()?,
            "source_hidden_size": h,
            "source_moe_intermediate_size": cfg.moe_intermediate_size,
            "copies": p.copies,
            "norm_shift": p.shift,
            "seed": opts.seed,
            "expert_bytes": expert_bytes,
        }),
    );
    let write = |name: &str, bytes: &[u8]| -> Result<()> {
        let path = partial.join(name);
        std::fs::write(&path, bytes).map_err(|e| EngineError::io(&path, e))
    };
    let pretty = |v: &Value| serde_json::to_vec_pretty(v).unwrap_or_default();
    write("config.json", &pretty(&c))?;
    write(
        "model.safetensors.index.json",
        &pretty(&json!({"metadata": {"total_size": total}, "weight_map": weight_map})),
    )?;
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
        "special_tokens_map.json",
    ] {
        let from = src.dir.join(name);
        if from.exists() {
            std::fs::copy(&from, partial.join(name)).map_err(|e| EngineError::io(&from, e))?;
        }
    }
    write(
        "README.md",
        format!(
            "# Inflated copy of {}\n\nWritten by `shadowmoe inflate` (engine/src/inflate.rs): the same function as the \
             source checkpoint (config sha256 {}) at hidden size {} (from {h}) and expert width {} (from {}); \
             {} copies of the real hidden dimensions, norm shift {}, rms_norm_eps {:e}; padding seed {}. \
             One expert = {expert_bytes} bytes, one contiguous 4 KiB-aligned extent.\n",
            src.dir.display(),
            src.config_sha256()?,
            p.hidden,
            p.moe_intermediate,
            cfg.moe_intermediate_size,
            p.copies,
            p.shift,
            p.rms_norm_eps,
            opts.seed
        )
        .as_bytes(),
    )?;
    std::fs::rename(&partial, out).map_err(|e| EngineError::io(out, e))?;
    Ok(InflateSummary {
        dir: out.to_path_buf(),
        plan: p,
        files: n_files,
        total_bytes: total,
        expert_bytes,
        experts: experts.len() * cfg.num_experts,
    })
}

/// Checks that no 4 KiB page of the expert shards of an inflated checkpoint is all zeros and
/// that the files have no holes (allocated blocks cover their length): a sample of `pages`
/// pages per file, evenly spread. Returns (pages checked, zero pages).
pub fn check_no_holes(dir: &Path, pages: usize) -> Result<(u64, u64)> {
    use std::os::unix::fs::{FileExt, MetadataExt};
    let mut checked = 0;
    let mut zero = 0;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| EngineError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    for path in files.iter().skip(1) {
        let f = std::fs::File::open(path).map_err(|e| EngineError::io(path, e))?;
        let meta = f.metadata().map_err(|e| EngineError::io(path, e))?;
        if meta.blocks() * 512 < meta.len() {
            return Err(EngineError::invalid(
                path.display().to_string(),
                format!(
                    "{} bytes long but only {} allocated: the file has holes",
                    meta.len(),
                    meta.blocks() * 512
                ),
            ));
        }
        let n_pages = meta.len() / ALIGN as u64;
        let mut buf = vec![0u8; ALIGN];
        for i in 0..pages as u64 {
            // Skip the header page.
            let page = 1 + i * (n_pages.saturating_sub(1)) / pages as u64;
            if page >= n_pages {
                break;
            }
            f.read_exact_at(&mut buf, page * ALIGN as u64)
                .map_err(|e| EngineError::io(path, e))?;
            checked += 1;
            zero += u64::from(buf.iter().all(|&b| b == 0));
        }
    }
    Ok((checked, zero))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_padding_is_finite_nonzero_and_bounded() {
        let mut rng = Rng::new(7, "x");
        for dt in [DType::BF16, DType::F16, DType::F32] {
            let mut b = vec![0u8; 4096];
            rng.fill(&mut b, dt);
            let w = Weight::new(
                std::sync::Arc::new(crate::weights::AlignedBytes::copy_from(&b)),
                0,
                dt,
                vec![4096 / dt.size()],
            );
            for v in w.to_f32_vec() {
                assert!(v.is_finite() && v != 0.0 && v.abs() < 4.0, "{dt:?}: {v}");
            }
        }
    }

    #[test]
    fn encode_refuses_inexact_values() {
        let mut b = [0u8; 2];
        assert!(encode(1.5, DType::BF16, &mut b));
        assert!(!encode(1.0 + 1.0 / 1024.0, DType::BF16, &mut b));
        assert!(!encode(1e-9, DType::F16, &mut b));
    }

    #[test]
    fn headers_align_the_data() {
        let t = OutTensor {
            name: "a".into(),
            rule: Rule::Copy,
            dtype: DType::BF16,
            shape: vec![3],
        };
        let hd = header(&[&t], &BTreeMap::new()).unwrap_or_default();
        assert_eq!(hd.len() % ALIGN, 0);
    }
}
