"""The two slots around each sub-layer that a normalization scheme configures.

Megatron's ``TransformerLayer`` runs each sub-layer f (attention, then MLP) as

    y, r = norm_slot(x)                 # input_layernorm / pre_mlp_layernorm; r = x unless the slot says otherwise
    x'   = residual_slot(f(y), r)       # self_attn_bda / mlp_bda

``SublayerNorm`` fills the first slot and ``ResidualAdd`` the second. Every scheme in
``schemes.py`` is a setting of their few fields; the trainer never sees the difference.
Both are homogeneous across layers (same parameters in every layer, whatever a layer's
role, e.g. in Mix-LN), which keeps dist-checkpointing's stacked layer keys and resharding
working.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

from megatron_gpas.model.fused import GatedShortcutSum, GatedSum, GateKernels
from megatron_gpas.model.gpas import GPASGate


class _GateRef:
    """An unregistered reference to the layer's gate (the layer owns it), plus where to apply it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)  # cooperative: the module class that follows in the MRO
        self._gate: tuple[GPASGate | None] = (None,)
        self.gate_position: str | None = None
        self.sublayer = 0  # 0 = attention, 1 = MLP (selects the gate when there is one per sub-layer)

    def attach_gate(self, gate: GPASGate | None, position: str | None, sublayer: int) -> None:
        self._gate = (gate,)
        self.gate_position = position if gate is not None else None
        self.sublayer = sublayer

    def gated(self, position: str, x: torch.Tensor) -> torch.Tensor:
        gate = self._gate[0]
        if gate is None or self.gate_position != position:
            return x
        return gate(x, self.sublayer)


class SublayerNorm(_GateRef):
    """The norm slot in front of a sub-layer, mixed into a norm class (``sublayer_norm``),
    with the options the schemes need:

    deferred      Post-LN: pass x through unchanged; ``ResidualAdd`` normalizes after the add.
    output_scale  LNS (fixed multiplier): Norm(x) · output_scale.
    gate positions handled here: ``before_sublayer`` (the residual stream itself is scaled
    before the sub-layer: both the shortcut and the norm input) and ``after_norm``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)  # the gate reference, then the norm class
        self.deferred = False
        self.output_scale = 1.0

    def forward(self, x: torch.Tensor):
        if self.deferred:
            return x
        residual = self.gated("before_sublayer", x)
        y = super().forward(residual)
        if self.output_scale != 1.0:
            y = y * self.output_scale
        y = self.gated("after_norm", y)
        # Megatron's sanctioned way to replace the residual: return (normed, residual).
        return (y, residual) if residual is not x else y

    def normalize_after_add(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


@functools.cache
def sublayer_norm(norm_cls: type) -> type:
    """The slot class for ``norm_cls`` (e.g. ``SublayerRMSNorm``): its parameters keep the norm's
    own names, so checkpoint keys do not depend on the slot."""
    return type(f"Sublayer{norm_cls.__name__}", (SublayerNorm, norm_cls), {"__module__": __name__})


class ResidualAdd(_GateRef, nn.Module):
    """Drop-in for Megatron's bias-dropout-add: out = shortcut + dropout(branch), and around it

    branch_norm     Sandwich-LN: a norm on the sub-layer output before the add (registered).
    branch_map      a parameter-free map of the sub-layer output before the add (e.g. the
                    zero-mean reparameterisation of Pre-(C)RMSNorm's output projections).
    shortcut_scale  DeepNorm's α: the shortcut is scaled before the add.
    post_norm       Post-LN: the layer's deferred SublayerNorm, applied after the add.
    gate positions handled here: ``after_add`` (GPAS on the sum, the paper's Pre-LN placement),
    ``shortcut`` (GPAS on the shortcut only, the paper's DeepNorm/Post placement) and
    ``after_branch`` (on the sub-layer output). With ``gate_kernels`` (gpas.fused) the first two
    are computed together with the add (model/fused.py).
    """

    def __init__(self):
        super().__init__()
        self.branch_norm: nn.Module | None = None
        self.branch_map: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.shortcut_scale = 1.0
        self._post_norm: tuple[SublayerNorm | None] = (None,)
        self.gate_kernels: GateKernels | None = None  # gpas.fused (set by the builder); None: unfused

    def normalize_after_add(self, norm: SublayerNorm) -> None:
        norm.deferred = True
        self._post_norm = (norm,)

    def fused_gate(self) -> str | None:
        """The gate position computed together with the add (fused.py), if any."""
        gate = self._gate[0]
        if self.gate_kernels is None or gate is None or not gate.stop_gradient:
            return None
        if self.gate_position == "shortcut" or (self.gate_position == "after_add" and self._post_norm[0] is None):
            return self.gate_position
        return None

    def forward(self, training: bool, fused: bool):
        bias_dropout_add = get_bias_dropout_add(training, fused)

        def residual_add(branch_with_bias, shortcut, dropout_prob):
            branch, bias = branch_with_bias
            if self.branch_norm is not None:
                branch, bias = self.branch_norm(branch if bias is None else branch + bias), None
            if self.branch_map is not None:
                branch, bias = self.branch_map(branch if bias is None else branch + bias), None
            if self.gate_position == "after_branch":
                branch, bias = self.gated("after_branch", branch if bias is None else branch + bias), None
            fused_gate = self.fused_gate()
            if fused_gate is None:
                shortcut = self.gated("shortcut", shortcut)
                if self.shortcut_scale != 1.0:
                    shortcut = shortcut * self.shortcut_scale
                out = bias_dropout_add((branch, bias), shortcut, dropout_prob)
            else:
                # what bias-dropout-add does to the branch, then the add and the gate in one operator
                branch = bias_dropout(branch, bias, shortcut.dtype, dropout_prob, training)
                a = self._gate[0].multiplier(self.sublayer, shortcut.dtype)
                if fused_gate == "after_add":
                    return GatedSum.apply(shortcut, branch, a, self.gate_kernels)
                out = GatedShortcutSum.apply(shortcut, branch, a, self.shortcut_scale, self.gate_kernels)
            post_norm = self._post_norm[0]
            if post_norm is not None:
                out = post_norm.normalize_after_add(out)
            return self.gated("after_add", out)

        return residual_add


def bias_dropout(branch: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, prob: float,
                 training: bool) -> torch.Tensor:
    """dropout(branch + bias) in the residual's dtype, as Megatron's bias-dropout-add computes it."""
    branch = branch.to(dtype)
    if bias is not None:
        branch = branch + bias.to(dtype)
    return torch.nn.functional.dropout(branch, p=prob, training=training)
