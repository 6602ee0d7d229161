//! `bench-sweep calibrate`: what the simulator needs to know about this machine, measured on
//! it — O_DIRECT reads of the model's experts at queue depths 1..N (the bandwidth the readers
//! share, not N independent disks), next to the same reads of a file of random bytes (so that
//! a model whose bytes a filesystem could compress or leave as holes would show); the engine's
//! compute time per decode token and per MoE layer (offloaded, stall taken out); and each
//! predictor's time per call. `bench-sweep --mode sim --io-profile FILE` reads the result.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::{Deserialize, Serialize};
use shadowmoe_engine::offload::{Capacity, ExpertKey, IoMode, OffloadConfig, PageBuf};
use shadowmoe_engine::predict::{ExpertPredictor, GateLookahead, LayerView, Prefetch, PreviousToken};
use shadowmoe_engine::{Checkpoint, LogitsFor, Model, NoObserver, Phase};

use crate::args::parse_list;
use crate::sim::IoModel;

/// Format tag of a calibration file.
pub const CALIBRATION_FORMAT: &str = "shadowmoe-calibration/1";

/// The machine a calibration was measured on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    pub hostname: String,
    pub cpu: String,
    pub cores: usize,
    pub memory_bytes: u64,
}

impl Machine {
    pub fn this() -> Self {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpu = read("/proc/cpuinfo")
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default();
        let memory_bytes = read("/proc/meminfo")
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024);
        Self {
            hostname: read("/etc/hostname").trim().to_string(),
            cpu,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_bytes,
        }
    }
}

/// Reads at one queue depth.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DepthPoint {
    pub depth: usize,
    pub reads: usize,
    /// Aggregate GB/s over all readers.
    pub gbps: f64,
    pub read_ms_p50: f64,
    pub read_ms_p95: f64,
}

/// The I/O part of a calibration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IoCalibration {
    /// `direct`, or `pread` where the filesystem refused O_DIRECT.
    pub mode: String,
    pub source: String,
    pub bytes_per_read: u64,
    pub depths: Vec<DepthPoint>,
    /// The same reads of a file of random bytes of the same size (when asked for).
    #[serde(default)]
    pub control: Vec<DepthPoint>,
    #[serde(default)]
    pub control_file: Option<String>,
    /// Where the reads were drawn from when not from all the model's experts.
    #[serde(default)]
    pub working_set: Option<WorkingSet>,
}

/// Reads drawn from the experts a trace routes to, after one untimed pass over them
/// (`calibrate --trace`): the disk as a sweep over the same prompts sees it. Sweeps read the
/// same experts again and again, and a virtual disk's host may keep recently read blocks in its
/// own cache, which O_DIRECT in the guest cannot bypass: measured here, re-reading a trace's
/// working set ran about twice as fast as reading experts picked at random.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkingSet {
    pub trace: String,
    /// Distinct experts the trace routes to.
    pub experts: usize,
    /// The untimed warming pass over them.
    pub warm_gbps: f64,
}

/// The compute part.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComputeCalibration {
    pub threads: usize,
    pub decode_tokens: u64,
    /// Decode time per token with the stall taken out.
    pub token_ms: f64,
    /// `token_ms` over the MoE layers: what the simulator charges per layer.
    pub layer_ms: f64,
    pub stall_ms_per_token: f64,
    pub capacity: usize,
    pub build: String,
}

/// One predictor's cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictorCost {
    pub ms_per_call: f64,
    pub ms_p90: f64,
    pub targets_per_call: usize,
    pub backend: String,
    /// Decode compute per token (stall and the forward thread's hand-off taken out) while this
    /// predictor runs beside the forward pass, off its critical path, prefetching at depth 1 —
    /// as a live sweep runs it. On a machine with no core to spare, the predictor's thread and
    /// the prefetch reads it issues take CPU time and memory bandwidth from the forward pass:
    /// measured here, that made compute 5–10 % slower than `compute.token_ms`.
    #[serde(default)]
    pub compute_token_ms: Option<f64>,
    #[serde(default)]
    pub compute_layer_ms: Option<f64>,
}

/// Model identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelIdentity {
    pub model_id: String,
    pub config_sha256: String,
    pub expert_bytes: u64,
}

/// A calibration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    pub format: String,
    pub created: String,
    pub harness_version: String,
    pub harness_commit: String,
    pub machine: Machine,
    pub model: ModelIdentity,
    pub io: IoCalibration,
    pub compute: ComputeCalibration,
    /// By predictor name (`shadow` for a shadow model).
    pub predictors: BTreeMap<String, PredictorCost>,
}

impl Calibration {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "--io-profile: cannot read {} (make one with bench-sweep calibrate)",
                path.display()
            )
        })?;
        let c: Calibration = serde_json::from_str(&text)
            .with_context(|| format!("--io-profile: {} is not a calibration file", path.display()))?;
        if c.format != CALIBRATION_FORMAT {
            bail!(
                "--io-profile: {}: format `{}` is not {CALIBRATION_FORMAT}",
                path.display(),
                c.format
            );
        }
        if c.io.depths.is_empty() || c.io.depths.iter().any(|d| d.gbps.is_nan() || d.gbps <= 0.0) {
            bail!(
                "--io-profile: {}: field `io.depths`: expected measured bandwidths above 0",
                path.display()
            );
        }
        Ok(c)
    }

    /// Warns (and names what differs) when the file was measured for another model or on
    /// another machine.
    pub fn warn_if_foreign(&self, path: &Path, config_sha256: &str) {
        if self.model.config_sha256 != config_sha256 {
            tracing::warn!(
                "{}: calibrated on another model ({}, config sha256 {}; the trace's is {config_sha256}): its compute and I/O times may not apply",
                path.display(),
                self.model.model_id,
                self.model.config_sha256
            );
        }
        let here = Machine::this();
        let mut differs = Vec::new();
        if here.hostname != self.machine.hostname {
            differs.push(format!("hostname {} vs {}", self.machine.hostname, here.hostname));
        }
        if here.cpu != self.machine.cpu {
            differs.push(format!("cpu `{}` vs `{}`", self.machine.cpu, here.cpu));
        }
        if here.cores != self.machine.cores {
            differs.push(format!("{} cores vs {}", self.machine.cores, here.cores));
        }
        if !differs.is_empty() {
            tracing::warn!(
                "{}: calibrated on another machine ({})",
                path.display(),
                differs.join(", ")
            );
        }
    }

    /// The simulator's disk: the measured aggregate bandwidth at each depth (latency included).
    pub fn io_model(&self, threads: usize, expert_bytes: u64) -> IoModel {
        let mut pts = self.io.depths.clone();
        pts.sort_by_key(|d| d.depth);
        let max = pts.last().map_or(1, |d| d.depth).max(threads);
        // Depths between measured points take the nearest measured one below.
        let gbps_by_depth = (1..=max)
            .map(|q| {
                pts.iter()
                    .rev()
                    .find(|d| d.depth <= q)
                    .or(pts.first())
                    .map_or(1.0, |d| d.gbps)
            })
            .collect();
        IoModel {
            threads,
            expert_bytes,
            latency_us: 0.0,
            gbps_by_depth,
            prefetch_readers: 0,
        }
    }
}

/// Flags of `bench-sweep calibrate`.
#[derive(Args, Debug, Clone)]
pub struct CalibrateArgs {
    /// The checkpoint whose experts are read and whose compute is timed.
    #[arg(long)]
    pub model: String,
    /// Read the experts from this expert pack instead of the checkpoint.
    #[arg(long)]
    pub pack: Option<PathBuf>,
    /// Read mode: direct (O_DIRECT), pread, mmap.
    #[arg(long, default_value = "direct")]
    pub io: String,
    /// Queue depths to measure (a list or range).
    #[arg(long, default_value = "1..8")]
    pub depths: String,
    /// Reads per depth.
    #[arg(long, default_value_t = 96)]
    pub reads: usize,
    /// Also read a file of random bytes the size of the experts (created here if missing):
    /// the same reads must run at the same speed.
    #[arg(long)]
    pub control_file: Option<PathBuf>,
    /// Draw the reads from the experts this trace routes to (its working set), after one
    /// untimed pass over them: the disk as a sweep over the trace's prompts sees it.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Experts resident per layer for the compute run.
    #[arg(long, default_value_t = 64)]
    pub capacity: usize,
    /// Decode tokens for the compute run.
    #[arg(long, default_value_t = 32)]
    pub tokens: usize,
    /// Threads of the forward pass (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Predictors to time: previous-token, gate-lookahead, shadow:DIR (comma-separated).
    #[arg(long, default_value = "gate-lookahead")]
    pub predictor: String,
    /// Targets per predictor call (a prefetch span of all at depth D asks D at once).
    #[arg(long, default_value_t = 1)]
    pub targets: usize,
    /// Backend of shadow predictors: auto, wgpu, cpu.
    #[arg(long, default_value = "auto")]
    pub backend: String,
    /// The calibration file to write.
    #[arg(long)]
    pub out: PathBuf,
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// `reads` reads spread over `depth` threads; `read(i, buf)` performs read number `i`.
fn measure(
    depth: usize,
    reads: usize,
    buf_bytes: usize,
    read: &(dyn Fn(usize, &mut PageBuf) -> Result<u64> + Sync),
) -> Result<DepthPoint> {
    let start = Instant::now();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<Result<(u64, Vec<f64>)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..depth)
            .map(|_| {
                s.spawn(|| -> Result<(u64, Vec<f64>)> {
                    let mut buf = PageBuf::zeroed(buf_bytes);
                    let (mut bytes, mut lat) = (0, Vec::new());
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= reads {
                            return Ok((bytes, lat));
                        }
                        let t = Instant::now();
                        bytes += read(i, &mut buf)?;
                        lat.push(t.elapsed().as_secs_f64() * 1e3);
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a reader panicked")))
            })
            .collect()
    });
    let secs = start.elapsed().as_secs_f64();
    let (mut bytes, mut lat) = (0u64, Vec::new());
    for r in results {
        let (b, l) = r?;
        bytes += b;
        lat.extend(l);
    }
    Ok(DepthPoint {
        depth,
        reads,
        gbps: bytes as f64 / secs / 1e9,
        read_ms_p50: percentile(&mut lat, 0.5),
        read_ms_p95: percentile(&mut lat, 0.95),
    })
}

/// A file of `len` random bytes at `path` (kept if it is already that long).
fn control_file(path: &Path, len: u64) -> Result<()> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() >= len) {
        return Ok(());
    }
    use std::io::Write;
    let tmp = path.with_extension("partial");
    let f = std::fs::File::create(&tmp)
        .with_context(|| format!("--control-file: cannot create {}", tmp.display()))?;
    let mut w = std::io::BufWriter::with_capacity(8 << 20, f);
    let mut state = 0x243f_6a88_85a3_08d3u64;
    let mut block = vec![0u8; 8 << 20];
    let bar = indicatif::ProgressBar::new(len);
    let mut left = len;
    while left > 0 {
        for c in block.chunks_exact_mut(8) {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            c.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
        }
        let n = left.min(block.len() as u64) as usize;
        w.write_all(&block[..n])?;
        left -= n as u64;
        bar.inc(n as u64);
    }
    let f = w
        .into_inner()
        .map_err(|e| anyhow::anyhow!("{}: {}", tmp.display(), e.error()))?;
    f.sync_all()?;
    bar.finish_and_clear();
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The distinct experts `path`'s routing reaches, in file order; the trace must be of a model
/// with `cfg`'s MoE layers and experts.
fn trace_working_set(path: &Path, cfg: &shadowmoe_engine::ModelConfig) -> Result<Vec<ExpertKey>> {
    let trace = shadowmoe_trace::Trace::open(path).with_context(|| format!("--trace {}", path.display()))?;
    let m = &trace.manifest;
    if m.moe_layers != cfg.moe_layers() || m.num_experts != cfg.num_experts {
        bail!(
            "--trace {}: a trace of another model (MoE layers {:?} with {} experts; --model has {:?} with {})",
            path.display(),
            m.moe_layers,
            m.num_experts,
            cfg.moe_layers(),
            cfg.num_experts
        );
    }
    let layers = m.moe_layers.clone();
    let mut seen = std::collections::BTreeSet::new();
    trace
        .for_each_batch(64, |reqs| {
            for r in &reqs {
                for t in 0..r.tokens() {
                    for (l, &layer) in layers.iter().enumerate() {
                        for &e in r.experts_at(t, l) {
                            seen.insert((layer, e as u32));
                        }
                    }
                }
            }
            Ok(())
        })
        .with_context(|| format!("--trace {}", path.display()))?;
    if seen.is_empty() {
        bail!(
            "--trace {}: no routing rows (expected a trace with tokens)",
            path.display()
        );
    }
    Ok(seen.into_iter().map(|(l, e)| ExpertKey::new(l, e)).collect())
}

/// A fixed pseudo-random order of `n` items (SplitMix64 of the index).
fn scatter(i: usize, n: usize) -> usize {
    let mut z = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5851_f42d_4c95_7f2d;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    ((z ^ (z >> 31)) % n as u64) as usize
}

/// Runs the calibration and writes the file.
pub fn run(a: &CalibrateArgs) -> Result<Calibration> {
    let io: IoMode = a.io.parse().map_err(|e: String| anyhow::anyhow!("--io: {e}"))?;
    let depths = parse_list("--depths", &a.depths)?;
    if depths.is_empty() || depths.contains(&0) {
        bail!("--depths: expected depths of at least 1");
    }
    if a.reads == 0 || a.tokens == 0 {
        bail!("--reads, --tokens: expected at least 1");
    }
    let backend: shadowmoe_predictor::BackendChoice = a
        .backend
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--backend: {e}"))?;
    shadowmoe_engine::init_threads(a.threads).ok();
    let ckpt = Checkpoint::open(&a.model).with_context(|| format!("--model {}", a.model))?;
    let cfg = ckpt.config.clone();
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("--out: cannot create {}", dir.display()))?;
    }
    let probe = a.out.with_extension("write-test");
    std::fs::write(&probe, b"").with_context(|| format!("--out: {} is not writable", a.out.display()))?;
    std::fs::remove_file(&probe)?;

    // I/O: random experts, each read once per depth (a fresh order per depth).
    let store = Arc::new(ckpt.expert_store(io, a.pack.as_deref(), false)?);
    let keys: Vec<ExpertKey> = cfg
        .moe_layers()
        .iter()
        .flat_map(|&l| (0..cfg.num_experts as u32).map(move |e| ExpertKey::new(l, e)))
        .collect();
    let expert_bytes = store.expert_bytes();
    let all_experts = keys.len();
    let mut working_set = None;
    let keys = match &a.trace {
        None => keys,
        Some(path) => {
            let ws = trace_working_set(path, &cfg)?;
            let warm_depth = depths.iter().copied().max().unwrap_or(1);
            tracing::info!(
                "warming the working set of {}: {} experts at depth {warm_depth}",
                path.display(),
                ws.len()
            );
            let store = store.clone();
            let ws_ref = &ws;
            let p = measure(warm_depth, ws.len(), store.slot_bytes(), &|i, buf| {
                Ok(store.read_into(ws_ref[i], buf)?)
            })?;
            eprintln!(
                "working set of {}: {} experts, warming pass {:.3} GB/s",
                path.display(),
                ws.len(),
                p.gbps
            );
            working_set = Some(WorkingSet {
                trace: path.display().to_string(),
                experts: ws.len(),
                warm_gbps: p.gbps,
            });
            ws
        }
    };
    let mut points = Vec::new();
    let mut salt = 0;
    for &q in &depths {
        salt += a.reads;
        let store = store.clone();
        let keys = &keys;
        let p = measure(q, a.reads, store.slot_bytes(), &|i, buf| {
            Ok(store.read_into(keys[scatter(i + salt, keys.len())], buf)?)
        })?;
        eprintln!(
            "{} depth {q}: {:.3} GB/s, read p50 {:.2} ms",
            store.mode().name(),
            p.gbps,
            p.read_ms_p50
        );
        points.push(p);
    }
    let mut control = Vec::new();
    if let Some(path) = &a.control_file {
        let len = all_experts as u64 * shadowmoe_engine::offload::align_up(expert_bytes);
        control_file(path, len)?;
        let f = if io == IoMode::Direct {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc_o_direct())
                .open(path)
                .or_else(|_| std::fs::File::open(path))
        } else {
            std::fs::File::open(path)
        }
        .with_context(|| format!("--control-file: cannot open {}", path.display()))?;
        let chunk = shadowmoe_engine::offload::align_up(expert_bytes) as usize;
        let slots = all_experts;
        for &q in &depths {
            salt += a.reads;
            let f = &f;
            let p = measure(q, a.reads, chunk, &|i, buf| {
                let off = (scatter(i + salt, slots) * chunk) as u64;
                let dst = &mut buf.as_mut_slice()[..chunk];
                f.read_exact_at(dst, off)?;
                Ok(chunk as u64)
            })?;
            eprintln!("random-bytes file depth {q}: {:.3} GB/s", p.gbps);
            control.push(p);
        }
    }

    // Compute: decode offloaded, the stall taken out.
    let off = ckpt.offload(&OffloadConfig {
        io,
        pack: a.pack.clone(),
        capacity: Capacity::PerLayer(a.capacity.min(cfg.num_experts)),
        ..OffloadConfig::per_layer(a.capacity.min(cfg.num_experts))
    })?;
    let tok = ckpt.tokenizer()?;
    let prompt = tok.encode("def parse_args(argv):\n    \"\"\"Parse the command line.\"\"\"\n")?;
    // Decode of the prompt's continuation, twice (the first run warms the cache; the second is
    // the one kept): (ms per token with the stall and the forward thread's predictor hand-off
    // taken out, stall ms per token).
    let time_decode = || -> Result<(f64, f64)> {
        let stall = || off.cached.stats().1.stall.as_secs_f64();
        let handoff = || off.model.prefetch_stats().map_or(0.0, |p| p.forward_decode_secs);
        let mut measured = (0.0, 0.0);
        for _ in 0..2 {
            let mut kv = off.model.new_cache();
            let logits =
                off.model
                    .forward(&prompt, &mut kv, Phase::Prefill, LogitsFor::Last, &mut NoObserver)?;
            let mut next = argmax(&Model::last_row(&logits));
            let (s0, h0, t0) = (stall(), handoff(), Instant::now());
            for _ in 0..a.tokens {
                let logits =
                    off.model
                        .forward(&[next], &mut kv, Phase::Decode, LogitsFor::Last, &mut NoObserver)?;
                next = argmax(&Model::last_row(&logits));
            }
            let (secs, st, h) = (t0.elapsed().as_secs_f64(), stall() - s0, handoff() - h0);
            let n = a.tokens.max(1) as f64;
            measured = (((secs - st - h) / n * 1e3).max(0.0), st / n * 1e3);
        }
        off.cached.wait_idle()?;
        Ok(measured)
    };
    let (token_ms, stall_ms) = time_decode()?;
    let steps = a.tokens as u64;
    let n_moe = cfg.moe_layers().len().max(1);
    let compute = ComputeCalibration {
        threads: rayon_threads(),
        decode_tokens: steps,
        token_ms,
        layer_ms: token_ms / n_moe as f64,
        stall_ms_per_token: stall_ms,
        capacity: a.capacity.min(cfg.num_experts),
        build: if cfg!(debug_assertions) {
            "debug".into()
        } else {
            "release".into()
        },
    };
    eprintln!(
        "compute: {:.2} ms per decode token, {:.3} ms per MoE layer ({} threads)",
        compute.token_ms, compute.layer_ms, compute.threads
    );

    // Predictors: calls on router inputs of this model.
    let mut predictors = BTreeMap::new();
    let moe = cfg.moe_layers();
    let src = moe[0];
    let targets: Vec<usize> = moe.iter().skip(1).take(a.targets.max(1)).copied().collect();
    let hidden: Vec<f32> = (0..cfg.hidden_size)
        .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
        .collect();
    let experts: Vec<u32> = (0..cfg.num_experts_per_tok as u32).collect();
    for name in a.predictor.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (key, mut p, backend_name): (String, Box<dyn ExpertPredictor>, String) = match name {
            "gate-lookahead" => (
                "gate-lookahead".into(),
                Box::new(GateLookahead::new(off.model.routers())),
                "cpu".into(),
            ),
            "previous-token" => (
                "previous-token".into(),
                Box::new(PreviousToken::default()),
                "cpu".into(),
            ),
            s if s.starts_with("shadow:") => {
                let dir = s.trim_start_matches("shadow:");
                let sp = shadowmoe_predictor::ShadowPredictor::load(
                    Path::new(dir),
                    Some(&ckpt.config_sha256()?),
                    backend,
                )?;
                let b = sp.backend().to_string();
                ("shadow".into(), Box::new(sp), b)
            }
            other => bail!(
                "--predictor: unknown `{other}` (expected previous-token, gate-lookahead or shadow:DIR)"
            ),
        };
        let view = LayerView {
            layer: src,
            hidden: &hidden,
            experts: &experts,
        };
        for _ in 0..5 {
            p.predict_many(&view, &targets, cfg.num_experts_per_tok)?;
        }
        let mut ms = Vec::new();
        for _ in 0..100 {
            let t = Instant::now();
            p.predict_many(&view, &targets, cfg.num_experts_per_tok)?;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        // Then as a live run uses it: beside the forward pass, prefetching at depth 1.
        off.model
            .set_prefetch(Some(Prefetch::new(p, 1, cfg.num_experts_per_tok)));
        let timed = time_decode();
        off.model.set_prefetch(None);
        let (compute_ms, _) = timed?;
        let cost = PredictorCost {
            ms_per_call: percentile(&mut ms, 0.5),
            ms_p90: percentile(&mut ms, 0.9),
            targets_per_call: targets.len(),
            backend: backend_name,
            compute_token_ms: Some(compute_ms),
            compute_layer_ms: Some(compute_ms / n_moe as f64),
        };
        eprintln!(
            "predictor {key}: {:.3} ms per call (p90 {:.3}); decode compute beside it {compute_ms:.2} ms per token",
            cost.ms_per_call, cost.ms_p90
        );
        predictors.insert(key, cost);
    }

    let cal = Calibration {
        format: CALIBRATION_FORMAT.into(),
        created: shadowmoe_trace::schema::utc_now(),
        harness_version: env!("CARGO_PKG_VERSION").into(),
        harness_commit: env!("SHADOWMOE_COMMIT").into(),
        machine: Machine::this(),
        model: ModelIdentity {
            model_id: a.model.clone(),
            config_sha256: ckpt.config_sha256()?,
            expert_bytes,
        },
        io: IoCalibration {
            mode: store.mode().name().into(),
            source: store.source().into(),
            bytes_per_read: expert_bytes,
            depths: points,
            control,
            control_file: a.control_file.as_ref().map(|p| p.display().to_string()),
            working_set,
        },
        compute,
        predictors,
    };
    let tmp = a.out.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&cal)?)
        .with_context(|| format!("--out: cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &a.out)?;
    Ok(cal)
}

fn rayon_threads() -> usize {
    shadowmoe_engine::threads()
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(target_os = "linux")]
fn libc_o_direct() -> i32 {
    libc::O_DIRECT
}

#[cfg(not(target_os = "linux"))]
fn libc_o_direct() -> i32 {
    0
}
