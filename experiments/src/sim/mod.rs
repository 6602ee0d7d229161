//! The trace-driven simulator: replays a trace's routing through the engine's cache state
//! machine ([`CacheCore`]) and the engine's layer-pass driver (`offload::driver`, the very code
//! the live provider runs), under a modelled clock: compute time per MoE layer, a disk whose
//! bandwidth the readers share, and a predictor that runs inline or beside the forward pass.
//!
//! - The disk (`disk.rs`): up to `threads` reads at once; each waits `latency_us`, then its bytes flow at
//!   an equal share of the aggregate bandwidth for the number of reads transferring
//!   (`gbps_by_depth`, measured by `bench-sweep calibrate`; the older model of independent
//!   readers is the special case `q · gbps`). Demand reads start before queued prefetches.
//! - The predictor: `inline`, its time is spent on the critical path after each decode layer;
//!   `async`, it is handed each decode layer as it routes, works one call at a time, skips to
//!   the newest layer when it falls behind, and its answers prefetch when they arrive — or are
//!   dropped as late when their target layer has already routed (as `engine/src/prefetcher.rs`).
//!
//! With the same events the simulator and a live run make the same cache decisions; with
//! `settle_loads` (every load in flight lands before a layer looks up its experts) and an
//! inline predictor the event order itself is the same, and so are the counts (tested).

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::Serialize;
use shadowmoe_engine::observer::Phase;
use shadowmoe_engine::offload::cache::{Admit, Budget, CacheCore, CacheStats};
use shadowmoe_engine::offload::driver::{self, Loader};
use shadowmoe_engine::offload::metrics::DiskActivity;
use shadowmoe_engine::offload::policy::{NextUse, PolicyKind};
use shadowmoe_engine::offload::{ExpertKey, KeyMap, KeySet, MissMode};
use shadowmoe_engine::predict::{PredictStats, PredictorTiming, PrefetchSpan, prefetch_targets};
use shadowmoe_trace::RequestRouting;

mod disk;
use disk::Io;
pub use disk::IoModel;

/// What to predict for prefetching.
#[derive(Debug, Clone)]
pub enum SimPredictor {
    None,
    /// A fixed ranking per MoE-layer ordinal.
    Popularity(Vec<Vec<u16>>),
    PreviousToken,
    /// The truth at the target layer (of the next token, across tokens).
    Oracle,
    /// Predictions made elsewhere (gate-lookahead, shadow): `(request, token, source ordinal,
    /// target ordinal)` → experts; a target ordinal at or below the source is the next token's.
    Precomputed(HashMap<(u32, u32, u16, u16), Vec<u16>>),
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
    pub prefetch_span: PrefetchSpan,
    pub predictor: SimPredictor,
    pub timing: PredictorTiming,
    pub io: IoModel,
    /// Compute time of one MoE layer for one token, seconds: half of it before the router's
    /// decision (attention), half spread over the experts it runs.
    pub layer_secs: f64,
    /// Time of one predictor call (all of a layer's targets at once), seconds (0: free).
    pub predictor_secs: f64,
    /// Every load in flight lands before a layer looks up its experts.
    pub settle_loads: bool,
    /// Threads the engine computes with (those `layer_secs` was measured with). Above 1, a
    /// layer's experts compute while the forward thread waits for the next one's load, as the
    /// engine runs them (one pool task per expert, fetched in ascending order): their compute
    /// is a queue that overlaps the loads. 1: load, compute, load, compute.
    pub compute_threads: usize,
}

/// What a simulation measured (the metric names of DESIGN.md).
#[derive(Debug, Clone, Default, Serialize)]
pub struct SimResult {
    pub stats: CacheStats,
    pub predict: PredictStats,
    pub bytes_read: u64,
    /// Bytes read while decode passes ran.
    pub decode_bytes: u64,
    pub stall_secs: f64,
    pub decode_secs: f64,
    /// Of `decode_secs`: waiting for loads, and predictor calls on the critical path.
    pub decode_stall_secs: f64,
    pub decode_predictor_secs: f64,
    pub decode_tokens: u64,
    pub est_decode_tok_s: f64,
    pub total_secs: f64,
    /// The modelled disk during decode: mean reads in flight while busy, aggregate GB/s.
    pub decode_reads_in_flight: Option<f64>,
    pub decode_disk_gbps: Option<f64>,
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

/// One decode layer handed to the predictor.
#[derive(Debug, Clone, Copy)]
struct Job {
    pass: u64,
    li: usize,
    request: usize,
    token: usize,
}

/// Predictions ready at a time: (position, MoE layer ordinal, experts).
type Answer = Vec<(u64, usize, Vec<u16>)>;

/// The predictor beside the forward pass (async timing).
#[derive(Debug, Default)]
struct PredictorModel {
    free_at: f64,
    waiting: Option<Job>,
    answers: VecDeque<(f64, Answer)>,
}

/// The modelled disk, clock and predictor as the pass driver's [`Loader`].
struct SimLoader<'a> {
    io: Io,
    now: f64,
    stall: f64,
    decode_stall: f64,
    future: Option<&'a dyn NextUse>,
    /// The experts of the layer pass running or just run (prefetches may not evict them).
    pass_all: KeySet,
    /// The forward pass's position (the last MoE layer that routed).
    position: u64,
    pred: PredictorModel,
    pstats: PredictStats,
    /// What was prefetched for each target position, until it routes.
    issued: HashMap<u64, Vec<u16>>,
    layers: &'a [usize],
}

impl SimLoader<'_> {
    /// The next time the predictor does something: an answer lands, or a waiting job starts.
    fn next_pred_event(&self) -> Option<f64> {
        match self.pred.answers.front() {
            Some(&(t, _)) => Some(t),
            None => self.pred.waiting.map(|_| self.pred.free_at),
        }
    }

    /// Applies everything that happens on the disk and in the predictor up to `t`, in order.
    fn advance(&mut self, t: f64, core: &mut CacheCore, ctx: &mut PredictCtx<'_>) -> Result<(), String> {
        while let Some(p) = self.next_pred_event()
            && p <= t
        {
            self.io.advance_to(p, core);
            self.pred_event(p, core, ctx)?;
        }
        self.io.advance_to(t, core);
        Ok(())
    }

    fn pred_event(&mut self, p: f64, core: &mut CacheCore, ctx: &mut PredictCtx<'_>) -> Result<(), String> {
        if let Some(&(t, _)) = self.pred.answers.front()
            && t <= p
        {
            let (_, answer) = self.pred.answers.pop_front().expect("front");
            self.land(answer, core)?;
            return Ok(());
        }
        if let Some(job) = self.pred.waiting.take() {
            self.start_job(job, p, ctx);
        }
        Ok(())
    }

    /// The predictor starts on `job` at time `at` (async).
    fn start_job(&mut self, job: Job, at: f64, ctx: &mut PredictCtx<'_>) {
        let answer = ctx.predict(&job);
        self.pstats.calls += 1;
        self.pstats.predictor_secs += ctx.cfg.predictor_secs;
        let done = at + ctx.cfg.predictor_secs;
        self.pred.free_at = done;
        self.pred.answers.push_back((done, answer));
    }

    /// A decode layer routed at `now`: hand it to the async predictor.
    fn submit_job(&mut self, job: Job, ctx: &mut PredictCtx<'_>) {
        if self.pred.free_at <= self.now && self.pred.answers.is_empty() && self.pred.waiting.is_none() {
            self.start_job(job, self.now, ctx);
        } else if self.pred.waiting.replace(job).is_some() {
            self.pstats.skipped += 1;
        }
    }

    /// Predictions arrive: late ones are dropped, the rest prefetched (replacing what an older
    /// answer for the same target named and no reader has taken).
    fn land(&mut self, answer: Answer, core: &mut CacheCore) -> Result<(), String> {
        let protect = std::mem::take(&mut self.pass_all);
        for (pos, ord, experts) in answer {
            self.pstats.predictions += 1;
            if self.position >= pos {
                self.pstats.late += 1;
                continue;
            }
            let layer = self.layers[ord];
            if let Some(old) = self.issued.insert(pos, experts.clone()) {
                for e in old.iter().filter(|e| !experts.contains(e)) {
                    let key = ExpertKey::new(layer, u32::from(*e));
                    if core.cancel(key) {
                        self.io.cancel(key);
                        self.pstats.cancelled += 1;
                    }
                }
            }
            for e in experts {
                let key = ExpertKey::new(layer, u32::from(e));
                if driver::issue(core, self, None, Some(&protect), key, true).map_err(|e| e.to_string())? {
                    self.pstats.issued += 1;
                }
            }
        }
        let now = self.position;
        self.issued.retain(|&p, _| p > now);
        self.pass_all = protect;
        Ok(())
    }
}

/// What the loader's predictor events need but the driver cannot pass through: the
/// configuration and the routing.
struct PredictCtx<'a> {
    cfg: &'a SimConfig,
    reqs: &'a [RequestRouting],
    /// The latest routing seen at each MoE layer ordinal (previous-token).
    last_seen: Vec<Vec<u16>>,
    n: usize,
}

impl PredictCtx<'_> {
    /// The predictions of `job` for its span's targets.
    fn predict(&self, job: &Job) -> Answer {
        let cfg = self.cfg;
        let r = &self.reqs[job.request];
        let k = cfg.prefetch_k;
        prefetch_targets(job.li, self.n, cfg.prefetch_depth, cfg.prefetch_span)
            .into_iter()
            .map(|(ord, ahead)| {
                let experts: Vec<u16> = match &cfg.predictor {
                    SimPredictor::None => Vec::new(),
                    SimPredictor::Popularity(ranked) => ranked[ord].iter().copied().take(k).collect(),
                    SimPredictor::PreviousToken => self.last_seen[ord].iter().copied().take(k).collect(),
                    SimPredictor::Oracle => {
                        let t = job.token + ahead;
                        if t < r.tokens() {
                            r.experts_at(t, ord).iter().copied().take(k).collect()
                        } else {
                            Vec::new()
                        }
                    }
                    SimPredictor::Precomputed(map) => map
                        .get(&(r.request, job.token as u32, job.li as u16, ord as u16))
                        .map(|v| v.iter().copied().take(k).collect())
                        .unwrap_or_default(),
                };
                (
                    (job.pass + ahead as u64) * self.n as u64 + ord as u64,
                    ord,
                    experts,
                )
            })
            .collect()
    }
}

/// [`Loader`] needs the predictor context in `poll`/`wait_one`; it travels in a cell beside.
struct Driven<'a, 'b> {
    l: &'b mut SimLoader<'a>,
    ctx: &'b mut PredictCtx<'a>,
    error: Option<String>,
}

impl Loader for Driven<'_, '_> {
    fn start(
        &mut self,
        key: ExpertKey,
        prefetch: bool,
        _evicted: Option<ExpertKey>,
    ) -> shadowmoe_engine::Result<()> {
        self.l.start(key, prefetch, None)
    }

    fn poll(&mut self, core: &mut CacheCore) {
        let now = self.l.now;
        if let Err(e) = self.l.advance(now, core, self.ctx) {
            self.error.get_or_insert(e);
        }
    }

    fn wait_one(&mut self, core: &mut CacheCore) -> shadowmoe_engine::Result<bool> {
        loop {
            let Some(t) = self.l.io.peek_done() else {
                return Ok(false);
            };
            if let Some(p) = self.l.next_pred_event()
                && p < t
            {
                self.l.io.advance_to(p, core);
                if let Err(e) = self.l.pred_event(p, core, self.ctx) {
                    self.error.get_or_insert(e);
                }
                continue;
            }
            let waited = (t - self.l.now).max(0.0);
            self.l.stall += waited;
            if self.l.io.decoding {
                self.l.decode_stall += waited;
            }
            self.l.now = self.l.now.max(t);
            self.l.io.advance_to(t, core);
            return Ok(true);
        }
    }

    fn future(&self) -> Option<&dyn NextUse> {
        self.l.future
    }
}

impl Loader for SimLoader<'_> {
    fn start(
        &mut self,
        key: ExpertKey,
        prefetch: bool,
        _evicted: Option<ExpertKey>,
    ) -> shadowmoe_engine::Result<()> {
        self.io.submit(key, !prefetch);
        Ok(())
    }

    fn poll(&mut self, _core: &mut CacheCore) {}

    fn wait_one(&mut self, _core: &mut CacheCore) -> shadowmoe_engine::Result<bool> {
        Ok(false)
    }

    fn future(&self) -> Option<&dyn NextUse> {
        self.future
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

fn belady_future(
    reqs: &[RequestRouting],
    moe_layers: &[usize],
    passes: &[(usize, Vec<usize>, Phase)],
) -> Future {
    let mut uses: KeyMap<Vec<u64>> = KeyMap::default();
    let mut time = 0u64;
    for (ri, toks, _) in passes {
        time += toks.len() as u64;
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
}

/// Simulates `cfg` over requests `reqs` (in order; the cache persists across them) of a trace
/// whose MoE layers are `moe_layers`.
pub fn simulate(reqs: &[RequestRouting], moe_layers: &[usize], cfg: &SimConfig) -> Result<SimResult, String> {
    let passes = passes(reqs);
    let future = (cfg.policy == PolicyKind::Belady).then(|| belady_future(reqs, moe_layers, &passes));
    let n = moe_layers.len();
    let mut core = CacheCore::new(moe_layers, cfg.budget, cfg.policy, &cfg.pinned);
    // Pins load before the run; its counters start after them.
    for &k in &cfg.pinned {
        let fut = future.as_ref().map(|f| f as &dyn NextUse);
        if let Admit::Load { .. } = core.admit(k, false, &|_| false, fut) {
            core.loaded(k);
        }
    }
    core.stats = CacheStats::default();
    let mut l = SimLoader {
        io: Io::new(cfg.io.clone()),
        now: 0.0,
        stall: 0.0,
        decode_stall: 0.0,
        future: future.as_ref().map(|f| f as &dyn NextUse),
        pass_all: KeySet::default(),
        position: 0,
        pred: PredictorModel::default(),
        pstats: PredictStats::default(),
        issued: HashMap::new(),
        layers: moe_layers,
    };
    let mut ctx = PredictCtx {
        cfg,
        reqs,
        last_seen: vec![Vec::new(); n],
        n,
    };
    let prefetching = cfg.prefetch_depth > 0 && !matches!(cfg.predictor, SimPredictor::None);
    let mut res = SimResult::default();
    let err = |e: shadowmoe_engine::EngineError| e.to_string();

    for (pass_no, (ri, toks, phase)) in passes.iter().enumerate() {
        let r = &reqs[*ri];
        let pass_start = l.now;
        let bytes_start = l.io.bytes;
        l.io.decoding = *phase == Phase::Decode;
        let last_t = *toks.last().expect("a pass has tokens");
        for (li, &layer) in moe_layers.iter().enumerate() {
            // Half of a layer's compute (attention, router) comes before its experts are
            // needed; loads in flight overlap it.
            l.now += cfg.layer_secs * toks.len() as f64 / 2.0;
            l.advance(l.now, &mut core, &mut ctx)?;
            l.position = pass_no as u64 * n as u64 + li as u64;
            ctx.last_seen[li] = r.experts_at(last_t, li).to_vec();
            if prefetching && cfg.timing == PredictorTiming::Async && *phase == Phase::Decode {
                let job = Job {
                    pass: pass_no as u64,
                    li,
                    request: *ri,
                    token: last_t,
                };
                l.submit_job(job, &mut ctx);
            }
            let mut counts: BTreeMap<u32, u64> = BTreeMap::new();
            for &t in toks {
                for &e in r.experts_at(t, li) {
                    *counts.entry(u32::from(e)).or_insert(0) += 1;
                }
            }
            let advance = (li == 0).then_some(toks.len() as u64);
            let mut pass = {
                let mut d = Driven {
                    l: &mut l,
                    ctx: &mut ctx,
                    error: None,
                };
                let p = driver::begin_pass(
                    &mut core,
                    &mut d,
                    layer,
                    *phase,
                    &counts,
                    advance,
                    cfg.settle_loads,
                )
                .map_err(err)?;
                if let Some(e) = d.error {
                    return Err(e);
                }
                p
            };
            l.pass_all = pass.all.clone();
            let gone: KeySet = match cfg.on_miss {
                MissMode::Sync => KeySet::default(),
                MissMode::Skip => driver::skip_missing(&mut core, &mut pass, &counts)
                    .into_iter()
                    .collect(),
            };
            let serve: Vec<ExpertKey> = counts
                .keys()
                .map(|&e| ExpertKey::new(layer, e))
                .filter(|k| !gone.contains(k))
                .collect();
            let per_expert = cfg.layer_secs * toks.len() as f64 / 2.0 / serve.len().max(1) as f64;
            // When the expert compute queue is free (overlapping the loads with > 1 thread).
            let mut compute_free = l.now;
            for key in serve {
                let mut d = Driven {
                    l: &mut l,
                    ctx: &mut ctx,
                    error: None,
                };
                driver::serve(&mut core, &mut d, &mut pass, key).map_err(err)?;
                if let Some(e) = d.error {
                    return Err(e);
                }
                compute_free = l.now.max(compute_free) + per_expert;
                if cfg.compute_threads <= 1 {
                    l.now = compute_free;
                }
            }
            l.now = l.now.max(compute_free);
            // Inline: the predictor runs now, on the critical path, and prefetches at once.
            if prefetching && cfg.timing == PredictorTiming::Inline && *phase == Phase::Decode {
                let job = Job {
                    pass: pass_no as u64,
                    li,
                    request: *ri,
                    token: last_t,
                };
                let answer = ctx.predict(&job);
                if !answer.is_empty() {
                    l.now += cfg.predictor_secs;
                    res.decode_predictor_secs += cfg.predictor_secs;
                    l.pstats.calls += 1;
                    l.pstats.predictor_secs += cfg.predictor_secs;
                    l.pstats.forward_secs += cfg.predictor_secs;
                    l.pstats.forward_decode_secs += cfg.predictor_secs;
                    l.advance(l.now, &mut core, &mut ctx)?;
                    l.land(answer, &mut core)?;
                }
            }
        }
        if *phase == Phase::Decode {
            res.decode_secs += l.now - pass_start;
            res.decode_bytes += l.io.bytes - bytes_start;
            res.decode_tokens += 1;
        }
    }
    // Reads still queued or in flight after the last pass run to the end, as the live cache's
    // `wait_idle` lets them before its counters are read (the clock stays at the last pass).
    while let Some(t) = l.io.peek_done() {
        l.io.advance_to(t, &mut core);
    }
    res.stats = core.stats.clone();
    res.predict = l.pstats.clone();
    res.bytes_read = l.io.bytes;
    res.stall_secs = l.stall;
    res.decode_stall_secs = l.decode_stall;
    res.total_secs = l.now;
    res.est_decode_tok_s = res.decode_tokens as f64 / res.decode_secs.max(f64::MIN_POSITIVE);
    let disk = DiskActivity::of(&l.io.spans, |s| s.decode);
    res.decode_reads_in_flight = disk.in_flight();
    res.decode_disk_gbps = disk.gbps(disk.reads as u64 * cfg.io.expert_bytes);
    Ok(res)
}
