"""A checkpoint's run config, made into the config of a tool that only runs its model forward
(``tools/evaluate.py``, ``tools/generate.py``): the network and tokenizer from the checkpoint's
``run_config.yaml``, the layout and anything else from the command line's overrides, the
weights loaded through ``checkpoint.pretrained``, nothing saved, nothing logged."""

from __future__ import annotations

import os
import tempfile

import yaml

from megatron_gpas.checkpoint_paths import pretrained_checkpoint
from megatron_gpas.config import ConfigError, check_vocab_padding, config_from_tree, inherit_architecture, load_tree
from megatron_gpas.distributed import launch_rank


def checkpoint_tree(checkpoint: str, overrides: list[str], tool: str) -> tuple[dict, dict, str]:
    """(config tree, the checkpoint's saved run config, checkpoint directory) for ``checkpoint``
    (a checkpoint directory or a save root: its latest)."""
    from megatron_gpas.checkpoint import RUN_CONFIG

    path = pretrained_checkpoint(checkpoint, what="checkpoint")
    with open(os.path.join(path, RUN_CONFIG)) as f:
        saved = yaml.safe_load(f) or {}
    log = (lambda note: print(f"[{tool}] {note}", flush=True)) if launch_rank() == 0 else None
    return inherit_architecture(load_tree(None, overrides), saved, checkpoint=path, log=log), saved, path


def forward_only_config(tree: dict, saved: dict, path: str, tool: str, require_data: bool = True):
    """The validated config of ``tree`` for a forward-only tool: weights from ``path``, no
    optimizer schedule, no checkpoint saved, a scratch logging directory on rank 0 (the caller
    removes ``cfg.logging.dir``), no fine-tuning data. ``require_data=False``: the tool reads
    no dataset (data.paths may be empty)."""
    from megatron_gpas.checkpoint import CheckpointError, check_compatible
    from megatron_gpas.validation import validate

    tree["optim"] = {**(tree.get("optim") or {}), "warmup_steps": 0, "decay_steps": None}
    tree["checkpoint"] = {"pretrained": path, "save": None, "load": None}
    verbose = (tree.get("logging") or {}).get("verbose", False)
    tree["logging"] = {"dir": tempfile.mkdtemp(prefix=f"{tool}_") if launch_rank() == 0 else "unused",
                       "tensorboard": False, "plots": False, "verbose": verbose}
    tree.pop("sft", None)
    cfg = config_from_tree(tree)
    validate(cfg, require_data=require_data)
    try:
        check_compatible(cfg, path)  # an override that contradicts the checkpoint's network
    except CheckpointError as e:
        raise ConfigError(str(e)) from e
    check_vocab_padding(cfg, saved)
    return cfg
