//! Experiment binaries (`trace-collect`, `trace-stats`; later `train-shadow`, `bench-sweep`),
//! the trace-driven simulator and figures.
//!
//! The dependency direction is fixed: `experiments` depends on every other crate of ours.

pub mod args;
pub mod calibrate;
pub mod collect;
pub mod dataset;
pub mod figures;
pub mod live;
pub mod shards;
pub mod sim;
pub mod slurm;
pub mod sweep;
pub mod trace_stats;
pub mod train_shadow;

pub use shadowmoe_engine as engine;
pub use shadowmoe_predictor as predictor;
pub use shadowmoe_trace as trace;

/// Sets up logging to stderr (`RUST_LOG` overrides the default `warn`).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // wgpu's GL probe and cubecl's failed adapter probes (the CPU fallback
                // covers them) are noise by default; RUST_LOG shows them.
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new("warn,wgpu_hal=off,cubecl_common=off")
                }),
        )
        .init();
}

/// Runs a binary's body, printing an error chain on one line and exiting 1 on failure.
pub fn main_with(f: impl FnOnce() -> anyhow::Result<()>) {
    init_logging();
    if let Err(e) = f() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
