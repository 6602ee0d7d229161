//! `shadowmoe perplexity`: how well the model, run with the given cache, pinning and miss
//! flags, predicts a text — so that the quality cost of skip-on-miss can be measured at any
//! capacity on any text.
//!
//! Definitions (stated in the output too): the text is tokenized as it is, cut into windows of
//! `--ctx` tokens that are scored independently (each from an empty KV cache); every token of a
//! window but its first is predicted from the ones before it. Perplexity is `exp(mean NLL)`
//! over the predicted tokens (natural log); bits per byte is the summed NLL in bits over the
//! UTF-8 bytes of the text scored.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;
use shadowmoe_engine::{LogitsFor, Model, NoObserver, Phase};

use crate::offload;

#[derive(Args, Debug)]
pub struct PerplexityArgs {
    /// Checkpoint directory (Hugging Face layout), or a hub id in the local cache.
    #[arg(long)]
    pub model: String,
    /// Threads for the forward pass (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// A UTF-8 text file, scored as one document.
    #[arg(long, conflicts_with = "dataset", required_unless_present = "dataset")]
    pub text: Option<PathBuf>,
    /// A JSONL dataset (one JSON object per line with a `text` or `prompt` string, or chat
    /// `messages` whose contents are joined by blank lines): each line is its own document.
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// Tokens per window (at least 2).
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Score one token per forward pass, as decode meets the expert cache, instead of one pass
    /// per window (the default under `--on-miss skip`, where the two differ: a miss in a
    /// window's single pass drops that expert for every token of it).
    #[arg(long)]
    pub per_token: bool,
    /// Write the result as JSON to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub cache: offload::CacheArgs,
}

/// The result, as `--out` writes it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Perplexity {
    pub model: String,
    pub documents: usize,
    pub windows: usize,
    pub ctx: usize,
    /// Tokens predicted (every token of a window but its first).
    pub predicted_tokens: u64,
    pub bytes: u64,
    pub nll_sum: f64,
    pub perplexity: f64,
    pub bits_per_byte: f64,
    /// `window` (one pass per window) or `token` (one pass per token).
    pub passes: String,
    pub on_miss: String,
    pub capacity: Option<String>,
}

/// The documents of `--text` or `--dataset`.
fn documents(a: &PerplexityArgs) -> Result<Vec<String>> {
    if let Some(path) = &a.text {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--text: cannot read {} as UTF-8 text", path.display()))?;
        return Ok(vec![text]);
    }
    let Some(path) = &a.dataset else {
        bail!("give --text FILE or --dataset FILE");
    };
    let body = std::fs::read_to_string(path)
        .with_context(|| format!("--dataset: cannot read {}", path.display()))?;
    let mut docs = Vec::new();
    for (i, line) in body.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("--dataset {}: line {}: not a JSON object", path.display(), i + 1))?;
        // A chat becomes its messages' contents joined by blank lines (as trace-collect's
        // --no-chat-template reads it).
        let chat = v.get("messages").and_then(|m| m.as_array()).map(|m| {
            m.iter()
                .filter_map(|x| x.get("content").and_then(|c| c.as_str()))
                .collect::<Vec<_>>()
                .join("\n\n")
        });
        let text = v
            .get("text")
            .or_else(|| v.get("prompt"))
            .and_then(|t| t.as_str())
            .map(str::to_string)
            .or(chat)
            .with_context(|| {
                format!(
                    "--dataset {}: line {}: expected a string field `text` or `prompt`, or `messages`",
                    path.display(),
                    i + 1
                )
            })?;
        docs.push(text);
    }
    Ok(docs)
}

/// `-log p(target)` under `logits`, in f64.
fn nll(logits: &[f32], target: u32) -> Result<f64> {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let z: f64 = logits.iter().map(|&x| f64::from(x - m).exp()).sum();
    let x = logits
        .get(target as usize)
        .context("a token id outside the logits (tokenizer larger than the vocabulary)")?;
    let v = z.ln() - f64::from(x - m);
    if !v.is_finite() {
        bail!("the model's logits are not finite (NaN or infinite weights?)");
    }
    Ok(v)
}

/// Summed NLL and predicted tokens of one window.
fn score_window(model: &Model, ids: &[u32], per_token: bool) -> Result<(f64, u64)> {
    let mut kv = model.new_cache();
    let mut sum = 0.0;
    if per_token {
        for (pos, &id) in ids[..ids.len() - 1].iter().enumerate() {
            let phase = if pos == 0 { Phase::Prefill } else { Phase::Decode };
            let logits = model.forward(&[id], &mut kv, phase, LogitsFor::Last, &mut NoObserver)?;
            sum += nll(&Model::last_row(&logits), ids[pos + 1])?;
        }
    } else {
        let logits = model.forward(
            &ids[..ids.len() - 1],
            &mut kv,
            Phase::Prefill,
            LogitsFor::All,
            &mut NoObserver,
        )?;
        for (row, &target) in logits.outer_iter().zip(&ids[1..]) {
            let row = row.as_slice().context("logits rows are contiguous")?;
            sum += nll(row, target)?;
        }
    }
    Ok((sum, ids.len() as u64 - 1))
}

pub fn run(a: PerplexityArgs) -> Result<()> {
    if a.ctx < 2 {
        bail!("--ctx: expected at least 2 tokens (one to condition on, one to predict)");
    }
    if let Some(out) = &a.out {
        offload::check_out_file(out)?;
    }
    let docs = documents(&a)?;
    let ckpt = crate::open(&crate::ModelArgs {
        model: a.model.clone(),
        threads: a.threads,
    })?;
    let tok = ckpt.tokenizer()?;
    let mut windows: Vec<Vec<u32>> = Vec::new();
    let mut bytes = 0u64;
    for d in &docs {
        let ids = tok.encode(d)?;
        if ids.len() < 2 {
            continue;
        }
        bytes += d.len() as u64;
        windows.extend(ids.chunks(a.ctx).filter(|w| w.len() >= 2).map(<[u32]>::to_vec));
    }
    if windows.is_empty() {
        bail!("nothing to score: every document encodes to fewer than 2 tokens");
    }
    let per_token = a.per_token || a.cache.skips_misses();
    let longest = windows.iter().map(Vec::len).max().unwrap_or(0);
    let mut loaded = a.cache.load(&ckpt, longest)?;
    let total: u64 = windows.iter().map(|w| w.len() as u64 - 1).sum();
    let bar = indicatif::ProgressBar::new(total).with_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} tokens scored ({eta} left)")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let (mut nll_sum, mut n) = (0.0, 0u64);
    for w in &windows {
        let (s, k) = score_window(&loaded.model, w, per_token)?;
        nll_sum += s;
        n += k;
        bar.inc(k);
    }
    bar.finish_and_clear();
    let r = Perplexity {
        model: a.model.clone(),
        documents: docs.len(),
        windows: windows.len(),
        ctx: a.ctx,
        predicted_tokens: n,
        bytes,
        nll_sum,
        perplexity: (nll_sum / n as f64).exp(),
        bits_per_byte: nll_sum / std::f64::consts::LN_2 / bytes as f64,
        passes: if per_token { "token" } else { "window" }.into(),
        on_miss: a.cache.on_miss_name().into(),
        capacity: a.cache.capacity_name(),
    };
    println!(
        "perplexity {:.4} | bits per byte {:.4} | {} tokens predicted in {} windows of up to {} ({} documents, {} bytes; one pass per {})",
        r.perplexity, r.bits_per_byte, r.predicted_tokens, r.windows, r.ctx, r.documents, r.bytes, r.passes
    );
    a.cache.finish(&mut loaded, None, longest)?;
    if let Some(out) = &a.out {
        let tmp = out.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&r)?)
            .with_context(|| format!("--out: cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, out).with_context(|| format!("--out: cannot write {}", out.display()))?;
    }
    Ok(())
}
