#!/usr/bin/env python3
"""A long conversation through `shadowmoe serve`: N turns of one chat session (each turn's
prompt is the whole conversation so far, so the server reuses its KV cache), the resident set
and the byte model's prediction read from /metrics after every turn.

    python serve/scripts/session_rss.py --base http://127.0.0.1:8080 --model M [--turns 20] [--max-tokens 64]

Prints one row per turn: session tokens, prefix tokens reused, RSS, the byte model's prediction
and their ratio. Standard library only (urllib)."""
import argparse
import json
import urllib.request


def post(base, path, body):
    req = urllib.request.Request(base + path, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def metrics(base):
    out = {}
    with urllib.request.urlopen(base + "/metrics", timeout=60) as r:
        for line in r.read().decode().splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="http://127.0.0.1:8080")
    ap.add_argument("--model", required=True)
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=64)
    a = ap.parse_args()
    asks = ["def parse_args(argv):", "class Cache:", "def route(hidden, gate, k):", "import numpy as np",
            "fn main() {", "SELECT layer, expert FROM trace", "def fib(n):", "struct Expert {"]
    messages = []
    print("| turn | session tokens | reused | RSS MiB | byte model MiB | RSS / model |")
    print("|---:|---:|---:|---:|---:|---:|")
    for turn in range(1, a.turns + 1):
        messages.append({"role": "user", "content": asks[(turn - 1) % len(asks)]})
        r = post(a.base, "/v1/chat/completions",
                 {"model": a.model, "messages": messages, "max_tokens": a.max_tokens, "temperature": 0,
                  "ignore_eos": True})
        messages.append({"role": "assistant", "content": r["choices"][0]["message"]["content"]})
        reused = r["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)
        m = metrics(a.base)
        rss, model = m["shadowmoe_rss_bytes"] / 2**20, m["shadowmoe_byte_model_bytes"] / 2**20
        print(f"| {turn} | {int(m['shadowmoe_session_tokens'])} | {reused} | {rss:.1f} | {model:.1f} | {rss / model:.3f} |")


if __name__ == "__main__":
    main()
