//! GGUF files (llama.cpp's format), read as llama.cpp reads them: the header (versions 2 and
//! 3), typed metadata (every value type, arrays of any type, strings), tensor infos, and the
//! data section at `general.alignment` — every length, count and offset checked against the
//! file before it is used, so a damaged or hostile file gets a one-line error naming it and
//! what is wrong ("tensor data is not within the file bounds", as llama.cpp's loader says),
//! never a panic or an allocation the file's bytes ask for. The file is memory-mapped.
//!
//! This is the container; [`arch`] reads a checkpoint out of it.

pub mod arch;
pub mod names;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use crate::error::{EngineError, Result};

/// `GGUF` as a little-endian u32.
const MAGIC: u32 = 0x4655_4747;
/// llama.cpp's `GGML_MAX_DIMS`.
const MAX_DIMS: u32 = 4;
/// `general.alignment` when the file does not set it.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// The items' type name (as [`Value::type_name`] spells it) and the items.
    Array(&'static str, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// gguf-py's name of the value type (`UINT32`, `STRING`, `ARRAY`, …).
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "UINT8",
            Value::I8(_) => "INT8",
            Value::U16(_) => "UINT16",
            Value::I16(_) => "INT16",
            Value::U32(_) => "UINT32",
            Value::I32(_) => "INT32",
            Value::F32(_) => "FLOAT32",
            Value::Bool(_) => "BOOL",
            Value::String(_) => "STRING",
            Value::Array(..) => "ARRAY",
            Value::U64(_) => "UINT64",
            Value::I64(_) => "INT64",
            Value::F64(_) => "FLOAT64",
        }
    }

    /// An unsigned integer value of any width (None for other types and negative values).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
}

/// A ggml tensor type: its name, elements per block and bytes per block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgmlType {
    pub id: u32,
    pub name: &'static str,
    pub block: u64,
    pub block_bytes: u64,
}

/// The ggml types llama.cpp writes (`ggml.h`'s ids; block shapes from `ggml.c`'s type traits).
pub fn ggml_type(id: u32) -> Option<GgmlType> {
    let (name, block, block_bytes) = match id {
        0 => ("F32", 1, 4),
        1 => ("F16", 1, 2),
        2 => ("Q4_0", 32, 18),
        3 => ("Q4_1", 32, 20),
        6 => ("Q5_0", 32, 22),
        7 => ("Q5_1", 32, 24),
        8 => ("Q8_0", 32, 34),
        9 => ("Q8_1", 32, 36),
        10 => ("Q2_K", 256, 84),
        11 => ("Q3_K", 256, 110),
        12 => ("Q4_K", 256, 144),
        13 => ("Q5_K", 256, 176),
        14 => ("Q6_K", 256, 210),
        15 => ("Q8_K", 256, 292),
        16 => ("IQ2_XXS", 256, 66),
        17 => ("IQ2_XS", 256, 74),
        18 => ("IQ3_XXS", 256, 98),
        19 => ("IQ1_S", 256, 50),
        20 => ("IQ4_NL", 32, 18),
        21 => ("IQ3_S", 256, 110),
        22 => ("IQ2_S", 256, 82),
        23 => ("IQ4_XS", 256, 136),
        24 => ("I8", 1, 1),
        25 => ("I16", 1, 2),
        26 => ("I32", 1, 4),
        27 => ("I64", 1, 8),
        28 => ("F64", 1, 8),
        29 => ("IQ1_M", 256, 56),
        30 => ("BF16", 1, 2),
        34 => ("TQ1_0", 256, 54),
        35 => ("TQ2_0", 256, 66),
        39 => ("MXFP4", 32, 17),
        _ => return None,
    };
    Some(GgmlType {
        id,
        name,
        block,
        block_bytes,
    })
}

/// One tensor's entry.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml's `ne`: the innermost dimension (a row's length) first.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Absolute offset of its data in the file.
    pub offset: u64,
    pub n_bytes: u64,
}

/// An opened GGUF file.
#[derive(Debug)]
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    /// In file order.
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Where the data section starts.
    pub data_offset: u64,
    map: Arc<Mmap>,
}

/// A bounds-checked cursor over the file's bytes.
struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
    path: &'a Path,
}

/// `s` with control characters escaped and cut to 120 characters: names and keys from a damaged
/// file go into one-line error messages.
fn clean(s: &str) -> String {
    let mut out: String = s
        .chars()
        .flat_map(|c| {
            let esc: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            esc
        })
        .take(120)
        .collect();
    if out.len() < s.len() && out.chars().count() == 120 {
        out.push('…');
    }
    out
}

impl<'a> Cursor<'a> {
    fn err(&self, what: impl std::fmt::Display) -> EngineError {
        EngineError::invalid(
            self.path.display().to_string(),
            format!("{} (at byte {})", clean(&what.to_string()), self.at),
        )
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        let left = (self.b.len() - self.at) as u64;
        if n > left {
            return Err(self.err(format!(
                "{what}: needs {n} bytes but only {left} are left in the file (truncated or not GGUF)"
            )));
        }
        let s = &self.b[self.at..self.at + n as usize];
        self.at += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)?;
        let s = self.take(n, what)?;
        String::from_utf8(s.to_vec()).map_err(|_| self.err(format!("{what}: not UTF-8")))
    }

    /// A count of items of at least `min_bytes` each: refused when the rest of the file could
    /// not hold them (so no allocation is sized by a damaged count).
    fn count(&mut self, what: &str, min_bytes: u64) -> Result<u64> {
        let n = self.u64(what)?;
        let left = (self.b.len() - self.at) as u64;
        if n.saturating_mul(min_bytes.max(1)) > left {
            return Err(self.err(format!(
                "{what}: {n} items cannot fit in the {left} bytes left in the file"
            )));
        }
        Ok(n)
    }

    fn value(&mut self, ty: u32, what: &str, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>(what)?[0]),
            1 => Value::I8(self.array::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.err(format!("{what}: a bool must be 0 or 1, found {b}"))),
            },
            8 => Value::String(self.string(what)?),
            9 => {
                if depth > 0 {
                    return Err(self.err(format!("{what}: arrays of arrays are not GGUF")));
                }
                let item = self.u32(what)?;
                let min = match item {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    _ => 1,
                };
                let n = self.count(what, min)?;
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(item, what, depth + 1)?);
                }
                Value::Array(type_name_of(item), items)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            t => return Err(self.err(format!("{what}: unknown value type {t} (expected 0..=12)"))),
        })
    }
}

fn type_name_of(ty: u32) -> &'static str {
    match ty {
        0 => "UINT8",
        1 => "INT8",
        2 => "UINT16",
        3 => "INT16",
        4 => "UINT32",
        5 => "INT32",
        6 => "FLOAT32",
        7 => "BOOL",
        8 => "STRING",
        10 => "UINT64",
        11 => "INT64",
        12 => "FLOAT64",
        _ => "ARRAY",
    }
}

impl GgufFile {
    /// Opens and checks `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| EngineError::io(path, e))?;
        // SAFETY: the map is read-only; a file truncated while mapped would fault, as for every
        // memory-mapped reader (llama.cpp's included).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| EngineError::io(path, e))?;
        let mut c = Cursor {
            b: &map[..],
            at: 0,
            path,
        };
        let magic = c.u32("magic")?;
        if magic != MAGIC {
            return Err(c.err(format!(
                "not a GGUF file (magic {magic:#010x}, expected \"GGUF\")"
            )));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(c.err(format!("GGUF version {version} (expected 2 or 3)")));
        }
        // A tensor info is at least 8 (name length) + 4 (dims) + 4 (type) + 8 (offset) bytes;
        // a key-value at least 8 + 4 + 1.
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.count("metadata count", 13)?;
        let mut metadata = Vec::with_capacity(n_kv as usize);
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key {i}"))?;
            let ty = c.u32(&format!("metadata `{key}` type"))?;
            let v = c.value(ty, &format!("metadata `{key}`"), 0)?;
            metadata.push((key, v));
        }
        let left = (c.b.len() - c.at) as u64;
        if n_tensors.saturating_mul(24) > left {
            return Err(c.err(format!(
                "tensor count: {n_tensors} tensors cannot fit in the {left} bytes left in the file"
            )));
        }
        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some((_, v)) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => {
                    return Err(c.err(format!(
                        "metadata `general.alignment`: expected a power of two, found {v:?}"
                    )));
                }
            },
        };
        let mut raw = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = c.string(&format!("tensor {i} name"))?;
            let n_dims = c.u32(&format!("tensor `{name}` dimensions"))?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(c.err(format!(
                    "tensor `{name}`: {n_dims} dimensions (expected 1..={MAX_DIMS})"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64(&format!("tensor `{name}` dimensions"))?);
            }
            let ty_id = c.u32(&format!("tensor `{name}` type"))?;
            let ty = ggml_type(ty_id)
                .ok_or_else(|| c.err(format!("tensor `{name}`: unknown ggml type {ty_id}")))?;
            let offset = c.u64(&format!("tensor `{name}` offset"))?;
            raw.push((name, dims, ty, offset));
        }
        let data_offset = (c.at as u64).div_ceil(alignment) * alignment;
        let len = map.len() as u64;
        let mut tensors = Vec::with_capacity(raw.len());
        let mut names = std::collections::HashSet::new();
        for (name, dims, ty, rel) in raw {
            let bad = |m: String| EngineError::Tensor {
                path: path.to_path_buf(),
                tensor: clean(&name),
                message: m,
            };
            if !names.insert(name.clone()) {
                return Err(bad("a second tensor of this name".into()));
            }
            let elements = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(|| bad(format!("dims {dims:?}: more elements than can be addressed")))?;
            if dims[0] % ty.block != 0 {
                return Err(bad(format!(
                    "a row of {} elements is not a whole number of {} blocks ({} elements each)",
                    dims[0], ty.name, ty.block
                )));
            }
            let n_bytes = (elements / ty.block)
                .checked_mul(ty.block_bytes)
                .ok_or_else(|| bad(format!("dims {dims:?}: byte length overflows")))?;
            if rel % alignment != 0 {
                return Err(bad(format!(
                    "data offset {rel} is not a multiple of the alignment {alignment}"
                )));
            }
            let offset = data_offset
                .checked_add(rel)
                .filter(|o| o.checked_add(n_bytes).is_some_and(|end| end <= len))
                .ok_or_else(|| {
                    bad(format!(
                        "tensor data is not within the file bounds ({n_bytes} bytes at data offset {rel}; the file has {len} bytes, data from {data_offset})"
                    ))
                })?;
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
                n_bytes,
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
            map: Arc::new(map),
        })
    }

    /// The value of metadata `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// A tensor's bytes, as stored (empty for an info that is not this file's).
    pub fn data(&self, t: &TensorInfo) -> &[u8] {
        let end = t.offset.saturating_add(t.n_bytes);
        self.map.get(t.offset as usize..end as usize).unwrap_or_default()
    }

    /// The file's memory map.
    pub fn map(&self) -> &Arc<Mmap> {
        &self.map
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(Value::as_str)
    }
}
