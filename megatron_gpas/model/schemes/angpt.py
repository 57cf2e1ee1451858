"""anGPT, the approximately normalized Transformer (Franke et al., arXiv 2505.22014; methods.md
§7.2, research-wave2.md §1). nGPT (``ngpt.py``) with its exact normalisations replaced by constant
factors ν = 1/sqrt(E‖g(x)‖²) for unit-norm inputs and weights whose rows have norm ≤ 1:

    q, k, v = W_q h, W_k h, ν_qkv·W_v h;  q, k = RoPE(q, k)
    q, k ← s_qk ⊙ norm_head(q), s_qk ⊙ norm_head(k)        (qk_norm=exact; factor: s_qk ⊙ ν_qkv·(·))
    y = SDPA(q, k, v; scale √d_head)  (× √t at position t with attention_factor=sqrt_pos)
    h ← ν(α_A) ⊙ (h + α_A ⊙ (ν_p·W_o y − h))
    gate, up = √d·ν_uz·s_gate ⊙ W_gate h,  ν_uz·ν_acf·s_up ⊙ W_up h
    h ← ν(α_M) ⊙ (h + α_M ⊙ (ν_d·W_2 (silu(gate) ⊙ up) − h))
    logits = s_z ⊙ (W_head h)                                            (no final norm)

    ν(α) = 1/sqrt(α² + (1 − α)²),  α = |α_eff| per channel (recomputed every step: α is learned)
    ν_qkv = √(d/d_head),  ν_p = √(d_head/d),  ν_uz = √(d/d_ffn),  ν_d = √(d_ffn/d)
    ν_acf = 1/E‖u ⊙ silu(√d·v)‖ for u, v the unit-norm-input outputs above (Monte Carlo at build
            time for the model's widths, 3.74 at d = 2048 and d_ffn = 4d; or ``acf_factor``)

Weights: every row (the input axis of Megatron's [out, in] weights: embedding, head, W_q/W_k/W_v,
fc1, W_o and W_2) normalised to 1 at init and clamped to ‖row‖ ≤ 1 after every optimizer step
(rows inside the ball are left as they are; model/unit_norm.py). The ν table only holds with
rows along the input axis: for W_2 [d, d_ffn], E‖W_2 a‖² = (d/d_ffn)·‖a‖² gives ν_d = √(d_ffn/d) = 2
at d_ffn = 4d, where nGPT's columns (the d_model axis) would give 1. Under TP those rows of the
row-parallel W_o and W_2 are split: their sums of squares are all-reduced over TP.

Scales are reparameterised as nGPT's (s_eff = s_param · init_value/init_scaling): α_A, α_M
(``alpha_init``, 1/√d), s_qk (1, 1/√d), s_uv (1, 1), s_z (1, 1/√d).

The public code was not obtainable (methods.md §7.2): the constants whose form is uncertain are
options (``norm.options``), each with the value chosen and why (docs/norm-schemes.md).

GPAS is refused: the ν factors are calibrated for ‖h‖ ≈ 1, which ν(α) maintains by construction;
a gate that shrinks h miscalibrates every factor after it, and there is no growth for it to undo.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import torch
from torch import nn

from megatron_gpas.config import ConfigError, head_dim
from megatron_gpas.model.norms import mark_sequence_parallel
from megatron_gpas.model.schemes.base import ExportPlan
from megatron_gpas.model.schemes.ngpt import NGPT, FC1UVScale, Scale, ScaledQK
from megatron_gpas.model.schemes.simplenorm import normed_linear

QK_NORMS = ("exact", "factor")
ATTENTION_FACTORS = ("none", "sqrt_pos")
ACF_SAMPLES, ACF_SAMPLES_PER_DRAW = 256, 32  # Monte Carlo of ν_acf (relative error ≈ 0.2%)


@dataclasses.dataclass
class ANGPTOptions:
    # α_A, α_M at init: nGPT's 0.05 (anGPT builds on nGPT; the summary's "s_a,init = 0.01" names no parameter)
    alpha_init: float = 0.05
    # GPT+ with QK-norm is anGPT's base, and the paper adds no normalisations: q, k stay exactly normalised
    qk_norm: str = "exact"
    # the attention output of unit-norm values has norm 1 for one-hot attention (the default) and
    # 1/√t for uniform causal attention at position t ("assumes dense attention": sqrt_pos)
    attention_factor: str = "none"
    # ν_acf; 0: Monte Carlo at build time for the model's widths (research-wave2.md §1.2)
    acf_factor: float = 0.0


@functools.cache
def estimate_acf_factor(d_model: int, d_ffn: int, seed: int = 0) -> float:
    """ν_acf = 1/E‖u ⊙ silu(√d·v)‖ with u = ν_uz·W_u x, v = ν_uz·W_v x for x unit-norm in d and W_u,
    W_v [d_ffn, d] with unit rows (anGPT's init), by Monte Carlo. For a random direction each w·x is
    distributed as one coordinate of a uniform unit vector, t = z/√(z² + χ²_{d−1}), independently
    per row: the draws need O(d_ffn) numbers per sample instead of two d_ffn × d matrices.
    numpy's seeded generator in float64: the same value on every rank and machine."""
    rng = np.random.default_rng(seed)
    nu_uz = math.sqrt(d_model / d_ffn)

    def coordinate(shape):
        z = rng.standard_normal(shape)
        return z / np.sqrt(z * z + rng.chisquare(d_model - 1, shape))

    norms = []
    for _ in range(ACF_SAMPLES // ACF_SAMPLES_PER_DRAW):
        shape = (ACF_SAMPLES_PER_DRAW, d_ffn)
        u, gate = nu_uz * coordinate(shape), math.sqrt(d_model) * nu_uz * coordinate(shape)
        norms.append(np.sqrt(np.square(u * gate / (1.0 + np.exp(-gate))).sum(axis=1)))
    return float(1.0 / np.concatenate(norms).mean())


@dataclasses.dataclass(frozen=True)
class Factors:
    """anGPT's constant factors for one model shape."""

    qkv: float  # ν_qkv = √(d/d_head)
    proj: float  # ν_p = √(d_head/d)
    up: float  # ν_uz = √(d/d_ffn)
    down: float  # ν_d = √(d_ffn/d)
    acf: float  # ν_acf
    sqrt_d: float

    @classmethod
    def of(cls, model, acf_factor: float) -> "Factors":
        d, d_head, d_ffn = model.hidden_size, head_dim(model), model.ffn_hidden_size
        acf = acf_factor or estimate_acf_factor(d, d_ffn)
        return cls(qkv=math.sqrt(d / d_head), proj=math.sqrt(d_head / d), up=math.sqrt(d / d_ffn),
                   down=math.sqrt(d_ffn / d), acf=acf, sqrt_d=math.sqrt(d))


class ApproximateAttention(ScaledQK):
    """nGPT's s_qk ⊙ norm_head(q, k) (or s_qk ⊙ ν_qkv·(q, k)), ν_qkv·v, and the position factor."""

    qk_factor: float | None = None  # None: exact per-head norms
    value_factor: float = 1.0
    position_factor: bool = False

    def normalize_qk(self, x: torch.Tensor) -> torch.Tensor:
        return super().normalize_qk(x) if self.qk_factor is None else x * self.qk_factor

    def scale_value(self, value: torch.Tensor) -> torch.Tensor:
        return value * self.value_factor

    def scale_output(self, out: torch.Tensor) -> torch.Tensor:
        if not self.position_factor:
            return out
        positions = torch.arange(1, out.shape[0] + 1, device=out.device, dtype=torch.float32)  # [s, b, ...]: t = 1..s
        return out * positions.sqrt().to(out.dtype).view(-1, *([1] * (out.dim() - 1)))


@functools.cache
def approximate_attention(core_attention: type, qk_factor: float | None, value_factor: float,
                          position_factor: bool) -> type:
    return type(f"Approximate{core_attention.__name__}", (ApproximateAttention, core_attention),
                {"__module__": __name__, "qk_factor": qk_factor, "value_factor": value_factor,
                 "position_factor": position_factor})


@functools.cache
def approximate_fc1(gate_factor: float, up_factor: float) -> type:
    """fc1 with s_uv and the constant factors of its two parts (√d·ν_uz on the gate, ν_uz·ν_acf on up)."""
    return type("ApproximateFC1UVScale", (FC1UVScale,),
                {"__module__": __name__, "uv_factors": lambda self, config: (gate_factor, up_factor)})


class LerpUpdate(nn.Module):
    """The residual slot: h ← ν(α) ⊙ (h + α ⊙ (c·f − h)), α = |α_eff| per channel, c = ``branch_factor``."""

    def __init__(self, config, alpha_init: float, branch_factor: float):
        super().__init__()
        d = config.hidden_size
        self.alpha = Scale(config, d, alpha_init, d ** -0.5)
        self.branch_factor = branch_factor
        mark_sequence_parallel(self, config)  # replicated over TP, the tokens split under SP

    def forward(self, training: bool, fused: bool):
        def update(branch_with_bias, shortcut, dropout_prob):
            branch, bias = branch_with_bias
            assert bias is None and dropout_prob == 0, "anGPT's linears have no bias, its blocks no dropout"
            alpha = self.alpha().abs()
            nu = torch.rsqrt(alpha.square() + (1 - alpha).square())
            return nu * (shortcut + alpha * (self.branch_factor * branch - shortcut))

        return update


class ANGPT(NGPT):
    name = "angpt"
    summary = "h ← ν(α) ⊙ (h + α ⊙ (ν·f(h) − h)); constant factors ν for the norms; weight rows ‖w‖ ≤ 1"
    Options = ANGPTOptions
    unit_norm_clamp = True
    gpas_refusal = ("anGPT's constant factors ν are calibrated for a residual stream of norm ≈ 1, which ν(α) "
                    "keeps by construction (h ← ν(α)(h + α(ν·f − h))): GPAS' scale would miscalibrate every factor "
                    "after it and has no growth of ‖h‖ to undo (docs/norm-schemes.md)")

    def factors(self, cfg) -> Factors:
        return Factors.of(cfg.model, self.options(cfg.norm).acf_factor)

    def linear_modules(self, cfg, column_linear, row_linear) -> dict:
        nu = self.factors(cfg)
        fc1 = approximate_fc1(nu.sqrt_d * nu.up, nu.up * nu.acf)
        return {**super().linear_modules(cfg, column_linear, row_linear), "linear_fc1": normed_linear(fc1, column_linear)}

    def core_attention(self, cfg, core_attention: type) -> type:
        opts, nu = self.options(cfg.norm), self.factors(cfg)
        return approximate_attention(core_attention, None if opts.qk_norm == "exact" else nu.qkv, nu.qkv,
                                     opts.attention_factor == "sqrt_pos")

    def configure_layer(self, layer, cfg):
        alpha_init, nu = self.options(cfg.norm).alpha_init, self.factors(cfg)
        layer.self_attn_bda = LerpUpdate(layer.config, alpha_init, nu.proj)
        layer.mlp_bda = LerpUpdate(layer.config, alpha_init, nu.down)

    @staticmethod
    def layer_unit_norm_axes(layer) -> dict:
        attn, mlp = layer.self_attention, layer.mlp
        return {attn.linear_qkv.weight: 1, attn.linear_proj.weight: 1, mlp.linear_fc1.weight: 1,
                mlp.linear_fc2.weight: 1}

    def check(self, cfg, opts):
        super().check(cfg, opts)
        if opts.qk_norm not in QK_NORMS:
            raise ConfigError(f"norm.options.qk_norm={opts.qk_norm!r}: one of {', '.join(QK_NORMS)}")
        if opts.attention_factor not in ATTENTION_FACTORS:
            raise ConfigError(f"norm.options.attention_factor={opts.attention_factor!r}: one of "
                              f"{', '.join(ATTENTION_FACTORS)}")
        if opts.alpha_init <= 0:
            raise ConfigError(f"norm.options.alpha_init={opts.alpha_init}: must be > 0 (the LERP weight of the branch)")
        if opts.acf_factor < 0:
            raise ConfigError(f"norm.options.acf_factor={opts.acf_factor}: must be > 0, or 0 to estimate it")

    def export_plan(self, cfg) -> ExportPlan:
        """Our HF class computes the LERP and the scales; the constant factors are folded into the
        weights they multiply (no inference overhead), α re-expressed for the class' nGPT reparameterisation."""
        opts, nu = self.options(cfg.norm), self.factors(cfg)
        factors = {"self_attn.v_proj.weight": nu.qkv, "self_attn.o_proj.weight": nu.proj,
                   "mlp.down_proj.weight": nu.down, "mlp.suv_gate": nu.up, "mlp.suv_up": nu.up * nu.acf / nu.sqrt_d,
                   "attn_alpha": opts.alpha_init / 0.05, "mlp_alpha": opts.alpha_init / 0.05}
        if opts.qk_norm == "factor":
            factors.update({"self_attn.q_proj.weight": nu.qkv, "self_attn.k_proj.weight": nu.qkv})
        return ExportPlan(llama_reason="anGPT's residual update is a learned LERP (no norm layers)",
                          hf_fields={"norm_type": "none", "final_norm_type": "none", "normalized_transformer": True,
                                     "approximately_normalized": True, "qk_norm": opts.qk_norm == "exact",
                                     "attention_position_factor": opts.attention_factor == "sqrt_pos"},
                          tensor_factors=factors)


ANGPT_SCHEMES = (ANGPT(),)
