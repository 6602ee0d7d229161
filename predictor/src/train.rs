//! Training the shadow model: Adam, minibatches from request-chunked examples (traces larger
//! than memory stream through), early stopping on validation recall@k; and batched top-k
//! prediction with a trained model.

use burn::optim::{AdamConfig, GradientsParams};
use burn::prelude::*;
use serde::Serialize;

use crate::data::Examples;
use crate::eval::score;
use crate::shadow::{LossKind, ShadowMlp, ShadowShape, loss};

/// Which Burn backend runs the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// wgpu where an adapter answers, else the CPU.
    Auto,
    /// Burn's wgpu backend (a GPU, or lavapipe's software Vulkan).
    Wgpu,
    /// Burn's CPU backend (`flex` in Burn 0.22; `ndarray` is accepted as a name for it).
    Cpu,
}

impl std::str::FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "wgpu" => Ok(Self::Wgpu),
            "cpu" | "flex" | "ndarray" => Ok(Self::Cpu),
            _ => Err(format!(
                "unknown backend `{s}` (expected auto, wgpu or cpu; ndarray means cpu)"
            )),
        }
    }
}

/// A device of the chosen backend and the backend's name ("wgpu" or "cpu").
///
/// `Auto` takes a hardware GPU (discrete, then integrated) and otherwise the CPU backend: a
/// software Vulkan device such as lavapipe is far slower than Burn's CPU backend. `Wgpu` takes
/// wgpu's default adapter, software ones included (that is how CI runs the wgpu path).
pub fn device(choice: BackendChoice) -> Result<(Device, &'static str), String> {
    let probe = |kind: DeviceKind| -> Result<Device, String> {
        // wgpu panics when no adapter answers: probe with one tiny op, the panic message
        // silenced (the error below says it in one line).
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let result = std::panic::catch_unwind(|| {
            let d = Device::wgpu(kind);
            let t = Tensor::<1>::from_data(TensorData::new(vec![1.0f32, 2.0], [2]), &d);
            let v = (t.clone() * t)
                .sum()
                .into_data()
                .try_to_vec::<f32>()
                .map_err(|e| format!("{e:?}"))?;
            if v != [5.0] {
                return Err(format!("probe computed {v:?}, expected [5.0]"));
            }
            Ok(d)
        });
        std::panic::set_hook(hook);
        result.map_err(|_| {
            "no wgpu adapter (on a machine without a GPU, install mesa-vulkan-drivers)".to_string()
        })?
    };
    match choice {
        BackendChoice::Cpu => Ok((Device::flex(), "cpu")),
        BackendChoice::Wgpu => probe(DeviceKind::DefaultDevice)
            .map(|d| (d, "wgpu"))
            .map_err(|e| format!("--backend wgpu: {e}")),
        BackendChoice::Auto => {
            // Ask the graphics APIs first, through an instance of our own that is dropped at
            // once: Burn's wgpu runtime keeps every instance it opens for the life of the
            // process, and one kept open on lavapipe (loaded only to find it is not a GPU) was
            // measured to slow the engine's decode by ~10 % on this 2-core machine, in every
            // later configuration of a sweep.
            if !hardware_gpu_present() {
                tracing::info!("no hardware GPU for wgpu: using the CPU backend");
                return Ok((Device::flex(), "cpu"));
            }
            match probe(DeviceKind::DiscreteGpu(0)).or_else(|_| probe(DeviceKind::IntegratedGpu(0))) {
                Ok(d) => Ok((d, "wgpu")),
                Err(e) => {
                    tracing::info!("no hardware GPU for wgpu ({e}): using the CPU backend");
                    Ok((Device::flex(), "cpu"))
                }
            }
        }
    }
}

/// Whether any graphics API on this machine reports a discrete or integrated GPU.
fn hardware_gpu_present() -> bool {
    use burn::backend::wgpu::wgpu;
    let found = std::panic::catch_unwind(|| {
        let backends = wgpu::Backends::all();
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends,
            ..wgpu::InstanceDescriptor::new_without_display_handle()
        });
        let adapters = block_on(instance.enumerate_adapters(backends));
        adapters.iter().any(|a| {
            matches!(
                a.get_info().device_type,
                wgpu::DeviceType::DiscreteGpu | wgpu::DeviceType::IntegratedGpu
            )
        })
    });
    found.unwrap_or(false)
}

/// Runs a future to completion on this thread (wgpu's native adapter queries are ready at
/// once; this only polls).
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::yield_now();
    }
}

/// How to train.
#[derive(Debug, Clone, Serialize)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    pub loss: LossKind,
    /// Stop after this many epochs without a better validation recall.
    pub patience: usize,
    pub seed: u64,
    /// k of recall@k for early stopping.
    pub k: usize,
}

/// One epoch of the training log.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EpochLog {
    pub epoch: usize,
    pub train_loss: f64,
    pub val_recall: f64,
    pub examples: u64,
    pub secs: f64,
}

fn tensors(ex: &Examples, idx: &[usize], device: &Device) -> (Tensor<2>, Tensor<1, Int>, Tensor<1, Int>) {
    let h = ex.hidden_size;
    let mut hidden = Vec::with_capacity(idx.len() * h);
    for &i in idx {
        hidden.extend_from_slice(ex.hidden_of(i));
    }
    let src: Vec<i64> = idx.iter().map(|&i| ex.src[i] as i64).collect();
    let depth: Vec<i64> = idx.iter().map(|&i| ex.depth[i] as i64).collect();
    (
        Tensor::from_data(TensorData::new(hidden, [idx.len(), h]), device),
        Tensor::from_data(TensorData::new(src, [idx.len()]), device),
        Tensor::from_data(TensorData::new(depth, [idx.len()]), device),
    )
}

fn targets(ex: &Examples, idx: &[usize], experts: usize, device: &Device) -> Tensor<2> {
    let mut t = vec![0.0f32; idx.len() * experts];
    for (r, &i) in idx.iter().enumerate() {
        for &e in ex.target_of(i) {
            t[r * experts + e as usize] = 1.0;
        }
    }
    Tensor::from_data(TensorData::new(t, [idx.len(), experts]), device)
}

/// Top-`k` experts (best first) of every example, in batches of `batch`.
pub fn predict_topk(model: &ShadowMlp, device: &Device, ex: &Examples, k: usize, batch: usize) -> Vec<u16> {
    let mut out = Vec::with_capacity(ex.len() * k);
    let all: Vec<usize> = (0..ex.len()).collect();
    for chunk in all.chunks(batch.max(1)) {
        let (h, s, d) = tensors(ex, chunk, device);
        let logits = model.forward(h, s, d);
        let e = logits.dims()[1];
        let v = logits.into_data().try_to_vec::<f32>().unwrap_or_default();
        for r in 0..chunk.len() {
            out.extend(topk_row(&v[r * e..(r + 1) * e], k));
        }
    }
    out
}

/// Indices of the `k` largest values, largest first (ties: lower index).
pub fn topk_row(row: &[f32], k: usize) -> Vec<u16> {
    let mut ids: Vec<u16> = (0..row.len() as u16).collect();
    let k = k.min(ids.len());
    ids.select_nth_unstable_by(k.saturating_sub(1), |&a, &b| {
        row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b))
    });
    ids.truncate(k);
    ids.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
    ids
}

/// Feeds the training examples chunk by chunk to the callback it is given (one epoch per call).
pub type ChunkSource<'a> = dyn FnMut(&mut dyn FnMut(&Examples)) -> shadowmoe_trace::Result<()> + 'a;

/// Trains a model of `shape` on `device` (an autodiff device). `chunks` feeds the training
/// examples chunk by chunk each epoch; `val` picks the best epoch. Returns the best model (as a
/// validation-mode module on the device without autodiff) and the log.
pub fn train(
    shape: &ShadowShape,
    device: &Device,
    cfg: &TrainConfig,
    chunks: &mut ChunkSource<'_>,
    val: &Examples,
    mut progress: impl FnMut(&EpochLog),
) -> shadowmoe_trace::Result<(ShadowMlp, Vec<EpochLog>)> {
    device.seed(cfg.seed);
    let plain = device.clone().without_autodiff();
    let mut model = shape.init(device);
    let mut optim = AdamConfig::new().init();
    let mut rng = shadowmoe_engine::sampling::Rng::new(cfg.seed);
    let mut best: Option<(f64, ShadowMlp)> = None;
    let mut log = Vec::new();
    let mut since_best = 0;
    for epoch in 1..=cfg.epochs {
        let start = std::time::Instant::now();
        let (mut loss_sum, mut batches, mut seen) = (0.0f64, 0u64, 0u64);
        chunks(&mut |ex: &Examples| {
            let mut idx: Vec<usize> = (0..ex.len()).collect();
            for i in (1..idx.len()).rev() {
                idx.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
            }
            for mb in idx.chunks(cfg.batch.max(1)) {
                let (h, s, d) = tensors(ex, mb, device);
                let y = targets(ex, mb, shape.num_experts, device);
                let l = loss(cfg.loss, model.forward(h, s, d), y);
                loss_sum += l.clone().into_scalar::<f32>() as f64;
                batches += 1;
                seen += mb.len() as u64;
                let grads = GradientsParams::from_grads(l.backward(), &model);
                model = optim.step(cfg.lr, model.clone(), grads);
            }
        })?;
        let valid = model.valid();
        let pred = predict_topk(&valid, &plain, val, cfg.k, 1024);
        let rep = score("shadow", val, &pred, cfg.k);
        let recall = rep.by_depth.values().map(|s| s.recall).sum::<f64>() / rep.by_depth.len().max(1) as f64;
        let entry = EpochLog {
            epoch,
            train_loss: loss_sum / batches.max(1) as f64,
            val_recall: recall,
            examples: seen,
            secs: start.elapsed().as_secs_f64(),
        };
        progress(&entry);
        log.push(entry);
        if best.as_ref().is_none_or(|(r, _)| recall > *r) {
            best = Some((recall, valid));
            since_best = 0;
        } else {
            since_best += 1;
            if since_best >= cfg.patience {
                break;
            }
        }
    }
    let Some((_, model)) = best else {
        return Err(shadowmoe_trace::TraceError::Invalid {
            what: "--epochs".into(),
            message: "no epoch was trained (expected at least 1)".into(),
        });
    };
    Ok((model, log))
}
