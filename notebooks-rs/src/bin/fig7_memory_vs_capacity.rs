//! Figure 7: memory vs capacity: the modelled expert cache (sim) and the measured peak RSS next to
//! the byte model (live). Input: sweep rows.
//!
//! `bash notebooks-rs/run.sh fig7 RUN_DIR [OUT]`

fn main() {
    shadowmoe_notebooks::figure("fig7_memory_vs_capacity");
}
