//! shadowmoe's inference engine: Hugging Face MoE checkpoints (qwen3_moe, olmoe, mixtral,
//! qwen2_moe, qwen3_next, deepseek_v3, gpt_oss) loaded through memory maps and run on the CPU.
//!
//! The pieces, in the order a token meets them:
//! - [`Checkpoint`] opens `config.json` ([`ModelConfig`]), the safetensors weights
//!   ([`WeightIndex`]) and the tokenizer with its chat template ([`Tokenizer`]).
//! - [`Model::forward`] runs a pass: attention with a KV cache (or qwen3_next's Gated
//!   DeltaNet with its recurrent state, or deepseek_v3's latent attention with its cache of
//!   latents), then per layer a dense MLP or a
//!   MoE block, where a [`Router`] makes a [`RoutingDecision`] and an [`ExpertProvider`] serves
//!   each chosen expert's weights.
//! - A [`RoutingObserver`] sees every decision (and, on request, the router's input).
//! - [`generate`] prefill + decode loop with [`Sampler`].
//!
//! Dimension legend used in comments: `T` tokens, `S` cached positions, `H` hidden,
//! `V` vocabulary, `E` experts, `K` top-k, `I` expert width, `Dh` head_dim.
//!
//! This crate never depends on burn, polars, plotters or clap.

pub mod attention;
pub mod checkpoint;
pub mod clock;
pub mod config;
pub mod deepseek_v3;
pub mod error;
pub mod generate;
pub mod ggml;
pub mod gguf;
pub mod gpt_oss;
pub mod hub;
pub mod inflate;
pub mod kernels;
pub mod model;
pub mod moe;
pub mod observer;
pub mod offload;
pub mod predict;
mod prefetcher;
pub mod quant;
pub mod qwen3_next;
pub mod rope;
pub mod sampling;
pub mod tokenizer;
pub mod weights;

pub use attention::KvCache;
pub use checkpoint::{Checkpoint, GenerationConfig};
pub use config::{Arch, MlpKind, ModelConfig, RoutingRule};
pub use error::{EngineError, Result};
pub use generate::{
    GenerateOptions, GenerationStats, current_rss_bytes, generate, generate_cached, peak_rss_bytes,
    repetition, trim_heap,
};
pub use model::{LogitsFor, Model, OpProfile};
pub use moe::{ExpertProvider, ExpertWeights, InMemoryExperts, Router, RoutingDecision, Selection};
pub use observer::{NoObserver, Phase, RecordedRoute, RecordingObserver, RouteEvent, RoutingObserver};
pub use sampling::{Sampler, SamplingParams};
pub use tokenizer::{ChatMessage, TextStream, Tokenizer};
pub use weights::{DType, Weight, WeightIndex};

/// Threads the forward pass uses.
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// Threads per core `--threads` may ask for (oversubscribing a little is allowed for
/// experiments).
pub const MAX_THREADS_PER_CORE: usize = 4;

/// Sets the number of threads the forward pass uses (the global rayon pool). Call once, before
/// the first forward pass; `0` means one per core.
///
/// More than [`MAX_THREADS_PER_CORE`] threads per core of this machine is refused: rayon would
/// spawn them all (10,000 threads take minutes) and a forward pass gains nothing past the cores.
pub fn init_threads(threads: usize) -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let most = cores * MAX_THREADS_PER_CORE;
    if threads > most {
        return Err(EngineError::invalid(
            "--threads",
            format!(
                "{threads} is more than this machine can use: it has {cores} cores (expected at most {most}, {MAX_THREADS_PER_CORE} per core; 0 means one per core)"
            ),
        ));
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .map_err(|e| EngineError::invalid("--threads", e.to_string()))
}
