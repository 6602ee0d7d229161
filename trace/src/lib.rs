//! Routing traces: the Parquet schema of `../shared/DESIGN.md`, the writer that plugs into the
//! engine's [`RoutingObserver`](shadowmoe_engine::RoutingObserver), readers, statistics and
//! expert profiles.
//!
//! One row per (request, token, MoE layer):
//!
//! | column | type | meaning |
//! |---|---|---|
//! | `request` | UInt32 | index of the prompt in the dataset |
//! | `token` | UInt32 | position in the request, prefill and decode together |
//! | `phase` | UInt8 | 0 prefill, 1 decode |
//! | `layer` | UInt16 | model layer index of the MoE layer |
//! | `token_id` | UInt32 | the token processed at that position |
//! | `experts` | List(UInt16) | routed experts, best first |
//! | `weights` | List(Float32) | their gate weights as the model applies them |
//! | `hidden` | Binary, nullable | the router's input as little-endian f16, for the layers asked for |
//!
//! The manifest (model, config sha256, dataset sha256, sampling, harness version...) is the
//! Parquet key-value metadata entry `shadowmoe.manifest` (JSON).

pub mod reader;
pub mod schema;
pub mod stats;
pub mod writer;

use std::path::{Path, PathBuf};

pub use reader::{RequestRouting, Trace};
pub use schema::Manifest;
pub use shadowmoe_engine as engine;
pub use stats::TraceStats;
pub use writer::{CollectPlan, TraceWriter};

/// Everything the trace crate can fail with.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Polars' message on one line (it spreads some over several, with hints).
    #[error("{path}: {}", one_line(error))]
    Polars {
        path: PathBuf,
        error: polars::error::PolarsError,
    },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("{what}: {message}")]
    Invalid { what: String, message: String },
    #[error(transparent)]
    Engine(#[from] shadowmoe_engine::EngineError),
}

/// The crate's result type.
pub type Result<T, E = TraceError> = std::result::Result<T, E>;

impl TraceError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub fn polars(path: &Path, source: polars::error::PolarsError) -> Self {
        Self::Polars {
            path: path.to_path_buf(),
            error: source,
        }
    }

    pub fn format(path: &Path, message: impl Into<String>) -> Self {
        Self::Format {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }

    pub fn invalid(what: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            what: what.into(),
            message: message.into(),
        }
    }
}

/// `e`'s message with its line breaks (and the blank lines around them) folded into "; ".
fn one_line(e: &impl std::fmt::Display) -> String {
    e.to_string()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}
