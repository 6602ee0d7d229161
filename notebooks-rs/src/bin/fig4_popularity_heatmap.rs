//! Figure 4: expert popularity heatmap, MoE layer × expert. Input: `profile.json` (trace-stats).
//!
//! `bash notebooks-rs/run.sh fig4 RUN_DIR [OUT]`

fn main() {
    shadowmoe_notebooks::figure("fig4_popularity_heatmap");
}
