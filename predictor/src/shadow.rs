//! The shadow model (Burn): a small MLP that reads the router input at MoE layer L and predicts
//! the experts that layer L + D will route to.
//!
//! Input: the hidden state (`H`) concatenated with the sum of a learned source-layer embedding
//! and a learned depth embedding; two GELU layers of `width`; output: one logit per expert
//! (`E`). One model serves every source layer and every depth it was trained for.

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::{gelu, log_softmax};
use serde::{Deserialize, Serialize};

/// Shape of a shadow model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShadowShape {
    pub hidden_size: usize,
    pub num_experts: usize,
    /// Source-layer slots (the model's MoE layers).
    pub moe_layers: usize,
    /// Largest depth (depth slots 0..=max_depth).
    pub max_depth: usize,
    pub width: usize,
    pub embed: usize,
}

/// The network.
#[derive(Module, Debug)]
pub struct ShadowMlp {
    layer_emb: Embedding,
    depth_emb: Embedding,
    l1: Linear,
    l2: Linear,
    out: Linear,
}

impl ShadowShape {
    /// A freshly initialised network on `device`.
    pub fn init(&self, device: &Device) -> ShadowMlp {
        ShadowMlp {
            layer_emb: EmbeddingConfig::new(self.moe_layers, self.embed).init(device),
            depth_emb: EmbeddingConfig::new(self.max_depth + 1, self.embed).init(device),
            l1: LinearConfig::new(self.hidden_size + self.embed, self.width).init(device),
            l2: LinearConfig::new(self.width, self.width).init(device),
            out: LinearConfig::new(self.width, self.num_experts).init(device),
        }
    }

    /// Parameters of the network.
    pub fn parameters(&self) -> usize {
        let (h, w, e, m) = (self.hidden_size, self.width, self.num_experts, self.embed);
        (self.moe_layers + self.max_depth + 1) * m + (h + m) * w + w + w * w + w + w * e + e
    }
}

impl ShadowMlp {
    /// Logits `[n, E]` for hidden states `[n, H]`, source-layer ordinals and depths `[n]`.
    pub fn forward(&self, hidden: Tensor<2>, src: Tensor<1, Int>, depth: Tensor<1, Int>) -> Tensor<2> {
        let n = hidden.dims()[0];
        let le = self.layer_emb.forward(src.reshape([n, 1])); // (n, 1, m)
        let de = self.depth_emb.forward(depth.reshape([n, 1])); // (n, 1, m)
        let m = le.dims()[2];
        let e = (le + de).reshape([n, m]);
        let x = Tensor::cat(vec![hidden, e], 1); // (n, H + m)
        let x = gelu(self.l1.forward(x));
        let x = gelu(self.l2.forward(x));
        self.out.forward(x)
    }
}

/// The training loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossKind {
    /// Per-expert binary cross-entropy on the multi-hot target.
    Bce,
    /// Listwise: cross-entropy between the softmax over experts and the uniform distribution
    /// over the routed experts (a ranking loss: only the order of logits matters).
    Softmax,
}

impl std::str::FromStr for LossKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bce" => Ok(LossKind::Bce),
            "softmax" => Ok(LossKind::Softmax),
            _ => Err(format!("unknown loss `{s}` (expected bce or softmax)")),
        }
    }
}

/// Mean loss of `logits` `[n, E]` against multi-hot `targets` `[n, E]` (0/1).
pub fn loss(kind: LossKind, logits: Tensor<2>, targets: Tensor<2>) -> Tensor<1> {
    match kind {
        LossKind::Bce => {
            // max(x, 0) - x·y + log(1 + exp(-|x|)), stable for large |x|.
            let pos = logits.clone().clamp_min(0.0);
            let soft = (logits.clone().abs().neg().exp() + 1.0).log();
            (pos - logits * targets + soft).mean()
        }
        LossKind::Softmax => {
            let k = targets.clone().sum_dim(1); // (n, 1)
            let p = targets / k;
            (p * log_softmax(logits, 1)).sum_dim(1).neg().mean()
        }
    }
}
