"""Weights kept on (or inside) the unit sphere: every vector along one axis rescaled to norm 1
(nGPT's ``normalize_matrices``) or to norm ≤ 1 (anGPT's constraint, ``clamp``: a vector already
inside is left as it is), at init and after every optimizer step, on the fp32 master weights and
then the model's.

A scheme declares the weights and their axis (``Scheme.unit_norm_axes``: the axis that is
reduced). A vector is cut apart in two ways:

  tensor parallelism      when the reduced axis is the one TP shards (a row-parallel weight's
                          input axis, ``partition_dim``): its sums of squares are all-reduced over
                          the TP group. nGPT reduces the d_model axis, which TP never shards.
  the optimizer's copy    FP32Optimizer: the model parameters are the optimizer's;
                          Float16OptimizerWithFloat16Params: fp32 ``fp32_from_float16_groups``
                          beside the 16-bit model parameters, copied to them after;
                          DistributedOptimizer: each DP rank holds a flat range of every
                          parameter's fp32 copy (``_get_model_param_range_map``), which can split
                          a vector: the per-vector partial sums are all-reduced over its
                          data-parallel group, then the owned elements scaled, copied into the
                          parameter buffer and all-gathered (as Megatron does after its step).

The sums of squares are float64 (one all-reduce per group for all weights), the scaling is
computed in float64 and cast back.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from megatron.core import parallel_state


@dataclasses.dataclass
class Piece:
    """This rank's part of one weight: ``values`` (a flat view, or None where the rank owns none of
    it) starting at flat index ``start``; ``tp_split``: its vectors are cut by tensor parallelism."""

    shape: torch.Size
    axis: int
    values: torch.Tensor | None
    start: int
    tp_split: bool

    @property
    def whole(self) -> bool:
        return self.values is not None and self.start == 0 and self.values.numel() == self.shape.numel()

    def vector_index(self) -> torch.Tensor:
        """The vector (along ``axis``) each owned element belongs to: its row for axis 1, its column for axis 0."""
        flat = torch.arange(self.start, self.start + self.values.numel(), device=self.values.device)
        return flat // self.shape[1] if self.axis == 1 else flat % self.shape[1]

    def sums_of_squares(self, device) -> torch.Tensor:
        sums = torch.zeros(self.shape[1 - self.axis], dtype=torch.float64, device=device)
        if self.whole:
            sums += self.values.view(self.shape).double().pow(2).sum(dim=self.axis).to(device)
        elif self.values is not None:
            sums.index_add_(0, self.vector_index().to(device), self.values.double().pow(2).to(device))
        return sums

    def rescale_(self, norms: torch.Tensor) -> None:
        if self.values is None:
            return
        norms = norms.to(self.values.device)
        if self.whole:
            matrix = self.values.view(self.shape)
            matrix.copy_(matrix.double() / norms.unsqueeze(self.axis))
        else:
            self.values.copy_(self.values.double() / norms[self.vector_index()])


def is_tp_split(param: torch.Tensor, axis: int) -> bool:
    """Does tensor parallelism shard ``param`` along the reduced ``axis``?"""
    return bool(getattr(param, "tensor_model_parallel", False)) and getattr(param, "partition_dim", -1) == axis


def _tensor_parallel_group():
    return parallel_state.get_tensor_model_parallel_group() if parallel_state.model_parallel_is_initialized() else None


def _all_reduce(tensor: torch.Tensor, group) -> None:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, group=group)


@torch.no_grad()
def project_pieces(pieces: list[Piece], dp_group, tp_group, clamp: bool) -> None:
    """``pieces``: the same weights in the same order on every rank of both groups (every rank takes
    part in the all-reduces, owner or not). Each vector ← vector / ‖vector‖, or / max(1, ‖vector‖)."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    sums = [piece.sums_of_squares(device) for piece in pieces]
    if not sums:
        return
    total = torch.cat(sums)
    _all_reduce(total, dp_group)
    per_piece = list(total.split([len(s) for s in sums]))
    split = [i for i, piece in enumerate(pieces) if piece.tp_split]
    if split and tp_group is not None and dist.get_world_size(tp_group) > 1:
        across = torch.cat([per_piece[i] for i in split])
        dist.all_reduce(across, group=tp_group)
        for i, part in zip(split, across.split([len(per_piece[i]) for i in split])):
            per_piece[i] = part
    for piece, squares in zip(pieces, per_piece):
        norms = squares.sqrt()
        piece.rescale_(norms.clamp(min=1.0) if clamp else norms)


@torch.no_grad()
def normalize_weights_(axes: dict[torch.Tensor, int], clamp: bool = False) -> None:
    """Project model weights in place (the builder's init: no optimizer yet)."""
    pieces = [Piece(p.shape, axis, p.data.view(-1), 0, is_tp_split(p, axis)) for p, axis in axes.items()]
    project_pieces(pieces, None, _tensor_parallel_group(), clamp)


def _inner_optimizers(optimizer):
    return getattr(optimizer, "chained_optimizers", None) or [optimizer]


def shard_ranges(opt) -> dict:
    """A DistributedOptimizer's shards on this rank: {model parameter: (its flat fp32 master shard,
    start, end)}, [start, end) the owned range within the parameter (and within its gradient buffer)."""
    owned = {}
    for model_group, main_group in zip(opt.model_float16_groups + opt.model_fp32_groups,
                                       opt.shard_fp32_from_float16_groups + opt.shard_fp32_groups):
        for model_param, main in zip(model_group, main_group):
            r = opt._get_model_param_range_map(model_param)["param"]
            owned[model_param] = (main.view(-1), r.start, r.end)
    return owned


@torch.no_grad()
def project_unit_norm(optimizer, axes: dict[torch.nn.Parameter, int], clamp: bool = False) -> None:
    """Project every weight of ``axes`` (parameter → reduced axis, the same order on every rank) in
    the optimizer's master copy and then in the model: to unit norm, or (``clamp``) into the unit ball."""
    if not axes:
        return
    tp_group = _tensor_parallel_group()
    for opt in _inner_optimizers(optimizer):
        if getattr(opt, "is_stub_optimizer", False):  # no parameters of its kind here (frozen sub-models)
            continue
        if hasattr(opt, "model_param_gbuf_map"):  # DistributedOptimizer
            owned = {param: (main, start) for param, (main, start, _) in shard_ranges(opt).items()}
            # every weight of the optimizer's buffers, owned here or not: the same list on every rank
            managed = {param for buffer in opt.buffers for param in buffer.param_index_map}
            pieces = [Piece(p.shape, axis, *owned.get(p, (None, 0)), is_tp_split(p, axis))
                      for p, axis in axes.items() if p in managed]
            project_pieces(pieces, opt.data_parallel_group, tp_group, clamp)
            opt._copy_main_params_to_model_params()
            if not opt.ddp_config.overlap_param_gather:  # else the next forward gathers them
                opt.start_param_sync_for_bucket_group_subset()
        else:
            if hasattr(opt, "float16_groups"):  # Float16OptimizerWithFloat16Params
                pairs = [(m, main) for mg, fg in zip(opt.float16_groups, opt.fp32_from_float16_groups)
                         for m, main in zip(mg, fg)]
                pairs += [(p, p) for group in opt.fp32_from_fp32_groups for p in group]
            else:  # FP32Optimizer: the model parameters are the master weights
                pairs = [(p, p) for group in opt.param_groups for p in group["params"]]
            # in ``axes`` order: the TP all-reduce pairs the same weights on every rank
            mains = {model_param: main for model_param, main in pairs}
            pieces = [Piece(p.shape, axis, mains[p].data.view(-1), 0, is_tp_split(p, axis))
                      for p, axis in axes.items() if p in mains]
            project_pieces(pieces, None, tp_group, clamp)
            if hasattr(opt, "float16_groups"):
                opt._copy_main_params_to_model_params()
