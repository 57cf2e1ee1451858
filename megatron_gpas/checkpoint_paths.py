"""Where checkpoints live on disk: names, completeness, the newest complete one.

No dependency on the model or on Megatron, so the config, the model (fixed gate values read
from another run) and the tools can all find checkpoints without importing each other.
"""

from __future__ import annotations

import logging
import os
import re

from megatron_gpas.config import ConfigError

log = logging.getLogger(__name__)

LATEST = "latest"
PARTIAL_SUFFIX = ".partial"
RUN_CONFIG = "run_config.yaml"


class CheckpointError(RuntimeError):
    pass


def iteration_dir(root: str, step: int) -> str:
    return os.path.join(root, f"iter_{step:07d}")


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "metadata.json")) and not path.endswith(PARTIAL_SUFFIX)


def find_latest(root: str) -> str | None:
    """The newest complete checkpoint under ``root`` (None if there is none).

    ``latest`` names it; if ``latest`` is missing or names an incomplete directory (a crash
    between the steps of a save), the newest complete ``iter_*`` directory is used.
    """
    if is_complete(root):  # a checkpoint directory itself
        return root
    pointer = os.path.join(root, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            path = os.path.join(root, f.read().strip())
        if is_complete(path):
            return path
        log.warning("%s names %s, which is not a complete checkpoint; looking for the newest complete one",
                    pointer, path)
    if not os.path.isdir(root):
        return None
    complete = sorted(name for name in os.listdir(root)
                      if re.fullmatch(r"iter_\d+", name) and is_complete(os.path.join(root, name)))
    if complete:
        return os.path.join(root, complete[-1])
    if os.path.isfile(pointer):  # a resume was expected: do not silently start from scratch
        raise CheckpointError(f"{pointer} names a checkpoint that is not complete, and {root} holds no other")
    return None


def pretrained_checkpoint(root: str, what: str = "checkpoint.pretrained") -> str:
    """The complete checkpoint directory that ``root`` names (itself, or the newest under a
    save root); ConfigError naming ``what`` if there is none."""
    if not os.path.isdir(root):
        raise ConfigError(f"{what} not found: {root} is not a directory")
    try:
        path = find_latest(root)
    except CheckpointError as e:
        raise ConfigError(f"{what}: {e}") from e
    if path is None:
        raise ConfigError(f"{what}: {root} holds no complete checkpoint "
                          "(a dist-checkpoint directory with metadata.json, or a save root with iter_N/ in it)")
    return path
