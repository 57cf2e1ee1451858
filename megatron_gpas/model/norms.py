"""Normalization modules used by the layer specs."""

from __future__ import annotations

import torch
from torch import nn

from megatron.core.transformer.transformer_config import TransformerConfig


def mark_sequence_parallel(module: nn.Module, config: TransformerConfig) -> None:
    """Tag every parameter of a TP-replicated module for the SP gradient all-reduce.

    Under sequence parallelism each TP rank sees only its slice of the tokens, so the
    gradient of a replicated parameter is a partial sum that Megatron's
    ``finalize_model_grads`` must SUM over TP. It only does that for parameters that
    carry ``sequence_parallel=True``; a missing tag trains silently wrong.
    """
    for param in module.parameters():
        setattr(param, "sequence_parallel", config.sequence_parallel)


class RMSNorm(nn.Module):
    """RMSNorm as in Llama: y = w ⊙ x / sqrt(mean(x²) + eps), statistics in fp32.

    Called by Megatron as ``RMSNorm(config=, hidden_size=, eps=)``; correct under
    sequence parallelism (the weight is tagged, see ``mark_sequence_parallel``).
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        mark_sequence_parallel(self, config)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * self.normalize(x)
