"""Folding GPAS gates and LNS factors into a stock Llama (methods.md §10).

A pre-norm sub-layer k of our models computes, with its gate factor β = 1 − act(α) placed
by ``gpas.position`` and LNS' fixed factor c = 1/√l,

    x_{k+1} = out_k · ( in_k·x_k + branch_k · f_k( norm_k · RMSNorm(in_k·x_k) ) )

where exactly one of in/norm/branch/out holds β (before_sublayer / after_norm /
after_branch / after_sublayer) and norm_k also holds c. Write x_k = P_k·g_k. RMSNorm is
scale-invariant for P > 0 (up to ε: RMSNorm(P·g) uses ε/P²), so with P ← P·in_k,

    g_{k+1} = g_k + (branch_k / P) · f_k( norm_k · RMSNorm(g_k) ),   then P ← P·out_k

i.e. a stock Llama on g whose norm weight is multiplied by norm_k and whose output
projection (o_proj / down_proj) by branch_k/P. The final RMSNorm absorbs the last P. The fold
is invalid if any P reaching a norm is ≤ 0 (RMSNorm flips sign; SwiGLU is not odd).

A norm with a bias, N(x) = γ⊙n + β, feeds its consumers W (q, k, v after the attention norm;
gate, up after the MLP norm) as W·(γ⊙n) + W·β: Llama's RMSNorm keeps γ and the linear layers
get the biases W·β (``attention_bias`` / ``mlp_bias``; o_proj and down_proj get zero biases).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_gpas.hf.modeling_megatron_gpas import gate_activation

# (norm, output projection, consumers of the norm's output) of each sub-layer in HF names.
SUBLAYERS = (("input_layernorm", "self_attn.o_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
             ("post_attention_layernorm", "mlp.down_proj", ("mlp.gate_proj", "mlp.up_proj")))
FACTOR_OF_POSITION = {"before_sublayer": "in", "after_norm": "norm", "after_branch": "branch",
                      "after_sublayer": "out"}


class FoldError(ValueError):
    """The model has no exact stock-Llama form (e.g. a cumulative scale ≤ 0)."""


@dataclass
class FoldPlan:
    """Per layer and sub-layer: the norm-weight and output-projection multipliers."""

    norm_factors: list[tuple[float, float]]
    proj_factors: list[tuple[float, float]]
    cumulative_scales: list[float]  # P seen by every norm, in order (2 per layer + the final norm)
    has_biases: bool = False  # the norms have biases: they become linear biases
    @property
    def min_scale(self) -> float:
        return min(self.cumulative_scales)


def gate_factors(alpha: torch.Tensor, activation: str, silu_beta: float) -> tuple[float, float]:
    """β = 1 − act(α) for the attention and MLP sub-layers (one shared gate or one each)."""
    values = [1.0 - float(gate_activation(activation, a.double(), silu_beta)) for a in alpha.reshape(-1)]
    return (values[0], values[-1])


def plan_fold(config, gates: torch.Tensor | None, norm_scales: list[float] | None = None) -> FoldPlan:
    """The multipliers that turn a pre-norm GPAS/LNS model (HF ``config`` of our class) into a
    stock Llama; ``gates`` is [L, 1 or 2] (None without GPAS); ``norm_scales``: a fixed multiplier
    of each layer's norm outputs (LNS' 1/√l, from the scheme's export plan). Raises FoldError if
    invalid."""
    num_layers = config.num_hidden_layers
    slot = FACTOR_OF_POSITION[config.gpas_position] if config.gpas else None
    norm_factors, proj_factors, scales = [], [], []
    scale = 1.0
    for layer in range(num_layers):
        betas = gate_factors(gates[layer], config.gpas_activation, config.gpas_silu_beta) if slot else (1.0, 1.0)
        norm_scale = norm_scales[layer] if norm_scales else 1.0
        norms, projs = [], []
        for sublayer in range(2):
            f = {"in": 1.0, "norm": norm_scale, "branch": 1.0, "out": 1.0}
            if slot:
                f[slot] *= betas[sublayer]
            scale *= f["in"]
            scales.append(scale)
            if scale <= 0:
                raise FoldError(f"the cumulative GPAS scale reaching layer {layer + 1}'s "
                                f"{('attention', 'MLP')[sublayer]} norm is {scale:.3g} ≤ 0: "
                                "RMSNorm would flip its sign, so no stock Llama computes this model")
            norms.append(f["norm"])
            projs.append(f["branch"] / scale)
            scale *= f["out"]
        norm_factors.append(tuple(norms))
        proj_factors.append(tuple(projs))
    scales.append(scale)
    if scale <= 0:
        raise FoldError(f"the cumulative GPAS scale reaching the final norm is {scale:.3g} ≤ 0")
    return FoldPlan(norm_factors, proj_factors, scales, has_biases=bool(getattr(config, "norm_bias", False)))


def fold_layer(hf_layer: dict[str, torch.Tensor], plan: FoldPlan, layer: int) -> dict[str, torch.Tensor]:
    """A layer of our class (HF names) as a stock Llama layer: factors folded, gates dropped,
    norm biases turned into the biases of their consumers."""
    out = {k: v for k, v in hf_layer.items() if k != "gpas_alpha"}
    for sublayer, (norm, proj, consumers) in enumerate(SUBLAYERS):
        norm_factor = plan.norm_factors[layer][sublayer]
        for key, factor in ((f"{norm}.weight", norm_factor), (f"{norm}.bias", norm_factor),
                            (f"{proj}.weight", plan.proj_factors[layer][sublayer])):
            if factor != 1.0 and key in out:
                out[key] = (out[key].double() * factor).to(out[key].dtype)
        if plan.has_biases:
            beta = out.pop(f"{norm}.bias").double()
            for consumer in consumers:
                weight = out[f"{consumer}.weight"]
                out[f"{consumer}.bias"] = (weight.double() @ beta).to(weight.dtype)
            out[f"{proj}.bias"] = torch.zeros(out[f"{proj}.weight"].shape[0], dtype=out[f"{proj}.weight"].dtype)
    return out
