//! Figure 3: predictor recall@k vs depth for the shadow model and the baselines. Input:
//! `shadow/report.json` (train-shadow).
//!
//! `bash notebooks-rs/run.sh fig3 RUN_DIR [OUT]`

fn main() {
    shadowmoe_notebooks::figure("fig3_predictor_recall");
}
