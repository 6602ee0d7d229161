#!/usr/bin/env python3
"""Trains shadowmoe's reference MoE: a small `qwen3_moe` with learned routing, on the CPU.

Reads the corpus that corpus.py builds (train.jsonl / heldout.jsonl, one document per line),
trains a byte-level BPE tokenizer on the training split (Qwen2 pre-tokenizer regex + ByteLevel,
<|endoftext|> <|im_start|> <|im_end|>, a ChatML chat template), then trains a Qwen3-MoE
(`Qwen3MoeConfig`, `AutoModelForCausalLM.from_config`) from scratch with a plain torch loop:
AdamW, linear warm-up then cosine decay, gradient clipping, the router's load-balancing
auxiliary loss on (`output_router_logits=True`, `router_aux_loss_coef`).

Output directory (--out):

    config.json, generation_config.json, model.safetensors   the checkpoint, bf16, per-expert
                                                              tensors (the Hugging Face hub layout)
    tokenizer.json, tokenizer_config.json, chat_template.jinja
    training_log.csv     step, tokens, elapsed_s, lr, train_loss (cross-entropy), aux_loss,
                         heldout_loss (every --eval-every steps on a fixed held-out sample)
    training_report.json shape, parameter counts, versions, seed, corpus hashes, throughput,
                         held-out perplexity of the saved checkpoint and of a unigram baseline
                         (per token of this tokenizer, add-one smoothing, counts from the
                         training split), expert-load statistics, greedy samples

The time budget (--minutes) covers the whole run (tokenizer, tokenising, training, final
evaluation, saving): after a few calibration steps the script fixes the number of steps so the
cosine schedule ends on time, and records it; `--steps N` instead fixes it up front, which
makes a run repeatable bit for bit on the same machine, thread count and library versions.

Usage:
    python models/reference/train.py --corpus models/reference/corpus --out runs/ref \\
        --minutes 85 --threads 2 --seed 0
    python models/reference/train.py --bench 6 --experts 512 --top-k 10   # tokens/s of a step
"""

import argparse
import os
import sys
import time

T_START = time.time()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus"))
    ap.add_argument("--out", default=None, help="output directory (required unless --bench)")
    ap.add_argument("--minutes", type=float, default=85.0, help="wall-clock budget of the whole run")
    ap.add_argument("--steps", type=int, default=None, help="exact number of optimizer steps (else from --minutes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch, MKL/OpenMP and tokenizers threads")
    g = ap.add_argument_group("shape")
    g.add_argument("--experts", type=int, default=512)
    g.add_argument("--top-k", type=int, default=10)
    g.add_argument("--layers", type=int, default=8, help="decoder layers, all MoE")
    g.add_argument("--hidden", type=int, default=64)
    g.add_argument("--moe-intermediate", type=int, default=16, help="width of one expert")
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--kv-heads", type=int, default=2)
    g.add_argument("--head-dim", type=int, default=32)
    g.add_argument("--vocab", type=int, default=8192)
    g.add_argument("--seq-len", type=int, default=256)
    g.add_argument("--max-positions", type=int, default=4096, help="config max_position_embeddings")
    g.add_argument("--rope-theta", type=float, default=1_000_000.0)
    g.add_argument("--tie-embeddings", action="store_true")
    g = ap.add_argument_group("optimisation")
    g.add_argument("--batch", type=int, default=16, help="sequences per step")
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor, as a fraction of --lr")
    g.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--clip", type=float, default=1.0)
    g.add_argument("--aux-coef", type=float, default=0.01, help="router_aux_loss_coef")
    g.add_argument("--aux-mode", default="per-layer", choices=["per-layer", "hf"],
                   help="load-balancing loss per MoE layer (default), or transformers' pooled one")
    g.add_argument("--experts-impl", default="grouped_mm", help="eager | batched_mm | grouped_mm (comma list with --bench)")
    g = ap.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=int, default=200, help="steps between held-out evaluations")
    g.add_argument("--eval-tokens", type=int, default=32768, help="held-out tokens of the periodic evaluation")
    g.add_argument("--final-eval-tokens", type=int, default=0, help="held-out tokens of the final evaluation (0: all)")
    g.add_argument("--save-every", type=int, default=0, help="also save the checkpoint every N steps (0: only at the end)")
    g.add_argument("--max-size-mb", type=float, default=32.0, help="fail when the checkpoint files exceed this")
    ap.add_argument("--bench", type=int, default=0, help="only time N training steps on random tokens, print tokens/s")
    args = ap.parse_args(argv)
    if not args.bench and not args.out:
        ap.error("--out is required")
    return args


ARGS = parse_args()
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS", "RAYON_RS_NUM_CPUS"):
    os.environ[var] = str(ARGS.threads)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true" if ARGS.threads > 1 else "false")

import copy  # noqa: E402
import csv  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import safetensors  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast, Qwen3MoeConfig  # noqa: E402

torch.set_num_threads(ARGS.threads)
torch.set_num_interop_threads(1)
transformers.logging.set_verbosity_error()

# Qwen2/3's pre-tokenizer split pattern (byte-level BPE after it), as in engine/tests/golden/make.py.
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SAMPLE_PROMPTS = ["def fibonacci(n):\n", "The integral of", "fn main() {\n", "The os module"]
SAMPLE_CHAT = [{"role": "user", "content": "How do I read a file in Python?"}]
CHECKPOINT_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                    "tokenizer_config.json", "chat_template.jinja"]


def log(msg):
    print(f"[{time.time() - T_START:7.1f}s] {msg}", file=sys.stderr, flush=True)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Corpus and tokenizer


def read_split(corpus, split):
    path = Path(corpus) / f"{split}.jsonl"
    if not path.exists():
        sys.exit(f"train.py: {path} not found; build the corpus first: python3 models/reference/corpus.py")
    docs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            docs.append((d["domain"], d["text"]))
    return docs


def train_tokenizer(texts, vocab):
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return tok


def hf_tokenizer(tok):
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )


def token_stream(tok, docs, eot):
    """All documents' ids, each followed by <|endoftext|>, as one int32 array; per-domain token counts."""
    out, per_domain = [], {}
    batch = 256
    for i in range(0, len(docs), batch):
        chunk = docs[i : i + batch]
        encs = tok.encode_batch([t for _, t in chunk], add_special_tokens=False)
        for (domain, _), e in zip(chunk, encs):
            ids = np.asarray(e.ids + [eot], dtype=np.int32)
            out.append(ids)
            per_domain[domain] = per_domain.get(domain, 0) + len(ids)
    return np.concatenate(out), per_domain


# --------------------------------------------------------------------------------------------
# Model


def make_config(args, vocab_size, eot, im_end):
    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,  # unused: no dense layers
        moe_intermediate_size=args.moe_intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=args.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
        rms_norm_eps=1e-6,
        tie_word_embeddings=args.tie_embeddings,
        output_router_logits=True,
        router_aux_loss_coef=args.aux_coef,
        use_cache=True,
        bos_token_id=None,
        eos_token_id=im_end,
        pad_token_id=eot,
        attention_bias=False,
        use_sliding_window=False,
    )


def count_params(model, cfg):
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = total - expert + expert * cfg.num_experts_per_tok // cfg.num_experts
    if cfg.tie_word_embeddings:
        embed = 0
    else:
        embed = model.get_input_embeddings().weight.numel()  # a lookup, no compute
    return {"total": total, "experts": expert, "active_per_token": active,
            "active_per_token_non_embedding": active - embed}


def build_model(args, cfg, seed):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, experts_implementation=args.experts_impl)
    return model


def param_groups(model, weight_decay):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in n else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step, total, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, total - args.warmup))
    floor = args.lr * args.min_lr_ratio
    return floor + (args.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def eval_windows(stream, seq_len, max_tokens):
    """Non-overlapping windows over the held-out stream, [n, seq_len] int64 (the tail is dropped);
    with max_tokens, that many tokens' worth of windows spread evenly over the stream, so every
    domain is in the sample (the stream is sorted by domain)."""
    total = len(stream) // seq_len
    all_w = torch.from_numpy(stream[: total * seq_len].astype(np.int64)).view(total, seq_len)
    n = min(total, max(1, max_tokens // seq_len)) if max_tokens else total
    if n == total:
        return all_w
    return all_w[torch.linspace(0, total - 1, n).round().long()]


class RouterTap:
    """Forward hooks on every router: keeps (logits, chosen experts) of the last forward, layer order."""

    def __init__(self, model):
        self.records = []
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules()
                        if type(m).__name__.endswith("TopKRouter")]
        if not self.handles:
            raise RuntimeError("no TopKRouter modules found")

    def _hook(self, module, inputs, output):
        logits, _, indices = output
        self.records.append((logits, indices))

    def take(self):
        r, self.records = self.records, []
        return r


def aux_loss_per_layer(records, num_experts):
    """Switch-Transformer load-balancing loss of each MoE layer on its own (k when balanced).

    transformers' load_balancing_loss_func pools all layers' routing before the product, so it
    only balances each expert's load summed over layers; every MoE layer here gets its own term,
    as Switch/GShard/Megatron (and Qwen's training) do. Same scale: `k` at perfect balance.
    """
    losses = []
    for logits, indices in records:
        probs = torch.softmax(logits.float(), dim=-1)
        frac = torch.bincount(indices.reshape(-1), minlength=num_experts).float() / logits.shape[0]
        losses.append(num_experts * (frac * probs.mean(dim=0)).sum())
    return torch.stack(losses)


def train_step(model, tap, opt, x, args):
    """One optimizer step; returns (cross-entropy, aux loss) as floats."""
    if args.aux_mode == "hf":  # transformers adds coef * its pooled aux loss to out.loss
        out = model(input_ids=x, labels=x, use_cache=False, output_router_logits=True)
        tap.take()
        aux = out.aux_loss
        loss = out.loss
        ce = loss.detach() - args.aux_coef * aux.detach()
    else:
        out = model(input_ids=x, labels=x, use_cache=False, output_router_logits=False)
        aux = aux_loss_per_layer(tap.take(), model.config.num_experts).mean()
        ce = out.loss.detach()
        loss = out.loss + args.aux_coef * aux
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return ce.item(), aux.detach().item()


@torch.no_grad()
def evaluate(model, tap, windows, batch, num_experts=None):
    """Mean cross-entropy (nats/token) over every prediction in the windows; expert loads if asked."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    loads = None
    for i in range(0, len(windows), batch):
        x = windows[i : i + batch]
        out = model(input_ids=x, output_router_logits=False, use_cache=False)
        records = tap.take()
        logits = out.logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += x[:, 1:].numel()
        if num_experts is not None:
            layer_counts = torch.stack([torch.bincount(idx.reshape(-1), minlength=num_experts) for _, idx in records])
            loads = layer_counts if loads is None else loads + layer_counts
    model.train(was_training)
    return total / count, count, loads


def load_stats(loads):
    """Per MoE layer: normalised entropy of expert load, max/mean load, experts never chosen."""
    rows = []
    for layer, c in enumerate(loads.double()):
        p = c / c.sum()
        ent = float(-(p[p > 0] * p[p > 0].log()).sum() / math.log(len(p)))
        rows.append({"layer": layer, "load_entropy_normalised": round(ent, 4),
                     "max_over_mean_load": round(float(c.max() / c.mean()), 3),
                     "experts_never_chosen": int((c == 0).sum())})
    return rows


def unigram_nll(train_stream, eval_targets, vocab_size):
    """Cross-entropy (nats/token) of an add-one-smoothed unigram model counted on the training stream."""
    counts = np.bincount(train_stream, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[eval_targets].mean())


def save_checkpoint(model, hf_tok, out, gen_cfg):
    out.mkdir(parents=True, exist_ok=True)
    for name in CHECKPOINT_FILES:  # no stale files of an earlier save
        (out / name).unlink(missing_ok=True)
    # A separate bf16 model (no hooks, no optimizer state): the training weights stay f32.
    bf16 = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), dtype=torch.bfloat16)
    bf16.load_state_dict(model.state_dict())
    bf16.config.dtype = torch.bfloat16
    bf16.config.output_router_logits = False  # inference default, as in published Qwen3-MoE configs
    bf16.generation_config = gen_cfg
    bf16.save_pretrained(out)
    hf_tok.save_pretrained(out)
    sizes = {n: (out / n).stat().st_size for n in CHECKPOINT_FILES if (out / n).exists()}
    return sizes


def benchmark(args):
    """Tokens/s of a full training step (forward, backward, AdamW) on random tokens, per implementation."""
    cfg = make_config(args, args.vocab, 0, 2)
    results = []
    for impl in args.experts_impl.split(","):
        a = argparse.Namespace(**vars(args))
        a.experts_impl = impl
        model = build_model(a, cfg, args.seed)
        params = count_params(model, cfg)
        opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=1e-3, betas=(0.9, 0.95), fused=False)
        tap = RouterTap(model)
        gen = torch.Generator().manual_seed(args.seed)
        times = []
        for step in range(args.bench + 2):
            x = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=gen)
            t = time.perf_counter()
            train_step(model, tap, opt, x, args)
            if step >= 2:
                times.append(time.perf_counter() - t)
        t = sorted(times)[len(times) // 2]
        row = {"experts": args.experts, "top_k": args.top_k, "layers": args.layers, "hidden": args.hidden,
               "moe_intermediate": args.moe_intermediate, "vocab": args.vocab, "batch": args.batch,
               "seq_len": args.seq_len, "threads": args.threads, "experts_impl": impl, "aux_mode": args.aux_mode,
               "median_step_s": round(t, 4), "tokens_per_s": round(args.batch * args.seq_len / t, 1),
               "params_total": params["total"], "params_active": params["active_per_token"],
               "bf16_mb": round(2 * params["total"] / 1e6, 2)}
        print(json.dumps(row), flush=True)
        results.append(row)
        del model, opt
    return results


# --------------------------------------------------------------------------------------------


def main(args):
    if args.bench:
        benchmark(args)
        return
    deadline = T_START + 60 * args.minutes
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    corpus = Path(args.corpus)
    manifest_path = corpus / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    train_docs = read_split(corpus, "train")
    heldout_docs = read_split(corpus, "heldout")
    log(f"corpus: {len(train_docs)} train docs, {len(heldout_docs)} held-out docs")

    tok = train_tokenizer([t for _, t in train_docs], args.vocab)
    vocab_size = tok.get_vocab_size()
    eot, im_start, im_end = (tok.token_to_id(s) for s in SPECIALS)
    hf_tok = hf_tokenizer(tok)
    t_tok = time.time() - T_START
    log(f"tokenizer: {vocab_size} tokens")

    train_stream, train_dom = token_stream(tok, train_docs, eot)
    heldout_stream, heldout_dom = token_stream(tok, heldout_docs, eot)
    train_bytes = sum(len(t.encode("utf-8")) for _, t in train_docs)
    heldout_bytes = sum(len(t.encode("utf-8")) for _, t in heldout_docs)
    del train_docs, heldout_docs
    t_data = time.time() - T_START
    log(f"tokens: train {len(train_stream):,} ({train_bytes / len(train_stream):.2f} bytes/token), "
        f"held-out {len(heldout_stream):,}")

    cfg = make_config(args, vocab_size, eot, im_end)
    model = build_model(args, cfg, args.seed)
    model.train()
    tap = RouterTap(model)
    params = count_params(model, cfg)
    log(f"model: {params['total']:,} parameters ({2 * params['total'] / 1e6:.1f} MB bf16), "
        f"{params['active_per_token']:,} active per token, experts impl {model.config._experts_implementation}")
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    gen_cfg = GenerationConfig(eos_token_id=[im_end, eot], pad_token_id=eot, do_sample=False)

    eval_x = eval_windows(heldout_stream, args.seq_len, args.eval_tokens)
    data_gen = torch.Generator().manual_seed(args.seed + 1)
    n_windows = len(train_stream) - args.seq_len
    train_t = torch.from_numpy(train_stream.astype(np.int64))

    log_path = out / "training_log.csv"
    log_f = open(log_path, "w", newline="")
    writer = csv.writer(log_f)
    writer.writerow(["step", "tokens", "elapsed_s", "lr", "train_loss", "aux_loss", "heldout_loss",
                     "heldout_load_entropy", "heldout_dead_experts"])

    total_steps = args.steps
    calib_step = min(30, max(5, args.warmup // 2))
    tokens_per_step = args.batch * args.seq_len
    step_times, eval_times = [], []
    ce_hist = []
    stopped_by = "steps"
    final_reserve = None
    step = 0
    t_train0 = time.time()
    while True:
        if total_steps is not None and step >= total_steps:
            break
        if final_reserve is not None and time.time() > deadline - final_reserve:
            stopped_by = "time"
            break
        lr = lr_at(step, total_steps or 10**9, args)
        for g in opt.param_groups:
            g["lr"] = lr
        t0 = time.perf_counter()
        starts = torch.randint(0, n_windows, (args.batch,), generator=data_gen)
        x = torch.stack([train_t[s : s + args.seq_len] for s in starts.tolist()])
        ce, aux = train_step(model, tap, opt, x, args)
        ce_hist.append(ce)
        step_times.append(time.perf_counter() - t0)
        step += 1
        heldout = ent = dead = ""
        if step % args.eval_every == 0 or step == calib_step or step == total_steps:
            te = time.perf_counter()
            heldout, _, loads = evaluate(model, tap, eval_x, args.batch, num_experts=cfg.num_experts)
            eval_times.append(time.perf_counter() - te)
            stats = load_stats(loads)
            heldout = f"{heldout:.5f}"
            ent = f"{sum(r['load_entropy_normalised'] for r in stats) / len(stats):.4f}"
            dead = f"{sum(r['experts_never_chosen'] for r in stats) / len(stats):.1f}"
            log(f"step {step}/{total_steps or '?'}  lr {lr:.2e}  train {ce:.4f}  aux {aux:.4f}  held-out {heldout}  "
                f"load entropy {ent}  dead {dead}  "
                f"{tokens_per_step / (sum(step_times[-20:]) / len(step_times[-20:])):.0f} tok/s")
        writer.writerow([step, step * tokens_per_step, f"{time.time() - t_train0:.2f}", f"{lr:.6g}",
                         f"{ce:.5f}", f"{aux:.5f}", heldout, ent, dead])
        if step % 20 == 0:
            log_f.flush()
        if step == calib_step:
            # Fix the schedule: the steps that fit in what is left, after the final evaluation and save.
            # Mean, not median: a busy machine makes some steps slow; 5% margin on top.
            step_s = sum(step_times[3:]) / len(step_times[3:])
            eval_s = eval_times[-1]
            final_tokens = args.final_eval_tokens or len(heldout_stream)
            # two final evaluations (f32 weights, reloaded checkpoint), save, reload, samples
            final_reserve = 40.0 + 2.4 * eval_s * final_tokens / max(1, eval_x.numel())
            if total_steps is None:
                left = 0.95 * (deadline - time.time() - final_reserve)
                per_step = step_s + eval_s / args.eval_every
                if args.save_every:
                    per_step += 10.0 / args.save_every
                total_steps = max(step + 1, step + int(left / per_step))
                log(f"schedule: {step_s:.3f} s/step, {eval_s:.1f} s/eval, final reserve {final_reserve:.0f} s "
                    f"-> {total_steps} steps ({total_steps * tokens_per_step:,} tokens)")
        if args.save_every and step % args.save_every == 0:
            save_checkpoint(model, hf_tok, out, gen_cfg)
    log_f.close()
    t_train = time.time() - t_train0
    log(f"training done: {step} steps in {t_train:.0f} s ({stopped_by})")

    # Final: evaluate the f32 weights, save bf16, reload the saved files and evaluate those.
    final_x = eval_windows(heldout_stream, args.seq_len, args.final_eval_tokens)
    f32_loss, n_eval, _ = evaluate(model, tap, final_x, args.batch)
    sizes = save_checkpoint(model, hf_tok, out, gen_cfg)
    total_mb = sum(sizes.values()) / 2**20
    del model, opt
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, experts_implementation=args.experts_impl)
    reloaded.eval()
    bf16_loss, _, loads = evaluate(reloaded, RouterTap(reloaded), final_x, args.batch, num_experts=cfg.num_experts)
    targets = final_x[:, 1:].reshape(-1).numpy()
    uni = unigram_nll(train_stream, targets, vocab_size)
    log(f"held-out: f32 {f32_loss:.4f} nats/token (ppl {math.exp(f32_loss):.2f}), saved bf16 {bf16_loss:.4f} "
        f"(ppl {math.exp(bf16_loss):.2f}); unigram ppl {math.exp(uni):.2f}; checkpoint {total_mb:.2f} MiB")

    tok2 = PreTrainedTokenizerFast.from_pretrained(out)
    samples = []
    for p in SAMPLE_PROMPTS:
        ids = tok2(p, return_tensors="pt").input_ids
        g = reloaded.generate(ids, max_new_tokens=40, do_sample=False)
        samples.append({"prompt": p, "completion": tok2.decode(g[0, ids.shape[1]:])})
    chat_ids = tok2.apply_chat_template(SAMPLE_CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    g = reloaded.generate(chat_ids, max_new_tokens=40, do_sample=False)
    samples.append({"chat": SAMPLE_CHAT, "completion": tok2.decode(g[0, chat_ids.shape[1]:])})

    last = ce_hist[-min(50, len(ce_hist)):]
    first = ce_hist[: min(50, len(ce_hist))]
    report = {
        "made_by": "models/reference/train.py",
        "argv": sys.argv[1:],
        "args": vars(args),
        "reproduce": f"--steps {step}" + ("" if stopped_by == "steps" else " (stopped by the time limit)"),
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                     "safetensors": safetensors.__version__, "numpy": np.__version__},
        "threads": args.threads,
        "corpus": {"dir": str(corpus), "files": manifest.get("files"),
                   "train_bytes": train_bytes, "heldout_bytes": heldout_bytes,
                   "train_tokens": int(len(train_stream)), "heldout_tokens": int(len(heldout_stream)),
                   "train_tokens_per_domain": train_dom, "heldout_tokens_per_domain": heldout_dom,
                   "bytes_per_token_train": round(train_bytes / len(train_stream), 3)},
        "tokenizer": {"vocab_size": vocab_size, "specials": dict(zip(SPECIALS, (eot, im_start, im_end)))},
        "shape": {k: getattr(cfg, k) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                                "num_key_value_heads", "head_dim", "num_experts",
                                                "num_experts_per_tok", "moe_intermediate_size", "vocab_size",
                                                "tie_word_embeddings", "norm_topk_prob", "router_aux_loss_coef")},
        "trained_with": {"output_router_logits": True, "router_aux_loss_coef": args.aux_coef, "aux_mode": args.aux_mode,
                         "experts_implementation": args.experts_impl, "seq_len": args.seq_len,
                         "batch": args.batch, "tokens_per_step": tokens_per_step},
        "params": params,
        "steps": step,
        "stopped_by": stopped_by,
        "tokens_seen": step * tokens_per_step,
        "epochs_of_train_split": round(step * tokens_per_step / len(train_stream), 4),
        "time_s": {"tokenizer": round(t_tok, 1), "data": round(t_data - t_tok, 1), "train": round(t_train, 1),
                   "total": round(time.time() - T_START, 1), "budget": 60 * args.minutes},
        "train_tokens_per_s": round(step * tokens_per_step / sum(step_times), 1),
        "train_loss_first_50": round(sum(first) / len(first), 4),
        "train_loss_last_50": round(sum(last) / len(last), 4),
        "heldout": {"tokens": n_eval, "loss_f32": round(f32_loss, 5), "ppl_f32": round(math.exp(f32_loss), 3),
                    "loss_checkpoint_bf16": round(bf16_loss, 5), "ppl_checkpoint_bf16": round(math.exp(bf16_loss), 3),
                    "unigram_loss": round(uni, 5), "unigram_ppl": round(math.exp(uni), 3),
                    # nats/token -> bits/byte, with the held-out split's own bytes per token
                    "bits_per_byte_checkpoint": round(bf16_loss / math.log(2) * len(heldout_stream) / heldout_bytes, 4)},
        "expert_load_heldout": load_stats(loads),
        "checkpoint": {"files": sizes, "total_mib": round(total_mb, 3), "limit_mib": args.max_size_mb,
                       "sha256": {n: sha256_file(out / n) for n in sizes}},
        "samples": samples,
    }
    (out / "training_report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    log(f"report: {out / 'training_report.json'}")
    if total_mb > args.max_size_mb:
        sys.exit(f"train.py: checkpoint is {total_mb:.2f} MiB, over the {args.max_size_mb} MiB limit")


if __name__ == "__main__":
    main(ARGS)
