//! Figure 2: decode hit rate and decode tok/s vs capacity per prefetch depth (the shadow
//! predictor, else gate-lookahead), and every predictor at the deepest depth. Input: sweep rows.
//!
//! `bash notebooks-rs/run.sh fig2 RUN_DIR [OUT]`

fn main() {
    shadowmoe_notebooks::figure("fig2_prefetch_depth");
}
