//! The prefetch runtime of a model: the forward pass hands each MoE layer's router input to
//! the predictor as soon as the layer routes, and the predictor's answers become prefetches.
//!
//! - `inline`: the predictor runs on the forward thread after the layer's experts (the order
//!   the simulator replays; deterministic).
//! - `async`: it runs on its own thread. The forward thread only copies the router input into a
//!   channel; when the predictor falls behind it skips to the newest layer (the older ones are
//!   observed, not predicted from). Each answer is checked against the forward pass's progress
//!   under one lock: one whose target layer has already routed is counted late and dropped, the
//!   others are prefetched, and prefetches of the same target that a newer answer no longer
//!   names are cancelled if no reader has taken them yet.
//!
//! Positions: MoE-layer ordinal `li` of pass `p` is `p · n + li` (`n` MoE layers); a target
//! is late once the forward pass's position reaches it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, unbounded};

use crate::error::{EngineError, Result};
use crate::moe::ExpertProvider;
use crate::observer::Phase;
use crate::predict::{
    ExpertPredictor, LayerView, PredictStats, PredictorTiming, Prefetch, PrefetchSpan, prefetch_targets,
};

/// One routed layer, as the predictor sees it.
#[derive(Debug, Clone)]
struct Job {
    pass: u64,
    li: usize,
    phase: Phase,
    hidden: Vec<f32>,
    experts: Vec<u32>,
}

enum Msg {
    Job(Job),
    Flush(Sender<()>),
}

/// What the forward thread and the predictor thread share.
#[derive(Debug, Default)]
struct Shared {
    /// The forward pass's position: the last MoE layer that routed.
    progress: Mutex<u64>,
    stats: Mutex<PredictStats>,
    error: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Turns predictions into prefetches (either thread).
struct Issuer {
    moe_layers: Vec<usize>,
    depth: usize,
    k: usize,
    span: PrefetchSpan,
    provider: Arc<dyn ExpertProvider>,
    shared: Arc<Shared>,
    /// What was prefetched for each target position, until it routes.
    issued: HashMap<u64, Vec<u32>>,
}

impl Issuer {
    fn n(&self) -> usize {
        self.moe_layers.len()
    }

    fn view<'a>(&self, job: &'a Job) -> LayerView<'a> {
        LayerView {
            layer: self.moe_layers[job.li],
            hidden: &job.hidden,
            experts: &job.experts,
        }
    }

    /// Predicts from `job` (a decode layer) and prefetches what is still ahead.
    fn predict_and_issue(&mut self, predictor: &mut dyn ExpertPredictor, job: &Job) -> Result<()> {
        let targets = prefetch_targets(job.li, self.n(), self.depth, self.span);
        if targets.is_empty() {
            return Ok(());
        }
        let layers: Vec<usize> = targets.iter().map(|&(t, _)| self.moe_layers[t]).collect();
        let t0 = Instant::now();
        let preds = predictor.predict_many(&self.view(job), &layers, self.k)?;
        let secs = t0.elapsed().as_secs_f64();
        let n = self.n() as u64;
        let progress = lock(&self.shared.progress);
        let mut st = PredictStats {
            calls: 1,
            predictor_secs: secs,
            ..Default::default()
        };
        for ((&(ord, ahead), &layer), pred) in targets.iter().zip(&layers).zip(preds) {
            let pos = (job.pass + ahead as u64) * n + ord as u64;
            st.predictions += 1;
            if *progress >= pos {
                st.late += 1;
                continue;
            }
            if let Some(old) = self.issued.insert(pos, pred.clone()) {
                for e in old.iter().filter(|e| !pred.contains(e)) {
                    st.cancelled += u64::from(self.provider.cancel_prefetch(layer, *e));
                }
            }
            st.issued += self.provider.prefetch(layer, &pred)? as u64;
        }
        let now = *progress;
        drop(progress);
        self.issued.retain(|&pos, _| pos > now);
        let mut total = lock(&self.shared.stats);
        total.calls += st.calls;
        total.predictions += st.predictions;
        total.late += st.late;
        total.issued += st.issued;
        total.cancelled += st.cancelled;
        total.predictor_secs += st.predictor_secs;
        Ok(())
    }
}

enum Mode {
    Inline {
        predictor: Box<dyn ExpertPredictor>,
        issuer: Box<Issuer>,
        pending: Option<Job>,
    },
    Async {
        tx: Option<Sender<Msg>>,
        worker: Option<JoinHandle<()>>,
    },
}

/// A model's prefetching, inline or on its own thread.
pub(crate) struct Prefetcher {
    n: usize,
    mode: Mode,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Prefetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prefetcher")
            .field("layers", &self.n)
            .finish_non_exhaustive()
    }
}

impl Prefetcher {
    pub(crate) fn new(p: Prefetch, moe_layers: Vec<usize>, provider: Arc<dyn ExpertProvider>) -> Self {
        let shared = Arc::new(Shared::default());
        let n = moe_layers.len();
        let issuer = Box::new(Issuer {
            moe_layers,
            depth: p.depth,
            k: p.k,
            span: p.span,
            provider,
            shared: shared.clone(),
            issued: HashMap::new(),
        });
        let mode = match p.timing {
            PredictorTiming::Inline => Mode::Inline {
                predictor: p.predictor,
                issuer,
                pending: None,
            },
            PredictorTiming::Async => {
                let (tx, rx) = unbounded();
                let predictor = p.predictor;
                let worker = std::thread::Builder::new()
                    .name("shadowmoe-predictor".into())
                    .spawn(move || {
                        // A pool of its own, one thread: the predictor's matmuls (the engine's
                        // kernels and any rayon work of its backend) stay on this thread instead
                        // of queueing in the global pool behind the expert matmuls of the very
                        // pass it is predicting for.
                        match rayon::ThreadPoolBuilder::new()
                            .num_threads(1)
                            .thread_name(|_| "shadowmoe-predictor".into())
                            .build()
                        {
                            Ok(pool) => pool.install(move || run_worker(predictor, *issuer, &rx)),
                            Err(e) => {
                                tracing::warn!("predictor thread pool: {e}; its matmuls stay on one thread");
                                crate::kernels::serial(move || run_worker(predictor, *issuer, &rx))
                            }
                        }
                    })
                    .expect("spawning the predictor thread");
                Mode::Async {
                    tx: Some(tx),
                    worker: Some(worker),
                }
            }
        };
        Self { n, mode, shared }
    }

    /// MoE layer ordinal `li` of pass `pass` has routed; `hidden` is its router input and
    /// `experts` its choice for the pass's last token.
    pub(crate) fn routed(&mut self, pass: u64, li: usize, phase: Phase, hidden: &[f32], experts: &[u32]) {
        let t0 = Instant::now();
        *lock(&self.shared.progress) = pass * self.n as u64 + li as u64;
        let job = Job {
            pass,
            li,
            phase,
            hidden: hidden.to_vec(),
            experts: experts.to_vec(),
        };
        match &mut self.mode {
            Mode::Inline { pending, .. } => *pending = Some(job),
            Mode::Async { tx, .. } => {
                if let Some(tx) = tx {
                    let _ = tx.send(Msg::Job(job));
                }
            }
        }
        self.add_forward(t0, phase);
    }

    /// After the layer's experts ran: the inline predictor's turn.
    pub(crate) fn after_layer(&mut self) -> Result<()> {
        let Mode::Inline {
            predictor,
            issuer,
            pending,
        } = &mut self.mode
        else {
            return Ok(());
        };
        let Some(job) = pending.take() else { return Ok(()) };
        let t0 = Instant::now();
        predictor.observe(&issuer.view(&job));
        let out = if job.phase == Phase::Decode {
            issuer.predict_and_issue(predictor.as_mut(), &job)
        } else {
            Ok(())
        };
        self.add_forward(t0, job.phase);
        out
    }

    fn add_forward(&self, t0: Instant, phase: Phase) {
        let secs = t0.elapsed().as_secs_f64();
        let mut st = lock(&self.shared.stats);
        st.forward_secs += secs;
        if phase == Phase::Decode {
            st.forward_decode_secs += secs;
        }
    }

    /// The predictor thread's error, if it failed.
    pub(crate) fn error(&self) -> Result<()> {
        match lock(&self.shared.error).take() {
            Some(msg) => Err(EngineError::invalid("predictor", msg)),
            None => Ok(()),
        }
    }

    /// Waits until the predictor has handled every layer handed to it so far.
    pub(crate) fn flush(&self) {
        if let Mode::Async { tx: Some(tx), .. } = &self.mode {
            let (ack_tx, ack_rx) = crossbeam_channel::bounded(1);
            if tx.send(Msg::Flush(ack_tx)).is_ok() {
                let _ = ack_rx.recv();
            }
        }
    }

    pub(crate) fn stats(&self) -> PredictStats {
        lock(&self.shared.stats).clone()
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        if let Mode::Async { tx, worker } = &mut self.mode {
            tx.take();
            if let Some(w) = worker.take() {
                let _ = w.join();
            }
        }
    }
}

fn run_worker(mut predictor: Box<dyn ExpertPredictor>, mut issuer: Issuer, rx: &Receiver<Msg>) {
    let mut acks: Vec<Sender<()>> = Vec::new();
    while let Ok(first) = rx.recv() {
        // Take everything queued: observe it all in order, predict from the newest layer only.
        let mut newest: Option<Job> = None;
        let mut skipped = 0;
        let mut msg = Some(first);
        while let Some(m) = msg.take().or_else(|| rx.try_recv().ok()) {
            match m {
                Msg::Job(job) => {
                    predictor.observe(&issuer.view(&job));
                    if let Some(old) = newest.replace(job)
                        && old.phase == Phase::Decode
                    {
                        skipped += 1;
                    }
                }
                Msg::Flush(ack) => {
                    acks.push(ack);
                    break;
                }
            }
        }
        if skipped > 0 {
            lock(&issuer.shared.stats).skipped += skipped;
        }
        if let Some(job) = newest.filter(|j| j.phase == Phase::Decode)
            && let Err(e) = issuer.predict_and_issue(predictor.as_mut(), &job)
        {
            tracing::warn!("predictor: {e}");
            *lock(&issuer.shared.error) = Some(e.to_string());
        }
        for ack in acks.drain(..) {
            let _ = ack.send(());
        }
    }
}
