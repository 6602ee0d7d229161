//! Reading the golden files that `tests/golden/make.py` writes; the fuzz tests' case budget and
//! random numbers.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use shadowmoe_engine::ChatMessage;

/// The fixture directory of one architecture.
pub fn fixture_dir(arch: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(arch)
}

/// What transformers computed on one fixture.
pub struct Golden {
    pub prompt: String,
    pub prompt_ids: Vec<u32>,
    pub chat: Vec<ChatMessage>,
    pub chat_text: String,
    pub chat_ids: Vec<u32>,
    pub vocab: usize,
    /// `[T, V]`.
    pub logits: Vec<f32>,
    /// `[L_moe, T, K]`.
    pub router_experts: Vec<u32>,
    pub router_weights: Vec<f32>,
    /// `[T, H]`: the first MoE layer's router input.
    pub router_hidden: Vec<f32>,
    pub generated: Vec<u32>,
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn ids(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(8)
        .map(|c| u32::try_from(i64::from_le_bytes(c.try_into().unwrap())).unwrap())
        .collect()
}

impl Golden {
    pub fn read(dir: &Path) -> Self {
        let bytes = std::fs::read(dir.join("golden.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let get = |n: &str| st.tensor(n).unwrap();
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
        let id_list = |key: &str| -> Vec<u32> {
            meta[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect()
        };
        let chat = meta["chat_messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| ChatMessage {
                role: m["role"].as_str().unwrap().to_string(),
                content: m["content"].as_str().unwrap().to_string(),
            })
            .collect();
        let logits = get("logits");
        let golden = Golden {
            prompt: meta["prompt"].as_str().unwrap().to_string(),
            prompt_ids: ids(get("prompt_ids").data()),
            chat,
            chat_text: meta["chat_text"].as_str().unwrap().to_string(),
            chat_ids: id_list("chat_ids"),
            vocab: logits.shape()[1],
            logits: f32s(logits.data()),
            router_experts: ids(get("router_experts").data()),
            router_weights: f32s(get("router_weights").data()),
            router_hidden: f32s(get("router_hidden").data()),
            generated: ids(get("generated").data()),
        };
        assert_eq!(
            golden.prompt_ids,
            id_list("prompt_ids"),
            "golden.json and golden.safetensors disagree"
        );
        golden
    }
}

/// What mlx-lm computed on an MLX-quantised checkpoint (`tests/golden/make_mlx.py`).
pub struct MlxGolden {
    pub prompt_ids: Vec<u32>,
    pub vocab: usize,
    /// `[T, V]`.
    pub logits: Vec<f32>,
    pub generated: Vec<u32>,
    pub bits: u64,
    pub group: u64,
}

impl MlxGolden {
    pub fn read(dir: &Path) -> Self {
        let bytes = std::fs::read(dir.join("golden.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let logits = st.tensor("logits").unwrap();
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
        MlxGolden {
            prompt_ids: ids(st.tensor("prompt_ids").unwrap().data()),
            vocab: logits.shape()[1],
            logits: f32s(logits.data()),
            generated: ids(st.tensor("generated").unwrap().data()),
            bits: meta["bits"].as_u64().unwrap(),
            group: meta["group_size"].as_u64().unwrap(),
        }
    }
}

/// Mutation cases per fuzzed file: `SHADOWMOE_FUZZ_CASES`, else `default`.
pub fn fuzz_cases(default: usize) -> usize {
    std::env::var("SHADOWMOE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// SplitMix64: the fuzz tests' reproducible random numbers.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}
