//! Experts off the heap, end to end on the real fixtures: the bounded cache reading through the
//! real store (pread, O_DIRECT, mmap; safetensors or expert pack) gives exactly the tokens and
//! logits of the all-resident run; packs are checked; faults stop the run cleanly.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{Golden, fixture_dir};
use shadowmoe_engine::offload::store::FaultPlan;
use shadowmoe_engine::offload::{
    Budget, CacheOptions, ExpertKey, ExpertStore, IoMode, MissMode, PolicyKind, pack,
};
use shadowmoe_engine::{
    Checkpoint, GenerateOptions, LogitsFor, Model, NoObserver, Phase, SamplingParams, generate,
};

const ARCHS: [&str; 11] = [
    "qwen3_moe",
    "olmoe",
    "mixtral",
    "qwen2_moe",
    "qwen3_next",
    "deepseek_v3",
    "deepseek_v3_noqlora",
    "glm4_moe",
    "glm4_moe_lite",
    "gpt_oss",
    "gpt_oss_mxfp4",
];

fn opts(budget: Budget) -> CacheOptions {
    CacheOptions {
        budget,
        policy: PolicyKind::Lru,
        on_miss: MissMode::Sync,
        io_threads: 2,
        pinned: vec![],
        settle_loads: false,
        prefetch_readers: 0,
    }
}

/// Prompt logits (all positions) and 12 greedy tokens.
fn run(model: &Model, prompt: &[u32]) -> (Vec<f32>, Vec<u32>) {
    let mut cache = model.new_cache();
    let logits = model
        .forward(
            prompt,
            &mut cache,
            Phase::Prefill,
            LogitsFor::All,
            &mut NoObserver,
        )
        .unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 12,
        sampling: SamplingParams::default(),
        eos_token_ids: vec![],
    };
    let (tokens, _) = generate(model, prompt, &opts, &mut NoObserver, |_| Ok(())).unwrap();
    (logits.into_raw_vec_and_offset().0, tokens)
}

fn reference(arch: &str) -> (Checkpoint, Vec<u32>, (Vec<f32>, Vec<u32>)) {
    let dir = fixture_dir(arch);
    let golden = Golden::read(&dir);
    let ckpt = Checkpoint::open_dir(&dir).unwrap();
    let all = run(&ckpt.load_model().unwrap(), &golden.prompt_ids);
    (ckpt, golden.prompt_ids, all)
}

#[test]
fn sync_cache_is_exact_on_every_architecture_and_read_mode() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in ARCHS {
        let (ckpt, prompt, all) = reference(arch);
        let pack_dir = tmp.path().join(format!("{arch}.pack"));
        pack::write_pack(&ckpt.dir, &ckpt.config, &ckpt.weights, &pack_dir, |_, _| {}).unwrap();
        let k = ckpt.config.num_experts_per_tok;
        for (io, pack) in [
            (IoMode::Pread, None),
            (IoMode::Direct, Some(pack_dir.as_path())),
            (IoMode::Mmap, None),
            (IoMode::Pread, Some(pack_dir.as_path())),
        ] {
            // Capacity of top-k per layer: a token always fits, the prompt never does.
            for budget in [Budget::PerLayer(k), Budget::Global(k + 1)] {
                let store = Arc::new(ckpt.expert_store(io, pack, false).unwrap());
                let (model, cached) = ckpt.load_model_cached(store, &opts(budget)).unwrap();
                let got = run(&model, &prompt);
                let what = format!("{arch} {io:?} pack={} {budget:?}", pack.is_some());
                assert_eq!(got.1, all.1, "{what}: greedy tokens");
                assert!(got.0 == all.0, "{what}: logits are not identical");
                let (stats, iost) = cached.stats();
                assert!(stats.capacity_misses > 0, "{what}: the cache never evicted");
                assert_eq!(
                    stats.hits_prefill + stats.hits_decode + stats.misses(),
                    stats.activations(),
                    "{what}"
                );
                assert_eq!(
                    iost.bytes_read,
                    stats.demand_loads * cached.store().expert_bytes(),
                    "{what}"
                );
                assert!(cached.allocated_slots() <= cached.total_slots(), "{what}");
            }
        }
    }
}

#[test]
fn experts_fit_entirely_only_cold_misses() {
    let (ckpt, prompt, all) = reference("qwen2_moe");
    let store = Arc::new(ckpt.expert_store(IoMode::Pread, None, false).unwrap());
    let (model, cached) = ckpt
        .load_model_cached(store, &opts(Budget::PerLayer(ckpt.config.num_experts)))
        .unwrap();
    assert_eq!(run(&model, &prompt).1, all.1);
    let (s, _) = cached.stats();
    assert_eq!(s.capacity_misses, 0);
    assert_eq!(s.evictions, 0);
    // Every expert loads exactly once over both runs of `run` (prefill + generate share it).
    assert!(s.demand_loads as usize <= ckpt.config.num_experts * ckpt.config.moe_layers().len());
}

#[test]
fn pinned_experts_stay_resident() {
    let (ckpt, prompt, all) = reference("olmoe");
    let layers = ckpt.config.moe_layers();
    let pinned: Vec<ExpertKey> = layers.iter().map(|&l| ExpertKey::new(l, 3)).collect();
    let store = Arc::new(ckpt.expert_store(IoMode::Pread, None, false).unwrap());
    let o = CacheOptions {
        pinned: pinned.clone(),
        ..opts(Budget::PerLayer(3))
    };
    let (model, cached) = ckpt.load_model_cached(store, &o).unwrap();
    assert!(cached.pinned_bytes() > 0);
    assert_eq!(run(&model, &prompt).1, all.1);
    let (s, _) = cached.stats();
    assert!(s.evictions > 0);
    // Pinning as many experts as the capacity leaves no room: refused.
    let store = Arc::new(ckpt.expert_store(IoMode::Pread, None, false).unwrap());
    let all_pins: Vec<ExpertKey> = (0..3).map(|e| ExpertKey::new(layers[0], e)).collect();
    let err = ckpt
        .load_model_cached(
            store,
            &CacheOptions {
                pinned: all_pins,
                ..opts(Budget::PerLayer(3))
            },
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("--pin") && err.contains("K < capacity"), "{err}");
}

#[test]
fn skip_mode_drops_missing_experts_and_counts_fallbacks() {
    let (ckpt, prompt, all) = reference("mixtral");
    let store = Arc::new(ckpt.expert_store(IoMode::Pread, None, false).unwrap());
    let o = CacheOptions {
        on_miss: MissMode::Skip,
        ..opts(Budget::PerLayer(2))
    };
    let (model, cached) = ckpt.load_model_cached(store, &o).unwrap();
    let got = run(&model, &prompt);
    let (s, _) = cached.stats();
    assert!(s.fallbacks > 0, "nothing was skipped");
    assert!(s.fallback_rate().unwrap() > 0.0 && s.fallback_rate().unwrap() <= 1.0);
    // The first prefill finds nothing resident: the first token's logits differ from exact.
    assert!(got.0 != all.0);
}

/// Direct reads on tmpfs: older kernels refuse O_DIRECT there (the store then reads with pread
/// and says so), newer ones accept it. Either way the run is exact and reports the mode used.
#[test]
fn direct_io_on_tmpfs_is_exact_and_reports_the_mode_used() {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("no /dev/shm on this machine: tmpfs not exercised");
        return;
    }
    let (ckpt, prompt, all) = reference("qwen3_moe");
    let tmp = tempfile::tempdir_in(shm).unwrap();
    let pack_dir = tmp.path().join("pack");
    pack::write_pack(&ckpt.dir, &ckpt.config, &ckpt.weights, &pack_dir, |_, _| {}).unwrap();
    let store = ckpt.expert_store(IoMode::Direct, Some(&pack_dir), false).unwrap();
    assert!(matches!(store.mode(), IoMode::Direct | IoMode::Pread));
    let (model, _) = ckpt
        .load_model_cached(Arc::new(store), &opts(Budget::PerLayer(4)))
        .unwrap();
    assert_eq!(run(&model, &prompt).1, all.1);
}

#[test]
fn pack_for_another_model_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let a = Checkpoint::open_dir(&fixture_dir("qwen3_moe")).unwrap();
    let b = Checkpoint::open_dir(&fixture_dir("qwen2_moe")).unwrap();
    let dir = tmp.path().join("a.pack");
    pack::write_pack(&a.dir, &a.config, &a.weights, &dir, |_, _| {}).unwrap();
    let err = b
        .expert_store(IoMode::Pread, Some(&dir), false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("config_sha256") && err.contains("another model"),
        "{err}"
    );
    // Writing over an existing directory is refused too.
    let err = pack::write_pack(&a.dir, &a.config, &a.weights, &dir, |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("already exists"), "{err}");
}

#[test]
fn truncated_pack_is_refused_at_open() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = Checkpoint::open_dir(&fixture_dir("olmoe")).unwrap();
    let dir = tmp.path().join("p");
    pack::write_pack(&ckpt.dir, &ckpt.config, &ckpt.weights, &dir, |_, _| {}).unwrap();
    let bin = dir.join("experts.bin");
    let len = std::fs::metadata(&bin).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&bin)
        .unwrap()
        .set_len(len - 4096)
        .unwrap();
    let err = ckpt
        .expert_store(IoMode::Pread, Some(&dir), false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("experts.bin") && err.contains("truncated"), "{err}");
}

#[test]
fn modified_pack_is_caught_by_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let (ckpt, prompt, _) = reference("olmoe");
    let dir = tmp.path().join("p");
    pack::write_pack(&ckpt.dir, &ckpt.config, &ckpt.weights, &dir, |_, _| {}).unwrap();
    // Flip one byte inside the first expert (layer 0, expert 0).
    let bin = dir.join("experts.bin");
    let mut bytes = std::fs::read(&bin).unwrap();
    bytes[100] ^= 0x40;
    std::fs::write(&bin, bytes).unwrap();
    let store = Arc::new(ckpt.expert_store(IoMode::Pread, Some(&dir), true).unwrap());
    let (model, _) = ckpt.load_model_cached(store, &opts(Budget::PerLayer(8))).unwrap();
    let mut cache = model.new_cache();
    let err = model
        .forward(
            &prompt,
            &mut cache,
            Phase::Prefill,
            LogitsFor::Last,
            &mut NoObserver,
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("layer 0 expert 0") && err.contains("checksum mismatch"),
        "{err}"
    );
    // --verify without a pack is refused: the safetensors store has no checksums.
    let err = ckpt
        .expert_store(IoMode::Pread, None, true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--verify"), "{err}");
}

/// A failed read (EIO) or a short read stops the pass with an error naming the expert; the slot
/// is not marked resident, so once the fault is gone the same cache gives exact results.
#[test]
fn read_faults_stop_the_run_and_leave_no_half_written_slot() {
    let (ckpt, prompt, all) = reference("qwen3_moe");
    for plan in [
        FaultPlan {
            fail_read: Some(3),
            ..Default::default()
        },
        FaultPlan {
            short_read: Some(2),
            ..Default::default()
        },
    ] {
        let store = Arc::new(ckpt.expert_store(IoMode::Pread, None, false).unwrap());
        let (model, cached) = ckpt
            .load_model_cached(store.clone(), &opts(Budget::PerLayer(16)))
            .unwrap();
        store.inject_faults(plan);
        let mut cache = model.new_cache();
        let err = model
            .forward(
                &prompt,
                &mut cache,
                Phase::Prefill,
                LogitsFor::All,
                &mut NoObserver,
            )
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("expert load") && err.contains("layer"),
            "{plan:?}: {err}"
        );
        let want = if plan.fail_read.is_some() {
            "Input/output error"
        } else {
            "short read"
        };
        assert!(err.contains(want), "{plan:?}: {err}");
        assert_eq!(cached.stats().1.load_errors, 1);
        store.inject_faults(FaultPlan::default());
        assert_eq!(run(&model, &prompt), all, "{plan:?}: a failed slot was used");
    }
}

#[test]
fn belady_is_refused_live() {
    let ckpt = Checkpoint::open_dir(&fixture_dir("olmoe")).unwrap();
    let store = Arc::new(ExpertStore::from_checkpoint(&ckpt.config, &ckpt.weights, IoMode::Pread).unwrap());
    let o = CacheOptions {
        policy: PolicyKind::Belady,
        ..opts(Budget::PerLayer(2))
    };
    let err = ckpt.load_model_cached(store, &o).unwrap_err().to_string();
    assert!(err.contains("simulator"), "{err}");
}

/// With one worker held on a read, a demand load submitted after several prefetches is served
/// before them.
#[test]
fn demand_loads_go_ahead_of_queued_prefetches() {
    use shadowmoe_engine::offload::PageBuf;
    use shadowmoe_engine::offload::pool::LoadJob;
    use std::sync::atomic::AtomicBool;
    let ckpt = Checkpoint::open_dir(&fixture_dir("qwen3_moe")).unwrap();
    let store = Arc::new(ckpt.expert_store(IoMode::Pread, None, false).unwrap());
    // Reads wait until released, so all six submissions are queued (or the first one is in the
    // worker's hands) when the worker picks its next job, however loaded the machine is.
    store.hold_reads(true);
    let pool = shadowmoe_engine::offload::IoPool::new(store.clone(), 1);
    let job = |id: u64, e: u32| LoadJob {
        id,
        key: ExpertKey::new(1, e),
        buf: Some(PageBuf::zeroed(store.slot_bytes())),
        cancelled: Arc::new(AtomicBool::new(false)),
    };
    for i in 0..5 {
        pool.submit(job(i, i as u32), false).unwrap();
    }
    pool.submit(job(99, 9), true).unwrap();
    store.hold_reads(false);
    let order: Vec<u64> = (0..6).map(|_| pool.recv().unwrap().id).collect();
    let pos = order.iter().position(|&id| id == 99).unwrap();
    assert!(pos <= 1, "demand load finished at position {pos}: {order:?}");
}

/// With one prefetch reader of four, queued prefetches are read one at a time, and a demand
/// load still gets a reader at once.
#[test]
fn prefetch_readers_limit_the_prefetches_in_flight() {
    use shadowmoe_engine::offload::PageBuf;
    use shadowmoe_engine::offload::pool::LoadJob;
    use std::sync::atomic::AtomicBool;
    let ckpt = Checkpoint::open_dir(&fixture_dir("qwen3_moe")).unwrap();
    let wait_for = |store: &ExpertStore, n: u64| {
        let t = std::time::Instant::now();
        while store.reads_started() < n && t.elapsed() < std::time::Duration::from_secs(10) {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    };
    for (limit, want) in [(1u64, 1u64), (0, 4)] {
        let store = Arc::new(ckpt.expert_store(IoMode::Pread, None, false).unwrap());
        store.hold_reads(true);
        let pool = shadowmoe_engine::offload::IoPool::with_prefetch_limit(store.clone(), 4, limit as usize);
        let job = |id: u64, e: u32| LoadJob {
            id,
            key: ExpertKey::new(1, e),
            buf: Some(PageBuf::zeroed(store.slot_bytes())),
            cancelled: Arc::new(AtomicBool::new(false)),
        };
        for i in 0..6 {
            pool.submit(job(i, i as u32), false).unwrap();
        }
        wait_for(&store, want);
        // Give any reader that should not start time to (wrongly) start.
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(store.reads_started(), want, "prefetch readers {limit}");
        if limit == 1 {
            pool.submit(job(99, 9), true).unwrap();
            wait_for(&store, 2);
            assert_eq!(
                store.reads_started(),
                2,
                "the demand load waited for a prefetch slot"
            );
        }
        store.hold_reads(false);
        let n = if limit == 1 { 7 } else { 6 };
        let done: Vec<u64> = (0..n).map(|_| pool.recv().unwrap().id).collect();
        assert_eq!(done.len(), n);
    }
}

/// A prefetch cancelled while still queued is never read and counts as wasted; a prefetch used
/// later counts as used.
#[test]
fn cancelled_prefetch_is_dropped_unread() {
    let ckpt = Checkpoint::open_dir(&fixture_dir("qwen3_moe")).unwrap();
    let store = Arc::new(ckpt.expert_store(IoMode::Pread, None, false).unwrap());
    let o = CacheOptions {
        io_threads: 1,
        ..opts(Budget::PerLayer(4))
    };
    let (_model, cached) = ckpt.load_model_cached(store.clone(), &o).unwrap();
    // Reads wait until released: the cancel lands while the third load is still queued.
    store.hold_reads(true);
    let keys: Vec<ExpertKey> = (0..3).map(|e| ExpertKey::new(1, e)).collect();
    assert_eq!(cached.prefetch(&keys).unwrap(), 3);
    assert!(cached.cancel_prefetch(keys[2]));
    store.hold_reads(false);
    cached.wait_idle().unwrap();
    let (s, io) = cached.stats();
    assert_eq!((s.prefetch_issued, s.prefetch_wasted), (3, 1));
    assert_eq!(
        io.bytes_read,
        2 * store.expert_bytes(),
        "the cancelled prefetch was read"
    );
    assert_eq!(cached.prefetch(&keys[..1]).unwrap(), 0, "already resident");
}

/// Prefetching with a real predictor (gate-lookahead and previous-token), inline or on its own
/// thread, for one target layer or every layer ahead (and into the next token), never changes
/// the output, and its prefetches are counted and used.
#[test]
fn prefetching_is_exact_and_counted() {
    use shadowmoe_engine::predict::{GateLookahead, PredictorTiming, Prefetch, PrefetchSpan, PreviousToken};
    // The tiny deepseek_v3 and glm4_moe_lite fixtures (8 experts, 4 resident, a repetitive
    // decode) find their predictions resident: nothing to prefetch there.
    for arch in ARCHS
        .into_iter()
        .filter(|&a| !matches!(a, "deepseek_v3_noqlora" | "glm4_moe_lite"))
    {
        let (ckpt, prompt, all) = reference(arch);
        let k = ckpt.config.num_experts_per_tok;
        for name in ["gate-lookahead", "previous-token"] {
            for (timing, span, depth) in [
                (PredictorTiming::Inline, PrefetchSpan::Target, 1),
                (PredictorTiming::Async, PrefetchSpan::Target, 1),
                (PredictorTiming::Async, PrefetchSpan::All, 2),
                (PredictorTiming::Inline, PrefetchSpan::Wrap, 2),
            ] {
                let what = format!("{arch} {name} {timing:?} {} depth {depth}", span.name());
                let store = Arc::new(ckpt.expert_store(IoMode::Pread, None, false).unwrap());
                let (model, cached) = ckpt
                    .load_model_cached(store, &opts(Budget::PerLayer(2 * k)))
                    .unwrap();
                let predictor: Box<dyn shadowmoe_engine::predict::ExpertPredictor> = match name {
                    "gate-lookahead" => Box::new(GateLookahead::new(model.routers())),
                    _ => Box::new(PreviousToken::default()),
                };
                model.set_prefetch(Some(Prefetch {
                    predictor,
                    depth,
                    k,
                    span,
                    timing,
                }));
                assert_eq!(
                    run(&model, &prompt),
                    all,
                    "{what}: prefetching changed the output"
                );
                let ps = model.prefetch_stats().unwrap();
                cached.wait_idle().unwrap();
                let (s, _) = cached.stats();
                assert!(ps.late <= ps.predictions, "{what}: {ps:?}");
                assert_eq!(
                    s.prefetch_issued, ps.issued,
                    "{what}: cache and predictor disagree"
                );
                assert!(
                    s.prefetch_used + s.prefetch_wasted <= s.prefetch_issued,
                    "{what}: {s:?}"
                );
                // On its own thread, how much the predictor gets done while a toy model decodes
                // is timing; inline, every decode layer is predicted from.
                if timing == PredictorTiming::Inline {
                    assert!(ps.calls > 0 && ps.predictions >= ps.calls, "{what}: {ps:?}");
                    assert_eq!((ps.late, ps.skipped), (0, 0), "{what}: {ps:?}");
                    assert!(s.prefetch_issued > 0, "{what}: no prefetch");
                    assert!(s.prefetch_used > 0, "{what}: no prefetch was used: {s:?} {ps:?}");
                }
            }
        }
    }
}

/// A predictor slower than the forward pass, on its own thread: the forward pass does not wait
/// for it (the output is exact and generation ends while it is still busy), its answers for
/// layers that have already routed are counted late and dropped, and the layers it could not
/// reach are counted skipped.
#[test]
fn a_slow_async_predictor_is_late_not_blocking() {
    use shadowmoe_engine::predict::{ExpertPredictor, LayerView, PredictorTiming, Prefetch, PrefetchSpan};
    struct Slow;
    impl ExpertPredictor for Slow {
        fn name(&self) -> String {
            "slow".into()
        }
        fn predict(
            &mut self,
            view: &LayerView<'_>,
            _target: usize,
            k: usize,
        ) -> shadowmoe_engine::Result<Vec<u32>> {
            std::thread::sleep(std::time::Duration::from_millis(300));
            Ok(view.experts.iter().copied().take(k).collect())
        }
    }
    let (ckpt, prompt, all) = reference("qwen3_moe");
    let k = ckpt.config.num_experts_per_tok;
    let store = Arc::new(ckpt.expert_store(IoMode::Pread, None, false).unwrap());
    let (model, _cached) = ckpt
        .load_model_cached(store, &opts(Budget::PerLayer(2 * k)))
        .unwrap();
    model.set_prefetch(Some(Prefetch {
        predictor: Box::new(Slow),
        depth: 1,
        k,
        span: PrefetchSpan::Target,
        timing: PredictorTiming::Async,
    }));
    assert_eq!(run(&model, &prompt), all);
    // On a loaded machine the predictor's thread may not have run yet: give it (bounded) time.
    let t = std::time::Instant::now();
    let mut ps = model.prefetch_stats().unwrap();
    while (ps.calls == 0 || ps.late == 0) && t.elapsed().as_secs() < 20 {
        std::thread::sleep(std::time::Duration::from_millis(50));
        ps = model.prefetch_stats().unwrap();
    }
    assert!(ps.calls >= 1, "{ps:?}");
    assert!(ps.late >= 1, "the first answer came 300 ms later: {ps:?}");
    assert!(ps.skipped >= 1, "{ps:?}");
    assert!(ps.predictor_secs >= 0.3 * ps.calls as f64, "{ps:?}");
    // The forward thread only handed the router input over.
    assert!(ps.forward_secs < 0.25, "{ps:?}");
}

/// Under skip-on-miss a failed read does not stop the run: the expert it was for is dropped
/// like any other miss (counted as a fallback), the load error is counted, and the cache stays
/// consistent (once the fault is gone, a sync run on the same store is exact). A slow disk
/// (every read delayed) changes the timing only: the sync output is exact.
#[test]
fn read_faults_under_skip_are_fallbacks_and_a_slow_disk_is_only_slower() {
    let (ckpt, prompt, all) = reference("qwen3_moe");
    let store = Arc::new(ckpt.expert_store(IoMode::Pread, None, false).unwrap());
    let (model, cached) = ckpt
        .load_model_cached(
            store.clone(),
            &CacheOptions {
                on_miss: MissMode::Skip,
                ..opts(Budget::PerLayer(4))
            },
        )
        .unwrap();
    store.inject_faults(FaultPlan {
        fail_read: Some(2),
        ..Default::default()
    });
    let mut cache = model.new_cache();
    let mut next = prompt.clone();
    for step in 0..8 {
        let phase = if step == 0 { Phase::Prefill } else { Phase::Decode };
        let logits = model
            .forward(&next, &mut cache, phase, LogitsFor::Last, &mut NoObserver)
            .unwrap_or_else(|e| panic!("step {step}: skip mode stopped on a read fault: {e}"));
        let row = Model::last_row(&logits);
        assert!(row.iter().all(|x| x.is_finite()), "step {step}");
        let best = (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
        next = vec![best as u32];
    }
    cached.wait_idle().unwrap();
    let (stats, io) = cached.stats();
    assert_eq!(io.load_errors, 1, "the injected fault was not counted");
    assert!(stats.fallbacks > 0, "nothing was dropped: {stats:?}");

    // The same store, the fault gone and a slow disk, behind a sync cache: exact.
    store.inject_faults(FaultPlan {
        delay_ms: 2,
        ..Default::default()
    });
    let (model, cached) = ckpt
        .load_model_cached(store.clone(), &opts(Budget::PerLayer(4)))
        .unwrap();
    assert_eq!(run(&model, &prompt), all, "a slow disk changed the output");
    assert!(cached.stats().1.stall.as_secs_f64() > 0.0);
    assert_eq!(cached.stats().1.load_errors, 0);
}

/// A read that hangs does not hang the run: past the load timeout the pass fails with one line
/// naming the expert and its file, and once the disk answers again the same cache is exact.
#[test]
fn a_hanging_read_fails_the_pass_after_the_load_timeout() {
    let (ckpt, prompt, all) = reference("qwen3_moe");
    let store = Arc::new(ckpt.expert_store(IoMode::Pread, None, false).unwrap());
    let (model, cached) = ckpt
        .load_model_cached(store.clone(), &opts(Budget::PerLayer(16)))
        .unwrap();
    cached.set_load_timeout(std::time::Duration::from_millis(300));
    store.hold_reads(true);
    let t = std::time::Instant::now();
    let mut cache = model.new_cache();
    let err = model
        .forward(
            &prompt,
            &mut cache,
            Phase::Prefill,
            LogitsFor::All,
            &mut NoObserver,
        )
        .unwrap_err()
        .to_string();
    assert!(t.elapsed().as_secs_f64() < 10.0, "waited {:?}", t.elapsed());
    assert!(
        err.contains("no read finished within 0.3 s")
            && err.contains("layer")
            && err.contains(".safetensors"),
        "{err}"
    );
    assert!(!err.contains('\n'), "{err}");
    store.hold_reads(false);
    cached.wait_idle().unwrap();
    assert_eq!(run(&model, &prompt), all, "the cache was left inconsistent");
}

/// GGUF files through the bounded cache: experts read as one slice of each stacked
/// `ffn_*_exps` tensor, still quantised (f16, Q5_0/Q5_1/Q8_0, the K types, MXFP4), from the
/// file itself or from an expert pack, give exactly the all-resident run (qwen3next's too:
/// Gated DeltaNet layers, a shared expert, and a multi-token-prediction block left out).
#[test]
fn sync_cache_is_exact_on_gguf_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/gguf");
    for (name, uniform) in [
        ("mixtral-q4_k_m", true),
        ("olmoe-q8_0", true),
        ("qwen3_moe_wide-mix", false),
        ("qwen3_moe_wide-q4_k_m", false),
        ("qwen3_next_gguf-q8_0", true),
        ("glm4_moe_gguf-q8_0", true),
        ("deepseek_v3_gguf-q4_k_m", false),
        ("gpt_oss_mxfp4-q8_0", true),
    ] {
        let path = dir.join(format!("{name}.gguf"));
        let ckpt = Checkpoint::open(path.to_str().unwrap()).unwrap();
        let prompt: Vec<u32> = (0..12)
            .map(|i| (i * 37 + 11) % ckpt.config.vocab_size as u32)
            .collect();
        let all = run(&ckpt.load_model().unwrap(), &prompt);
        let pack_dir = tmp.path().join(format!("{name}.pack"));
        let summary = pack::write_pack_for(
            &ckpt.config_sha256().unwrap(),
            &ckpt.config,
            &ckpt.weights,
            &pack_dir,
            |_, _| {},
        )
        .unwrap();
        let k = ckpt.config.num_experts_per_tok;
        for (io, pack) in [
            (IoMode::Direct, None),
            (IoMode::Pread, None),
            (IoMode::Mmap, None),
            (IoMode::Direct, Some(pack_dir.as_path())),
        ] {
            let store = Arc::new(ckpt.expert_store(io, pack, false).unwrap());
            assert_eq!(store.expert_bytes(), summary.expert_bytes, "{name}: expert bytes");
            let (model, cached) = ckpt.load_model_cached(store, &opts(Budget::PerLayer(k))).unwrap();
            let got = run(&model, &prompt);
            let what = format!("{name} {io:?} pack={}", pack.is_some());
            assert_eq!(got.1, all.1, "{what}: greedy tokens");
            assert!(got.0 == all.0, "{what}: logits are not identical");
            let (stats, iost) = cached.stats();
            assert!(stats.capacity_misses > 0, "{what}: the cache never evicted");
            // Q4_K_M quantises some layers' down projections as Q6_K: experts differ by layer.
            let slot = cached.store().slot_bytes() as u64;
            assert!(
                iost.bytes_read > 0 && iost.bytes_read <= stats.demand_loads * slot,
                "{what}"
            );
            if uniform {
                assert_eq!(
                    iost.bytes_read,
                    stats.demand_loads * cached.store().expert_bytes(),
                    "{what}"
                );
            }
        }
    }
}

/// The byte model from the config alone counts exactly the bytes of every fixture's files
/// (q/k norms per head or full width, q/k/v and o_proj biases where the family has them, tied
/// embeddings, gated or ungated shared experts, dense layers, linear attention; deepseek_v3's
/// latent attention and router bias; gpt_oss's sinks, router bias, expert biases and MXFP4
/// experts), and its KV cache is keys and values — or under latent
/// attention the latent and rotary key — per position and layer.
#[test]
fn byte_model_from_the_config_counts_every_fixtures_files() {
    use shadowmoe_engine::offload::bytes::ByteModel;
    for (fixture, dtype_bytes) in [
        ("qwen3_moe", 2),
        ("olmoe", 4),
        ("mixtral", 2),
        ("qwen2_moe", 4),
        ("qwen3_next", 2),
        ("deepseek_v3", 2),
        ("deepseek_v3_noqlora", 4),
        ("glm4_moe", 2),
        ("glm4_moe_lite", 4),
        ("gpt_oss", 2),
        ("gpt_oss_mxfp4", 2),
    ] {
        let ckpt = Checkpoint::open_dir(&fixture_dir(fixture)).unwrap();
        let c = &ckpt.config;
        let m = ByteModel::from_config(c, dtype_bytes);
        let experts = (c.moe_layers().len() * c.num_experts) as u64;
        let (h, i) = (c.hidden_size, c.moe_intermediate_size);
        let matrices = if c.mxfp4_experts {
            3 * (i * h / 32 * 17) as u64 // 16 packed bytes and a scale a block
        } else {
            3 * (i * h) as u64 * dtype_bytes
        };
        let biases = if c.clamped_swiglu.is_some() {
            (2 * i + h) as u64 * dtype_bytes
        } else {
            0
        };
        assert_eq!(m.expert_bytes, matrices + biases, "{fixture}");
        assert_eq!(
            m.non_expert_bytes + experts * m.expert_bytes,
            ckpt.weights.total_bytes(),
            "{fixture}"
        );
        let per_position = match c.mla {
            Some(mla) => mla.kv_lora_rank + mla.qk_rope_head_dim,
            None => 2 * c.kv_width(),
        };
        assert_eq!(
            m.kv_bytes_per_token,
            (c.num_hidden_layers * per_position * 4) as u64,
            "{fixture}"
        );
    }
}
