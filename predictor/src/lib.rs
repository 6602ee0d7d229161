//! The shadow model and the baseline predictors: what the router of a later layer will choose,
//! predicted from the hidden state of an earlier one.
//!
//! - [`data`]: examples from traces (hidden state at layer L → experts at L + D), split by
//!   request;
//! - [`baselines`]: popularity, previous-token, gate-lookahead, oracle;
//! - [`shadow`]: the Burn MLP and its losses; [`train`]: the training loop, backends,
//!   prediction; [`runtime`]: the predictor file and its loader;
//! - [`eval`]: recall@k, precision@k and exact-set match per depth and target layer.

pub mod baselines;
pub mod data;
pub mod eval;
pub mod runtime;
pub mod shadow;
pub mod train;

pub use burn;
pub use runtime::{PredictorError, PredictorMeta, ShadowPredictor};
pub use shadow::{LossKind, ShadowShape};
pub use shadowmoe_engine as engine;
pub use shadowmoe_trace as trace;
pub use train::{BackendChoice, TrainConfig};
