"""Optimizer, LR schedule and the GPAS two-stage gradient clip, on Megatron-Core pieces.

Two optimizers (``optim.optimizer``):
  * ``adam``: Megatron's Adam(W) on every parameter (the distributed optimizer with
    ``parallel.distributed_optimizer``);
  * ``muon``: Megatron-Core's own Muon (``TensorParallelMuon`` from the emerging-optimizers
    package) on the 2-D hidden matrices, Adam on the embedding, the LM head and every
    1-D/scalar parameter (norm weights, GPAS gates). The routing rule and the Muon
    settings are in docs/muon.md; a parameter can force its route with an
    ``optimizer_route`` attribute ("adam" or "muon").

Clipping follows the official GPAS code (methods.md §1.5):
  1. one global L2 clip over *all* parameters, gates included, at ``optim.clip_grad``;
  2. then one joint L2 clip over all gates at ``gpas.clip_grad``.
Either is disabled by 0. Norms are Megatron's (``get_grad_norm_fp32`` over the
optimizer's grad-stats group, TP duplicates counted once), so they are exact under
TP/PP/DP and the distributed optimizer. Gates are found through the ``grad_norm_group``
attribute, the only one that survives onto fp32 main params and DistOpt shards. With
Muon the optimizer is a chain of the Muon and the Adam optimizer; the clip sees the
parameters of both, so its semantics do not change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.optimizer import (
    OptimizerConfig,
    ParamKey,
    ParamPredicate,
    get_megatron_optimizer,
    get_standard_config_overrides,
)
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.utils import unwrap_model

from megatron_gpas.config import Config, ConfigError
from megatron_gpas.model.gpas import GATE_GRAD_NORM_GROUP, is_gate, register_gate_grad_norm_group
from megatron_gpas.model.schemes import get_scheme

ADAM, MUON = "adam", "muon"
OPTIMIZERS = (ADAM, MUON)
DECAY_STYLES = ("cosine", "linear")  # Megatron's OptimizerParamScheduler styles offered by optim.decay_style
# A parameter attribute that forces its optimizer ("adam" or "muon"), e.g. set by a
# normalization scheme; without it the rule of ``optimizer_route`` decides.
ROUTE_ATTR = "optimizer_route"
# Newton-Schulz matmul precision (emerging_optimizers' fp32_matmul_prec): "medium" runs the
# iteration in bf16 (as OSP and Keller Jordan's Muon), "high" allows TF32, "highest" is fp32.
MATMUL_PRECISIONS = ("medium", "high", "highest")
# TP modes that orthogonalise the whole matrix, so the update does not depend on TP.
# megatron's "blockwise" (its 0.19.2 default) orthogonalises each TP shard on its own.
MUON_TP_MODES = ("duplicated", "distributed")


# --------------------------------------------------------------------------- validation


def _muon_coefficient_types() -> tuple[str, ...] | None:
    """The Newton-Schulz coefficient sets of the installed emerging-optimizers (None without it)."""
    from megatron.core.optimizer.emerging_optimizers import HAVE_EMERGING_OPTIMIZERS, get_supported_coefficient_types

    if not HAVE_EMERGING_OPTIMIZERS:
        return None
    # "custom" needs coefficient sets that megatron's Muon cannot be given
    return tuple(c for c in get_supported_coefficient_types() if c != "custom")


def validate_optimizer(cfg: Config) -> None:
    """The optimizer keys (``optim.optimizer`` and the Muon group); ConfigError naming the key."""
    o = cfg.optim

    def need(cond: bool, msg: str):
        if not cond:
            raise ConfigError(msg)

    need(o.optimizer in OPTIMIZERS, f"optim.optimizer must be one of {', '.join(OPTIMIZERS)}, got '{o.optimizer}'")
    need(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    need(o.decay_style in DECAY_STYLES,
         f"optim.decay_style must be one of {', '.join(DECAY_STYLES)}, got '{o.decay_style}'")
    # the Muon keys are checked whatever the optimizer, so a typo never waits for the switch
    need(o.muon_lr is None or o.muon_lr > 0, f"optim.muon_lr must be positive (or null = optim.lr), got {o.muon_lr}")
    need(o.muon_weight_decay is None or o.muon_weight_decay >= 0,
         f"optim.muon_weight_decay must be >= 0 (or null = optim.weight_decay), got {o.muon_weight_decay}")
    need(0 <= o.muon_momentum < 1, f"optim.muon_momentum must be in [0, 1), got {o.muon_momentum}")
    need(o.muon_ns_steps >= 1, f"optim.muon_ns_steps must be >= 1, got {o.muon_ns_steps}")
    need(o.muon_scale > 0, f"optim.muon_scale must be positive, got {o.muon_scale}")
    need(o.muon_matmul_precision in MATMUL_PRECISIONS,
         f"optim.muon_matmul_precision must be one of {', '.join(MATMUL_PRECISIONS)}, got '{o.muon_matmul_precision}'")
    if o.muon_tp_mode == "blockwise":
        raise ConfigError(
            "optim.muon_tp_mode=blockwise orthogonalises each tensor-parallel shard on its own, so the update "
            "(and, with the √max(m,n) scale, the effective learning rate) changes with parallel.tensor; use "
            "duplicated (whole-matrix Newton-Schulz on every TP rank, the default) or distributed")
    need(o.muon_tp_mode in MUON_TP_MODES,
         f"optim.muon_tp_mode must be one of {', '.join(MUON_TP_MODES)}, got '{o.muon_tp_mode}'")
    coefficients = _muon_coefficient_types()
    need(coefficients is not None or o.optimizer != MUON,
         "optim.optimizer=muon needs the emerging-optimizers package (>= 0.3, Python >= 3.12): "
         "pip install 'emerging-optimizers>=0.3'")
    need(coefficients is None or o.muon_coefficients in coefficients,
         f"optim.muon_coefficients must be one of {', '.join(coefficients or ())}, got '{o.muon_coefficients}'")
    need(o.optimizer != MUON or not cfg.parallel.distributed_optimizer, DISTRIBUTED_MUON_UNSUPPORTED)


# Why parallel.distributed_optimizer is refused with Muon (evidence in docs/muon.md).
DISTRIBUTED_MUON_UNSUPPORTED = (
    "optim.optimizer=muon with parallel.distributed_optimizer=true is not supported: Megatron-Core 0.19.2's "
    "DistributedOptimizer cannot hold Muon (the Muon and Adam states would stay replicated while the gradients "
    "are only reduce-scattered, i.e. training on partial gradients), and its experimental "
    "LayerWiseDistributedOptimizer cannot be built in fp32, the only precision on CPU, so neither its training "
    "nor its resume (a resume bug is reported upstream, Megatron-LM PR #6920) can be tested here. Use "
    "parallel.distributed_optimizer=false (Muon and Adam states replicated over the data-parallel ranks), or "
    "optim.optimizer=adam with the distributed optimizer (docs/muon.md)")


# --------------------------------------------------------------------------- routing


def optimizer_route(param: torch.Tensor) -> str:
    """"muon" or "adam" for one parameter: its ``optimizer_route`` attribute when set, else
    Muon for 2-D weights that are not the embedding or the LM head
    (``is_embedding_or_output_parameter``, set by Megatron's LanguageModule), Adam for the
    rest (norm weights, GPAS gates, any 1-D or scalar parameter). The rule is Megatron's own
    (``_is_nonlinear_or_embedding``) plus the override."""
    route = getattr(param, ROUTE_ATTR, None)
    if route is not None:
        return route
    if param.dim() == 2 and not getattr(param, "is_embedding_or_output_parameter", False):
        return MUON
    return ADAM


def _named_trainable_parameters(model_chunks):
    """(name, parameter) of this rank's trainable parameters; layer parameters carry the
    global 0-based layer index (``decoder.layers.5.…`` on any pipeline stage)."""
    for chunk in model_chunks:
        module = unwrap_model(chunk)
        layer_index = {}
        for layer in module.decoder.layers:
            for param in layer.parameters():
                layer_index[id(param)] = layer.layer_number - 1
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue  # frozen (e.g. gpas.freeze): in no optimizer
            if id(param) in layer_index:
                name = re.sub(r"^decoder\.layers\.\d+\.", f"decoder.layers.{layer_index[id(param)]}.", name)
            yield name, param


def optimizer_routing(model_chunks) -> dict[str, str]:
    """Global parameter name → "muon" or "adam", for the trainable parameters of this rank's
    model chunks (their own pipeline stage). Raises ValueError for an invalid
    ``optimizer_route`` attribute."""
    routes = {}
    for name, param in _named_trainable_parameters(model_chunks):
        route = optimizer_route(param)
        if route not in OPTIMIZERS:
            raise ValueError(f"parameter {name}: {ROUTE_ATTR}={route!r}, expected one of {', '.join(OPTIMIZERS)}")
        if route == MUON and param.dim() != 2:
            raise ValueError(f"parameter {name} ({param.dim()}-D, shape {tuple(param.shape)}) is routed to Muon by "
                             f"its {ROUTE_ATTR} attribute, but Muon orthogonalises matrices: only 2-D parameters")
        routes[name] = route
    return routes


def gather_routing(model_chunks) -> dict[str, tuple[str, int]]:
    """``optimizer_routing`` of the whole model: global name → (route, number of elements),
    pipeline stages gathered, tensor-parallel shards counted at their full size. A
    collective over the pipeline group: every rank calls it."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    routes = optimizer_routing(model_chunks)
    local = [(name, routes[name], param.numel() * (tp if getattr(param, "tensor_model_parallel", False) else 1))
             for name, param in _named_trainable_parameters(model_chunks)]
    stages = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(stages, local, group=parallel_state.get_pipeline_model_parallel_group())
    return {name: (route, numel) for stage in stages for name, route, numel in stage}


def routing_summary(routing: dict[str, tuple[str, int]]) -> str:
    """``[optim] muon: 16 tensors (0.20M params); adam: 15 tensors (0.03M params)``."""
    parts = []
    for route in (MUON, ADAM):
        sizes = [numel for r, numel in routing.values() if r == route]
        parts.append(f"{route}: {len(sizes)} tensors ({sum(sizes) / 1e6:.2f}M params)")
    return "[optim] " + "; ".join(parts)


@contextlib.contextmanager
def _muon_routing_rule():
    """Make Megatron's Muon builder route by ``optimizer_route``.

    Megatron routes Muon/Adam with the ``default_param_overrides`` of its emerging-optimizer
    registry entry ({_is_nonlinear_or_embedding: optimizer=adam}); user config overrides may
    not name an optimizer (check_config_overrides_consistency). The registry entry is the
    extension point it offers (a private name, hence the exact megatron-core pin), so for
    the build we swap in an entry with our rule, which equals Megatron's unless a parameter
    sets ``optimizer_route``. tests/test_muon.py checks the optimizers Megatron then built.
    """
    from megatron.core.optimizer.emerging_optimizers import _EMERGING_OPTIMIZERS

    entry = _EMERGING_OPTIMIZERS[MUON]
    adam_route = ParamPredicate(name="megatron_gpas_adam_route", fn=lambda p: optimizer_route(p) == ADAM)
    _EMERGING_OPTIMIZERS[MUON] = dataclasses.replace(
        entry, default_param_overrides={ParamKey(predicate=adam_route): {"optimizer": ADAM}})
    try:
        yield
    finally:
        _EMERGING_OPTIMIZERS[MUON] = entry


# --------------------------------------------------------------------------- building


def muon_lr(cfg: Config) -> float:
    return cfg.optim.muon_lr if cfg.optim.muon_lr is not None else cfg.optim.lr


def muon_weight_decay(cfg: Config) -> float:
    o = cfg.optim
    return o.muon_weight_decay if o.muon_weight_decay is not None else o.weight_decay


def weight_decay_overrides(cfg: Config, config: OptimizerConfig) -> dict:
    """Megatron's standard overrides (no weight decay on 1-D parameters and biases), or, for a
    scheme whose recipe decays every parameter (norm weights too), only the GPAS gates spared."""
    if not get_scheme(cfg).decays_all_parameters(cfg):
        return get_standard_config_overrides(config)
    return {ParamKey(predicate=ParamPredicate(name="megatron_gpas_gate", fn=is_gate)): {"wd_mult": 0.0}}


def build_optimizer(cfg: Config, model_chunks, *, bf16: bool):
    register_gate_grad_norm_group()
    o = cfg.optim
    config = OptimizerConfig(
        optimizer=o.optimizer,
        lr=o.lr,
        min_lr=o.lr * o.min_lr_ratio,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        decoupled_weight_decay=True,  # AdamW; Muon's decoupled θ ← θ − lr·wd·θ
        clip_grad=0.0,  # clipping is ours (two-stage, below)
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        # Muon (used with optimizer=muon only): OSP's settings by default (docs/muon.md)
        muon_momentum=o.muon_momentum,
        muon_nesterov=o.muon_nesterov,
        muon_coefficient_type=o.muon_coefficients,
        muon_num_ns_steps=o.muon_ns_steps,
        muon_scale_mode="spectral",  # √max(m, n) ...
        muon_extra_scale_factor=o.muon_scale,  # ... × muon_scale
        muon_tp_mode=o.muon_tp_mode,
        muon_split_qkv=o.muon_split_qkv,
        muon_fp32_matmul_prec=o.muon_matmul_precision,
        muon_scalar_optimizer=ADAM,
    )
    overrides = weight_decay_overrides(cfg, config)
    if o.optimizer == MUON:
        optimizer_routing(model_chunks)  # invalid optimizer_route attributes fail here, by name
        # plus the Muon group's own peak/min LR and weight decay; the scheduler reads them per group
        muon_route = ParamPredicate(name="megatron_gpas_muon_route", fn=lambda p: optimizer_route(p) == MUON)
        overrides[ParamKey(predicate=muon_route)] = {
            "max_lr": muon_lr(cfg), "min_lr": muon_lr(cfg) * o.min_lr_ratio,
            "start_wd": muon_weight_decay(cfg), "end_wd": muon_weight_decay(cfg),
        }
        with _muon_routing_rule():
            optimizer = get_megatron_optimizer(config, model_chunks, config_overrides=overrides)
    else:
        optimizer = get_megatron_optimizer(config, model_chunks, config_overrides=overrides)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.lr * o.min_lr_ratio,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=o.decay_steps or cfg.train.steps,
        lr_decay_style=o.decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=cfg.train.steps,
        wd_incr_style="constant",
        # on resume: this config's schedule, or (default) the checkpoint's; the trainer says which
        override_opt_param_scheduler=o.override_schedule,
        use_checkpoint_opt_param_scheduler=not o.override_schedule,
    )
    return optimizer, scheduler


def lr_schedule(cfg: Config) -> dict[str, float]:
    """The LR schedule a config asks for, keyed by the config keys that set it."""
    o = cfg.optim
    return {"optim.lr": o.lr, "optim.min_lr_ratio": o.min_lr_ratio, "optim.warmup_steps": o.warmup_steps,
            "optim.decay_steps (else train.steps)": o.decay_steps or cfg.train.steps, "optim.decay_style": o.decay_style}


# Parameter-group values that come from the LR/WD schedule (optim.lr, min_lr_ratio, weight decay)
# rather than from the model: Megatron identifies saved groups by them, among others.
SCHEDULE_GROUP_KEYS = ("max_lr", "min_lr", "start_wd", "end_wd")


def _saved_group_lists(state) -> list[list[dict]]:
    """The ``param_groups`` lists of a loaded optimizer state dict, in the chained optimizers' order."""
    if isinstance(state, dict):
        if isinstance(state.get("param_groups"), list):
            return [state["param_groups"]]
        keys = sorted(state, key=lambda k: (not isinstance(k, int), str(k)))
        return [groups for k in keys for groups in _saved_group_lists(state[k])]
    return []


def align_param_groups(saved_state, optimizer) -> list[dict] | None:
    """Let a checkpoint's optimizer state load although the schedule changed.

    Megatron finds each saved parameter group by values that include its max/min LR and weight
    decay, so a resume with another optim.lr fails ("Could not find parameter group"). The groups
    are built in the same order from the same model, so the saved group i is the current group i:
    its schedule values are set to the current ones here; returns the saved ones for
    ``restore_schedule`` (None when the state holds no groups to align)."""
    saved_lists = _saved_group_lists(saved_state)
    current_lists = [opt.optimizer.param_groups for opt in getattr(optimizer, "chained_optimizers", [optimizer])
                     if hasattr(opt, "optimizer")]
    if not saved_lists:
        return None
    if [len(g) for g in saved_lists] != [len(g) for g in current_lists]:
        raise ConfigError(f"the checkpoint's optimizer has parameter groups {[len(g) for g in saved_lists]} but this "
                          f"run's has {[len(g) for g in current_lists]}: another optimizer setup (weight decay "
                          "split, optim.optimizer); resume with checkpoint.load_optimizer=false")
    saved_values = []
    for saved_groups, current_groups in zip(saved_lists, current_lists):
        for saved, current in zip(saved_groups, current_groups):
            saved_values.append({k: saved[k] for k in SCHEDULE_GROUP_KEYS if k in saved})
            saved.update({k: current[k] for k in SCHEDULE_GROUP_KEYS if k in current})
    return saved_values


def restore_schedule(optimizer, saved_values: list[dict]) -> None:
    """Put the checkpoint's schedule values back into the loaded groups (the default on resume:
    the run continues the schedule it was trained with; optim.override_schedule skips this)."""
    current = [group for opt in getattr(optimizer, "chained_optimizers", [optimizer]) if hasattr(opt, "optimizer")
               for group in opt.optimizer.param_groups]
    for group, values in zip(current, saved_values):
        group.update(values)


@dataclass
class StepResult:
    updated: bool
    grad_norm: float  # pre-clip L2 norm over all parameters (gates included)
    gate_grad_norm: float  # pre-clip joint L2 norm over all gates
    # post-clip norms, measured again only when asked (an extra reduction; for tests/debugging)
    clipped_grad_norm: float | None = None
    clipped_gate_grad_norm: float | None = None
    skip_reason: str | None = None  # why the update was not applied (None when it was)


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
    """prepare grads → two-stage clip → inner optimizer step(s) (+ param all-gather for DistOpt)."""
    if optimizer.prepare_grads():  # inf/nan found by the loss scaler (fp16 only)
        return StepResult(False, float("nan"), float("nan"), skip_reason="inf/nan found by the loss scaler")
    total_norm, gate_norm = _grad_norms(optimizer)
    if not math.isfinite(total_norm):
        return StepResult(False, total_norm, gate_norm, skip_reason=f"non-finite gradient norm {total_norm}")

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
    if not result.updated:
        result.skip_reason = "the optimizer skipped the update"
    return result
