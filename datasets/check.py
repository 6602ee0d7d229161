#!/usr/bin/env python3
"""Validate the prompt sets in datasets/*.jsonl (standard library only).

Checks, for every datasets/*.jsonl:
  - each line is a JSON object with a string "id" and "domain", and exactly one of
    "prompt" (non-empty string) or "messages" (non-empty list of {"role", "content"});
  - no keys other than id, domain, prompt, messages;
  - domain is one of code, chat, math, tools;
  - message roles are system/user/assistant, contents are non-empty strings, a system
    message may only come first, and the last message is from the user;
  - ids are unique across all files;
  - the known files have at least their minimum number of lines;
  - no prompt text of heldout.jsonl equals a prompt text of another file (a "prompt" line's
    text, a "messages" line's last user message, and a "messages" line's whole conversation
    are all compared).

Prints a table of file, lines and sha256 (Markdown, as in datasets/README.md) and exits 1 on
any problem, naming the file and line number.

Usage: python3 datasets/check.py [DIR]   (DIR defaults to the folder holding this script)
"""

import hashlib
import json
import sys
from pathlib import Path

DOMAINS = {"code", "chat", "math", "tools"}
# corpus_heldout.jsonl (made by models/reference/eval_prompts.py) carries the corpus domains.
CORPUS_DOMAINS = {"prose", "code", "math"}
ROLES = {"system", "user", "assistant"}
KEYS = {"id", "domain", "prompt", "messages"}
MINIMUM = {
    "code.jsonl": 45,
    "chat.jsonl": 45,
    "math.jsonl": 35,
    "tools.jsonl": 25,
    "heldout.jsonl": 35,
}
# Files that must carry a single domain (heldout mixes all four).
FILE_DOMAIN = {
    "code.jsonl": "code",
    "chat.jsonl": "chat",
    "math.jsonl": "math",
    "tools.jsonl": "tools",
}
HELDOUT = "heldout.jsonl"
# heldout should cover every domain at least this many times (brief: about 9 each).
HELDOUT_PER_DOMAIN = 8


def texts_of(rec):
    """Comparable prompt texts of one valid record (normalized by stripping whitespace)."""
    if "prompt" in rec:
        return {("prompt", rec["prompt"].strip())}
    msgs = rec["messages"]
    whole = json.dumps([[m["role"], m["content"].strip()] for m in msgs], ensure_ascii=False)
    return {("prompt", msgs[-1]["content"].strip()), ("messages", whole)}


def check_record(rec):
    """Returns a list of problems with one parsed line (empty if fine)."""
    errs = []
    if not isinstance(rec, dict):
        return ["not a JSON object"]
    extra = set(rec) - KEYS
    if extra:
        errs.append(f"unknown keys {sorted(extra)}")
    rid = rec.get("id")
    if not isinstance(rid, str) or not rid.strip():
        errs.append('missing or empty string "id"')
    dom = rec.get("domain")
    if not isinstance(dom, str):
        errs.append('missing string "domain"')
    elif dom not in DOMAINS | CORPUS_DOMAINS:
        errs.append(f"domain {dom!r} not one of {sorted(DOMAINS | CORPUS_DOMAINS)}")
    has_p, has_m = "prompt" in rec, "messages" in rec
    if has_p == has_m:
        errs.append('needs exactly one of "prompt" or "messages"')
    elif has_p:
        if not isinstance(rec["prompt"], str) or not rec["prompt"].strip():
            errs.append('"prompt" must be a non-empty string')
    else:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            errs.append('"messages" must be a non-empty list')
        else:
            for i, m in enumerate(msgs):
                if not isinstance(m, dict) or set(m) != {"role", "content"}:
                    errs.append(f'messages[{i}] must be an object with exactly "role" and "content"')
                    continue
                if m["role"] not in ROLES:
                    errs.append(f"messages[{i}] role {m['role']!r} not one of {sorted(ROLES)}")
                elif m["role"] == "system" and i != 0:
                    errs.append(f"messages[{i}] is a system message but not the first")
                if not isinstance(m["content"], str) or not m["content"].strip():
                    errs.append(f"messages[{i}] content must be a non-empty string")
            last = msgs[-1]
            if isinstance(last, dict) and last.get("role") != "user":
                errs.append("last message must have role user")
    return errs


def main(argv):
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent
    files = sorted(root.glob("*.jsonl"))
    problems = []
    rows = []
    seen_ids = {}  # id -> "file:line"
    texts = {}  # file name -> {text: line}
    domain_counts = {}  # file name -> {domain: n}

    if not files:
        problems.append(f"{root}: no *.jsonl files")
    for name in MINIMUM:
        if not (root / name).is_file():
            problems.append(f"{name}: missing")

    for path in files:
        raw = path.read_bytes()
        sha = hashlib.sha256(raw).hexdigest()
        try:
            content = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(f"{path.name}: not UTF-8 ({e})")
            rows.append((path.name, 0, sha))
            continue
        if content and not content.endswith("\n"):
            problems.append(f"{path.name}: last line has no trailing newline")
        lines = content.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        n = 0
        file_texts = texts.setdefault(path.name, {})
        counts = domain_counts.setdefault(path.name, {})
        for lineno, line in enumerate(lines, 1):
            where = f"{path.name}:{lineno}"
            if not line.strip():
                problems.append(f"{where}: empty line")
                continue
            n += 1
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{where}: invalid JSON ({e})")
                continue
            errs = check_record(rec)
            for e in errs:
                problems.append(f"{where}: {e}")
            if errs:
                continue
            rid, dom = rec["id"], rec["domain"]
            if rid in seen_ids:
                problems.append(f"{where}: id {rid!r} already used at {seen_ids[rid]}")
            else:
                seen_ids[rid] = where
            want = FILE_DOMAIN.get(path.name)
            if want is not None and dom != want:
                problems.append(f"{where}: domain {dom!r} in a {want} file")
            counts[dom] = counts.get(dom, 0) + 1
            for t in texts_of(rec):
                if t in file_texts and t[0] == "prompt":
                    problems.append(
                        f"{where}: same prompt text as line {file_texts[t]} of the same file"
                    )
                file_texts.setdefault(t, lineno)
        rows.append((path.name, n, sha))
        if path.name in MINIMUM and n < MINIMUM[path.name]:
            problems.append(f"{path.name}: {n} lines, at least {MINIMUM[path.name]} required")

    if HELDOUT in texts:
        for dom in sorted(DOMAINS):
            got = domain_counts.get(HELDOUT, {}).get(dom, 0)
            if got < HELDOUT_PER_DOMAIN:
                problems.append(
                    f"{HELDOUT}: {got} {dom} prompts, at least {HELDOUT_PER_DOMAIN} required"
                )
        others = {}
        for name, ts in texts.items():
            if name != HELDOUT:
                for t, lineno in ts.items():
                    others.setdefault(t, f"{name}:{lineno}")
        for t, lineno in sorted(texts[HELDOUT].items(), key=lambda kv: kv[1]):
            if t in others:
                problems.append(
                    f"{HELDOUT}:{lineno}: {t[0]} text also appears at {others[t]}"
                    " (heldout must be distinct)"
                )

    print("| file | lines | sha256 |")
    print("|---|---:|---|")
    for name, n, sha in rows:
        print(f"| `{name}` | {n} | `{sha}` |")

    if problems:
        print(f"\n{len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print(f"\nOK: {len(rows)} files, {sum(n for _, n, _ in rows)} prompts, {len(seen_ids)} unique ids")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
