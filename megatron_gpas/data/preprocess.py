"""Tokenize raw text into a Megatron-Core indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``).

Inputs:
  ``.jsonl``  one JSON object per line, the document text under ``text_key``.
              Blank lines are ignored.
  ``.txt``    ``txt_mode="file"``: the whole file is one document;
              ``"line"``: every non-blank line is a document;
              ``"paragraph"``: blocks separated by blank lines are documents.

Every document becomes one sequence of ``tokenizer.encode(text)`` followed by the
tokenizer's end-of-document id (unless ``append_eod=False``), written with Megatron's
``IndexedDatasetBuilder`` in ``DType.optimal_dtype(vocab_size)``.

Accountability: every record is either written or skipped for a named reason
(``SKIP_REASONS``); the counts and the first few ``file:line`` locations per reason
go into ``PREFIX.report.json`` and the returned dict. ``strict=True`` raises instead
of skipping.

Outputs appear atomically: the builder writes ``PREFIX.bin.tmp``/``PREFIX.idx.tmp``,
which are renamed over the final names (``.idx`` last) only after everything
succeeded, so a failed run never leaves a ``.bin``/``.idx`` pair behind.

Tokenization runs in ``workers`` processes. Records are streamed through
``Pool.imap``, which returns results in input order, so the output is byte-identical
for any number of workers.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import sys
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from megatron_gpas.tokenizer import Tokenizer

INPUT_SUFFIXES = (".jsonl", ".txt")
TXT_MODES = ("file", "line", "paragraph")
SKIP_REASONS = ("invalid_utf8", "invalid_json", "missing_key", "non_string_text", "empty_text")
LOCATIONS_PER_REASON = 5  # how many file:line examples the report keeps per skip reason

UTF8_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class RawRecord:
    """One candidate document, still as bytes: decoding and parsing happen in the workers."""

    path: str
    line: int  # 1-based line where the record starts
    payload: bytes
    is_json: bool

    @property
    def location(self) -> str:
        return f"{self.path}:{self.line}"


# ----------------------------------------------------------------------------- inputs


def expand_inputs(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Input files in order; a directory contributes its *.jsonl/*.txt files, sorted."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(
                str(f) for f in p.iterdir()
                if f.is_file() and f.suffix in INPUT_SUFFIXES and not f.name.startswith(".")
            )
            if not found:
                raise ValueError(f"input directory {str(p)!r} holds no {'/'.join(INPUT_SUFFIXES)} files")
            files.extend(found)
        elif p.is_file():
            if p.suffix not in INPUT_SUFFIXES:
                raise ValueError(f"unsupported input file {str(p)!r}: expected {' or '.join(INPUT_SUFFIXES)}")
            files.append(str(p))
        else:
            raise FileNotFoundError(f"input not found: {str(p)!r}")
    if not files:
        raise ValueError("no input files given")
    return files


def read_raw_records(path: str, txt_mode: str = "file") -> Iterator[RawRecord]:
    """Split one input file into candidate documents (blank lines are separators, not records)."""
    is_json = path.endswith(".jsonl")
    with open(path, "rb") as f:
        if not is_json and txt_mode == "file":
            yield RawRecord(path, 1, f.read().removeprefix(UTF8_BOM), is_json=False)
            return

        paragraph, paragraph_start = [], 0
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1:
                raw = raw.removeprefix(UTF8_BOM)
            blank = not raw.strip()
            if is_json or txt_mode == "line":
                if not blank:
                    yield RawRecord(path, lineno, raw.rstrip(b"\r\n"), is_json)
            elif blank:  # paragraph mode: a blank line closes the current paragraph
                if paragraph:
                    yield RawRecord(path, paragraph_start, b"".join(paragraph).rstrip(b"\r\n"), False)
                paragraph = []
            else:
                if not paragraph:
                    paragraph_start = lineno
                paragraph.append(raw)
        if paragraph:
            yield RawRecord(path, paragraph_start, b"".join(paragraph).rstrip(b"\r\n"), False)


def _all_raw_records(files: Sequence[str], txt_mode: str) -> Iterator[RawRecord]:
    for path in files:
        yield from read_raw_records(path, txt_mode)


# ----------------------------------------------------------------------------- per-record work


def _extract_text(record: RawRecord, text_key: str) -> tuple[str | None, str | None, str, int]:
    """(text, skip_reason, detail, line) for one record; text is None when skipped."""
    try:
        decoded = record.payload.decode("utf-8")
    except UnicodeDecodeError as e:
        # Point at the offending line, not just the start of the record.
        line = record.line + record.payload.count(b"\n", 0, e.start)
        return None, "invalid_utf8", f"invalid UTF-8 byte at offset {e.start}", line

    if not record.is_json:
        text = decoded
    else:
        try:
            obj = json.loads(decoded)
        except json.JSONDecodeError as e:
            return None, "invalid_json", e.msg, record.line
        if not isinstance(obj, dict):
            return None, "invalid_json", f"expected a JSON object, got {type(obj).__name__}", record.line
        if text_key not in obj:
            return None, "missing_key", f"no key {text_key!r}", record.line
        text = obj[text_key]
        if not isinstance(text, str):
            return None, "non_string_text", f"{text_key!r} is {type(text).__name__}, not a string", record.line

    if not text.strip():
        return None, "empty_text", "text is empty or whitespace", record.line
    return text, None, "", record.line


def _tokenize_record(record: RawRecord, tokenizer: Tokenizer, text_key: str, append_eod: bool, dtype):
    """-> (location, skip_reason, detail, token ids or None)."""
    text, reason, detail, line = _extract_text(record, text_key)
    location = f"{record.path}:{line}"
    if reason is not None:
        return location, reason, detail, None
    ids = tokenizer.encode(text)
    if not ids:
        return location, "empty_text", "text encodes to no tokens", None
    if append_eod:
        ids.append(tokenizer.eod_id)
    # A numpy array pickles far more compactly than a list of Python ints.
    return location, None, "", np.asarray(ids, dtype=dtype)


_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _tokenize_record_in_worker(record: RawRecord, **kwargs):
    return _tokenize_record(record, _WORKER_TOKENIZER, **kwargs)


def _tokenized_records(records, tokenizer, workers: int, chunksize: int, **kwargs):
    """Results of ``_tokenize_record`` for every record, in input order."""
    if workers <= 1:
        for record in records:
            yield _tokenize_record(record, tokenizer, **kwargs)
        return
    # spawn, not fork: the parent may hold threads (torch, tokenizers) that fork would
    # copy in a broken state. Workers import only this module and the tokenizer.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        work = functools.partial(_tokenize_record_in_worker, **kwargs)
        yield from pool.imap(work, records, chunksize=chunksize)


# ----------------------------------------------------------------------------- bookkeeping


class _Progress:
    """A stderr line every ``interval_s`` seconds with throughput so far."""

    def __init__(self, interval_s: float | None):
        self.interval_s = interval_s
        self.start = self.last = time.monotonic()

    def update(self, docs: int, tokens: int, final: bool = False) -> None:
        if self.interval_s is None:
            return
        now = time.monotonic()
        if not final and now - self.last < self.interval_s:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        print(
            f"[preprocess] {docs:,} docs, {tokens:,} tokens, "
            f"{docs / elapsed:,.0f} docs/s, {tokens / elapsed:,.0f} tokens/s, {elapsed:.1f}s"
            + (" (done)" if final else ""),
            file=sys.stderr,
            flush=True,
        )


def _remove_if_exists(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _write_json_atomically(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- main entry


def build_indexed_dataset(
    inputs: Sequence[str | os.PathLike],
    output_prefix: str | os.PathLike,
    tokenizer: Tokenizer,
    *,
    text_key: str = "text",
    txt_mode: str = "file",
    append_eod: bool = True,
    workers: int = 1,
    strict: bool = False,
    chunksize: int = 64,
    progress_interval_s: float | None = 2.0,
) -> dict:
    """Tokenize ``inputs`` into ``PREFIX.bin``/``PREFIX.idx``; returns the report dict.

    ``inputs`` are .jsonl/.txt files or directories of them. See the module docstring.
    """
    if txt_mode not in TXT_MODES:
        raise ValueError(f"unknown txt_mode {txt_mode!r}; valid: {', '.join(TXT_MODES)}")
    files = expand_inputs(inputs)

    # Imported here, after the cheap checks: megatron.core takes seconds to import,
    # and the spawned workers (which import this module) never need it.
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    prefix = os.fspath(output_prefix)
    bin_path, idx_path, report_path = prefix + ".bin", prefix + ".idx", prefix + ".report.json"
    bin_tmp, idx_tmp = bin_path + ".tmp", idx_path + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)

    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    read = written = tokens = 0
    skipped = {reason: {"count": 0, "first_locations": []} for reason in SKIP_REASONS}
    progress = _Progress(progress_interval_s)

    builder = None
    try:
        builder = IndexedDatasetBuilder(bin_tmp, dtype=dtype)
        results = _tokenized_records(
            _all_raw_records(files, txt_mode), tokenizer, workers, chunksize,
            text_key=text_key, append_eod=append_eod, dtype=dtype,
        )
        with closing(results):  # stops the worker pool even if we bail out early
            for location, reason, detail, ids in results:
                read += 1
                if reason is not None:
                    if strict:
                        raise ValueError(f"{location}: {reason}: {detail}")
                    skipped[reason]["count"] += 1
                    if len(skipped[reason]["first_locations"]) < LOCATIONS_PER_REASON:
                        skipped[reason]["first_locations"].append(location)
                    continue
                builder.add_document(ids, [len(ids)])  # one sequence per document
                written += 1
                tokens += len(ids)
                progress.update(written, tokens)
        builder.finalize(idx_tmp)
    except BaseException:
        if builder is not None:
            builder.data_file.close()  # the builder leaves its .bin handle open on error
        _remove_if_exists(bin_tmp)
        _remove_if_exists(idx_tmp)
        raise

    # Commit. Drop any old .idx first so that a crash between the two renames leaves
    # a lone .bin (not a dataset) rather than a new .bin paired with an old .idx.
    _remove_if_exists(idx_path)
    os.replace(bin_tmp, bin_path)
    os.replace(idx_tmp, idx_path)
    progress.update(written, tokens, final=True)

    report = {
        "output_prefix": prefix,
        "bin_path": bin_path,
        "idx_path": idx_path,
        "inputs": files,
        "tokenizer": {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size, "eod_id": tokenizer.eod_id},
        "dtype": np.dtype(dtype).name,
        "text_key": text_key,
        "txt_mode": txt_mode,
        "append_eod": append_eod,
        "documents": {"read": read, "written": written, "skipped": read - written},
        "skipped": skipped,
        "tokens_written": tokens,
        "workers": workers,
        "elapsed_s": round(time.monotonic() - progress.start, 3),
    }
    _write_json_atomically(report_path, report)
    return report
