"""Streaming readers for preprocessing inputs.

Formats, by file name:
  ``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``  one JSON object per line; blank lines are ignored
  ``.json.gz``, ``.json.zst``                JSON Lines too, as C4 and the Pile name them
  ``.parquet``                               one record per row; only the text columns are read
  ``.txt``, ``.txt.gz``, ``.txt.zst``        plain text, split into documents by ``txt_mode``:
                                             ``file`` (the whole file), ``line`` (each non-blank
                                             line) or ``paragraph`` (blocks between blank lines)

Nothing is read whole: lines come from a buffered (de)compressing stream, Parquet rows
from ``ParquetFile.iter_batches`` (one row group's text columns at a time). Records are
grouped into ``Chunk``s of at most ``max_records`` records and ``max_bytes`` bytes of
text (a single larger record is a chunk of its own): chunks are the unit handed to the
tokenizer workers, so they bound the memory held in flight.

Decoding, JSON parsing and key lookup happen later, in the workers: a chunk carries raw
bytes (JSONL, text) or raw column values (Parquet), each with the line (or row) where it
starts, so every problem can be reported as ``file:line``.
"""

from __future__ import annotations

import glob
import gzip
import io
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

# suffix -> (format, compression)
INPUT_FORMATS = {
    ".jsonl": ("jsonl", None),
    ".jsonl.gz": ("jsonl", "gzip"),
    ".jsonl.zst": ("jsonl", "zstd"),
    # Compressed JSON Lines as corpora ship them (C4: c4-train.*.json.gz; Pile-style .json.zst).
    # A plain .json is not taken: it is as often one JSON document (metadata) as JSON Lines.
    ".json.gz": ("jsonl", "gzip"),
    ".json.zst": ("jsonl", "zstd"),
    ".parquet": ("parquet", None),
    ".txt": ("text", None),
    ".txt.gz": ("text", "gzip"),
    ".txt.zst": ("text", "zstd"),
}
TXT_MODES = ("file", "line", "paragraph")

UTF8_BOM = b"\xef\xbb\xbf"
_GLOB_CHARS = set("*?[")


@dataclass
class Chunk:
    """Consecutive records of one input file."""

    path: str
    fmt: str  # "jsonl" | "text" | "parquet"
    lines: list[int]  # 1-based line (Parquet: row) where each record starts
    records: list  # jsonl/text: bytes; parquet: {column: value} with the text columns present
    input_pos: int  # on-disk bytes of `path` consumed once this chunk is read (progress, ETA)


def input_format(path: str) -> tuple[str, str | None] | None:
    """(format, compression) of a supported input file, else None."""
    for suffix, fmt in INPUT_FORMATS.items():
        if path.endswith(suffix):
            return fmt
    return None


def _unsupported(path: str) -> ValueError:
    hint = " (if it holds one JSON object per line, name it .jsonl)" if path.endswith(".json") else ""
    return ValueError(f"unsupported input file {path!r}: expected one of {', '.join(INPUT_FORMATS)}{hint}")


def _supported_files_under(directory: str) -> list[str]:
    """Supported files below ``directory`` (recursively), sorted; hidden names are skipped."""
    found = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(root, n) for n in names if not n.startswith(".") and input_format(n)]
    return sorted(found)


def expand_inputs(specs: Sequence[str | os.PathLike]) -> list[str]:
    """Input files, in order, from files, directories (recursive, sorted) and globs (sorted)."""
    files: list[str] = []
    for spec in map(os.fspath, specs):
        if os.path.isdir(spec):
            found = _supported_files_under(spec)
            if not found:
                raise ValueError(f"input directory {spec!r} holds no {'/'.join(INPUT_FORMATS)} files")
            files += found
        elif os.path.isfile(spec):
            if input_format(spec) is None:
                raise _unsupported(spec)
            files.append(spec)
        elif _GLOB_CHARS & set(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise FileNotFoundError(f"input pattern {spec!r} matches no files")
            for match in matches:
                if os.path.isdir(match):
                    files += _supported_files_under(match)
                elif input_format(match) is not None:
                    files.append(match)
                else:  # a pattern like data/* that also catches README.md: say so rather than guess
                    raise ValueError(f"input pattern {spec!r} matches the unsupported file {match!r}")
        else:
            raise FileNotFoundError(f"input not found: {spec!r}")
    if not files:
        raise ValueError("no input files given")
    seen: set[str] = set()
    for f in files:
        key = os.path.realpath(f)
        if key in seen:  # would silently count every record twice
            raise ValueError(f"input file {f!r} is given more than once")
        seen.add(key)
    return files


# ----------------------------------------------------------------------------- byte streams


class _InputStream:
    """A binary, buffered, decompressed view of one input file, with the on-disk position."""

    def __init__(self, path: str, compression: str | None):
        self.raw = open(path, "rb")
        self.errors: tuple[type[BaseException], ...] = (EOFError, OSError)  # truncated or corrupt data
        if compression is None:
            self.stream = self.raw
        elif compression == "gzip":
            self.stream = gzip.GzipFile(fileobj=self.raw, mode="rb")
        else:
            import zstandard

            self.stream = io.BufferedReader(_ZstdFrames(self.raw), buffer_size=1 << 20)
            self.errors += (zstandard.ZstdError,)

    def position(self) -> int:
        return self.raw.tell()

    def close(self) -> None:
        self.stream.close()
        self.raw.close()


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of every zstd frame in a file, in order.

    Written out because zstandard's ``stream_reader`` ends silently on a truncated file,
    which would drop the rest of it unreported; here a frame cut short is an EOFError.
    Compressed input is fed in 64 KiB pieces, bounding the decompressed bytes held at once.
    """

    def __init__(self, raw):
        import zstandard

        self.raw = raw
        self.dctx = zstandard.ZstdDecompressor()
        self.frame = self.dctx.decompressobj()
        self.in_frame = False
        self.pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.pending:
            data = self.raw.read(1 << 16)
            if not data:
                if self.in_frame:
                    raise EOFError("the file ends inside a zstd frame (truncated?)")
                return 0
            out = []
            while data:
                self.in_frame = True
                out.append(self.frame.decompress(data))
                data = b""
                if self.frame.eof:  # the frame is complete; what follows starts the next one
                    data = self.frame.unused_data
                    self.frame = self.dctx.decompressobj()
                    self.in_frame = False
            self.pending = memoryview(b"".join(out))
        n = min(len(buffer), len(self.pending))
        buffer[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n


def _lines(stream) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line with its newline) for every line; strips a leading BOM."""
    for lineno, raw in enumerate(stream, start=1):
        yield lineno, (raw.removeprefix(UTF8_BOM) if lineno == 1 else raw)


def _text_records(stream, txt_mode: str) -> Iterator[tuple[int, bytes]]:
    """(start line, payload) of each document of a text file."""
    if txt_mode == "file":
        data = stream.read().removeprefix(UTF8_BOM)
        yield 1, data
        return
    paragraph: list[bytes] = []
    start = 0
    for lineno, raw in _lines(stream):
        blank = not raw.strip()
        if txt_mode == "line":
            if not blank:
                yield lineno, raw.rstrip(b"\r\n")
        elif blank:  # a blank line closes the current paragraph
            if paragraph:
                yield start, b"".join(paragraph).rstrip(b"\r\n")
            paragraph = []
        else:
            if not paragraph:
                start = lineno
            paragraph.append(raw)
    if paragraph:
        yield start, b"".join(paragraph).rstrip(b"\r\n")


def _jsonl_records(stream) -> Iterator[tuple[int, bytes]]:
    for lineno, raw in _lines(stream):
        if raw.strip():  # blank lines separate nothing and are not records
            yield lineno, raw


def _chunked(records: Iterator[tuple[int, object]], size_of, path: str, fmt: str, position,
             max_records: int, max_bytes: int) -> Iterator[Chunk]:
    lines, payloads, nbytes = [], [], 0
    for line, payload in records:
        lines.append(line)
        payloads.append(payload)
        nbytes += size_of(payload)
        if len(payloads) >= max_records or nbytes >= max_bytes:
            yield Chunk(path, fmt, lines, payloads, position())
            lines, payloads, nbytes = [], [], 0
    if payloads:
        yield Chunk(path, fmt, lines, payloads, position())


# ----------------------------------------------------------------------------- Parquet


def _parquet_size(value) -> int:
    return sum(len(v) for v in value.values() if isinstance(v, (str, bytes)))


def _parquet_chunks(path: str, text_keys: Sequence[str], max_records: int, max_bytes: int) -> Iterator[Chunk]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    present = [k for k in text_keys if k in pf.schema_arrow.names]
    total_rows = max(pf.metadata.num_rows, 1)
    file_size = os.path.getsize(path)
    rows_done = 0

    def rows() -> Iterator[tuple[int, dict]]:
        nonlocal rows_done
        if not present:  # no text column at all: every row is a record missing its key
            for row in range(pf.metadata.num_rows):
                rows_done = row + 1
                yield row + 1, {}
            return
        for batch in pf.iter_batches(batch_size=max_records, columns=present):
            columns = [batch.column(k).to_pylist() for k in present]
            for values in zip(*columns):
                rows_done += 1
                yield rows_done, dict(zip(present, values))

    def position() -> int:  # Parquet has no line position: scale the file size by rows read
        return file_size * rows_done // total_rows

    yield from _chunked(rows(), _parquet_size, path, "parquet", position, max_records, max_bytes)


# ----------------------------------------------------------------------------- entry point


def iter_chunks(path: str, *, text_keys: Sequence[str] = ("text",), txt_mode: str = "file",
                max_records: int = 1024, max_bytes: int = 1 << 20) -> Iterator[Chunk]:
    """The records of one input file, in order, grouped into chunks."""
    fmt, compression = input_format(path) or (None, None)
    if fmt is None:
        raise _unsupported(path)
    if fmt == "parquet":
        yield from _parquet_chunks(path, text_keys, max_records, max_bytes)
        return

    stream = _InputStream(path, compression)
    records = _jsonl_records(stream.stream) if fmt == "jsonl" else _text_records(stream.stream, txt_mode)
    last_line = 0

    def tracked():  # remembers the last record read, to say where a corrupt stream broke off
        nonlocal last_line
        for line, payload in records:
            last_line = line
            yield line, payload

    try:
        yield from _chunked(tracked(), len, path, fmt, stream.position, max_records, max_bytes)
    except stream.errors as e:
        where = f"after the record at line {last_line}" if last_line else "at the start"
        raise ValueError(f"{path}: corrupt or truncated {compression or 'file'} data {where}: {e}") from e
    finally:
        stream.close()
