"""Optimizer, LR schedule and the GPAS two-stage gradient clip, on Megatron-Core pieces.

Clipping follows the official GPAS code (methods.md §1.5):
  1. one global L2 clip over *all* parameters, gates included, at ``optim.clip_grad``;
  2. then one joint L2 clip over all gates at ``gpas.clip_grad``.
Either is disabled by 0. Norms are Megatron's (``get_grad_norm_fp32`` over the
optimizer's grad-stats group, TP duplicates counted once), so they are exact under
TP/PP/DP and the distributed optimizer. Gates are found through the ``grad_norm_group``
attribute, the only one that survives onto fp32 main params and DistOpt shards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_gpas.config import Config
from megatron_gpas.model.gpas import GATE_GRAD_NORM_GROUP, is_gate, register_gate_grad_norm_group


def build_optimizer(cfg: Config, model_chunks, *, bf16: bool):
    register_gate_grad_norm_group()
    o = cfg.optim
    config = OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.lr * o.min_lr_ratio,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=0.0,  # clipping is ours (two-stage, below)
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, model_chunks)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.lr * o.min_lr_ratio,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=o.decay_steps or cfg.train.steps,
        lr_decay_style="cosine",
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=cfg.train.steps,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


@dataclass
class StepResult:
    updated: bool
    grad_norm: float  # pre-clip L2 norm over all parameters (gates included)
    gate_grad_norm: float  # pre-clip joint L2 norm over all gates
    # post-clip norms, measured again only when asked (an extra reduction; for tests/debugging)
    clipped_grad_norm: float | None = None
    clipped_gate_grad_norm: float | None = None


def clip_coefficient(norm: float, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_'s coefficient: min(1, max / (norm + 1e-6)); 1 when off."""
    if max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (norm + 1e-6))


def _grad_norms(optimizer) -> tuple[float, float]:
    """(norm over all parameters, joint norm over the gates), reduced over the job."""
    main_norm = float(optimizer.get_grad_norm())  # excludes the registered gate group
    gate_norm = 0.0
    if optimizer.has_grad_norm_group(GATE_GRAD_NORM_GROUP):
        gate_norm = float(optimizer._get_grad_norm_for_group(GATE_GRAD_NORM_GROUP))
    return math.sqrt(main_norm**2 + gate_norm**2), gate_norm


@torch.no_grad()
def clipped_step(optimizer, clip_grad: float, gate_clip_grad: float, measure_post_clip: bool = False) -> StepResult:
    """prepare grads → two-stage clip → inner Adam step (+ param all-gather for DistOpt)."""
    if optimizer.prepare_grads():  # inf/nan found by the loss scaler (fp16 only)
        return StepResult(False, float("nan"), float("nan"))
    total_norm, gate_norm = _grad_norms(optimizer)
    if not math.isfinite(total_norm):
        return StepResult(False, total_norm, gate_norm)

    global_coef = clip_coefficient(total_norm, clip_grad)
    gate_coef = global_coef * clip_coefficient(gate_norm * global_coef, gate_clip_grad)
    if global_coef != 1.0 or gate_coef != 1.0:
        for param in optimizer.get_parameters():
            if param.grad is not None:
                param.grad.mul_(gate_coef if is_gate(param) else global_coef)
    result = StepResult(True, total_norm, gate_norm)
    if measure_post_clip:
        result.clipped_grad_norm, result.clipped_gate_grad_norm = _grad_norms(optimizer)
    result.updated = optimizer.step_with_ready_grads()
    return result
