//! The engine's error type. Every variant that concerns a file carries its path, and every
//! variant that concerns a field or tensor names it, so that a one-line message tells the user
//! what to fix.

use std::path::{Path, PathBuf};

/// Everything the engine can fail with.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: file not found ({what})")]
    MissingFile { path: PathBuf, what: &'static str },

    #[error("{path}: not valid JSON: {message}")]
    Json { path: PathBuf, message: String },

    #[error("{path}: field `{field}`: {message}")]
    ConfigField {
        path: PathBuf,
        field: String,
        message: String,
    },

    #[error(
        "{path}: unsupported model_type `{got}` (supported: {})",
        supported.join(", ")
    )]
    UnsupportedModelType {
        path: PathBuf,
        got: String,
        supported: Vec<&'static str>,
    },

    #[error("{path}: invalid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },

    #[error("{path}: tensor `{tensor}`: {message}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        message: String,
    },

    #[error("tensor `{tensor}` not found in {path}")]
    MissingTensor { path: PathBuf, tensor: String },

    #[error("{path}: tensor `{tensor}` has shape {got:?}, expected {expected:?} from config.json")]
    Shape {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },

    #[error("{path}: tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },

    #[error("{path}: chat_template: {message}")]
    ChatTemplate { path: PathBuf, message: String },

    #[error("model `{id}`: {message}")]
    ModelLookup { id: String, message: String },

    #[error("{what}: {message}")]
    Invalid { what: String, message: String },
}

/// The engine's result type.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

impl EngineError {
    /// An I/O error on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// A problem with field `field` of the file at `path`.
    pub fn field(path: &Path, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::ConfigField {
            path: path.to_path_buf(),
            field: field.into(),
            message: message.into(),
        }
    }

    /// A problem with a caller-supplied value (`what` names the argument or flag).
    pub fn invalid(what: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            what: what.into(),
            message: message.into(),
        }
    }
}
