"""Checkpoints with Megatron-Core dist-checkpointing (torch_dist format).

Layout of ``checkpoint.save``::

    latest                  name of the newest *complete* checkpoint (atomic replace)
    iter_0000200/           a dist-checkpoint: model, optimizer, scheduler, train state, RNG
        run_config.yaml     the full config of the run that wrote it
        tokenizer/          a copy of the run's tokenizer file(s) + tokenizer.yaml (for exports)
        checksums.json      size and SHA-256 of every other file (checkpoint_integrity.py)
    iter_0000400.partial/   a save in progress (or one that was interrupted)

A save is written into ``iter_N.partial`` and renamed only after every rank has
finished, and ``latest`` is updated after the rename, so an interrupted save is never
what a resume picks up. Model and optimizer tensors are stored as global (unsharded)
tensors, so a checkpoint loads under any TP/PP/VP/DP layout (resharding on load).

Before a save: no parameter may be NaN/Inf, and ``latest`` never moves back to an older step
unless ``checkpoint.overwrite``. A failed save removes its ``.partial`` and says where and how
much space is free. A load checks the checkpoint first (``checkpoint_integrity``: checksums,
restricted unpickling; each rank a share of the files) and reads it only through the
restricted unpicklers; a resume falls back to an older intact checkpoint when asked
(``checkpoint.fallback``). docs/checkpoints.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.distributed.checkpoint.api import CheckpointException as DCPCheckpointException

from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies import torch as mcore_torch_strategy
from megatron.core.msc_utils import MultiStorageClientFeature
from megatron.core.utils import unwrap_model

from megatron_gpas import checkpoint_integrity as integrity
from megatron_gpas import cpu_runtime
from megatron_gpas.checkpoint_paths import (LATEST, PARTIAL_SUFFIX, RUN_CONFIG, CheckpointError,  # noqa: F401
                                            NonFiniteWeightsError, checkpoint_step, existing_parent, find_latest,
                                            iteration_dir, resume_candidates)
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


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _all_gather(value) -> list:
    if _world() == 1:
        return [value]
    gathered = [None] * _world()
    dist.all_gather_object(gathered, value)
    return gathered


def _on_rank0(fn):
    """Run ``fn`` on rank 0 only; every rank raises if it failed (so none waits for the others in
    a collective that rank 0 never reaches). Returns ``fn``'s result on rank 0, None elsewhere."""
    result, error = None, None
    if _rank() == 0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            error = e
    messages = [f"{type(error).__name__}: {error}" if error else None]
    if _world() > 1:
        dist.broadcast_object_list(messages, src=0)
    if error is not None:
        raise error
    if messages[0] is not None:
        raise CheckpointError(f"rank 0 failed: {messages[0]}")
    return result


def _write_latest(root: str, name: str) -> None:
    tmp = os.path.join(root, LATEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(name + "\n")
    os.replace(tmp, os.path.join(root, LATEST))


def _newest_step(root: str) -> int | None:
    """The step of the checkpoint a resume from ``root`` would start from (None: none there)."""
    try:
        path = find_latest(root) if os.path.isdir(root) else None
    except CheckpointError:  # ``latest`` names an incomplete checkpoint and there is no other
        return None
    return checkpoint_step(path) if path else None


def free_space_note(path: str) -> str:
    """'N GiB free on <dir>' for the file system that holds (or would hold) ``path``."""
    where = existing_parent(path)
    try:
        return f"{integrity.format_size(shutil.disk_usage(where).free)} free on {where}"
    except OSError as e:
        return f"free space on {where} unknown ({e})"


def _non_finite_parameters(model_chunks, optimizer) -> list[str]:
    """Names of this rank's parameters (and optimizer main parameters: the fp32 copies of a BF16
    run, the distributed optimizer's shards) holding NaN or Inf."""
    named = [(name, p) for chunk in model_chunks for name, p in unwrap_model(chunk).named_parameters()]
    known = {id(p) for _, p in named}
    if optimizer is not None:
        named += [(f"optimizer main parameter #{i} {tuple(p.shape)}", p)
                  for i, p in enumerate(optimizer.get_parameters()) if id(p) not in known]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in named]).cpu()  # one sync
    return [name for (name, _), ok in zip(named, finite.tolist()) if not ok]


def _refuse_non_finite(model_chunks, optimizer) -> None:
    bad = _non_finite_parameters(model_chunks, optimizer)
    device = next((p.device for chunk in model_chunks for p in chunk.parameters()), torch.device("cpu"))
    count = torch.tensor([len(bad)], dtype=torch.int64, device=device)
    if _world() > 1:
        dist.all_reduce(count)
    if int(count) == 0:
        return
    found = [f"{name} (rank {rank})" for rank, names in enumerate(_all_gather(bad[:3])) for name in names]
    raise NonFiniteWeightsError(
        f"not saving a checkpoint: {int(count)} parameter tensor(s) hold NaN/Inf, e.g. " + ", ".join(found[:5]))


def save(cfg: Config, root: str, step: int, model_chunks, optimizer, scheduler, train_state: dict) -> str:
    """Write the checkpoint of ``step`` under ``root`` (collective) and point ``latest`` at it.
    Raises NonFiniteWeightsError (weights hold NaN/Inf) or CheckpointError (``latest`` is ahead of
    ``step`` without checkpoint.overwrite; a write failed) on every rank; nothing is left behind."""
    final = iteration_dir(root, step)
    partial = final + PARTIAL_SUFFIX
    _refuse_non_finite(model_chunks, optimizer)

    def refuse_going_back():
        newest = _newest_step(root)
        if newest is not None and newest > step and not cfg.checkpoint.overwrite:
            raise CheckpointError(
                f"not saving step {step} into {root}: its latest checkpoint is step {newest}, and saving would "
                f"move {LATEST} back to an older step (steps {step + 1}..{newest} of that run would be lost on "
                "resume). Set checkpoint.overwrite=true to do it anyway")

    _on_rank0(refuse_going_back)
    try:
        _write(cfg, partial, model_chunks, optimizer, scheduler, train_state)
    except (Exception, DCPCheckpointException) as e:  # (DCP's exception is a BaseException)
        if _rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise CheckpointError(f"saving checkpoint {final} failed: {_cause(e)}. {free_space_note(root)}; "
                              f"the incomplete {partial} was removed") from e

    def publish():
        if os.path.exists(final):  # re-saving a step: keep the old copy until the new one is in place
            os.replace(final, final + ".replaced")
        os.replace(partial, final)
        shutil.rmtree(final + ".replaced", ignore_errors=True)
        _write_latest(root, os.path.basename(final))

    _on_rank0(publish)
    if _world() > 1:
        dist.barrier()
    return final


def _write(cfg: Config, partial: str, model_chunks, optimizer, scheduler, train_state: dict) -> None:
    """All files of a checkpoint into ``partial``, ``checksums.json`` last (collective)."""
    def prepare():
        os.makedirs(os.path.dirname(partial), exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # left over from an interrupted save
        os.makedirs(partial)

    _on_rank0(prepare)
    state = _sharded_state(model_chunks, optimizer, scheduler, train_state, is_loading=False)
    dist_checkpointing.save(state, partial)
    if _world() > 1:
        dist.barrier()

    def add_run_files():
        save_config(cfg, os.path.join(partial, RUN_CONFIG))
        copy_into_checkpoint(dataclasses.asdict(cfg.data.tokenizer), partial)  # exports need no outside files
        return integrity.list_files(partial)

    # every rank hashes a share of the files (a week-long 8B run's checkpoint is ~100 GB)
    sizes = [_on_rank0(add_run_files)]
    if _world() > 1:
        dist.broadcast_object_list(sizes, src=0)
    sizes = sizes[0]
    try:
        digests, error = integrity.hash_files(partial, integrity.my_share(sizes, _rank(), _world())), None
    except OSError as e:
        digests, error = {}, f"rank {_rank()}: {e}"
    gathered = _all_gather((digests, error))
    errors = [err for _, err in gathered if err]
    if errors:
        raise CheckpointError("hashing the checkpoint's files failed: " + "; ".join(errors))
    _on_rank0(lambda: integrity.write_manifest(partial, sizes, {k: v for d, _ in gathered for k, v in d.items()}))


def _cause(e: BaseException) -> str:
    """The root of a save failure: DCP wraps the writers' exceptions (rank → (exception, trace))."""
    if isinstance(e, DCPCheckpointException) and e.failures:
        inner = next(iter(e.failures.values()))
        e = inner[0] if isinstance(inner, tuple) else inner
    while e.__cause__ is not None and not isinstance(e, OSError):
        e = e.__cause__
    disk_full = isinstance(e, OSError) and e.errno == errno.ENOSPC
    return ("disk full: " if disk_full else "") + f"{type(e).__name__}: {e}"


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


@contextlib.contextmanager
def _restricted_reads(path: str):
    """Megatron's reads of checkpoint ``path`` through the restricted unpicklers.

    ``dist_checkpointing.load`` and ``load_common_state_dict`` build their DCP reader by the name
    ``FileSystemReader`` in ``megatron.core.dist_checkpointing.strategies.torch``; no argument
    reaches it (a load strategy covers the tensors but not the common state). So for the
    duration of the load that name is our SafeFileSystemReader. Megatron's other two read
    paths are refused: a legacy common.pt (torch.load outside DCP) and the multi-storage client.
    """
    if os.path.exists(os.path.join(path, integrity.LEGACY_COMMON)):
        raise CheckpointError(f"{os.path.join(path, integrity.LEGACY_COMMON)}: Megatron's legacy common-state file "
                              "is not read (checkpoints of megatron_gpas keep that state inside the dist-checkpoint)")
    if MultiStorageClientFeature.is_enabled():
        raise CheckpointError("Megatron's multi-storage client is enabled: its checkpoint reader unpickles without "
                              "restrictions; disable it to load checkpoints")
    integrity.read_metadata(path)  # a refusal here is plain; inside DCP it would come wrapped and logged
    original = mcore_torch_strategy.FileSystemReader
    mcore_torch_strategy.FileSystemReader = integrity.SafeFileSystemReader
    try:
        with integrity.unwrapped_errors():
            yield
    finally:
        mcore_torch_strategy.FileSystemReader = original


def check(cfg: Config, path: str) -> list[str]:
    """What is wrong with checkpoint ``path`` (collective: each rank checks a share of its files;
    every rank gets the whole list). Checksums only with checkpoint.verify."""
    report = integrity.check_checkpoint(path, checksums=cfg.checkpoint.verify, rank=_rank(), world=_world())
    if cfg.checkpoint.verify and not report.has_manifest and not report.problems and _rank() == 0:
        print(f"[warn] checkpoint {path} has no {integrity.MANIFEST} (saved before checksums were written): "
              "its files are not verified", flush=True)
    return sorted({problem for problems in _all_gather(report.problems) for problem in problems})


def verify(cfg: Config, path: str) -> None:
    """CheckpointError naming the damaged files of checkpoint ``path`` (collective)."""
    problems = check(cfg, path)
    if problems:
        raise CheckpointError(integrity.describe(path, problems))


def resume_point(cfg: Config, root: str) -> str | None:
    """The checkpoint a resume from ``root`` starts from, checked (collective); None if ``root``
    holds none. A damaged newest checkpoint (failed checks, incomplete, gone) is an error naming
    it and the newest intact older one, or with checkpoint.fallback that older one, with a
    warning; damaged checkpoints under checkpoint.save are then moved aside to ``iter_N.damaged``
    and ``latest`` names the one resumed, so this run's saves continue from there."""
    damaged: list[tuple[str, list[str]]] = []
    intact = None
    for path in resume_candidates(root):
        problems = check(cfg, path)
        if not problems:
            intact = path
            break
        damaged.append((path, problems))
    if not damaged:
        return intact
    newest, problems = damaged[0]
    report = integrity.describe(newest, problems)
    if not cfg.checkpoint.fallback:
        hint = (f"The newest intact checkpoint is {intact}: set checkpoint.fallback=true to resume from "
                f"{os.path.basename(intact)}" if intact else f"{root} holds no older intact checkpoint")
        raise CheckpointError(f"{report}\n{hint}")
    if intact is None:
        raise CheckpointError(f"{report}\nand {root} holds no older intact checkpoint to fall back to")
    if _rank() == 0:
        print(f"[warn] {report}\n[warn] resuming from the newest intact checkpoint, {intact} "
              "(checkpoint.fallback=true)", flush=True)
    if cfg.checkpoint.save and os.path.realpath(root) == os.path.realpath(cfg.checkpoint.save):
        def set_aside():
            for path, _ in damaged:
                if os.path.exists(path):
                    aside = path + ".damaged"
                    n = 1
                    while os.path.exists(aside):
                        n += 1
                        aside = f"{path}.damaged{n}"
                    os.replace(path, aside)
                    print(f"[warn] moved {path} aside to {aside}", flush=True)
            _write_latest(root, os.path.basename(intact))

        _on_rank0(set_aside)
    return intact


def load(cfg: Config, path: str, model_chunks, optimizer, scheduler, *, load_optimizer: bool = True,
         check_architecture: bool = True, verified: bool = False) -> dict:
    """Load ``path`` into the model (and optimizer/scheduler); returns the train state.
    ``check_architecture=False``: the caller has checked that the tensors mean the same in this
    model (e.g. a conversion between equivalent schemes). ``verified``: the caller has checked
    the checkpoint (``resume_point``); otherwise ``verify`` runs first. Either way every pickle
    is read through the restricted unpicklers."""
    if not verified:
        verify(cfg, path)
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
    with _restricted_reads(path):
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
    with _restricted_reads(path):
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
