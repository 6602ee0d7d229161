"""A bounded load test for `shadowmoe serve`: N requests from C concurrent clients, then
requests/s, latency p50/p95 and tokens/s. Standard library only.

    python serve/scripts/load.py --base http://127.0.0.1:8080 --model models/reference/checkpoint \
        --requests 64 --concurrency 8 --max-tokens 32 [--api chat|completions|messages]
"""

import argparse
import concurrent.futures
import json
import statistics
import time
import urllib.error
import urllib.request

PROMPTS = [
    "def parse_args(argv):",
    "import numpy as np\n",
    "The standard library module",
    "fn main() {",
    "class Config:",
    "Let x be a real number such that",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="http://127.0.0.1:8080")
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--api", choices=["chat", "completions", "messages"], default="completions")
    a = ap.parse_args()

    def one(i):
        prompt = PROMPTS[i % len(PROMPTS)]
        if a.api == "chat":
            path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}]}
        elif a.api == "messages":
            path, body = "/v1/messages", {"messages": [{"role": "user", "content": prompt}]}
        else:
            path, body = "/v1/completions", {"prompt": prompt}
        body.update(model=a.model, max_tokens=a.max_tokens, temperature=0)
        req = urllib.request.Request(a.base + path, data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                out = json.loads(r.read())
        except urllib.error.HTTPError as e:
            return time.perf_counter() - t0, e.code, 0
        u = out["usage"]
        return time.perf_counter() - t0, 200, u.get("completion_tokens", u.get("output_tokens", 0))

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(a.concurrency) as pool:
        results = list(pool.map(one, range(a.requests)))
    wall = time.perf_counter() - start
    ok = [r for r in results if r[1] == 200]
    lat = sorted(r[0] for r in ok)
    if not lat:
        raise SystemExit(f"no request succeeded: {[r[1] for r in results]}")
    p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
    toks = sum(r[2] for r in ok)
    print(f"{a.api}: {len(ok)}/{a.requests} ok with {a.concurrency} clients in {wall:.2f}s: "
          f"{len(ok) / wall:.2f} requests/s, latency p50 {p(0.5) * 1000:.0f} ms, p95 {p(0.95) * 1000:.0f} ms, "
          f"mean {statistics.mean(lat) * 1000:.0f} ms, {toks / wall:.1f} generated tok/s")
    others = sorted({r[1] for r in results if r[1] != 200})
    if others:
        print(f"non-200 statuses: {others}")


if __name__ == "__main__":
    main()
