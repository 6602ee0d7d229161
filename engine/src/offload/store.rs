//! The disk tier: reads one expert by (layer, expert) into a slot, from an expert pack (one
//! aligned extent per expert) or straight from the checkpoint's safetensors (up to three
//! extents per expert, merged where they touch; gpt_oss's stored tensors rearranged in the
//! slot once read).
//!
//! Read modes: `mmap` (the expert is a view of the memory-mapped file; a load touches its
//! pages, an eviction drops them from this process), `pread` (through the page cache) and
//! `direct` (O_DIRECT on Linux, F_NOCACHE on macOS; the honest one for SSD cost). Where the
//! filesystem refuses O_DIRECT (tmpfs), the store says so once and reads with `pread`; the mode
//! actually used is what [`ExpertStore::mode`] reports.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use memmap2::Mmap;

pub use super::layout::{ExpertLayout, Extent, Part};
use super::layout::{SlotPiece, layout_from_refs, layout_rearranged};
use super::{ALIGN, ExpertKey, PageBuf, align_down, align_up};
use crate::config::{ClampedSwiglu, ModelConfig};
use crate::error::{EngineError, Result};
use crate::moe::{ExpertBiases, ExpertWeights, expert_tensor_refs};
use crate::weights::{Backing, Weight, WeightIndex, matrix_from_pieces};

/// How expert bytes are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IoMode {
    Mmap,
    Pread,
    Direct,
}

impl IoMode {
    pub const NAMES: [&'static str; 3] = ["mmap", "pread", "direct"];

    pub fn name(self) -> &'static str {
        match self {
            IoMode::Mmap => "mmap",
            IoMode::Pread => "pread",
            IoMode::Direct => "direct",
        }
    }
}

impl std::str::FromStr for IoMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "mmap" => Ok(IoMode::Mmap),
            "pread" => Ok(IoMode::Pread),
            "direct" => Ok(IoMode::Direct),
            _ => Err(format!(
                "unknown I/O mode `{s}` (expected one of {})",
                Self::NAMES.join(", ")
            )),
        }
    }
}

/// Deliberate faults, for tests of the failure paths: the `fail_read`-th read (1-based,
/// counting every expert read) fails with EIO; the `short_read`-th returns half its bytes;
/// every read first sleeps `delay_ms` (a slow device).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultPlan {
    pub fail_read: Option<u64>,
    pub short_read: Option<u64>,
    pub delay_ms: u64,
}

#[derive(Debug)]
struct StoreFile {
    path: PathBuf,
    file: File,
    direct: Option<File>,
    map: Arc<Mmap>,
}

/// Reads experts from disk.
#[derive(Debug)]
pub struct ExpertStore {
    files: Vec<StoreFile>,
    layouts: HashMap<ExpertKey, ExpertLayout>,
    slot_bytes: usize,
    expert_bytes: u64,
    mode: IoMode,
    verify: bool,
    source: String,
    /// gpt_oss: its experts' activation (their biases are in the slots).
    swiglu: Option<ClampedSwiglu>,
    /// Fault injection: the n-th read (1-based) fails / comes back short; 0 = never.
    fail_read: AtomicU64,
    short_read: AtomicU64,
    delay_ms: AtomicU64,
    reads: AtomicU64,
    /// While set, every read waits (before touching the disk) until it is cleared: tests use it
    /// to queue work behind a busy worker without depending on timing.
    held: AtomicBool,
    hold: Mutex<bool>,
    released: Condvar,
    /// Experts whose values were checked to be finite (once each, on their first load).
    checked: Mutex<std::collections::HashSet<ExpertKey>>,
}

fn open_file(path: &Path, mode: IoMode) -> Result<(StoreFile, bool)> {
    let file = File::open(path).map_err(|e| EngineError::io(path, e))?;
    // SAFETY: read-only map; the caller guarantees the files are not truncated or rewritten
    // while the engine runs. Reads through it are bounds-checked against the layouts, which were
    // checked against the file length when the store opened.
    let map = Arc::new(unsafe { Mmap::map(&file) }.map_err(|e| EngineError::io(path, e))?);
    let mut direct_refused = false;
    let direct = if mode == IoMode::Direct {
        match open_direct(path) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::debug!("{}: O_DIRECT refused: {e}", path.display());
                direct_refused = true;
                None
            }
        }
    } else {
        None
    };
    Ok((
        StoreFile {
            path: path.to_path_buf(),
            file,
            direct,
            map,
        },
        direct_refused,
    ))
}

/// Opens `path` for uncached reads and checks that one aligned read works.
fn open_direct(path: &Path) -> std::io::Result<File> {
    #[cfg(target_os = "linux")]
    let f = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)?
    };
    #[cfg(not(target_os = "linux"))]
    let f = {
        let f = File::open(path)?;
        #[cfg(target_os = "macos")]
        {
            use std::os::unix::io::AsRawFd;
            // SAFETY: fcntl on a valid descriptor we own.
            if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_NOCACHE, 1) } == -1 {
                return Err(std::io::Error::last_os_error());
            }
        }
        f
    };
    let mut probe = PageBuf::zeroed(ALIGN);
    f.read_at(probe.as_mut_slice(), 0)?;
    Ok(f)
}

/// One matrix of an expert as a weight over the bytes `at(slot_offset)` names (its slot, or
/// the mapped file): quantised matrices stay quantised.
fn part_weight(p: &Part, at: &dyn Fn(usize) -> (Backing, usize)) -> Weight {
    let piece = |q: &SlotPiece| (q.slot_offset, q.dtype, q.shape);
    matrix_from_pieces(
        p.shape,
        p.dtype,
        p.slot_offset,
        p.quant.map(|q| (q.spec, piece(&q.scales), piece(&q.biases))),
        |off, dtype, shape| {
            let (backing, start) = at(off);
            Weight::new(backing, start, dtype, shape)
        },
    )
}

impl ExpertStore {
    /// A store over the checkpoint's own safetensors files.
    pub fn from_checkpoint(cfg: &ModelConfig, w: &WeightIndex, mode: IoMode) -> Result<Self> {
        let mut layouts = HashMap::new();
        let mut used_files: Vec<usize> = Vec::new();
        for l in cfg.moe_layers() {
            for e in 0..cfg.num_experts {
                let biases = crate::moe::stacked_expert_biases(cfg, w, l, e)?;
                if cfg.clamped_swiglu.is_some() && biases.is_none() {
                    let raw = crate::gpt_oss::raw_expert(cfg, w, l, e)?;
                    for p in &raw.pieces {
                        if !used_files.contains(&p.file) {
                            used_files.push(p.file);
                        }
                    }
                    layouts.insert(ExpertKey::new(l, e as u32), layout_rearranged(raw));
                    continue;
                }
                let refs = expert_tensor_refs(cfg, w, l, e)?;
                for r in &refs {
                    let quant_files = r.quant.iter().flat_map(|q| [q.scales.file, q.biases.file]);
                    for f in std::iter::once(r.file).chain(quant_files) {
                        if !used_files.contains(&f) {
                            used_files.push(f);
                        }
                    }
                }
                for b in biases.iter().flatten() {
                    if !used_files.contains(&b.file) {
                        used_files.push(b.file);
                    }
                }
                layouts.insert(
                    ExpertKey::new(l, e as u32),
                    layout_from_refs(&refs, biases.as_ref()),
                );
            }
        }
        // Store file i = weight-index file used_files[i].
        let remap: HashMap<usize, usize> = used_files.iter().enumerate().map(|(i, &f)| (f, i)).collect();
        for layout in layouts.values_mut() {
            for x in &mut layout.extents {
                x.file = remap[&x.file];
            }
        }
        let paths: Vec<PathBuf> = used_files.iter().map(|&f| w.file_path(f).to_path_buf()).collect();
        let source = if w.is_gguf() { "gguf" } else { "safetensors" };
        Self::open(paths, layouts, mode, source.into(), cfg.clamped_swiglu)
    }

    /// A store over files and layouts made elsewhere (the expert pack).
    pub(crate) fn open(
        paths: Vec<PathBuf>,
        layouts: HashMap<ExpertKey, ExpertLayout>,
        mode: IoMode,
        source: String,
        swiglu: Option<ClampedSwiglu>,
    ) -> Result<Self> {
        // The mean over experts: every expert's bytes where all are alike; GGUF files may
        // quantise some layers' experts differently (Q4_K_M's Q6_K down projections).
        let total: u64 = layouts.values().map(ExpertLayout::bytes).sum();
        let expert_bytes = total.div_ceil(layouts.len().max(1) as u64);
        let mut files = Vec::new();
        let mut refused = false;
        for p in &paths {
            let (f, r) = open_file(p, mode)?;
            refused |= r;
            files.push(f);
        }
        // Every extent must lie inside its file: a truncated file is refused now, not mid-run.
        for (key, layout) in &layouts {
            for x in &layout.extents {
                let f = &files[x.file];
                if x.offset + x.len > f.map.len() as u64 {
                    return Err(EngineError::Safetensors {
                        path: f.path.clone(),
                        message: format!(
                            "{key} needs bytes {}..{} but the file has {} (truncated?)",
                            x.offset,
                            x.offset + x.len,
                            f.map.len()
                        ),
                    });
                }
            }
        }
        let mode = if refused {
            tracing::warn!(
                "O_DIRECT is not supported on the filesystem of {}: reading with pread (page cache) instead",
                paths.first().map_or(String::new(), |p| p.display().to_string())
            );
            IoMode::Pread
        } else {
            mode
        };
        let slot_bytes = layouts
            .values()
            .map(|l| {
                l.extents
                    .iter()
                    .map(|x| x.slot_offset as u64 + x.len)
                    .max()
                    .unwrap_or(0)
            })
            .max()
            .map_or(ALIGN, |n| align_up(n) as usize);
        Ok(Self {
            files,
            layouts,
            slot_bytes,
            expert_bytes,
            mode,
            verify: false,
            source,
            swiglu,
            fail_read: AtomicU64::new(0),
            short_read: AtomicU64::new(0),
            delay_ms: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            held: AtomicBool::new(false),
            hold: Mutex::new(false),
            released: Condvar::new(),
            checked: Mutex::new(std::collections::HashSet::new()),
        })
    }

    /// Checks every load against the pack's checksum.
    pub fn set_verify(&mut self, verify: bool) -> Result<()> {
        if verify && self.layouts.values().any(|l| l.checksum.is_none()) {
            return Err(EngineError::invalid(
                "--verify",
                "checksums exist only in an expert pack (make one with `shadowmoe expert-pack`, then pass --pack)",
            ));
        }
        self.verify = verify;
        Ok(())
    }

    /// Injects faults (tests of failure paths), counting reads from now on.
    pub fn inject_faults(&self, faults: FaultPlan) {
        self.fail_read
            .store(faults.fail_read.unwrap_or(0), Ordering::SeqCst);
        self.short_read
            .store(faults.short_read.unwrap_or(0), Ordering::SeqCst);
        self.delay_ms.store(faults.delay_ms, Ordering::SeqCst);
        self.reads.store(0, Ordering::SeqCst);
    }

    /// Holds every read at its start until called again with `false` (tests of queueing order:
    /// the reads already started and the jobs queued behind them stay put until released).
    pub fn hold_reads(&self, on: bool) {
        let mut held = self.hold.lock().unwrap_or_else(|e| e.into_inner());
        *held = on;
        self.held.store(on, Ordering::SeqCst);
        if !on {
            self.released.notify_all();
        }
    }

    fn wait_if_held(&self) {
        if !self.held.load(Ordering::SeqCst) {
            return;
        }
        let mut held = self.hold.lock().unwrap_or_else(|e| e.into_inner());
        while *held {
            held = self.released.wait(held).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Reads started since the store opened (or faults were last injected).
    pub fn reads_started(&self) -> u64 {
        self.reads.load(Ordering::SeqCst)
    }

    /// The read mode actually used.
    pub fn mode(&self) -> IoMode {
        self.mode
    }

    /// "safetensors", "gguf" or "pack".
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Bytes of one expert's three matrices (the mean over experts, where layers differ).
    pub fn expert_bytes(&self) -> u64 {
        self.expert_bytes
    }

    /// Bytes of one slot (the expert's extents, page-aligned).
    /// Experts the store holds, over all layers.
    pub fn experts(&self) -> usize {
        self.layouts.len()
    }

    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    /// The file `key`'s first bytes are read from.
    pub fn file_of(&self, key: ExpertKey) -> Option<&Path> {
        let x = self.layouts.get(&key)?.extents.first()?;
        self.files.get(x.file).map(|f| f.path.as_path())
    }

    fn layout(&self, key: ExpertKey) -> Result<&ExpertLayout> {
        self.layouts
            .get(&key)
            .ok_or_else(|| EngineError::invalid("expert", format!("{key} is not in the store")))
    }

    /// Reads `key` into `buf` (a slot of [`Self::slot_bytes`]); returns the bytes read.
    pub fn read_into(&self, key: ExpertKey, buf: &mut PageBuf) -> Result<u64> {
        let layout = self.layout(key)?;
        let n = self.reads.fetch_add(1, Ordering::Relaxed) + 1;
        self.wait_if_held();
        let delay = self.delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            std::thread::sleep(std::time::Duration::from_millis(delay));
        }
        let mut total = 0;
        for x in &layout.extents {
            let f = &self.files[x.file];
            let io_err = |e: std::io::Error| EngineError::Invalid {
                what: format!("{}", f.path.display()),
                message: format!("reading {key} (bytes {}..{}): {e}", x.offset, x.offset + x.len),
            };
            if self.fail_read.load(Ordering::Relaxed) == n {
                return Err(io_err(std::io::Error::from_raw_os_error(libc::EIO)));
            }
            let short = self.short_read.load(Ordering::Relaxed) == n;
            let got = match &f.direct {
                Some(direct) if self.mode == IoMode::Direct => {
                    // Aligned superset of the extent: its first byte lands at x.slot_offset.
                    let a_off = align_down(x.offset);
                    let a_end = align_up(x.offset + x.len);
                    let start = x.slot_offset - (x.offset - a_off) as usize;
                    let dst = &mut buf.as_mut_slice()[start..start + (a_end - a_off) as usize];
                    let want = (x.offset + x.len - a_off) as usize;
                    let got = read_fully(direct, dst, a_off, if short { want / 2 } else { want })
                        .map_err(io_err)?;
                    got.saturating_sub((x.offset - a_off) as usize)
                }
                _ => {
                    let dst = &mut buf.as_mut_slice()[x.slot_offset..x.slot_offset + x.len as usize];
                    let want = if short { dst.len() / 2 } else { dst.len() };
                    read_fully(&f.file, dst, x.offset, want).map_err(io_err)?
                }
            };
            if (got as u64) < x.len {
                return Err(io_err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "short read: {got} of {} bytes (file truncated or device error)",
                        x.len
                    ),
                )));
            }
            total += x.len;
        }
        if self.verify {
            self.check(key, layout, buf.as_ref())?;
        }
        let slot = buf.as_ref();
        self.check_finite_once(key, layout, |off, len| &slot[off..off + len])?;
        layout.rearrange_in(buf.as_mut_slice());
        Ok(total)
    }

    /// On an expert's first load: refuses NaN or infinity in its float values (matrices, or a
    /// quantised one's scales and biases), naming the expert, the matrix and the file. `at`
    /// gives the bytes at a slot offset. Later loads of the same expert are not scanned again.
    fn check_finite_once<'a>(
        &self,
        key: ExpertKey,
        layout: &ExpertLayout,
        at: impl Fn(usize, usize) -> &'a [u8],
    ) -> Result<()> {
        if self
            .checked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&key)
        {
            return Ok(());
        }
        let file = &self.files[layout.extents[0].file].path;
        // An expert read as stored: its float tensors as they are, before rearranging.
        if let Some(r) = &layout.rearrange {
            for (name, k, dtype) in r.raw.float_pieces() {
                let len = r.raw.pieces[k].len as usize;
                crate::weights::check_finite(file, &format!("{key} {name}"), dtype, at(r.at[k], len))?;
            }
            self.checked.lock().unwrap_or_else(|e| e.into_inner()).insert(key);
            return Ok(());
        }
        if let Some(biases) = &layout.biases {
            for (name, b) in ["gate_proj_bias", "up_proj_bias", "down_proj_bias"]
                .iter()
                .zip(biases)
            {
                let len = b.dtype.nbytes(&b.shape);
                crate::weights::check_finite(
                    file,
                    &format!("{key} {name}"),
                    b.dtype,
                    at(b.slot_offset, len),
                )?;
            }
        }
        for (name, p) in ["gate_proj", "up_proj", "down_proj"].iter().zip(&layout.parts) {
            let tensor = format!("{key} {name}");
            let piece = |q: &SlotPiece, what: &str| {
                let len = q.dtype.nbytes(&q.shape);
                crate::weights::check_finite(
                    file,
                    &format!("{tensor}{what}"),
                    q.dtype,
                    at(q.slot_offset, len),
                )
            };
            match &p.quant {
                None => piece(
                    &SlotPiece {
                        dtype: p.dtype,
                        shape: p.shape,
                        slot_offset: p.slot_offset,
                    },
                    "",
                )?,
                Some(q) => {
                    piece(&q.scales, ".scales")?;
                    piece(&q.biases, ".biases")?;
                }
            }
        }
        self.checked.lock().unwrap_or_else(|e| e.into_inner()).insert(key);
        Ok(())
    }

    fn check(&self, key: ExpertKey, layout: &ExpertLayout, slot: &[u8]) -> Result<()> {
        let Some(want) = layout.checksum else {
            return Ok(());
        };
        let start = layout.parts[0].slot_offset;
        let got = xxhash_rust::xxh3::xxh3_64(&slot[start..start + layout.bytes() as usize]);
        if got != want {
            return Err(EngineError::invalid(
                format!("{} ({key})", self.files[0].path.display()),
                format!(
                    "checksum mismatch: expected {want:016x}, read {got:016x} (the pack was modified or the device returned bad data)"
                ),
            ));
        }
        Ok(())
    }

    /// The expert's weights as views into a loaded slot.
    pub fn view(&self, key: ExpertKey, slot: &Arc<PageBuf>) -> Result<ExpertWeights> {
        let layout = self.layout(key)?;
        let backing: Backing = slot.clone();
        let at = |off| (backing.clone(), off);
        let w = |p: &Part| part_weight(p, &at);
        Ok(ExpertWeights {
            gate: w(&layout.parts[0]),
            up: w(&layout.parts[1]),
            down: w(&layout.parts[2]),
            biases: self.biases(layout, &at)?,
        })
    }

    /// gpt_oss: the expert's biases as views of `at(slot_offset)`, with its activation.
    fn biases(
        &self,
        layout: &ExpertLayout,
        at: &dyn Fn(usize) -> (Backing, usize),
    ) -> Result<Option<Box<ExpertBiases>>> {
        let Some(b) = &layout.biases else {
            return Ok(None);
        };
        let swiglu = self.swiglu.ok_or_else(|| {
            EngineError::invalid(self.source.clone(), "experts with biases but no clamped SwiGLU")
        })?;
        let w = |p: &SlotPiece| {
            let (backing, start) = at(p.slot_offset);
            Weight::new(backing, start, p.dtype, p.shape.to_vec())
        };
        Ok(Some(Box::new(ExpertBiases {
            gate: w(&b[0]),
            up: w(&b[1]),
            down: w(&b[2]),
            swiglu,
        })))
    }

    /// mmap mode: the expert's weights as views into the memory-mapped file.
    pub fn view_mapped(&self, key: ExpertKey) -> Result<ExpertWeights> {
        let layout = self.layout(key)?;
        // Stored otherwise than computed (gpt_oss from its checkpoint): rearranged into the
        // expert's own memory.
        if let Some(r) = &layout.rearrange {
            let swiglu = self.swiglu.ok_or_else(|| {
                EngineError::invalid(self.source.clone(), "gpt_oss experts without their SwiGLU")
            })?;
            let bytes: Vec<&[u8]> = r
                .raw
                .pieces
                .iter()
                .zip(&r.at)
                .map(|(p, &at)| {
                    let x = layout
                        .extents
                        .iter()
                        .find(|x| at >= x.slot_offset && at < x.slot_offset + x.len as usize)
                        .expect("every piece lies in an extent");
                    let start = x.offset as usize + (at - x.slot_offset);
                    &self.files[x.file].map[start..start + p.len as usize]
                })
                .collect();
            return Ok(r.raw.rearrange(&bytes).into_weights(&r.raw, swiglu));
        }
        // Every piece lies inside one extent: map its slot offset back to the file.
        let in_file = |slot_offset: usize| -> (Backing, usize) {
            let x = layout
                .extents
                .iter()
                .find(|x| slot_offset >= x.slot_offset && slot_offset < x.slot_offset + x.len as usize)
                .expect("every piece lies in an extent");
            let map: Backing = self.files[x.file].map.clone();
            (map, x.offset as usize + (slot_offset - x.slot_offset))
        };
        let w = |p: &Part| part_weight(p, &in_file);
        Ok(ExpertWeights {
            gate: w(&layout.parts[0]),
            up: w(&layout.parts[1]),
            down: w(&layout.parts[2]),
            biases: self.biases(layout, &in_file)?,
        })
    }

    /// mmap mode: brings the expert's pages in (so the forward pass does not fault on them);
    /// returns the bytes touched.
    pub fn touch_mapped(&self, key: ExpertKey) -> Result<u64> {
        let layout = self.layout(key)?;
        let mut sum = 0u8;
        for x in &layout.extents {
            let map = &self.files[x.file].map;
            let _ = map.advise_range(memmap2::Advice::WillNeed, x.offset as usize, x.len as usize);
            let bytes = &map[x.offset as usize..(x.offset + x.len) as usize];
            for page in bytes.chunks(ALIGN) {
                sum = sum.wrapping_add(page[0]);
            }
        }
        std::hint::black_box(sum);
        self.check_finite_once(key, layout, |off, len| {
            let x = layout
                .extents
                .iter()
                .find(|x| off >= x.slot_offset && off < x.slot_offset + x.len as usize)
                .expect("every piece lies in an extent");
            let start = x.offset as usize + (off - x.slot_offset);
            &self.files[x.file].map[start..start + len]
        })?;
        if self.verify {
            let x = &layout.extents[0];
            let start = (x.offset + (layout.parts[0].slot_offset - x.slot_offset) as u64) as usize;
            let bytes = &self.files[x.file].map[start..start + layout.bytes() as usize];
            if let Some(want) = layout.checksum
                && xxhash_rust::xxh3::xxh3_64(bytes) != want
            {
                return Err(EngineError::invalid(
                    format!("{key}"),
                    "checksum mismatch in the memory-mapped pack",
                ));
            }
        }
        Ok(layout.extents.iter().map(|x| x.len).sum())
    }

    /// mmap mode: drops the expert's whole pages from this process's resident set.
    pub fn release_mapped(&self, key: ExpertKey) {
        let Ok(layout) = self.layout(key) else { return };
        for x in &layout.extents {
            let start = align_up(x.offset);
            let end = align_down(x.offset + x.len);
            if end > start {
                // SAFETY: DONTNEED on a read-only shared file mapping only drops cached pages of
                // this process; later reads fault them back in from the file unchanged.
                let _ = unsafe {
                    self.files[x.file].map.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        start as usize,
                        (end - start) as usize,
                    )
                };
            }
        }
    }
}

/// Reads until `want` bytes are in `dst` (or EOF); returns the bytes read.
fn read_fully(f: &File, dst: &mut [u8], offset: u64, want: usize) -> std::io::Result<usize> {
    let mut got = 0;
    while got < want {
        match f.read_at(&mut dst[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got.min(want))
}
