"""OSP, Outlier-Safe Pre-Training (Park et al., ACL 2025; methods.md §4).

    x' = x + f(SSNorm(x)),  SSNorm(x) = g · x / sqrt(mean(x²) + ε)   one scalar g per norm (final too)
    x_0 = R₁ · E[tokens]                     EmbProj after the embedding
    logits = W_out · R₂ · SSNorm(x_L)        and before the LM head

R₁, R₂ are d×d matrices with an orthogonal init and no bias. They are plain 2-D weights
(replicated over TP), so the Muon optimizer (``optim.optimizer=muon``, OSP's third part) takes
them, while the embedding and head go to Adam. After training, R₁ merges into the embedding
and R₂ into the head, and g into a per-channel RMSNorm weight: a stock Llama
(tools/convert_to_hf.py). ``norm.options`` switch each part off for OSP's ablations.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from megatron_gpas.model.norms import RMSNorm, ScalarRMSNorm, mark_sequence_parallel
from megatron_gpas.model.schemes.base import ExportPlan, Scheme, orthogonal_, pre_norm


@dataclasses.dataclass
class OSPOptions:
    single_scale: bool = True  # SSNorm: one scalar per norm (false: per-channel RMSNorm)
    embedding_projection: bool = True  # EmbProj: R₁ after the embedding, R₂ before the head


class Projection(nn.Module):
    """y = R·x with a d×d weight replicated over TP ranks (orthogonal init, no bias; the
    builder draws it from the random stream of its place, the same on every rank)."""

    def __init__(self, config, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(width, width, dtype=config.params_dtype))
        orthogonal_(self.weight.data)
        mark_sequence_parallel(self, config)  # tokens are split over TP ranks under SP

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class OSP(Scheme):
    name = "osp"
    summary = "x' = x + f(SSNorm(x)); x_0 = R₁·E[t]; logits = W·R₂·SSNorm(x_L)"
    Options = OSPOptions

    def norm_module(self, cfg, position):
        return (ScalarRMSNorm if self.options(cfg.norm).single_scale else RMSNorm), {}

    def configure_layer(self, layer, cfg):
        for sublayer, norm, residual in layer.sublayers():
            pre_norm(layer, sublayer, norm, residual)

    def embedding_transform(self, cfg, config):
        if not self.options(cfg.norm).embedding_projection:
            return None
        return Projection(config, cfg.model.hidden_size)

    def head_transform(self, cfg, config):
        if not self.options(cfg.norm).embedding_projection:
            return None
        return Projection(config, cfg.model.hidden_size)

    def te_final_norm(self, cfg) -> bool:
        return not self.options(cfg.norm).single_scale

    def export_plan(self, cfg) -> ExportPlan:
        return ExportPlan(llama_reason=None, hf_fields={"norm_type": "rmsnorm"})  # g → per-channel, R₁/R₂ merged


OSP_SCHEMES = (OSP(),)
