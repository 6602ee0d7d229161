//! Figure 9, the headline: decode tok/s and I/O stall per token vs capacity per predictor, live
//! and simulated on one chart. Input: the rows of a live and a simulated sweep of one run folder.
//!
//! `bash notebooks-rs/run.sh fig9 RUN_DIR [OUT]`

fn main() {
    shadowmoe_notebooks::figure("fig9_headline");
}
