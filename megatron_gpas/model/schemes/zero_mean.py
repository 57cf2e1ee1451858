"""Pre-RMSNorm and Pre-CRMSNorm (Jiang et al., NeurIPS 2023; methods.md §3): the exact
equivalents of Pre-LN with LayerNorm.

LayerNorm(x) = LayerNorm(x − mean(x)), so a Pre-LN network never sees the mean of its residual
stream. Keeping that mean at zero lets RMSNorm replace LayerNorm exactly (same ε), and a
zero-mean vector of R^d is fully described by its first d−1 coordinates (CRMSNorm). Training
goes through the zero-mean reparameterisation of §3.3: everything that writes to the residual
stream (the embedding, each attention output projection and MLP down projection) has effective
weight W − mean over its output (hidden) axis. For a linear map that is the same as centring its
output, y − mean(y): that is what is computed, so parameters, gradients and Adam states are
those of Pre-LN, and the three train identically (tools/convert_norm.py converts checkpoints).

    pre_rmsnorm  x' = x + f(RMSNorm_{γ,β}(x)),   f's output and the embedding centred
    crmsnorm     x̃' = x̃ + [f(CRMSNorm_{γ,β}(x̃)) centred][:d−1],  x̃ ∈ R^(d−1)

The norms keep LayerNorm's γ and β (``norm.bias``, default true) so a converted Pre-LN model
keeps its parameters; β = 0 everywhere with ``norm.bias=false``.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_gpas.model.norms import CompressedRMSNorm, RMSNorm
from megatron_gpas.model.schemes.base import PRE_NORM_GATE_SLOTS, ExportPlan, Scheme, pre_norm


def centred(x: torch.Tensor) -> torch.Tensor:
    """x − mean(x) over the hidden axis (the zero-mean reparameterisation of x's producer)."""
    return x - x.to(torch.promote_types(x.dtype, torch.float32)).mean(-1, keepdim=True).to(x.dtype)


def centred_compressed(x: torch.Tensor) -> torch.Tensor:
    """The first d−1 coordinates of x − mean(x) (the dropped one is minus their sum)."""
    return centred(x)[..., :-1]


class ResidualWriteMap(nn.Module):
    """A parameter-free map of what the embedding writes to the residual stream."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class ZeroMeanResidual(Scheme):
    uses_norm_bias = True
    default_bias = True
    residual_map = staticmethod(centred)
    norm_class: type = RMSNorm

    def norm_module(self, cfg, position):
        return self.norm_class, {"bias": self.norm_bias(cfg.norm)}

    def configure_layer(self, layer, cfg):
        for sublayer, norm, residual in layer.sublayers():
            residual.branch_map = self.residual_map
            pre_norm(layer, sublayer, norm, residual)

    def embedding_transform(self, cfg, config):
        return ResidualWriteMap(self.residual_map)

    def export_plan(self, cfg) -> ExportPlan:
        # centred weights make the stream zero-mean in d dimensions: RMSNorm(γ, β) of the full
        # vector is then what both schemes compute, and γ, β are the same parameters
        return ExportPlan(llama_reason=None, hf_fields={"norm_type": "rmsnorm", "norm_bias": self.norm_bias(cfg.norm)},
                          centre_residual_writes=True)


class PreRMSNorm(ZeroMeanResidual):
    """Pre-RMSNorm (§3.1, §3.3): Pre-LN with a zero-mean residual stream and RMSNorm(γ, β)."""

    name = "pre_rmsnorm"
    summary = "x' = x + centre(f(RMSNorm(x))), embedding centred"

    def te_final_norm(self, cfg) -> bool:
        return not self.norm_bias(cfg.norm)  # TENorm's RMSNorm has no bias

    def fusable_input_norm(self, cfg) -> bool:
        return self.te_final_norm(cfg) and PRE_NORM_GATE_SLOTS[cfg.gpas.position] in ("after_add", "after_branch")


class PreCRMSNorm(ZeroMeanResidual):
    """Pre-CRMSNorm (§3.2, §3.3): the zero-mean residual stream stored in d−1 dimensions."""

    name = "crmsnorm"
    summary = "x̃' = x̃ + centre(f(CRMSNorm(x̃)))[:d−1], x̃ ∈ R^(d−1)"
    residual_map = staticmethod(centred_compressed)
    norm_class = CompressedRMSNorm

    def residual_width(self, cfg) -> int:
        return cfg.model.hidden_size - 1


ZERO_MEAN_SCHEMES = (PreRMSNorm(), PreCRMSNorm())

# The three equivalent forms (tools/convert_norm.py): name -> the norm section that gives it.
# Their parameters are the same tensors: a conversion only changes the scheme.
EQUIVALENT_FORMS = {
    "pre_layernorm": {"scheme": "pre", "kind": "layernorm"},
    "pre_rmsnorm": {"scheme": "pre_rmsnorm", "kind": "rmsnorm"},
    "crmsnorm": {"scheme": "crmsnorm", "kind": "rmsnorm"},
}


def equivalent_form(norm) -> str | None:
    """Which of ``EQUIVALENT_FORMS`` a norm config is (None: none of them)."""
    for name, form in EQUIVALENT_FORMS.items():
        if norm.scheme == form["scheme"] and norm.kind == form["kind"]:
            return name
    return None
