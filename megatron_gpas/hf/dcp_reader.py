"""Offline reading of a Megatron-Core ``torch_dist`` checkpoint: plain PyTorch, no process group,
no GPU, no Megatron model.

dist-checkpointing stores every tensor globally (unsharded), with the homogeneous layers
stacked along dim 0 (``decoder.layers.mlp.linear_fc1.weight`` is [L, 2·ffn, h]) whatever the
TP/PP/DP layout that wrote it. ``read_layer`` asks DCP's planner for one layer's slice only,
so peak memory is one layer's tensor, not the whole stack (megatron-notes.md §4.5).

Opening a checkpoint checks it as a resume would (``checkpoint_integrity``: the pickles with the
restricted unpicklers, the small files' checksums); each data file's checksum is checked before
its first read.
"""

from __future__ import annotations

import os

import torch
import yaml
from torch.distributed.checkpoint import load
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_gpas.checkpoint_integrity import (FileVerifier, SafeFileSystemReader, check_checkpoint, describe,
                                                unwrapped_errors)
from megatron_gpas.checkpoint_paths import RUN_CONFIG, CheckpointError


class _SlicePlanner(DefaultLoadPlanner):
    """Loads each requested tensor from a sub-box of the saved global tensor (its offsets)."""

    def __init__(self, offsets: dict[str, tuple[int, ...]]):
        super().__init__()
        self.offsets = offsets

    def create_local_plan(self) -> LoadPlan:
        requests = []
        for fqn, dest in self.state_dict.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(self.offsets[fqn]), sizes=dest.size())
            requests += create_read_items_for_chunk_list(fqn, self.metadata.state_dict_metadata[fqn], [chunk])
        return LoadPlan(requests)

    def lookup_tensor(self, index) -> torch.Tensor:
        return self.state_dict[index.fqn]  # a plain tensor holding exactly the requested box


class CheckpointReader:
    """Tensors of one dist-checkpoint directory, read lazily."""

    def __init__(self, path: str):
        if not os.path.isfile(os.path.join(path, "metadata.json")) or not os.path.isfile(os.path.join(path, ".metadata")):
            raise FileNotFoundError(f"{path} is not a complete dist-checkpoint (no metadata.json/.metadata)")
        self.path = path
        self._verifier = FileVerifier(path)  # the metadata, config and tokenizer copy now; data files as read
        problems = check_checkpoint(path, checksums=False).problems  # pickles: refused like a resume refuses them
        if problems:
            raise CheckpointError(describe(path, problems))
        self._reader = SafeFileSystemReader(path)
        metadata = self._reader.read_metadata()
        self.metadata = {key: md for key, md in metadata.state_dict_metadata.items()
                         if isinstance(md, TensorStorageMetadata)}
        self._files: dict[str, set[str]] = {}  # tensor → the files holding its chunks
        for index, info in metadata.storage_data.items():
            self._files.setdefault(index.fqn, set()).add(info.relative_path)
        config_file = os.path.join(path, RUN_CONFIG)
        self.run_config = None
        if os.path.isfile(config_file):
            with open(config_file) as f:
                self.run_config = yaml.safe_load(f)

    def __contains__(self, key: str) -> bool:
        return key in self.metadata

    def shape(self, key: str) -> torch.Size:
        return self.metadata[key].size

    def dtype(self, key: str) -> torch.dtype:
        return self.metadata[key].properties.dtype

    def _load(self, key: str, offsets: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
        if key not in self.metadata:
            raise KeyError(f"checkpoint {self.path} has no tensor {key!r}")
        self._verifier.verify(sorted(self._files[key]))
        dest = torch.empty(shape, dtype=self.dtype(key))
        with unwrapped_errors():
            load({key: dest}, storage_reader=self._reader, planner=_SlicePlanner({key: offsets}), no_dist=True)
        return dest

    def read(self, key: str) -> torch.Tensor:
        shape = tuple(self.shape(key))
        return self._load(key, (0,) * len(shape), shape)

    def read_layer(self, key: str, layer: int) -> torch.Tensor:
        """Row ``layer`` (0-based, global) of a stacked per-layer tensor."""
        shape = tuple(self.shape(key))
        if not 0 <= layer < shape[0]:
            raise IndexError(f"{key} has {shape[0]} layers; asked for layer {layer}")
        return self._load(key, (layer,) + (0,) * (len(shape) - 1), (1, *shape[1:]))[0]
