//! Figure 5: reuse-distance CDF per MoE layer. Input: `stats/stats.json` (trace-stats).
//!
//! `bash notebooks-rs/run.sh fig5 RUN_DIR [OUT]`

fn main() {
    shadowmoe_notebooks::figure("fig5_reuse_distance_cdf");
}
