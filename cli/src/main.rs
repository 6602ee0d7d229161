//! `shadowmoe`: the umbrella binary. Subcommands:
//! - `generate`: stream text from a checkpoint, then report prefill/decode tok/s and peak RSS;
//! - `logits`: the engine's outside-checkable surface — logits, router choices and greedy
//!   tokens for given token ids, written to a safetensors file;
//! - `expert-pack`: write a checkpoint's experts as one aligned extent each;
//! - `inflate`: a function-preserving copy of a checkpoint at a larger hidden size and expert width;
//! - `serve`: the OpenAI and Anthropic HTTP APIs over the model, with Prometheus metrics
//!   (`shadowmoe-serve`).
//!
//! `generate` and `logits` stream experts from disk through a bounded cache when given
//! `--capacity` or `--cache-bytes` (see `offload::CacheArgs`).

mod offload;
mod perplexity;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use shadowmoe_engine::{
    ChatMessage, Checkpoint, GenerateOptions, LogitsFor, NoObserver, Phase, RecordingObserver,
    SamplingParams, TextStream, generate, peak_rss_bytes,
};

#[derive(Parser, Debug)]
#[command(
    name = "shadowmoe",
    version,
    about = "Run Mixture-of-Experts checkpoints whose experts live on SSD"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate text from a prompt or a chat message, streaming it as it comes.
    Generate(GenerateArgs),
    /// Write logits, router choices and (optionally) greedy tokens for given token ids.
    Logits(LogitsArgs),
    /// Write the checkpoint's experts as an expert pack: one 4 KiB-aligned extent per expert.
    ExpertPack(PackArgs),
    /// Write a copy of a checkpoint at a larger hidden size and expert width that computes the
    /// same function (same logits, same routing), with random bytes in the padding.
    Inflate(InflateArgs),
    /// Serve the model over HTTP: OpenAI `/v1/chat/completions` and `/v1/completions`,
    /// Anthropic `/v1/messages`, `/v1/models`, `/health` and Prometheus `/metrics`.
    Serve(ServeArgs),
    /// Perplexity and bits per byte of a text under the given cache, pinning and miss flags
    /// (windows of --ctx tokens scored independently).
    Perplexity(perplexity::PerplexityArgs),
}

#[derive(Args, Debug)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port; the one taken is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Longest prompt a request may have, in tokens (longer ones get 400).
    #[arg(long, default_value_t = 4096)]
    max_input_tokens: usize,
    /// Requests that may wait behind the running one; more get 503 with Retry-After.
    #[arg(long, default_value_t = 16)]
    queue_depth: usize,
    /// The model name clients use (default: the --model value as given).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Send chat messages as plain text (their contents joined by blank lines) instead of
    /// through the checkpoint's chat template: for base models.
    #[arg(long)]
    no_chat_template: bool,
    /// Start every request from an empty KV cache (by default a prompt that begins with the
    /// previous request's tokens reuses their KV cache).
    #[arg(long)]
    no_prefix_reuse: bool,
    /// Warm start: load the resident expert set from FILE at start (when it exists) and save
    /// it there at shutdown (SIGINT/SIGTERM).
    #[arg(long, value_name = "FILE")]
    cache_state: Option<PathBuf>,
    /// Defaults for requests that do not say (`--max-new-tokens`: when a request gives no
    /// `max_tokens`).
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    cache: offload::CacheArgs,
}

#[derive(Args, Debug)]
struct InflateArgs {
    /// Checkpoint directory or hub id (qwen3_moe: float, or MLX-quantised with switch_mlp experts).
    #[arg(long)]
    model: String,
    /// Directory to create for the inflated checkpoint (must not exist).
    #[arg(long)]
    out: PathBuf,
    /// Hidden size of the copy: the model's times a power of two (default 2048:
    /// Qwen3-Coder-Next's).
    #[arg(long, default_value_t = 2048)]
    hidden: usize,
    /// Expert width (`moe_intermediate_size`) of the copy (default 512: Qwen3-Coder-Next's).
    #[arg(long, default_value_t = 512)]
    moe_intermediate: usize,
    /// Seed of the random padding.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args, Debug)]
struct PackArgs {
    /// Checkpoint directory or hub id (as for generate).
    #[arg(long)]
    model: String,
    /// Directory to create for the pack (must not exist).
    #[arg(long)]
    out: PathBuf,
}

/// Flags every model-running command shares.
#[derive(Args, Debug)]
struct ModelArgs {
    /// Checkpoint directory (Hugging Face layout), or a hub id (Org/Name) already in the local
    /// Hugging Face cache. No network is used.
    #[arg(long)]
    model: String,
    /// Threads for the forward pass (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

#[derive(Args, Debug)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Raw prompt text, tokenized as is (with the tokenizer's own special tokens).
    #[arg(long, conflicts_with = "chat", required_unless_present = "chat")]
    prompt: Option<String>,
    /// One user message, rendered through the checkpoint's chat template.
    #[arg(long)]
    chat: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Print where the decode passes spent their time (attention, router, experts and their
    /// loads, LM head), milliseconds per token.
    #[arg(long)]
    profile_ops: bool,
    /// Print where the prompt's pass (prefill) spent its time, in the same parts.
    #[arg(long)]
    profile_prefill: bool,
    /// Print the generation's repetition: the share of its 4-grams, over the last 200
    /// generated tokens, that already occurred earlier in those 200 (flash-moe's loop check).
    #[arg(long)]
    repetition_report: bool,
    /// Print the process's resident set size every N generated tokens, next to the byte
    /// model's prediction for that many tokens (with an expert cache): memory over a long run.
    #[arg(long, value_name = "N")]
    rss_every: Option<usize>,
    #[command(flatten)]
    cache: offload::CacheArgs,
}

/// Sampling flags shared by `generate` and `serve`.
#[derive(Args, Debug)]
struct SamplingArgs {
    /// Most tokens to generate (stops earlier at an end-of-sequence token).
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    /// Sample among the K most likely tokens only (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sample from the smallest set of tokens whose probability reaches P.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f32,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl SamplingArgs {
    fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
        }
    }
}

#[derive(Args, Debug)]
struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt token ids, comma-separated (e.g. 1,2,3).
    #[arg(long)]
    tokens: String,
    /// Also generate N greedy tokens after the prompt (end-of-sequence tokens do not stop it).
    #[arg(long, default_value_t = 0)]
    generate: usize,
    /// Output safetensors file: logits f32 [tokens, vocab], router_experts i64
    /// [moe_layers, tokens, top_k], router_weights f32 [moe_layers, tokens, top_k], generated
    /// i64 [N].
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    cache: offload::CacheArgs,
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,shadowmoe=info")),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => run_generate(a),
        Command::Logits(a) => run_logits(a),
        Command::ExpertPack(a) => run_pack(a),
        Command::Inflate(a) => run_inflate(a),
        Command::Serve(a) => run_serve(a),
        Command::Perplexity(a) => perplexity::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Opens the checkpoint and sets the thread count.
fn open(args: &ModelArgs) -> Result<Checkpoint> {
    shadowmoe_engine::init_threads(args.threads)?;
    let start = Instant::now();
    let ckpt = Checkpoint::open(&args.model)?;
    let c = &ckpt.config;
    tracing::info!(
        "{}: {} ({} layers, {} MoE, {} experts, top-{}) opened in {:.2}s",
        ckpt.location().display(),
        c.arch.model_type(),
        c.num_hidden_layers,
        c.moe_layers().len(),
        c.num_experts,
        c.num_experts_per_tok,
        start.elapsed().as_secs_f64()
    );
    Ok(ckpt)
}

fn run_generate(a: GenerateArgs) -> Result<()> {
    let ckpt = open(&a.model)?;
    let tok = ckpt.tokenizer()?;
    let prompt = match (&a.prompt, &a.chat) {
        (Some(p), _) => tok.encode(p)?,
        (None, Some(c)) => tok.encode_chat(&[ChatMessage::user(c.clone())])?,
        (None, None) => bail!("give --prompt TEXT or --chat TEXT"),
    };
    if prompt.is_empty() {
        bail!("--prompt: the prompt encodes to no tokens");
    }
    let context = prompt.len() + a.sampling.max_new_tokens;
    let mut loaded = a.cache.load(&ckpt, context)?;
    let model = &loaded.model;
    let opts = GenerateOptions {
        max_new_tokens: a.sampling.max_new_tokens,
        sampling: a.sampling.params(),
        eos_token_ids: ckpt.eos_token_ids(),
    };
    let mut stream = TextStream::default();
    let mut stdout = std::io::stdout().lock();
    let mut first = true;
    let mut prefill_profile = None;
    if a.profile_prefill {
        model.set_op_profile(true);
    }
    if a.rss_every == Some(0) {
        bail!("--rss-every: expected at least 1 token");
    }
    let mut produced = 0usize;
    let (generated, stats) = generate(model, &prompt, &opts, &mut NoObserver, |id| {
        produced += 1;
        if let Some(n) = a.rss_every
            && produced.is_multiple_of(n)
        {
            let mib = |b: u64| b as f64 / (1 << 20) as f64;
            let now = shadowmoe_engine::current_rss_bytes().map_or(f64::NAN, mib);
            match loaded.predicted_rss(prompt.len() + produced) {
                Some(p) => eprintln!(
                    "rss: token {produced}: {now:.1} MiB (byte model {:.1} MiB)",
                    mib(p)
                ),
                None => eprintln!("rss: token {produced}: {now:.1} MiB"),
            }
        }
        // After the prompt's pass: its profile is kept, and the decode profile starts.
        if std::mem::take(&mut first) && (a.profile_ops || a.profile_prefill) {
            if a.profile_prefill {
                prefill_profile = model.op_profile();
            }
            model.set_op_profile(a.profile_ops);
        }
        if let Some(piece) = stream.push(&tok, id)? {
            // A closed pipe (`| head`) ends the stream quietly.
            let _ = stdout.write_all(piece.as_bytes()).and_then(|_| stdout.flush());
        }
        Ok(())
    })?;
    let _ = writeln!(stdout);
    let decode = stats
        .decode_tok_s()
        .map_or("n/a (one token)".to_string(), |r| format!("{r:.1} tok/s"));
    eprintln!(
        "prefill: {} tokens, {:.1} tok/s | decode: {} tokens, {} | peak RSS: {}",
        stats.prompt_tokens,
        stats.prefill_tok_s(),
        stats.generated_tokens,
        decode,
        peak_rss_bytes().map_or("n/a".to_string(), |b| format!(
            "{:.1} MiB",
            b as f64 / (1 << 20) as f64
        )),
    );
    if a.repetition_report {
        eprintln!(
            "repetition: {:.4} (share of repeated 4-grams in the last {} of {} generated tokens)",
            shadowmoe_engine::repetition(&generated, 4, 200),
            generated.len().min(200),
            generated.len()
        );
    }
    if let Some(p) = prefill_profile {
        eprintln!(
            "prompt pass: {} tokens ({} threads)\n{}",
            p.tokens,
            shadowmoe_engine::threads(),
            p.table()
        );
    }
    if let Some(p) = model.op_profile() {
        eprintln!(
            "decode passes: {} ({} threads)\n{}",
            p.passes,
            shadowmoe_engine::threads(),
            p.table()
        );
    }
    a.cache.finish(&mut loaded, Some(&stats), context)
}

fn run_serve(a: ServeArgs) -> Result<()> {
    let opts = shadowmoe_serve::ServeOptions {
        host: a.host.clone(),
        port: a.port,
        model_id: a
            .served_model_name
            .clone()
            .unwrap_or_else(|| a.model.model.clone()),
        max_input_tokens: a.max_input_tokens,
        queue_depth: a.queue_depth,
        default_max_tokens: a.sampling.max_new_tokens,
        default_sampling: a.sampling.params(),
        chat_template: !a.no_chat_template,
        reuse_prefix: !a.no_prefix_reuse,
        cache_state: a.cache_state.clone(),
    };
    // The port first: one taken is an error before the model loads.
    let server = shadowmoe_serve::Server::bind(opts)?;
    let ckpt = open(&a.model)?;
    let context = a.max_input_tokens + a.sampling.max_new_tokens;
    // The tokenizer before the weights, so that the byte model's measured baseline has it.
    let tokenizer = ckpt.tokenizer()?;
    let mut loaded = a.cache.load(&ckpt, context)?;
    let engine = shadowmoe_serve::Engine {
        model: loaded.model.clone(),
        tokenizer,
        eos_token_ids: ckpt.eos_token_ids(),
        cached: loaded.cached.clone(),
        config_sha256: ckpt.config_sha256()?,
        byte_model: loaded.byte_model(),
    };
    server.run(engine)?;
    a.cache.finish(&mut loaded, None, context)
}

/// Parses `1,2,3`.
fn parse_tokens(s: &str) -> Result<Vec<u32>> {
    let ids = s
        .split(',')
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<u32>().with_context(|| {
                format!("--tokens: `{p}` is not a token id (expected comma-separated integers, e.g. 1,2,3)")
            })
        })
        .collect::<Result<Vec<_>>>()?;
    if ids.is_empty() {
        bail!("--tokens: no token ids given (expected comma-separated integers, e.g. 1,2,3)");
    }
    Ok(ids)
}

fn run_logits(a: LogitsArgs) -> Result<()> {
    let tokens = parse_tokens(&a.tokens)?;
    offload::check_out_file(&a.out)?;
    let ckpt = open(&a.model)?;
    let cfg = &ckpt.config;
    if let Some(bad) = tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
        bail!(
            "--tokens: token id {bad} is outside the vocabulary (vocab_size = {})",
            cfg.vocab_size
        );
    }
    let context = tokens.len() + a.generate;
    let mut loaded = a.cache.load(&ckpt, context)?;
    let model = &loaded.model;
    let mut obs = RecordingObserver::default();
    let mut cache = model.new_cache();
    let logits = model.forward(&tokens, &mut cache, Phase::Prefill, LogitsFor::All, &mut obs)?;

    // Events arrive layer by layer, token by token: exactly [moe_layers, tokens, top_k].
    let k = cfg.num_experts_per_tok;
    let experts: Vec<i64> = obs
        .events
        .iter()
        .flat_map(|e| e.experts.iter().map(|&x| x as i64))
        .collect();
    let weights: Vec<f32> = obs
        .events
        .iter()
        .flat_map(|e| e.weights.iter().copied())
        .collect();
    let moe_layers = cfg.moe_layers().len();

    let generated: Vec<i64> = if a.generate > 0 {
        let opts = GenerateOptions {
            max_new_tokens: a.generate,
            sampling: SamplingParams::default(),
            eos_token_ids: Vec::new(),
        };
        let (ids, _) = generate(model, &tokens, &opts, &mut NoObserver, |_| Ok(()))?;
        ids.into_iter().map(i64::from).collect()
    } else {
        Vec::new()
    };

    let mut tensors: Vec<(&str, Vec<u8>, safetensors::Dtype, Vec<usize>)> = vec![
        (
            "logits",
            le_bytes(logits.iter().copied(), f32::to_le_bytes),
            safetensors::Dtype::F32,
            vec![tokens.len(), cfg.vocab_size],
        ),
        (
            "router_experts",
            le_bytes(experts.into_iter(), i64::to_le_bytes),
            safetensors::Dtype::I64,
            vec![moe_layers, tokens.len(), k],
        ),
        (
            "router_weights",
            le_bytes(weights.into_iter(), f32::to_le_bytes),
            safetensors::Dtype::F32,
            vec![moe_layers, tokens.len(), k],
        ),
    ];
    if a.generate > 0 {
        tensors.push((
            "generated",
            le_bytes(generated.into_iter(), i64::to_le_bytes),
            safetensors::Dtype::I64,
            vec![a.generate],
        ));
    }
    write_safetensors(&a.out, &tensors)?;
    eprintln!(
        "wrote {} ({} tokens, {} MoE layers)",
        a.out.display(),
        tokens.len(),
        moe_layers
    );
    a.cache.finish(&mut loaded, None, context)
}

fn run_pack(a: PackArgs) -> Result<()> {
    let ckpt = Checkpoint::open(&a.model)?;
    let total = ckpt.config.moe_layers().len() * ckpt.config.num_experts;
    let bar = indicatif::ProgressBar::new(total as u64).with_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} experts {per_sec} eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let start = Instant::now();
    let summary = shadowmoe_engine::offload::pack::write_pack_for(
        &ckpt.config_sha256()?,
        &ckpt.config,
        &ckpt.weights,
        &a.out,
        |done, _| bar.set_position(done as u64),
    )?;
    bar.finish_and_clear();
    eprintln!(
        "wrote {}: {} experts of {} bytes, {:.2} GB in {:.1}s",
        summary.dir.display(),
        summary.experts,
        summary.expert_bytes,
        summary.file_bytes as f64 / 1e9,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn run_inflate(a: InflateArgs) -> Result<()> {
    let ckpt = Checkpoint::open(&a.model).with_context(|| format!("--model {}", a.model))?;
    let opts = shadowmoe_engine::inflate::InflateOptions {
        hidden: a.hidden,
        moe_intermediate: a.moe_intermediate,
        seed: a.seed,
    };
    let plan = shadowmoe_engine::inflate::plan(&ckpt, &opts)?;
    let quant = plan.quant.map_or(String::new(), |q| {
        format!(", {}-bit group {} experts", q.bits, q.group_size)
    });
    eprintln!(
        "inflating {} to hidden {} (x{} copies, norm shift {}), expert width {}{quant}: {} bytes per expert",
        ckpt.location().display(),
        plan.hidden,
        plan.copies,
        plan.shift,
        plan.moe_intermediate,
        plan.expert_bytes
    );
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let start = Instant::now();
    let summary = shadowmoe_engine::inflate::inflate(&ckpt, &a.out, &opts, &|done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    eprintln!(
        "wrote {}: {} files, {:.2} GB, {} experts of {} bytes, in {:.1}s",
        summary.dir.display(),
        summary.files,
        summary.total_bytes as f64 / 1e9,
        summary.experts,
        summary.expert_bytes,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn le_bytes<T, const N: usize>(values: impl Iterator<Item = T>, f: fn(T) -> [u8; N]) -> Vec<u8> {
    values.flat_map(f).collect()
}

/// Writes the tensors to a temporary name beside `out`, then renames it: a crash never leaves
/// a file that looks complete.
fn write_safetensors(out: &Path, tensors: &[(&str, Vec<u8>, safetensors::Dtype, Vec<usize>)]) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(name, bytes, dtype, shape)| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (name.to_string(), v))
                .with_context(|| format!("tensor {name}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let tmp = out.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(views, None, &tmp)
        .with_context(|| format!("--out: cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, out)
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
        .with_context(|| format!("--out: cannot rename {} to {}", tmp.display(), out.display()))?;
    Ok(())
}
