//! Figure 1: decode hit rate vs capacity per eviction policy (lru, lfu, lcp, belady), with and
//! without pinning, no prefetching, sync misses. Input: sweep rows (`*/results.parquet`).
//!
//! `bash notebooks-rs/run.sh fig1 RUN_DIR [OUT]`

fn main() {
    shadowmoe_notebooks::figure("fig1_hit_rate_vs_capacity");
}
