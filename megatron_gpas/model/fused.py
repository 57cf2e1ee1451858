"""GPAS fused into the residual add (``gpas.fused``), and the switch of the fused norms (``norm.fused``).

Unfused, the paper's Pre-LN placement is a residual add followed by the gate, separate passes
over the residual stream forward (s = x + f; a·s; s − a·s) and backward (−g; −g⊙s; Σ). Here each
is one autograd Function, with a = act(α) computed outside it (autograd differentiates the gate
activation and the per-sub-layer index, so every ``gpas.activation`` works unchanged):

    after_add  y = s − a·sg(s),  s = x + f        ∂x = ∂f = g,    ∂a = −Σ g⊙s
    shortcut   y = k·(x − a·sg(x)) + f            ∂x = k·g, ∂f = g, ∂a = −Σ (k·g)⊙x

(x: the shortcut, f: the sub-layer output after bias and dropout, k: DeepNorm's shortcut scale.)
The Functions save only what ∂a needs (s, or x), as the unfused graph does. Their kernels:

    eager    the unfused ops in the same order: bitwise equal to the unfused path
    compile  the same functions through torch.compile: one pass forward (y and s together) and
             one fused product-reduction backward; equal within rounding
    auto     compile on CUDA, eager elsewhere;  none: the unfused modules (gpas.py, sublayer.py)

The gate without stop-gradient (``gpas.stop_gradient=false``) and the placements whose gate is not
directly at an add (before/after the norm, after the branch, after a Post-LN norm) stay unfused.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import torch
from torch.autograd.function import once_differentiable

from megatron_gpas.config import GPAS_FUSED_MODES


def gated_sum(x: torch.Tensor, f: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = x + f
    return s - a * s, s


def gated_shortcut_sum(x: torch.Tensor, f: torch.Tensor, a: torch.Tensor, k: float) -> torch.Tensor:
    y = x - a * x
    if k != 1.0:
        y = y * k
    return y + f


def gate_grad(g: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return -(g * s).sum()


@dataclasses.dataclass(frozen=True)
class GateKernels:
    name: str
    gated_sum: Callable
    gated_shortcut_sum: Callable
    gate_grad: Callable


EAGER = GateKernels("eager", gated_sum, gated_shortcut_sum, gate_grad)


@functools.cache
def compiled_kernels() -> GateKernels:
    """The same functions compiled (on first call, per shape and dtype)."""
    return GateKernels("compile", *(torch.compile(fn, fullgraph=True)
                                    for fn in (gated_sum, gated_shortcut_sum, gate_grad)))


def gate_kernels(mode: str) -> GateKernels | None:
    """The kernels of ``gpas.fused=mode`` (None for none: the unfused path)."""
    if mode == "auto":
        mode = "compile" if torch.cuda.is_available() else "eager"
    if mode == "compile":
        return compiled_kernels()
    if mode not in ("eager", "none"):
        raise ValueError(f"gpas.fused must be one of {', '.join(GPAS_FUSED_MODES)}, got '{mode}'")
    return EAGER if mode == "eager" else None


class GatedSum(torch.autograd.Function):
    """y = s − a·sg(s), s = x + f."""

    @staticmethod
    def forward(ctx, x, f, a, kernels: GateKernels):
        y, s = kernels.gated_sum(x, f, a)
        ctx.kernels = kernels
        ctx.save_for_backward(s if ctx.needs_input_grad[2] else None)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (s,) = ctx.saved_tensors
        return g, g, (ctx.kernels.gate_grad(g, s) if s is not None else None), None


class GatedShortcutSum(torch.autograd.Function):
    """y = k·(x − a·sg(x)) + f."""

    @staticmethod
    def forward(ctx, x, f, a, k: float, kernels: GateKernels):
        ctx.kernels, ctx.k = kernels, k
        ctx.save_for_backward(x if ctx.needs_input_grad[2] else None)
        return kernels.gated_shortcut_sum(x, f, a, k)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        gx = g * ctx.k if ctx.k != 1.0 else g
        return gx, g, (ctx.kernels.gate_grad(gx, x) if x is not None else None), None, None

