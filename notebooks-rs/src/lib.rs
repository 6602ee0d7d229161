//! Figure programs (one per paper-style figure), reading Parquet results. Filled by the
//! bench-sweep issue.
pub use shadowmoe_experiments as experiments;
pub use shadowmoe_trace as trace;
