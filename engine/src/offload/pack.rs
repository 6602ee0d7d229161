//! The expert pack: every (layer, expert)'s gate, up and down matrices as one contiguous extent
//! aligned to 4 KiB, so that one read brings one expert.
//!
//! A pack is a directory:
//! - `experts.bin`: the extents, in (layer, expert) order, each padded to 4 KiB;
//! - `index.json`: format tag, the sha256 of the source `config.json`, shapes and dtype of the
//!   three parts (a quantised part: its packed words, then its scales and biases, with bits and
//!   group size), for experts with biases (gpt_oss) the three bias vectors after them
//!   (`biases`), and per expert its offset, length and xxh3-64 checksum.
//!
//! It is written under a temporary name and renamed when complete.

use std::collections::HashMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::layout::{QuantPart, SlotPiece};
use super::store::{ExpertLayout, ExpertStore, Extent, IoMode, Part};
use super::{ExpertKey, align_up};
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::moe::expert_weights;
use crate::weights::{DType, WeightIndex};

/// Format tag of `index.json`.
pub const PACK_FORMAT: &str = "shadowmoe-expert-pack/1";

/// The file beside `index.json` that holds its sha256 (packs made before it have none).
pub const INDEX_SUM: &str = "index.json.sha256";

/// Whether the pack in `dir` carries its index's checksum (`--verify` requires it).
pub fn index_checksummed(dir: &Path) -> bool {
    dir.join(INDEX_SUM).exists()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PartIndex {
    name: String,
    /// `U32` for a quantised part's packed words.
    dtype: String,
    /// `[out, in]` (of the float matrix a quantised part stands for).
    shape: [usize; 2],
    /// Offset of the part inside the expert's extent.
    offset: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    quant: Option<QuantIndex>,
}

/// A quantised part's spec and where its scales and biases are in the extent.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct QuantIndex {
    bits: u32,
    group_size: usize,
    scales: PieceIndex,
    biases: PieceIndex,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct PieceIndex {
    dtype: String,
    shape: [usize; 2],
    offset: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ExpertIndex {
    layer: u32,
    expert: u32,
    offset: u64,
    length: u64,
    xxh3: String,
}

/// `index.json` of a pack.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PackIndex {
    format: String,
    config_sha256: String,
    model_type: String,
    num_experts: usize,
    moe_layers: Vec<usize>,
    alignment: usize,
    file: String,
    file_len: u64,
    expert_bytes: u64,
    parts: Vec<PartIndex>,
    /// Layers whose experts are laid out otherwise than `parts` says (GGUF files may quantise
    /// some layers' experts differently): their parts and expert bytes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    layer_parts: Vec<LayerParts>,
    /// gpt_oss: the gate, up and down biases, after the three matrices (every expert alike).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    biases: Option<Vec<PieceIndex>>,
    experts: Vec<ExpertIndex>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct LayerParts {
    layer: usize,
    expert_bytes: u64,
    parts: Vec<PartIndex>,
}

/// The sha256 (hex) of a file: a checkpoint's identity is its `config.json`'s.
pub fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| EngineError::io(path, e))?;
    Ok(sha256_bytes(&bytes))
}

/// The sha256 (hex) of bytes.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What [`write_pack`] wrote.
#[derive(Debug, Clone)]
pub struct PackSummary {
    pub dir: PathBuf,
    pub experts: usize,
    pub expert_bytes: u64,
    pub file_bytes: u64,
}

/// Writes the pack of the checkpoint in `model_dir` to `out`; `progress(done, total)` is called
/// after each expert.
pub fn write_pack(
    model_dir: &Path,
    cfg: &ModelConfig,
    w: &WeightIndex,
    out: &Path,
    progress: impl FnMut(usize, usize),
) -> Result<PackSummary> {
    let config_sha256 = sha256_file(&model_dir.join("config.json"))?;
    write_pack_for(&config_sha256, cfg, w, out, progress)
}

/// [`write_pack`] for the checkpoint whose identity is `config_sha256` (its `config.json`'s
/// sha256, or [`crate::Checkpoint::config_sha256`] of a GGUF file).
pub fn write_pack_for(
    config_sha256: &str,
    cfg: &ModelConfig,
    w: &WeightIndex,
    out: &Path,
    mut progress: impl FnMut(usize, usize),
) -> Result<PackSummary> {
    if out.exists() {
        return Err(EngineError::invalid(
            "--out",
            format!(
                "{} already exists; remove it or choose another directory",
                out.display()
            ),
        ));
    }
    let config_sha256 = config_sha256.to_string();
    let moe_layers = cfg.moe_layers();
    let total = moe_layers.len() * cfg.num_experts;
    let name = out
        .file_name()
        .map_or("pack".into(), |n| n.to_string_lossy().into_owned());
    let tmp = out.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| EngineError::io(&tmp, e))?;
    let result = (|| -> Result<PackSummary> {
        let bin = tmp.join("experts.bin");
        let file = std::fs::File::create(&bin).map_err(|e| EngineError::io(&bin, e))?;
        let mut writer = BufWriter::with_capacity(1 << 22, file);
        let mut experts = Vec::with_capacity(total);
        // The first expert's parts; each layer's first expert's (where they differ, recorded
        // in layer_parts); every other expert must match its layer's.
        let mut parts: Option<Vec<PartIndex>> = None;
        let mut layer_parts: Vec<LayerParts> = Vec::new();
        let mut this_layer: Option<Vec<PartIndex>> = None;
        let mut bias_parts: Option<Vec<PieceIndex>> = None;
        let mut offset = 0u64;
        for &l in &moe_layers {
            for e in 0..cfg.num_experts {
                let ew = expert_weights(cfg, w, l, e)?;
                let file = crate::moe::expert_file(cfg, w, l, e)?;
                ew.check_finite(
                    w.file_path(file),
                    &format!("{}experts.{e}", crate::moe::moe_prefix(cfg, w, l)),
                )?;
                let mats = [("gate", &ew.gate), ("up", &ew.up), ("down", &ew.down)];
                // Each matrix's bytes, in order: a quantised one's words, scales, biases.
                let mut these = Vec::with_capacity(3);
                let mut chunks: Vec<&[u8]> = Vec::with_capacity(9);
                let mut within = 0;
                for (n, m) in mats {
                    let offset = within;
                    within += m.nbytes();
                    chunks.push(m.bytes());
                    let quant = match m.quant() {
                        None => None,
                        Some(q) => {
                            let mut pieces = Vec::with_capacity(2);
                            for p in [&q.scales, &q.biases] {
                                pieces.push(PieceIndex {
                                    dtype: dtype_tag(p.dtype()),
                                    shape: [p.shape()[0], p.shape()[1]],
                                    offset: within,
                                });
                                within += p.nbytes();
                                chunks.push(p.bytes());
                            }
                            let [scales, biases]: [PieceIndex; 2] = pieces.try_into().expect("two pieces");
                            Some(QuantIndex {
                                bits: q.spec.bits,
                                group_size: q.spec.group_size,
                                scales,
                                biases,
                            })
                        }
                    };
                    these.push(PartIndex {
                        name: n.into(),
                        dtype: dtype_tag(m.dtype()),
                        shape: [m.shape()[0], m.shape()[1]],
                        offset,
                        quant,
                    });
                }
                // gpt_oss: the biases after the matrices.
                if let Some(b) = &ew.biases {
                    let mut pieces = Vec::with_capacity(3);
                    for m in [&b.gate, &b.up, &b.down] {
                        pieces.push(PieceIndex {
                            dtype: dtype_tag(m.dtype()),
                            shape: [m.shape()[0], m.shape()[1]],
                            offset: within,
                        });
                        within += m.nbytes();
                        chunks.push(m.bytes());
                    }
                    match &bias_parts {
                        None => bias_parts = Some(pieces),
                        Some(p) if *p == pieces => {}
                        Some(_) => {
                            return Err(EngineError::invalid(
                                "expert-pack",
                                format!(
                                    "layer {l} expert {e}: biases laid out otherwise than the first expert's"
                                ),
                            ));
                        }
                    }
                }
                if e == 0 {
                    this_layer = Some(these.clone());
                    match &parts {
                        None => parts = Some(these.clone()),
                        Some(p) if same_parts(p, &these) => {}
                        Some(_) => layer_parts.push(LayerParts {
                            layer: l,
                            expert_bytes: within as u64,
                            parts: these.clone(),
                        }),
                    }
                } else if !this_layer.as_ref().is_some_and(|p| same_parts(p, &these)) {
                    return Err(EngineError::invalid(
                        "expert-pack",
                        format!(
                            "layer {l} expert {e} has other dtypes or shapes than the layer's first expert"
                        ),
                    ));
                }
                let mut hasher = xxhash_rust::xxh3::Xxh3::new();
                for c in chunks {
                    hasher.update(c);
                    writer.write_all(c).map_err(|e| EngineError::io(&bin, e))?;
                }
                let length = within as u64;
                let padded = align_up(length);
                writer
                    .write_all(&vec![0u8; (padded - length) as usize])
                    .map_err(|e| EngineError::io(&bin, e))?;
                experts.push(ExpertIndex {
                    layer: l as u32,
                    expert: e as u32,
                    offset,
                    length,
                    xxh3: format!("{:016x}", hasher.digest()),
                });
                offset += padded;
                progress(experts.len(), total);
            }
        }
        let file = writer
            .into_inner()
            .map_err(|e| EngineError::io(&bin, e.into_error()))?;
        file.sync_all().map_err(|e| EngineError::io(&bin, e))?;
        let expert_bytes = experts.first().map_or(0, |x| x.length);
        let mean_bytes = experts
            .iter()
            .map(|x| x.length)
            .sum::<u64>()
            .div_ceil(experts.len().max(1) as u64);
        let index = PackIndex {
            format: PACK_FORMAT.into(),
            config_sha256,
            model_type: cfg.arch.model_type().into(),
            num_experts: cfg.num_experts,
            moe_layers: moe_layers.clone(),
            alignment: super::ALIGN,
            file: "experts.bin".into(),
            file_len: offset,
            expert_bytes,
            parts: parts.unwrap_or_default(),
            layer_parts,
            biases: bias_parts,
            experts,
        };
        let index_path = tmp.join("index.json");
        let text = serde_json::to_string_pretty(&index)
            .map_err(|e| EngineError::invalid("index.json", e.to_string()))?;
        // The index's own checksum: an edited offset or shape is caught at open, not as wrong
        // logits.
        let sum_path = tmp.join(INDEX_SUM);
        std::fs::write(&sum_path, format!("{}\n", sha256_bytes(text.as_bytes())))
            .map_err(|e| EngineError::io(&sum_path, e))?;
        std::fs::write(&index_path, text).map_err(|e| EngineError::io(&index_path, e))?;
        Ok(PackSummary {
            dir: out.to_path_buf(),
            experts: total,
            expert_bytes: mean_bytes,
            file_bytes: offset,
        })
    })();
    match result {
        Ok(summary) => {
            std::fs::rename(&tmp, out).map_err(|e| EngineError::io(out, e))?;
            Ok(summary)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// Whether two experts' parts are laid out alike (dtypes, shapes, offsets, quantisation).
fn same_parts(a: &[PartIndex], b: &[PartIndex]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(a, b)| {
            a.dtype == b.dtype
                && a.shape == b.shape
                && a.offset == b.offset
                && a.quant
                    .as_ref()
                    .map(|q| (q.bits, q.group_size, &q.scales, &q.biases))
                    == b.quant
                        .as_ref()
                        .map(|q| (q.bits, q.group_size, &q.scales, &q.biases))
        })
}

/// Checks part `i` (gate, up, down) of the index against the config's expert shape and the
/// expert's byte length: the kernels index by these shapes, so a disagreement must be refused
/// here, not read out of bounds.
fn check_part(p: &Part, i: usize, cfg: &ModelConfig, expert_bytes: u64) -> std::result::Result<(), String> {
    let (h, w) = (cfg.hidden_size, cfg.moe_intermediate_size);
    let want = if i == 2 { [h, w] } else { [w, h] };
    if p.shape != want {
        return Err(format!(
            "shape {:?} but config.json's hidden_size / moe_intermediate_size give {want:?}",
            p.shape
        ));
    }
    let within = |off: usize, len: usize, what: &str| -> std::result::Result<(), String> {
        match off.checked_add(len) {
            Some(end) if end as u64 <= expert_bytes => Ok(()),
            _ => Err(format!(
                "{what} at {off}+{len} runs past expert_bytes {expert_bytes}"
            )),
        }
    };
    match &p.quant {
        None => within(p.slot_offset, p.dtype.nbytes(&p.shape), "matrix"),
        Some(q) => {
            let groups = p.shape[1] / q.spec.group_size;
            within(
                p.slot_offset,
                p.shape[0] * q.spec.words_per_row(p.shape[1]) * 4,
                "packed words",
            )?;
            for (piece, what) in [(&q.scales, "scales"), (&q.biases, "biases")] {
                if piece.shape != [p.shape[0], groups] {
                    return Err(format!(
                        "{what} shape {:?}, expected {:?}",
                        piece.shape,
                        [p.shape[0], groups]
                    ));
                }
                within(piece.slot_offset, piece.dtype.nbytes(&piece.shape), what)?;
            }
            Ok(())
        }
    }
}

/// A dtype's spelling in the pack index: a GGUF file's f16/bf16 matrices (computed as
/// llama.cpp does) are `ggml.F16`/`ggml.BF16`, apart from safetensors' `F16`/`BF16`.
fn dtype_tag(d: DType) -> String {
    match d {
        DType::Block(b) if b.is_float() => format!("ggml.{}", b.name()),
        _ => d.name().into(),
    }
}

fn dtype_from(name: &str) -> Option<DType> {
    match name {
        "F32" => Some(DType::F32),
        "F16" => Some(DType::F16),
        "BF16" => Some(DType::BF16),
        "U32" => Some(DType::U32),
        other => crate::ggml::BlockType::from_name(other.strip_prefix("ggml.").unwrap_or(other))
            .filter(|b| b.is_float() == other.starts_with("ggml."))
            .map(DType::Block),
    }
}

/// Opens the pack in `dir` for the model whose `config.json` has sha256 `config_sha256`.
pub fn open_pack(dir: &Path, cfg: &ModelConfig, config_sha256: &str, mode: IoMode) -> Result<ExpertStore> {
    let index_path = dir.join("index.json");
    let text = std::fs::read_to_string(&index_path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => EngineError::MissingFile {
            path: index_path.clone(),
            what: "an expert pack's index (make one with `shadowmoe expert-pack`)",
        },
        _ => EngineError::io(&index_path, e),
    })?;
    let sum_path = dir.join(INDEX_SUM);
    match std::fs::read_to_string(&sum_path) {
        Ok(want) => {
            let got = sha256_bytes(text.as_bytes());
            if want.trim() != got {
                return Err(EngineError::invalid(
                    index_path.display().to_string(),
                    format!(
                        "sha256 {got} does not match {} ({}): the index was modified after packing; make the pack again",
                        sum_path.display(),
                        want.trim()
                    ),
                ));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(EngineError::io(&sum_path, e)),
    }
    let index: PackIndex = serde_json::from_str(&text).map_err(|e| EngineError::Json {
        path: index_path.clone(),
        message: e.to_string(),
    })?;
    let bad = |field: &str, message: String| EngineError::field(&index_path, field, message);
    if index.format != PACK_FORMAT {
        return Err(bad("format", format!("`{}` is not {PACK_FORMAT}", index.format)));
    }
    if index.config_sha256 != config_sha256 {
        return Err(bad(
            "config_sha256",
            format!(
                "this pack was made from another model (its config.json sha256 {}, this model's {config_sha256}); make a pack for this model",
                index.config_sha256
            ),
        ));
    }
    if index.moe_layers != cfg.moe_layers() || index.num_experts != cfg.num_experts {
        return Err(bad(
            "moe_layers",
            "does not match the model's MoE layers and experts".into(),
        ));
    }
    if index.parts.len() != 3 || index.experts.len() != cfg.moe_layers().len() * cfg.num_experts {
        return Err(bad("experts", "incomplete index".into()));
    }
    let parse = |list: &[PartIndex], expert_bytes: u64| -> Result<[Part; 3]> {
        let mut v = Vec::new();
        for p in list {
            let dtype =
                dtype_from(&p.dtype).ok_or_else(|| bad("parts", format!("unknown dtype {}", p.dtype)))?;
            let quant = match &p.quant {
                None if dtype == DType::U32 => {
                    return Err(bad(
                        "parts",
                        format!("{}: U32 words without scales and biases", p.name),
                    ));
                }
                None => None,
                Some(q) => {
                    let spec = crate::quant::QuantSpec::new(
                        q.bits,
                        q.group_size,
                        &index_path.display().to_string(),
                    )?;
                    let piece = |x: &PieceIndex| -> Result<SlotPiece> {
                        Ok(SlotPiece {
                            dtype: dtype_from(&x.dtype).filter(|d| *d != DType::U32).ok_or_else(|| {
                                bad("parts", format!("{}: scales/biases of dtype {}", p.name, x.dtype))
                            })?,
                            shape: x.shape,
                            slot_offset: x.offset,
                        })
                    };
                    if dtype != DType::U32 || q.scales.shape != [p.shape[0], p.shape[1] / spec.group_size] {
                        return Err(bad(
                            "parts",
                            format!(
                                "{}: quantised part with dtype {} or scales {:?}",
                                p.name, p.dtype, q.scales.shape
                            ),
                        ));
                    }
                    Some(QuantPart {
                        spec,
                        scales: piece(&q.scales)?,
                        biases: piece(&q.biases)?,
                    })
                }
            };
            let part = Part {
                dtype,
                shape: p.shape,
                slot_offset: p.offset,
                quant,
            };
            check_part(&part, v.len(), cfg, expert_bytes)
                .map_err(|m| bad("parts", format!("{}: {m}", p.name)))?;
            v.push(part);
        }
        v.try_into().map_err(|_| bad("parts", "expected 3 parts".into()))
    };
    let parts = parse(&index.parts, index.expert_bytes)?;
    // gpt_oss's biases: present exactly when the model's experts have them, each one vector of
    // the config's width, inside the expert.
    let biases: Option<[SlotPiece; 3]> = match (&index.biases, cfg.clamped_swiglu.is_some()) {
        (None, false) => None,
        (Some(list), true) if index.layer_parts.is_empty() && list.len() == 3 => {
            let (h, i) = (cfg.hidden_size, cfg.moe_intermediate_size);
            let mut v = Vec::with_capacity(3);
            for (x, want) in list.iter().zip([[1, i], [1, i], [1, h]]) {
                let dtype = dtype_from(&x.dtype)
                    .filter(|d| matches!(d, DType::F32 | DType::F16 | DType::BF16))
                    .ok_or_else(|| bad("biases", format!("dtype {}", x.dtype)))?;
                let end = x.offset.checked_add(dtype.nbytes(&x.shape));
                if x.shape != want || end.is_none_or(|end| end as u64 > index.expert_bytes) {
                    return Err(bad(
                        "biases",
                        format!(
                            "shape {:?} at {} (expected {want:?} within expert_bytes {})",
                            x.shape, x.offset, index.expert_bytes
                        ),
                    ));
                }
                v.push(SlotPiece {
                    dtype,
                    shape: x.shape,
                    slot_offset: x.offset,
                });
            }
            v.try_into().ok()
        }
        (Some(_), true) => return Err(bad("biases", "expected three bias vectors".into())),
        (None, true) => {
            return Err(bad(
                "biases",
                format!(
                    "missing: {}'s experts have biases (a pack made before they were packed; make it again)",
                    cfg.arch.model_type()
                ),
            ));
        }
        (Some(_), false) => {
            return Err(bad(
                "biases",
                format!("present, but {}'s experts have none", cfg.arch.model_type()),
            ));
        }
    };
    // Per layer: its parts and expert bytes (the default's, unless layer_parts says otherwise).
    let mut by_layer: HashMap<usize, ([Part; 3], u64)> = HashMap::new();
    for lp in &index.layer_parts {
        if lp.parts.len() != 3 || !cfg.moe_layers().contains(&lp.layer) {
            return Err(bad(
                "layer_parts",
                format!(
                    "layer {}: not a MoE layer of this model, or not 3 parts",
                    lp.layer
                ),
            ));
        }
        by_layer.insert(lp.layer, (parse(&lp.parts, lp.expert_bytes)?, lp.expert_bytes));
    }
    let mut layouts = HashMap::new();
    let moe_layers = cfg.moe_layers();
    for x in &index.experts {
        if !moe_layers.contains(&(x.layer as usize))
            || x.expert as usize >= cfg.num_experts
            || x.offset
                .checked_add(x.length)
                .is_none_or(|end| end > index.file_len)
        {
            return Err(bad(
                "experts",
                format!(
                    "layer {} expert {} at {}+{}: not an expert of this model, or past file_len {}",
                    x.layer, x.expert, x.offset, x.length, index.file_len
                ),
            ));
        }
        let checksum = u64::from_str_radix(&x.xxh3, 16)
            .map_err(|_| bad("experts.xxh3", format!("`{}` is not hex", x.xxh3)))?;
        let (parts, expert_bytes) = by_layer
            .get(&(x.layer as usize))
            .cloned()
            .unwrap_or((parts, index.expert_bytes));
        if x.length != expert_bytes || !x.offset.is_multiple_of(super::ALIGN as u64) {
            return Err(bad(
                "experts",
                format!("layer {} expert {}: bad offset or length", x.layer, x.expert),
            ));
        }
        let previous = layouts.insert(
            ExpertKey {
                layer: x.layer,
                expert: x.expert,
            },
            ExpertLayout {
                extents: vec![Extent {
                    file: 0,
                    offset: x.offset,
                    len: x.length,
                    slot_offset: 0,
                }],
                parts,
                biases,
                rearrange: None,
                checksum: Some(checksum),
            },
        );
        if previous.is_some() {
            return Err(bad(
                "experts",
                format!("layer {} expert {} is listed twice", x.layer, x.expert),
            ));
        }
    }
    let bin = dir.join(&index.file);
    let len = std::fs::metadata(&bin)
        .map_err(|e| EngineError::io(&bin, e))?
        .len();
    if len != index.file_len {
        return Err(EngineError::Safetensors {
            path: bin,
            message: format!(
                "pack file is {len} bytes but its index says {} (truncated or modified after packing)",
                index.file_len
            ),
        });
    }
    ExpertStore::open(vec![bin], layouts, mode, "pack".into(), cfg.clamped_swiglu)
}
