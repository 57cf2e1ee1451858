"""Run the real Megatron-Core code on CPU with gloo when no CUDA device is present.

Megatron-Core 0.19.2 assumes CUDA in a small number of places that are not about
computation: it allocates bookkeeping tensors with ``device="cuda"`` or
``torch.cuda.current_device()``, waits on CUDA streams before gradient reduction,
keeps its dropout RNG states in the CUDA generator, and recognises fp32/bf16
parameters by ``tensor.type() == "torch.cuda.FloatTensor"``.  This module bridges
exactly those assumptions so that Megatron-Core's own layers, schedules, DDP,
(distributed) optimizer and dist-checkpointing run unchanged on CPU:

* device placement: ``torch.cuda.current_device()`` is the CPU device, and a torch
  function mode maps every other CUDA device argument (``"cuda"``, ``"cuda:N"``, an
  int index, ``.cuda()``) to the CPU;
* ``torch.cuda.current_device / device_count / synchronize / set_device`` answer
  for one virtual device; streams and events are no-op objects;
* RNG: the CUDA generator calls used by Megatron's RNG tracker operate on the CPU
  default generator, so the tracker's fork/restore semantics stay exact, and so do the
  states activation recomputation (``tensor_parallel.checkpoint``, train.recompute) saves
  in the forward and restores before recomputing (and the CUDA-to-CPU device mapping is put back
  inside those checkpoints, where a function mode is otherwise off);
* ``Tensor.type()`` (no-argument form only) reports ``torch.cuda.*Tensor`` so the
  optimizer's dtype classification works; ``Tensor.type(dtype)`` is untouched.

It is activated by :func:`activate` (called by the trainer when CUDA is absent),
logs once, and does nothing on a CUDA machine.  Limits:

* virtual pipeline parallelism on gloo needs ``batch_p2p_comm=False`` (with the
  default batched isend/irecv, gloo silently mixes up messages); the trainer sets it;
* fp32 only (no BF16/FP8 kernels on CPU), no Transformer Engine, no apex;
* the distributed optimizer falls back to torch's Adam on CPU, whose state Megatron
  cannot reload (it expects FusedAdam's layout): resuming a distributed-optimizer run
  with its optimizer state is a GPU feature; on CPU, checkpoint.load_optimizer=false
  loads the weights only;
* speed: it is for debugging and tests, a few thousand tokens per second.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

_ACTIVE = False
_CPU = torch.device("cpu")


def is_active() -> bool:
    return _ACTIVE


def _is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True  # a bare index means a CUDA ordinal in torch's conventions
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CudaToCpu(TorchFunctionMode):
    """Rewrite CUDA device arguments of any torch call to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        name = getattr(func, "__name__", "")
        if name == "cuda":  # Tensor.cuda(...) / Module buffers
            return args[0]
        if name == "to" and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for torch.cuda.Stream / Event: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _null_stream(*args, **kwargs):
    return _NullStream()


_original_tensor_type = torch.Tensor.type


def _tensor_type(self, dtype=None, non_blocking=False, **kwargs):
    if dtype is None and not kwargs:
        name = _original_tensor_type(self)
        if self.device.type == "cpu" and name.startswith("torch.") and not name.startswith("torch.cuda."):
            return "torch.cuda." + name[len("torch."):]
        return name
    return _original_tensor_type(self, dtype, non_blocking, **kwargs)


def _in_cpu_mode(function):
    """``function`` run with the CUDA-to-CPU function mode on the stack."""

    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        with _CudaToCpu():
            return function(*args, **kwargs)

    return wrapped


def _bridge_activation_checkpoints(mc_random) -> None:
    """Megatron's activation checkpoints (train.recompute) run the checkpointed layers inside a
    custom autograd Function, and again in the backward. A torch function mode is off the stack
    while it handles a call (``Function.apply`` and ``backward`` included), so hard-coded
    ``device="cuda"`` allocations in there (e.g. DotProductAttention's causal mask) would reach
    CUDA: the mode is put back around them."""
    for cls, names in ((mc_random.CheckpointFunction, ("forward", "backward")),
                       (mc_random.CheckpointWithoutOutputFunction, ("forward",))):
        for name in names:
            setattr(cls, name, staticmethod(_in_cpu_mode(getattr(cls, name))))
    # CheckpointWithoutOutput recomputes in a gradient hook, inside the backward
    mc_random.CheckpointWithoutOutput._recompute = _in_cpu_mode(mc_random.CheckpointWithoutOutput._recompute)


def activate(force: bool = False) -> bool:
    """Install the CPU bridge if CUDA is unavailable (or ``force``). Returns whether active."""
    global _ACTIVE
    if _ACTIVE:
        return True
    if torch.cuda.is_available() and not force:
        return False

    cuda = torch.cuda
    # A device object rather than an index: a torch function mode is switched off inside
    # composite calls such as torch.autograd.backward, where Megatron's TP linears
    # allocate with device=torch.cuda.current_device().
    cuda.current_device = lambda: _CPU
    cuda.device_count = lambda: 1
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.is_current_stream_capturing = lambda: False
    cuda.current_stream = _null_stream
    cuda.default_stream = _null_stream
    cuda.stream = _null_stream
    cuda.Stream = _NullStream
    cuda.Event = _NullStream
    cuda.empty_cache = lambda: None
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    # Megatron's RNG tracker keeps named "CUDA" generator states; on CPU they are
    # states of the CPU default generator, which is what CPU dropout draws from.
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None  # torch.manual_seed calls this after seeding the CPU
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    torch.Tensor.type = _tensor_type

    from megatron.core.tensor_parallel import random as mc_random

    mc_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: (
        torch.get_rng_state().clone() if clone else torch.get_rng_state()
    )
    mc_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    _bridge_activation_checkpoints(mc_random)

    _CudaToCpu().__enter__()  # stays on the function-mode stack for the process
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    _ACTIVE = True
    log.warning(
        "No CUDA device: Megatron-Core runs on CPU with gloo (megatron_gpas.cpu_runtime). "
        "fp32 only, no Transformer Engine; meant for debugging and tests."
    )
    return True
