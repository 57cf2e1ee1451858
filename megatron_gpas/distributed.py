"""Process-group setup: torchrun / SLURM / single process, NCCL on GPU and gloo on CPU."""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

from megatron.core import parallel_state, tensor_parallel

from megatron_gpas import cpu_runtime
from megatron_gpas.config import Config


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name):
            return int(os.environ[name])
    return default


def launch_rank() -> int:
    """This process's rank as the launcher gives it (torchrun, else SLURM), known before any
    process group starts."""
    return _env_int("RANK", "SLURM_PROCID", default=0)


def local_device_index() -> int:
    """The GPU this process uses (LOCAL_RANK, else SLURM_LOCALID; modulo the visible GPUs)."""
    return _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0) % max(1, torch.cuda.device_count())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: Config) -> torch.device:
    """Start the default process group and Megatron's TP/PP/DP groups; seed RNGs.

    Rank and world size come from torchrun's RANK/WORLD_SIZE/LOCAL_RANK, else from
    SLURM's SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID (srun per rank), else a
    single process.
    """
    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        cpu_runtime.activate()
    rank = launch_rank()
    world_size = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    if not on_cpu:
        # srun --gpus-per-task=1 (or a cgroup per task) shows each rank only its own GPU
        torch.cuda.set_device(local_device_index())
    if not dist.is_initialized():
        if world_size == 1 and "MASTER_ADDR" not in os.environ:
            init_method = f"tcp://127.0.0.1:{_free_port()}"
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
            init_method = "env://"
        dist.init_process_group(
            backend="gloo" if on_cpu else "nccl",
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=30),
        )
    p = cfg.parallel
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline if p.virtual_pipeline > 1 else None,
    )
    seed_everything(cfg.train.seed)
    return torch.device("cpu") if on_cpu else torch.device("cuda", local_device_index())


def seed_everything(seed: int) -> None:
    # Megatron's convention: identical within a TP group for replicated work, offset
    # per TP rank for sharded work (handled by its RNG tracker).
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def shutdown(keep_process_group: bool = False) -> None:
    """Tear down Megatron's groups (and the default group unless ``keep_process_group``).

    ``destroy_model_parallel`` only forgets Megatron's groups; each one still holds its backend
    (gloo: threads and sockets), so a process that builds many Trainers one after the other (the
    tests) would accumulate them. Every group but the default one is destroyed here."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if not dist.is_initialized():
        return
    if keep_process_group:
        world = dist.GroupMember.WORLD
        for group in list(dist.distributed_c10d._world.pg_map):
            if group is not world:
                dist.destroy_process_group(group)
    else:
        dist.destroy_process_group()


def is_logging_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
