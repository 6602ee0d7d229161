//! Routing traces (filled by the trace-collect issue): the Parquet schema of
//! `../shared/DESIGN.md`, the writer that plugs into the engine's
//! [`shadowmoe_engine::RoutingObserver`], readers, statistics and expert profiles.
//!
//! The dependency direction is fixed now: `trace` depends on `engine` (and, later, polars).
pub use shadowmoe_engine as engine;
