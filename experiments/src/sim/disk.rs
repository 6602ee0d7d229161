//! The modelled disk: up to `threads` reads at once; each waits `latency_us`, then its bytes
//! flow at an equal share of the aggregate bandwidth for the number of reads transferring
//! (`gbps_by_depth`). Demand reads start before queued prefetches; a read lands in the cache
//! core when its last byte arrives.

use std::collections::VecDeque;

use serde::Serialize;
use shadowmoe_engine::offload::cache::CacheCore;
use shadowmoe_engine::offload::metrics::ReadSpan;
use shadowmoe_engine::offload::{ExpertKey, KeyMap};

/// The I/O model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IoModel {
    /// Reads in flight at most (the I/O pool's threads).
    pub threads: usize,
    pub expert_bytes: u64,
    /// Time before a read's bytes start to flow, microseconds.
    pub latency_us: f64,
    /// Aggregate bandwidth in GB/s with 1, 2, … reads transferring at once (the last value
    /// holds beyond): the readers share it.
    pub gbps_by_depth: Vec<f64>,
    /// Reads that may be prefetches at once (0: all `threads`).
    pub prefetch_readers: usize,
}

impl IoModel {
    /// `threads` independent readers of `gbps` each (the simulator's flags without a
    /// calibration).
    pub fn independent(gbps: f64, latency_us: f64, threads: usize, expert_bytes: u64) -> Self {
        Self {
            threads,
            expert_bytes,
            latency_us,
            gbps_by_depth: (1..=threads.max(1)).map(|q| q as f64 * gbps).collect(),
            prefetch_readers: 0,
        }
    }

    /// Aggregate bytes per second with `q` reads transferring.
    fn bandwidth(&self, q: usize) -> f64 {
        let i = q.clamp(1, self.gbps_by_depth.len().max(1)) - 1;
        self.gbps_by_depth.get(i).copied().unwrap_or(1.0) * 1e9
    }

    /// Seconds one read takes alone.
    pub fn load_secs(&self) -> f64 {
        self.latency_us * 1e-6 + self.expert_bytes as f64 / self.bandwidth(1)
    }
}

/// A read on the modelled disk.
#[derive(Debug, Clone, Copy)]
struct Read {
    key: ExpertKey,
    generation: u64,
    prefetch: bool,
    /// When its bytes start to flow.
    ready: f64,
    /// Bytes still to transfer.
    left: f64,
    /// When it started (left the queue).
    started: f64,
}

/// The modelled disk: reads in flight share the bandwidth.
#[derive(Debug, Clone)]
pub(super) struct Io {
    model: IoModel,
    clock: f64,
    active: Vec<Read>,
    demand: VecDeque<(ExpertKey, u64)>,
    prefetch: VecDeque<(ExpertKey, u64)>,
    /// The generation of each key's current load (a cancelled load's late end is ignored).
    current: KeyMap<u64>,
    next_gen: u64,
    /// Bytes of every read started so far.
    pub(super) bytes: u64,
    /// A decode pass is running (set by the simulator).
    pub(super) decoding: bool,
    /// When each finished read ran, and whether it landed during a decode pass, as a live
    /// run records them.
    pub(super) spans: Vec<ReadSpan>,
}

const DONE_EPS: f64 = 1e-6;

impl Io {
    pub(super) fn new(model: IoModel) -> Self {
        Self {
            model,
            clock: 0.0,
            active: Vec::new(),
            demand: VecDeque::new(),
            prefetch: VecDeque::new(),
            current: KeyMap::default(),
            next_gen: 0,
            bytes: 0,
            decoding: false,
            spans: Vec::new(),
        }
    }

    pub(super) fn submit(&mut self, key: ExpertKey, demand: bool) {
        self.next_gen += 1;
        self.current.insert(key, self.next_gen);
        if demand {
            self.demand.push_back((key, self.next_gen));
        } else {
            self.prefetch.push_back((key, self.next_gen));
        }
        self.start_queued();
    }

    pub(super) fn cancel(&mut self, key: ExpertKey) {
        if let Some(g0) = self.current.remove(&key) {
            self.prefetch.retain(|&(_, g)| g != g0);
        }
    }

    fn start_queued(&mut self) {
        let limit = match self.model.prefetch_readers {
            0 => usize::MAX,
            n => n,
        };
        while self.active.len() < self.model.threads.max(1) {
            let prefetching = self.active.iter().filter(|r| r.prefetch).count();
            let (next, prefetch) = match self.demand.pop_front() {
                Some(d) => (d, false),
                None if prefetching < limit => match self.prefetch.pop_front() {
                    Some(p) => (p, true),
                    None => return,
                },
                None => return,
            };
            let (key, generation) = next;
            self.bytes += self.model.expert_bytes;
            self.active.push(Read {
                key,
                generation,
                prefetch,
                ready: self.clock + self.model.latency_us * 1e-6,
                left: self.model.expert_bytes as f64,
                started: self.clock,
            });
        }
    }

    /// The next event of `active` (a read's bytes start to flow, or a read ends), from `clock`.
    fn next_event(active: &[Read], clock: f64, model: &IoModel) -> Option<f64> {
        let q = active.iter().filter(|r| r.ready <= clock).count();
        let rate = model.bandwidth(q) / q.max(1) as f64;
        active
            .iter()
            .map(|r| {
                if r.ready > clock {
                    r.ready
                } else {
                    clock + r.left / rate
                }
            })
            .min_by(f64::total_cmp)
    }

    /// Moves `active` on from `clock` to `t` (no event in between).
    fn flow(active: &mut [Read], clock: f64, t: f64, model: &IoModel) {
        let q = active.iter().filter(|r| r.ready <= clock).count();
        if q == 0 {
            return;
        }
        let rate = model.bandwidth(q) / q as f64;
        for r in active.iter_mut().filter(|r| r.ready <= clock) {
            r.left -= rate * (t - clock);
        }
    }

    /// Advances to `t`, landing every read that ends by then (in order) in `core`.
    pub(super) fn advance_to(&mut self, t: f64, core: &mut CacheCore) {
        loop {
            match Self::next_event(&self.active, self.clock, &self.model) {
                Some(ev) if ev <= t => {
                    Self::flow(&mut self.active, self.clock, ev, &self.model);
                    self.clock = ev;
                    let mut i = 0;
                    while i < self.active.len() {
                        let r = self.active[i];
                        if r.ready <= self.clock && r.left <= DONE_EPS * self.model.expert_bytes as f64 {
                            self.active.swap_remove(i);
                            self.spans.push(ReadSpan {
                                start: r.started,
                                end: self.clock,
                                decode: self.decoding,
                            });
                            if self.current.get(&r.key) == Some(&r.generation) {
                                self.current.remove(&r.key);
                                core.loaded(r.key);
                            }
                        } else {
                            i += 1;
                        }
                    }
                    self.start_queued();
                }
                _ => {
                    Self::flow(&mut self.active, self.clock, t.max(self.clock), &self.model);
                    self.clock = self.clock.max(t);
                    return;
                }
            }
        }
    }

    /// When the next read in flight ends, if nothing new is queued.
    pub(super) fn peek_done(&self) -> Option<f64> {
        let mut active = self.active.clone();
        let mut clock = self.clock;
        loop {
            let ev = Self::next_event(&active, clock, &self.model)?;
            Self::flow(&mut active, clock, ev, &self.model);
            clock = ev;
            if active
                .iter()
                .any(|r| r.ready <= clock && r.left <= DONE_EPS * self.model.expert_bytes as f64)
            {
                return Some(clock);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shadowmoe_engine::offload::cache::{Admit, Budget};
    use shadowmoe_engine::offload::policy::PolicyKind;

    fn key(e: u32) -> ExpertKey {
        ExpertKey { layer: 0, expert: e }
    }

    /// Reads share the bandwidth: two reads at once on a disk whose bandwidth does not grow
    /// with depth take twice as long as one alone; independent readers do not slow each other.
    #[test]
    fn readers_share_the_bandwidth() {
        let mut core = CacheCore::new(&[0], Budget::PerLayer(8), PolicyKind::Lru, &[]);
        for e in 0..2 {
            assert!(matches!(
                core.admit(key(e), false, &|_| false, None),
                Admit::Load { .. }
            ));
        }
        let shared = IoModel {
            threads: 2,
            expert_bytes: 1_000_000,
            latency_us: 0.0,
            gbps_by_depth: vec![1.0, 1.0],
            prefetch_readers: 0,
        };
        let mut io = Io::new(shared.clone());
        io.submit(key(0), true);
        assert!((io.peek_done().unwrap() - 1e-3).abs() < 1e-9);
        io.submit(key(1), true);
        assert!((io.peek_done().unwrap() - 2e-3).abs() < 1e-9);
        io.advance_to(0.0019, &mut core);
        assert!(core.is_loading(key(0)) && core.is_loading(key(1)));
        io.advance_to(0.0021, &mut core);
        assert!(core.is_resident(key(0)) && core.is_resident(key(1)));

        let mut io = Io::new(IoModel::independent(1.0, 100.0, 2, 1_000_000));
        io.submit(key(2), true);
        io.submit(key(3), false);
        assert!((io.peek_done().unwrap() - 1.1e-3).abs() < 1e-9);
        // A third read waits for a reader.
        io.submit(key(4), true);
        assert_eq!(io.active.len(), 2);
        assert_eq!(io.bytes, 2_000_000);
    }

    #[test]
    fn prefetch_readers_limit_the_prefetches_in_flight() {
        let model = IoModel {
            prefetch_readers: 1,
            ..IoModel::independent(1.0, 0.0, 4, 1_000_000)
        };
        let mut io = Io::new(model);
        for e in 0..3 {
            io.submit(key(e), false);
        }
        assert_eq!(io.active.len(), 1, "one prefetch reader");
        io.submit(key(9), true);
        assert_eq!(io.active.len(), 2, "a demand read starts beside it");
    }

    #[test]
    fn a_cancelled_read_does_not_land() {
        let mut core = CacheCore::new(&[0], Budget::PerLayer(8), PolicyKind::Lru, &[]);
        let model = IoModel::independent(1.0, 0.0, 1, 1_000_000);
        let mut io = Io::new(model);
        for e in 0..2 {
            assert!(matches!(
                core.admit(key(e), true, &|_| false, None),
                Admit::Load { .. }
            ));
            io.submit(key(e), false);
        }
        // Key 1 is queued behind key 0: cancelling it drops it unread.
        assert!(core.cancel(key(1)));
        io.cancel(key(1));
        io.advance_to(1.0, &mut core);
        assert!(core.is_resident(key(0)));
        assert!(!core.is_resident(key(1)) && !core.is_loading(key(1)));
        assert_eq!(io.bytes, 1_000_000);
    }
}
