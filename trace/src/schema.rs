//! Column names, the manifest, and small helpers shared by writer and reader.

use serde::{Deserialize, Serialize};

/// Format tag of the manifest.
pub const TRACE_FORMAT: &str = "shadowmoe-trace/1";
/// Parquet key-value metadata key holding the manifest JSON.
pub const MANIFEST_KEY: &str = "shadowmoe.manifest";

pub const COL_REQUEST: &str = "request";
pub const COL_TOKEN: &str = "token";
pub const COL_PHASE: &str = "phase";
pub const COL_LAYER: &str = "layer";
pub const COL_TOKEN_ID: &str = "token_id";
pub const COL_EXPERTS: &str = "experts";
pub const COL_WEIGHTS: &str = "weights";
pub const COL_HIDDEN: &str = "hidden";

/// What a trace was made from and how (DESIGN.md "Traces").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    /// The `--model` value as given.
    pub model_id: String,
    /// sha256 of the model's config.json.
    pub config_sha256: String,
    pub architecture: String,
    pub num_layers: usize,
    pub moe_layers: Vec<usize>,
    pub num_experts: usize,
    pub top_k: usize,
    pub hidden_size: usize,
    pub dataset: String,
    pub dataset_sha256: String,
    /// Prompts in the dataset file.
    pub dataset_requests: usize,
    /// Requests this trace covers (after --limit and --shard).
    pub requests: usize,
    /// Whether prompts went through the model's chat template.
    #[serde(default = "yes")]
    pub chat_template: bool,
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub sampling_top_k: usize,
    pub top_p: f32,
    pub seed: u64,
    /// Model layers whose router input is stored in `hidden`.
    pub hidden_layers: Vec<usize>,
    /// Encoding of `hidden`: "f32le" (exact) or "f16le" (half the bytes), see [`HiddenEncoding`].
    pub hidden_encoding: String,
    /// `I/N` when collected with --shard, else "0/1".
    pub shard: String,
    pub harness_version: String,
    pub harness_commit: String,
    /// UTC, ISO 8601.
    pub created: String,
}

impl Manifest {
    /// The fields that must agree for `--resume` to continue a collection: everything but the
    /// creation time.
    pub fn same_collection(&self, other: &Manifest) -> Option<&'static str> {
        let checks: [(&'static str, bool); 13] = [
            ("model (config sha256)", self.config_sha256 == other.config_sha256),
            ("dataset (sha256)", self.dataset_sha256 == other.dataset_sha256),
            ("requests (--limit/--shard)", self.requests == other.requests),
            ("--max-new-tokens", self.max_new_tokens == other.max_new_tokens),
            ("--temperature", self.temperature == other.temperature),
            ("--top-k", self.sampling_top_k == other.sampling_top_k),
            ("--top-p", self.top_p == other.top_p),
            ("--seed", self.seed == other.seed),
            ("--hidden-layers", self.hidden_layers == other.hidden_layers),
            ("--shard", self.shard == other.shard),
            ("--no-chat-template", self.chat_template == other.chat_template),
            ("format", self.format == other.format),
            ("harness version", self.harness_version == other.harness_version),
        ];
        checks.iter().find(|(_, ok)| !ok).map(|(name, _)| *name)
    }
}

fn yes() -> bool {
    true
}

/// How hidden states are stored in the `hidden` Binary column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HiddenEncoding {
    /// Little-endian f32: exactly what the router saw (gate-lookahead on it reproduces the
    /// routing bit for bit).
    F32Le,
    /// Little-endian f16: half the bytes, rounded.
    F16Le,
}

impl HiddenEncoding {
    pub fn name(self) -> &'static str {
        match self {
            HiddenEncoding::F32Le => "f32le",
            HiddenEncoding::F16Le => "f16le",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "f32le" | "f32" => Some(HiddenEncoding::F32Le),
            "f16le" | "f16" => Some(HiddenEncoding::F16Le),
            _ => None,
        }
    }

    /// Bytes per value.
    pub fn width(self) -> usize {
        match self {
            HiddenEncoding::F32Le => 4,
            HiddenEncoding::F16Le => 2,
        }
    }

    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(values.len() * self.width());
        for v in values {
            match self {
                HiddenEncoding::F32Le => out.extend_from_slice(&v.to_le_bytes()),
                HiddenEncoding::F16Le => out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes()),
            }
        }
        out
    }

    pub fn decode_into(self, bytes: &[u8], out: &mut Vec<f32>) {
        match self {
            HiddenEncoding::F32Le => out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            ),
            HiddenEncoding::F16Le => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
            ),
        }
    }
}

/// Now as `YYYY-MM-DDTHH:MM:SSZ` (UTC), without a date library.
pub fn utc_now() -> String {
    shadowmoe_engine::clock::Civil::from_unix(shadowmoe_engine::clock::unix_now()).iso()
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_now_is_iso() {
        let s = super::utc_now();
        assert_eq!(s.len(), 20, "{s}");
        assert!(s.starts_with("20") && s.ends_with('Z'), "{s}");
    }
}
