"""Normalization schemes: how one transformer layer places its norms, adds and GPAS gate.

A scheme configures a built layer (so the global, 1-based layer number ``l`` is known)
by setting fields of the two slots around each sub-layer f (``sublayer.py``):
``SublayerNorm`` before f and ``ResidualAdd`` after it. Equations: methods.md §1.3, §2.
Adding a scheme = one class here plus one entry in ``SCHEMES``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from megatron.core import parallel_state, tensor_parallel

from megatron_gpas.model.norms import RMSNorm
from megatron_gpas.model.sublayer import ResidualAdd, SublayerNorm

if TYPE_CHECKING:
    from megatron_gpas.config import NormConfig
    from megatron_gpas.model.layer import NormLayer

# Where GPAS goes on a pre-norm host (paper Table 4); "after_sublayer" is the paper's default.
PRE_NORM_GATE_SLOTS = {
    "after_sublayer": "after_add",  # x' = GPAS(x + f(LN(x)))
    "before_sublayer": "before_sublayer",  # y = GPAS(x); x' = y + f(LN(y))
    "after_norm": "after_norm",  # x' = x + f(GPAS(LN(x)))
    "after_branch": "after_branch",  # x' = x + GPAS(f(LN(x)))
}
GATE_POSITIONS = tuple(PRE_NORM_GATE_SLOTS)


def pre_norm(layer: "NormLayer", sublayer: int, norm: SublayerNorm, residual: ResidualAdd) -> None:
    """x' = x + f(LN(x)), GPAS where ``gpas.position`` says (default: after the add)."""
    slot = PRE_NORM_GATE_SLOTS[layer.gpas_position]
    target = norm if slot in ("before_sublayer", "after_norm") else residual
    target.attach_gate(layer.gpas, slot, sublayer)


def post_norm(layer: "NormLayer", sublayer: int, norm: SublayerNorm, residual: ResidualAdd) -> None:
    """x' = LN(x + f(x)); GPAS on the shortcut only, f sees the unscaled x (paper eqs. 7-8):
    x' = LN(GPAS(x) + f(x))."""
    residual.normalize_after_add(norm)
    residual.attach_gate(layer.gpas, "shortcut", sublayer)


class Scheme:
    name: str = ""
    pre_norm_host = True  # GPAS ablation positions are defined for pre-norm hosts only

    def fusable_input_norm(self, gpas_position: str) -> bool:
        """Can Transformer Engine fuse the input norm into the following GEMM (LayerNormLinear)?"""
        return False

    def configure(self, layer: "NormLayer", norm_cfg: "NormConfig") -> None:
        raise NotImplementedError


class PreLN(Scheme):
    """Pre-LN (§2.1): x' = x + f(RMSNorm(x)); + GPAS after each add (§1.3.1)."""

    name = "pre"

    def fusable_input_norm(self, gpas_position: str) -> bool:
        return PRE_NORM_GATE_SLOTS[gpas_position] in ("after_add", "after_branch")

    def configure(self, layer, norm_cfg):
        for sublayer, norm, residual in layer.sublayers():
            pre_norm(layer, sublayer, norm, residual)


class PostLN(Scheme):
    """Post-LN (§2.2): x' = RMSNorm(x + f(x)), then the final norm as well.
    With GPAS: the shortcut placement of DeepNorm without α (as Mix-LN's Post-LN layers)."""

    name = "post"
    pre_norm_host = False

    def configure(self, layer, norm_cfg):
        for sublayer, norm, residual in layer.sublayers():
            post_norm(layer, sublayer, norm, residual)


class DeepNorm(Scheme):
    """DeepNorm (§2.4): x' = RMSNorm(α·x + f(x)), α = (2N)^¼, with the β-init
    (xavier-normal, gain (8N)^-¼ on v, o, gate, up, down; gain 1 on q, k).
    + GPAS (§1.3.3): x' = RMSNorm(α·GPAS(x) + f(x)); the official code then skips the β-init."""

    name = "deepnorm"
    pre_norm_host = False

    def configure(self, layer, norm_cfg):
        num_layers = layer.config.num_layers
        for sublayer, norm, residual in layer.sublayers():
            post_norm(layer, sublayer, norm, residual)
            residual.shortcut_scale = (2 * num_layers) ** 0.25
        beta_init = norm_cfg.deepnorm_beta_init
        if beta_init is None:  # official GPAS code: only plain DeepNorm gets the β-init
            beta_init = layer.gpas is None
        if beta_init:
            deepnorm_beta_init(layer, num_layers)


class SandwichLN(Scheme):
    """Sandwich-LN (§2.3): x' = x + RMSNorm_b(f(RMSNorm_a(x))); + GPAS after each add (§1.3.2)."""

    name = "sandwich"

    def configure(self, layer, norm_cfg):
        for sublayer, norm, residual in layer.sublayers():
            residual.branch_norm = RMSNorm(layer.config, layer.config.hidden_size, norm_cfg.eps)
            pre_norm(layer, sublayer, norm, residual)


class MixLN(Scheme):
    """Mix-LN (§2.5): layers l ≤ k are Post-LN, the rest Pre-LN (k = norm.mixln_post_layers,
    default ⌊L/4⌋); + GPAS in each layer's own placement (§1.3.4)."""

    name = "mixln"
    pre_norm_host = False

    @staticmethod
    def post_layers(norm_cfg, num_layers: int) -> int:
        k = norm_cfg.mixln_post_layers
        return num_layers // 4 if k is None else k

    def configure(self, layer, norm_cfg):
        is_post = layer.layer_number <= self.post_layers(norm_cfg, layer.config.num_layers)
        for sublayer, norm, residual in layer.sublayers():
            (post_norm if is_post else pre_norm)(layer, sublayer, norm, residual)


class LayerNormScaling(Scheme):
    """LayerNorm Scaling (§2.7): x' = x + f(RMSNorm(x)·1/√l), l the global 1-based layer.
    norm.lns_mode: "fixed" = constant multiplier (LNS paper); "init" = RMSNorm weights
    initialised to 1/√l and learned (GPAS code). + GPAS after each add (§1.3.1)."""

    name = "lns"

    def configure(self, layer, norm_cfg):
        factor = 1.0 / math.sqrt(layer.layer_number)
        for sublayer, norm, residual in layer.sublayers():
            if norm_cfg.lns_mode == "fixed":
                norm.output_scale = factor
            else:
                with torch.no_grad():
                    norm.weight.fill_(factor)
            pre_norm(layer, sublayer, norm, residual)


def xavier_normal_std(fan_in: int, fan_out: int, gain: float) -> float:
    return gain * math.sqrt(2.0 / (fan_in + fan_out))


@torch.no_grad()
def deepnorm_beta_init(layer: "NormLayer", num_layers: int) -> None:
    """Re-initialise the projections with DeepNet's gains, fans of the *global* (unsharded)
    HF-layout matrices, so the statistics do not depend on the TP layout."""
    c = layer.config
    h, d, ffn = c.hidden_size, c.kv_channels, c.ffn_hidden_size
    heads, groups = c.num_attention_heads, c.num_query_groups or c.num_attention_heads
    tp = parallel_state.get_tensor_model_parallel_world_size()
    beta = (8 * num_layers) ** -0.25
    q_per_group = heads // groups
    # Megatron's fused QKV: per query group [q heads of the group..., k, v], head_dim rows each.
    qkv = layer.self_attention.linear_qkv.weight.data.view(groups // tp, q_per_group + 2, d, -1)
    with tensor_parallel.get_cuda_rng_tracker().fork():  # TP shards draw different values
        qkv[:, :q_per_group].normal_(0.0, xavier_normal_std(h, heads * d, 1.0))
        qkv[:, q_per_group].normal_(0.0, xavier_normal_std(h, groups * d, 1.0))
        qkv[:, q_per_group + 1].normal_(0.0, xavier_normal_std(h, groups * d, beta))
        layer.self_attention.linear_proj.weight.data.normal_(0.0, xavier_normal_std(heads * d, h, beta))
        layer.mlp.linear_fc1.weight.data.normal_(0.0, xavier_normal_std(h, ffn, beta))  # [gate; up]
        layer.mlp.linear_fc2.weight.data.normal_(0.0, xavier_normal_std(ffn, h, beta))


SCHEMES: dict[str, Scheme] = {
    scheme.name: scheme for scheme in (PreLN(), PostLN(), DeepNorm(), SandwichLN(), MixLN(), LayerNormScaling())
}
