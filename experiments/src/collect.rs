//! `trace-collect`: run a model over a prompt dataset and write every routing decision to
//! Parquet (see `shadowmoe_trace`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use shadowmoe_engine::offload::{IoMode, OffloadConfig};
use shadowmoe_engine::{Checkpoint, GenerateOptions, SamplingParams, generate};
use shadowmoe_trace::schema::{Manifest, TRACE_FORMAT};
use shadowmoe_trace::writer::FinishSummary;
use shadowmoe_trace::{CollectPlan, TraceWriter};

use crate::args::{parse_list, parse_shard};
use crate::dataset;

/// Flags of `trace-collect`.
#[derive(Args, Debug, Clone)]
pub struct CollectArgs {
    /// Checkpoint directory, or a hub id already in the local Hugging Face cache.
    #[arg(long)]
    pub model: String,
    /// Prompt set (JSONL; see datasets/README.md).
    #[arg(long)]
    pub dataset: PathBuf,
    /// Output Parquet file (written under a temporary name, renamed when complete).
    #[arg(long)]
    pub out: PathBuf,
    /// Tokens to generate per prompt (stops earlier at end-of-sequence).
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Sample among the K most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Seed of the sampler (request r uses seed + r).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// MoE layers whose router input to store: none, all, or a list like 0,4,8 / 1..12:2.
    #[arg(long, default_value = "none")]
    pub hidden_layers: String,
    /// How hidden states are stored: f32 (exact: gate-lookahead on them reproduces the routing)
    /// or f16 (half the bytes).
    #[arg(long, default_value = "f32", value_parser = ["f32", "f16"])]
    pub hidden_dtype: String,
    /// No chat template: `prompt` lines as raw text, `messages` as their contents joined by
    /// blank lines (for base models such as the bundled reference model).
    #[arg(long)]
    pub no_chat_template: bool,
    /// Only the first N prompts of the dataset.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Continue an interrupted collection from its last complete request.
    #[arg(long)]
    pub resume: bool,
    /// Take one share of the prompts: I/N (prompt i when i % N == I).
    #[arg(long)]
    pub shard: Option<String>,
    /// Threads for the forward pass (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Write a part file after this many requests (an interruption loses at most these).
    #[arg(long, default_value_t = 16)]
    pub flush_every: usize,
    /// Serve the experts from disk through a cache of N experts per MoE layer (for models
    /// larger than memory; routing and hidden states are those of the all-resident model).
    #[arg(long)]
    pub capacity: Option<usize>,
    /// With --capacity: how experts are read (direct, pread, mmap).
    #[arg(long, default_value = "direct")]
    pub io: String,
    /// With --capacity: read experts from this expert pack.
    #[arg(long)]
    pub pack: Option<PathBuf>,
    /// With --capacity: I/O threads.
    #[arg(long, default_value_t = 4)]
    pub io_threads: usize,
}

impl CollectArgs {
    /// The flags' defaults (as `trace-collect` parses them) for `model`, `dataset` and `out`:
    /// callers in code set what they need with struct update syntax.
    pub fn new(model: impl Into<String>, dataset: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        Self {
            model: model.into(),
            dataset: dataset.into(),
            out: out.into(),
            max_new_tokens: 64,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            hidden_layers: "none".into(),
            hidden_dtype: "f32".into(),
            no_chat_template: false,
            limit: None,
            resume: false,
            shard: None,
            threads: 0,
            flush_every: 16,
            capacity: None,
            io: "direct".into(),
            pack: None,
            io_threads: 4,
        }
    }
}

/// What a collection did.
#[derive(Debug, Clone)]
pub struct Collected {
    pub requests: usize,
    pub tokens: u64,
    pub summary: FinishSummary,
    pub secs: f64,
}

/// Resolves `--hidden-layers` against the model's MoE layers.
pub fn hidden_layers(spec: &str, moe_layers: &[usize]) -> Result<Vec<usize>> {
    let chosen = match spec.trim() {
        "none" => Vec::new(),
        "all" => moe_layers.to_vec(),
        s => parse_list("--hidden-layers", s)?,
    };
    for l in &chosen {
        if !moe_layers.contains(l) {
            bail!(
                "--hidden-layers: layer {l} is not a MoE layer of this model (MoE layers: {})",
                moe_layers
                    .iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            );
        }
    }
    Ok(chosen)
}

/// Runs a collection; `progress` shows a bar with tokens/s and ETA.
pub fn run(a: &CollectArgs, progress: bool) -> Result<Collected> {
    let start = Instant::now();
    let ckpt = Checkpoint::open(&a.model)?;
    let cfg = &ckpt.config;
    let moe_layers = cfg.moe_layers();
    let hidden = hidden_layers(&a.hidden_layers, &moe_layers)?;
    let hidden_encoding = format!("{}le", a.hidden_dtype);
    let (prompts, dataset_sha256) = dataset::load(&a.dataset)?;
    let dataset_requests = prompts.len();
    let (shard_i, shard_n) = match &a.shard {
        Some(s) => parse_shard("--shard", s)?,
        None => (0, 1),
    };
    let work: Vec<dataset::Prompt> = prompts
        .into_iter()
        .take(a.limit.unwrap_or(usize::MAX))
        .filter(|p| p.index % shard_n == shard_i)
        .collect();
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
    };
    sampling.validate()?;
    let tok = ckpt.tokenizer()?;
    let manifest = Manifest {
        format: TRACE_FORMAT.into(),
        model_id: a.model.clone(),
        config_sha256: ckpt.config_sha256()?,
        architecture: cfg.arch.model_type().into(),
        num_layers: cfg.num_hidden_layers,
        moe_layers: moe_layers.clone(),
        num_experts: cfg.num_experts,
        top_k: cfg.num_experts_per_tok,
        hidden_size: cfg.hidden_size,
        dataset: a.dataset.display().to_string(),
        dataset_sha256,
        dataset_requests,
        requests: work.len(),
        chat_template: !a.no_chat_template,
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        sampling_top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
        hidden_layers: hidden,
        hidden_encoding,
        shard: format!("{shard_i}/{shard_n}"),
        harness_version: env!("CARGO_PKG_VERSION").into(),
        harness_commit: env!("SHADOWMOE_COMMIT").into(),
        created: shadowmoe_trace::schema::utc_now(),
    };
    let plan = CollectPlan {
        out: a.out.clone(),
        manifest,
        resume: a.resume,
        flush_bytes: 64 << 20,
        flush_every: a.flush_every,
    };
    let model = match a.capacity {
        None => {
            if a.pack.is_some() {
                bail!("--pack applies to the expert cache: give --capacity N too");
            }
            ckpt.load_model()?
        }
        Some(n) => {
            let io: IoMode = a.io.parse().map_err(|e: String| anyhow::anyhow!("--io: {e}"))?;
            ckpt.offload(&OffloadConfig {
                io,
                pack: a.pack.clone(),
                io_threads: a.io_threads,
                ..OffloadConfig::per_layer(n)
            })?
            .model
        }
    };
    let (mut writer, first) = TraceWriter::create(plan)?;
    let eos = ckpt.eos_token_ids();

    let bar = if progress {
        indicatif::ProgressBar::new(work.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} requests  {msg}  eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(first as u64);
    let mut tokens = 0u64;
    let gen_start = Instant::now();
    for (pos, p) in work.iter().enumerate().skip(first as usize) {
        let ids = p
            .encode(&tok, !a.no_chat_template)
            .with_context(|| format!("{}: prompt `{}`", a.dataset.display(), p.id))?;
        let opts = GenerateOptions {
            max_new_tokens: a.max_new_tokens,
            sampling: SamplingParams {
                seed: a.seed.wrapping_add(p.index as u64),
                ..sampling
            },
            eos_token_ids: eos.clone(),
        };
        writer.begin_request(pos as u32, p.index as u32);
        match generate(&model, &ids, &opts, &mut writer, |_| Ok(())) {
            Ok((out, _)) => tokens += (ids.len() + out.len()) as u64,
            Err(e) => {
                writer.abandon_request();
                return Err(e).with_context(|| format!("request {} (`{}`)", p.index, p.id));
            }
        }
        writer.end_request()?;
        let secs = gen_start.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!(
            "{:.0} tok/s, {} rows",
            tokens as f64 / secs,
            writer.rows()
        ));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let summary = writer.finish()?;
    Ok(Collected {
        requests: work.len(),
        tokens,
        summary,
        secs: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_has_the_flags_defaults() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: CollectArgs,
        }
        let parsed = Cli::try_parse_from(["trace-collect", "--model", "m", "--dataset", "d", "--out", "o"])
            .map(|c| c.args)
            .map_err(|e| e.to_string());
        assert_eq!(
            format!("{:?}", parsed),
            format!("{:?}", Ok::<_, String>(CollectArgs::new("m", "d", "o")))
        );
    }
}
