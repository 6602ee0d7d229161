//! Golden parity with Hugging Face transformers, per architecture.
//!
//! The fixtures under `tests/golden/<arch>/` were written by `tests/golden/make.py` (pinned
//! transformers + torch): small random checkpoints in the Hugging Face layout and what
//! transformers computed on them. No Python runs here; the engine loads the same files through
//! its real loading code and must reproduce:
//! - the tokenizer's ids for the prompt, and the chat template's text and ids;
//! - logits for every prompt position, within 1e-4 absolute (the logits are O(1)–O(10));
//! - the router's top-k experts (best first) at every MoE layer and prompt token, exactly, and
//!   their weights within 1e-4;
//! - 16 greedy tokens (prefill + decode with the KV cache), exactly.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Golden, fixture_dir};
use shadowmoe_engine::{
    Checkpoint, GenerateOptions, LogitsFor, Phase, RecordingObserver, SamplingParams, generate,
};

const LOGIT_TOL: f32 = 1e-4;

fn check_arch(arch: &str) {
    check_dir(&fixture_dir(arch), arch);
}

/// The golden files in `dir` (a checkpoint of architecture `arch`) against the engine.
fn check_dir(dir: &std::path::Path, arch: &str) {
    check_dir_within(dir, arch, LOGIT_TOL, 1e-4);
}

/// [`check_dir`] with logits within `logit_tol` and router weights within `weight_tol`.
fn check_dir_within(dir: &std::path::Path, arch: &str, logit_tol: f32, weight_tol: f32) {
    let golden = Golden::read(dir);
    let ckpt = Checkpoint::open_dir(dir).unwrap();
    assert_eq!(ckpt.config.arch.model_type(), arch);

    // Tokenizer and chat template.
    let tok = ckpt.tokenizer().unwrap();
    assert_eq!(
        tok.encode(&golden.prompt).unwrap(),
        golden.prompt_ids,
        "{arch}: prompt ids"
    );
    let chat_text = tok.render_chat(&golden.chat, true).unwrap();
    assert_eq!(chat_text, golden.chat_text, "{arch}: rendered chat template");
    assert_eq!(
        tok.encode_chat(&golden.chat).unwrap(),
        golden.chat_ids,
        "{arch}: chat ids"
    );

    // Prefill logits and routing.
    let model = ckpt.load_model().unwrap();
    let moe_layers = ckpt.config.moe_layers();
    let mut obs = RecordingObserver {
        hidden_layers: vec![moe_layers[0]],
        ..Default::default()
    };
    let mut cache = model.new_cache();
    let logits = model
        .forward(
            &golden.prompt_ids,
            &mut cache,
            Phase::Prefill,
            LogitsFor::All,
            &mut obs,
        )
        .unwrap();
    let (t, v) = logits.dim();
    assert_eq!((t, v), (golden.prompt_ids.len(), golden.vocab));
    let max_diff = logits
        .iter()
        .zip(&golden.logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    let scale = golden.logits.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    eprintln!(
        "{}: logits within {max_diff:e} of transformers (scale {scale})",
        dir.display()
    );
    assert!(
        max_diff <= logit_tol,
        "{arch}: logits differ by {max_diff:e} (> {logit_tol:e}; logit scale {scale}); first values ours {:?} golden {:?}",
        &logits.as_slice().unwrap()[..4],
        &golden.logits[..4]
    );

    let k = ckpt.config.num_experts_per_tok;
    assert_eq!(
        obs.events.len(),
        moe_layers.len() * t,
        "{arch}: one event per (MoE layer, token)"
    );
    for (li, &layer) in moe_layers.iter().enumerate() {
        for ti in 0..t {
            let ev = &obs.events[li * t + ti];
            assert_eq!((ev.layer, ev.position, ev.phase), (layer, ti, Phase::Prefill));
            assert_eq!(ev.token_id, golden.prompt_ids[ti]);
            let want = &golden.router_experts[(li * t + ti) * k..][..k];
            assert_eq!(
                ev.experts, want,
                "{arch}: router top-{k} at layer {layer}, token {ti}"
            );
            // The hidden state the observer sees is the router's input in transformers.
            if let Some(hidden) = &ev.hidden {
                let h = hidden.len();
                for (a, b) in hidden.iter().zip(&golden.router_hidden[ti * h..(ti + 1) * h]) {
                    assert!(
                        (a - b).abs() < weight_tol,
                        "{arch}: router input at layer {layer}, token {ti}: {a} vs {b}"
                    );
                }
            }
            assert_eq!(ev.hidden.is_some(), li == 0);
            let want_w = &golden.router_weights[(li * t + ti) * k..][..k];
            for (a, b) in ev.weights.iter().zip(want_w) {
                assert!(
                    (a - b).abs() < weight_tol,
                    "{arch}: router weight at layer {layer}, token {ti}: {a} vs {b}"
                );
            }
        }
    }

    // Greedy generation through the KV cache.
    let opts = GenerateOptions {
        max_new_tokens: golden.generated.len(),
        sampling: SamplingParams::default(),
        eos_token_ids: Vec::new(),
    };
    let (generated, stats) = generate(
        &model,
        &golden.prompt_ids,
        &opts,
        &mut shadowmoe_engine::NoObserver,
        |_| Ok(()),
    )
    .unwrap();
    assert_eq!(generated, golden.generated, "{arch}: greedy tokens");
    assert_eq!(stats.decode_steps, golden.generated.len() - 1);
}

#[test]
fn qwen3_moe_matches_transformers() {
    check_arch("qwen3_moe");
}

/// The checkpoints the GGUF goldens were converted from (no dense layer, default rope; one at
/// hidden 256 for the K types; qwen3_next, glm4_moe and deepseek_v3 as llama.cpp's qwen3next,
/// glm4moe and deepseek2 hold them) are themselves transformers' functions.
#[test]
fn gguf_source_checkpoints_match_transformers() {
    check_dir(&fixture_dir("qwen3_moe_gguf"), "qwen3_moe");
    check_dir(&fixture_dir("qwen3_moe_wide"), "qwen3_moe");
    check_dir(&fixture_dir("qwen3_next_gguf"), "qwen3_next");
    check_dir(&fixture_dir("glm4_moe_gguf"), "glm4_moe");
    check_dir(&fixture_dir("deepseek_v3_gguf"), "deepseek_v3");
}

#[test]
fn olmoe_matches_transformers() {
    check_arch("olmoe");
}

#[test]
fn mixtral_matches_transformers() {
    check_arch("mixtral");
}

#[test]
fn qwen2_moe_matches_transformers() {
    check_arch("qwen2_moe");
}

#[test]
fn qwen3_next_matches_transformers() {
    check_arch("qwen3_next");
}

/// deepseek_v3: latent attention with compressed queries, interleaved yarn rope with DeepSeek's
/// attention scaling; sigmoid routing with a selection bias, group-limited top-k (which on this
/// prompt chooses differently from plain top-k: golden.json counts how often), scaled weights;
/// a shared expert; a dense first layer.
#[test]
fn deepseek_v3_matches_transformers() {
    assert_grouped_routing_matters("deepseek_v3");
    check_arch("deepseek_v3");
}

/// The fixture's golden.json says that group-limited routing chose differently from plain
/// top-k of the biased scores on some prompt selections (else its parity proves nothing about
/// the groups).
fn assert_grouped_routing_matters(fixture: &str) {
    let dir = fixture_dir(fixture);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let g = &meta["grouped_routing"];
    assert!(
        g["prompt_selections_differing_from_plain_top_k"]
            .as_u64()
            .unwrap()
            > 0,
        "{fixture}: the fixture must make group-limited routing matter: {g}"
    );
}

/// glm4_moe (GLM-4.5): grouped-query attention with half of each head rotated, per-head q/k
/// norms, q/k/v biases without an o_proj bias, over deepseek_v3's router (sigmoid, selection
/// bias, groups, scaled weights) and a shared expert; a dense first layer.
#[test]
fn glm4_moe_matches_transformers() {
    assert_grouped_routing_matters("glm4_moe");
    check_arch("glm4_moe");
}

/// glm4_moe_lite (GLM-4.7-Flash): latent attention and GLM's router, dense and sparse layers
/// as mlp_layer_types names them, two shared experts, fused experts in f32.
#[test]
fn glm4_moe_lite_matches_transformers() {
    assert_grouped_routing_matters("glm4_moe_lite");
    check_arch("glm4_moe_lite");
}

/// deepseek_v3 without a query bottleneck (q_lora_rank null), rotary values in halves, two
/// shared experts, unnormalised weights, fused experts, f32 on disk.
#[test]
fn deepseek_v3_without_q_lora_matches_transformers() {
    check_dir(&fixture_dir("deepseek_v3_noqlora"), "deepseek_v3");
}

/// gpt_oss in bf16: attention sinks, q/k/v/o biases, GQA with head_dim × heads ≠ hidden,
/// sliding (window 5, shorter than the prompt) and full attention alternating, yarn rope with
/// its attention factor; a biased router, softmax over the top-k logits; fused experts with
/// gate and up interleaved, biases, and the clamped SwiGLU (limit 1.0: the clamps bite).
#[test]
fn gpt_oss_matches_transformers() {
    let dir = fixture_dir("gpt_oss");
    let c = Checkpoint::open_dir(&dir).unwrap().config;
    assert_eq!(c.sliding_windows, vec![Some(5), None, Some(5), None]);
    assert!(c.attention_sinks && c.qkv_bias && c.o_bias);
    check_arch("gpt_oss");
}

/// gpt_oss with MXFP4 experts as the hub stores them (`*_blocks`, `*_scales`), kept packed
/// (ggml's `block_mxfp4`) and computed block by block with f32 activations, against
/// transformers on the weights its `convert_moe_packed_tensors` dequantises, in f32: the same
/// arithmetic up to summation order, so the bf16 fixture's tolerances hold.
#[test]
fn gpt_oss_mxfp4_matches_transformers() {
    let dir = fixture_dir("gpt_oss_mxfp4");
    let ckpt = Checkpoint::open_dir(&dir).unwrap();
    let model = ckpt.load_model().unwrap();
    // The experts stay 4.25 bits a value: 17 bytes a block of 32.
    let e = model.experts().expert(0, 3).unwrap();
    let (h, i) = (ckpt.config.hidden_size, ckpt.config.moe_intermediate_size);
    assert_eq!(
        e.gate.nbytes() + e.up.nbytes() + e.down.nbytes(),
        3 * h * i / 32 * 17
    );
    check_dir(&dir, "gpt_oss");
}

/// Logits of the golden prompt run as a prefill of all but its last six tokens and then six
/// one-token passes, against transformers' one prefill (within `LOGIT_TOL`); returns the cache.
fn split_passes_match_one_prefill(fixture: &str) -> (Checkpoint, shadowmoe_engine::KvCache, usize) {
    let dir = fixture_dir(fixture);
    let golden = Golden::read(&dir);
    let ckpt = Checkpoint::open_dir(&dir).unwrap();
    let model = ckpt.load_model().unwrap();
    let ids = &golden.prompt_ids;
    let split = ids.len() - 6;
    let mut cache = model.new_cache();
    let mut obs = shadowmoe_engine::NoObserver;
    let mut rows = model
        .forward(
            &ids[..split],
            &mut cache,
            Phase::Prefill,
            LogitsFor::All,
            &mut obs,
        )
        .unwrap()
        .into_raw_vec_and_offset()
        .0;
    for &tok in &ids[split..] {
        let l = model
            .forward(&[tok], &mut cache, Phase::Decode, LogitsFor::Last, &mut obs)
            .unwrap();
        rows.extend(l.iter());
    }
    assert_eq!(rows.len(), ids.len() * golden.vocab);
    let max_diff = rows
        .iter()
        .zip(&golden.logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        max_diff <= LOGIT_TOL,
        "{fixture}: split passes differ from transformers' one prefill by {max_diff:e}"
    );
    (ckpt, cache, ids.len())
}

/// deepseek_v3 caches one latent and one rotary key per position and layer: a prefill of part
/// of the prompt followed by one-token passes gives the logits of one long prefill, and the
/// cache holds `kv_lora_rank + qk_rope_head_dim` values per position.
#[test]
fn deepseek_v3_prefill_then_decode_equals_one_prefill() {
    for fixture in ["deepseek_v3", "deepseek_v3_noqlora", "glm4_moe_lite"] {
        let (ckpt, cache, n) = split_passes_match_one_prefill(fixture);
        let mla = ckpt.config.mla.unwrap();
        for layer in &cache.layers {
            assert_eq!(layer.k.len(), n * mla.kv_lora_rank, "{fixture}: latents");
            assert_eq!(layer.v.len(), n * mla.qk_rope_head_dim, "{fixture}: rotary keys");
        }
    }
}

/// qwen3_next keeps a conv window and a recurrent state per linear-attention layer: a prefill
/// of part of the prompt followed by one-token passes gives the logits of one long prefill.
#[test]
fn qwen3_next_prefill_then_decode_equals_one_prefill() {
    split_passes_match_one_prefill("qwen3_next");
}

/// gpt_oss's sliding layers look back 5 positions and every layer's sinks join the softmax:
/// a prefill of part of the prompt followed by one-token passes gives one long prefill's
/// logits.
#[test]
fn gpt_oss_prefill_then_decode_equals_one_prefill() {
    split_passes_match_one_prefill("gpt_oss");
}

/// Gate-lookahead at depth 0 (a layer's router applied to its own input) reproduces what the
/// layer chose, best first, for every family's rule — deepseek_v3's bias and groups included —
/// on prefill and decode tokens; asked for more than top-k, it ranks the choice first.
#[test]
fn gate_lookahead_at_depth_zero_is_the_routing() {
    use shadowmoe_engine::predict::{ExpertPredictor, GateLookahead, LayerView};
    for fixture in [
        "qwen3_moe",
        "qwen2_moe",
        "qwen3_next",
        "deepseek_v3",
        "deepseek_v3_noqlora",
        "glm4_moe",
        "glm4_moe_lite",
        "gpt_oss",
        "gpt_oss_mxfp4",
    ] {
        let dir = fixture_dir(fixture);
        let golden = Golden::read(&dir);
        let ckpt = Checkpoint::open_dir(&dir).unwrap();
        let model = ckpt.load_model().unwrap();
        let mut obs = RecordingObserver {
            hidden_layers: ckpt.config.moe_layers(),
            ..Default::default()
        };
        let opts = GenerateOptions {
            max_new_tokens: 4,
            sampling: SamplingParams::default(),
            eos_token_ids: vec![],
        };
        generate(&model, &golden.prompt_ids, &opts, &mut obs, |_| Ok(())).unwrap();
        let k = ckpt.config.num_experts_per_tok;
        let mut gl = GateLookahead::new(model.routers());
        assert!(obs.events.iter().any(|e| e.phase == Phase::Decode));
        for e in &obs.events {
            let hidden = e.hidden.as_ref().unwrap();
            let view = LayerView {
                layer: e.layer,
                hidden,
                experts: &e.experts,
            };
            assert_eq!(
                gl.predict(&view, e.layer, k).unwrap(),
                e.experts,
                "{fixture}: layer {}, position {}",
                e.layer,
                e.position
            );
            let more = gl.predict(&view, e.layer, k + 2).unwrap();
            assert_eq!(
                &more[..k],
                &e.experts[..],
                "{fixture}: top-{} starts with the choice",
                k + 2
            );
            assert_eq!(more.len(), k + 2);
        }
    }
}

/// The observer sees decode tokens too, with their positions and hidden states on request.
#[test]
fn observer_sees_decode_and_hidden_states() {
    let dir = fixture_dir("qwen2_moe");
    let golden = Golden::read(&dir);
    let ckpt = Checkpoint::open_dir(&dir).unwrap();
    let model = ckpt.load_model().unwrap();
    let moe = ckpt.config.moe_layers();
    let mut obs = RecordingObserver {
        hidden_layers: vec![moe[0]],
        ..Default::default()
    };
    let opts = GenerateOptions {
        max_new_tokens: 3,
        sampling: SamplingParams::default(),
        eos_token_ids: vec![],
    };
    let (generated, _) = generate(&model, &golden.prompt_ids, &opts, &mut obs, |_| Ok(())).unwrap();
    let t = golden.prompt_ids.len();
    // Prefill (t tokens) + 2 decode steps, for every MoE layer.
    assert_eq!(obs.events.len(), moe.len() * (t + 2));
    let decode: Vec<_> = obs.events.iter().filter(|e| e.phase == Phase::Decode).collect();
    assert_eq!(decode.len(), moe.len() * 2);
    assert_eq!(decode[0].position, t);
    assert_eq!(decode[0].token_id, generated[0]);
    for e in &obs.events {
        assert_eq!(e.hidden.is_some(), e.layer == moe[0]);
        if let Some(h) = &e.hidden {
            assert_eq!(h.len(), ckpt.config.hidden_size);
        }
    }
}

/// The bundled reference model (models/reference/checkpoint, trained, bf16 on disk, 512 experts
/// top-10) against the golden files models/reference/golden.py wrote with transformers.
#[test]
fn reference_model_matches_transformers() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/reference/checkpoint");
    check_dir(&dir, "qwen3_moe");
}

/// Chat templates get transformers' `strftime_now` (Llama 3.x's and gpt-oss's templates print
/// the date with it): today's UTC date as `date -u` prints it.
#[test]
fn chat_templates_get_strftime_now() {
    let tmp = tempfile::tempdir().unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture_dir("qwen3_moe").join(f), tmp.path().join(f)).unwrap();
    }
    std::fs::write(
        tmp.path().join("chat_template.jinja"),
        "Current date: {{ strftime_now('%Y-%m-%d') }} ({{ strftime_now('%A %-d %B') }})\n{{ messages[0]['content'] }}",
    )
    .unwrap();
    let tok = shadowmoe_engine::Tokenizer::open(tmp.path()).unwrap();
    let date = |fmt: &str| {
        let out = std::process::Command::new("date")
            .args(["-u", fmt])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let before = (date("+%Y-%m-%d"), date("+%A %-d %B"));
    let text = tok
        .render_chat(&[shadowmoe_engine::ChatMessage::user("hi")], false)
        .unwrap();
    let after = (date("+%Y-%m-%d"), date("+%A %-d %B"));
    let want = |(d, long): (String, String)| format!("Current date: {d} ({long})\nhi");
    assert!(
        text == want(before.clone()) || text == want(after),
        "{text:?} vs {:?}",
        want(before)
    );
}
