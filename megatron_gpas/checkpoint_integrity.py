"""Reading checkpoints safely, and checking that they are intact (docs/checkpoints.md).

Safety: a dist-checkpoint holds pickles. ``.metadata`` is one (torch DCP unpickles it with plain
``pickle.load``), and so is every non-tensor object (Megatron's ``common_state``, our per-rank
``rng_state``), which DCP unpickles with ``torch.load(weights_only=False)``. Unpickling runs
whatever the pickle names, so a checkpoint from somewhere else could run code. Every read of a
checkpoint in this package goes through :class:`SafeFileSystemReader`:

  * ``.metadata`` is unpickled by :class:`_MetadataUnpickler`, which resolves only the DCP
    metadata classes, ``torch.Size`` and torch dtypes, and refuses any other global;
  * every object is first unpickled by torch's own restricted unpickler
    (``torch.load(weights_only=True)``: tensors, Python builtins) with numpy arrays allowed for
    numpy's RNG state; only when that succeeds does DCP's planner unpickle the *same bytes*
    (already in memory) into the state dict;
  * tensors are read by DCP with ``torch.load(weights_only=True)`` already.

A refused pickle raises :class:`CheckpointError` naming the file and the global.

Integrity: ``checksums.json`` (written at save, the last file before the rename that completes
a checkpoint) lists every file of the checkpoint with its size and SHA-256. :func:`check_checkpoint`
compares a checkpoint with it (missing, extra, resized or changed files) and parses its pickles
with the restricted unpicklers, each process of a job taking a share of the files.

No dependency on Megatron: the model (fixed gate values), the HF export and the tools use it too.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import dataclasses
import heapq
import io
import json
import os
import pickle
import warnings
from typing import Any, Iterable

import numpy as np
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.api import CheckpointException as DCPCheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta

from megatron_gpas.checkpoint_paths import METADATA_JSON, CheckpointError, is_complete
from megatron_gpas.hashing import sha256_of

MANIFEST = "checksums.json"
HASH_ALGORITHM = "sha256"  # (hashing.sha256_of) hardware-accelerated (SHA-NI, ARMv8 SHA2): >1 GB/s per core
MANIFEST_FORMAT = 1
DCP_METADATA = ".metadata"
DATA_SUFFIX = ".distcp"  # DCP's tensor/object data files
# Megatron's legacy common-state file: Megatron would torch.load it outside our reader. Checkpoints
# of this package (Megatron-Core 0.19) keep that state inside the dist-checkpoint and never have one.
LEGACY_COMMON = "common.pt"

# The globals a DCP .metadata pickle names (torch 2.14: Metadata with its storage and planner
# records). Each is a plain record type or enum: constructing one runs no code of the file's choosing.
_METADATA_GLOBALS = frozenset({
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # layout from its name, e.g. "torch.strided"
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
    *(("torch.distributed.checkpoint.planner", name) for name in (
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
})

# What checkpoint objects may hold beyond what torch.load(weights_only=True) allows by default
# (tensors, containers, numbers, strings): numpy arrays, for numpy's RNG state in rng_state.
_OBJECT_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]


# The refusals of the restricted readers while ``unwrapped_errors`` is active: DCP turns some
# exceptions of a reader into its own messages (a failed metadata read becomes an AssertionError).
_refusals: contextvars.ContextVar[list | None] = contextvars.ContextVar("checkpoint_refusals", default=None)


def _refuse(message: str) -> CheckpointError:
    error = CheckpointError(message)
    seen = _refusals.get()
    if seen is not None:
        seen.append(error)
    return error


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata``, resolving only the globals of ``_METADATA_GLOBALS`` and torch
    dtypes; anything else (a function to call, a class with side effects) is refused."""

    def __init__(self, file, where: str):
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str):
        allowed = (module, name) in _METADATA_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        if not allowed:
            raise _refuse(f"{self.where}: refusing to unpickle {module}.{name}: a dist-checkpoint metadata file "
                          "holds only DCP metadata records, sizes and dtypes (no code from checkpoint files is run; "
                          "docs/checkpoints.md)")
        return super().find_class(module, name)


def load_object(data: io.BytesIO, where: str) -> Any:
    """A checkpoint object (torch.save format) unpickled by torch's restricted unpickler; refused
    globals and unreadable data raise CheckpointError naming ``where``."""
    try:
        with torch.serialization.safe_globals(_OBJECT_GLOBALS):
            return torch.load(data, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        what = ", ".join(_refused_globals(data)) or "a global torch's restricted unpickler does not allow"
        raise _refuse(f"{where}: refusing to unpickle {what}: checkpoint objects may hold tensors, Python builtins "
                      "and numpy arrays only (no code from checkpoint files is run; docs/checkpoints.md)") from None
    except Exception as e:  # noqa: BLE001 - a truncated or garbled object: say where
        raise _refuse(f"{where}: unreadable checkpoint object ({type(e).__name__}: {e})") from None


@contextlib.contextmanager
def unwrapped_errors():
    """DCP runs reads inside its own error handling and raises a CheckpointException (a
    BaseException) listing each rank's exception: re-raise the restricted readers' refusal
    (CheckpointError) as it is."""
    token = _refusals.set([])
    try:
        yield
    except DCPCheckpointException as e:
        for failure in e.failures.values():
            inner = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(inner, CheckpointError):
                raise inner from None
        refused = _refusals.get()
        if refused:
            raise refused[0] from None
        raise
    finally:
        _refusals.reset(token)


def _refused_globals(data: io.BytesIO) -> list[str]:
    """The globals of a torch.save pickle that the restricted unpickler refuses, fully qualified
    (found by scanning its opcodes, not by running it)."""
    try:
        data.seek(0)
        with torch.serialization.safe_globals(_OBJECT_GLOBALS):
            return torch.serialization.get_unsafe_globals_in_checkpoint(data)
    except Exception:  # noqa: BLE001 - a garbled file: the caller says so in general terms
        return []


class _CheckedBytes:
    """A DCP load planner whose ``load_bytes`` first unpickles the object with the restricted
    unpickler; the planner it wraps then unpickles the same in-memory bytes into its state dict."""

    def __init__(self, planner, reader: "SafeFileSystemReader"):
        self._planner = planner
        self._reader = reader

    def __getattr__(self, name):
        return getattr(self._planner, name)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        info = self._reader.storage_data[read_item.storage_index]
        load_object(value, f"{os.path.join(self._reader.checkpoint_dir, info.relative_path)} "
                           f"(object {read_item.storage_index.fqn})")
        value.seek(0)
        self._planner.load_bytes(read_item, value)


class SafeFileSystemReader(FileSystemReader):
    """torch DCP's FileSystemReader with the restricted unpicklers (module docstring). Also refuses
    metadata whose storage entries point outside the checkpoint directory."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self.checkpoint_dir = os.fspath(path)

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f, os.fspath(path)).load()
        if not isinstance(metadata, Metadata):
            raise _refuse(f"{path}: not a dist-checkpoint metadata file ({type(metadata).__name__})")
        for info in (metadata.storage_data or {}).values():
            name = getattr(info, "relative_path", None)
            if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
                raise _refuse(f"{path}: a storage entry names {name!r}, not a file of the checkpoint directory")
        # what FileSystemReader.read_metadata does after unpickling
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan, planner):
        return super().read_data(plan, _CheckedBytes(planner, self))


def read_metadata(path: str) -> Metadata:
    """The DCP metadata of checkpoint directory ``path``, unpickled by the restricted unpickler."""
    return SafeFileSystemReader(path).read_metadata()


# --------------------------------------------------------------------------- checksums


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def list_files(path: str) -> dict[str, int]:
    """Every file under checkpoint directory ``path`` but the manifest: relative path ('/'-separated)
    → size in bytes."""
    files = {}
    for directory, _, names in os.walk(path):
        for name in names:
            full = os.path.join(directory, name)
            rel = os.path.relpath(full, path).replace(os.sep, "/")
            if rel != MANIFEST:
                files[rel] = os.path.getsize(full)
    return dict(sorted(files.items()))


def hash_files(root: str, names: Iterable[str]) -> dict[str, str]:
    """SHA-256 of each file, several at a time (hashlib releases the GIL while hashing)."""
    names = list(names)
    if not names:
        return {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, len(names))) as pool:
        return dict(zip(names, pool.map(lambda name: sha256_of(os.path.join(root, name)), names)))


def my_share(sizes: dict[str, int], rank: int, world: int) -> list[str]:
    """The files process ``rank`` of ``world`` hashes: largest first, each to the least loaded
    process, so every process ends with about the same number of bytes (deterministic: every
    process computes the same split)."""
    heap = [(0, r) for r in range(world)]
    mine = []
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        load, r = heapq.heappop(heap)
        if r == rank:
            mine.append(name)
        heapq.heappush(heap, (load + sizes[name] + 1, r))
    return mine


def write_manifest(path: str, sizes: dict[str, int], digests: dict[str, str]) -> None:
    manifest = {"format": MANIFEST_FORMAT, "algorithm": HASH_ALGORITHM,
                "files": {name: {"size": sizes[name], HASH_ALGORITHM: digests[name]} for name in sorted(sizes)}}
    with open(os.path.join(path, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def read_manifest(path: str) -> dict[str, dict] | None:
    """name → {"size", "sha256"} of ``path``'s manifest; None if it has none (saved before
    checksums were written); CheckpointError if it is not a manifest we wrote."""
    manifest_file = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_file):
        return None
    try:
        with open(manifest_file) as f:
            manifest = json.load(f)
        files = manifest["files"]
        if manifest.get("algorithm") != HASH_ALGORITHM or not all(
                isinstance(v.get("size"), int) and isinstance(v.get(HASH_ALGORITHM), str) for v in files.values()):
            raise ValueError(f"expected format {MANIFEST_FORMAT} with {HASH_ALGORITHM} digests")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{manifest_file}: not a readable checksum manifest ({e})") from e
    return files


def _listing_problems(path: str, files: dict[str, int], manifest: dict[str, dict]) -> list[str]:
    """Files missing, extra or of another size than the manifest says."""
    problems = [f"{os.path.join(path, name)}: missing (listed in {MANIFEST})" for name in manifest if name not in files]
    problems += [f"{os.path.join(path, name)}: not part of the checkpoint (not in {MANIFEST})"
                 for name in files if name not in manifest]
    problems += [f"{os.path.join(path, name)}: {files[name]} bytes, {MANIFEST} says {manifest[name]['size']}"
                 for name in files if name in manifest and files[name] != manifest[name]["size"]]
    return problems


def _digest_problems(path: str, digests: dict[str, str], manifest: dict[str, dict]) -> list[str]:
    return [f"{os.path.join(path, name)}: contents changed since the save ({HASH_ALGORITHM} {digest[:12]}..., "
            f"{MANIFEST} says {manifest[name][HASH_ALGORITHM][:12]}...)"
            for name, digest in digests.items() if digest != manifest[name][HASH_ALGORITHM]]


# --------------------------------------------------------------------------- whole-checkpoint checks


@dataclasses.dataclass
class Report:
    problems: list[str]  # one line each, naming the file
    has_manifest: bool


def check_checkpoint(path: str, *, checksums: bool = True, rank: int = 0, world: int = 1) -> Report:
    """What is wrong with checkpoint directory ``path``, as far as process ``rank`` of ``world``
    checks it (every process checks a share of the files; the union is the whole checkpoint):

      * the checkpoint is complete (metadata.json) and holds no legacy common.pt;
      * with ``checksums``: the files are those of the manifest, with its sizes and SHA-256;
      * ``.metadata`` unpickles with the restricted unpickler, the files it references exist and
        are long enough, and every object (common state, RNG states) unpickles with the restricted
        unpickler.
    """
    if not os.path.isdir(path):
        return Report([f"{path}: no such checkpoint directory"], False)
    if not is_complete(path):
        return Report([f"{path}: not a complete checkpoint (no {METADATA_JSON})"], False)
    problems: list[str] = []
    files = list_files(path)
    try:
        manifest = read_manifest(path) if checksums else None
    except CheckpointError as e:
        return Report([str(e)], True)
    if LEGACY_COMMON in files and rank == 0:
        problems.append(f"{os.path.join(path, LEGACY_COMMON)}: Megatron's legacy common-state file, which Megatron "
                        "would unpickle outside the restricted reader; checkpoints of megatron_gpas never have one")
    if manifest is not None:
        if rank == 0:
            problems += _listing_problems(path, files, manifest)
        intact = {name: size for name, size in files.items() if name in manifest and size == manifest[name]["size"]}
        problems += _digest_problems(path, hash_files(path, my_share(intact, rank, world)), manifest)
    problems += _check_pickles(path, files, rank, world)
    return Report(sorted(set(problems)), manifest is not None)


def _check_pickles(path: str, files: dict[str, int], rank: int, world: int) -> list[str]:
    """The restricted parse of .metadata (every process: each needs it) and of the objects stored
    in this process's share of the files; references to missing or short files (rank 0)."""
    if DCP_METADATA not in files:
        return [f"{os.path.join(path, DCP_METADATA)}: missing"] if rank == 0 else []
    reader = SafeFileSystemReader(path)
    try:
        metadata = reader.read_metadata()
    except CheckpointError as e:
        return [str(e)]
    except Exception as e:  # noqa: BLE001 - truncated or garbled
        return [f"{os.path.join(path, DCP_METADATA)}: unreadable ({type(e).__name__}: {e})"]
    problems = []
    if rank == 0:
        for index, info in metadata.storage_data.items():
            size = files.get(info.relative_path)
            if size is None:
                problems.append(f"{os.path.join(path, info.relative_path)}: missing (holds {index.fqn})")
            elif info.offset + info.length > size:
                problems.append(f"{os.path.join(path, info.relative_path)}: truncated ({size} bytes; {index.fqn} "
                                f"ends at byte {info.offset + info.length})")
    if problems:
        return problems
    mine = set(my_share({name: size for name, size in files.items() if name != DCP_METADATA}, rank, world))
    objects = sorted({index.fqn for index, info in metadata.storage_data.items() if info.relative_path in mine
                      and isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata)})
    if objects:
        try:  # DCP reads them through the safe reader, which checks each one
            with unwrapped_errors(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process: meant
                dcp_load({fqn: io.BytesIO() for fqn in objects}, storage_reader=reader, no_dist=True)
        except CheckpointError as e:
            problems.append(str(e))
        except (Exception, DCPCheckpointException) as e:  # noqa: BLE001
            problems.append(f"{path}: unreadable objects ({type(e).__name__}: {e})")
    return problems


class FileVerifier:
    """Checks the files of one checkpoint as a single process reads them: at once the listing
    against the manifest and the checksums of every file but the tensor data (``*.distcp``),
    which is checked file by file before its first use (``verify``). For readers that use a part
    of a checkpoint (one tensor for fixed gate values) or read it piece by piece (the export)."""

    def __init__(self, path: str):
        self.path = path
        self.manifest = read_manifest(path)
        self._verified: set[str] = set()
        if self.manifest is None:
            return
        files = list_files(path)
        problems = _listing_problems(path, files, self.manifest)
        if problems:
            raise CheckpointError(describe(path, problems))
        self.verify(name for name in files if not name.endswith(DATA_SUFFIX))

    def verify(self, names: Iterable[str]) -> None:
        todo = [name for name in names if name not in self._verified]
        if self.manifest is None or not todo:
            return
        problems = _digest_problems(self.path, hash_files(self.path, todo), self.manifest)
        if problems:
            raise CheckpointError(describe(self.path, problems))
        self._verified.update(todo)


def describe(path: str, problems: list[str], limit: int = 5) -> str:
    """One message for the problems of a checkpoint: the first ``limit`` of them."""
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"checkpoint {path} is damaged:\n  " + "\n  ".join(problems[:limit]) + more
