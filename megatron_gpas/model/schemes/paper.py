"""The GPAS paper's hosts: Pre-LN, Post-LN, DeepNorm, Sandwich-LN, Mix-LN, LayerNorm Scaling.

Each configures a built layer by setting the two slots around each sub-layer f (``sublayer.py``):
the norm in front of f and the residual add after it. Their norm is RMSNorm (the GPAS paper)
or LayerNorm with weight and bias (``norm.kind``; ``norm.bias`` overrides the bias).
Equations: methods.md §1.3, §2.
"""

from __future__ import annotations

import math

import torch

from megatron.core.utils import init_method_normal

from megatron_gpas.config import ConfigError
from megatron_gpas.model.init import redraw_
from megatron_gpas.model.schemes.base import PRE_NORM_GATE_SLOTS, ExportPlan, Scheme, post_norm, pre_norm


class PaperHost(Scheme):
    uses_norm_kind = True
    uses_norm_bias = True

    def norm_bias(self, norm) -> bool:
        return norm.kind == "layernorm" if norm.bias is None else norm.bias

    def te_final_norm(self, cfg) -> bool:
        # TENorm computes RMSNorm or LayerNorm (with its bias); not RMSNorm with a bias
        return cfg.norm.kind == "layernorm" or not self.norm_bias(cfg.norm)

    def export_plan(self, cfg) -> ExportPlan:
        layernorm = cfg.norm.kind == "layernorm"
        return ExportPlan(llama_reason=self.no_llama_reason,
                          hf_fields={"norm_type": cfg.norm.kind, "norm_bias": self.norm_bias(cfg.norm)},
                          centre_residual_writes=layernorm and self.pre_norm_host)

    no_llama_reason: str | None = None


class PreLN(PaperHost):
    """Pre-LN (§2.1): x' = x + f(LN(x)); + GPAS after each add (§1.3.1)."""

    name = "pre"
    summary = "x' = x + f(LN(x))"

    def fusable_input_norm(self, cfg) -> bool:
        return self.te_final_norm(cfg) and PRE_NORM_GATE_SLOTS[cfg.gpas.position] in ("after_add", "after_branch")

    def configure_layer(self, layer, cfg):
        for sublayer, norm, residual in layer.sublayers():
            pre_norm(layer, sublayer, norm, residual)


class PostLN(PaperHost):
    """Post-LN (§2.2): x' = LN(x + f(x)), then the final norm as well.
    With GPAS: the shortcut placement of DeepNorm without α (as Mix-LN's Post-LN layers)."""

    name = "post"
    summary = "x' = LN(x + f(x))"
    pre_norm_host = False
    no_llama_reason = "Post-LN normalizes after the residual add"

    def configure_layer(self, layer, cfg):
        for sublayer, norm, residual in layer.sublayers():
            post_norm(layer, sublayer, norm, residual)


class DeepNorm(PaperHost):
    """DeepNorm (§2.4): x' = LN(α·x + f(x)), α = (2N)^¼, with the β-init
    (xavier-normal, gain (8N)^-¼ on v, o, gate, up, down; gain 1 on q, k).
    + GPAS (§1.3.3): x' = LN(α·GPAS(x) + f(x)); the official code then skips the β-init."""

    name = "deepnorm"
    summary = "x' = LN(a·x + f(x)), a = (2N)^¼"
    pre_norm_host = False
    no_llama_reason = "DeepNorm normalizes after a scaled residual add"

    def configure_layer(self, layer, cfg):
        num_layers = layer.config.num_layers
        for sublayer, norm, residual in layer.sublayers():
            post_norm(layer, sublayer, norm, residual)
            residual.shortcut_scale = (2 * num_layers) ** 0.25
        beta_init = cfg.norm.deepnorm_beta_init
        if beta_init is None:  # official GPAS code: only plain DeepNorm gets the β-init
            beta_init = layer.gpas is None
        if beta_init:
            deepnorm_beta_init(layer, num_layers)


class SandwichLN(PaperHost):
    """Sandwich-LN (§2.3): x' = x + LN_b(f(LN_a(x))); + GPAS after each add (§1.3.2)."""

    name = "sandwich"
    summary = "x' = x + LN_b(f(LN_a(x)))"
    no_llama_reason = "Sandwich-LN normalizes each sub-layer's output"

    def configure_layer(self, layer, cfg):
        for sublayer, norm, residual in layer.sublayers():
            residual.branch_norm = self.make_norm(cfg, "branch", layer.config)
            pre_norm(layer, sublayer, norm, residual)


class MixLN(PaperHost):
    """Mix-LN (§2.5): layers l ≤ k are Post-LN, the rest Pre-LN (k = norm.mixln_post_layers,
    default ⌊L/4⌋); + GPAS in each layer's own placement (§1.3.4)."""

    name = "mixln"
    summary = "layers l ≤ k: x' = LN(x + f(x)); the rest: x' = x + f(LN(x))"
    pre_norm_host = False
    no_llama_reason = "Mix-LN has Post-LN layers"

    @staticmethod
    def post_layers(norm_cfg, num_layers: int) -> int:
        k = norm_cfg.mixln_post_layers
        return num_layers // 4 if k is None else k

    def check(self, cfg, opts):
        k = cfg.norm.mixln_post_layers
        if k is not None and not 0 <= k <= cfg.model.num_layers:
            raise ConfigError(f"norm.mixln_post_layers ({k}) must be between 0 and model.num_layers "
                              f"({cfg.model.num_layers})")

    def architecture(self, cfg) -> dict:
        return {**super().architecture(cfg), "norm.mixln_post_layers": self.post_layers(cfg.norm, cfg.model.num_layers)}

    def configure_layer(self, layer, cfg):
        is_post = layer.layer_number <= self.post_layers(cfg.norm, layer.config.num_layers)
        for sublayer, norm, residual in layer.sublayers():
            (post_norm if is_post else pre_norm)(layer, sublayer, norm, residual)


class LayerNormScaling(PaperHost):
    """LayerNorm Scaling (§2.7): x' = x + f(LN(x)·1/√l), l the global 1-based layer.
    norm.lns_mode: "fixed" = constant multiplier (LNS paper); "init" = norm weights
    initialised to 1/√l and learned (GPAS code). + GPAS after each add (§1.3.1)."""

    name = "lns"
    summary = "x' = x + f(LN(x)/√l)"

    def check(self, cfg, opts):
        if cfg.norm.lns_mode not in ("init", "fixed"):
            raise ConfigError(f"norm.lns_mode must be 'init' or 'fixed', got '{cfg.norm.lns_mode}'")

    def architecture(self, cfg) -> dict:
        return {**super().architecture(cfg), "norm.lns_mode": cfg.norm.lns_mode}

    def export_plan(self, cfg) -> ExportPlan:
        plan = super().export_plan(cfg)
        if cfg.norm.lns_mode == "fixed":
            plan.norm_scales = [1.0 / math.sqrt(l) for l in range(1, cfg.model.num_layers + 1)]
        return plan

    def llama_import_norm(self, norm: dict) -> dict:
        # the exported weights hold the learned (or folded) 1/√l: continue as LNS with learned weights
        return {**super().llama_import_norm(norm), "scheme": self.name, "lns_mode": "init"}

    def configure_layer(self, layer, cfg):
        factor = 1.0 / math.sqrt(layer.layer_number)
        for sublayer, norm, residual in layer.sublayers():
            if cfg.norm.lns_mode == "fixed":
                norm.output_scale = factor
            else:
                with torch.no_grad():
                    norm.weight.fill_(factor)
            pre_norm(layer, sublayer, norm, residual)


def xavier_normal_std(fan_in: int, fan_out: int, gain: float) -> float:
    return gain * math.sqrt(2.0 / (fan_in + fan_out))


@torch.no_grad()
def deepnorm_beta_init(layer, num_layers: int) -> None:
    """Re-initialise the projections with DeepNet's gains, fans of the *global* (unsharded)
    HF-layout matrices. Each matrix is drawn whole, in the layer's random stream, and each TP
    rank keeps its shard (``redraw_``): the same weights in every layout."""
    c = layer.config
    h, d, ffn = c.hidden_size, c.kv_channels, c.ffn_hidden_size
    heads, groups = c.num_attention_heads, c.num_query_groups or c.num_attention_heads
    beta = (8 * num_layers) ** -0.25
    q_per_group = heads // groups

    def qkv_init(qkv: torch.Tensor) -> None:
        # Megatron's fused QKV: per query group [q heads of the group..., k, v], head_dim rows each.
        rows = qkv.view(groups, q_per_group + 2, d, -1)
        rows[:, :q_per_group].normal_(0.0, xavier_normal_std(h, heads * d, 1.0))
        rows[:, q_per_group].normal_(0.0, xavier_normal_std(h, groups * d, 1.0))
        rows[:, q_per_group + 1].normal_(0.0, xavier_normal_std(h, groups * d, beta))

    redraw_(layer.self_attention.linear_qkv.weight, qkv_init)
    redraw_(layer.self_attention.linear_proj.weight, init_method_normal(xavier_normal_std(heads * d, h, beta)))
    redraw_(layer.mlp.linear_fc1.weight, init_method_normal(xavier_normal_std(h, ffn, beta)))  # [gate; up]
    redraw_(layer.mlp.linear_fc2.weight, init_method_normal(xavier_normal_std(ffn, h, beta)))


PAPER_SCHEMES = (PreLN(), PostLN(), DeepNorm(), SandwichLN(), MixLN(), LayerNormScaling())
