#!/usr/bin/env python3
"""Makes small random Hugging Face MoE checkpoints and their golden outputs with `transformers`.

The engine's parity tests read what this script writes (no Python at test time):

    <out>/<arch>/config.json, generation_config.json, model.safetensors(.index.json),
                 tokenizer.json, tokenizer_config.json, chat_template.jinja
    <out>/<arch>/golden.safetensors   prompt_ids   i64 [T]
                                      logits       f32 [T, V]   every prompt position
                                      router_experts i64 [L_moe, T, K]  best first
                                      router_weights f32 [L_moe, T, K]
                                      router_hidden f32 [T, H]    router input, first MoE layer
                                      generated    i64 [N]      greedy, EOS ignored
    <out>/<arch>/golden.json          versions, seed, prompt text, chat messages, rendered chat
                                      text and ids, smallest router top-k margin; deepseek_v3, glm4_moe*:
                                      grouped_routing (how many prompt selections group-limited
                                      routing changed against plain top-k of the biased scores,
                                      smallest group and within-group margins)

router_experts are the selection best first: deepseek_v3's router returns its top-k unsorted,
and they are recorded sorted by the biased score it selects on, with their weights as applied.

Every architecture gets features that a careless loader would get wrong: norms and biases with
random (not unit/zero) values, routers scaled so that routing is decisive, and per fixture a
different on-disk dtype, rope scaling, expert layout (per-expert or transformers-5 fused),
sharding, tied embeddings, dense layers, sliding windows or a shared expert.

Usage (pinned versions: see requirements.txt beside this file):
    python engine/tests/golden/make.py --out engine/tests/golden            # the committed fixtures
    python engine/tests/golden/make.py --out /tmp/g --seed 7 --size medium  # an independent set
    python engine/tests/golden/make.py --out engine/tests/golden --arch qwen3_moe_gguf,qwen3_moe_wide,qwen3_next_gguf

The last makes only the named fixtures. qwen3_moe_gguf, qwen3_moe_wide and qwen3_next_gguf
(VARIANTS) are the configurations that make_gguf.py converts for llama.cpp; they, deepseek_v3,
deepseek_v3_noqlora, gpt_oss, gpt_oss_mxfp4, glm4_moe, glm4_moe_lite, glm4_moe_gguf and
deepseek_v3_gguf were made with torch 2.11 and transformers 5.23 (their golden.json says which
versions), the others with the pinned versions:
    python engine/tests/golden/make.py --out engine/tests/golden --arch deepseek_v3,deepseek_v3_noqlora,gpt_oss,gpt_oss_mxfp4,glm4_moe,glm4_moe_lite,glm4_moe_gguf,deepseek_v3_gguf
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import transformers
import tokenizers
from safetensors.torch import save_file
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

ARCHS = ["qwen3_moe", "olmoe", "mixtral", "qwen2_moe", "qwen3_next", "deepseek_v3", "glm4_moe", "glm4_moe_lite", "gpt_oss"]
# Extra fixtures: another config of an architecture in ARCHS, named by --arch (and made by
# `--arch all` after the ones above). Each draws its weights from its own generator seed (after
# ARCHS' in SEED_ORDER), so adding one changes no other fixture's bytes.
VARIANTS = {
    # qwen3_moe that llama.cpp's qwen3moe architecture can hold (every layer MoE) and that the
    # engine's GGUF path takes (default rope): the GGUF golden files' qwen3_moe (make_gguf.py).
    "qwen3_moe_gguf": "qwen3_moe",
    # The same with every matrix row 256 wide (hidden, expert width, heads x head_dim), so that
    # llama.cpp's K-quants (256-value super-blocks) apply to every matrix: 2 layers, 4 experts.
    "qwen3_moe_wide": "qwen3_moe",
    # qwen3_next as llama.cpp's qwen3next architecture holds it (make_gguf.py): every layer MoE
    # (its loader requires a router in every layer), value heads as wide as key heads (it sizes
    # both from ssm.state_size), Qwen3-Next's own layer pattern (three Gated DeltaNet layers,
    # then full attention: full_attention_interval 4) and rms_norm_eps 1e-6 (llama.cpp's L2 norm
    # of q and k takes that epsilon, transformers' 1e-6); 8 experts to keep the files small.
    "qwen3_next_gguf": "qwen3_next",
    # deepseek_v3 without a query compression (q_lora_rank null: one q_proj), its rotary
    # values in halves (rope_interleave false), two shared experts, raw (not renormalised)
    # sigmoid weights, transformers-5 fused experts, f32 on disk; tiny.
    "deepseek_v3_noqlora": "deepseek_v3",
    # gpt_oss with its experts as the hub checkpoints store them: MXFP4 `*_blocks` (E2M1
    # nibbles) and `*_scales` (E8M0), quantised here from random weights; the golden is
    # transformers on the weights its own convert_moe_packed_tensors dequantises (what it runs
    # on a CPU without MXFP4 kernels), the swiglu limit the hub's 7.0.
    "gpt_oss_mxfp4": "gpt_oss",
    # glm4_moe as llama.cpp's glm4moe holds it (make_gguf.py): one expert group (as GLM-4.5's
    # own configs have it: n_group 1), no multi-token-prediction layer,
    # and GLM's special tokens in the tokenizer (the converter's GLM vocabulary asks for them).
    "glm4_moe_gguf": "glm4_moe",
    # deepseek_v3 as DeepSeek-V3's and Kimi-K2's own configs have it, which is what llama.cpp's
    # deepseek2 conversion keeps: scoring_func "sigmoid" and topk_method "noaux_tc" spelled out
    # (without them the converter writes no gating function and llama.cpp takes softmax),
    # yarn's mscale equal to mscale_all_dim (the file carries only the latter), rms_norm_eps
    # 1e-6 (llama.cpp's latent norms take the file's epsilon, transformers' 1e-6).
    "deepseek_v3_gguf": "deepseek_v3",
    # gpt_oss with bf16 experts as llama.cpp's gpt-oss holds it: the SwiGLU limit the hub's 7.0
    # (llama.cpp fixes alpha 1.702 and limit 7.0; the file carries neither).
    "gpt_oss_gguf": "gpt_oss",
}
FIXTURES = ARCHS + list(VARIANTS)
# The order that numbers each fixture's weight generator: fixtures added later come last, so
# that adding one changes no other fixture's bytes.
SEED_ORDER = [
    "qwen3_moe",
    "olmoe",
    "mixtral",
    "qwen2_moe",
    "qwen3_next",
    "qwen3_moe_gguf",
    "qwen3_moe_wide",
    "qwen3_next_gguf",
    "deepseek_v3",
    "deepseek_v3_noqlora",
    "gpt_oss",
    "gpt_oss_mxfp4",
    "glm4_moe",
    "glm4_moe_lite",
    "glm4_moe_gguf",
    "deepseek_v3_gguf",
    "gpt_oss_gguf",
]
assert sorted(SEED_ORDER) == sorted(FIXTURES)
GENERATE = 16

# Qwen2/3's pre-tokenizer split pattern (byte-level BPE after it).
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CORPUS = """\
The expert cache keeps the most useful experts resident while the rest stay on disk.
A mixture of experts routes every token to a few experts chosen by a small gate.
def route(hidden, gate, k):
    scores = softmax(gate @ hidden)
    return topk(scores, k)
fn main() { let x = vec![1, 2, 3]; println!("{:?}", x.iter().sum::<i32>()); }
SELECT layer, expert, COUNT(*) FROM trace GROUP BY layer, expert ORDER BY 3 DESC;
The integral of x^2 from 0 to 3 equals 9, and 12 * 7 = 84.
Naïve café owners in Zürich serve crème brûlée; 東京 and 北京 are capitals. Émigrés said “hello”.
Prefetching loads experts before they are needed, so the forward pass never waits on the disk.
"""

PROMPT = "The expert cache keeps 12 experts on disk — naïve café 東京!\nWhy?"
CHAT = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Which experts will layer 4 need?"},
]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first and system %}{{ '[INST] ' + system + '\\n\\n' + message['content'].strip() + ' [/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'].strip() + ' [/INST]' }}{% endif %}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)


def sizes(size):
    if size == "small":
        return dict(vocab=384, hidden=64, heads=4, layers=4, experts=8, expert_width=32)
    if size == "medium":
        return dict(vocab=640, hidden=128, heads=8, layers=6, experts=24, expert_width=48)
    raise SystemExit(f"--size: expected small or medium, got {size}")


def arch_config(arch, s, vocab):
    """The config of one fixture: small, with the features each architecture must get right."""
    h, heads, layers, e, w = s["hidden"], s["heads"], s["layers"], s["experts"], s["expert_width"]
    common = dict(
        vocab_size=vocab,
        hidden_size=h,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        pad_token_id=0,
    )
    if arch == "qwen3_moe_gguf":
        c, dtype = arch_config("qwen3_moe", s, vocab)
        c.update(mlp_only_layers=[], rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0))
        return c, dtype
    if arch == "qwen3_next_gguf":
        c, dtype = arch_config("qwen3_next", s, vocab)
        c.update(
            linear_value_head_dim=16,
            full_attention_interval=4,
            num_experts=e,
            mlp_only_layers=[],
            rms_norm_eps=1e-6,
        )
        return c, dtype
    if arch == "deepseek_v3_noqlora":
        c, _ = arch_config("deepseek_v3", s, vocab)
        c.update(
            num_hidden_layers=3,
            n_routed_experts=e,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            n_shared_experts=2,
            moe_intermediate_size=w // 2,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=12,
            routed_scaling_factor=1.5,
            norm_topk_prob=False,
            rope_interleave=False,
            rope_parameters=dict(
                rope_type="yarn", rope_theta=10_000.0, factor=2.0, original_max_position_embeddings=128
            ),
        )
        return c, torch.float32
    if arch == "deepseek_v3_gguf":
        c, dtype = arch_config("deepseek_v3", s, vocab)
        c["rope_parameters"] = dict(c["rope_parameters"], mscale=1.0, mscale_all_dim=1.0)
        c.update(scoring_func="sigmoid", topk_method="noaux_tc", rms_norm_eps=1e-6)
        return c, dtype
    if arch == "glm4_moe_gguf":
        c, dtype = arch_config("glm4_moe", s, vocab)
        c.update(n_group=1, topk_group=1, num_nextn_predict_layers=0)
        return c, dtype
    if arch == "qwen3_moe_wide":
        c, dtype = arch_config("qwen3_moe", s, vocab)
        c.update(
            hidden_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=256,
            intermediate_size=256,
            mlp_only_layers=[],
            rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0),
        )
        return c, dtype
    if arch == "qwen3_moe":
        return dict(
            common,
            model_type=arch,
            num_key_value_heads=heads // 2,
            head_dim=2 * h // heads,  # head_dim != hidden / heads, as in real Qwen3 MoE
            num_experts=2 * e,
            num_experts_per_tok=4,
            moe_intermediate_size=w,
            intermediate_size=3 * w,
            mlp_only_layers=[0],
            norm_topk_prob=True,
            rope_parameters=dict(
                rope_type="yarn", rope_theta=1_000_000.0, factor=4.0, original_max_position_embeddings=64
            ),
            tie_word_embeddings=False,
        ), torch.bfloat16
    if arch == "olmoe":
        return dict(
            common,
            model_type=arch,
            num_key_value_heads=heads,
            num_experts=e,
            num_experts_per_tok=2,
            intermediate_size=w,
            norm_topk_prob=False,
            clip_qkv=4.0,
            rope_parameters=dict(rope_type="linear", rope_theta=10_000.0, factor=2.0),
            tie_word_embeddings=True,
        ), torch.float32
    if arch == "mixtral":
        return dict(
            common,
            model_type=arch,
            num_key_value_heads=1,
            num_local_experts=e,
            num_experts_per_tok=2,
            intermediate_size=w + 16,
            sliding_window=9,
            rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0),
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
        ), torch.float16
    if arch == "qwen2_moe":
        return dict(
            common,
            model_type=arch,
            num_key_value_heads=heads // 2,
            num_experts=e + 4,
            num_experts_per_tok=3,
            moe_intermediate_size=w - 8,
            shared_expert_intermediate_size=h,
            intermediate_size=w + 48,
            decoder_sparse_step=2,
            norm_topk_prob=False,
            max_position_embeddings=20,  # decode runs past it: dynamic NTK rope kicks in
            rope_parameters=dict(rope_type="dynamic", rope_theta=10_000.0, factor=2.0),
            tie_word_embeddings=False,
        ), torch.float32
    if arch == "qwen3_next":
        # The hybrid stack: Gated DeltaNet layers with a gated full-attention layer every
        # `full_attention_interval` layers; grouped value heads (more value than key heads) of
        # another width than the keys; partial rotary; a shared expert; one dense layer.
        return dict(
            common,
            model_type=arch,
            num_key_value_heads=heads // 2,
            head_dim=2 * h // heads,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=16,
            linear_value_head_dim=24,
            linear_conv_kernel_dim=4,
            full_attention_interval=2,
            num_experts=2 * e,
            num_experts_per_tok=4,
            moe_intermediate_size=w,
            shared_expert_intermediate_size=w + 16,
            intermediate_size=3 * w,
            mlp_only_layers=[2],
            norm_topk_prob=True,
            rope_parameters=dict(rope_type="default", rope_theta=10_000.0, partial_rotary_factor=0.25),
            tie_word_embeddings=False,
        ), torch.bfloat16
    if arch == "deepseek_v3":
        # Multi-head latent attention (compressed queries: q_lora_rank; a compressed key/value
        # latent: kv_lora_rank; heads split into a rotary part shared by all heads and a
        # non-rotary part, values of another width), yarn rope with DeepSeek's attention scaling
        # (mscale, mscale_all_dim), interleaved rotary pairs; sigmoid router scores with a
        # selection-only bias and group-limited top-k (4 groups of 4, the best 2 kept), scaled
        # weights; a shared expert; the first layer dense.
        return dict(
            common,
            model_type=arch,
            num_key_value_heads=heads,
            n_routed_experts=2 * e,
            num_experts_per_tok=4,
            n_group=4,
            topk_group=2,
            n_shared_experts=1,
            moe_intermediate_size=w,
            intermediate_size=3 * w,
            first_k_dense_replace=1,
            q_lora_rank=32,
            kv_lora_rank=32,
            qk_rope_head_dim=8,
            qk_nope_head_dim=16,
            v_head_dim=16,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            rope_interleave=True,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=10_000.0,
                factor=4.0,
                original_max_position_embeddings=64,
                mscale=0.707,
                mscale_all_dim=1.0,
                beta_fast=32,
                beta_slow=1,
            ),
            tie_word_embeddings=False,
        ), torch.bfloat16
    if arch == "glm4_moe":
        # GLM-4.5's stack: grouped-query attention with heads wider than hidden / heads, half of
        # each head rotated (partial_rotary_factor, a top-level key as in GLM's configs), q/k
        # RMSNorms per head, biases on q/k/v but not o_proj; deepseek_v3's router (sigmoid,
        # selection bias, 4 groups of 4 with the best 2 kept, scaled weights); a shared expert;
        # the first layer dense.
        return dict(
            common,
            model_type=arch,
            num_key_value_heads=heads // 2,
            head_dim=2 * h // heads,
            partial_rotary_factor=0.5,
            use_qk_norm=True,
            attention_bias=True,
            n_routed_experts=2 * e,
            num_experts_per_tok=4,
            n_group=4,
            topk_group=2,
            n_shared_experts=1,
            moe_intermediate_size=w,
            intermediate_size=3 * w,
            first_k_dense_replace=1,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0, partial_rotary_factor=0.5),
            tie_word_embeddings=False,
        ), torch.bfloat16
    if arch == "glm4_moe_lite":
        # GLM-4.7-Flash's stack: deepseek_v3's latent attention (compressed queries, interleaved
        # rotary pairs, values of another width) over GLM's router (2 groups, the best kept), two
        # shared experts; dense and sparse layers named by mlp_layer_types (not the default
        # pattern); transformers-5 fused experts, f32 on disk.
        return dict(
            common,
            model_type=arch,
            num_hidden_layers=3,
            num_key_value_heads=heads,
            n_routed_experts=e,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            n_shared_experts=2,
            moe_intermediate_size=w // 2,
            intermediate_size=2 * w,
            mlp_layer_types=["sparse", "dense", "sparse"],
            q_lora_rank=24,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=12,
            routed_scaling_factor=1.8,
            norm_topk_prob=True,
            rope_interleave=True,
            rope_parameters=dict(rope_type="default", rope_theta=10_000.0),
            tie_word_embeddings=False,
        ), torch.float32
    if arch in ("gpt_oss", "gpt_oss_mxfp4", "gpt_oss_gguf"):
        # Attention sinks, q/k/v/o biases, GQA, head_dim × heads ≠ hidden, sliding and full
        # attention alternating (a window shorter than the prompt), the hub's yarn rope
        # (factor 32, truncate false, its attention factor); a router with a bias, softmax over
        # the top-k logits; experts fused with gate and up interleaved, with biases, and the
        # clamped SwiGLU (bf16: a limit of 1.0 so that the clamps bite on random weights).
        return dict(
            common,
            model_type="gpt_oss",
            num_key_value_heads=heads // 2,
            head_dim=24,
            num_local_experts=2 * e,
            num_experts_per_tok=4,
            intermediate_size=w,
            sliding_window=5,
            swiglu_limit=1.0 if arch == "gpt_oss" else 7.0,
            attention_bias=True,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=150_000.0,
                factor=32.0,
                beta_fast=32.0,
                beta_slow=1.0,
                truncate=False,
                original_max_position_embeddings=4096,
            ),
            tie_word_embeddings=False,
        ), torch.bfloat16
    raise ValueError(arch)


def quantize_mxfp4(w):
    """Float `[..., K]` (K a multiple of 32) → (blocks u8 `[..., K/32, 16]`, scales u8
    `[..., K/32]`) as the hub stores MXFP4: per block of 32 the E8M0 scale 2^(s−127) that brings
    the largest magnitude within E2M1's 6, each value rounded to the nearest E2M1 value, value
    2m in the low nibble of byte m and 2m + 1 in the high one."""
    fp4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    *lead, k = w.shape
    b = w.float().reshape(*lead, k // 32, 32)
    amax = b.abs().amax(dim=-1, keepdim=True).clamp(min=1e-30)
    e = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    q = b / torch.pow(2.0, e)
    idx = (q.abs().unsqueeze(-1) - fp4).abs().argmin(dim=-1)
    nib = (idx | ((q < 0) & (idx > 0)).to(torch.int64) << 3).to(torch.uint8)
    blocks = nib[..., 0::2] | (nib[..., 1::2] << 4)
    return blocks.contiguous(), (e.squeeze(-1) + 127).to(torch.uint8).contiguous()


def write_mxfp4_experts(out, model):
    """Replaces the fixture's float experts in model.safetensors by MXFP4 blocks and scales in
    the hub's layout (`[E, rows, cols/32, 16]`, rows the output: gate_up_proj's 2I interleaved,
    down_proj's H), declares `quantization_config` as the hub's config.json does, and loads
    transformers' dequantisation of them into `model` (the golden's weights)."""
    from safetensors.torch import load_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    tensors = load_file(out / "model.safetensors")
    state = {}
    for name in list(tensors):
        if not (name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj")):
            continue
        w = tensors.pop(name).transpose(1, 2).contiguous()  # [E, out, in]
        blocks, scales = quantize_mxfp4(w)
        tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
        state[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16).float()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(n in missing for n in [k for k in model.state_dict() if k not in state])


# Special tokens GLM's tokenizers have and llama.cpp's converter looks up for its glm4moe
# vocabulary (bos [gMASK], eot <|user|>, eom <|observation|>).
GLM_SPECIALS = ["[gMASK]", "<|user|>", "<|observation|>"]


def train_tokenizer(vocab, bos_style, extra_specials=()):
    specials = ["<|endoftext|>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", *extra_specials]
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS.splitlines() * 4, trainer)
    if bos_style:
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
        )
    return tok


def init_weights(model, gen):
    """Non-trivial random weights: norms around 1, biases around 0 but not 0, decisive routers.
    Zero-centred norms (qwen3_next's, which scale by 1 + weight) get weights around 0."""
    zero_centred = model.config.model_type == "qwen3_next"
    for name, p in model.named_parameters():
        with torch.no_grad():
            if "norm" in name and zero_centred and "linear_attn.norm" not in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight", "mlp.router.weight")):
                p.copy_(3.0 * torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    # deepseek_v3's selection bias is a buffer, not a parameter: drawn as wide as the spread of
    # the sigmoid scores, so that it changes which experts and groups win.
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            with torch.no_grad():
                b.copy_(0.3 * torch.randn(b.shape, generator=gen))


class RouterRecorder:
    """Records (indices, weights, probabilities) of every TopKRouter call (deepseek_v3's
    TopkRouter too: its selection and weights as applied, best first by the score it selects
    on, and what plain top-k would have chosen)."""

    def __init__(self, model):
        self.calls = []
        self.inputs = []
        # deepseek_v3: per call (group-limited selection differs from plain top-k per token,
        # smallest group margin, smallest expert margin within the kept groups).
        self.grouped = []
        self.handles = [
            m.register_forward_hook(self.hook)
            for m in model.modules()
            if type(m).__name__.lower().endswith("topkrouter")
        ]

    def hook(self, module, inputs, output):
        logits, weights, indices = output
        if hasattr(module, "e_score_correction_bias"):
            indices, weights = self.grouped_call(module, logits, weights, indices)
            probs = None
        else:
            probs = torch.softmax(logits.float(), dim=-1).detach()
        self.calls.append((indices.detach().clone(), weights.detach().float().clone(), probs))
        self.inputs.append(inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float().clone())

    def grouped_call(self, module, logits, weights, indices):
        """deepseek_v3's router picks its top-k unsorted: sort them best first by the biased
        score it selects on (weights alongside, as applied), and measure the selection."""
        scores = logits.float().sigmoid()
        biased = scores + module.e_score_correction_bias.float()
        chosen = biased.gather(1, indices)
        order = torch.sort(chosen, dim=-1, descending=True, stable=True).indices
        indices, weights = indices.gather(1, order), weights.gather(1, order)
        n, g, kg, k = module.num_experts, module.num_group, module.topk_group, module.top_k
        group_scores = biased.view(-1, g, n // g).topk(2, dim=-1)[0].sum(dim=-1)
        gs = torch.sort(group_scores, dim=-1, descending=True).values
        group_margin = (gs[:, kg - 1] - gs[:, kg]).min() if kg < g else torch.tensor(float("inf"))
        kept = biased.gather(1, indices)  # (T, K) best first
        masked = biased.clone()
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, torch.topk(group_scores, kg, dim=-1).indices, True)
        masked[~keep.repeat_interleave(n // g, dim=1)] = float("-inf")
        ms = torch.sort(masked, dim=-1, descending=True).values
        expert_margin = (ms[:, k - 1] - ms[:, k]).min() if k < kg * (n // g) else torch.tensor(float("inf"))
        assert torch.equal(ms[:, :k], kept), "the recorded selection is not the masked top-k"
        plain = torch.topk(biased, k, dim=-1).indices
        differs = [set(a.tolist()) != set(b.tolist()) for a, b in zip(plain, indices)]
        self.grouped.append((differs, float(group_margin), float(expert_margin)))
        return indices, weights

    def close(self):
        for h in self.handles:
            h.remove()


def make_fixture(arch, out_dir, seed, size):
    s = sizes(size)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed * 1000 + SEED_ORDER.index(arch))
    bos_style = VARIANTS.get(arch, arch) == "mixtral"
    tok = train_tokenizer(s["vocab"] - 32, bos_style, GLM_SPECIALS if arch == "glm4_moe_gguf" else ())
    cfg_dict, dtype = arch_config(arch, s, s["vocab"])
    if bos_style:
        cfg_dict["bos_token_id"] = tok.token_to_id("<s>")
        cfg_dict["eos_token_id"] = tok.token_to_id("</s>")
    else:
        cfg_dict["eos_token_id"] = tok.token_to_id("<|im_end|>")
    model_type = cfg_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg_dict)
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    init_weights(model, gen)

    out = Path(out_dir) / arch
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("model*.safetensors*"):
        old.unlink()
    save_kwargs = {}
    if arch == "qwen3_moe":
        save_kwargs["max_shard_size"] = "400KB"  # sharded: model.safetensors.index.json
    if arch in ("olmoe", "deepseek_v3_noqlora", "glm4_moe_lite"):
        save_kwargs["save_original_format"] = False  # transformers-5 fused experts
    model.to(dtype)
    # deepseek_v3 checkpoints keep the selection bias in f32 beside bf16 weights (transformers
    # loads it so: _keep_in_fp32_modules_strict).
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.data = b.data.float()
    model.save_pretrained(out, **save_kwargs)
    # The reference is transformers loading the files just written, computing in f32 from
    # exactly the on-disk values.
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    if arch == "gpt_oss_mxfp4":
        write_mxfp4_experts(out, model)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>" if bos_style else None,
        eos_token="</s>" if bos_style else "<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=MISTRAL_TEMPLATE if bos_style else CHATML_TEMPLATE,
    )
    hf_tok.save_pretrained(out)
    meta = {"arch": arch, "seed": seed, "size": size, "on_disk_dtype": str(dtype).replace("torch.", "")}
    if arch in VARIANTS:
        meta["variant_of"] = VARIANTS[arch]
    write_golden(model, hf_tok, out, meta)


def finite_or_none(x):
    """JSON has no infinity: a margin that does not exist is null."""
    return x if math.isfinite(x) else None


def write_golden(model, hf_tok, out, extra_meta):
    """Runs the loaded `model` on PROMPT and writes golden.safetensors and golden.json to `out`;
    returns the smallest gap between the k-th and (k+1)-th router probability."""
    config = model.config
    prompt_ids = hf_tok(PROMPT)["input_ids"]
    chat_text = hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    chat_ids = hf_tok(chat_text, add_special_tokens=False)["input_ids"]

    rec = RouterRecorder(model)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    prompt_calls = list(rec.calls)
    router_hidden = rec.inputs[0]  # the first MoE layer's router input, [T, H]
    rec.calls.clear()
    # Plain greedy decoding through transformers' KV cache: argmax every step, no logits
    # processors (generate() would suppress EOS under min_new_tokens), EOS does not stop it.
    generated, past, cur = [], None, ids
    with torch.no_grad():
        for _ in range(GENERATE):
            o = model(cur, past_key_values=past, use_cache=True)
            past = o.past_key_values
            nxt = int(o.logits[0, -1].argmax())
            generated.append(nxt)
            cur = torch.tensor([[nxt]])
    generated = torch.tensor(generated, dtype=torch.int64)
    rec.close()

    k = config.num_experts_per_tok
    margins = []
    for _, _, probs in prompt_calls + rec.calls:
        if probs is None:
            continue  # deepseek_v3's group-limited selection: measured by RouterRecorder
        top = torch.sort(probs, dim=-1, descending=True).values
        margins.append(float((top[:, k - 1] - top[:, k]).min()))
    grouped_meta = {}
    if rec.grouped:
        # Every router call, prompt and decode: the selection's margins (the gap between the
        # last kept and the first dropped group score, and between the k-th and (k+1)-th biased
        # score within the kept groups), and on the prompt, how many (token, MoE layer)
        # selections group-limited routing changed against plain top-k of the biased scores.
        margins = [min(gm, em) for _, gm, em in rec.grouped]
        prompt_grouped = rec.grouped[: len(prompt_calls)]
        grouped_meta = {
            "grouped_routing": {
                "prompt_selections": sum(len(d) for d, _, _ in prompt_grouped),
                "prompt_selections_differing_from_plain_top_k": sum(sum(d) for d, _, _ in prompt_grouped),
                # None where every group is kept (one group): no group margin.
                "min_group_margin": finite_or_none(min(gm for _, gm, _ in rec.grouped)),
                "min_expert_margin_within_kept_groups": finite_or_none(min(em for _, _, em in rec.grouped)),
            }
        }
    router_experts = torch.stack([c[0] for c in prompt_calls]).to(torch.int64)
    router_weights = torch.stack([c[1] for c in prompt_calls])
    save_file(
        {
            "prompt_ids": torch.tensor(prompt_ids, dtype=torch.int64),
            "logits": logits.contiguous(),
            "router_experts": router_experts.contiguous(),
            "router_weights": router_weights.contiguous(),
            "router_hidden": router_hidden.contiguous(),
            "generated": generated.to(torch.int64).contiguous(),
        },
        out / "golden.safetensors",
    )
    top2 = torch.topk(logits, 2, dim=-1).values
    meta = {
        "made_by": "engine/tests/golden/make.py",
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__, "tokenizers": tokenizers.__version__},
        **extra_meta,
        "prompt": PROMPT,
        "prompt_ids": prompt_ids,
        "chat_messages": CHAT,
        "chat_text": chat_text,
        "chat_ids": chat_ids,
        "generated": generated.tolist(),
        "min_router_margin": min(margins),
        "min_logit_top2_gap": float((top2[:, 0] - top2[:, 1]).min()),
        **grouped_meta,
    }
    (out / "golden.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    name = extra_meta.get("arch", config.model_type)
    print(f"{name}: {len(prompt_ids)} prompt tokens, min router margin {min(margins):.2e}, files in {out}")
    if min(margins) < 1e-5:
        print(f"warning: {name} has a near-tie in routing (margin {min(margins):.2e}); f32 order may flip it")
    return min(margins)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory that receives one folder per architecture")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", default="small", choices=["small", "medium"])
    ap.add_argument("--arch", default="all", help="comma list of " + ",".join(FIXTURES) + ", or all")
    args = ap.parse_args()
    archs = FIXTURES if args.arch == "all" else args.arch.split(",")
    for a in archs:
        if a not in FIXTURES:
            sys.exit(f"--arch: unknown {a!r}; expected one of {', '.join(FIXTURES)}")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    for a in archs:
        make_fixture(a, args.out, args.seed, args.size)


if __name__ == "__main__":
    main()
