"""Checkpoints with Megatron-Core dist-checkpointing (torch_dist format).

Layout of ``checkpoint.save``::

    latest                  name of the newest *complete* checkpoint (atomic replace)
    iter_0000200/           a dist-checkpoint: model, optimizer, scheduler, train state, RNG
        run_config.yaml     the full config of the run that wrote it
        tokenizer/          a copy of the run's tokenizer file(s) + tokenizer.yaml (for exports)
    iter_0000400.partial/   a save in progress (or one that was interrupted)

A save is written into ``iter_N.partial`` and renamed only after every rank has
finished, and ``latest`` is updated after the rename, so an interrupted save is never
what a resume picks up. Model and optimizer tensors are stored as global (unsharded)
tensors, so a checkpoint loads under any TP/PP/VP/DP layout (resharding on load).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist
import yaml

from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.utils import unwrap_model

from megatron_gpas import cpu_runtime
from megatron_gpas.checkpoint_paths import (LATEST, PARTIAL_SUFFIX, RUN_CONFIG, CheckpointError,  # noqa: F401
                                            find_latest, iteration_dir)
from megatron_gpas.config import Config, ConfigError, check_vocab_padding, config_from_tree, save_config
from megatron_gpas.hf.tokenizer_export import copy_into_checkpoint
from megatron_gpas.model.schemes import SCHEMES
from megatron_gpas.optim import align_param_groups, restore_schedule

log = logging.getLogger(__name__)


def architecture(config: dict) -> dict:
    """The config values that define the network a checkpoint holds, as effective values
    (defaults resolved; options that do not apply dropped)."""
    cfg = config_from_tree({section: config.get(section) or {} for section in ("model", "norm", "gpas")})
    m, g = cfg.model, cfg.gpas
    arch = {f"model.{key}": getattr(m, key) for key in (
        "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size", "rope_base")}
    arch["model.num_query_groups"] = m.num_query_groups or m.num_attention_heads  # None: one group per head
    arch["model.kv_channels"] = m.kv_channels or m.hidden_size // m.num_attention_heads
    scheme = SCHEMES.get(cfg.norm.scheme)
    if scheme is None:
        arch["norm.scheme"] = cfg.norm.scheme
    else:
        arch.update(scheme.architecture(cfg))
    arch["gpas.enabled"] = g.enabled
    if g.enabled:
        for key in ("activation", "position", "stop_gradient", "per_sublayer"):
            arch[f"gpas.{key}"] = getattr(g, key)
        if g.activation == "scaled_silu":
            arch["gpas.silu_beta"] = g.silu_beta
    return arch


def _rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _layout() -> tuple[int, int, int]:
    return (
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_data_parallel_world_size(),
    )


def _sharded_state(model_chunks, optimizer, scheduler, train_state: dict, *, is_loading: bool) -> dict:
    modules = [unwrap_model(chunk) for chunk in model_chunks]
    state = {f"model{i}": module.sharded_state_dict() for i, module in enumerate(modules)}
    if optimizer is not None:
        model_state = {k: v for k, v in state.items()}
        state["optimizer"] = optimizer.sharded_state_dict(
            model_state, is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": "fully_reshardable"},
        )
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    state["train_state"] = dict(train_state)
    pp, tp, dp = _layout()
    # RNG streams are per rank; they are restored only into the same layout.
    state["rng_state"] = ShardedObject(
        "rng_state", _rng_state(), (pp, tp, dp),
        (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank(),
         parallel_state.get_data_parallel_rank()),
        replica_id=0,
    )
    state["layout"] = [pp, tp, dp]
    return state


def save(cfg: Config, root: str, step: int, model_chunks, optimizer, scheduler, train_state: dict) -> str:
    final = iteration_dir(root, step)
    partial = final + PARTIAL_SUFFIX
    rank0 = dist.get_rank() == 0
    if rank0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # left over from an interrupted save
        os.makedirs(partial)
    dist.barrier()
    state = _sharded_state(model_chunks, optimizer, scheduler, train_state, is_loading=False)
    dist_checkpointing.save(state, partial)
    dist.barrier()
    if rank0:
        save_config(cfg, os.path.join(partial, RUN_CONFIG))
        copy_into_checkpoint(dataclasses.asdict(cfg.data.tokenizer), partial)  # exports need no outside files
        if os.path.exists(final):  # re-saving a step: keep the old copy until the new one is in place
            os.replace(final, final + ".replaced")
        os.replace(partial, final)
        shutil.rmtree(final + ".replaced", ignore_errors=True)
        tmp = os.path.join(root, LATEST + ".tmp")
        with open(tmp, "w") as f:
            f.write(os.path.basename(final) + "\n")
        os.replace(tmp, os.path.join(root, LATEST))
    dist.barrier()
    return final


def saved_run_config(path: str) -> dict | None:
    config_file = os.path.join(path, RUN_CONFIG)
    if not os.path.isfile(config_file):
        return None
    with open(config_file) as f:
        return yaml.safe_load(f)


def check_compatible(cfg: Config, path: str) -> None:
    """Refuse to load a checkpoint of another architecture (shape, scheme, GPAS)."""
    saved_tree = saved_run_config(path)
    if saved_tree is None:
        return
    saved = architecture(saved_tree)
    current = architecture(cfg.to_dict())
    diffs = [f"{key}: checkpoint has {saved.get(key)!r}, config has {current.get(key)!r}"
             for key in sorted(set(saved) & set(current)) if saved[key] != current[key]]
    if diffs:
        raise CheckpointError(f"checkpoint {path} does not match this run's model:\n  " + "\n  ".join(diffs))
    try:  # a differently padded embedding would load its overlapping rows silently
        check_vocab_padding(cfg, saved_tree)
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from e


def check_optimizer_kind(cfg: Config, path: str) -> None:
    """Refuse to resume the optimizer state of another optimizer (optim.optimizer): Adam's and
    Muon+Adam's states are different trees (checkpoints from before the key were Adam's)."""
    saved_tree = saved_run_config(path)
    if saved_tree is None:
        return
    saved = (saved_tree.get("optim") or {}).get("optimizer", "adam")
    if saved != cfg.optim.optimizer:
        raise CheckpointError(
            f"checkpoint {path} was trained with optim.optimizer={saved}, this run uses "
            f"optim.optimizer={cfg.optim.optimizer}: its optimizer state cannot be resumed. Set "
            "checkpoint.load_optimizer=false to start from its weights with a fresh optimizer")


def load(cfg: Config, path: str, model_chunks, optimizer, scheduler, *, load_optimizer: bool = True,
         check_architecture: bool = True) -> dict:
    """Load ``path`` into the model (and optimizer/scheduler); returns the train state.
    ``check_architecture=False``: the caller has checked that the tensors mean the same in this
    model (e.g. a conversion between equivalent schemes)."""
    if check_architecture:
        check_compatible(cfg, path)
    if load_optimizer:
        check_optimizer_kind(cfg, path)
    if load_optimizer and cfg.parallel.distributed_optimizer and cpu_runtime.is_active():
        raise CheckpointError(
            "resuming the distributed optimizer's state needs a GPU (Megatron reloads it only into "
            "TE/apex FusedAdam; the CPU fallback is torch's Adam). On CPU use "
            "checkpoint.load_optimizer=false (weights only) or parallel.distributed_optimizer=false."
        )
    template = _sharded_state(
        model_chunks, optimizer if load_optimizer else None, scheduler if load_optimizer else None,
        {}, is_loading=True,
    )
    same_layout = True
    common = dist_checkpointing.load_common_state_dict(path)
    if load_optimizer and optimizer is not None and "optimizer" not in common:
        raise CheckpointError(
            f"checkpoint {path} holds weights only (e.g. written by tools/convert_from_hf.py), no optimizer "
            "state to resume: start from it with checkpoint.load_optimizer=false, or fine-tune with "
            "checkpoint.pretrained"
        )
    if list(common.get("layout", [])) != template["layout"]:
        same_layout = False
        del template["rng_state"]  # per-rank streams of another layout: start fresh ones
    state = dist_checkpointing.load(template, path)
    for i, chunk in enumerate(model_chunks):
        unwrap_model(chunk).load_state_dict(state[f"model{i}"], strict=True)
    if load_optimizer and optimizer is not None:
        saved_schedule = align_param_groups(state["optimizer"], optimizer)  # optim.lr may have changed
        optimizer.load_state_dict(state["optimizer"])
        if saved_schedule is not None and not cfg.optim.override_schedule:
            restore_schedule(optimizer, saved_schedule)  # before the scheduler sets each group's LR from them
        scheduler.load_state_dict(state["scheduler"])
    elif optimizer is not None:
        # weights only: a BF16 run's fp32 master weights are copies taken when the optimizer was
        # built; without this the first step would continue from the model's initial weights
        optimizer.reload_model_params()
    if same_layout:
        _set_rng_state(state["rng_state"])
    else:
        log.warning("checkpoint %s was written with (PP, TP, DP) = %s; resuming with %s: RNG streams restart",
                    path, common.get("layout"), template["layout"])
    return state["train_state"]
