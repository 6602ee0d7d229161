//! Checkpoint weights: safetensors files (one, or sharded through
//! `model.safetensors.index.json`) memory-mapped with memmap2 and indexed by tensor name.
//!
//! The index maps every tensor name to (file, offset, dtype, shape) and is checked against the
//! file's bounds when the file opens, so a truncated download or a header that lies about its
//! offsets is refused up front with the file and tensor named, never discovered mid-forward.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use serde::{Deserialize, Deserializer as _};

use crate::error::{EngineError, Result};
use crate::ggml::BlockType;
use crate::quant::{QuantConfig, QuantSpec};

/// Element type of a weight tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    /// MLX's packed quantised values (`32 / bits` per word), only ever inside a quantised
    /// [`Weight`] with its scales and biases.
    U32,
    /// One of llama.cpp's block-quantised types (GGUF): rows of blocks, scales inside.
    Block(BlockType),
}

impl DType {
    /// Bytes per element of an element type; the bytes of one block of a block type (use
    /// [`DType::nbytes`] or [`DType::row_bytes`] for sizes of tensors).
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Block(b) => b.block_bytes(),
        }
    }

    /// Bytes of a row of `k` elements.
    pub fn row_bytes(self, k: usize) -> usize {
        match self {
            DType::Block(b) => b.row_bytes(k),
            _ => k * self.size(),
        }
    }

    /// Bytes of a tensor of `shape` (rows along the last axis).
    pub fn nbytes(self, shape: &[usize]) -> usize {
        match shape.split_last() {
            Some((&k, rows)) => rows.iter().product::<usize>() * self.row_bytes(k),
            None => self.row_bytes(1),
        }
    }

    /// The alignment a view of this type needs in memory.
    pub fn align(self) -> usize {
        match self {
            // GGUF f16/bf16 values are read as u16; blocks byte by byte (their f16 fields with
            // from_le_bytes).
            DType::Block(b) if b.is_float() => 2,
            DType::Block(_) => 1,
            _ => self.size(),
        }
    }

    /// Whether a row of `k` elements is whole blocks.
    pub fn fits_row(self, k: usize) -> bool {
        match self {
            DType::Block(b) => k.is_multiple_of(b.block_values()),
            _ => true,
        }
    }

    /// The safetensors (or ggml) spelling.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::U32 => "U32",
            DType::Block(b) => b.name(),
        }
    }
}

/// The index of the first NaN or infinity among `bytes` read as `dtype` (None for U32 words,
/// which are packed integers). A scan of the exponent bits: cheap next to a load.
pub fn first_non_finite(dtype: DType, bytes: &[u8]) -> Option<usize> {
    match dtype {
        DType::U32 => None,
        // The block's scales: the first element of the first block whose scales are not finite.
        DType::Block(b) => b.first_non_finite_block(bytes).map(|i| i * b.block_values()),
        DType::F32 => first_where::<4>(bytes, |c| u32::from_le_bytes(c) & 0x7f80_0000 == 0x7f80_0000),
        DType::BF16 => first_where::<2>(bytes, |c| u16::from_le_bytes(c) & 0x7f80 == 0x7f80),
        DType::F16 => first_where::<2>(bytes, |c| u16::from_le_bytes(c) & 0x7c00 == 0x7c00),
    }
}

/// The first `N`-byte element of `bytes` for which `hit` holds. Blocks are scanned without an
/// early exit (a loop the compiler vectorises: every expert load is scanned, and a scan that
/// stopped to test each element ran at ~2 GB/s, slower than the disk), and only a block with a
/// hit is searched for its position.
fn first_where<const N: usize>(bytes: &[u8], hit: impl Fn([u8; N]) -> bool + Copy) -> Option<usize> {
    const BLOCK: usize = 2048;
    let elem = |c: &[u8]| -> [u8; N] { std::array::from_fn(|i| c[i]) };
    let mut base = 0;
    for block in bytes.chunks(BLOCK * N) {
        let any = block.chunks_exact(N).fold(false, |a, c| a | hit(elem(c)));
        if any {
            return block.chunks_exact(N).position(|c| hit(elem(c))).map(|i| base + i);
        }
        base += block.len() / N;
    }
    None
}

/// Refuses a tensor holding NaN or infinity, naming it and the file.
pub fn check_finite(path: &Path, tensor: &str, dtype: DType, bytes: &[u8]) -> Result<()> {
    match first_non_finite(dtype, bytes) {
        None => Ok(()),
        Some(i) => Err(EngineError::Tensor {
            path: path.to_path_buf(),
            tensor: tensor.to_string(),
            message: format!(
                "element {i} is NaN or infinite (a corrupt or diverged checkpoint: every weight must be finite)"
            ),
        }),
    }
}

/// Bytes that back weights: a memory map, or an owned buffer aligned for any dtype.
pub type Backing = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// An owned byte buffer aligned to 8 bytes (for weights that are not aligned in their file,
/// and for loads into owned memory).
#[derive(Debug, Clone)]
pub struct AlignedBytes {
    words: Vec<u64>,
    len: usize,
}

impl AlignedBytes {
    /// A copy of `bytes`.
    pub fn copy_from(bytes: &[u8]) -> Self {
        let mut out = Self::zeroed(bytes.len());
        out.as_mut_slice().copy_from_slice(bytes);
        out
    }

    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        Self {
            words: vec![0u64; len.div_ceil(8)],
            len,
        }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `words` holds at least `len` initialised bytes; u8 has no alignment needs.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<u8>(), self.len) }
    }
}

impl AsRef<[u8]> for AlignedBytes {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `words` holds at least `len` initialised bytes; u8 has no alignment needs.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.len) }
    }
}

/// One weight tensor: a typed, shaped view into shared bytes. Cloning is cheap.
///
/// A quantised weight (MLX affine, [`crate::quant`]) has dtype [`DType::U32`], its logical
/// shape (`[.., N, K]`, as the float weight would have), its packed words as bytes
/// (`[.., N, K·bits/32]`) and its scales and biases (`[.., N, K/G]`) beside them.
#[derive(Clone)]
pub struct Weight {
    backing: Backing,
    start: usize,
    dtype: DType,
    shape: Vec<usize>,
    quant: Option<Arc<QuantParts>>,
}

/// Where one float piece of a matrix lies (`at`, in the caller's terms), its dtype and shape.
pub type PieceAt<L> = (L, DType, [usize; 2]);

/// A matrix `[out, in]` from the pieces `piece(at, dtype, shape)` builds: the matrix itself
/// (float), or a quantised one's packed words (`[out, in·bits/32]` at `at`) with its scales and
/// biases. One rule for every place an expert's matrices are viewed (checkpoint, slot, file map).
pub fn matrix_from_pieces<L>(
    shape: [usize; 2],
    dtype: DType,
    at: L,
    quant: Option<(QuantSpec, PieceAt<L>, PieceAt<L>)>,
    piece: impl Fn(L, DType, Vec<usize>) -> Weight,
) -> Weight {
    match quant {
        None => piece(at, dtype, shape.to_vec()),
        Some((spec, (sa, sd, ss), (ba, bd, bs))) => Weight::quantized(
            piece(at, DType::U32, vec![shape[0], spec.words_per_row(shape[1])]),
            shape.to_vec(),
            QuantParts {
                spec,
                scales: piece(sa, sd, ss.to_vec()),
                biases: piece(ba, bd, bs.to_vec()),
            },
        ),
    }
}

/// The scales and biases of a quantised [`Weight`], one pair per group of its rows' inputs.
#[derive(Debug, Clone)]
pub struct QuantParts {
    pub spec: QuantSpec,
    /// `[.., N, K/G]`, any float dtype.
    pub scales: Weight,
    pub biases: Weight,
}

impl std::fmt::Debug for Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weight")
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .finish()
    }
}

impl Weight {
    /// A weight over `backing[start..start + numel * dtype.size()]`. Copies into an aligned
    /// buffer if the bytes are not aligned for `dtype`.
    pub fn new(backing: Backing, start: usize, dtype: DType, shape: Vec<usize>) -> Self {
        let len = dtype.nbytes(&shape);
        let bytes = &(*backing).as_ref()[start..start + len];
        if (bytes.as_ptr() as usize).is_multiple_of(dtype.align()) {
            Self {
                backing,
                start,
                dtype,
                shape,
                quant: None,
            }
        } else {
            Self {
                backing: Arc::new(AlignedBytes::copy_from(bytes)),
                start: 0,
                dtype,
                shape,
                quant: None,
            }
        }
    }

    /// A quantised weight of logical shape `shape` from its packed words (a [`DType::U32`]
    /// weight of shape `[.., N, K·bits/32]`) and its scales and biases; the shapes must agree
    /// (checked by [`WeightIndex::get`], which names the tensor).
    pub fn quantized(words: Weight, shape: Vec<usize>, parts: QuantParts) -> Self {
        debug_assert_eq!(words.dtype, DType::U32);
        Self {
            backing: words.backing,
            start: words.start,
            dtype: DType::U32,
            shape,
            quant: Some(Arc::new(parts)),
        }
    }

    /// The scales and biases of a quantised weight.
    pub fn quant(&self) -> Option<&QuantParts> {
        self.quant.as_deref()
    }

    /// A weight that owns f32 values.
    pub fn from_f32(values: &[f32], shape: Vec<usize>) -> Self {
        assert_eq!(values.len(), shape.iter().product::<usize>(), "shape mismatch");
        let mut bytes = AlignedBytes::zeroed(values.len() * 4);
        for (dst, v) in bytes.as_mut_slice().chunks_exact_mut(4).zip(values) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
        Self::new(Arc::new(bytes), 0, DType::F32, shape)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Size in bytes (of the packed words, for a quantised weight).
    pub fn nbytes(&self) -> usize {
        match &self.quant {
            Some(q) => self.numel() / q.spec.per_word() * 4,
            None => self.dtype.nbytes(&self.shape),
        }
    }

    /// The raw little-endian bytes.
    pub fn bytes(&self) -> &[u8] {
        &(*self.backing).as_ref()[self.start..self.start + self.nbytes()]
    }

    /// The elements as `u16` bits (f16/bf16 weights).
    pub fn as_u16(&self) -> &[u16] {
        debug_assert_ne!(self.dtype, DType::F32);
        let b = self.bytes();
        // SAFETY: alignment to 2 is guaranteed by `new`; every bit pattern is a valid u16.
        unsafe { std::slice::from_raw_parts(b.as_ptr().cast::<u16>(), b.len() / 2) }
    }

    /// The packed words of a quantised weight.
    pub fn as_u32(&self) -> &[u32] {
        debug_assert_eq!(self.dtype, DType::U32);
        let b = self.bytes();
        // SAFETY: alignment to 4 is guaranteed by `new`; every bit pattern is a valid u32.
        unsafe { std::slice::from_raw_parts(b.as_ptr().cast::<u32>(), b.len() / 4) }
    }

    /// The elements as `f32` (f32 weights).
    pub fn as_f32(&self) -> &[f32] {
        debug_assert_eq!(self.dtype, DType::F32);
        let b = self.bytes();
        // SAFETY: alignment to 4 is guaranteed by `new`; every bit pattern is a valid f32.
        unsafe { std::slice::from_raw_parts(b.as_ptr().cast::<f32>(), b.len() / 4) }
    }

    /// Converts elements `[from, from + out.len())` to f32.
    pub fn read_f32(&self, from: usize, out: &mut [f32]) {
        let n = out.len();
        match self.dtype {
            DType::F32 => out.copy_from_slice(&self.as_f32()[from..from + n]),
            DType::BF16 | DType::Block(BlockType::BF16) => {
                for (o, &b) in out.iter_mut().zip(&self.as_u16()[from..from + n]) {
                    *o = f32::from_bits((b as u32) << 16);
                }
            }
            DType::F16 | DType::Block(BlockType::F16) => {
                use half::slice::HalfFloatSliceExt;
                let src: &[half::f16] = {
                    let bits = &self.as_u16()[from..from + n];
                    // SAFETY: half::f16 is repr(transparent) over u16.
                    unsafe { std::slice::from_raw_parts(bits.as_ptr().cast(), bits.len()) }
                };
                src.convert_to_f32_slice(out);
            }
            DType::Block(b) => {
                // Whole blocks around the range, dequantised one at a time.
                let bv = b.block_values();
                let (bb, bytes) = (b.block_bytes(), self.bytes());
                let mut buf = [0.0f32; crate::ggml::QK_K];
                let mut i = from;
                let mut done = 0;
                while done < n {
                    let (blk, c) = (i / bv, i % bv);
                    b.dequantize_block(&bytes[blk * bb..(blk + 1) * bb], &mut buf[..bv]);
                    let take = (bv - c).min(n - done);
                    out[done..done + take].copy_from_slice(&buf[c..c + take]);
                    done += take;
                    i += take;
                }
            }
            DType::U32 => {
                let q = self
                    .quant
                    .as_ref()
                    .expect("a U32 weight is always quantised (built by Weight::quantized)");
                let k = *self.shape.last().expect("a quantised weight has a shape");
                let (wpr, groups) = (q.spec.words_per_row(k), k / q.spec.group_size);
                let words = self.as_u32();
                let (mut sc, mut bi, mut row) = (vec![0.0; groups], vec![0.0; groups], vec![0.0; k]);
                let mut i = from;
                let mut done = 0;
                while done < n {
                    let (r, c) = (i / k, i % k);
                    q.scales.read_f32(r * groups, &mut sc);
                    q.biases.read_f32(r * groups, &mut bi);
                    crate::quant::dequantize_row(q.spec, &words[r * wpr..(r + 1) * wpr], &sc, &bi, &mut row);
                    let take = (k - c).min(n - done);
                    out[done..done + take].copy_from_slice(&row[c..c + take]);
                    done += take;
                    i += take;
                }
            }
        }
    }

    /// All elements as f32.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.numel()];
        self.read_f32(0, &mut out);
        out
    }

    /// Rows `[from, from + n)` along the first axis, as a weight of shape `[n, rest...]`.
    pub fn narrow(&self, from: usize, n: usize) -> Weight {
        assert!(from + n <= self.shape[0], "narrow out of range");
        let row_bytes = self.nbytes() / self.shape[0].max(1);
        let mut shape = self.shape.clone();
        shape[0] = n;
        Weight {
            backing: self.backing.clone(),
            start: self.start + from * row_bytes,
            dtype: self.dtype,
            shape,
            quant: self.quant.as_ref().map(|q| {
                Arc::new(QuantParts {
                    spec: q.spec,
                    scales: q.scales.narrow(from, n),
                    biases: q.biases.narrow(from, n),
                })
            }),
        }
    }

    /// Element `i` along the first axis, with that axis removed.
    pub fn index(&self, i: usize) -> Weight {
        let mut w = self.narrow(i, 1);
        w.shape.remove(0);
        if let Some(q) = &mut w.quant {
            let q = Arc::make_mut(q);
            q.scales.shape.remove(0);
            q.biases.shape.remove(0);
        }
        w
    }
}

/// Where one tensor lives.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub file: usize,
    /// Byte offset of the tensor's data from the start of the file.
    pub offset: usize,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

/// A quantised weight's three tensors, checked against each other and the config.
#[derive(Debug, Clone, Copy)]
pub struct QuantEntries<'a> {
    pub spec: QuantSpec,
    pub words: &'a TensorEntry,
    pub scales: &'a TensorEntry,
    pub biases: &'a TensorEntry,
}

/// One opened safetensors file.
#[derive(Debug)]
struct MappedFile {
    path: PathBuf,
    map: Arc<Mmap>,
}

/// Every tensor of a checkpoint by name, over its memory-mapped files.
#[derive(Debug)]
pub struct WeightIndex {
    files: Vec<MappedFile>,
    tensors: HashMap<String, TensorEntry>,
    /// Tensors whose dtype the engine does not compute with, by name (dtype shown in errors).
    other_dtype: HashMap<String, (usize, String)>,
    /// Of those, the U8 ones (gpt_oss's MXFP4 `*_blocks` and `*_scales`): file, byte offset and
    /// shape.
    bytes_u8: HashMap<String, (usize, usize, Vec<usize>)>,
    /// config.json's `quantization` block: each quantised tensor must agree with it.
    quantization: Option<QuantConfig>,
    /// Read from GGUF files (their `general.architecture`): names are llama.cpp's, indexed
    /// under Hugging Face names.
    gguf: Option<&'static str>,
    /// Query/key projections whose rows llama.cpp's converter permuted, with their head
    /// counts: un-permuted when copied into memory.
    permuted: HashMap<String, usize>,
}

/// `model.safetensors.index.json`.
#[derive(Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

/// `dtype` + `shape` + `data_offsets` of one header entry, read loosely for our own checks.
#[derive(Deserialize)]
struct RawInfo {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

impl WeightIndex {
    /// Opens the weights of the checkpoint in `dir`: `model.safetensors.index.json` if present,
    /// else `model.safetensors`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        if index_path.exists() {
            return Self::open_sharded(&index_path);
        }
        let single = dir.join("model.safetensors");
        if !single.exists() {
            return Err(EngineError::MissingFile {
                path: single,
                what: "the weights (model.safetensors or model.safetensors.index.json)",
            });
        }
        Self::open_files(&[single])
    }

    /// Opens the shards listed by a `model.safetensors.index.json` and checks that every tensor
    /// it lists is in the shard it names.
    pub fn open_sharded(index_path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index_path).map_err(|e| EngineError::io(index_path, e))?;
        let index: ShardIndex = serde_json::from_str(&text).map_err(|e| EngineError::Json {
            path: index_path.to_path_buf(),
            message: e.to_string(),
        })?;
        let dir = index_path.parent().unwrap_or(Path::new("."));
        let mut shard_names: Vec<&String> = index.weight_map.values().collect();
        shard_names.sort();
        shard_names.dedup();
        let paths: Vec<PathBuf> = shard_names.iter().map(|s| dir.join(s)).collect();
        let out = Self::open_files(&paths)?;
        for (name, shard) in &index.weight_map {
            let expected = dir.join(shard);
            match out.tensors.get(name) {
                Some(entry) if out.files[entry.file].path == expected => {}
                _ if out.other_dtype.contains_key(name) => {}
                _ => {
                    return Err(EngineError::Tensor {
                        path: expected,
                        tensor: name.clone(),
                        message: format!("listed in {} but not found in this shard", index_path.display()),
                    });
                }
            }
        }
        Ok(out)
    }

    /// Opens and indexes the given safetensors files.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut out = WeightIndex {
            files: Vec::new(),
            tensors: HashMap::new(),
            other_dtype: HashMap::new(),
            bytes_u8: HashMap::new(),
            quantization: None,
            gguf: None,
            permuted: HashMap::new(),
        };
        for path in paths {
            let file_idx = out.files.len();
            let (map, entries) = open_one(path)?;
            for (name, entry) in entries {
                match entry {
                    Ok(mut e) => {
                        e.file = file_idx;
                        out.tensors.insert(name, e);
                    }
                    Err((dtype, offset, shape)) => {
                        if dtype == "U8" {
                            out.bytes_u8.insert(name.clone(), (file_idx, offset, shape));
                        }
                        out.other_dtype.insert(name, (file_idx, dtype));
                    }
                }
            }
            out.files.push(MappedFile {
                path: path.clone(),
                map: Arc::new(map),
            });
        }
        Ok(out)
    }

    /// An index over GGUF files of architecture `arch` (crate::gguf::arch): their maps, the
    /// tensors the engine computes with under Hugging Face names, those of other ggml types,
    /// and the query/key projections to un-permute (with their head counts).
    pub(crate) fn from_gguf(
        arch: &'static str,
        files: Vec<(PathBuf, Arc<Mmap>)>,
        tensors: HashMap<String, TensorEntry>,
        other_dtype: HashMap<String, (usize, String)>,
        permuted: HashMap<String, usize>,
    ) -> Self {
        WeightIndex {
            files: files
                .into_iter()
                .map(|(path, map)| MappedFile { path, map })
                .collect(),
            tensors,
            other_dtype,
            bytes_u8: HashMap::new(),
            quantization: None,
            gguf: Some(arch),
            permuted,
        }
    }

    /// Whether the weights come from GGUF files.
    pub fn is_gguf(&self) -> bool {
        self.gguf.is_some()
    }

    /// `name` as the files spell it (llama.cpp's name for a GGUF checkpoint).
    pub fn stored_name(&self, name: &str) -> String {
        if let Some(arch) = self.gguf
            && let Some(g) = crate::gguf::names::gguf_name(arch, name)
        {
            return format!("{g}` (`{name}");
        }
        name.to_string()
    }

    /// Names of all float tensors.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Whether a float tensor of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Drops the pages of the checkpoint's files from this process's resident set (they stay
    /// in the page cache; a later read maps them back). For after a load that copied what it
    /// keeps.
    pub fn release_pages(&self) {
        for f in &self.files {
            // SAFETY: the maps are read-only views of files; dropping their pages only makes
            // the next access read them again from the page cache or the file.
            let _ = unsafe { f.map.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
        }
    }

    /// Whether the checkpoint has tensor `name` in a dtype the engine does not compute with.
    pub fn has_unsupported(&self, name: &str) -> bool {
        self.other_dtype.contains_key(name)
    }

    /// Where a tensor lives.
    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.get(name)
    }

    /// Path of file `i`.
    pub fn file_path(&self, i: usize) -> &Path {
        &self.files[i].path
    }

    /// The mapped bytes of file `i`.
    pub fn file_map(&self, i: usize) -> &Arc<Mmap> {
        &self.files[i].map
    }

    /// A description of the files, for error messages about missing tensors.
    fn where_(&self) -> PathBuf {
        match self.files.as_slice() {
            [one] => one.path.clone(),
            files => PathBuf::from(format!(
                "{} (and {} other shards)",
                files
                    .first()
                    .map_or(String::new(), |f| f.path.display().to_string()),
                files.len().saturating_sub(1)
            )),
        }
    }

    /// Checks every quantised tensor against config.json's `quantization` block from now on.
    pub fn set_quantization(&mut self, q: Option<QuantConfig>) {
        self.quantization = q;
    }

    /// Whether the experts are stacked as mlx_lm writes them (`switch_mlp`): the checkpoint
    /// went through mlx_lm's `sanitize` (qwen3_next's norms then hold `1 + w`).
    pub fn mlx_layout(&self) -> bool {
        self.gguf.is_none() && self.tensors.keys().any(|k| k.contains(".switch_mlp."))
    }

    /// Whether `{stem}.weight` is quantised (its scales are in the checkpoint, as mlx-lm
    /// decides).
    pub fn is_quantized(&self, name: &str) -> bool {
        name.strip_suffix(".weight")
            .is_some_and(|stem| self.tensors.contains_key(&format!("{stem}.scales")))
            || self.tensors.get(name).is_some_and(|e| e.dtype == DType::U32)
    }

    /// The tensor `name`, which must have exactly `shape` (for a quantised weight: the shape
    /// of the float weight it stands for).
    ///
    /// The bytes are copied to the heap and checked to be finite (the tensor is named if not):
    /// the resident weights never depend on the file staying as it was (truncating a mapped
    /// file under a running process would kill it with SIGBUS), and a NaN is refused at load
    /// instead of turning every logit into NaN.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Weight> {
        if self.is_quantized(name) {
            return self.get_quantized(name, shape);
        }
        let entry = self.entry_checked(name, shape)?;
        self.owned(entry, name)
    }

    /// An owned, checked copy of the tensor at `entry`.
    fn owned(&self, entry: &TensorEntry, name: &str) -> Result<Weight> {
        let len = entry.dtype.nbytes(&entry.shape);
        let file = &self.files[entry.file];
        let bytes = &file.map[entry.offset..entry.offset + len];
        check_finite(&file.path, &self.stored_name(name), entry.dtype, bytes)?;
        let owned = match self.permuted.get(name) {
            Some(&heads) => unpermute_rows(bytes, entry.shape[0], heads).ok_or_else(|| {
                EngineError::Tensor {
                    path: file.path.clone(),
                    tensor: self.stored_name(name),
                    message: format!(
                        "{} rows are not {heads} heads of an even size (llama.cpp's query/key row permutation cannot be undone)",
                        entry.shape[0]
                    ),
                }
            })?,
            None => AlignedBytes::copy_from(bytes),
        };
        Ok(Weight::new(Arc::new(owned), 0, entry.dtype, entry.shape.clone()))
    }

    /// An MLX-quantised weight: `name` (packed U32 words), `{stem}.scales` and
    /// `{stem}.biases`, with bits and group size read from their shapes and checked against
    /// the supported ones and config.json's `quantization` block.
    fn get_quantized(&self, name: &str, shape: &[usize]) -> Result<Weight> {
        let q = self.quantized_entries(name, shape)?;
        let stem = name.strip_suffix(".weight").unwrap_or(name);
        Ok(Weight::quantized(
            self.owned(q.words, name)?,
            shape.to_vec(),
            QuantParts {
                spec: q.spec,
                scales: self.owned(q.scales, &format!("{stem}.scales"))?,
                biases: self.owned(q.biases, &format!("{stem}.biases"))?,
            },
        ))
    }

    /// The entries of the quantised weight `name` (words, scales, biases) and its spec, all
    /// checked as [`WeightIndex::get`] checks them, without touching their bytes (slices of
    /// stacked experts are built from these).
    pub fn quantized_entries(&self, name: &str, shape: &[usize]) -> Result<QuantEntries<'_>> {
        let stem = name.strip_suffix(".weight").unwrap_or(name);
        let at = |file: usize, tensor: &str, message: String| EngineError::Tensor {
            path: self.files[file].path.clone(),
            tensor: tensor.to_string(),
            message,
        };
        let missing = |tensor: &str| EngineError::MissingTensor {
            path: self.where_(),
            tensor: tensor.to_string(),
        };
        let words = self.tensors.get(name).ok_or_else(|| missing(name))?;
        if words.dtype != DType::U32 {
            return Err(at(
                words.file,
                name,
                format!(
                    "has `{stem}.scales` beside it, so it must be packed U32 words (MLX-quantised), but it is {}",
                    words.dtype.name()
                ),
            ));
        }
        let (scales_name, biases_name) = (format!("{stem}.scales"), format!("{stem}.biases"));
        let scales = self.tensors.get(&scales_name).ok_or_else(|| {
            at(
                words.file,
                &scales_name,
                format!("missing: `{name}` is packed U32 words and needs its scales and biases"),
            )
        })?;
        let biases = self.tensors.get(&biases_name).ok_or_else(|| {
            at(
                words.file,
                &biases_name,
                format!("missing: `{name}` is quantised and needs its biases beside its scales"),
            )
        })?;
        let k = shape.last().copied().unwrap_or(0);
        let lead = &shape[..shape.len().saturating_sub(1)];
        let fits = |got: &[usize]| got.len() == shape.len() && &got[..got.len() - 1] == lead;
        let cols = words.shape.last().copied().unwrap_or(0);
        if k == 0 || !fits(&words.shape) || cols == 0 || !(cols * 32).is_multiple_of(k) {
            return Err(at(
                words.file,
                name,
                format!(
                    "packed shape {:?} does not fit the weight's shape {shape:?} (expected {lead:?} then K·bits/32 words for K = {k})",
                    words.shape
                ),
            ));
        }
        let groups = scales.shape.last().copied().unwrap_or(0);
        if scales.dtype == DType::U32 || !fits(&scales.shape) || groups == 0 || !k.is_multiple_of(groups) {
            return Err(at(
                scales.file,
                &scales_name,
                format!(
                    "{} {:?} does not fit the weight's shape {shape:?} (expected floats of {lead:?} then K/group_size for K = {k})",
                    scales.dtype.name(),
                    scales.shape
                ),
            ));
        }
        if biases.shape != scales.shape || biases.dtype == DType::U32 {
            return Err(at(
                biases.file,
                &biases_name,
                format!(
                    "{} {:?} (expected floats of the scales' shape {:?})",
                    biases.dtype.name(),
                    biases.shape,
                    scales.shape
                ),
            ));
        }
        let spec = QuantSpec::new(
            (cols * 32 / k) as u32,
            k / groups,
            &format!("{}: tensor `{name}`", self.files[words.file].path.display()),
        )?;
        if let Some(q) = &self.quantization {
            let bad = |message: String| Err(at(words.file, name, message));
            match q.spec_for(stem) {
                Some(want) if want == spec => {}
                Some(want) => {
                    return bad(format!(
                        "stored as {}-bit group {}, but config.json's quantization says {}-bit group {}",
                        spec.bits, spec.group_size, want.bits, want.group_size
                    ));
                }
                None => {
                    return bad("config.json's quantization leaves it unquantised, but it has scales".into());
                }
            }
        }
        Ok(QuantEntries {
            spec,
            words,
            scales,
            biases,
        })
    }

    /// Where tensor `name` lives, checking that it has exactly `shape` (its bytes are not
    /// touched).
    pub fn entry_checked(&self, name: &str, shape: &[usize]) -> Result<&TensorEntry> {
        if let Some((file, dtype)) = self.other_dtype.get(name) {
            return Err(EngineError::Tensor {
                path: self.files[*file].path.clone(),
                tensor: self.stored_name(name),
                message: if self.gguf.is_some() {
                    format!(
                        "ggml type {dtype} is not supported (the engine computes F32, F16, BF16, {})",
                        crate::ggml::BlockType::ALL
                            .iter()
                            .filter(|b| !b.is_float())
                            .map(|b| b.name())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                } else {
                    format!(
                        "dtype {dtype} is not supported (expected F32, F16 or BF16, or U32 words with scales and biases)"
                    )
                },
            });
        }
        let entry = self.tensors.get(name).ok_or_else(|| EngineError::MissingTensor {
            path: self.where_(),
            tensor: self.stored_name(name),
        })?;
        if entry.dtype == DType::U32 {
            return Err(EngineError::Tensor {
                path: self.files[entry.file].path.clone(),
                tensor: self.stored_name(name),
                message: "packed U32 words (MLX-quantised) cannot be read as a float tensor here".into(),
            });
        }
        if entry.shape != shape {
            return Err(EngineError::Shape {
                path: self.files[entry.file].path.clone(),
                tensor: self.stored_name(name),
                expected: shape.to_vec(),
                got: entry.shape.clone(),
            });
        }
        Ok(entry)
    }

    /// The bytes of U8 tensor `name` (gpt_oss's MXFP4 blocks and scales), which must have
    /// exactly `shape`: file index, byte offset, and the bytes (memory-mapped, not copied).
    pub fn u8_checked(&self, name: &str, shape: &[usize]) -> Result<(usize, usize, &[u8])> {
        let Some((file, offset, got)) = self.bytes_u8.get(name) else {
            if let Some(e) = self.tensors.get(name) {
                return Err(EngineError::Tensor {
                    path: self.files[e.file].path.clone(),
                    tensor: name.to_string(),
                    message: format!("dtype {} (expected U8)", e.dtype.name()),
                });
            }
            if let Some((file, dtype)) = self.other_dtype.get(name) {
                return Err(EngineError::Tensor {
                    path: self.files[*file].path.clone(),
                    tensor: name.to_string(),
                    message: format!("dtype {dtype} (expected U8)"),
                });
            }
            return Err(EngineError::MissingTensor {
                path: self.where_(),
                tensor: name.to_string(),
            });
        };
        if got != shape {
            return Err(EngineError::Shape {
                path: self.files[*file].path.clone(),
                tensor: name.to_string(),
                expected: shape.to_vec(),
                got: got.clone(),
            });
        }
        let n: usize = shape.iter().product();
        Ok((*file, *offset, &self.files[*file].map[*offset..*offset + n]))
    }

    /// Total bytes of all float tensors.
    pub fn total_bytes(&self) -> u64 {
        self.tensors
            .values()
            .map(|e| e.dtype.nbytes(&e.shape) as u64)
            .sum::<u64>()
            + self
                .bytes_u8
                .values()
                .map(|(_, _, shape)| shape.iter().product::<usize>() as u64)
                .sum::<u64>()
    }

    /// The tensor `name`, whatever its shape.
    /// The tensor `name` as stored, whatever its dtype (a quantised matrix's packed U32 words
    /// come back as a U32 [`Weight`] of the stored shape, without their scales).
    pub fn get_stored(&self, name: &str) -> Result<Weight> {
        let entry = self.tensors.get(name).ok_or_else(|| EngineError::MissingTensor {
            path: self.where_(),
            tensor: self.stored_name(name),
        })?;
        Ok(Weight::new(
            self.files[entry.file].map.clone(),
            entry.offset,
            entry.dtype,
            entry.shape.clone(),
        ))
    }

    pub fn get_any(&self, name: &str) -> Result<Weight> {
        let shape = self
            .tensors
            .get(name)
            .map(|e| e.shape.clone())
            .unwrap_or_default();
        let entry = self.entry_checked(name, &shape)?;
        let backing: Backing = self.files[entry.file].map.clone();
        Ok(Weight::new(
            backing,
            entry.offset,
            entry.dtype,
            entry.shape.clone(),
        ))
    }
}

/// The rows of a query or key projection as Hugging Face orders them, from llama.cpp's order.
/// Its converter stores head `h`'s row pair (`j`, `j + d/2`) at rows (`2j`, `2j + 1`) of the head
/// (adjacent-pair rotary); this puts them back. None when the rows are not `heads` heads of an
/// even size.
fn unpermute_rows(bytes: &[u8], rows: usize, heads: usize) -> Option<AlignedBytes> {
    if heads == 0 || rows == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return None;
    }
    let row = bytes.len() / rows;
    let (d, half) = (rows / heads, rows / heads / 2);
    let mut out = AlignedBytes::zeroed(bytes.len());
    let dst = out.as_mut_slice();
    for h in 0..heads {
        for j in 0..half {
            for p in 0..2 {
                let from = h * d + 2 * j + p;
                let to = h * d + p * half + j;
                dst[to * row..(to + 1) * row].copy_from_slice(&bytes[from * row..(from + 1) * row]);
            }
        }
    }
    Some(out)
}

/// Maps one file and checks its header against its length. Entries with a dtype the engine does
/// not compute with come back as `Err(dtype name)`.
#[allow(clippy::type_complexity)]
/// A tensor of a dtype the engine does not compute with: its dtype, offset and shape.
type OtherEntry = (String, usize, Vec<usize>);
/// A file's tensors by name: those the engine computes with, and the others.
type Entries = Vec<(String, Result<TensorEntry, OtherEntry>)>;

fn open_one(path: &Path) -> Result<(Mmap, Entries)> {
    let file = File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => EngineError::MissingFile {
            path: path.to_path_buf(),
            what: "a safetensors weights file",
        },
        _ => EngineError::io(path, e),
    })?;
    // SAFETY: the map is read-only. The caller guarantees that the checkpoint files are not
    // truncated or rewritten while the engine runs (as every mmap-based loader must); the
    // header is checked against the length below, so all later reads are in bounds.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| EngineError::io(path, e))?;
    let bad = |message: String| EngineError::Safetensors {
        path: path.to_path_buf(),
        message,
    };
    let len = map.len();
    if len < 8 {
        return Err(bad(format!(
            "file is {len} bytes, too short for a safetensors header (truncated?)"
        )));
    }
    let n = u64::from_le_bytes(map[..8].try_into().unwrap_or_default()) as usize;
    if n.checked_add(8).is_none_or(|end| end > len) {
        return Err(bad(format!(
            "header length field says {n} bytes but the file has only {len} (truncated or not safetensors)"
        )));
    }
    let data_start = 8 + n;
    let data_len = len - data_start;
    // The header's entries one at a time (a checkpoint with thousands of experts has a header
    // of megabytes: building it whole as JSON values took 15 MB of heap that the allocator
    // kept after it was freed), in name order as before.
    let failed = std::cell::RefCell::new(None);
    let mut raw = serde_json::Deserializer::from_slice(&map[8..data_start])
        .deserialize_map(HeaderEntries { failed: &failed })
        .map_err(|e| match failed.borrow_mut().take() {
            Some((tensor, message)) => EngineError::Tensor {
                path: path.to_path_buf(),
                tensor,
                message: format!("bad header entry: {message}"),
            },
            None => bad(format!("header is not valid JSON: {e}")),
        })?;
    raw.sort_by(|a, b| a.0.cmp(&b.0));
    raw.dedup_by(|later, earlier| later.0 == earlier.0);
    let mut needed = 0usize;
    let mut entries = Vec::with_capacity(raw.len());
    let mut spans = Vec::with_capacity(raw.len());
    for (name, info) in raw {
        let tensor_err = |message: String| EngineError::Tensor {
            path: path.to_path_buf(),
            tensor: name.clone(),
            message,
        };
        let (s, e) = info.data_offsets;
        if e < s {
            return Err(tensor_err(format!(
                "data_offsets [{s}, {e}] end before they start"
            )));
        }
        if e > data_len {
            return Err(tensor_err(format!(
                "data_offsets end at {e} but the file has {data_len} bytes of data (truncated, or a header that lies about offsets)"
            )));
        }
        needed = needed.max(e);
        let dtype = match info.dtype.as_str() {
            "F32" => Ok(DType::F32),
            "F16" => Ok(DType::F16),
            "BF16" => Ok(DType::BF16),
            "U32" => Ok(DType::U32),
            other => Err(other.to_string()),
        };
        let numel = info
            .shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| {
                tensor_err(format!(
                    "shape {:?} has more elements than can be addressed",
                    info.shape
                ))
            })?;
        // Every dtype safetensors knows has a size: check all of them here, so that a length
        // mismatch names the tensor (the safetensors crate's own check says only
        // `TensorInvalidInfo`).
        let elem_bits = match &dtype {
            Ok(d) => Some(d.size() * 8),
            Err(other) => other_dtype_bits(other),
        };
        if let Some(bits) = elem_bits
            && numel.checked_mul(bits).map(|b| b.div_ceil(8)) != Some(e - s)
        {
            return Err(tensor_err(format!(
                "shape {:?} of {} needs {} bytes but data_offsets [{s}, {e}] span {}",
                info.shape,
                info.dtype,
                numel.saturating_mul(bits).div_ceil(8),
                e - s
            )));
        }
        spans.push((s, e, entries.len()));
        entries.push((
            name,
            match dtype {
                Ok(dtype) => Ok(TensorEntry {
                    file: 0,
                    offset: data_start + s,
                    dtype,
                    shape: info.shape,
                }),
                Err(other) => Err((other, data_start + s, info.shape)),
            },
        ));
    }
    // The safetensors format's rule: contiguous, non-overlapping offsets that cover the data
    // exactly.
    spans.sort_unstable();
    let mut at = 0;
    for &(s, e, i) in &spans {
        if s != at {
            return Err(bad(format!(
                "tensor `{}`: data_offsets overlap or leave a gap",
                entries[i].0
            )));
        }
        at = e;
    }
    if at != data_len {
        return Err(bad(format!(
            "tensors cover {needed} bytes of data but the file has {data_len} (truncated, or trailing bytes)"
        )));
    }
    Ok((map, entries))
}

/// A safetensors header's tensor entries, read one at a time; the name of an entry that is
/// not one goes to `failed` with the reason.
struct HeaderEntries<'a> {
    failed: &'a std::cell::RefCell<Option<(String, String)>>,
}

impl<'de> serde::de::Visitor<'de> for HeaderEntries<'_> {
    type Value = Vec<(String, RawInfo)>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object of tensor entries")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<Self::Value, A::Error> {
        use serde::de::Error as _;
        let mut out = Vec::with_capacity(map.size_hint().unwrap_or(0));
        while let Some(name) = map.next_key::<String>()? {
            if name == "__metadata__" {
                map.next_value::<serde::de::IgnoredAny>()?;
                continue;
            }
            match map.next_value::<RawInfo>() {
                Ok(info) => out.push((name, info)),
                Err(e) => {
                    let message = e.to_string();
                    *self.failed.borrow_mut() = Some((name, message.clone()));
                    return Err(A::Error::custom(message));
                }
            }
        }
        Ok(out)
    }
}

/// Bits per element of the safetensors dtypes the engine does not compute with.
fn other_dtype_bits(name: &str) -> Option<usize> {
    match name {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" | "F8_E8M0" => Some(8),
        "I16" | "U16" => Some(16),
        "I32" => Some(32),
        "I64" | "U64" | "F64" => Some(64),
        "F4" => Some(4),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first non-finite element is found wherever it lies (block boundaries included), for
    /// every float dtype, and a finite tensor passes.
    #[test]
    fn first_non_finite_finds_the_first_bad_element() {
        let n = 5000;
        for (dtype, size, nan, inf, one) in [
            (DType::F32, 4, 0x7fc0_0000u32, 0x7f80_0000u32, 0x3f80_0000u32),
            (DType::BF16, 2, 0x7fc0, 0xff80, 0x3f80),
            (DType::F16, 2, 0x7e00, 0x7c00, 0x3c00),
        ] {
            let put = |v: &mut Vec<u8>, i: usize, bits: u32| {
                v[i * size..(i + 1) * size].copy_from_slice(&bits.to_le_bytes()[..size]);
            };
            let mut clean = vec![0u8; n * size];
            for i in 0..n {
                put(&mut clean, i, one);
            }
            assert_eq!(first_non_finite(dtype, &clean), None, "{dtype:?}");
            for at in [0, 1, 2047, 2048, 2049, 4095, 4096, n - 1] {
                for bad in [nan, inf] {
                    let mut v = clean.clone();
                    put(&mut v, at, bad);
                    if at + 7 < n {
                        put(&mut v, at + 7, nan);
                    }
                    assert_eq!(first_non_finite(dtype, &v), Some(at), "{dtype:?} at {at}");
                }
            }
        }
        assert_eq!(first_non_finite(DType::U32, &[0xff; 16]), None);
    }
}
