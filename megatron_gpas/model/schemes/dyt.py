"""DyT, Dynamic Tanh (Zhu, Chen, He, LeCun, Liu, 2025; methods.md §5.2), its Llama variant.

    x' = x + f(DyT(x)),  DyT(x) = γ ⊙ tanh(α·x),  one learnable scalar α per norm (final too)
    x_0 = s · E[tokens],  s a learnable scalar initialised to √d

α starts at α0, with separate values for the attention, MLP and final norms (DyT's
``attn/ffn/dec_alpha_init_value``). DyT's README gives them by model width (7B 0.8/0.2/0.2,
13B 0.6/0.15/0.15, 34B and 70B 0.2/0.05/0.05); other widths must set ``norm.options.alpha0``.
With the embedding scale, the embedding is initialised with std d^-½ so that s·E has unit RMS
at init [inferred from the √d init; DyT's Llama code was not available], unless
``norm.options.embedding_init_std`` says otherwise.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from megatron_gpas.config import ConfigError
from megatron_gpas.model.norms import DynamicTanh, mark_sequence_parallel
from megatron_gpas.model.schemes.base import NORM_POSITIONS, ExportPlan, Scheme, pre_norm

# DyT README's α0 (attention, MLP, final) by hidden size (Llama 2 7B, 13B, 34B/70B).
ALPHA0_BY_WIDTH = {4096: (0.8, 0.2, 0.2), 5120: (0.6, 0.15, 0.15), 8192: (0.2, 0.05, 0.05)}


@dataclasses.dataclass
class DyTOptions:
    alpha0: list[float] | None = None  # [attention, MLP, final]; None = DyT's table by hidden size
    embedding_scale: bool = True  # learnable scalar on the embedding output, init √d
    embedding_init_std: float | None = None  # None = d^-½ with the embedding scale, else model.embedding_init_std


class EmbeddingScale(nn.Module):
    """x ↦ s·x with one learnable scalar s (DyT's ``shared_scale``)."""

    def __init__(self, config, init: float):
        super().__init__()
        self.scale = nn.Parameter(torch.full((1,), float(init), dtype=config.params_dtype))
        mark_sequence_parallel(self, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.to(x.dtype)


class DyT(Scheme):
    name = "dyt"
    summary = "x' = x + f(γ⊙tanh(α·x)); x_0 = s·E[t], s init √d"
    Options = DyTOptions

    def alpha0(self, cfg) -> tuple[float, float, float]:
        given = self.options(cfg.norm).alpha0
        return tuple(given) if given is not None else ALPHA0_BY_WIDTH[cfg.model.hidden_size]

    def check(self, cfg, opts):
        if opts.alpha0 is None and cfg.model.hidden_size not in ALPHA0_BY_WIDTH:
            widths = ", ".join(f"{w}: {list(a)}" for w, a in ALPHA0_BY_WIDTH.items())
            raise ConfigError(
                f"norm.scheme=dyt needs its initial α per position for hidden size {cfg.model.hidden_size}: set "
                f"norm.options.alpha0=[attention, mlp, final]. DyT's README gives them only for widths {widths} "
                "(its code defaults to 1.0; smaller models are usually trained with larger α0)")
        if opts.alpha0 is not None and (len(opts.alpha0) != 3 or min(opts.alpha0) <= 0):
            raise ConfigError(f"norm.options.alpha0 must be three positive numbers [attention, mlp, final], "
                              f"got {opts.alpha0}")

    def norm_module(self, cfg, position):
        return DynamicTanh, {"alpha0": self.alpha0(cfg)[NORM_POSITIONS.index(position)]}

    def configure_layer(self, layer, cfg):
        for sublayer, norm, residual in layer.sublayers():
            pre_norm(layer, sublayer, norm, residual)

    def embedding_init_std(self, cfg) -> float:
        opts = self.options(cfg.norm)
        if opts.embedding_init_std is not None:
            return opts.embedding_init_std
        return cfg.model.hidden_size ** -0.5 if opts.embedding_scale else cfg.model.embedding_init_std

    def transformer_config_overrides(self, cfg) -> dict:
        return {"embedding_init_method_std": self.embedding_init_std(cfg)}

    def embedding_transform(self, cfg, config):
        if not self.options(cfg.norm).embedding_scale:
            return None
        return EmbeddingScale(config, math.sqrt(cfg.model.hidden_size))

    def architecture(self, cfg) -> dict:
        arch = super().architecture(cfg)
        arch["norm.options.alpha0"] = list(self.alpha0(cfg))  # the table's value when not given
        arch.pop("norm.options.embedding_init_std")  # an init, not the network
        return arch

    def export_plan(self, cfg) -> ExportPlan:
        return ExportPlan(llama_reason="DyT replaces the norms by γ⊙tanh(α·x), which no stock Llama computes",
                          hf_fields={"norm_type": "dyt"})


DYT_SCHEMES = (DyT(),)
