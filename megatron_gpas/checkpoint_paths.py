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
METADATA_JSON = "metadata.json"  # Megatron writes it last: a checkpoint directory without it is incomplete
_ITERATION = re.compile(r"iter_(\d+)")


class CheckpointError(RuntimeError):
    pass


class NonFiniteWeightsError(CheckpointError):
    """A save refused because parameters hold NaN/Inf (nothing was written): the run diverged."""


def iteration_dir(root: str, step: int) -> str:
    return os.path.join(root, f"iter_{step:07d}")


def existing_parent(path: str) -> str:
    """``path`` itself if it exists, else its nearest existing ancestor (what a makedirs would build on)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def checkpoint_step(path: str) -> int | None:
    """The step of checkpoint directory ``path`` from its name (iter_NNNNNNN); None for another name."""
    match = _ITERATION.fullmatch(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, METADATA_JSON)) and not path.endswith(PARTIAL_SUFFIX)


def resume_candidates(root: str) -> list[str]:
    """The checkpoints a resume from ``root`` considers, newest first: the one ``latest`` names
    (even if it is incomplete or gone: that is a damaged newest checkpoint), then the complete
    ``iter_*`` directories older than it. Without ``latest``, every complete ``iter_*`` directory.
    Complete directories newer than ``latest`` (a crash between a save's rename and the pointer
    update, or a run that saved with checkpoint.overwrite) are not the run's newest state.
    ``root`` may also be a checkpoint directory itself."""
    if is_complete(root):
        return [root]
    if not os.path.isdir(root):
        return []
    steps = {name: checkpoint_step(name) for name in os.listdir(root)}
    complete = sorted((name for name, step in steps.items() if step is not None and is_complete(os.path.join(root, name))),
                      key=lambda name: steps[name], reverse=True)
    pointer = os.path.join(root, LATEST)
    if not os.path.isfile(pointer):
        return [os.path.join(root, name) for name in complete]
    with open(pointer) as f:
        named = f.read().strip()
    named_step = checkpoint_step(named)
    older = [name for name in complete if named_step is None or steps[name] < named_step]
    return [os.path.join(root, name) for name in [named, *older]]


def find_latest(root: str) -> str | None:
    """The newest complete checkpoint under ``root`` (None if there is none).

    ``latest`` names it; if ``latest`` names an incomplete directory (a crash between the
    steps of a save) or is missing, the newest older complete ``iter_*`` directory is used.
    (A resume also checks the checkpoint's files, and calls an incomplete one damaged:
    ``checkpoint.resume_point``.)
    """
    candidates = resume_candidates(root)
    complete = [path for path in candidates if is_complete(path)]
    if candidates and complete and complete[0] != candidates[0]:
        log.warning("%s names %s, which is not a complete checkpoint; using the newest older complete one, %s",
                    os.path.join(root, LATEST), candidates[0], complete[0])
    if complete:
        return complete[0]
    if candidates:  # a resume was expected: do not silently start from scratch
        raise CheckpointError(f"{os.path.join(root, LATEST)} names a checkpoint that is not complete, "
                              f"and {root} holds no other")
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
