"""Tokenize raw text into Megatron-Core indexed datasets (``.bin`` + ``.idx`` + ``.report.json``).

    reports = preprocess(["data/*.jsonl.zst"], "out/corpus", tokenizer, workers=8)

Inputs (``readers``): JSONL (plain, ``.gz``, ``.zst``), Parquet and plain text, given as
files, directories or globs. Each record becomes one document per text key: the ids of
``tokenizer.encode(text)`` plus the end-of-document id (unless ``append_eod=False``),
written with Megatron-Core's ``IndexedDatasetBuilder`` in ``DType.optimal_dtype(vocab)``.

Outputs. One text key writes ``PREFIX``; several keys write ``PREFIX_<key>`` each.
``shard_by_file`` makes every input file a job of its own, written to ``PREFIX_<nnnnn>``
(the file's 0-based position in the sorted input list), and ``task_index/task_count``
picks every ``task_count``-th job, for array jobs. ``shard_size`` rolls over to a new
output part (``<name>_part<nnnn>``) once a part's ``.bin`` holds that many bytes.

Accountability. Every record is written or skipped for a named reason (``SKIP_REASONS``);
``<name>.report.json`` holds the counts, the first few ``file:line`` locations per
reason, token statistics, the largest token id, the tokenizer, and the fingerprint of inputs
(size, mtime), tokenizer (file hashes) and options. Training checks the tokenizer and the
largest id against its own at start-up. ``strict=True`` raises at the first bad record instead.

Atomicity and resumption. Outputs are written to temporary names and renamed at the end
of their job (``.idx`` last); the reports are written after the renames. A job whose
reports exist with the same fingerprint and whose files are all there is skipped, so a
rerun only redoes the jobs that did not finish, or whose inputs changed.

Parallelism and memory. The main process reads chunks of records (``readers``), ``workers``
processes decode, parse and tokenize them, and the main process writes the results in
input order, so the output is byte-identical for any number of workers. At most
``max_inflight`` chunks (default ``2 × workers``) are between reading and writing at any
time, so memory is bounded by about
``workers × tokenizer + (max_inflight + 2) × max(chunk_bytes, largest document) × ~3``
(input bytes, their token ids, pickled copies) plus the index: 12 bytes per document of
the part being written, and Megatron-Core's ``finalize`` briefly adds ~40 bytes per
document. It does not depend on the size of the input files.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import signal
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import chain
from typing import Iterator, Sequence

import numpy as np

from megatron_gpas.data import indexed
from megatron_gpas.data.readers import TXT_MODES, Chunk, expand_inputs, input_format, iter_chunks
from megatron_gpas.tokenizer import Tokenizer, tokenizer_identity

SKIP_REASONS = ("invalid_utf8", "invalid_json", "missing_key", "non_string_text", "empty_text")
EXAMPLES_PER_REASON = 5  # how many file:line examples a report keeps per skip reason
REPORT_VERSION = 2


# ----------------------------------------------------------------------------- worker side


@dataclass
class KeyResult:
    """The outcome of one chunk for one text key."""

    tokens: np.ndarray  # token ids of the written documents, concatenated in order
    lengths: np.ndarray  # tokens per record (int64); 0 where the record was skipped
    skips: list[tuple[int, str, str, int]]  # (record index, reason, detail, line)


@dataclass
class ChunkResult:
    path: str
    num_records: int
    input_pos: int
    keys: list[KeyResult]


def _text_value(container: dict, key: str, line: int):
    """(text, reason, detail, line) for ``container[key]``; text is None when skipped."""
    if key not in container:
        return None, "missing_key", f"no key {key!r}", line
    value = container[key]
    if value is None:
        return None, "missing_key", f"{key!r} is null", line
    if isinstance(value, bytes):  # a Parquet binary column
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, "invalid_utf8", f"{key!r}: invalid UTF-8 byte at offset {e.start}", line
    if not isinstance(value, str):
        return None, "non_string_text", f"{key!r} is {type(value).__name__}, not a string", line
    if not value.strip():
        return None, "empty_text", f"{key!r} is empty or whitespace", line
    return value, None, "", line


def _record_texts(fmt: str, payload, line: int, keys: Sequence[str]) -> list[tuple]:
    """(text, reason, detail, line) of one record for each key."""
    if fmt == "parquet":
        return [_text_value(payload, key, line) for key in keys]
    try:
        decoded = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        # Point at the offending line, not just the start of the record.
        bad_line = line + payload.count(b"\n", 0, e.start)
        return [(None, "invalid_utf8", f"invalid UTF-8 byte at offset {e.start}", bad_line)] * len(keys)
    if fmt == "text":  # a plain-text document is its own text, whatever the key
        if not decoded.strip():
            return [(None, "empty_text", "text is empty or whitespace", line)] * len(keys)
        return [(decoded, None, "", line)] * len(keys)
    try:
        obj = json.loads(decoded)
    except json.JSONDecodeError as e:
        return [(None, "invalid_json", f"{e.msg}: column {e.colno}", line)] * len(keys)
    if not isinstance(obj, dict):
        return [(None, "invalid_json", f"expected a JSON object, got {type(obj).__name__}", line)] * len(keys)
    return [_text_value(obj, key, line) for key in keys]


def tokenize_chunk(chunk: Chunk, tokenizer: Tokenizer, keys: Sequence[str], append_eod: bool, dtype) -> ChunkResult:
    """Decode, parse and tokenize every record of ``chunk`` for every key."""
    n = len(chunk.records)
    ids_per_key = [[] for _ in keys]
    lengths = [np.zeros(n, dtype=np.int64) for _ in keys]
    skips = [[] for _ in keys]
    for i, (line, payload) in enumerate(zip(chunk.lines, chunk.records)):
        for k, (text, reason, detail, where) in enumerate(_record_texts(chunk.fmt, payload, line, keys)):
            if reason is None:
                try:
                    ids = tokenizer.encode(text)
                except Exception as e:  # a tokenizer bug or a mismatched tokenizer: stop, saying where
                    raise RuntimeError(f"{chunk.path}:{where}: the tokenizer failed on this record: {e}") from e
                if not ids:
                    reason, detail = "empty_text", "text encodes to no tokens"
            if reason is not None:
                skips[k].append((i, reason, detail, where))
                continue
            if append_eod:
                ids.append(tokenizer.eod_id)
            ids_per_key[k].append(ids)
            lengths[k][i] = len(ids)
    results = [
        KeyResult(np.fromiter(chain.from_iterable(docs), dtype=dtype, count=int(lens.sum())), lens, sk)
        for docs, lens, sk in zip(ids_per_key, lengths, skips)
    ]
    return ChunkResult(chunk.path, n, chunk.input_pos, results)


_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _WORKER_TOKENIZER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    _WORKER_TOKENIZER = tokenizer  # unpickled here, i.e. loaded from its files


def _tokenize_chunk_in_worker(chunk: Chunk, keys, append_eod, dtype) -> ChunkResult:
    return tokenize_chunk(chunk, _WORKER_TOKENIZER, keys, append_eod, dtype)


class _TokenizerPool:
    """Tokenizes chunks in ``workers`` processes with at most ``max_inflight`` in flight.

    Results come back in input order. ``workers <= 1`` tokenizes in this process.
    """

    def __init__(self, tokenizer: Tokenizer, workers: int, max_inflight: int | None):
        self.tokenizer = tokenizer
        self.workers = max(1, workers)
        self.max_inflight = max_inflight or 2 * self.workers
        self.executor = None
        if self.workers > 1:
            # forkserver, not fork: the parent may hold threads (torch, tokenizers) that fork
            # would copy in a broken state. The fork server is a fresh process that imports
            # this module once (not torch or megatron); workers fork from it and load only
            # the tokenizer, so starting them costs milliseconds rather than an import each.
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([__name__])
            self.executor = ProcessPoolExecutor(self.workers, mp_context=context,
                                                initializer=_init_worker, initargs=(tokenizer,))

    def map(self, chunks: Iterator[Chunk], keys, append_eod, dtype) -> Iterator[ChunkResult]:
        if self.executor is None:
            for chunk in chunks:
                yield tokenize_chunk(chunk, self.tokenizer, keys, append_eod, dtype)
            return
        pending = deque()
        try:
            for chunk in chunks:
                # The executor holds each chunk until its result is back: the window below is
                # what bounds the records in memory.
                pending.append(self.executor.submit(_tokenize_chunk_in_worker, chunk, keys, append_eod, dtype))
                if len(pending) >= self.max_inflight:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------- bookkeeping


class _LengthStats:
    """Tokens per written document: min, max, mean, std and a power-of-two histogram."""

    def __init__(self):
        self.count = self.total = self.sumsq = 0
        self.min = self.max = None
        self.histogram = np.zeros(64, dtype=np.int64)  # bucket b: lengths in [2^b, 2^(b+1))

    def add(self, lengths: np.ndarray) -> None:
        if lengths.size == 0:
            return
        self.count += int(lengths.size)
        self.total += int(lengths.sum())
        self.sumsq += int((lengths.astype(np.float64) ** 2).sum())
        lo, hi = int(lengths.min()), int(lengths.max())
        self.min = lo if self.min is None else min(self.min, lo)
        self.max = hi if self.max is None else max(self.max, hi)
        self.histogram += np.bincount(np.floor(np.log2(lengths)).astype(np.int64), minlength=64)[:64]

    def summary(self) -> dict:
        if not self.count:
            return {"min": None, "max": None, "mean": None, "std": None, "histogram": {}}
        mean = self.total / self.count
        return {
            "min": self.min,
            "max": self.max,
            "mean": round(mean, 3),
            "std": round(max(self.sumsq / self.count - mean * mean, 0.0) ** 0.5, 3),
            "histogram": {
                (f"{2 ** b}" if b == 0 else f"{2 ** b}-{2 ** (b + 1) - 1}"): int(c)
                for b, c in enumerate(self.histogram) if c
            },
        }


class _Output:
    """One output dataset (one text key of one job): its parts, builders, counts and skips."""

    def __init__(self, name: str, key: str, dtype, shard_size: int | None):
        self.name, self.key, self.dtype, self.shard_size = name, key, dtype, shard_size
        self.itemsize = np.dtype(dtype).itemsize
        self.parts: list[dict] = []
        self.builder = None
        self.written = 0
        self.skipped = {reason: {"count": 0, "first": []} for reason in SKIP_REASONS}
        self.lengths = _LengthStats()
        self.max_token_id: int | None = None  # training checks it against model.vocab_size at start-up

    def _part_prefix(self, n: int) -> str:
        return f"{self.name}_part{n:04d}" if self.shard_size else self.name

    def _open_part(self) -> None:
        self._close_part()
        prefix = self._part_prefix(len(self.parts))
        self.parts.append({"prefix": prefix, "documents": 0, "tokens": 0})
        self.builder = indexed.new_builder(indexed.tmp_prefix_paths(prefix)[0], self.dtype)

    def _close_part(self) -> None:
        if self.builder is not None:
            self.builder.finalize(indexed.tmp_prefix_paths(self.parts[-1]["prefix"])[1])
            self.builder = None

    def add(self, result: KeyResult, path: str) -> None:
        for _, reason, detail, line in result.skips:
            entry = self.skipped[reason]
            entry["count"] += 1
            if len(entry["first"]) < EXAMPLES_PER_REASON:
                entry["first"].append({"location": f"{path}:{line}", "detail": detail})
        written = result.lengths[result.lengths > 0]
        self.lengths.add(written)
        if result.tokens.size:
            self.max_token_id = max(self.max_token_id or 0, int(result.tokens.max()))
        offset = 0
        for n in written.tolist():
            part = self.parts[-1] if self.parts else None
            if part is None or (self.shard_size and part["tokens"] * self.itemsize >= self.shard_size):
                self._open_part()
                part = self.parts[-1]
            self.builder.add_document(result.tokens[offset:offset + n], [n])
            offset += n
            part["documents"] += 1
            part["tokens"] += n
        self.written += len(written)

    def finish(self) -> None:
        """Finalize the last part (a job that wrote nothing still gets an empty dataset)."""
        if not self.parts:
            self._open_part()
        self._close_part()

    def discard(self) -> None:
        if self.builder is not None:
            self.builder.data_file.close()  # the builder leaves its .bin handle open on error
            self.builder = None
        for part in self.parts:
            indexed.discard(part["prefix"])

    def commit(self, stale_prefixes: Sequence[str]) -> None:
        for part in self.parts:
            indexed.commit(part["prefix"])
            part["bin_bytes"] = os.path.getsize(part["prefix"] + ".bin")
            part["idx_bytes"] = os.path.getsize(part["prefix"] + ".idx")
        current = {part["prefix"] for part in self.parts}
        for prefix in stale_prefixes:  # parts of an earlier run that this run did not write
            if prefix not in current:
                indexed.remove_dataset(prefix)


class _Progress:
    """Documents/s, tokens/s, MB/s and ETA on stderr: one rewritten line on a terminal,
    else a line every ``interval_s`` seconds."""

    def __init__(self, total_bytes: int, interval_s: float | None, stream=sys.stderr):
        self.total_bytes = max(total_bytes, 1)
        self.interval_s = interval_s
        self.stream = stream
        self.tty = stream.isatty()
        self.start = self.last = time.monotonic()

    def update(self, docs: int, tokens: int, done_bytes: int, final: bool = False) -> None:
        if self.interval_s is None:
            return
        now = time.monotonic()
        if not final and now - self.last < (0.5 if self.tty else self.interval_s):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = done_bytes / elapsed
        eta = (self.total_bytes - done_bytes) / rate if rate > 0 else float("inf")
        line = (
            f"[preprocess] {100 * done_bytes / self.total_bytes:5.1f}% | {docs:,} docs {docs / elapsed:,.0f}/s | "
            f"{tokens:,} tokens {tokens / elapsed:,.0f}/s | {rate / 1e6:,.1f} MB/s | "
            + (f"done in {_duration(elapsed)}" if final else f"ETA {_duration(eta)}")
        )
        if self.tty:
            print("\r" + line + "\033[K", end="\n" if final else "", file=self.stream, flush=True)
        else:
            print(line, file=self.stream, flush=True)


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# ----------------------------------------------------------------------------- jobs


@dataclass
class _Job:
    prefix: str  # output prefix before the key suffix
    files: list[str]


def plan_jobs(files: Sequence[str], output_prefix: str, shard_by_file: bool) -> list[_Job]:
    if not shard_by_file:
        return [_Job(output_prefix, list(files))]
    return [_Job(f"{output_prefix}_{i:05d}", [f]) for i, f in enumerate(files)]


def output_name(job_prefix: str, key: str, keys: Sequence[str]) -> str:
    return f"{job_prefix}_{_safe_key(key)}" if len(keys) > 1 else job_prefix


def _safe_key(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", key)


def _fingerprint(files: Sequence[str], tokenizer_desc: dict, options: dict) -> str:
    """What a job's outputs depend on: inputs (size + mtime), tokenizer files (hash), options."""
    inputs = []
    for f in files:
        st = os.stat(f)
        inputs.append([os.path.realpath(f), st.st_size, st.st_mtime_ns])
    blob = json.dumps({"version": REPORT_VERSION, "inputs": inputs, "tokenizer": tokenizer_identity(tokenizer_desc),
                       "options": options},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _completed_reports(names: Sequence[str], fingerprint: str) -> list[dict] | None:
    """The reports of a finished job with this fingerprint, or None if it must be (re)done."""
    reports = []
    for name in names:
        report = indexed.read_json(name + ".report.json")
        if report is None or report.get("fingerprint") != fingerprint:
            return None
        for part in report.get("parts", []):
            for suffix in ("bin", "idx"):
                path = f"{part['prefix']}.{suffix}"
                if not os.path.isfile(path) or os.path.getsize(path) != part.get(f"{suffix}_bytes"):
                    return None
        reports.append(report)
    return reports


# ----------------------------------------------------------------------------- main entry


def preprocess(
    inputs: Sequence[str | os.PathLike],
    output_prefix: str | os.PathLike,
    tokenizer: Tokenizer,
    *,
    text_keys: Sequence[str] = ("text",),
    txt_mode: str = "file",
    append_eod: bool = True,
    workers: int = 1,
    strict: bool = False,
    shard_by_file: bool = False,
    shard_size: int | None = None,
    task_index: int = 0,
    task_count: int = 1,
    force: bool = False,
    chunk_records: int = 1024,
    chunk_bytes: int = 1 << 20,
    max_inflight: int | None = None,
    progress_interval_s: float | None = 10.0,
) -> list[dict]:
    """Tokenize ``inputs`` into indexed datasets; returns one report per output.

    See the module docstring. Reports of jobs found complete carry ``"status": "up_to_date"``,
    the others ``"status": "written"``.
    """
    keys = list(text_keys)
    if not keys or len(set(keys)) != len(keys) or len({_safe_key(k) for k in keys}) != len(keys):
        raise ValueError(f"text keys must be given, distinct, and distinct as file names: {keys}")
    if txt_mode not in TXT_MODES:
        raise ValueError(f"unknown txt_mode {txt_mode!r}; valid: {', '.join(TXT_MODES)}")
    if not 0 <= task_index < task_count:
        raise ValueError(f"task_index must be in [0, task_count={task_count}), got {task_index}")
    if shard_size is not None and shard_size <= 0:
        raise ValueError(f"shard_size must be a positive number of bytes, got {shard_size}")
    files = expand_inputs(inputs)
    text_files = [f for f in files if input_format(f)[0] == "text"]
    if len(keys) > 1 and text_files:
        raise ValueError(f"several text keys need JSONL or Parquet inputs; {text_files[0]!r} is plain text")

    # Imported here, after the cheap checks: megatron.core takes seconds to import, and the
    # workers' fork server (which imports this module) never needs it.
    from megatron.core.datasets.indexed_dataset import DType

    prefix = os.fspath(output_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    tokenizer_desc = tokenizer.describe()
    options = {"text_keys": keys, "txt_mode": txt_mode, "append_eod": append_eod, "shard_size": shard_size,
               "dtype": np.dtype(dtype).name}

    jobs = [job for i, job in enumerate(plan_jobs(files, prefix, shard_by_file)) if i % task_count == task_index]
    progress = _Progress(sum(os.path.getsize(f) for job in jobs for f in job.files), progress_interval_s)
    totals = {"docs": 0, "tokens": 0, "bytes": 0}
    reports = []
    with _TokenizerPool(tokenizer, workers, max_inflight) as pool:
        for job in jobs:
            names = [output_name(job.prefix, key, keys) for key in keys]
            fingerprint = _fingerprint(job.files, tokenizer_desc, options)
            done = None if force else _completed_reports(names, fingerprint)
            if done is not None:
                reports += [dict(r, status="up_to_date") for r in done]
                progress.total_bytes -= sum(os.path.getsize(f) for f in job.files)  # no work to wait for
                continue
            reports += _run_job(job, names, keys, pool, tokenizer_desc, fingerprint, options, dtype,
                                strict=strict, chunk_records=chunk_records, chunk_bytes=chunk_bytes,
                                progress=progress, totals=totals, workers=workers)
    if any(r["status"] == "written" for r in reports):
        progress.update(totals["docs"], totals["tokens"], totals["bytes"], final=True)
    return reports


def _run_job(job: _Job, names, keys, pool: _TokenizerPool, tokenizer_desc, fingerprint, options, dtype, *,
             strict, chunk_records, chunk_bytes, progress: _Progress, totals: dict, workers: int) -> list[dict]:
    start = time.monotonic()
    # Earlier reports go first: from here until the new ones are written, the job is unfinished.
    old_reports = [indexed.read_json(name + ".report.json") for name in names]
    for name in names:
        indexed.remove_if_exists(name + ".report.json")

    outputs = [_Output(name, key, dtype, options["shard_size"]) for name, key in zip(names, keys)]
    file_offsets = {f: sum(os.path.getsize(g) for g in job.files[:i]) for i, f in enumerate(job.files)}
    records_per_file = dict.fromkeys(job.files, 0)
    bytes_before_job = totals["bytes"]
    chunks = chain.from_iterable(
        iter_chunks(f, text_keys=keys, txt_mode=options["txt_mode"], max_records=chunk_records,
                    max_bytes=chunk_bytes)
        for f in job.files
    )
    try:
        for result in pool.map(chunks, keys, options["append_eod"], dtype):
            if strict:
                _raise_first_skip(result, keys)
            records_per_file[result.path] += result.num_records
            for output, key_result in zip(outputs, result.keys):
                output.add(key_result, result.path)
            totals["docs"] += result.num_records
            totals["tokens"] += sum(int(r.lengths.sum()) for r in result.keys)
            totals["bytes"] = bytes_before_job + file_offsets[result.path] + result.input_pos
            progress.update(totals["docs"], totals["tokens"], totals["bytes"])
        for output in outputs:
            output.finish()
    except BaseException:
        for output in outputs:
            output.discard()
        raise
    totals["bytes"] = bytes_before_job + sum(os.path.getsize(f) for f in job.files)

    for output, old in zip(outputs, old_reports):
        output.commit([p["prefix"] for p in (old or {}).get("parts", [])])
    elapsed = time.monotonic() - start
    read = sum(records_per_file.values())
    reports = []
    for output in outputs:
        tokens = sum(p["tokens"] for p in output.parts)
        report = {
            "format_version": REPORT_VERSION,
            "status": "written",
            "output_prefix": output.name,
            "parts": output.parts,
            "text_key": output.key,
            "inputs": [{"path": f, "bytes": os.path.getsize(f), "mtime_ns": os.stat(f).st_mtime_ns,
                        "records": records_per_file[f]} for f in job.files],
            "tokenizer": tokenizer_desc,
            "dtype": options["dtype"],
            "txt_mode": options["txt_mode"],
            "append_eod": options["append_eod"],
            "shard_size": options["shard_size"],
            "documents": {"read": read, "written": output.written, "skipped": read - output.written},
            "skipped": output.skipped,
            "tokens_written": tokens,
            "max_token_id": output.max_token_id,
            "tokens_per_document": output.lengths.summary(),
            "workers": workers,
            "elapsed_s": round(elapsed, 3),
            "tokens_per_s": round(tokens / max(elapsed, 1e-9), 1),
            "fingerprint": fingerprint,
        }
        if len(output.parts) == 1:
            report.update(bin_path=output.parts[0]["prefix"] + ".bin", idx_path=output.parts[0]["prefix"] + ".idx")
        indexed.write_json_atomically(output.name + ".report.json", report)
        reports.append(report)
    return reports


def _raise_first_skip(result: ChunkResult, keys: Sequence[str]) -> None:
    firsts = [(r.skips[0], key) for r, key in zip(result.keys, keys) if r.skips]
    if firsts:
        (_, reason, detail, line), key = min(firsts, key=lambda s: s[0][0])
        key_note = f" (text key {key!r})" if len(keys) > 1 else ""
        raise ValueError(f"{result.path}:{line}: {reason}{key_note}: {detail}")


def build_indexed_dataset(inputs, output_prefix, tokenizer: Tokenizer, *, text_key: str = "text", **kwargs) -> dict:
    """One text key, one output: ``preprocess`` returning that output's report."""
    reports = preprocess(inputs, output_prefix, tokenizer, text_keys=[text_key], **kwargs)
    return reports[0]
