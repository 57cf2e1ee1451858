"""Weights kept on the unit sphere: ``w ← w / ‖w‖`` along one axis, at init and after every
optimizer step (nGPT's ``normalize_matrices``), on the fp32 master weights and then the model's.

A scheme declares the weights and their axis (``Scheme.unit_norm_axes``: the axis that is
reduced, the d_model axis). Megatron's parallel weights hold whole vectors along it on every TP
rank (column-parallel ``[out/tp, d]`` and vocab-parallel ``[V/tp, d]`` reduce over axis 1,
row-parallel ``[d, in/tp]`` over axis 0), so TP and PP need no communication. Where the weights
are updated is the optimizer's business:

  FP32Optimizer                      the model parameters are the optimizer's
  Float16OptimizerWithFloat16Params  fp32 ``fp32_from_float16_groups`` beside the 16-bit model
                                     parameters (``float16_groups``), copied to them after
  DistributedOptimizer               each DP rank holds a flat range of every parameter's fp32
                                     copy (``_get_model_param_range_map``), which can split a row:
                                     the per-vector sums of squares of the owned elements are
                                     all-reduced over the optimizer's data-parallel group, then the
                                     owned elements scaled, copied into the parameter buffer and
                                     all-gathered (as Megatron does after its step)

The norms are computed in fp32 (float64 for float64 weights).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


@torch.no_grad()
def normalize_(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """w ← w / ‖w‖₂ along ``axis``, computed in fp32 (at least) and cast back."""
    w = weight.to(torch.promote_types(weight.dtype, torch.float32))
    weight.copy_(w / w.norm(dim=axis, keepdim=True))
    return weight


def _vector_index(shape: torch.Size, axis: int, start: int, numel: int, device) -> torch.Tensor:
    """For the elements [start, start + numel) of a flattened 2-D weight, the vector (along
    ``axis``) each one belongs to: its row for axis 1, its column for axis 0."""
    flat = torch.arange(start, start + numel, device=device)
    return flat // shape[1] if axis == 1 else flat % shape[1]


@torch.no_grad()
def _project_flat_shards(pieces: list[tuple[torch.Size, int, torch.Tensor | None, int]], group) -> None:
    """``pieces``: (weight shape, axis, this rank's flat fp32 range or None, its start) for the same
    weights in the same order on every rank of ``group``: one all-reduce of all partial sums
    (float64, on the GPU where there is one: every rank, owner or not, takes part)."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    sums = []
    for shape, axis, shard, start in pieces:
        part = torch.zeros(shape[1 - axis], dtype=torch.float64, device=device)
        if shard is not None:
            part.index_add_(0, _vector_index(shape, axis, start, shard.numel(), device), shard.double().pow(2))
        sums.append(part)
    total = torch.cat(sums) if sums else torch.zeros(0, dtype=torch.float64, device=device)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(total, group=group)
    for (shape, axis, shard, start), norms in zip(pieces, total.split([len(part) for part in sums])):
        if shard is not None:
            index = _vector_index(shape, axis, start, shard.numel(), device)
            shard.copy_(shard.double() / norms.sqrt()[index])


def _inner_optimizers(optimizer):
    return getattr(optimizer, "chained_optimizers", None) or [optimizer]


@torch.no_grad()
def project_unit_norm(optimizer, axes: dict[torch.nn.Parameter, int]) -> None:
    """Project every weight of ``axes`` (parameter → reduced axis, the same order on every rank) to
    unit norm in the optimizer's master copy and then in the model."""
    if not axes:
        return
    for opt in _inner_optimizers(optimizer):
        if getattr(opt, "is_stub_optimizer", False):  # no parameters of its kind here (frozen sub-models)
            continue
        if hasattr(opt, "model_param_gbuf_map"):  # DistributedOptimizer
            owned = {}
            for model_group, main_group in zip(opt.model_float16_groups + opt.model_fp32_groups,
                                               opt.shard_fp32_from_float16_groups + opt.shard_fp32_groups):
                for model_param, main in zip(model_group, main_group):
                    owned[model_param] = (main.view(-1), opt._get_model_param_range_map(model_param)["param"].start)
            # every weight of the optimizer's buffers, owned here or not: the same list on every rank
            managed = {param for buffer in opt.buffers for param in buffer.param_index_map}
            pieces = [(p.shape, axis, *owned.get(p, (None, 0))) for p, axis in axes.items() if p in managed]
            _project_flat_shards(pieces, opt.data_parallel_group)
            opt._copy_main_params_to_model_params()
            if not opt.ddp_config.overlap_param_gather:  # else the next forward gathers them
                opt.start_param_sync_for_bucket_group_subset()
        elif hasattr(opt, "float16_groups"):  # Float16OptimizerWithFloat16Params
            pairs = [(m, main) for mg, fg in zip(opt.float16_groups, opt.fp32_from_float16_groups) for m, main in zip(mg, fg)]
            pairs += [(p, p) for group in opt.fp32_from_fp32_groups for p in group]
            for model_param, main in pairs:
                if model_param in axes:
                    normalize_(main, axes[model_param])
            opt._copy_main_params_to_model_params()
        else:  # FP32Optimizer: the model parameters are the master weights
            for group in opt.param_groups:
                for param in group["params"]:
                    if param in axes:
                        normalize_(param, axes[param])
