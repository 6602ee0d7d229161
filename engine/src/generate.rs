//! The generation loop: prefill the prompt in one pass, then decode one token at a time with
//! the KV cache, timing both phases.

use std::time::Instant;

use crate::attention::KvCache;
use crate::error::Result;
use crate::model::{LogitsFor, Model};
use crate::observer::{Phase, RoutingObserver};
use crate::sampling::{Sampler, SamplingParams};

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Stop at these token ids (the stop token is kept in the output). Empty: never stop early.
    pub eos_token_ids: Vec<u32>,
}

/// Timings of one generation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_secs: f64,
    /// Decode steps after the first generated token (which prefill produced).
    pub decode_steps: usize,
    pub decode_secs: f64,
}

impl GenerationStats {
    /// Prompt tokens per second of prefill.
    pub fn prefill_tok_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_secs.max(f64::MIN_POSITIVE)
    }

    /// Decode tokens per second, after the first token; `None` with fewer than one step.
    pub fn decode_tok_s(&self) -> Option<f64> {
        (self.decode_steps > 0).then(|| self.decode_steps as f64 / self.decode_secs.max(f64::MIN_POSITIVE))
    }
}

/// Generates up to `opts.max_new_tokens` after `prompt`, calling `on_token` for each new id as
/// soon as it is chosen. Returns the new ids and the timings. With 0 new tokens the prompt is
/// still run (the observer sees its routing: a teacher-forced trace), and nothing is sampled.
pub fn generate(
    model: &Model,
    prompt: &[u32],
    opts: &GenerateOptions,
    observer: &mut dyn RoutingObserver,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<(Vec<u32>, GenerationStats)> {
    let mut cache = model.new_cache();
    cache.reserve(prompt.len() + opts.max_new_tokens);
    generate_cached(model, &mut cache, prompt, opts, observer, |id| {
        on_token(id).map(|()| true)
    })
}

/// [`generate`] continuing from `cache`, which already holds the positions before `new_tokens`
/// (a conversation's earlier turns: the caller checks that they are the prompt's first
/// tokens); `new_tokens` (at least one) are run as the prefill. `on_token` returns whether to go
/// on: `false` stops after that token (a stop string, a client that left) without an error.
///
/// Afterwards `cache` holds the positions of `new_tokens` and of every returned id but the last
/// (the last one chosen is never run): the next turn can continue from it.
pub fn generate_cached(
    model: &Model,
    cache: &mut KvCache,
    new_tokens: &[u32],
    opts: &GenerateOptions,
    observer: &mut dyn RoutingObserver,
    mut on_token: impl FnMut(u32) -> Result<bool>,
) -> Result<(Vec<u32>, GenerationStats)> {
    opts.sampling.validate()?;
    let mut stats = GenerationStats {
        prompt_tokens: new_tokens.len(),
        ..Default::default()
    };
    let mut sampler = Sampler::new(opts.sampling);
    let mut out = Vec::with_capacity(opts.max_new_tokens);
    let start = Instant::now();
    let logits = model.forward(new_tokens, cache, Phase::Prefill, LogitsFor::Last, observer)?;
    if opts.max_new_tokens == 0 {
        stats.prefill_secs = start.elapsed().as_secs_f64();
        return Ok((out, stats));
    }
    let mut next = sampler.sample(&Model::last_row(&logits));
    stats.prefill_secs = start.elapsed().as_secs_f64();

    let decode_start = Instant::now();
    loop {
        out.push(next);
        let go_on = on_token(next)?;
        if !go_on || out.len() >= opts.max_new_tokens || opts.eos_token_ids.contains(&next) {
            break;
        }
        let logits = model.forward(&[next], cache, Phase::Decode, LogitsFor::Last, observer)?;
        next = sampler.sample(&Model::last_row(&logits));
        stats.decode_steps += 1;
    }
    stats.decode_secs = decode_start.elapsed().as_secs_f64();
    stats.generated_tokens = out.len();
    Ok((out, stats))
}

/// Peak resident set size of this process in bytes (Linux: VmHWM), if the OS tells.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Returns the heap's free pages to the system where the allocator can (glibc's
/// `malloc_trim`), so that the resident set measures what is in use.
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Resident set size of the process now (Linux `VmRSS`), bytes.
pub fn current_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Repetition of a generation, flash-moe's way of catching a model that has fallen into a loop:
/// the share of the `n`-grams of the last `window` tokens of `tokens` that already occurred
/// earlier in that window (0: every n-gram new; near 1: one phrase over and over). Fewer than
/// `n + 1` tokens give 0.
pub fn repetition(tokens: &[u32], n: usize, window: usize) -> f64 {
    let n = n.max(1);
    let w = &tokens[tokens.len().saturating_sub(window)..];
    if w.len() <= n {
        return 0.0;
    }
    let mut seen = std::collections::HashSet::new();
    let (mut total, mut repeated) = (0usize, 0usize);
    for g in w.windows(n) {
        total += 1;
        if !seen.insert(g) {
            repeated += 1;
        }
    }
    repeated as f64 / total as f64
}

#[cfg(test)]
mod tests {
    use super::repetition;

    #[test]
    fn repetition_counts_repeated_ngrams_in_the_last_window() {
        // A loop of period 3 repeats every 4-gram after the first three.
        let looped: Vec<u32> = (0..30).map(|i| i % 3).collect();
        assert!((repetition(&looped, 4, 30) - 24.0 / 27.0).abs() < 1e-12);
        let fresh: Vec<u32> = (0..30).collect();
        assert_eq!(repetition(&fresh, 4, 30), 0.0);
        // Only the window counts: fresh tokens after a loop score 0 on a short window.
        let mut both = looped.clone();
        both.extend(100..120);
        assert_eq!(repetition(&both, 4, 20), 0.0);
        assert!(repetition(&both, 4, 50) > 0.4);
        assert_eq!(repetition(&[1, 2, 3], 4, 100), 0.0);
    }
}
