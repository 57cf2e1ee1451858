"""Normalization modules: one class per norm, each reading like its equation.

Megatron builds them as ``Norm(config=, hidden_size=, eps=)`` (plus the keyword options a
scheme's ``ModuleSpec`` adds). Statistics are computed in fp32 (float64 for float64 inputs, as
in the equivalence checks) and every parameter is tagged
for the sequence-parallel gradient all-reduce (``mark_sequence_parallel``), so each norm is
correct under TP+SP. The tensors entering a norm are ``[s, b, width]``; only the last axis is
reduced, so sequence parallelism (a split of ``s``) needs no communication here.

RMSNorm and LayerNorm (and ScalarRMSNorm's statistics) can run on PyTorch's kernels instead of the
formula (``fused``, set by the builder from ``norm.fused``): ``F.rms_norm`` / ``F.layer_norm``,
which compute the statistics in fp32 for 16-bit inputs as the formula does. In fp32 (and float64)
the weight and bias go into the kernel too; in 16-bit they are applied after it, so the normalized
vector is rounded to the input dtype before the weight multiplies it, as in the formula (and in
Hugging Face's Llama). On CPU ``F.rms_norm`` is the formula op for op (bitwise equal).

    RMSNorm            y = γ ⊙ x / sqrt(mean(x²) + ε)  (+ β)
    LayerNorm          y = γ ⊙ (x − μ) / sqrt(var(x) + ε)  (+ β)
    ScalarRMSNorm      y = g · x / sqrt(mean(x²) + ε),  one scalar g          (OSP's SSNorm, methods.md §4.1)
    CompressedRMSNorm  x̃ ∈ R^(d−1) → y = γ ⊙ [n; −Σn] + β,
                       n = x̃ / sqrt((Σx̃² + (Σx̃)²)/d + ε)                    (Pre-CRMSNorm, §3.2)
    DynamicTanh        y = γ ⊙ tanh(α·x),  one scalar α                       (DyT, §5.2)
    BoundedTanh        y = γ ⊙ tanh(λ·r·x),  r = (1/κ)/sqrt(m + ε), one scalar λ;
                       m = mean(x²) (exact) or a supplied estimate            (BHyT, §5.1)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.transformer.transformer_config import TransformerConfig


def stats_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for 16-bit activations, the input's own precision above that (float64 checks)."""
    return torch.promote_types(x.dtype, torch.float32)


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
    """RMSNorm as in Llama: y = γ ⊙ x / sqrt(mean(x²) + ε), with an optional bias β
    (Jiang et al.'s Pre-RMSNorm keeps LayerNorm's β, methods.md §3)."""

    fusable = True  # PyTorch has a kernel for this norm (``kernel``)
    fused = False  # use it (the builder sets this from norm.fused)

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, bias: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype)) if bias else None
        mark_sequence_parallel(self, config)

    def kernel(self, x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None):
        y = F.rms_norm(x, x.shape[-1:], weight, self.eps)
        return y if bias is None else y + bias

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self.kernel(x)
        x32 = x.to(stats_dtype(x))
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and stats_dtype(x) == x.dtype == self.weight.dtype and self.weight.shape == x.shape[-1:]:
            return self.kernel(x, self.weight, self.bias)
        y = self.weight * self.normalize(x)
        return y if self.bias is None else y + self.bias


class LayerNorm(RMSNorm):
    """LayerNorm: y = γ ⊙ (x − μ) / sqrt(var(x) + ε) + β (population variance, as torch)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, bias: bool = True):
        super().__init__(config, hidden_size, eps, bias)

    def kernel(self, x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None):
        return F.layer_norm(x, x.shape[-1:], weight, bias, self.eps)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self.kernel(x)
        x32 = x.to(stats_dtype(x))
        centred = x32 - x32.mean(-1, keepdim=True)
        return (centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class ScalarRMSNorm(RMSNorm):
    """OSP's single-scale RMSNorm (SSNorm): y = g · x / sqrt(mean(x²) + ε) with one learnable
    scalar g (init 1), so no channel can be amplified on its own."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, bias: bool = False):
        super().__init__(config, 1, eps, bias=False)


class CompressedRMSNorm(RMSNorm):
    """CRMSNorm of a compressed zero-mean vector (Jiang et al. §3.2).

    The residual stream holds x̃ = x[:d−1] of a zero-mean x ∈ R^d (x_d = −Σx̃), so
    mean(x²) = (Σx̃² + (Σx̃)²)/d and RMSNorm(x) = [n; −Σn] with n = x̃ / sqrt(that + ε).
    The output is the full d-dimensional normalized vector with the affine γ, β of size d,
    which is what the consumers (QKV, MLP input, LM head) read.
    """

    fusable = False  # statistics of the compressed vector: no PyTorch kernel computes them

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] + 1
        x32 = x.to(stats_dtype(x))
        total = x32.sum(-1, keepdim=True)
        mean_square = (x32.pow(2).sum(-1, keepdim=True) + total.pow(2)) / d
        n = x32 * torch.rsqrt(mean_square + self.eps)
        return torch.cat([n, -n.sum(-1, keepdim=True)], dim=-1).to(x.dtype)


class DynamicTanh(nn.Module):
    """DyT (Llama variant, no β): y = γ ⊙ tanh(α·x), one learnable scalar α per norm,
    initialised to ``alpha0`` (DyT uses separate values for the attention, MLP and final norms)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, alpha0: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.alpha = nn.Parameter(torch.full((1,), float(alpha0), dtype=config.params_dtype))
        mark_sequence_parallel(self, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = stats_dtype(x)
        return self.weight * torch.tanh(self.alpha.to(dtype) * x.to(dtype)).to(x.dtype)


class BoundedTanh(nn.Module):
    """BHyT: y = γ ⊙ tanh(λ · r · x), r = (1/κ) / sqrt(m + ε).

    m is mean(x²) over the hidden axis (exact statistics), unless a scheme installs
    ``mean_square_estimate``: a callable returning the per-token estimate to use instead (BHyT's
    post-attention norm, whose estimate avoids a second reduction). With ``record_mean_square``
    the exact m of the last input is kept in ``last_mean_square`` (with its graph) for such an
    estimate. λ is one scalar, learnable or fixed (BHyT's ``learnable_lam``).
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, lam0: float = 1.0,
                 kappa: float = 10.0, learnable_lambda: bool = True):
        super().__init__()
        self.eps = eps
        self.kappa = kappa
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.lam = nn.Parameter(torch.full((1,), float(lam0), dtype=config.params_dtype),
                                requires_grad=learnable_lambda)
        mark_sequence_parallel(self, config)
        self.mean_square_estimate = None
        self.record_mean_square = False
        self.last_mean_square: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(stats_dtype(x))
        if self.mean_square_estimate is not None:
            mean_square = self.mean_square_estimate()
        else:
            mean_square = x32.pow(2).mean(-1, keepdim=True)
            if self.record_mean_square:
                self.last_mean_square = mean_square
        r = torch.rsqrt(mean_square + self.eps) / self.kappa
        return self.weight * torch.tanh(self.lam.to(x32.dtype) * r * x32).to(x.dtype)
