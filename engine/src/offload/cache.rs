//! The expert cache as a pure state machine: which experts are resident or loading, what each
//! activation was (hit, cold miss, capacity miss, late prefetch), which expert to evict. No I/O
//! and no wall clock inside: the live provider drives it with real loads, the simulator with a
//! modelled clock, and both get the same hits from the same events.
//!
//! Events, in the order a layer meets them:
//! `lookup` (an activation: counts it and says whether the expert is resident, loading or
//! absent) → `admit` (reserve room for a load, choosing a victim) → `loaded` / `load_failed`;
//! `prefetch` admits a load nobody asked for yet; `cancel` drops an unwanted one;
//! `advance` moves token time.

use std::collections::HashMap;

use serde::Serialize;

use super::policy::{Frequencies, NextUse, Policy, PolicyKind};
use super::{ExpertKey, KeyMap, KeySet};
use crate::observer::Phase;

/// How much room the cache has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// N experts per MoE layer.
    PerLayer(usize),
    /// N expert slots shared by all MoE layers (a byte budget divided by the expert size).
    Global(usize),
}

/// Residency state of one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Loading { prefetch: bool, wanted: bool },
    Resident { unused_prefetch: bool },
}

/// What an activation found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    Hit,
    /// Still loading (a late prefetch, or a demand load another layer pass started).
    InFlight,
    /// Not resident and not loading.
    Miss,
}

/// The answer to a request for room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Load it; `evicted` (if any) just left the cache and its memory may be reused.
    Load { evicted: Option<ExpertKey> },
    /// Already resident or loading: nothing to do.
    Present,
    /// Every resident key of the partition is pinned or protected.
    NoRoom,
}

/// Counters of the cache's events (the metric names of DESIGN.md).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CacheStats {
    pub activations_prefill: u64,
    pub activations_decode: u64,
    pub hits_prefill: u64,
    pub hits_decode: u64,
    /// Misses on an expert's first use in the run.
    pub cold_misses: u64,
    /// Misses on an expert that was used (so resident) before and has been evicted since.
    pub capacity_misses: u64,
    /// Activations whose expert was still loading (included in the misses above).
    pub in_flight_activations: u64,
    pub demand_loads: u64,
    pub evictions: u64,
    pub prefetch_issued: u64,
    /// Prefetched experts that were used before eviction.
    pub prefetch_used: u64,
    /// Activations that found their prefetch still in flight.
    pub prefetch_late: u64,
    /// Prefetched experts evicted (or cancelled) unused.
    pub prefetch_wasted: u64,
    /// Activations served by no expert (skip-on-miss), see DESIGN.md "fallback rate".
    pub fallbacks: u64,
}

impl CacheStats {
    pub fn activations(&self) -> u64 {
        self.activations_prefill + self.activations_decode
    }

    pub fn misses(&self) -> u64 {
        self.cold_misses + self.capacity_misses
    }

    fn ratio(a: u64, b: u64) -> Option<f64> {
        (b > 0).then(|| a as f64 / b as f64)
    }

    pub fn hit_rate(&self) -> Option<f64> {
        Self::ratio(self.hits_prefill + self.hits_decode, self.activations())
    }

    pub fn hit_rate_decode(&self) -> Option<f64> {
        Self::ratio(self.hits_decode, self.activations_decode)
    }

    pub fn hit_rate_prefill(&self) -> Option<f64> {
        Self::ratio(self.hits_prefill, self.activations_prefill)
    }

    pub fn fallback_rate(&self) -> Option<f64> {
        Self::ratio(self.fallbacks, self.activations())
    }

    pub fn prefetch_precision(&self) -> Option<f64> {
        Self::ratio(self.prefetch_used, self.prefetch_issued)
    }
}

/// The cache's state machine.
#[derive(Debug, Clone)]
pub struct CacheCore {
    budget: Budget,
    /// Model layer index → partition (per-layer budget) — all 0 for a global budget.
    partition_of: HashMap<u32, usize>,
    capacity: Vec<usize>,
    used: Vec<usize>,
    policies: Vec<Policy>,
    states: KeyMap<State>,
    used_ever: KeySet,
    pinned: KeySet,
    freq: Frequencies,
    stamp: u64,
    now: u64,
    pub stats: CacheStats,
}

impl CacheCore {
    /// A cache over `moe_layers` (model layer indices) with `budget` slots, evicting with
    /// `policy`; `pinned` keys may never be evicted once loaded (they count toward the budget).
    pub fn new(moe_layers: &[usize], budget: Budget, policy: PolicyKind, pinned: &[ExpertKey]) -> Self {
        let (partition_of, capacity): (HashMap<u32, usize>, Vec<usize>) = match budget {
            Budget::PerLayer(n) => (
                moe_layers
                    .iter()
                    .enumerate()
                    .map(|(i, &l)| (l as u32, i))
                    .collect(),
                vec![n; moe_layers.len()],
            ),
            Budget::Global(n) => (moe_layers.iter().map(|&l| (l as u32, 0)).collect(), vec![n]),
        };
        let parts = capacity.len();
        Self {
            budget,
            partition_of,
            used: vec![0; parts],
            policies: (0..parts).map(|_| Policy::new(policy)).collect(),
            capacity,
            states: KeyMap::default(),
            used_ever: KeySet::default(),
            pinned: pinned.iter().copied().collect(),
            freq: Frequencies::default(),
            stamp: 0,
            now: 0,
            stats: CacheStats::default(),
        }
    }

    pub fn budget(&self) -> Budget {
        self.budget
    }

    pub fn policy(&self) -> PolicyKind {
        self.policies[0].kind()
    }

    /// Token time.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// Moves token time on by `tokens`.
    pub fn advance(&mut self, tokens: u64) {
        self.now += tokens;
    }

    fn partition(&self, key: ExpertKey) -> usize {
        self.partition_of[&key.layer]
    }

    /// How often each expert was activated in this run (what LFU ranks by), any that was.
    pub fn usage(&self) -> Vec<(ExpertKey, u64)> {
        self.freq.iter().map(|(&k, &n)| (k, n)).collect()
    }

    /// Adds `n` to `key`'s activation count (a warm start carrying a previous run's counts).
    pub fn add_usage(&mut self, key: ExpertKey, n: u64) {
        let f = self.freq.entry(key).or_insert(0);
        *f = f.saturating_add(n);
    }

    pub fn is_resident(&self, key: ExpertKey) -> bool {
        matches!(self.states.get(&key), Some(State::Resident { .. }))
    }

    pub fn is_loading(&self, key: ExpertKey) -> bool {
        matches!(self.states.get(&key), Some(State::Loading { .. }))
    }

    pub fn is_pinned(&self, key: ExpertKey) -> bool {
        self.pinned.contains(&key)
    }

    /// Resident keys (any order).
    pub fn resident(&self) -> impl Iterator<Item = ExpertKey> + '_ {
        self.states
            .iter()
            .filter(|(_, s)| matches!(s, State::Resident { .. }))
            .map(|(k, _)| *k)
    }

    /// `count` activations of `key` in one layer pass (the tokens of the pass that route to
    /// it). A hit if it was resident when the layer began.
    pub fn lookup(&mut self, key: ExpertKey, count: u64, phase: Phase) -> Lookup {
        match phase {
            Phase::Prefill => self.stats.activations_prefill += count,
            Phase::Decode => self.stats.activations_decode += count,
        }
        *self.freq.entry(key).or_insert(0) += count;
        let first_use = self.used_ever.insert(key);
        self.stamp += 1;
        let p = self.partition(key);
        let outcome = match self.states.get_mut(&key) {
            Some(State::Resident { unused_prefetch }) => {
                if std::mem::take(unused_prefetch) {
                    self.stats.prefetch_used += 1;
                }
                match phase {
                    Phase::Prefill => self.stats.hits_prefill += count,
                    Phase::Decode => self.stats.hits_decode += count,
                }
                Lookup::Hit
            }
            Some(State::Loading { prefetch, wanted }) => {
                self.stats.in_flight_activations += count;
                if *prefetch && !*wanted {
                    self.stats.prefetch_late += count;
                    self.stats.prefetch_used += 1;
                }
                *wanted = true;
                Lookup::InFlight
            }
            None => Lookup::Miss,
        };
        if outcome != Lookup::Hit {
            if first_use {
                self.stats.cold_misses += count;
            } else {
                self.stats.capacity_misses += count;
            }
        }
        self.policies[p].touched(key, self.stamp, self.now);
        outcome
    }

    /// Reserves room to load `key` (a demand load, or a prefetch). `protect` names keys that
    /// must not be evicted now (the experts of the layer now running); pinned keys never are.
    pub fn admit(
        &mut self,
        key: ExpertKey,
        prefetch: bool,
        protect: &dyn Fn(ExpertKey) -> bool,
        future: Option<&dyn NextUse>,
    ) -> Admit {
        if self.states.contains_key(&key) {
            return Admit::Present;
        }
        let p = self.partition(key);
        let mut evicted = None;
        if self.used[p] >= self.capacity[p] {
            let states = &self.states;
            let pinned = &self.pinned;
            let victim = self.policies[p].victim(self.now, &self.freq, future, |k| {
                matches!(states.get(&k), Some(State::Resident { .. })) && !pinned.contains(&k) && !protect(k)
            });
            let Some(victim) = victim else {
                return Admit::NoRoom;
            };
            self.evict(victim);
            evicted = Some(victim);
        }
        self.used[p] += 1;
        self.stamp += 1;
        self.states.insert(
            key,
            State::Loading {
                prefetch,
                wanted: !prefetch,
            },
        );
        self.policies[p].inserted(key, self.stamp, self.now);
        if prefetch {
            self.stats.prefetch_issued += 1;
        } else {
            self.stats.demand_loads += 1;
        }
        Admit::Load { evicted }
    }

    fn evict(&mut self, key: ExpertKey) {
        let p = self.partition(key);
        if let Some(State::Resident {
            unused_prefetch: true,
        }) = self.states.remove(&key)
        {
            self.stats.prefetch_wasted += 1;
        }
        self.policies[p].removed(key);
        self.used[p] -= 1;
        self.stats.evictions += 1;
    }

    /// The load of `key` finished: it is resident.
    pub fn loaded(&mut self, key: ExpertKey) {
        if let Some(s @ State::Loading { .. }) = self.states.get_mut(&key) {
            let State::Loading { prefetch, wanted } = *s else {
                unreachable!()
            };
            *s = State::Resident {
                unused_prefetch: prefetch && !wanted,
            };
        }
    }

    /// The load of `key` failed or was abandoned: it frees its room.
    pub fn load_failed(&mut self, key: ExpertKey) {
        if let Some(State::Loading { .. }) = self.states.get(&key) {
            self.states.remove(&key);
            let p = self.partition(key);
            self.policies[p].removed(key);
            self.used[p] -= 1;
        }
    }

    /// Drops a prefetch nobody has asked for yet; true if it was dropped.
    pub fn cancel(&mut self, key: ExpertKey) -> bool {
        if let Some(State::Loading {
            prefetch: true,
            wanted: false,
        }) = self.states.get(&key)
        {
            self.load_failed(key);
            self.stats.prefetch_wasted += 1;
            true
        } else {
            false
        }
    }

    /// Counts `n` activations that no expert served (skip-on-miss).
    pub fn count_fallbacks(&mut self, n: u64) {
        self.stats.fallbacks += n;
    }

    /// Capacity of the partition that holds `key`.
    pub fn capacity_of(&self, key: ExpertKey) -> usize {
        self.capacity[self.partition(key)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(layer: u32, expert: u32) -> ExpertKey {
        ExpertKey { layer, expert }
    }

    /// Runs a demand-only sequence of single activations through a cache; returns its stats.
    fn run(
        seq: &[ExpertKey],
        budget: Budget,
        policy: PolicyKind,
        future: Option<&dyn NextUse>,
    ) -> CacheStats {
        let layers: Vec<usize> = {
            let mut l: Vec<usize> = seq.iter().map(|k| k.layer as usize).collect();
            l.sort_unstable();
            l.dedup();
            l
        };
        let mut c = CacheCore::new(&layers, budget, policy, &[]);
        for &key in seq {
            if c.lookup(key, 1, Phase::Decode) == Lookup::Miss {
                match c.admit(key, false, &|_| false, future) {
                    Admit::Load { .. } => c.loaded(key),
                    other => panic!("{other:?}"),
                }
            }
            c.advance(1);
        }
        c.stats
    }

    /// A sequence with skew and reuse: a pseudo-random walk over 12 experts of one layer.
    fn sequence(n: usize, seed: u64) -> Vec<ExpertKey> {
        let mut rng = crate::sampling::Rng::new(seed);
        (0..n)
            .map(|_| {
                let r = rng.next_f32();
                k(0, (r * r * 12.0) as u32)
            })
            .collect()
    }

    struct Oracle(Vec<ExpertKey>);
    impl NextUse for Oracle {
        fn next_use(&self, key: ExpertKey, now: u64) -> u64 {
            self.0
                .iter()
                .enumerate()
                .skip(now as usize + 1)
                .find(|(_, k)| **k == key)
                .map_or(u64::MAX, |(i, _)| i as u64)
        }
    }

    #[test]
    fn lru_evicts_least_recent() {
        let s = [k(0, 1), k(0, 2), k(0, 1), k(0, 3), k(0, 1), k(0, 2)];
        // capacity 2: 1 2 | 1 hit | 3 evicts 2 | 1 hit | 2 evicts 3
        let st = run(&s, Budget::PerLayer(2), PolicyKind::Lru, None);
        assert_eq!(st.hits_decode, 2);
        assert_eq!(st.cold_misses, 3);
        assert_eq!(st.capacity_misses, 1);
        assert_eq!(st.evictions, 2);
    }

    #[test]
    fn lru_stack_property_larger_cache_never_fewer_hits() {
        for seed in 0..5 {
            let seq = sequence(2000, seed);
            let mut last = 0;
            for cap in 1..=12 {
                let hits = run(&seq, Budget::PerLayer(cap), PolicyKind::Lru, None).hits_decode;
                assert!(
                    hits >= last,
                    "seed {seed}: capacity {cap} has {hits} hits < {last}"
                );
                last = hits;
            }
            let distinct = seq.iter().collect::<std::collections::HashSet<_>>().len();
            assert_eq!(
                last as usize,
                seq.len() - distinct,
                "all experts fit: only cold misses"
            );
        }
    }

    #[test]
    fn belady_is_at_least_every_other_policy() {
        for seed in 0..5 {
            let seq = sequence(1500, seed + 100);
            let oracle = Oracle(seq.clone());
            for cap in [1, 2, 4, 7] {
                let b = run(&seq, Budget::PerLayer(cap), PolicyKind::Belady, Some(&oracle)).hits_decode;
                for p in [PolicyKind::Lru, PolicyKind::Lfu, PolicyKind::Lcp] {
                    let h = run(&seq, Budget::PerLayer(cap), p, None).hits_decode;
                    assert!(b >= h, "seed {seed} cap {cap}: belady {b} < {} {h}", p.name());
                }
            }
        }
    }

    #[test]
    fn lfu_keeps_the_frequent_expert() {
        // 1 is used often; 2, 3, 4 once each: LFU keeps 1, LRU would drop it after 3 and 4.
        let s = [k(0, 1), k(0, 1), k(0, 1), k(0, 2), k(0, 3), k(0, 4), k(0, 1)];
        assert_eq!(run(&s, Budget::PerLayer(2), PolicyKind::Lfu, None).hits_decode, 3);
        assert_eq!(run(&s, Budget::PerLayer(2), PolicyKind::Lru, None).hits_decode, 2);
    }

    #[test]
    fn lcp_frequency_decays_with_age() {
        // Expert 1 was popular long ago; expert 2 is used once recently. After 1000 tokens of
        // silence, 1's score (3 × 0.25^(~1000/128)) falls below 2's (1 × 0.25^0).
        let mut c = CacheCore::new(&[0], Budget::PerLayer(2), PolicyKind::Lcp, &[]);
        let touch = |c: &mut CacheCore, e| {
            if c.lookup(k(0, e), 1, Phase::Decode) == Lookup::Miss {
                let Admit::Load { evicted } = c.admit(k(0, e), false, &|_| false, None) else {
                    panic!()
                };
                c.loaded(k(0, e));
                return evicted;
            }
            None
        };
        for _ in 0..3 {
            touch(&mut c, 1);
        }
        c.advance(1000);
        touch(&mut c, 2);
        assert_eq!(touch(&mut c, 3), Some(k(0, 1)));
    }

    #[test]
    fn pinned_and_protected_experts_are_never_evicted() {
        let mut c = CacheCore::new(&[0], Budget::PerLayer(2), PolicyKind::Lru, &[k(0, 9)]);
        for e in [9, 1] {
            assert_eq!(c.lookup(k(0, e), 1, Phase::Decode), Lookup::Miss);
            c.admit(k(0, e), false, &|_| false, None);
            c.loaded(k(0, e));
        }
        // 9 is pinned and 1 is protected: no room.
        assert_eq!(c.admit(k(0, 2), false, &|x| x == k(0, 1), None), Admit::NoRoom);
        assert_eq!(
            c.admit(k(0, 2), false, &|_| false, None),
            Admit::Load {
                evicted: Some(k(0, 1))
            }
        );
        assert!(c.is_resident(k(0, 9)));
    }

    #[test]
    fn per_layer_budgets_are_separate_and_global_is_shared() {
        let seq = [k(0, 1), k(1, 1), k(0, 2), k(1, 2), k(0, 1), k(1, 1)];
        // One slot per layer: every access after the first two evicts within its own layer.
        let st = run(&seq, Budget::PerLayer(1), PolicyKind::Lru, None);
        assert_eq!(st.hits_decode, 0);
        // Four shared slots: everything fits.
        let st = run(&seq, Budget::Global(4), PolicyKind::Lru, None);
        assert_eq!(st.hits_decode, 2);
    }

    #[test]
    fn prefetch_accounting() {
        let mut c = CacheCore::new(&[0], Budget::PerLayer(2), PolicyKind::Lru, &[]);
        // Used in time: counts as used.
        assert_eq!(
            c.admit(k(0, 1), true, &|_| false, None),
            Admit::Load { evicted: None }
        );
        c.loaded(k(0, 1));
        assert_eq!(c.lookup(k(0, 1), 1, Phase::Decode), Lookup::Hit);
        // Late: still in flight when needed.
        c.admit(k(0, 2), true, &|_| false, None);
        assert_eq!(c.lookup(k(0, 2), 1, Phase::Decode), Lookup::InFlight);
        c.loaded(k(0, 2));
        // Wasted: evicted unused.
        c.admit(k(0, 3), true, &|_| false, None);
        c.loaded(k(0, 3));
        c.admit(k(0, 4), false, &|x| x != k(0, 3), None);
        let s = &c.stats;
        assert_eq!(
            (
                s.prefetch_issued,
                s.prefetch_used,
                s.prefetch_late,
                s.prefetch_wasted
            ),
            (3, 2, 1, 1)
        );
        assert_eq!(s.in_flight_activations, 1);
        assert_eq!(s.hits_decode, 1);
    }

    #[test]
    fn failed_load_frees_its_room() {
        let mut c = CacheCore::new(&[0], Budget::PerLayer(1), PolicyKind::Lru, &[]);
        c.lookup(k(0, 1), 1, Phase::Decode);
        c.admit(k(0, 1), false, &|_| false, None);
        c.load_failed(k(0, 1));
        assert!(!c.is_loading(k(0, 1)));
        assert_eq!(
            c.admit(k(0, 2), false, &|_| false, None),
            Admit::Load { evicted: None }
        );
    }
}
