//! Experiment binaries, the trace-driven simulator and figures (filled by the trace-collect,
//! train-shadow and bench-sweep issues).
//!
//! The dependency direction is fixed now: `experiments` depends on every other crate of ours.
pub use shadowmoe_engine as engine;
pub use shadowmoe_predictor as predictor;
pub use shadowmoe_trace as trace;
