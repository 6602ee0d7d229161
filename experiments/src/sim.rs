//! The trace-driven simulator: replays a trace's routing through the engine's cache state
//! machine ([`CacheCore`], the very code the live cache runs) under a modelled clock — compute
//! time per MoE layer, and an I/O model of `threads` readers of `bandwidth` and `latency` that
//! serve demand loads before prefetches.
//!
//! A layer pass makes the same cache calls in the same order as the live provider
//! (`engine/src/offload/provider.rs`): lookups of the pass's distinct experts in ascending id
//! order, their loads, then each expert in ascending order (waiting for it, or — past the
//! capacity — evicting one that is done, or one that was resident when the pass began), and
//! after a decode pass's layer the predictor's prefetches. So with sync misses the hits,
//! loads and evictions equal a live run's; only in-flight timing is modelled.

use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};

use serde::Serialize;
use shadowmoe_engine::observer::Phase;
use shadowmoe_engine::offload::cache::{Admit, Budget, CacheCore, CacheStats, Lookup};
use shadowmoe_engine::offload::policy::{NextUse, PolicyKind};
use shadowmoe_engine::offload::{ExpertKey, KeyMap, KeySet, MissMode};
use shadowmoe_trace::RequestRouting;

/// The I/O model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct IoModel {
    /// Bytes per second of one reader.
    pub gbps: f64,
    pub latency_us: f64,
    pub threads: usize,
    pub expert_bytes: u64,
}

impl IoModel {
    fn load_secs(&self) -> f64 {
        self.latency_us * 1e-6 + self.expert_bytes as f64 / (self.gbps * 1e9)
    }
}

/// What to predict for prefetching.
#[derive(Debug, Clone)]
pub enum SimPredictor {
    None,
    /// A fixed ranking per MoE-layer ordinal.
    Popularity(Vec<Vec<u16>>),
    PreviousToken,
    /// The truth at the target layer.
    Oracle,
    /// Predictions made elsewhere (gate-lookahead, shadow): `[request][token][layer ordinal]`
    /// → experts for the layer `depth` later.
    Precomputed(HashMap<(u32, u32, u16), Vec<u16>>),
}

/// One simulated configuration.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub budget: Budget,
    pub policy: PolicyKind,
    pub pinned: Vec<ExpertKey>,
    pub on_miss: MissMode,
    pub prefetch_depth: usize,
    pub prefetch_k: usize,
    pub predictor: SimPredictor,
    pub io: IoModel,
    /// Compute time of one MoE layer for one token, seconds: half of it before the router's
    /// decision (attention), half spread over the experts it runs.
    pub layer_secs: f64,
    /// Time of one predictor call (one layer's prediction), seconds, on the critical path after
    /// each decode layer that prefetches (0: not modelled).
    pub predictor_secs: f64,
}

/// What a simulation measured (the metric names of DESIGN.md).
#[derive(Debug, Clone, Default, Serialize)]
pub struct SimResult {
    pub stats: CacheStats,
    pub bytes_read: u64,
    pub stall_secs: f64,
    pub decode_secs: f64,
    /// Of `decode_secs`: waiting for loads, and predictor calls.
    pub decode_stall_secs: f64,
    pub decode_predictor_secs: f64,
    pub decode_tokens: u64,
    pub est_decode_tok_s: f64,
    pub total_secs: f64,
}

/// A load in the modelled I/O system.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Done(f64, ExpertKey);

impl Eq for Done {}
// BinaryHeap compares through PartialOrd: it must follow `cmp`, not the derived field order.
impl PartialOrd for Done {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Done {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Earliest completion first (reversed for the max-heap).
        other.0.total_cmp(&self.0).then(other.1.cmp(&self.1))
    }
}

struct Io {
    model: IoModel,
    free: Vec<f64>,
    demand: VecDeque<ExpertKey>,
    prefetch: VecDeque<ExpertKey>,
    running: BinaryHeap<Done>,
    bytes: u64,
}

impl Io {
    fn new(model: IoModel) -> Self {
        Self {
            model,
            free: vec![0.0; model.threads.max(1)],
            demand: VecDeque::new(),
            prefetch: VecDeque::new(),
            running: BinaryHeap::new(),
            bytes: 0,
        }
    }

    fn submit(&mut self, key: ExpertKey, demand: bool, now: f64) {
        if demand {
            self.demand.push_back(key);
        } else {
            self.prefetch.push_back(key);
        }
        self.start_queued(now);
    }

    /// Starts queued loads on readers free at `now` (demand first).
    fn start_queued(&mut self, now: f64) {
        for i in 0..self.free.len() {
            if self.free[i] > now {
                continue;
            }
            let Some(key) = self.demand.pop_front().or_else(|| self.prefetch.pop_front()) else {
                return;
            };
            let end = now + self.model.load_secs();
            self.free[i] = end;
            self.bytes += self.model.expert_bytes;
            self.running.push(Done(end, key));
        }
    }

    /// Completes every load done by `t`, in order, marking it loaded.
    fn advance_to(&mut self, t: f64, core: &mut CacheCore) {
        while let Some(&Done(end, key)) = self.running.peek() {
            if end > t {
                break;
            }
            self.running.pop();
            core.loaded(key);
            self.start_queued(end);
        }
    }

    /// Time the next running load completes.
    fn next_done(&self) -> Option<f64> {
        self.running.peek().map(|d| d.0)
    }
}

/// The future of every expert key, for Belady.
struct Future {
    uses: KeyMap<Vec<u64>>,
}

impl NextUse for Future {
    fn next_use(&self, key: ExpertKey, now: u64) -> u64 {
        // The use times are ascending: binary search for the first after `now`.
        self.uses
            .get(&key)
            .and_then(|v| v.get(v.partition_point(|&t| t <= now)).copied())
            .unwrap_or(u64::MAX)
    }
}

/// The passes of the trace: (request index, tokens of the pass, phase).
fn passes(reqs: &[RequestRouting]) -> Vec<(usize, Vec<usize>, Phase)> {
    let mut out = Vec::new();
    for (ri, r) in reqs.iter().enumerate() {
        let prefill: Vec<usize> = (0..r.tokens()).filter(|&t| r.phases[t] == 0).collect();
        if !prefill.is_empty() {
            out.push((ri, prefill, Phase::Prefill));
        }
        for t in (0..r.tokens()).filter(|&t| r.phases[t] == 1) {
            out.push((ri, vec![t], Phase::Decode));
        }
    }
    out
}

/// Simulates `cfg` over requests `reqs` (in order; the cache persists across them) of a trace
/// whose MoE layers are `moe_layers`.
pub fn simulate(reqs: &[RequestRouting], moe_layers: &[usize], cfg: &SimConfig) -> Result<SimResult, String> {
    let passes = passes(reqs);
    // Token time of each pass: the cache core's clock after it advances at the first layer.
    let mut times = Vec::with_capacity(passes.len());
    let mut clock_tokens = 0u64;
    for (_, toks, _) in &passes {
        clock_tokens += toks.len() as u64;
        times.push(clock_tokens);
    }
    let future = (cfg.policy == PolicyKind::Belady).then(|| {
        let mut uses: KeyMap<Vec<u64>> = KeyMap::default();
        for ((ri, toks, _), &time) in passes.iter().zip(&times) {
            let r = &reqs[*ri];
            for (li, &layer) in moe_layers.iter().enumerate() {
                for &t in toks {
                    for &e in r.experts_at(t, li) {
                        let v = uses.entry(ExpertKey::new(layer, e as u32)).or_default();
                        if v.last() != Some(&time) {
                            v.push(time);
                        }
                    }
                }
            }
        }
        Future { uses }
    });
    let future_ref: Option<&dyn NextUse> = future.as_ref().map(|f| f as &dyn NextUse);

    let mut core = CacheCore::new(moe_layers, cfg.budget, cfg.policy, &cfg.pinned);
    let mut io = Io::new(cfg.io);
    let mut now = 0.0f64;
    // Pins load before the run; its counters start after them.
    for &k in &cfg.pinned {
        if let Admit::Load { .. } = core.admit(k, false, &|_| false, future_ref) {
            core.loaded(k);
        }
    }
    core.stats = CacheStats::default();
    let mut res = SimResult::default();
    let mut last_seen: HashMap<usize, Vec<u16>> = HashMap::new();

    for ((ri, toks, phase), _) in passes.iter().zip(&times) {
        let r = &reqs[*ri];
        let pass_start = now;
        for (li, &layer) in moe_layers.iter().enumerate() {
            // Half of a layer's compute (attention, router) comes before its experts are
            // needed; loads in flight overlap it.
            now += cfg.layer_secs * toks.len() as f64 / 2.0;
            io.advance_to(now, &mut core);
            if li == 0 {
                core.advance(toks.len() as u64);
            }
            let mut counts: BTreeMap<u16, u64> = BTreeMap::new();
            for &t in toks {
                for &e in r.experts_at(t, li) {
                    *counts.entry(e).or_insert(0) += 1;
                }
            }
            let mut pending: KeySet = counts.keys().map(|&e| ExpertKey::new(layer, e as u32)).collect();
            let mut loaded_this_pass: KeySet = KeySet::default();
            let mut missing = Vec::new();
            for (&e, &c) in &counts {
                let key = ExpertKey::new(layer, e as u32);
                if core.lookup(key, c, *phase) != Lookup::Hit {
                    missing.push(key);
                }
            }
            // Admits `key`, evicting only experts `protect` lets go, and queues its read; says
            // whether a load was issued. Demand loads first protect every expert this layer still
            // needs, then (if nothing else is evictable) only those loaded for it in this pass.
            let issue = |core: &mut CacheCore,
                         io: &mut Io,
                         key,
                         prefetch: bool,
                         protect: &dyn Fn(ExpertKey) -> bool,
                         now: f64| {
                let load = matches!(core.admit(key, prefetch, protect, future_ref), Admit::Load { .. });
                if load {
                    io.submit(key, !prefetch, now);
                }
                load
            };
            for &key in &missing {
                if !core.is_loading(key)
                    && issue(&mut core, &mut io, key, false, &|k| pending.contains(&k), now)
                {
                    loaded_this_pass.insert(key);
                }
            }
            let serve: Vec<ExpertKey> = match cfg.on_miss {
                MissMode::Sync => counts.keys().map(|&e| ExpertKey::new(layer, e as u32)).collect(),
                MissMode::Skip => {
                    let gone: KeySet = missing.iter().copied().collect();
                    let dropped: u64 = missing.iter().map(|k| counts[&(k.expert as u16)]).sum();
                    core.count_fallbacks(dropped);
                    pending.retain(|k| !gone.contains(k));
                    counts
                        .keys()
                        .map(|&e| ExpertKey::new(layer, e as u32))
                        .filter(|k| !gone.contains(k))
                        .collect()
                }
            };
            let per_expert = cfg.layer_secs * toks.len() as f64 / 2.0 / serve.len().max(1) as f64;
            for key in serve {
                loop {
                    io.advance_to(now, &mut core);
                    if core.is_resident(key) {
                        break;
                    }
                    if !core.is_loading(key)
                        && (issue(&mut core, &mut io, key, false, &|k| pending.contains(&k), now)
                            || issue(
                                &mut core,
                                &mut io,
                                key,
                                false,
                                &|k| pending.contains(&k) && loaded_this_pass.contains(&k),
                                now,
                            ))
                    {
                        loaded_this_pass.insert(key);
                        continue;
                    }
                    let Some(t) = io.next_done() else {
                        return Err(format!(
                            "no room to load {key}: every slot holds a pinned or in-use expert"
                        ));
                    };
                    res.stall_secs += (t - now).max(0.0);
                    if *phase == Phase::Decode {
                        res.decode_stall_secs += (t - now).max(0.0);
                    }
                    now = now.max(t);
                }
                pending.remove(&key);
                now += per_expert;
            }
            // The predictor sees every pass; it prefetches after the layers of decode passes.
            let last_t = *toks.last().expect("a pass has tokens");
            last_seen.insert(li, r.experts_at(last_t, li).to_vec());
            if *phase == Phase::Decode && cfg.prefetch_depth > 0 && li + cfg.prefetch_depth < moe_layers.len()
            {
                let tl = li + cfg.prefetch_depth;
                let target = moe_layers[tl];
                if !matches!(cfg.predictor, SimPredictor::None) {
                    now += cfg.predictor_secs;
                    res.decode_predictor_secs += cfg.predictor_secs;
                }
                let k = cfg.prefetch_k;
                let predicted: Vec<u16> = match &cfg.predictor {
                    SimPredictor::None => Vec::new(),
                    SimPredictor::Popularity(ranked) => ranked[tl].iter().copied().take(k).collect(),
                    SimPredictor::PreviousToken => last_seen
                        .get(&tl)
                        .map(|v| v.iter().copied().take(k).collect())
                        .unwrap_or_default(),
                    SimPredictor::Oracle => r.experts_at(last_t, tl).iter().copied().take(k).collect(),
                    SimPredictor::Precomputed(map) => map
                        .get(&(r.request, last_t as u32, li as u16))
                        .map(|v| v.iter().copied().take(k).collect())
                        .unwrap_or_default(),
                };
                for e in predicted {
                    issue(
                        &mut core,
                        &mut io,
                        ExpertKey::new(target, e as u32),
                        true,
                        &|_| false,
                        now,
                    );
                }
            }
        }
        if *phase == Phase::Decode {
            res.decode_secs += now - pass_start;
            res.decode_tokens += 1;
        }
    }
    res.stats = core.stats.clone();
    res.bytes_read = io.bytes;
    res.total_secs = now;
    res.est_decode_tok_s = res.decode_tokens as f64 / res.decode_secs.max(f64::MIN_POSITIVE);
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_complete_earliest_first() {
        let model = IoModel {
            gbps: 1.0,
            latency_us: 0.0,
            threads: 3,
            expert_bytes: 1_000_000, // 1 ms per load
        };
        let mut io = Io::new(model);
        let key = |e| ExpertKey { layer: 0, expert: e };
        // Three readers start at 0, 0.4 ms and 0.2 ms: they finish in that order of start.
        io.submit(key(0), true, 0.0);
        io.submit(key(1), true, 0.0004);
        io.submit(key(2), false, 0.0002);
        let mut order = Vec::new();
        while let Some(Done(end, k)) = io.running.pop() {
            order.push((k.expert, (end * 1e4).round() as u64));
        }
        assert_eq!(order, vec![(0, 10), (2, 12), (1, 14)]);
        assert_eq!(io.next_done(), None);
    }
}
