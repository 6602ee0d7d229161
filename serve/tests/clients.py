"""Real clients against a running `shadowmoe serve` (started by cli/tests/serve.rs).

Usage: clients.py CONFIG.json, where CONFIG names the server (`base`), a second server with
--queue-depth 0 (`busy_base`), the model id, and the greedy references `shadowmoe generate`
printed (`completion`: for --prompt, `chat`: for --chat). Prints one line per check; exits
non-zero at the first failure. Every request is bounded (max_tokens, timeouts).
"""

import concurrent.futures
import http.client
import json
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import anthropic
import openai
from prometheus_client.parser import text_string_to_metric_families

cfg = json.load(open(sys.argv[1]))
BASE = cfg["base"]
MODEL = cfg["model"]
oa = openai.OpenAI(base_url=BASE + "/v1", api_key="unused", max_retries=0, timeout=120)
an = anthropic.Anthropic(base_url=BASE, api_key="unused", max_retries=0, timeout=120)


def check(name, ok, detail=""):
    if not ok:
        print(f"FAIL {name}: {detail}", flush=True)
        sys.exit(1)
    print(f"ok   {name}", flush=True)


def metrics(base=BASE):
    text = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(m, name, **labels):
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def raw(path, body, base=BASE, data=None):
    """POST a body (dict, or raw bytes via data=); returns (status, headers, parsed json)."""
    payload = data if data is not None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=payload, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


# --- Greedy output over the API equals `shadowmoe generate`'s (fresh prompts: no shared prefix).
want = cfg["completion"]
r = oa.completions.create(model=MODEL, prompt=want["prompt"], max_tokens=want["tokens"], temperature=0)
check("completions greedy == generate --prompt", r.choices[0].text == want["text"],
      f"{r.choices[0].text!r} != {want['text']!r}")
check("completions usage", r.usage.prompt_tokens == want["prompt_tokens"]
      and r.usage.completion_tokens == want["tokens"]
      and r.usage.total_tokens == want["prompt_tokens"] + want["tokens"]
      and r.choices[0].finish_reason == "length", r.usage)
want_chat = cfg["chat"]
r = oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": want_chat["prompt"]}],
                               max_tokens=want_chat["tokens"], temperature=0)
check("chat greedy == generate --chat", r.choices[0].message.content == want_chat["text"],
      f"{r.choices[0].message.content!r} != {want_chat['text']!r}")
check("chat usage", r.usage.prompt_tokens == want_chat["prompt_tokens"]
      and r.usage.completion_tokens == want_chat["tokens"], r.usage)

m0 = metrics()

# --- OpenAI chat: non-streaming and streaming, with usage.
msgs = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def add(a, b):"}]
r = oa.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0.7, top_p=0.9, seed=3)
check("chat non-stream", r.object == "chat.completion" and r.choices[0].message.role == "assistant"
      and 1 <= r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 0, r)
pieces, usage, finish = [], None, None
for chunk in oa.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, stream=True,
                                        stream_options={"include_usage": True}):
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            pieces.append(c.delta.content)
        finish = c.finish_reason or finish
check("chat stream", usage is not None and 1 <= usage.completion_tokens <= 12 and finish in ("stop", "length")
      and len("".join(pieces)) > 0, (usage, finish, pieces))

# --- OpenAI completions streaming; stop strings cut the text.
text = "".join(c.choices[0].text for c in oa.completions.create(
    model=MODEL, prompt="import os\nimport", max_tokens=16, stream=True) if c.choices)
check("completions stream", len(text) > 0, text)
full = want["text"]
stop = full[8:11]
cut = full[: full.index(stop)]
r = oa.completions.create(model=MODEL, prompt=want["prompt"], max_tokens=want["tokens"], temperature=0, stop=[stop])
check("stop string cuts the text", r.choices[0].text == cut and r.choices[0].finish_reason == "stop",
      (stop, r.choices[0].text, cut))

# --- Anthropic messages: non-streaming and streaming, system prompt, usage, event order.
r = an.messages.create(model=MODEL, max_tokens=10, system="You are terse.",
                       messages=[{"role": "user", "content": "Name a prime."}])
check("messages non-stream", r.type == "message" and r.content[0].type == "text"
      and r.stop_reason in ("end_turn", "max_tokens", "stop_sequence")
      and r.usage.input_tokens > 0 and 1 <= r.usage.output_tokens <= 10, r)
with an.messages.stream(model=MODEL, max_tokens=10, system=[{"type": "text", "text": "Be brief."}],
                        messages=[{"role": "user", "content": "Hello"}]) as st:
    streamed = "".join(st.text_stream)
    final = st.get_final_message()
check("messages stream (SDK helper)", final.content[0].text == streamed and 1 <= final.usage.output_tokens <= 10
      and final.usage.input_tokens > 0, final)
events = list(an.messages.create(model=MODEL, max_tokens=6, stream=True,
                                 messages=[{"role": "user", "content": "Hello"}]))
kinds = [e.type for e in events]
core = [k for k in kinds if k not in ("ping", "content_block_delta")]
out_tokens = [e.usage.output_tokens for e in events if e.type == "message_delta"]
# A text delta for every token but an end-of-sequence one.
check("messages event order", core == ["message_start", "content_block_start", "content_block_stop",
                                       "message_delta", "message_stop"]
      and out_tokens and kinds.count("content_block_delta") >= out_tokens[0] - 1 > 0, kinds)

# --- Sessions: turn 2 of a conversation reuses turn 1's KV cache.
turn1 = [{"role": "user", "content": "def fib(n):"}]
r1 = oa.chat.completions.create(model=MODEL, messages=turn1, max_tokens=8, temperature=0)
turn2 = turn1 + [{"role": "assistant", "content": r1.choices[0].message.content},
                 {"role": "user", "content": "Now in Rust."}]
r2 = oa.chat.completions.create(model=MODEL, messages=turn2, max_tokens=8, temperature=0)
cached = r2.usage.prompt_tokens_details.cached_tokens
check("prefix reuse in usage", cached > 0 and cached < r2.usage.prompt_tokens, r2.usage)

# --- Eight concurrent clients (both APIs) all answered.
def one(i):
    if i % 2:
        r = an.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": f"item {i}:"}])
        return r.usage.output_tokens
    r = oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"item {i}:"}], max_tokens=8)
    return r.usage.completion_tokens

with concurrent.futures.ThreadPoolExecutor(10) as pool:
    got = list(pool.map(one, range(10)))
check("10 concurrent clients answered", len(got) == 10 and all(1 <= n <= 8 for n in got), got)

# --- A streaming client that drops does not stall the next request; its generation stops.
before = metrics()
u = urllib.parse.urlparse(BASE)
conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
conn.request("POST", "/v1/chat/completions", json.dumps({
    "model": MODEL, "stream": True, "max_tokens": 3000, "temperature": 1.0, "seed": 1, "ignore_eos": True,
    "messages": [{"role": "user", "content": "Write a long story."}]}), {"content-type": "application/json"})
resp = conn.getresponse()
check("long stream started", resp.status == 200, resp.status)
resp.fp.readline()  # the first event
conn.sock.shutdown(2)
conn.close()
t0 = time.time()
r = oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "next"}], max_tokens=4)
waited = time.time() - t0
after = metrics()
gen = metric(after, "shadowmoe_generated_tokens_total") - metric(before, "shadowmoe_generated_tokens_total")
cancelled = metric(after, "shadowmoe_requests_total", api="chat_completions", outcome="cancelled") \
    - metric(before, "shadowmoe_requests_total", api="chat_completions", outcome="cancelled")
check("dropped stream is cancelled", cancelled == 1 and gen < 1000 and r.usage.completion_tokens >= 1,
      f"cancelled {cancelled}, {gen} tokens generated meanwhile, next request waited {waited:.2f}s")

# --- Bad input: each API's status and error shape.
def oa_err(status, body, code=None):
    e = body.get("error", {})
    return set(e) >= {"message", "type", "param", "code"} and isinstance(e["message"], str) \
        and (code is None or e["code"] == code)

def an_err(body, ty):
    return body.get("type") == "error" and body["error"]["type"] == ty and isinstance(body["error"]["message"], str)

chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
cases = [
    ("bad JSON", "/v1/chat/completions", None, b"{not json", 400),
    ("wrong type", "/v1/chat/completions", {**chat, "temperature": "hot"}, None, 400),
    ("negative max_tokens", "/v1/chat/completions", {**chat, "max_tokens": -5}, None, 400),
    ("temperature out of range", "/v1/chat/completions", {**chat, "temperature": 2.5}, None, 400),
    ("empty messages", "/v1/chat/completions", {**chat, "messages": []}, None, 400),
    ("unknown model", "/v1/chat/completions", {**chat, "model": "gpt-nope"}, None, 404),
    ("too long input", "/v1/completions", {"model": MODEL, "prompt": "word " * 2000, "max_tokens": 2}, None, 400),
    ("image content part", "/v1/chat/completions",
     {**chat, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, None, 400),
]
for name, path, body, data, status in cases:
    s, _, b = raw(path, body, data=data)
    check(f"openai {name} -> {status}", s == status and oa_err(s, b), (s, b))
s, _, b = raw("/v1/completions", {"model": MODEL, "prompt": "word " * 2000, "max_tokens": 2})
check("too long input names the limit", str(cfg["max_input_tokens"]) in b["error"]["message"]
      and b["error"]["code"] == "context_length_exceeded", b)
s, _, b = raw("/v1/chat/completions", {**chat, "temperature": "hot"})
check("wrong type names the field", b["error"]["param"] == "temperature", b)
s, _, b = raw("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
check("content part error names the part", b["error"]["param"] == "messages[0].content" and "image_url" in b["error"]["message"], b)
# Text given as parts/blocks is the same prompt as the plain string.
parts = [{"type": "text", "text": "Once upon"}, {"type": "text", "text": " a time"}]
s1, _, b1 = raw("/v1/chat/completions", {**chat, "temperature": 0, "messages": [{"role": "user", "content": parts}]})
s2, _, b2 = raw("/v1/chat/completions", {**chat, "temperature": 0, "messages": [{"role": "user", "content": "Once upon a time"}]})
check("chat text parts == plain string", s1 == s2 == 200 and b1["usage"]["prompt_tokens"] == b2["usage"]["prompt_tokens"]
      and b1["choices"][0]["message"]["content"] == b2["choices"][0]["message"]["content"], (b1, b2))
s1, _, b1 = raw("/v1/messages", {"model": MODEL, "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": parts}]})
s2, _, b2 = raw("/v1/messages", {"model": MODEL, "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": "Once upon a time"}]})
check("messages text blocks == plain string", s1 == s2 == 200 and b1["content"][0]["text"] == b2["content"][0]["text"]
      and b1["usage"]["output_tokens"] == b2["usage"]["output_tokens"], (b1, b2))
msg = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
for name, body, data, status, ty in [
    ("bad JSON", None, b"[1,", 400, "invalid_request_error"),
    ("temperature out of range", {**msg, "temperature": 1.5}, None, 400, "invalid_request_error"),
    ("negative max_tokens", {**msg, "max_tokens": -1}, None, 400, "invalid_request_error"),
    ("empty messages", {**msg, "messages": []}, None, 400, "invalid_request_error"),
    ("missing max_tokens", {k: v for k, v in msg.items() if k != "max_tokens"}, None, 400, "invalid_request_error"),
    ("unknown model", {**msg, "model": "claude-nope"}, None, 404, "not_found_error"),
    ("image content block", {**msg, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
     None, 400, "invalid_request_error"),
]:
    s, _, b = raw("/v1/messages", body, data=data)
    check(f"anthropic {name} -> {status}", s == status and an_err(b, ty), (s, b))
try:
    oa.chat.completions.create(model="gpt-nope", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    check("SDK raises NotFoundError", False)
except openai.NotFoundError as e:
    check("SDK raises NotFoundError", e.status_code == 404)
try:
    an.messages.create(model=MODEL, max_tokens=2, extra_body={"temperature": 3.0},
                       messages=[{"role": "user", "content": "x"}])
    check("SDK raises BadRequestError", False)
except anthropic.BadRequestError as e:
    check("SDK raises BadRequestError", e.status_code == 400)

# --- A full queue answers 503 with Retry-After (the second server has --queue-depth 0).
busy = cfg["busy_base"]
u = urllib.parse.urlparse(busy)
conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
conn.request("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 3000, "ignore_eos": True,
             "stream": True, "temperature": 1.0}), {"content-type": "application/json"})
resp = conn.getresponse()
resp.fp.readline()
s, h, b = raw("/v1/messages", msg, base=busy)
check("full queue -> 503 + Retry-After", s == 503 and {k.lower(): v for k, v in h.items()}.get("retry-after") == "1" and an_err(b, "overloaded_error"), (s, h, b))
s, h, b = raw("/v1/chat/completions", chat, base=busy)
check("full queue -> 503 (OpenAI shape)", s == 503 and oa_err(s, b), (s, b))
conn.close()

# --- The rest of the surface: models, health, metrics that moved.
ms = oa.models.list()
check("/v1/models", [x.id for x in ms.data] == [MODEL], ms)
h = json.loads(urllib.request.urlopen(BASE + "/health", timeout=10).read())
check("/health", h["status"] == "ok" and h["model"] == MODEL, h)
m1 = metrics()
acts = metric(m1, "shadowmoe_expert_activations_total", phase="decode") \
    - metric(m0, "shadowmoe_expert_activations_total", phase="decode")
check("metrics: cache counters moved", acts > 0 and metric(m1, "shadowmoe_expert_bytes_read_total") > 0
      and metric(m1, "shadowmoe_resident_experts") > 0, acts)
check("metrics: hit rate by phase", 0 < metric(m1, "shadowmoe_expert_hit_rate", phase="decode") <= 1
      and 0 <= metric(m1, "shadowmoe_expert_hit_rate", phase="prefill") <= 1)
check("metrics: histogram and queue", metric(m1, "shadowmoe_expert_load_seconds_count") > 0
      and ("shadowmoe_queue_depth", ()) in m1 and metric(m1, "shadowmoe_rss_bytes") > 0)
# The byte model's prediction for the kept session, beside the resident set it predicts.
predicted, rss = metric(m1, "shadowmoe_byte_model_bytes"), metric(m1, "shadowmoe_rss_bytes")
check("metrics: byte model beside RSS", metric(m1, "shadowmoe_session_tokens") > 0
      and 0.5 * rss < predicted < 2 * rss, (predicted, rss))
# The histogram keeps every load ever read (folded in, not re-read): it only grows, and its
# +Inf bucket is its count.
count0, count1 = metric(m0, "shadowmoe_expert_load_seconds_count"), metric(m1, "shadowmoe_expert_load_seconds_count")
check("metrics: load histogram accumulates across scrapes", count1 > count0
      and metric(m1, "shadowmoe_expert_load_seconds_bucket", le="+Inf") == count1
      and metric(metrics(), "shadowmoe_expert_load_seconds_count") >= count1, (count0, count1))
check("metrics: requests and rejections counted",
      metric(m1, "shadowmoe_requests_total", api="messages", outcome="rejected") >= 6
      and metric(m1, "shadowmoe_prefix_reused_tokens_total") > 0
      and metric(m1, "shadowmoe_decode_tokens_per_second") > 0)
print("all checks passed")
