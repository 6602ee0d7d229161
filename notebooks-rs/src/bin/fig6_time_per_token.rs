//! Figure 6: stacked per-token decode time (compute, I/O stall, predictor) vs capacity, measured
//! in live rows, else modelled in sim rows. Input: sweep rows.
//!
//! `bash notebooks-rs/run.sh fig6 RUN_DIR [OUT]`

fn main() {
    shadowmoe_notebooks::figure("fig6_time_per_token");
}
