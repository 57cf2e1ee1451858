"""nGPT, the normalized Transformer (Loshchilov et al., arXiv 2410.01131; methods.md §7.1, the
official code NVIDIA/ngpt ``model.py``). Every vector along d_model lives on the unit sphere:
no norm layers, and with ``norm(v) = v / ‖v‖₂``

    q, k, v = W_q h, W_k h, W_v h;  q, k = RoPE(q, k)
    q = s_qk ⊙ norm_head(q);  k = s_qk ⊙ norm_head(k)                (per head, after RoPE)
    h ← norm(norm(h) + |α_A| ⊙ (norm(W_o SDPA(q, k, v; scale √d_head)) − norm(h)))
    u, v = split((s_uv·√d) ⊙ W_fc h)                                  (Megatron's fc1: [gate v; up u])
    h ← norm(norm(h) + |α_M| ⊙ (norm(W_2 (u ⊙ silu(v))) − norm(h)))
    logits = s_z ⊙ (W_head h)                                          (no final norm)

The embedding output is not normalised in the forward; its rows are unit-norm (below).

Scales are reparameterised: s_eff = s_param · (init_value / init_scaling), s_param starting at
init_scaling (base = 1/√d): α_A, α_M (0.05, base), s_qk (1, base), s_uv (1, 1), s_z (1, base).

Weights on the sphere (``unit_norm_axes``, model/unit_norm.py): rows of the embedding, the head,
W_q, W_k, W_v and fc1, columns of W_o and W_2 — always the d_model axis — normalised at init and
after every optimizer step on the fp32 master weights (exact under TP, PP, DP and the
distributed optimizer). Init: every matrix N(0, 1/√d), W_o and W_2 N(0, (1/√d)/√(2L)), then
normalised.

GPAS is refused: nGPT renormalises h after every block, so a scale of the residual stream (after
the update, before the block, or of the branch, which the LERP normalises) is a no-op on the
forward, and a gate after the norm would take h off the sphere that the whole method relies on.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.utils import init_method_normal

from megatron_gpas.config import ConfigError, head_dim
from megatron_gpas.model.norms import mark_sequence_parallel, stats_dtype
from megatron_gpas.model.schemes.base import ExportPlan, Scheme
from megatron_gpas.model.schemes.simplenorm import (
    NoNorm,
    NormedOutput,
    PartWeight,
    normed_linear,
    tensor_parallel_group,
    tp_sharded_entries,
)


def justnorm(x: torch.Tensor) -> torch.Tensor:
    """x / ‖x‖₂ along the last axis (the official ``justnorm``), in fp32 at least, cast back."""
    x32 = x.to(stats_dtype(x))
    return (x32 / x32.norm(dim=-1, keepdim=True)).to(x.dtype)


class Scale(nn.Module):
    """A reparameterised scaling vector: s_eff = s_param · (init_value / init_scaling), s_param
    initialised to init_scaling. ``tp_partitioned``: this rank's contiguous shard of the vector."""

    def __init__(self, config, width: int, init_value: float, init_scaling: float, tp_partitioned: bool = False):
        super().__init__()
        self.factor = init_value / init_scaling
        self.weight = nn.Parameter(torch.full((width,), init_scaling, dtype=config.params_dtype))
        if tp_partitioned:
            set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)

    def forward(self) -> torch.Tensor:
        return self.weight * self.factor


class SphereUpdate(nn.Module):
    """The residual slot: h ← norm(norm(h) + |α| ⊙ (norm(f) − norm(h))), α = ``alpha`` (per channel)."""

    def __init__(self, config):
        super().__init__()
        d = config.hidden_size
        self.alpha = Scale(config, d, 0.05, d ** -0.5)
        mark_sequence_parallel(self, config)  # replicated over TP, the tokens split under SP

    def forward(self, training: bool, fused: bool):
        def update(branch_with_bias, shortcut, dropout_prob):
            branch, bias = branch_with_bias
            assert bias is None and dropout_prob == 0, "nGPT's linears have no bias, its blocks no dropout"
            a, b = justnorm(shortcut), justnorm(branch)
            return justnorm(a + self.alpha().abs() * (b - a))

        return update


class ScaledQK:
    """Mixed into a core attention (``scaled_qk``): q, k ← s_qk ⊙ norm_head(q, k) before it (after
    RoPE); s_qk [heads, head_dim] shared by q and k, this rank's heads (TP-partitioned)."""

    def __init__(self, *args, config, **kwargs):
        super().__init__(*args, config=config, **kwargs)
        heads = config.num_attention_heads // tensor_parallel_group(self).size()
        self.sqk = Scale(config, heads * config.kv_channels, 1.0, config.hidden_size ** -0.5, tp_partitioned=True)

    def normalize_qk(self, x: torch.Tensor) -> torch.Tensor:
        return justnorm(x)

    def scale_value(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def scale_output(self, out: torch.Tensor) -> torch.Tensor:
        return out

    def forward(self, query, key, value, *args, **kwargs):
        s = self.sqk().view(query.shape[-2], query.shape[-1])  # [s, b, heads, head_dim]
        out = super().forward(s * self.normalize_qk(query), s * self.normalize_qk(key), self.scale_value(value),
                              *args, **kwargs)
        return self.scale_output(out)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        sharded.update(tp_sharded_entries({"sqk.weight": self.sqk.weight}, prefix, sharded_offsets, metadata,
                                          tensor_parallel_group(self)))
        return sharded


@functools.cache
def scaled_qk(core_attention: type) -> type:
    """``core_attention`` (SDPA, Megatron's or TE's) with nGPT's q/k normalisation and s_qk in front."""
    return type(f"ScaledQK{core_attention.__name__}", (ScaledQK, core_attention), {"__module__": __name__})


class UVScale(nn.Module):
    """[gate; up] ← [c_gate·s_gate ⊙ gate; c_up·s_up ⊙ up] on fc1's output, s_uv = [s_gate; s_up]
    (each part this rank's contiguous shard; init_value = init_scaling = 1) and constant factors c."""

    def __init__(self, config, width: int, gate_factor: float, up_factor: float):
        super().__init__()
        self.gate = PartWeight(config, width)
        self.up = PartWeight(config, width)
        self.gate_factor, self.up_factor = gate_factor, up_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.cat([self.gate.weight * self.gate_factor, self.up.weight * self.up_factor])


class FC1UVScale(NormedOutput):
    """linear_fc1 followed by the s_uv scale (``output_norm`` holds it): √d on both parts, as the
    official code (the up part's factor cancels in nGPT's norm of the MLP output)."""

    def uv_factors(self, config) -> tuple[float, float]:
        return math.sqrt(config.hidden_size), math.sqrt(config.hidden_size)

    def make_output_norm(self, config, tp_group):
        return UVScale(config, config.ffn_hidden_size // tp_group.size(), *self.uv_factors(config))


class LogitScale(nn.Module):
    """logits ← s_z ⊙ logits, s_z over this rank's vocabulary shard (vocab-parallel)."""

    def __init__(self, config, vocab_per_rank: int, tp_group):
        super().__init__()
        self.tp_group = tp_group
        self.sz = Scale(config, vocab_per_rank, 1.0, config.hidden_size ** -0.5, tp_partitioned=True)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits * self.sz().to(logits.dtype)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return tp_sharded_entries({"sz.weight": self.sz.weight}, prefix, sharded_offsets, metadata, self.tp_group)


class NGPT(Scheme):
    name = "ngpt"
    summary = "h ← norm(norm(h) + |α| ⊙ (norm(f(h)) − norm(h))); weights unit-norm along d_model"
    gpas_refusal = ("nGPT renormalises the residual stream to the unit sphere after every block "
                    "(h ← norm(norm(h) + |α|(norm(f) − norm(h)))), so GPAS' scale of the stream or of the branch "
                    "cancels in the next norm, and a scale after the norm would take h off the sphere the method "
                    "relies on: there is no meaningful placement (docs/norm-schemes.md)")

    def norm_module(self, cfg, position):
        return NoNorm, {}

    def linear_modules(self, cfg, column_linear, row_linear) -> dict:
        return {**super().linear_modules(cfg, column_linear, row_linear),
                "linear_fc1": normed_linear(FC1UVScale, column_linear)}

    def core_attention(self, cfg, core_attention: type) -> type:
        return scaled_qk(core_attention)

    def configure_layer(self, layer, cfg):
        layer.self_attn_bda = SphereUpdate(layer.config)
        layer.mlp_bda = SphereUpdate(layer.config)

    def logit_transform(self, cfg, config, output_layer) -> nn.Module | None:
        return LogitScale(config, output_layer.weight.shape[0], tensor_parallel_group(output_layer))

    def transformer_config_overrides(self, cfg) -> dict:
        m = cfg.model
        base = m.hidden_size ** -0.5
        return {"init_method_std": base, "embedding_init_method_std": base,
                "output_layer_init_method": init_method_normal(base / math.sqrt(2 * m.num_layers)),
                "softmax_scale": math.sqrt(head_dim(m))}

    def head_init_method(self, cfg):
        return init_method_normal(cfg.model.hidden_size ** -0.5)

    def layer_scales(self, layer) -> dict:
        """The mean |α| of the two residual updates (the LERP weight of each branch)."""
        return {"attn_alpha": layer.self_attn_bda.alpha().detach().abs().mean(),
                "mlp_alpha": layer.mlp_bda.alpha().detach().abs().mean()}

    @staticmethod
    def layer_unit_norm_axes(layer) -> dict:
        attn, mlp = layer.self_attention, layer.mlp
        return {attn.linear_qkv.weight: 1, attn.linear_proj.weight: 0, mlp.linear_fc1.weight: 1,
                mlp.linear_fc2.weight: 0}

    def unit_norm_axes(self, model_chunk) -> dict:
        axes = {}
        if getattr(model_chunk, "pre_process", False):
            axes[model_chunk.embedding.word_embeddings.weight] = 1
        for layer in model_chunk.decoder.layers:
            axes.update(self.layer_unit_norm_axes(layer))
        if getattr(model_chunk, "post_process", False):
            axes[model_chunk.output_layer.weight] = 1
        return axes

    def check(self, cfg, opts):
        m = cfg.model
        if (m.num_query_groups or m.num_attention_heads) != m.num_attention_heads:
            raise ConfigError(f"norm.scheme={self.name} shares s_qk between each query head and its key head: "
                              "model.num_query_groups must equal model.num_attention_heads (no GQA)")

    def export_plan(self, cfg) -> ExportPlan:
        return ExportPlan(llama_reason="nGPT renormalises the residual stream after every block (no norm layers)",
                          hf_fields={"norm_type": "none", "final_norm_type": "none", "normalized_transformer": True})


NGPT_SCHEMES = (NGPT(),)
