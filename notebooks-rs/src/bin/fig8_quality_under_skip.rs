//! Figure 8: quality vs capacity under skip-on-miss: top-1 agreement, KL divergence and
//! perplexity against the exact model. Input: live sweep rows with `--on-miss skip`.
//!
//! `bash notebooks-rs/run.sh fig8 RUN_DIR [OUT]`

fn main() {
    shadowmoe_notebooks::figure("fig8_quality_under_skip");
}
