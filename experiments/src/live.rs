//! Live configurations of `bench-sweep --mode live`: the engine generates on a dataset with
//! experts served from disk through the bounded cache, prefetching with a predictor, and the
//! run's metrics are measured, not modelled: hit rates and prefetch counts from the cache,
//! decode tok/s and stall from the clock, predictor time around every predictor call, peak RSS
//! of the process (reset before each configuration), and — under skip-on-miss — the quality of
//! the next-token distributions against the exact model on the same text.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use shadowmoe_engine::offload::cache::CacheStats;
use shadowmoe_engine::offload::metrics::DiskActivity;
use shadowmoe_engine::offload::{Capacity, IoMode, MissMode, OffloadConfig, PinSpec, PolicyKind};
use shadowmoe_engine::predict::{
    ExpertPredictor, GateLookahead, Popularity, PredictStats, PredictorTiming, Prefetch, PrefetchSpan,
    PreviousToken,
};
use shadowmoe_engine::{Checkpoint, LogitsFor, Model, NoObserver, Phase};

/// How a live sweep reads experts.
#[derive(Debug, Clone)]
pub struct LiveIo {
    pub mode: IoMode,
    pub pack: Option<std::path::PathBuf>,
    pub threads: usize,
    /// Readers that may be busy with prefetches at once (0: all).
    pub prefetch_readers: usize,
}

/// What every live configuration shares.
#[derive(Debug)]
pub struct LiveSetup {
    pub ckpt: Checkpoint,
    pub config_sha256: String,
    /// Token ids of the dataset's prompts.
    pub prompts: Vec<Vec<u32>>,
    pub max_new_tokens: usize,
    pub io: LiveIo,
    pub backend: shadowmoe_predictor::BackendChoice,
    /// Per MoE layer (model index), experts by popularity: the `popularity` predictor.
    pub popularity: Option<HashMap<usize, Vec<u32>>>,
    expert_bytes: u64,
    /// The exact model's next-token log-probabilities at every prompt position (skip-mode
    /// quality), computed on first use and kept on disk, so that they count in no
    /// configuration's memory.
    exact: std::sync::OnceLock<ExactFile>,
}

/// `[prompt][position][vocab]` f32 log-probabilities in a temporary file (deleted on drop).
#[derive(Debug)]
struct ExactFile {
    path: std::path::PathBuf,
    file: std::fs::File,
    vocab: usize,
    /// Byte offset of each prompt's rows.
    offsets: Vec<u64>,
}

impl ExactFile {
    fn rows(&self, prompt: usize, positions: usize) -> Result<Vec<Vec<f32>>> {
        use std::os::unix::fs::FileExt;
        let mut bytes = vec![0u8; positions * self.vocab * 4];
        self.file
            .read_exact_at(&mut bytes, self.offsets[prompt])
            .with_context(|| format!("reading {}", self.path.display()))?;
        Ok(bytes
            .chunks_exact(self.vocab * 4)
            .map(|row| {
                row.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect()
            })
            .collect())
    }
}

impl Drop for ExactFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One live configuration's measurements.
#[derive(Debug, Clone, Default)]
pub struct LiveResult {
    pub stats: CacheStats,
    pub bytes_read: u64,
    pub stall_secs: f64,
    /// Read time of each load on its I/O worker, as the run saw it (ms percentiles).
    pub read_latency: shadowmoe_engine::offload::metrics::Latency,
    /// Bytes read over the summed read time of the loads (per-load throughput, GB/s).
    pub read_gbps: Option<f64>,
    /// Reads that landed during decode: mean reads in flight while the disk was busy, and
    /// their bytes over that busy time (aggregate GB/s).
    pub decode_reads_in_flight: Option<f64>,
    pub decode_disk_gbps: Option<f64>,
    pub prefill_tokens: u64,
    pub prefill_secs: f64,
    pub decode_steps: u64,
    pub decode_secs: f64,
    /// Bytes read while decoding.
    pub decode_bytes: u64,
    pub decode_stall_secs: f64,
    pub decode_predictor_secs: f64,
    pub peak_rss_bytes: Option<u64>,
    pub modelled_total_bytes: u64,
    pub quality: Option<Quality>,
    /// The read mode actually used (`pread` where O_DIRECT was refused).
    pub io_mode: String,
    /// What prediction cost and did.
    pub predict: PredictStats,
    /// Mean over the prompts of their generation's repetition (`shadowmoe_engine::repetition`:
    /// repeated 4-grams in the last 200 generated tokens).
    pub repetition: Option<f64>,
}

/// Next-token quality against the exact model, teacher-forced over the prompts' tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Quality {
    pub positions: u64,
    /// Share of positions whose most likely next token is the exact model's.
    pub top1_agreement: f64,
    /// Mean KL(exact ‖ this run) of the next-token distributions, nats.
    pub kl_divergence: f64,
    /// Perplexity of the prompts' own next tokens under this run, and under the exact model.
    pub perplexity: f64,
    pub perplexity_exact: f64,
}

/// One cache configuration to run.
#[derive(Debug, Clone)]
pub struct LiveConfig {
    pub capacity: usize,
    pub policy: PolicyKind,
    pub pin: Option<PinSpec>,
    pub on_miss: MissMode,
    pub prefetch_depth: usize,
    pub prefetch_k: usize,
    pub prefetch_span: PrefetchSpan,
    pub timing: PredictorTiming,
    /// Every load lands before a layer looks up its experts (with an inline predictor: the
    /// simulator's event order).
    pub settle_loads: bool,
    pub predictor: String,
    /// Measure next-token quality against the exact model (always under skip-on-miss).
    pub quality: bool,
}

impl LiveSetup {
    pub fn new(
        ckpt: Checkpoint,
        prompts: Vec<Vec<u32>>,
        max_new_tokens: usize,
        io: LiveIo,
        backend: shadowmoe_predictor::BackendChoice,
        popularity: Option<HashMap<usize, Vec<u32>>>,
    ) -> Result<Self> {
        let config_sha256 = ckpt.config_sha256()?;
        let expert_bytes = ckpt
            .expert_store(IoMode::Pread, io.pack.as_deref(), false)?
            .expert_bytes();
        Ok(Self {
            expert_bytes,
            ckpt,
            config_sha256,
            prompts,
            max_new_tokens,
            io,
            backend,
            popularity,
            exact: std::sync::OnceLock::new(),
        })
    }

    /// Bytes of one expert as stored.
    pub fn expert_bytes(&self) -> u64 {
        self.expert_bytes
    }

    fn offload_config(
        &self,
        capacity: usize,
        policy: PolicyKind,
        on_miss: MissMode,
        pin: Option<PinSpec>,
        settle_loads: bool,
    ) -> OffloadConfig {
        OffloadConfig {
            io: self.io.mode,
            pack: self.io.pack.clone(),
            verify: false,
            capacity: Capacity::PerLayer(capacity),
            policy,
            on_miss,
            io_threads: self.io.threads,
            pin,
            settle_loads,
            prefetch_readers: self.io.prefetch_readers,
        }
    }

    fn predictor(&self, name: &str, model: &Model) -> Result<Option<Box<dyn ExpertPredictor>>> {
        Ok(Some(match name {
            "none" => return Ok(None),
            "previous-token" => Box::new(PreviousToken::default()),
            "gate-lookahead" => Box::new(GateLookahead::new(model.routers())),
            "popularity" => Box::new(Popularity {
                ranked: self
                    .popularity
                    .clone()
                    .context("the popularity predictor needs a profile in live mode: pass --profile")?,
            }),
            "oracle" => bail!("the oracle predictor knows the future: it exists in sim mode only"),
            s => {
                let dir = s.strip_prefix("shadow:").context("predictor")?;
                Box::new(shadowmoe_predictor::ShadowPredictor::load(
                    std::path::Path::new(dir),
                    Some(&self.config_sha256),
                    self.backend,
                )?)
            }
        }))
    }

    /// The exact model's next-token log-probabilities over every prompt (computed once, by the
    /// engine with experts from disk through a small cache with sync misses: exact, and within
    /// the memory of an offloaded run).
    fn exact(&self) -> Result<&ExactFile> {
        if let Some(e) = self.exact.get() {
            return Ok(e);
        }
        use std::io::Write;
        let cfg = &self.ckpt.config;
        let off = self.ckpt.offload(&self.offload_config(
            (2 * cfg.num_experts_per_tok).min(cfg.num_experts),
            PolicyKind::Lru,
            MissMode::Sync,
            None,
            false,
        ))?;
        let model = off.model;
        let path = std::env::temp_dir().join(format!(
            "shadowmoe-exact-{}-{}.f32",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let mut out = ExactFile {
            path,
            file,
            vocab: cfg.vocab_size,
            offsets: Vec::with_capacity(self.prompts.len()),
        };
        let mut w = std::io::BufWriter::new(&out.file);
        let mut at = 0u64;
        for ids in &self.prompts {
            out.offsets.push(at);
            let mut kv = model.new_cache();
            let logits = model.forward(ids, &mut kv, Phase::Prefill, LogitsFor::All, &mut NoObserver)?;
            for row in logits.outer_iter() {
                if row.len() != out.vocab {
                    bail!(
                        "the model's logits have {} entries, its config.json says vocab_size = {}",
                        row.len(),
                        out.vocab
                    );
                }
                for x in log_softmax(&row.to_vec()) {
                    w.write_all(&x.to_le_bytes())?;
                }
                at += (row.len() * 4) as u64;
            }
        }
        w.flush()?;
        drop(w);
        Ok(self.exact.get_or_init(|| out))
    }

    /// Runs one configuration: greedy generation of `max_new_tokens` after every prompt, with
    /// the cache persisting across prompts; then, under skip-on-miss, the quality pass.
    pub fn run(&self, c: &LiveConfig) -> Result<LiveResult> {
        let quality = c.quality || c.on_miss == MissMode::Skip;
        if quality {
            self.exact()?;
        }
        reset_peak_rss();
        let off = self.ckpt.offload(&self.offload_config(
            c.capacity,
            c.policy,
            c.on_miss,
            c.pin.clone(),
            c.settle_loads,
        ))?;
        let longest = self.prompts.iter().map(Vec::len).max().unwrap_or(0) + self.max_new_tokens;
        let modelled_total_bytes = off.byte_model.predict(c.capacity, longest);
        let io_mode = off.store.mode().name().to_string();
        let (model, cached) = (off.model, off.cached);
        if c.prefetch_depth > 0 {
            let predictor = self
                .predictor(&c.predictor, &model)?
                .context("a prefetch depth above 0 needs a predictor")?;
            model.set_prefetch(Some(Prefetch {
                predictor,
                depth: c.prefetch_depth,
                k: c.prefetch_k,
                span: c.prefetch_span,
                timing: c.timing,
            }));
        }
        let eos = self.ckpt.eos_token_ids();
        let mut r = LiveResult {
            modelled_total_bytes,
            io_mode,
            ..Default::default()
        };
        let predict_secs = |m: &Model| m.prefetch_stats().map_or(0.0, |p| p.predictor_secs);
        let stall = |cached: &shadowmoe_engine::offload::CachedExperts| cached.stats().1.stall;
        let mut repetitions = Vec::new();
        for ids in &self.prompts {
            if self.max_new_tokens == 0 {
                break;
            }
            let mut kv = model.new_cache();
            let t = Instant::now();
            let logits = model.forward(ids, &mut kv, Phase::Prefill, LogitsFor::Last, &mut NoObserver)?;
            r.prefill_secs += t.elapsed().as_secs_f64();
            r.prefill_tokens += ids.len() as u64;
            let mut next = argmax(&Model::last_row(&logits));
            let mut generated = vec![next];
            let (t, s0, p0) = (Instant::now(), stall(&cached), predict_secs(&model));
            let b0 = cached.stats().1.bytes_read;
            for _ in 1..self.max_new_tokens {
                if eos.contains(&next) {
                    break;
                }
                let logits =
                    model.forward(&[next], &mut kv, Phase::Decode, LogitsFor::Last, &mut NoObserver)?;
                next = argmax(&Model::last_row(&logits));
                generated.push(next);
                r.decode_steps += 1;
            }
            repetitions.push(shadowmoe_engine::repetition(&generated, 4, 200));
            r.decode_secs += t.elapsed().as_secs_f64();
            r.decode_stall_secs += stall(&cached).saturating_sub(s0).as_secs_f64();
            r.decode_predictor_secs += predict_secs(&model) - p0;
            r.decode_bytes += cached.stats().1.bytes_read - b0;
        }
        if !repetitions.is_empty() {
            r.repetition = Some(repetitions.iter().sum::<f64>() / repetitions.len() as f64);
        }
        if let Some(p) = model.prefetch_stats() {
            r.predict = p;
        }
        model.set_prefetch(None);
        cached.wait_idle()?;
        let (stats, io) = cached.stats();
        r.stats = stats;
        r.bytes_read = io.bytes_read;
        r.stall_secs = io.stall.as_secs_f64();
        r.read_latency = shadowmoe_engine::offload::metrics::Latency::of(&io.latencies());
        let all = DiskActivity::of(&io.spans, |_| true);
        r.read_gbps = (all.read_secs > 0.0).then(|| io.bytes_read as f64 / all.read_secs / 1e9);
        let disk = DiskActivity::of(&io.spans, |s| s.decode);
        r.decode_reads_in_flight = disk.in_flight();
        r.decode_disk_gbps = disk.gbps(disk.reads as u64 * cached.store().expert_bytes());
        r.peak_rss_bytes = shadowmoe_engine::peak_rss_bytes();
        if quality {
            r.quality = Some(self.quality(&model)?);
        }
        Ok(r)
    }

    /// Teacher-forced over every prompt, one token per pass (the cache sees decode traffic):
    /// the next-token distributions of `model` against the exact model's.
    fn quality(&self, model: &Model) -> Result<Quality> {
        let exact = self.exact()?;
        let (mut n, mut agree, mut kl, mut nll, mut nll_exact) = (0u64, 0u64, 0.0f64, 0.0f64, 0.0f64);
        for (pi, ids) in self.prompts.iter().enumerate() {
            let ex = exact.rows(pi, ids.len())?;
            let mut kv = model.new_cache();
            for (pos, &id) in ids.iter().enumerate() {
                let phase = if pos == 0 { Phase::Prefill } else { Phase::Decode };
                let logits = model.forward(&[id], &mut kv, phase, LogitsFor::Last, &mut NoObserver)?;
                let Some(&target) = ids.get(pos + 1) else {
                    break;
                };
                let lp = log_softmax(&Model::last_row(&logits));
                let le = &ex[pos];
                n += 1;
                agree += u64::from(argmax(&lp) == argmax(le));
                kl += le
                    .iter()
                    .zip(&lp)
                    .map(|(&e, &q)| f64::from(e.exp()) * f64::from(e - q))
                    .sum::<f64>();
                nll -= f64::from(lp[target as usize]);
                nll_exact -= f64::from(le[target as usize]);
            }
        }
        let d = n.max(1) as f64;
        Ok(Quality {
            positions: n,
            top1_agreement: agree as f64 / d,
            kl_divergence: kl / d,
            perplexity: (nll / d).exp(),
            perplexity_exact: (nll_exact / d).exp(),
        })
    }
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

fn log_softmax(v: &[f32]) -> Vec<f32> {
    let m = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let z: f64 = v.iter().map(|&x| f64::from(x - m).exp()).sum();
    let lz = z.ln() as f32 + m;
    v.iter().map(|&x| x - lz).collect()
}

/// Resets the process's peak RSS (Linux: `5` to /proc/self/clear_refs), so that the next
/// reading is this configuration's peak; elsewhere the peak stays the process's.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_normalises_and_argmax_takes_the_first_best() {
        let lp = log_softmax(&[1.0, 3.0, 3.0, -2.0]);
        let total: f64 = lp.iter().map(|&x| f64::from(x).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6, "{total}");
        assert_eq!(argmax(&lp), 1);
    }
}
