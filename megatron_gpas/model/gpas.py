"""GPAS: Gradient-Preserving Activation Scaling (methods.md §1).

    y = x − act(α) · stopgrad(x)

Forward value (1 − act(α))·x shrinks the residual stream; the backward Jacobian
w.r.t. x is the identity, so gradients pass unchanged. dL/dα = −act'(α)·Σ g⊙x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_gpas.model.norms import mark_sequence_parallel

# Gate activations of the paper's ablation (methods.md §1.2). The GPAS default is SiLU.
ACTIVATIONS = {
    "silu": F.silu,
}

# Megatron-Core optimizer "grad-norm group" for the gates. It is the one parameter
# attribute that survives onto fp32 main params and distributed-optimizer shards,
# which is what lets us clip the gates jointly at their own threshold.
GATE_GRAD_NORM_GROUP = "gpas"


def register_gate_grad_norm_group() -> None:
    import megatron.core.optimizer.optimizer as mcore_optimizer

    if GATE_GRAD_NORM_GROUP not in mcore_optimizer.SEPARATE_GRAD_NORM_GROUPS:
        mcore_optimizer.SEPARATE_GRAD_NORM_GROUPS = (
            *mcore_optimizer.SEPARATE_GRAD_NORM_GROUPS,
            GATE_GRAD_NORM_GROUP,
        )


def is_gate(param: torch.Tensor) -> bool:
    return getattr(param, "grad_norm_group", None) == GATE_GRAD_NORM_GROUP


class GPASGate(nn.Module):
    """One learnable scalar gate α (shape [1], fp32) shared by a layer's sub-layers."""

    def __init__(self, config: TransformerConfig, activation: str = "silu", init: float = 0.0):
        super().__init__()
        self.activation = activation
        self.act = ACTIVATIONS[activation]
        # Created in fp32; in BF16 runs the optimizer keeps an fp32 master copy.
        self.alpha = nn.Parameter(torch.full((1,), float(init), dtype=torch.float32))
        register_gate_grad_norm_group()
        self.alpha.grad_norm_group = GATE_GRAD_NORM_GROUP
        # The residual is sequence-sharded under SP: dL/dα is a partial sum per TP rank.
        mark_sequence_parallel(self, config)

    def scale(self) -> torch.Tensor:
        """The forward multiplier 1 − act(α) (for logging)."""
        return 1.0 - self.act(self.alpha.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.act(self.alpha).to(x.dtype) * x.detach()
