"""Registry of normalization schemes: how one transformer layer places its norms and adds.

A scheme is configured per layer after Megatron has built it (so the global, 1-based
layer number is known). Adding a scheme = one class here (or in its own module) plus
one entry in ``SCHEMES``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatron_gpas.model.residual import ResidualAdd

if TYPE_CHECKING:
    from megatron_gpas.model.layer import NormLayer


class Scheme:
    name: str = ""
    # Transformer Engine may fuse the input norm into the following GEMM
    # (LayerNormLinear) only when the norm is a plain pre-norm feeding that GEMM.
    fusable_input_norm: bool = False

    def configure(self, layer: "NormLayer") -> None:
        raise NotImplementedError


class PreLN(Scheme):
    """Pre-LN (methods.md §2.1), with GPAS after each residual add (§1.3.1) when enabled:

        h  = x + Attn(RMSNorm(x));   h  = GPAS(h)
        x' = h + FFN(RMSNorm(h));    x' = GPAS(x')      (same gate)
    """

    name = "pre"
    fusable_input_norm = True

    def configure(self, layer: "NormLayer") -> None:
        layer.self_attn_bda = ResidualAdd(layer.gpas)
        layer.mlp_bda = ResidualAdd(layer.gpas)


SCHEMES: dict[str, Scheme] = {scheme.name: scheme for scheme in (PreLN(),)}
