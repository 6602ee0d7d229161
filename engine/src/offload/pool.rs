//! The I/O thread pool: N workers read experts into slots. Demand loads go ahead of prefetches
//! (two channels, the demand one polled first); a prefetch cancelled before a worker reaches it
//! is dropped unread. Buffers travel with the jobs and come back with the results, so the pool
//! allocates nothing: the cache hands it slots it already owns.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, select_biased, unbounded};

use super::store::ExpertStore;
use super::{ExpertKey, PageBuf};
use crate::error::{EngineError, Result};

/// One load to do.
#[derive(Debug)]
pub struct LoadJob {
    /// Caller's tag, returned in [`LoadDone::id`] (tells a stale completion from a current one).
    pub id: u64,
    pub key: ExpertKey,
    /// The slot to fill (`None` in mmap mode: the load touches the mapped pages).
    pub buf: Option<PageBuf>,
    /// Set by the cache when a prefetch is no longer wanted.
    pub cancelled: Arc<AtomicBool>,
}

/// One finished (or dropped) load.
#[derive(Debug)]
pub struct LoadDone {
    pub id: u64,
    pub key: ExpertKey,
    pub buf: Option<PageBuf>,
    /// Bytes read, or why not.
    pub result: Result<u64>,
    /// Time the read took on the worker.
    pub latency: Duration,
    /// When the worker began the read (`None`: dropped unread).
    pub started: Option<Instant>,
    /// Dropped unread because it was cancelled.
    pub cancelled: bool,
}

/// The worker threads and their channels.
#[derive(Debug)]
pub struct IoPool {
    demand: Option<Sender<LoadJob>>,
    prefetch: Option<Sender<LoadJob>>,
    done: Receiver<LoadDone>,
    workers: Vec<JoinHandle<()>>,
}

/// How many workers may be reading prefetches at once.
#[derive(Debug)]
struct PrefetchSlots {
    max: usize,
    busy: AtomicUsize,
}

impl PrefetchSlots {
    /// Takes a slot if one is free.
    fn take(&self) -> bool {
        let mut cur = self.busy.load(Ordering::Acquire);
        while cur < self.max {
            match self
                .busy
                .compare_exchange(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
        false
    }

    fn give_back(&self) {
        self.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

impl IoPool {
    /// Starts `threads` workers reading from `store`.
    pub fn new(store: Arc<ExpertStore>, threads: usize) -> Self {
        Self::with_prefetch_limit(store, threads, 0)
    }

    /// Starts `threads` workers reading from `store`, at most `prefetch_readers` of them busy
    /// with prefetches at once (0: no limit).
    pub fn with_prefetch_limit(store: Arc<ExpertStore>, threads: usize, prefetch_readers: usize) -> Self {
        let threads = threads.max(1);
        let slots = Arc::new(PrefetchSlots {
            max: if prefetch_readers == 0 {
                threads
            } else {
                prefetch_readers
            },
            busy: AtomicUsize::new(0),
        });
        let (demand_tx, demand_rx) = unbounded::<LoadJob>();
        let (prefetch_tx, prefetch_rx) = unbounded::<LoadJob>();
        let (done_tx, done_rx) = unbounded::<LoadDone>();
        let workers = (0..threads)
            .map(|i| {
                let (store, demand_rx, prefetch_rx, done_tx, slots) = (
                    store.clone(),
                    demand_rx.clone(),
                    prefetch_rx.clone(),
                    done_tx.clone(),
                    slots.clone(),
                );
                std::thread::Builder::new()
                    .name(format!("shadowmoe-io-{i}"))
                    .spawn(move || worker(&store, &demand_rx, &prefetch_rx, &done_tx, &slots))
                    .expect("spawning an I/O thread")
            })
            .collect();
        Self {
            demand: Some(demand_tx),
            prefetch: Some(prefetch_tx),
            done: done_rx,
            workers,
        }
    }

    /// Queues a load; demand loads are served before any queued prefetch.
    pub fn submit(&self, job: LoadJob, demand: bool) -> Result<()> {
        let tx = if demand { &self.demand } else { &self.prefetch };
        tx.as_ref()
            .and_then(|t| t.send(job).ok())
            .ok_or_else(|| EngineError::invalid("I/O pool", "the I/O threads have stopped"))
    }

    /// Waits for the next finished load.
    pub fn recv(&self) -> Result<LoadDone> {
        self.done
            .recv()
            .map_err(|_| EngineError::invalid("I/O pool", "the I/O threads have stopped"))
    }

    /// The next finished load, waiting at most `timeout` (None: none finished in that time).
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Option<LoadDone>> {
        match self.done.recv_timeout(timeout) {
            Ok(d) => Ok(Some(d)),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => Ok(None),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                Err(EngineError::invalid("I/O pool", "the I/O threads have stopped"))
            }
        }
    }

    /// The next finished load, if one is ready.
    pub fn try_recv(&self) -> Option<LoadDone> {
        self.done.try_recv().ok()
    }

    pub fn threads(&self) -> usize {
        self.workers.len()
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        self.demand.take();
        self.prefetch.take();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn worker(
    store: &ExpertStore,
    demand: &Receiver<LoadJob>,
    prefetch: &Receiver<LoadJob>,
    done: &Sender<LoadDone>,
    slots: &PrefetchSlots,
) {
    loop {
        // A prefetch only with a free prefetch slot; without one, demand loads alone (and a
        // look again soon, when a slot may have freed).
        let reserved = slots.take();
        let (job, is_prefetch) = if reserved {
            select_biased! {
                recv(demand) -> j => (j, false),
                recv(prefetch) -> j => (j, true),
            }
        } else {
            select_biased! {
                recv(demand) -> j => (j, false),
                default(Duration::from_millis(1)) => continue,
            }
        };
        if reserved && !is_prefetch {
            slots.give_back();
        }
        // A closed channel means the pool is shutting down.
        let Ok(mut job) = job else { return };
        let release = || {
            if is_prefetch {
                slots.give_back();
            }
        };
        if job.cancelled.load(Ordering::Acquire) {
            release();
            let _ = done.send(LoadDone {
                id: job.id,
                key: job.key,
                buf: job.buf,
                result: Ok(0),
                latency: Duration::ZERO,
                started: None,
                cancelled: true,
            });
            continue;
        }
        let start = Instant::now();
        let key = job.key;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match job.buf.as_mut() {
            Some(buf) => store.read_into(key, buf),
            None => store.touch_mapped(key),
        }))
        .unwrap_or_else(|_| {
            Err(EngineError::invalid(
                format!("{key}"),
                "the I/O thread panicked while reading",
            ))
        });
        release();
        let _ = done.send(LoadDone {
            id: job.id,
            key,
            buf: job.buf,
            result,
            latency: start.elapsed(),
            started: Some(start),
            cancelled: false,
        });
    }
}
