//! Experts off the heap: the disk tier ([`ExpertStore`], read from an [`pack`] or straight from
//! the checkpoint's safetensors), the bounded cache as a pure state machine ([`CacheCore`] with
//! its [`policy`]), the I/O thread pool ([`IoPool`]), and the [`CachedExperts`] provider that
//! puts them behind the engine's `ExpertProvider` seam.

pub mod bytes;
pub mod cache;
pub mod driver;
pub mod layout;
pub mod metrics;
pub mod pack;
pub mod policy;
pub mod pool;
pub mod profile;
pub mod provider;
pub mod setup;
pub mod store;

pub use bytes::ByteModel;
pub use cache::{Admit, Budget, CacheCore, CacheStats, Lookup};
pub use metrics::RunMetrics;
pub use policy::{NextUse, PolicyKind};
pub use pool::IoPool;
pub use profile::Profile;
pub use provider::{CacheOptions, CachedExperts, MissMode};
pub use setup::{Capacity, OffloadConfig, Offloaded, PinSpec};
pub use store::{ExpertStore, IoMode};

/// A fast hasher for maps keyed by [`ExpertKey`] (FxHash's mix: the keys are small integers
/// that no adversary chooses; SipHash made the cache's bookkeeping the simulator's main cost).
#[derive(Debug, Default, Clone, Copy)]
pub struct KeyHasher(u64);

impl KeyHasher {
    #[inline]
    fn add(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl std::hash::Hasher for KeyHasher {
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.add(u64::from(b));
        }
    }
    #[inline]
    fn write_u32(&mut self, x: u32) {
        self.add(u64::from(x));
    }
    #[inline]
    fn write_u64(&mut self, x: u64) {
        self.add(x);
    }
    #[inline]
    fn write_usize(&mut self, x: usize) {
        self.add(x as u64);
    }
}

/// A map keyed by expert, with [`KeyHasher`].
pub type KeyMap<V> = std::collections::HashMap<ExpertKey, V, std::hash::BuildHasherDefault<KeyHasher>>;
/// A set of experts, with [`KeyHasher`].
pub type KeySet = std::collections::HashSet<ExpertKey, std::hash::BuildHasherDefault<KeyHasher>>;

/// One expert of one MoE layer (`layer` is the model layer index, as in traces).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct ExpertKey {
    pub layer: u32,
    pub expert: u32,
}

impl ExpertKey {
    pub fn new(layer: usize, expert: u32) -> Self {
        Self {
            layer: layer as u32,
            expert,
        }
    }
}

impl std::fmt::Display for ExpertKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "layer {} expert {}", self.layer, self.expert)
    }
}

/// Alignment of slot buffers and pack extents: what O_DIRECT needs on every common device.
pub const ALIGN: usize = 4096;

/// Rounds `n` up to a multiple of [`ALIGN`].
pub fn align_up(n: u64) -> u64 {
    n.div_ceil(ALIGN as u64) * ALIGN as u64
}

/// Rounds `n` down to a multiple of [`ALIGN`].
pub fn align_down(n: u64) -> u64 {
    n / ALIGN as u64 * ALIGN as u64
}

/// A page-aligned, zero-initialised byte buffer: one cache slot. It is an anonymous memory
/// map: the kernel supplies zero pages on first touch, so making one costs nothing up front and
/// the first-touch cost falls on the I/O thread that fills it, not on the forward pass.
pub struct PageBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: PageBuf owns its mapping exclusively, like a Box<[u8]>.
unsafe impl Send for PageBuf {}
// SAFETY: shared access only reads.
unsafe impl Sync for PageBuf {}

impl std::fmt::Debug for PageBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PageBuf({} bytes)", self.len)
    }
}

impl PageBuf {
    fn map_len(len: usize) -> usize {
        len.max(1).div_ceil(ALIGN) * ALIGN
    }

    /// `len` zero bytes, aligned to [`ALIGN`].
    pub fn zeroed(len: usize) -> Self {
        Self::map(len, 0)
    }

    /// [`PageBuf::zeroed`] with its pages faulted in at once (Linux: `MAP_POPULATE`).
    pub fn populated(len: usize) -> Self {
        #[cfg(target_os = "linux")]
        let flags = libc::MAP_POPULATE;
        #[cfg(not(target_os = "linux"))]
        let flags = 0;
        Self::map(len, flags)
    }

    fn map(len: usize, extra_flags: libc::c_int) -> Self {
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                Self::map_len(len),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | extra_flags,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            let layout = std::alloc::Layout::from_size_align(Self::map_len(len), ALIGN).expect("layout");
            std::alloc::handle_alloc_error(layout);
        }
        let ptr = std::ptr::NonNull::new(raw.cast::<u8>()).expect("mmap returned null");
        Self { ptr, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping holds `len` zero-initialised (or since written) bytes; &mut self
        // gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for PageBuf {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the mapping holds `len` initialised bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for PageBuf {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `zeroed`, which nothing else references.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), Self::map_len(self.len));
        }
    }
}
