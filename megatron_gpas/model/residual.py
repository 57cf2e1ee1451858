"""The residual add of a sub-layer, as a drop-in for Megatron's bias-dropout-add.

Megatron's ``TransformerLayer`` calls ``self.self_attn_bda(training, fused)(x_with_bias,
residual, dropout_prob)`` after attention and the same through ``mlp_bda`` after the MLP.
Replacing those two modules is the hook through which every scheme changes what happens
around the residual add, without forking ``TransformerLayer.forward``.
"""

from __future__ import annotations

from torch import nn

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

from megatron_gpas.model.gpas import GPASGate


class ResidualAdd(nn.Module):
    """out = residual + dropout(f(x) + bias), then GPAS if the layer has a gate.

    The gate is owned by the layer (one per layer, shared by its sub-layers); it is
    referenced here without registering it, so its checkpoint key stays unique.
    """

    def __init__(self, gate: GPASGate | None = None):
        super().__init__()
        self._gate = (gate,)  # tuple: not registered as a submodule

    @property
    def gate(self) -> GPASGate | None:
        return self._gate[0]

    def forward(self, training: bool, fused: bool):
        bias_dropout_add = get_bias_dropout_add(training, fused)
        gate = self.gate

        def residual_add(x_with_bias, residual, prob):
            out = bias_dropout_add(x_with_bias, residual, prob)
            return gate(out) if gate is not None else out

        return residual_add
