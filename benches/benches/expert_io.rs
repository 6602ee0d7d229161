//! Expert-load throughput of the I/O pool in `direct` mode (O_DIRECT) for 1..N threads, with
//! the synthetic checkpoint's expert size, against a plain sequential O_DIRECT read of the same
//! pack file with the same block size, measured in the same run. Prints the ratio.
//!
//!     cargo bench -p shadowmoe-benches --bench expert_io
//!
//! Environment: `SHADOWMOE_BENCH_DIR` (keeps the ~3.4 GB checkpoint and ~3.2 GB pack between
//! runs), `SHADOWMOE_BENCH_LOADS` (expert loads per measurement, default 96).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use shadowmoe_benches::*;
use shadowmoe_engine::Checkpoint;
use shadowmoe_engine::offload::pool::LoadJob;
use shadowmoe_engine::offload::{ExpertKey, IoMode, IoPool, PageBuf, align_up, pack};

fn main() {
    let loads: usize = std::env::var("SHADOWMOE_BENCH_LOADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(96);
    let (dir, _tmp) = bench_dir();
    ensure_checkpoint(&dir);
    let ckpt = Checkpoint::open_dir(&dir).unwrap();
    let pack_dir = dir.join("experts.pack");
    if !pack_dir.exists() {
        let t = Instant::now();
        pack::write_pack(&ckpt.dir, &ckpt.config, &ckpt.weights, &pack_dir, |_, _| {}).unwrap();
        eprintln!("wrote expert pack in {:.1}s", t.elapsed().as_secs_f64());
    }
    let store = Arc::new(ckpt.expert_store(IoMode::Direct, Some(&pack_dir), false).unwrap());
    let mode = store.mode();
    let expert_bytes = store.expert_bytes();
    let block = align_up(expert_bytes) as usize;
    println!(
        "expert-load throughput: pack of {} experts x {:.1} MB, read mode {} (requested direct), {loads} loads per row",
        EXPERTS * LAYERS,
        expert_bytes as f64 / 1e6,
        mode.name()
    );
    println!();
    println!("| threads | pool GB/s (median of 3) | sequential GB/s, same block (median of 3) | ratio |");
    println!("|---:|---:|---:|---:|");
    let max_threads = std::thread::available_parallelism().map_or(2, |n| n.get()).max(4);
    let mut threads = 1;
    let mut seed = 1u64;
    while threads <= max_threads {
        // Alternate baseline and pool three times; report medians (the disk is noisy).
        let (mut pools, mut seqs) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            seqs.push(sequential_gbs(&pack_dir.join("experts.bin"), block, loads, seed));
            pools.push(pool_gbs(&store, threads, loads, seed + 1));
            seed += 13;
        }
        let (pool, seq) = (median(&mut pools), median(&mut seqs));
        println!("| {threads} | {pool:.2} | {seq:.2} | {:.2} |", pool / seq);
        threads *= 2;
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `loads` expert loads through the pool with `threads` workers, two loads queued per worker.
fn pool_gbs(
    store: &Arc<shadowmoe_engine::offload::ExpertStore>,
    threads: usize,
    loads: usize,
    seed: u64,
) -> f64 {
    let pool = IoPool::new(store.clone(), threads);
    let mut rng = shadowmoe_engine::sampling::Rng::new(seed);
    let keys: Vec<ExpertKey> = (0..loads)
        .map(|_| {
            ExpertKey::new(
                rng.next_u64() as usize % LAYERS,
                (rng.next_u64() % EXPERTS as u64) as u32,
            )
        })
        .collect();
    let mut free: Vec<PageBuf> = (0..2 * threads)
        .map(|_| PageBuf::zeroed(store.slot_bytes()))
        .collect();
    let mut queue: VecDeque<ExpertKey> = keys.into();
    let start = Instant::now();
    let (mut bytes, mut outstanding) = (0u64, 0usize);
    while !queue.is_empty() || outstanding > 0 {
        while let (Some(buf), false) = (free.pop(), queue.is_empty()) {
            let key = queue.pop_front().unwrap();
            pool.submit(
                LoadJob {
                    id: 0,
                    key,
                    buf: Some(buf),
                    cancelled: Arc::new(AtomicBool::new(false)),
                },
                true,
            )
            .unwrap();
            outstanding += 1;
        }
        let done = pool.recv().unwrap();
        bytes += done.result.unwrap();
        free.push(done.buf.unwrap());
        outstanding -= 1;
    }
    bytes as f64 / start.elapsed().as_secs_f64() / 1e9
}

/// One thread reading `loads` consecutive blocks of the pack with O_DIRECT, from a random start.
fn sequential_gbs(path: &std::path::Path, block: usize, loads: usize, seed: u64) -> f64 {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .or_else(|_| std::fs::File::open(path))
        .unwrap();
    let len = f.metadata().unwrap().len() as usize;
    let blocks = len / block;
    let first = (seed as usize * 7919) % blocks.saturating_sub(loads).max(1);
    let mut buf = PageBuf::zeroed(block);
    let start = Instant::now();
    let mut bytes = 0;
    for i in 0..loads.min(blocks) {
        bytes += f
            .read_at(buf.as_mut_slice(), ((first + i) * block) as u64)
            .unwrap();
    }
    bytes as f64 / start.elapsed().as_secs_f64() / 1e9
}
