//! The shadow model and the baseline predictors (filled by the train-shadow issue).
//!
//! The dependency direction is fixed now: `predictor` depends on `engine` and `trace` (and,
//! later, burn).
pub use shadowmoe_engine as engine;
pub use shadowmoe_trace as trace;
