"""Writes a Hugging Face weight directory shard by shard (bounded memory)."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class ShardedSafetensorsWriter:
    """Collects tensors and writes a shard whenever ``max_shard_bytes`` is reached, so at most
    one shard is held in memory. ``close`` names the shards ``model-0000i-of-0000N.safetensors``
    (or ``model.safetensors`` if there is one) and writes the index HF loaders read."""

    def __init__(self, out_dir: str, max_shard_bytes: int):
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []  # (temporary file, tensor names)
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = os.path.join(self.out_dir, f".shard-{len(self._shards):05d}.safetensors.tmp")
        save_file(self._pending, path, metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        names = [WEIGHTS_NAME] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        weight_map = {}
        for (tmp, tensors), name in zip(self._shards, names):
            os.replace(tmp, os.path.join(self.out_dir, name))
            weight_map.update({t: name for t in tensors})
        if count > 1:
            with open(os.path.join(self.out_dir, INDEX_NAME), "w") as f:
                json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, f, indent=2)
        return names
