//! [`CachedExperts`]: the engine's `ExpertProvider` over the disk tier. Only a bounded set of
//! experts is resident; the rest are read through the I/O pool when the router asks for them.
//!
//! One thread (the forward pass) drives the cache's state machine; the I/O workers only read
//! bytes into the slots they are handed. A layer pass goes: `prepare` counts the activations,
//! starts every missing expert's load at once (demand priority), and — on `skip` — drops the
//! missing experts from the decision; `expert` then waits for each expert in turn (the wait is
//! stall time) and hands out views of its slot. An expert whose views are still held (its
//! matmuls still running on another thread) may be evicted like any other — the simulator
//! cannot know about views, so they must not change the cache's decisions — and is safe: its
//! buffer leaves the pool and lives until the last view goes, and the new load gets a fresh one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use super::cache::{Budget, CacheCore, CacheStats};
use super::driver::{self, Loader, Pass};
use super::metrics::{IoStats, ReadSpan};
use super::policy::PolicyKind;
use super::pool::{IoPool, LoadDone, LoadJob};
use super::store::{ExpertStore, IoMode};
use super::{ExpertKey, PageBuf};
use crate::error::{EngineError, Result};
use crate::moe::{DROPPED, ExpertProvider, ExpertWeights, RoutingDecision};
use crate::observer::Phase;

/// What happens when a routed expert is not resident.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MissMode {
    /// Wait for the load: exact.
    Sync,
    /// flash-moe's fallback: drop the missing experts for this token, renormalise the weights of
    /// the resident ones, and load the missing ones in the background.
    Skip,
}

impl std::str::FromStr for MissMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "sync" => Ok(MissMode::Sync),
            "skip" => Ok(MissMode::Skip),
            _ => Err(format!("unknown miss mode `{s}` (expected sync or skip)")),
        }
    }
}

impl MissMode {
    pub fn name(self) -> &'static str {
        match self {
            MissMode::Sync => "sync",
            MissMode::Skip => "skip",
        }
    }
}

/// How the cache is set up.
#[derive(Debug, Clone)]
pub struct CacheOptions {
    pub budget: Budget,
    pub policy: PolicyKind,
    pub on_miss: MissMode,
    pub io_threads: usize,
    /// Experts kept resident for the whole run (loaded before the first token).
    pub pinned: Vec<ExpertKey>,
    /// Deterministic timing: every load in flight (prefetches included) lands before a layer
    /// looks its experts up, so hits depend on the order of events alone, as in the simulator
    /// with instant I/O.
    pub settle_loads: bool,
    /// Readers that may be busy with prefetches at once (0: all of them): the disk's bandwidth
    /// is shared, so a demand load competing with many prefetches in flight waits longer.
    pub prefetch_readers: usize,
}

/// The live side of the cache: slots, buffers and loads in flight.
struct LiveIo {
    /// Loaded slots of resident experts (empty in mmap mode).
    slots: HashMap<ExpertKey, Arc<PageBuf>>,
    /// Slot buffers not in use.
    free: Vec<PageBuf>,
    /// Slot buffers this cache owns (resident, loading or free).
    allocated: usize,
    /// Loads in flight: job id and cancel flag.
    in_flight: HashMap<ExpertKey, (u64, Arc<AtomicBool>)>,
    next_job: u64,
    /// Why a load failed, until someone waits for it.
    failed: HashMap<ExpertKey, String>,
    io: IoStats,
    /// A decode pass is running (what a read that lands now is counted under).
    decoding: bool,
}

struct Inner {
    core: CacheCore,
    live: LiveIo,
    /// The layer pass now running (or last run).
    pass: Pass,
}

/// Experts served from disk through a bounded cache.
pub struct CachedExperts {
    store: Arc<ExpertStore>,
    pool: IoPool,
    first_moe_layer: usize,
    on_miss: MissMode,
    settle_loads: bool,
    mapped: bool,
    total_slots: usize,
    pinned_bytes: u64,
    /// How long a pass waits for a load before it fails (milliseconds; a read that hangs).
    load_timeout_ms: std::sync::atomic::AtomicU64,
    inner: Mutex<Inner>,
}

/// The default [`CachedExperts::set_load_timeout`]: far beyond any healthy read.
pub const DEFAULT_LOAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

impl std::fmt::Debug for CachedExperts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedExperts")
            .field("mode", &self.store.mode())
            .field("slots", &self.total_slots)
            .finish_non_exhaustive()
    }
}

/// The I/O pool as the pass driver's [`Loader`].
struct LiveLoader<'a> {
    cache: &'a CachedExperts,
    io: &'a mut LiveIo,
}

impl LiveLoader<'_> {
    /// A buffer for a new load: the evicted expert's, a free one, or a new one.
    fn take_buffer(&mut self, evicted: Option<ExpertKey>) -> Option<PageBuf> {
        let io = &mut *self.io;
        if self.cache.mapped {
            if let Some(v) = evicted {
                self.cache.store.release_mapped(v);
            }
            return None;
        }
        if let Some(v) = evicted
            && let Some(arc) = io.slots.remove(&v)
        {
            match Arc::try_unwrap(arc) {
                Ok(buf) => return Some(buf),
                // Still viewed (its matmuls are running on another thread): it leaves the pool
                // and is freed when the last view goes; the load gets a fresh buffer.
                Err(_) => io.allocated -= 1,
            }
        }
        Some(io.free.pop().unwrap_or_else(|| {
            io.allocated += 1;
            PageBuf::populated(self.cache.store.slot_bytes())
        }))
    }

    fn handle_done(&mut self, core: &mut CacheCore, done: LoadDone) {
        let io = &mut *self.io;
        let key = done.key;
        // A completion is current only if it is the job the cache is waiting on for this key;
        // a cancelled prefetch's late completion just returns its buffer.
        let current = io.in_flight.get(&key).is_some_and(|(id, _)| *id == done.id);
        if current {
            io.in_flight.remove(&key);
        }
        if let Ok(bytes) = done.result.as_ref()
            && !done.cancelled
        {
            io.io.bytes_read += bytes;
            if let Some(at) = done.started {
                io.io.spans.push(ReadSpan::new(at, done.latency, io.decoding));
            }
        }
        if !current || done.cancelled || !core.is_loading(key) {
            if let Some(buf) = done.buf {
                io.free.push(buf);
            }
            return;
        }
        match done.result {
            Ok(_) => {
                if let Some(buf) = done.buf {
                    io.slots.insert(key, Arc::new(buf));
                }
                core.loaded(key);
            }
            Err(e) => {
                // The slot goes back unfilled: nothing half-written is ever marked resident.
                io.io.load_errors += 1;
                core.load_failed(key);
                if let Some(buf) = done.buf {
                    io.free.push(buf);
                }
                tracing::debug!("load of {key} failed: {e}");
                io.failed.insert(key, e.to_string());
            }
        }
    }
}

impl Loader for LiveLoader<'_> {
    fn start(&mut self, key: ExpertKey, prefetch: bool, evicted: Option<ExpertKey>) -> Result<()> {
        let buf = self.take_buffer(evicted);
        let cancelled = Arc::new(AtomicBool::new(false));
        self.io.next_job += 1;
        let id = self.io.next_job;
        self.io.in_flight.insert(key, (id, cancelled.clone()));
        self.cache.pool.submit(
            LoadJob {
                id,
                key,
                buf,
                cancelled,
            },
            !prefetch,
        )
    }

    fn poll(&mut self, core: &mut CacheCore) {
        while let Some(done) = self.cache.pool.try_recv() {
            self.handle_done(core, done);
        }
    }

    fn wait_one(&mut self, core: &mut CacheCore) -> Result<bool> {
        if self.io.in_flight.is_empty() {
            return Ok(false);
        }
        let start = Instant::now();
        let timeout = std::time::Duration::from_millis(
            self.cache
                .load_timeout_ms
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        let Some(done) = self.cache.pool.recv_timeout(timeout)? else {
            self.io.io.stall += start.elapsed();
            let mut keys: Vec<ExpertKey> = self.io.in_flight.keys().copied().collect();
            keys.sort_unstable_by_key(|k| (k.layer, k.expert));
            let first = keys[0];
            let file = self
                .cache
                .store
                .file_of(first)
                .map_or_else(String::new, |p| format!(" from {}", p.display()));
            return Err(EngineError::invalid(
                "expert load",
                format!(
                    "no read finished within {:.1} s (a hanging disk?): {first}{file} and {} more still in flight",
                    timeout.as_secs_f64(),
                    keys.len() - 1
                ),
            ));
        };
        self.handle_done(core, done);
        self.io.io.stall += start.elapsed();
        Ok(true)
    }

    fn take_error(&mut self, key: ExpertKey) -> Option<String> {
        self.io.failed.remove(&key)
    }
}

impl CachedExperts {
    /// A cache over `store` for the MoE layers `moe_layers` (model layer indices); loads the
    /// pinned experts before returning.
    pub fn new(store: Arc<ExpertStore>, moe_layers: &[usize], opts: &CacheOptions) -> Result<Self> {
        if opts.policy == PolicyKind::Belady {
            return Err(EngineError::invalid(
                "--policy",
                "belady needs to know the future: it runs only in the simulator (bench-sweep --mode sim)",
            ));
        }
        let (total_slots, per_partition) = match opts.budget {
            Budget::PerLayer(n) => (n * moe_layers.len(), n),
            Budget::Global(n) => (n, n),
        };
        if per_partition == 0 {
            return Err(EngineError::invalid("--capacity", "must be at least 1 expert"));
        }
        let pins_per_partition = match opts.budget {
            Budget::PerLayer(_) => moe_layers
                .iter()
                .map(|&l| opts.pinned.iter().filter(|k| k.layer as usize == l).count())
                .max()
                .unwrap_or(0),
            Budget::Global(_) => opts.pinned.len(),
        };
        if pins_per_partition >= per_partition && !opts.pinned.is_empty() {
            return Err(EngineError::invalid(
                "--pin",
                format!(
                    "pinning {pins_per_partition} experts leaves no room for the others in a cache of {per_partition}; pin fewer (K < capacity)"
                ),
            ));
        }
        let core = CacheCore::new(moe_layers, opts.budget, opts.policy, &opts.pinned);
        let mapped = store.mode() == IoMode::Mmap;
        let this = Self {
            pool: IoPool::with_prefetch_limit(store.clone(), opts.io_threads, opts.prefetch_readers),
            store,
            first_moe_layer: moe_layers.first().copied().unwrap_or(0),
            on_miss: opts.on_miss,
            settle_loads: opts.settle_loads,
            mapped,
            total_slots,
            pinned_bytes: 0,
            load_timeout_ms: std::sync::atomic::AtomicU64::new(DEFAULT_LOAD_TIMEOUT.as_millis() as u64),
            inner: Mutex::new(Inner {
                core,
                live: LiveIo {
                    slots: HashMap::new(),
                    free: Vec::new(),
                    allocated: 0,
                    in_flight: HashMap::new(),
                    next_job: 0,
                    failed: HashMap::new(),
                    io: IoStats::default(),
                    decoding: false,
                },
                pass: Pass::default(),
            }),
        };
        // The cache takes its memory when it is made, its pages faulted in once: a slot mapped
        // during decode costs its first read one page fault per 4 KiB (measured here: capacity
        // 160 on the inflated model decoded at 9.1 tok/s with slots mapped as loads came, 15.5
        // with this pool). No more slots than the store has experts.
        let mut this = this;
        if !this.mapped {
            let n = this.total_slots.min(this.store.experts());
            let bytes = this.store.slot_bytes();
            let live = &mut this.inner.get_mut().unwrap_or_else(|e| e.into_inner()).live;
            live.free = (0..n).map(|_| PageBuf::populated(bytes)).collect();
            live.allocated = n;
        }
        this.preload_pins(&opts.pinned)
    }

    fn preload_pins(mut self, pinned: &[ExpertKey]) -> Result<Self> {
        {
            let mut guard = self.lock();
            let Inner { core, live, .. } = &mut *guard;
            let mut loader = LiveLoader {
                cache: &self,
                io: live,
            };
            // Demand loads (a pass of their own), not prefetches.
            let mut pins = Pass::default();
            for &key in pinned {
                driver::issue(core, &mut loader, Some(&mut pins), None, key, true)?;
            }
            for &key in pinned {
                driver::wait_for(core, &mut loader, key)?;
            }
            // Pin loads happen before the run: the run's counters start after them.
            let pinned_bytes = live.io.bytes_read;
            core.stats = CacheStats::default();
            live.io = IoStats::default();
            drop(guard);
            self.pinned_bytes = pinned_bytes;
        }
        Ok(self)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The store behind the cache.
    pub fn store(&self) -> &ExpertStore {
        &self.store
    }

    /// Expert slots in all.
    pub fn total_slots(&self) -> usize {
        self.total_slots
    }

    /// Bytes read to load the pinned experts before the run.
    /// How long a pass waits for an expert load before it fails naming the expert and its
    /// file (default [`DEFAULT_LOAD_TIMEOUT`]): a read that hangs ends the run, never hangs it.
    pub fn set_load_timeout(&self, timeout: std::time::Duration) {
        self.load_timeout_ms.store(
            timeout.as_millis().clamp(1, u128::from(u64::MAX)) as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    pub fn pinned_bytes(&self) -> u64 {
        self.pinned_bytes
    }

    /// The counters so far.
    pub fn stats(&self) -> (CacheStats, IoStats) {
        let inner = self.lock();
        (inner.core.stats.clone(), inner.live.io.clone())
    }

    /// Takes the read spans recorded so far (they are not kept afterwards): a long-running
    /// server folds them into a histogram instead of letting the list grow with every read.
    pub fn take_spans(&self) -> Vec<super::metrics::ReadSpan> {
        std::mem::take(&mut self.lock().live.io.spans)
    }

    /// Activation counts of every expert used so far (see [`CacheCore::usage`]).
    pub fn usage(&self) -> Vec<(ExpertKey, u64)> {
        self.lock().core.usage()
    }

    /// Adds a previous run's activation counts (a warm start), so that LFU and LCP rank the
    /// experts as that run had.
    pub fn add_usage(&self, counts: &[(ExpertKey, u64)]) {
        let mut g = self.lock();
        for &(k, n) in counts {
            g.core.add_usage(k, n);
        }
    }

    /// The experts resident now (loaded, not in flight).
    pub fn resident(&self) -> Vec<ExpertKey> {
        self.lock().core.resident().collect()
    }

    /// Slot buffers allocated so far (never more than the capacity).
    pub fn allocated_slots(&self) -> usize {
        self.lock().live.allocated
    }

    /// Starts loading `keys` ahead of need, behind every demand load. A prefetch never evicts a
    /// pinned expert or one of the layer pass now running (or just run). Returns how many were
    /// issued.
    pub fn prefetch(&self, keys: &[ExpertKey]) -> Result<usize> {
        let mut guard = self.lock();
        let Inner { core, live, pass } = &mut *guard;
        let mut loader = LiveLoader {
            cache: self,
            io: live,
        };
        driver::prefetch(core, &mut loader, Some(&pass.all), keys)
    }

    /// Drops a prefetch that nobody has asked for yet: if no worker has started it, it is
    /// never read. True if it was dropped.
    pub fn cancel_prefetch(&self, key: ExpertKey) -> bool {
        let mut inner = self.lock();
        if !inner.core.cancel(key) {
            return false;
        }
        if let Some((_, flag)) = inner.live.in_flight.get(&key) {
            flag.store(true, std::sync::atomic::Ordering::Release);
        }
        true
    }

    /// Waits for every load in flight (prefetches included) to finish.
    pub fn wait_idle(&self) -> Result<()> {
        let mut guard = self.lock();
        let Inner { core, live, .. } = &mut *guard;
        let mut loader = LiveLoader {
            cache: self,
            io: live,
        };
        while loader.wait_one(core)? {}
        Ok(())
    }
}

impl ExpertProvider for CachedExperts {
    fn prepare(&self, layer: usize, phase: Phase, decision: &mut RoutingDecision) -> Result<()> {
        let mut guard = self.lock();
        let Inner { core, live, pass } = &mut *guard;
        live.decoding = phase == Phase::Decode;
        let mut loader = LiveLoader {
            cache: self,
            io: live,
        };
        let mut counts: BTreeMap<u32, u64> = BTreeMap::new();
        for &e in decision.experts.iter().filter(|&&e| e != DROPPED) {
            *counts.entry(e).or_insert(0) += 1;
        }
        let advance = (layer == self.first_moe_layer).then_some(decision.tokens() as u64);
        *pass = driver::begin_pass(
            core,
            &mut loader,
            layer,
            phase,
            &counts,
            advance,
            self.settle_loads,
        )?;
        if self.on_miss == MissMode::Skip && !pass.missing.is_empty() {
            let gone: HashSet<u32> = driver::skip_missing(core, pass, &counts)
                .iter()
                .map(|k| k.expert)
                .collect();
            for t in 0..decision.tokens() {
                let k = decision.k;
                let (ids, ws) = (
                    &mut decision.experts[t * k..(t + 1) * k],
                    &mut decision.weights[t * k..(t + 1) * k],
                );
                let before: f32 = ws.iter().sum();
                for (id, w) in ids.iter_mut().zip(ws.iter_mut()) {
                    if gone.contains(id) {
                        *id = DROPPED;
                        *w = 0.0;
                    }
                }
                let after: f32 = ws.iter().sum();
                if after > 0.0 {
                    ws.iter_mut().for_each(|w| *w *= before / after);
                }
            }
        }
        Ok(())
    }

    fn prefetch(&self, layer: usize, experts: &[u32]) -> Result<usize> {
        let keys: Vec<ExpertKey> = experts.iter().map(|&e| ExpertKey::new(layer, e)).collect();
        CachedExperts::prefetch(self, &keys)
    }

    fn cancel_prefetch(&self, layer: usize, expert: u32) -> bool {
        CachedExperts::cancel_prefetch(self, ExpertKey::new(layer, expert))
    }

    fn expert(&self, layer: usize, expert: u32) -> Result<Arc<ExpertWeights>> {
        let key = ExpertKey::new(layer, expert);
        let mut guard = self.lock();
        let Inner { core, live, pass } = &mut *guard;
        let mut loader = LiveLoader {
            cache: self,
            io: live,
        };
        driver::serve(core, &mut loader, pass, key)?;
        let w = if self.mapped {
            self.store.view_mapped(key)?
        } else {
            let slot = live.slots.get(&key).ok_or_else(|| {
                EngineError::invalid("expert cache", format!("{key} is resident without a slot"))
            })?;
            self.store.view(key, slot)?
        };
        Ok(Arc::new(w))
    }
}
