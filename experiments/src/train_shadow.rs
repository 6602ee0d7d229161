//! `train-shadow`: trains the shadow model on traces with hidden states and evaluates it next
//! to the baselines on the same test rows.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;
use shadowmoe_engine::Checkpoint;
use shadowmoe_predictor::baselines;
use shadowmoe_predictor::data::{Examples, Split, Splitter, all_examples, examples};
use shadowmoe_predictor::eval::{Report, layer_table, score, table};
use shadowmoe_predictor::runtime::{PREDICTOR_FORMAT, PredictorMeta, save};
use shadowmoe_predictor::train::{EpochLog, device, predict_topk, train};
use shadowmoe_predictor::{BackendChoice, LossKind, ShadowShape, TrainConfig};
use shadowmoe_trace::Trace;

use crate::args::parse_list;

/// Flags of `train-shadow`.
#[derive(Args, Debug, Clone)]
pub struct ShadowArgs {
    /// Training traces (comma-separated), collected with --hidden-layers.
    #[arg(long, value_delimiter = ',', required = true)]
    pub traces: Vec<PathBuf>,
    /// Traces to test on (e.g. the held-out prompts); default: a share of --traces by request.
    #[arg(long, value_delimiter = ',')]
    pub eval_traces: Vec<PathBuf>,
    /// Depths in MoE layers to train and evaluate (list syntax: 4, 1..8, 1,2,4).
    #[arg(long, default_value = "4")]
    pub depth: String,
    /// k of recall@k and of the predictions.
    #[arg(long, default_value_t = 8)]
    pub top_k: usize,
    /// Output directory: model.safetensors, predictor.json, report.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Backend for training: auto, wgpu or cpu (ndarray means cpu).
    #[arg(long, default_value = "auto")]
    pub backend: String,
    /// The checkpoint whose routers gate-lookahead uses (default: the traces' model id).
    #[arg(long)]
    pub model: Option<String>,
    /// Loss: bce, softmax, or both (trains both, keeps the better on validation).
    #[arg(long, default_value = "both")]
    pub loss: String,
    #[arg(long, default_value_t = 30)]
    pub epochs: usize,
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Width of the hidden layers.
    #[arg(long, default_value_t = 512)]
    pub width: usize,
    /// Epochs without a better validation recall before stopping.
    #[arg(long, default_value_t = 4)]
    pub patience: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Shares of the training traces' requests held out for validation and (without
    /// --eval-traces) test.
    #[arg(long, default_value_t = 0.1)]
    pub val_share: f64,
    #[arg(long, default_value_t = 0.1)]
    pub test_share: f64,
}

/// What `report.json` holds.
#[derive(Debug, Serialize)]
struct ReportFile<'a> {
    meta: &'a PredictorMeta,
    backend: &'a str,
    train: TrainConfig,
    log: &'a [EpochLog],
    loss_candidates: Vec<(LossKind, f64)>,
    gate_lookahead_depth0_recall: Option<f64>,
    examples: [usize; 2],
    reports: &'a [Report],
}

fn open_traces(paths: &[PathBuf]) -> Result<Vec<Trace>> {
    let mut out = Vec::new();
    for p in paths {
        let t = Trace::open(p)?;
        if t.manifest.hidden_layers.is_empty() {
            bail!(
                "{}: the trace has no hidden states; collect them with trace-collect --hidden-layers all",
                p.display()
            );
        }
        out.push(t);
    }
    Ok(out)
}

/// Checks the flags that need no trace, so that a bad value is refused before any work.
fn check_flags(a: &ShadowArgs) -> Result<()> {
    for (flag, v) in [("--epochs", a.epochs), ("--batch", a.batch), ("--width", a.width)] {
        if v == 0 {
            bail!("{flag}: 0 (expected at least 1)");
        }
    }
    if !(a.lr.is_finite() && a.lr > 0.0) {
        bail!("--lr: {} (expected a finite number > 0, e.g. 1e-3)", a.lr);
    }
    for (flag, v) in [("--val-share", a.val_share), ("--test-share", a.test_share)] {
        if !(0.0..1.0).contains(&v) {
            bail!("{flag}: {v} (expected a share in [0, 1))");
        }
    }
    if a.eval_traces.is_empty() && a.val_share + a.test_share >= 1.0 {
        bail!(
            "--val-share {} + --test-share {} leave no requests to train on (expected a sum below 1)",
            a.val_share,
            a.test_share
        );
    }
    // --out before training: a folder that cannot be written must not cost a training run.
    std::fs::create_dir_all(&a.out).with_context(|| format!("--out: cannot create {}", a.out.display()))?;
    let probe = a.out.join(".write-test");
    std::fs::write(&probe, b"").with_context(|| format!("--out: cannot write into {}", a.out.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Runs `train-shadow`; returns the printed report.
pub fn run(a: &ShadowArgs) -> Result<String> {
    check_flags(a)?;
    let train_traces = open_traces(&a.traces)?;
    let eval_traces = open_traces(&a.eval_traces)?;
    let m = train_traces[0].manifest.clone();
    for t in train_traces.iter().chain(&eval_traces) {
        if t.manifest.config_sha256 != m.config_sha256 {
            bail!(
                "{}: a trace of another model than {} (config sha256 differs)",
                t.path.display(),
                a.traces[0].display()
            );
        }
    }
    let layers = m.moe_layers.len();
    let depths = parse_list("--depth", &a.depth)?;
    if let Some(&d) = depths.iter().find(|&&d| d == 0 || d >= layers) {
        bail!(
            "--depth: {d} is out of range (the model has {layers} MoE layers: expected 1..={})",
            layers - 1
        );
    }
    if a.top_k == 0 || a.top_k > m.num_experts {
        bail!("--top-k: expected 1..={}", m.num_experts);
    }
    // The checkpoint gate-lookahead needs, before training (not after it).
    let model_id = a.model.clone().unwrap_or_else(|| m.model_id.clone());
    let ckpt = match Checkpoint::open(&model_id) {
        Ok(ckpt) if ckpt.config_sha256()? == m.config_sha256 => ckpt,
        Ok(_) => bail!("--model {model_id}: not the model of the traces (config sha256 differs)"),
        Err(e) => bail!("gate-lookahead needs the checkpoint's routers: {e:#} (pass --model DIR)"),
    };

    let loss_kinds: Vec<LossKind> = match a.loss.as_str() {
        "both" => vec![LossKind::Bce, LossKind::Softmax],
        s => vec![s.parse().map_err(|e: String| anyhow::anyhow!("--loss: {e}"))?],
    };
    let backend: BackendChoice = a
        .backend
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--backend: {e}"))?;
    let has_eval = !eval_traces.is_empty();
    let splitter = Splitter {
        seed: a.seed,
        val: a.val_share,
        test: if has_eval { 0.0 } else { a.test_share },
    };
    let in_split = move |s: Split| move |r: u32| splitter.split(r) == s;

    // Validation and test rows in memory; training rows stream chunk by chunk.
    let mut val = Examples {
        hidden_size: m.hidden_size,
        k: m.top_k,
        ..Default::default()
    };
    for t in &train_traces {
        val.append(all_examples(t, &depths, 64, &in_split(Split::Val))?);
    }
    let mut test_depths = depths.clone();
    test_depths.insert(0, 0);
    let mut test = Examples {
        hidden_size: m.hidden_size,
        k: m.top_k,
        ..Default::default()
    };
    if has_eval {
        for t in &eval_traces {
            test.append(all_examples(t, &test_depths, 64, &|_| true)?);
        }
    } else {
        for t in &train_traces {
            test.append(all_examples(t, &test_depths, 64, &in_split(Split::Test))?);
        }
    }
    let (n_val, n_test) = (val.len(), test.depth.iter().filter(|&&d| d != 0).count());
    if n_val == 0 || n_test == 0 {
        bail!(
            "a split is empty (validation {n_val} rows, test {n_test} rows): use more prompts, or change --val-share/--test-share, or pass --eval-traces"
        );
    }

    // Popularity from the training split.
    let mut counts = vec![vec![0u64; m.num_experts]; layers];
    for t in &train_traces {
        t.for_each_batch(128, |reqs| {
            for r in reqs.iter().filter(|r| splitter.split(r.request) == Split::Train) {
                for ti in 0..r.tokens() {
                    for (l, c) in counts.iter_mut().enumerate() {
                        for &e in r.experts_at(ti, l) {
                            c[e as usize] += 1;
                        }
                    }
                }
            }
            Ok(())
        })?;
    }
    let ranked: Vec<Vec<u16>> = counts.iter().map(|c| baselines::rank_by_count(c)).collect();

    // Train.
    let (dev, backend_name) = device(backend).map_err(|e| anyhow::anyhow!("{e}"))?;
    let train_dev = dev.clone().autodiff();
    let shape = ShadowShape {
        hidden_size: m.hidden_size,
        num_experts: m.num_experts,
        moe_layers: layers,
        max_depth: *depths.iter().max().unwrap_or(&1),
        width: a.width,
        embed: 32,
    };
    let mut best: Option<(
        f64,
        LossKind,
        shadowmoe_predictor::shadow::ShadowMlp,
        Vec<EpochLog>,
        TrainConfig,
    )> = None;
    let mut candidates = Vec::new();
    for kind in loss_kinds {
        let cfg = TrainConfig {
            epochs: a.epochs,
            batch: a.batch,
            lr: a.lr,
            loss: kind,
            patience: a.patience,
            seed: a.seed,
            k: a.top_k,
        };
        let mut chunks = |f: &mut dyn FnMut(&Examples)| -> shadowmoe_trace::Result<()> {
            for t in &train_traces {
                let n = t.manifest.dataset_requests as u32;
                let mut start = 0;
                while start < n {
                    let end = (start + 64).min(n);
                    let ex = examples(t, start..end, &depths, &in_split(Split::Train))?;
                    if !ex.is_empty() {
                        f(&ex);
                    }
                    start = end;
                }
            }
            Ok(())
        };
        let (model, log) = train(&shape, &train_dev, &cfg, &mut chunks, &val, |e| {
            eprintln!(
                "[{kind:?}] epoch {:>3}  loss {:.4}  val recall@{} {:.4}  ({} rows, {:.1}s)",
                e.epoch, e.train_loss, a.top_k, e.val_recall, e.examples, e.secs
            );
        })?;
        if let Some(e) = log.iter().find(|e| !e.train_loss.is_finite()) {
            bail!(
                "training diverged: the {kind:?} loss is {} at epoch {} (lower --lr, now {}); no model written",
                e.train_loss,
                e.epoch,
                a.lr
            );
        }
        let best_recall = log.iter().map(|e| e.val_recall).fold(0.0, f64::max);
        candidates.push((kind, best_recall));
        if best.as_ref().is_none_or(|b| best_recall > b.0) {
            best = Some((best_recall, kind, model, log, cfg));
        }
    }
    let (_, kind, model, log, cfg) = best.context("no model trained")?;

    // Evaluate every predictor on the same test rows.
    let k = a.top_k;
    let plain = train_dev.clone().without_autodiff();
    let at_depth = |ex: &Examples, keep0: bool| -> Examples {
        let idx: Vec<usize> = (0..ex.len()).filter(|&i| (ex.depth[i] == 0) == keep0).collect();
        ex.select(&idx)
    };
    let test_d = at_depth(&test, false);
    let test0 = at_depth(&test, true);
    let mut reports = vec![
        score(
            "shadow",
            &test_d,
            &predict_topk(&model, &plain, &test_d, k, 4096),
            k,
        ),
        score(
            "popularity",
            &test_d,
            &baselines::popularity(&ranked, &test_d, k),
            k,
        ),
        score(
            "previous-token",
            &test_d,
            &baselines::previous_token(&ranked, &test_d, k),
            k,
        ),
    ];
    let depth0 = {
        let routers = baselines::routers(&ckpt)?;
        reports.push(score(
            "gate-lookahead",
            &test_d,
            &baselines::gate_lookahead(&routers, &test_d, k),
            k,
        ));
        let k0 = k.max(m.top_k);
        let r0 = score(
            "gate-lookahead",
            &test0,
            &baselines::gate_lookahead(&routers, &test0, k0),
            k0,
        );
        r0.by_depth.get(&0).map(|s| s.recall)
    };
    reports.push(score(
        "oracle",
        &test_d,
        &baselines::oracle(&ranked, &test_d, k),
        k,
    ));

    let meta = PredictorMeta {
        format: PREDICTOR_FORMAT.into(),
        parameters: shape.parameters(),
        shape,
        depths: depths.clone(),
        k,
        loss: kind,
        model_id: m.model_id.clone(),
        config_sha256: m.config_sha256.clone(),
        moe_layers: m.moe_layers.clone(),
        top_k: m.top_k,
        traces: a.traces.iter().map(|p| p.display().to_string()).collect(),
        bytes: 0,
        harness_version: env!("CARGO_PKG_VERSION").into(),
    };
    save(&a.out, &model, &meta)?;
    let meta: PredictorMeta = serde_json::from_str(&std::fs::read_to_string(a.out.join("predictor.json"))?)?;

    let mut text = format!(
        "shadow model: {} parameters, {} bytes ({:?} loss; candidates {:?}), trained on {backend_name}\n",
        meta.parameters, meta.bytes, kind, candidates
    );
    text += &format!(
        "test rows: {} (depths {:?}); validation rows: {n_val}\n\n",
        test_d.len(),
        depths
    );
    text += &table(&reports);
    if let Some(r) = depth0 {
        text += &format!(
            "\ncontrol: gate-lookahead at depth 0 recall@{} = {r:.4} (must be 1)\n",
            k.max(m.top_k)
        );
    }
    text += &format!("\nrecall@{k} per target layer:\n");
    text += &layer_table(&reports, &m.moe_layers);
    let report = ReportFile {
        meta: &meta,
        backend: backend_name,
        train: cfg,
        log: &log,
        loss_candidates: candidates,
        gate_lookahead_depth0_recall: depth0,
        examples: [n_val, test_d.len()],
        reports: &reports,
    };
    std::fs::write(a.out.join("report.json"), serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("--out: cannot write {}", a.out.join("report.json").display()))?;
    std::fs::write(a.out.join("report.txt"), &text)?;
    Ok(text)
}
