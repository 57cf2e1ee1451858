"""Initial weights that do not depend on the parallel layout.

Every random initial value is a function of ``train.seed`` and the global identity of what it
initialises, nothing else: each part of the model draws from a random stream of its own,
seeded from (train.seed, its name),

    embedding      the word embedding (its init method draws from the stream)
    layer <l>      everything built inside transformer layer l (global, 1-based): Megatron's
                   linears in their construction order, then the scheme's own inits (DeepNorm's
                   β-init) — ``NormLayer`` builds the layer inside the stream
    output_layer   the LM head: the only other random init of a GPTModel chunk, so it draws from
                   the stream the chunk's construction starts in (``build_model_chunks``); a
                   scheme's own head init (``head_init_method``) redraws it in ("output_layer",
                   "head_init")
    embedding_transform / head_transform   the schemes' modules after the embedding and before
                   the head (OSP's orthogonal projections)

With one generator running through the build, a pipeline stage (or virtual stage) would draw its
parts from wherever the parts built before it in the same process left the generator: a PP=2
run would start from other weights than a 1-process run. With the streams, 1 process, TP, PP,
VP and DP runs of the same seed start bit-identical
(tests/test_parallel.py), so layouts can be compared from step 0. (Bit-identical on one kind of
machine and software: another CPU or library build may round the draws differently.)

Tensor parallelism: every random weight is drawn whole (the global, unsharded tensor) and each
rank keeps its shard, which is what Megatron's CPU initialisation does
(``use_cpu_initialization``, ``_initialize_affine_weight_cpu``; ``redraw_`` below for the
schemes' own inits). That is also why the model is initialised on the CPU on GPU machines: on
the GPU Megatron draws each rank's shard from a per-TP-rank CUDA generator, so the weights
would depend on TP (and CUDA's generator output on the GPU model). Building on the CPU costs
about 8 s per billion parameters a rank builds (measured on one core: draws, fp32 masters,
copies), so about a minute for an 8B model at every start, resumes included; the weights then
move to the GPU.

Every draw is forked off the default CPU generator, so building a model leaves the caller's
random state untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Callable

import torch

from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu


def stream_seed(seed: int, *identity) -> int:
    """The seed of the stream named ``identity`` under ``train.seed``: a hash, so streams of
    neighbouring seeds or layers are unrelated."""
    digest = hashlib.sha256(repr((int(seed), *identity)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # a non-negative int64


@contextlib.contextmanager
def init_stream(seed: int, *identity):
    """Draws from the default CPU generator inside come from the stream named ``identity``;
    the generator's state outside is restored afterwards."""
    with torch.random.fork_rng(devices=[]):  # CPU only: the CUDA generators are not touched
        torch.default_generator.manual_seed(stream_seed(seed, *identity))
        yield


def seeded_init_method(init_method: Callable, seed: int, *identity) -> Callable:
    """``init_method`` drawing from its own stream (for an init method Megatron calls once)."""

    def init(tensor: torch.Tensor):
        with init_stream(seed, *identity):
            return init_method(tensor)

    return init


@contextlib.contextmanager
def single_threaded():
    """Linear algebra (QR) gives other bits with another number of threads: an init that uses
    it runs on one thread, so it is the same under torchrun (one thread per process) and in one
    process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def redraw_(weight: torch.Tensor, init_method: Callable[[torch.Tensor], None]) -> torch.Tensor:
    """Re-initialise a weight of one of Megatron's parallel linears with ``init_method`` applied
    to the whole (unsharded) tensor, of which this rank keeps its shard: the same values as in
    one process, whatever the TP size.

    The shard's place in the whole is Megatron's (its ``partition_dim`` and ``partition_stride``:
    a SwiGLU fc1 holds interleaved [gate; up] parts)."""
    dim, stride = weight.partition_dim, getattr(weight, "partition_stride", 1)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rows, cols = weight.shape
    rows, cols = (rows * tp, cols) if dim == 0 else (rows, cols * tp)
    _initialize_affine_weight_cpu(weight, rows, cols, weight.shape[dim], dim, init_method, stride,
                                  params_dtype=weight.dtype, skip_set_tensor_parallel_attributes=True)
    return weight
