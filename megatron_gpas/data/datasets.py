"""Training-side data: Megatron-Core GPTDataset blends over indexed datasets, and loaders.

Every rank builds the same datasets (they are deterministic given the seed); the
sampler hands each data-parallel rank its slice of each global batch, starting
after the samples already consumed (so resuming continues exactly where it stopped).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.training.datasets.data_samplers import MegatronPretrainingSampler

from megatron_gpas.config import Config


@dataclass
class _DatasetTokenizer:
    """The two facts GPTDataset needs from a tokenizer."""

    vocab_size: int
    eod: int

    @property
    def unique_identifiers(self) -> dict:  # part of the dataset-cache hash
        return {"vocab_size": self.vocab_size, "eod": self.eod}


class DataCorruptError(ValueError):
    pass


def check_indexed_dataset(prefix: str, allow_empty: bool = False) -> IndexedDataset:
    """Open PREFIX.bin/.idx and check that they form one intact dataset; return it.

    Shared by training start-up, tools/inspect_data.py and the merge tool. Checks: the .idx
    header, the .idx size against the counts in its header, sequence lengths >= 0, each
    sequence pointer = previous pointer + previous length × token size, document
    boundaries from 0 to the sequence count without going back, and the .bin size against
    the index. Reads only the index, in blocks (memory independent of the dataset size).
    """
    import struct

    import numpy as np
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType

    def corrupt(why: str) -> DataCorruptError:
        return DataCorruptError(f"indexed dataset '{prefix}' is corrupt: {why}")

    for suffix in (".idx", ".bin"):
        if not os.path.isfile(prefix + suffix):
            raise DataCorruptError(f"indexed dataset '{prefix}' is incomplete: {prefix}{suffix} does not exist")
    idx_size = os.path.getsize(prefix + ".idx")
    with open(prefix + ".idx", "rb") as f:
        header = f.read(34)  # magic (9), version (8), dtype code (1), sequence count (8), document count (8)
    if len(header) < 34 or header[:9] != _INDEX_HEADER:
        raise corrupt(f"{prefix}.idx is not a Megatron index file (bad or short header)")
    version, code, num_sequences, num_doc_indices = struct.unpack("<QBQQ", header[9:34])
    if version != 1 or code not in {d.value for d in DType}:
        raise corrupt(f"{prefix}.idx has version {version} and dtype code {code}; expected version 1 and a "
                      f"known dtype")
    expected_idx = 34 + num_sequences * (4 + 8) + num_doc_indices * 8
    if idx_size != expected_idx:
        raise corrupt(f"its header announces {num_sequences} sequences and {num_doc_indices - 1} documents "
                      f"({expected_idx} bytes) but {prefix}.idx has {idx_size} bytes")
    if num_sequences == 0 and not allow_empty:
        raise DataCorruptError(f"indexed dataset '{prefix}' has no sequences")
    try:
        # (an empty .bin cannot be memory-mapped)
        dataset = IndexedDataset(prefix, mmap=os.path.getsize(prefix + ".bin") > 0)
    except Exception as e:  # anything else Megatron's reader refuses
        raise DataCorruptError(f"cannot read indexed dataset '{prefix}': {e!r}") from e

    index = dataset.index
    lengths, pointers, docs = index.sequence_lengths, index.sequence_pointers, index.document_indices
    itemsize = index.dtype_size
    block = 1 << 22
    for start in range(0, len(lengths), block):
        end = min(start + block, len(lengths))
        bad = np.flatnonzero(lengths[start:end] < 0)
        if bad.size:
            raise corrupt(f"sequence {start + bad[0]} has length {lengths[start + bad[0]]}")
        # pointers[i + 1] - pointers[i] must be lengths[i] * itemsize, for i in [start, end - 1)
        steps = np.diff(pointers[start:end + 1 if end < len(lengths) else end])
        bad = np.flatnonzero(steps != lengths[start:start + len(steps)].astype(np.int64) * itemsize)
        if bad.size:
            i = start + bad[0]
            raise corrupt(f"sequence {i + 1} starts at byte {pointers[i + 1]}, but sequence {i} starts at "
                          f"{pointers[i]} with {lengths[i]} tokens of {itemsize} bytes")
    if len(lengths) and pointers[0] != 0:
        raise corrupt(f"the first sequence starts at byte {pointers[0]}, not 0")
    if docs[0] != 0 or docs[-1] != len(lengths):
        raise corrupt(f"document boundaries run from {docs[0]} to {docs[-1]}, not from 0 to {len(lengths)}")
    for start in range(0, len(docs), block):
        bad = np.flatnonzero(np.diff(docs[start:start + block + 1]) < 0)
        if bad.size:
            raise corrupt(f"document boundary {start + bad[0] + 1} ({docs[start + bad[0] + 1]}) is before the "
                          f"previous one ({docs[start + bad[0]]})")

    expected = int(pointers[-1]) + int(lengths[-1]) * itemsize if len(lengths) else 0
    actual = os.path.getsize(prefix + ".bin")
    if expected != actual:
        raise corrupt(f"the index describes {expected} bytes of tokens but {prefix}.bin has {actual} bytes")
    return dataset


def check_split(prefixes: list[str], split: str) -> None:
    """Every split with a non-zero ratio must get at least one document of every dataset.

    (Megatron's GPTDataset loops forever computing epochs for an empty split that was asked
    for samples, so this is checked up front.)
    """
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for prefix in prefixes:
        num = len(IndexedDataset(prefix, mmap=True))
        for name, bounds in zip(("train", "validation", "test"), matrix):
            if bounds is not None and int(round(bounds[1] * num)) - int(round(bounds[0] * num)) == 0:
                raise ValueError(
                    f"data.split '{split}' gives the {name} split of '{prefix}' no documents "
                    f"({num} in the dataset); set that split's share to 0 (e.g. '99,1,0') or use more data"
                )


_TOKEN_BLOCK = 1 << 22  # tokens per block of a scan
# Data without a recorded largest token id is scanned at start-up up to this size (numpy reads
# a page-cached .bin at several GB/s); larger data gets a warning instead of a long wait.
SCAN_LIMIT_BYTES = 1 << 30


def check_token_ids(dataset, vocab_size: int, vocabulary: str = "the vocabulary") -> dict:
    """Stream the tokens; raise DataCorruptError on an id >= vocab_size (``vocabulary`` names the
    limit in the message). Returns id statistics."""
    import numpy as np

    bin_path = dataset.path_prefix + ".bin"
    if os.path.getsize(bin_path) == 0:
        return {"checked_tokens": 0, "max_id": None, "vocab_size": vocab_size}
    tokens = np.memmap(bin_path, dtype=dataset.index.dtype, mode="r")
    max_id = -1
    for start in range(0, len(tokens), _TOKEN_BLOCK):
        block = tokens[start:start + _TOKEN_BLOCK]
        block_max = int(block.max())
        if block_max >= vocab_size:
            offset = start + int(np.argmax(block >= vocab_size))
            sequence = int(np.searchsorted(dataset.index.sequence_pointers, offset * tokens.itemsize, "right")) - 1
            raise DataCorruptError(
                f"indexed dataset '{dataset.path_prefix}' holds token id {int(tokens[offset])} (sequence {sequence}, "
                f"token {offset}) but {vocabulary} has {vocab_size} ids: tokenized with another tokenizer?"
            )
        max_id = max(max_id, block_max)
    return {"checked_tokens": int(len(tokens)), "max_id": max_id, "vocab_size": vocab_size}


def check_data_vocabulary(cfg: Config, tokenizer) -> list[str]:
    """Check every dataset of data.paths against the run's tokenizer and model.vocab_size before
    training reads it (an id >= model.vocab_size is otherwise an IndexError at step 1).

    From ``PREFIX.report.json`` (written by preprocessing and merging): the tokenizer the data was
    made with must be the run's (kind, options, file hashes, sizes), and its largest token id must
    be below model.vocab_size. Without a recorded largest id, the ids are known to fit when the
    tokenizer matches (its ids are below its vocabulary, which fits the model) or the .idx token
    type cannot hold a larger one; otherwise a .bin up to SCAN_LIMIT_BYTES is scanned. Raises
    ConfigError or DataCorruptError; returns warnings for what could not be checked."""
    import numpy as np

    from megatron_gpas.config import ConfigError
    from megatron_gpas.data import indexed
    from megatron_gpas.tokenizer import describe_briefly, tokenizer_identity

    vocab_size = cfg.model.vocab_size
    run = tokenizer.describe()
    warnings = []
    for prefix in cfg.data.paths:
        report = indexed.read_json(prefix + ".report.json") or {}
        recorded = report.get("tokenizer")
        if recorded is None:
            warnings.append(f"{prefix}: no tokenizer recorded ({prefix}.report.json is missing or does not name "
                            f"one); cannot check that the data was tokenized with data.tokenizer")
        elif tokenizer_identity(recorded) != tokenizer_identity(run):
            raise ConfigError(f"data.paths entry '{prefix}' was tokenized with {describe_briefly(recorded)} "
                              f"({prefix}.report.json), but data.tokenizer is {describe_briefly(run)}: train with "
                              "the data's tokenizer, or tokenize the data with this one")
        max_id = report.get("max_token_id")
        if max_id is not None:
            if max_id >= vocab_size:
                raise ConfigError(f"data.paths entry '{prefix}' holds token ids up to {max_id} ({prefix}.report.json) "
                                  f"but model.vocab_size is {vocab_size}: the embedding must cover every token id")
            continue
        dtype = IndexedDataset(prefix, mmap=True).index.dtype
        if recorded is not None or np.iinfo(dtype).max < vocab_size:
            continue  # the matching tokenizer's ids fit (load_run_tokenizer), or the token type bounds them
        if os.path.getsize(prefix + ".bin") <= SCAN_LIMIT_BYTES:
            check_token_ids(IndexedDataset(prefix, mmap=True), vocab_size, "model.vocab_size")
        else:
            warnings.append(f"{prefix}: the largest token id is not recorded and the data is too large to scan at "
                            f"start-up; check it with tools/inspect_data.py {prefix} --check-ids "
                            f"--vocab-size {vocab_size}")
    return warnings


def describe_blend(cfg: Config) -> str:
    """One line per dataset of the blend: its weight, documents and tokens (for the run log)."""
    weights = list(cfg.data.weights) if cfg.data.weights else [1.0] * len(cfg.data.paths)
    total = sum(weights)
    lines = []
    for prefix, weight in zip(cfg.data.paths, weights):
        index = IndexedDataset(prefix, mmap=True).index
        tokens = int(index.sequence_lengths.sum(dtype="int64"))
        lines.append(f"[data] {prefix}: weight {weight / total:.3f}, {int(index.document_count) - 1:,} documents, "
                     f"{tokens:,} tokens; split {cfg.data.split} (train/valid/test)")
    return "\n".join(lines)


def build_datasets(cfg: Config, eod_id: int, vocab_size: int, cache_dir: str | None,
                   num_samples: list[int | None] | None = None):
    """(train, valid, test) GPTDatasets sized for the whole run.

    ``num_samples``: samples per split instead (None for a split: one epoch of it).
    ``cache_dir`` None: no index cache; every rank builds the indices in memory.
    """
    t = cfg.train
    # Every evaluation reads the same first `eval_iters` validation batches, so eval
    # losses at different steps are comparable.
    if num_samples is None:
        num_samples = [t.steps * t.global_batch_size, t.eval_iters * t.global_batch_size,
                       t.eval_iters * t.global_batch_size]
    dataset_config = GPTDatasetConfig(
        random_seed=t.seed,
        sequence_length=t.seq_length,
        blend=(list(cfg.data.paths), list(cfg.data.weights) if cfg.data.weights else None),
        split=cfg.data.split,
        path_to_cache=cache_dir,
        tokenizer=_DatasetTokenizer(vocab_size=vocab_size, eod=eod_id),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # causal masking is done by the attention module
        mmap_bin_files=True,
    )
    # Rank 0 writes the index cache first; the others then read it.
    rank0 = not dist.is_initialized() or dist.get_rank() == 0

    def build():
        return BlendedMegatronDatasetBuilder(GPTDataset, num_samples, lambda: True, dataset_config).build()

    datasets = None
    if rank0:
        if cache_dir is not None:
            os.makedirs(cache_dir, exist_ok=True)
        datasets = build()
    if dist.is_initialized():
        dist.barrier()
    if not rank0:
        datasets = build()
    return datasets


class PadToLength(torch.utils.data.Dataset):
    """``dataset`` followed by fully masked samples up to ``length`` (a whole number of global
    batches), so an evaluation covers every sample and the padding counts for nothing."""

    def __init__(self, dataset, length: int):
        assert length >= len(dataset) > 0
        self.dataset, self.length = dataset, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, idx: int) -> dict:
        if idx < len(self.dataset):
            return self.dataset[idx]
        sample = dict(self.dataset[0])
        sample["loss_mask"] = torch.zeros_like(sample["loss_mask"])
        return sample


def _collate(samples):
    return {key: torch.stack([s[key] for s in samples]) for key in ("tokens", "labels", "loss_mask", "position_ids")}


def build_loader(dataset, consumed_samples: int, micro_batch_size: int, num_workers: int):
    """An iterator of micro-batches for this data-parallel rank, from `consumed_samples` on."""
    if dataset is None or len(dataset) == 0:
        return None
    sampler = MegatronPretrainingSampler(
        total_samples=len(dataset),
        consumed_samples=consumed_samples,
        micro_batch_size=micro_batch_size,
        data_parallel_rank=parallel_state.get_data_parallel_rank(),
        data_parallel_size=parallel_state.get_data_parallel_world_size(),
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=_collate,
        persistent_workers=num_workers > 0,
    )
    return iter(loader)
