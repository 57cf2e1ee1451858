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


def check_indexed_dataset(prefix: str) -> IndexedDataset:
    """Open PREFIX.bin/.idx and check that the index and the token file agree."""
    try:
        dataset = IndexedDataset(prefix, mmap=True)
    except Exception as e:  # a truncated or foreign .idx fails inside Megatron's reader
        raise DataCorruptError(f"cannot read indexed dataset '{prefix}': {e}") from e
    if len(dataset) == 0:
        raise DataCorruptError(f"indexed dataset '{prefix}' has no sequences")
    index = dataset.index
    expected = int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * index.dtype_size
    actual = os.path.getsize(prefix + ".bin")
    if expected != actual:
        raise DataCorruptError(
            f"indexed dataset '{prefix}' is corrupt: the index describes {expected} bytes of tokens but "
            f"{prefix}.bin has {actual} bytes"
        )
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


def build_datasets(cfg: Config, eod_id: int, vocab_size: int, cache_dir: str):
    """(train, valid, test) GPTDatasets sized for the whole run."""
    t = cfg.train
    # Every evaluation reads the same first `eval_iters` validation batches, so eval
    # losses at different steps are comparable.
    num_samples = [t.steps * t.global_batch_size, t.eval_iters * t.global_batch_size, t.eval_iters * t.global_batch_size]
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
        os.makedirs(cache_dir, exist_ok=True)
        datasets = build()
    if dist.is_initialized():
        dist.barrier()
    if not rank0:
        datasets = build()
    return datasets


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
