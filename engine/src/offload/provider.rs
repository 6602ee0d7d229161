//! [`CachedExperts`]: the engine's `ExpertProvider` over the disk tier. Only a bounded set of
//! experts is resident; the rest are read through the I/O pool when the router asks for them.
//!
//! One thread (the forward pass) drives the cache's state machine; the I/O workers only read
//! bytes into the slots they are handed. A layer pass goes: `prepare` counts the activations,
//! starts every missing expert's load at once (demand priority), and — on `skip` — drops the
//! missing experts from the decision; `expert` then waits for each expert in turn (the wait is
//! stall time) and hands out views of its slot. An expert whose views are still held is never
//! evicted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use super::cache::{Admit, Budget, CacheCore, CacheStats, Lookup};
use super::metrics::IoStats;
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
}

struct Inner {
    core: CacheCore,
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
    /// Experts of the layer pass now running that have not been handed out yet.
    pending: HashSet<ExpertKey>,
    /// Experts whose loads this layer pass started.
    loaded_this_pass: HashSet<ExpertKey>,
    io: IoStats,
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
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for CachedExperts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedExperts")
            .field("mode", &self.store.mode())
            .field("slots", &self.total_slots)
            .finish_non_exhaustive()
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
            pool: IoPool::new(store.clone(), opts.io_threads),
            store,
            first_moe_layer: moe_layers.first().copied().unwrap_or(0),
            on_miss: opts.on_miss,
            settle_loads: opts.settle_loads,
            mapped,
            total_slots,
            pinned_bytes: 0,
            inner: Mutex::new(Inner {
                core,
                slots: HashMap::new(),
                free: Vec::new(),
                allocated: 0,
                in_flight: HashMap::new(),
                next_job: 0,
                failed: HashMap::new(),
                pending: HashSet::new(),
                loaded_this_pass: HashSet::new(),
                io: IoStats::default(),
            }),
        };
        this.preload_pins(&opts.pinned)
    }

    fn preload_pins(mut self, pinned: &[ExpertKey]) -> Result<Self> {
        {
            let mut inner = self.lock();
            for &key in pinned {
                self.issue(&mut inner, key, false)?;
            }
            for &key in pinned {
                self.wait_for(&mut inner, key)?;
            }
            // Pin loads happen before the run: the run's counters start after them.
            let pinned_bytes = inner.io.bytes_read;
            inner.core.stats = CacheStats::default();
            inner.io = IoStats::default();
            drop(inner);
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
    pub fn pinned_bytes(&self) -> u64 {
        self.pinned_bytes
    }

    /// The counters so far.
    pub fn stats(&self) -> (CacheStats, IoStats) {
        let inner = self.lock();
        (inner.core.stats.clone(), inner.io.clone())
    }

    /// Slot buffers allocated so far (never more than the capacity).
    pub fn allocated_slots(&self) -> usize {
        self.lock().allocated
    }

    /// A buffer for a new load: the evicted expert's, a free one, or a new one.
    fn take_buffer(&self, inner: &mut Inner, evicted: Option<ExpertKey>) -> Option<PageBuf> {
        if self.mapped {
            if let Some(v) = evicted {
                self.store.release_mapped(v);
            }
            return None;
        }
        if let Some(v) = evicted
            && let Some(arc) = inner.slots.remove(&v)
        {
            match Arc::try_unwrap(arc) {
                Ok(buf) => return Some(buf),
                // Still viewed somewhere (cannot happen: held experts are protected); it leaves
                // the pool and is freed when the last view goes.
                Err(_) => inner.allocated -= 1,
            }
        }
        Some(inner.free.pop().unwrap_or_else(|| {
            inner.allocated += 1;
            PageBuf::zeroed(self.store.slot_bytes())
        }))
    }

    /// Reserves room for `key` and queues its load; false if it is already there or there is
    /// no room now. Experts whose views are held are never evicted; with `strict`, neither are
    /// the experts this layer pass has yet to hand out; without it, those that were resident
    /// when the pass began may go (whether this pass's own loads have landed depends on timing,
    /// so they stay protected: the simulator makes the same choices as a live run).
    fn issue(&self, inner: &mut Inner, key: ExpertKey, prefetch: bool) -> Result<bool> {
        self.issue_with(inner, key, prefetch, true)
    }

    fn issue_with(&self, inner: &mut Inner, key: ExpertKey, prefetch: bool, strict: bool) -> Result<bool> {
        let Inner {
            core,
            slots,
            pending,
            loaded_this_pass,
            ..
        } = inner;
        let protect = |k: ExpertKey| {
            let pending = pending.contains(&k) && (strict || loaded_this_pass.contains(&k));
            pending || slots.get(&k).is_some_and(|a| Arc::strong_count(a) > 1)
        };
        match core.admit(key, prefetch, &protect, None) {
            Admit::Load { evicted } => {
                if !prefetch {
                    inner.loaded_this_pass.insert(key);
                }
                let buf = self.take_buffer(inner, evicted);
                let cancelled = Arc::new(AtomicBool::new(false));
                inner.next_job += 1;
                let id = inner.next_job;
                inner.in_flight.insert(key, (id, cancelled.clone()));
                self.pool.submit(
                    LoadJob {
                        id,
                        key,
                        buf,
                        cancelled,
                    },
                    !prefetch,
                )?;
                Ok(true)
            }
            Admit::Present | Admit::NoRoom => Ok(false),
        }
    }

    fn handle_done(&self, inner: &mut Inner, done: LoadDone) {
        let key = done.key;
        // A completion is current only if it is the job the cache is waiting on for this key;
        // a cancelled prefetch's late completion just returns its buffer.
        let current = inner.in_flight.get(&key).is_some_and(|(id, _)| *id == done.id);
        if current {
            inner.in_flight.remove(&key);
        }
        if let Ok(bytes) = done.result.as_ref()
            && !done.cancelled
        {
            inner.io.bytes_read += bytes;
            inner.io.latencies.push(done.latency.as_secs_f64());
        }
        if !current || done.cancelled || !inner.core.is_loading(key) {
            if let Some(buf) = done.buf {
                inner.free.push(buf);
            }
            return;
        }
        match done.result {
            Ok(_) => {
                if let Some(buf) = done.buf {
                    inner.slots.insert(key, Arc::new(buf));
                }
                inner.core.loaded(key);
            }
            Err(e) => {
                // The slot goes back unfilled: nothing half-written is ever marked resident.
                inner.io.load_errors += 1;
                inner.core.load_failed(key);
                if let Some(buf) = done.buf {
                    inner.free.push(buf);
                }
                tracing::debug!("load of {key} failed: {e}");
                inner.failed.insert(key, e.to_string());
            }
        }
    }

    /// Blocks until `key` is no longer loading; the wait is stall time.
    fn wait_for(&self, inner: &mut Inner, key: ExpertKey) -> Result<()> {
        let start = Instant::now();
        while inner.core.is_loading(key) {
            let done = self.pool.recv()?;
            self.handle_done(inner, done);
        }
        inner.io.stall += start.elapsed();
        match inner.failed.remove(&key) {
            Some(msg) => Err(EngineError::invalid("expert load", msg)),
            None => Ok(()),
        }
    }

    /// Starts loading `keys` ahead of need, behind every demand load. A prefetch never evicts a
    /// pinned expert or one of the layer pass now running. Returns how many were issued.
    pub fn prefetch(&self, keys: &[ExpertKey]) -> Result<usize> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        self.drain(inner);
        let mut issued = 0;
        for &key in keys {
            if self.issue(inner, key, true)? {
                issued += 1;
            }
        }
        Ok(issued)
    }

    /// Drops a prefetch that nobody has asked for yet: if no worker has started it, it is
    /// never read. True if it was dropped.
    pub fn cancel_prefetch(&self, key: ExpertKey) -> bool {
        let mut inner = self.lock();
        if !inner.core.cancel(key) {
            return false;
        }
        if let Some((_, flag)) = inner.in_flight.get(&key) {
            flag.store(true, std::sync::atomic::Ordering::Release);
        }
        true
    }

    /// Waits for every load in flight (prefetches included) to finish.
    pub fn wait_idle(&self) -> Result<()> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        while !inner.in_flight.is_empty() {
            let done = self.pool.recv()?;
            self.handle_done(inner, done);
        }
        Ok(())
    }

    fn drain(&self, inner: &mut Inner) {
        while let Some(done) = self.pool.try_recv() {
            self.handle_done(inner, done);
        }
    }
}

impl ExpertProvider for CachedExperts {
    fn prepare(&self, layer: usize, phase: Phase, decision: &mut RoutingDecision) -> Result<()> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        self.drain(inner);
        if self.settle_loads {
            let start = Instant::now();
            while !inner.in_flight.is_empty() {
                let done = self.pool.recv()?;
                self.handle_done(inner, done);
            }
            inner.io.stall += start.elapsed();
        }
        if layer == self.first_moe_layer {
            inner.core.advance(decision.tokens() as u64);
        }
        let mut counts: BTreeMap<u32, u64> = BTreeMap::new();
        for &e in decision.experts.iter().filter(|&&e| e != DROPPED) {
            *counts.entry(e).or_insert(0) += 1;
        }
        inner.pending = counts.keys().map(|&e| ExpertKey::new(layer, e)).collect();
        inner.loaded_this_pass.clear();
        let mut missing = Vec::new();
        for (&e, &count) in &counts {
            let key = ExpertKey::new(layer, e);
            if inner.core.lookup(key, count, phase) != Lookup::Hit {
                missing.push(key);
            }
        }
        // Every missing load starts now (demand priority); those without room wait for
        // `expert`, after earlier experts of this pass are done.
        for &key in &missing {
            if !inner.core.is_loading(key) {
                self.issue(inner, key, false)?;
            }
        }
        if self.on_miss == MissMode::Skip && !missing.is_empty() {
            let gone: HashSet<u32> = missing.iter().map(|k| k.expert).collect();
            let mut dropped = 0;
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
                        dropped += 1;
                    }
                }
                let after: f32 = ws.iter().sum();
                if after > 0.0 {
                    ws.iter_mut().for_each(|w| *w *= before / after);
                }
            }
            inner.core.count_fallbacks(dropped);
            inner.pending.retain(|k| !gone.contains(&k.expert));
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
        let inner = &mut *guard;
        loop {
            if inner.core.is_resident(key) {
                break;
            }
            if inner.core.is_loading(key) {
                self.wait_for(inner, key)?;
                continue;
            }
            // No room while this pass's other experts are protected: give up one that has not
            // been handed out yet (it is loaded again when its turn comes) rather than stall.
            if !self.issue(inner, key, false)? && !self.issue_with(inner, key, false, false)? {
                if inner.in_flight.is_empty() {
                    return Err(EngineError::invalid(
                        "--capacity",
                        format!(
                            "no room to load {key}: every slot of its cache ({}) holds a pinned or in-use expert",
                            inner.core.capacity_of(key)
                        ),
                    ));
                }
                let start = Instant::now();
                let done = self.pool.recv()?;
                self.handle_done(inner, done);
                inner.io.stall += start.elapsed();
            }
        }
        inner.pending.remove(&key);
        let w = if self.mapped {
            self.store.view_mapped(key)?
        } else {
            let slot = inner.slots.get(&key).ok_or_else(|| {
                EngineError::invalid("expert cache", format!("{key} is resident without a slot"))
            })?;
            self.store.view(key, slot)?
        };
        Ok(Arc::new(w))
    }
}
