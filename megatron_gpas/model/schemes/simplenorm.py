"""SimpleNorm / SimpleGPT (Chen et al., arXiv 2602.01212, ICML 2026; methods.md §6).

An RMSNorm immediately after every linear map, no pre-norms, the final norm kept:

    q = RMSNorm_q(W_q x),  k = RMSNorm_k(W_k x),  v = RMSNorm_v(W_v x)   (full width, then RoPE)
    h  = x + RMSNorm_o(W_o · SDPA(q, k, v))
    x' = h + RMSNorm_2(W_2 (silu(RMSNorm_1(W_1 h)) ⊙ RMSNorm_3(W_3 h)))
    logits = W_out · RMSNorm_final(x_L)

The q, k and v norms reduce over the whole projection (n_heads·head_dim, or n_groups·head_dim
for k and v with GQA), not per head. Megatron fuses W_q, W_k, W_v into ``linear_qkv`` (rows
interleaved per query group) and W_1, W_3 into ``linear_fc1`` ([W_1; W_3] per TP shard), and
shards both over TP: ``OutputNorms`` splits the local output into its parts, sums their squares
locally and all-reduces the sums of all parts in one TP collective, so each part is normalised
over its full width. ``linear_proj`` and ``linear_fc2`` give full-width outputs (sequence-split
under SP): a plain, TP-replicated RMSNorm.

Init (the official code): W_q, W_k, W_v, W_1 N(0, 0.02) (``model.init_std``); W_o, W_2, W_3
N(0, 0.02/√(2l)) for the 1-based layer l; the embedding N(0, 1); the LM head trunc-normal with
std d^-½ cut at ±3σ; norm weights 1. Its recipe decays every parameter (norm weights included).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from megatron.core import parallel_state
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from megatron.core.utils import init_method_normal

from megatron_gpas.config import ConfigError
from megatron_gpas.model.init import redraw_
from megatron_gpas.model.norms import RMSNorm, stats_dtype
from megatron_gpas.model.schemes.base import ExportPlan, Scheme, pre_norm


class NoNorm(nn.Module):
    """The empty pre-norm slot: y = x (the slot still hosts GPAS' ``before_sublayer`` gate)."""

    identity = True  # its output is its input: nothing for a norm recompute to free (NormLayer)

    def __init__(self, config, hidden_size: int, eps: float = 1e-6):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class PartWeight(nn.Module):
    """γ of one part (``<part>_norm.weight``): this rank's contiguous shard, TP-partitioned along dim 0."""

    def __init__(self, config, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width, dtype=config.params_dtype))
        set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)


class OutputNorms(nn.Module):
    """RMSNorms of the parts of a column-parallel linear's output, each over its full width.

    The rank's output features are laid out [groups, slots, length] and the slots are split into
    consecutive parts (q heads, k, v of a query group; or W_1, W_3 of fc1). Part p has its own
    weight γ_p (this rank's contiguous shard of the global vector, tagged TP-partitioned) and

        y_p = γ_p ⊙ x_p / sqrt(Σ_{all ranks} Σ x_p² / width_p + ε)

    with one all-reduce of the per-part sums of squares over TP (its backward all-reduces too:
    every rank's output depends on the sums).
    """

    def __init__(self, config, parts: dict[str, int], groups: int, length: int, eps: float, tp_group):
        super().__init__()
        self.eps, self.groups, self.length, self.tp_group = eps, groups, length, tp_group
        self.slots = dict(parts)  # part name -> number of slots
        self.slot_part = [p for p, n in enumerate(self.slots.values()) for _ in range(n)]  # slot -> its part
        tp = tp_group.size()
        self.full_width = [n * groups * length * tp for n in self.slots.values()]
        for name, n in self.slots.items():
            self.add_module(f"{name}_norm", PartWeight(config, groups * n * length))

    def part_weight(self, name: str) -> nn.Parameter:
        return getattr(self, f"{name}_norm").weight

    def weight(self) -> torch.Tensor:
        """γ in the linear's local layout [groups, slots, length]."""
        parts = [self.part_weight(name).view(self.groups, n, self.length) for name, n in self.slots.items()]
        return torch.cat(parts, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slots = sum(self.slots.values())
        x32 = x.to(stats_dtype(x)).view(*x.shape[:-1], self.groups, slots, self.length)
        per_slot = x32.pow(2).sum(-1).sum(-2)  # [..., slots]
        sums = torch.stack([s.sum(-1) for s in per_slot.split(list(self.slots.values()), dim=-1)], dim=-1)
        sums = copy_to_tensor_model_parallel_region(reduce_from_tensor_model_parallel_region(sums, self.tp_group),
                                                    self.tp_group)
        rstd = torch.rsqrt(sums / sums.new_tensor(self.full_width) + self.eps)  # [..., parts]
        y = (x32 * rstd[..., self.slot_part].unsqueeze(-1).unsqueeze(-3)).to(x.dtype)
        return (self.weight() * y).reshape(x.shape)


def tensor_parallel_group(linear: nn.Module):
    """The linear's TP group (Megatron's linears keep it as ``tp_group``, its TE linears as ``_tp_group``;
    the global one otherwise)."""
    for name in ("_tp_group", "tp_group"):
        if (group := getattr(linear, name, None)) is not None:
            return group
    return parallel_state.get_tensor_model_parallel_group()


class NormedOutput:
    """Mixed into one of Megatron's parallel linears (``normed_linear``): its output goes through
    ``self.output_norm`` (built by ``make_output_norm``); checkpoint keys keep the linear's names
    plus ``output_norm.*``, TP-sharded where the norm is."""

    def __init__(self, *args, config, **kwargs):
        super().__init__(*args, config=config, **kwargs)
        self.output_norm = self.make_output_norm(config, tensor_parallel_group(self))

    def forward(self, x, *args, **kwargs):
        out, bias = super().forward(x, *args, **kwargs)
        assert bias is None, "SimpleNorm's linears have no bias"
        return self.output_norm(out), None

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        norm = {f"output_norm.{name}": p for name, p in self.output_norm.named_parameters()}
        sharded.update(tp_sharded_entries(norm, prefix, sharded_offsets, metadata, tensor_parallel_group(self)))
        return sharded


def tp_sharded_entries(params: dict, prefix: str, sharded_offsets, metadata, tp_group) -> dict:
    """Checkpoint entries of ``params`` (name → parameter): TP-sharded along dim 0 where tagged
    TP-partitioned, replicated otherwise."""
    axes = {name: 0 for name, p in params.items() if getattr(p, "tensor_model_parallel", False)}
    return make_sharded_tensors_for_checkpoint(params, prefix, axes, sharded_offsets, tp_group=tp_group,
                                               dp_cp_group=(metadata or {}).get("dp_cp_group"))


class QKVNorms(NormedOutput):
    """linear_qkv: per query group [q heads of the group..., k, v], head_dim rows each."""

    def make_output_norm(self, config, tp_group):
        tp = tp_group.size()
        groups = config.num_query_groups or config.num_attention_heads
        per_group = config.num_attention_heads // groups
        return OutputNorms(config, {"q": per_group, "k": 1, "v": 1}, groups // tp, config.kv_channels,
                           config.layernorm_epsilon, tp_group)


class FC1Norms(NormedOutput):
    """linear_fc1 of the SwiGLU: [W_1 rows; W_3 rows] of this rank's shard."""

    def make_output_norm(self, config, tp_group):
        return OutputNorms(config, {"gate": 1, "up": 1}, 1, config.ffn_hidden_size // tp_group.size(),
                           config.layernorm_epsilon, tp_group)


class FullWidthNorm(NormedOutput):
    """linear_proj / linear_fc2: full-width outputs (sequence-split under SP), a TP-replicated RMSNorm."""

    def make_output_norm(self, config, tp_group):
        return RMSNorm(config, config.hidden_size, config.layernorm_epsilon)


@functools.cache
def normed_linear(norms: type, linear: type) -> type:
    """``linear`` (Megatron's or Transformer Engine's parallel linear) with ``norms`` on its output."""
    return type(f"{norms.__name__}{linear.__name__}", (norms, linear), {"__module__": __name__})


def depth_scaled_std(std: float, layer: int) -> float:
    """SimpleGPT's ``depth_init``: 0.02/√(2·(layer_id+1)), layer_id 0-based (l = layer_id + 1)."""
    return std / math.sqrt(2 * layer)


@torch.no_grad()
def depth_init(layer, std: float) -> None:
    """W_o, W_2 and W_3 (the second half of fc1's global [W_1; W_3]) with the depth-scaled std;
    each drawn whole in the layer's stream (``redraw_``), so the same in every layout."""
    scaled = depth_scaled_std(std, layer.layer_number)
    ffn = layer.config.ffn_hidden_size

    def fc1_init(fc1: torch.Tensor) -> None:
        fc1[:ffn].normal_(0.0, std)  # W_1
        fc1[ffn:].normal_(0.0, scaled)  # W_3

    redraw_(layer.self_attention.linear_proj.weight, init_method_normal(scaled))
    redraw_(layer.mlp.linear_fc1.weight, fc1_init)
    redraw_(layer.mlp.linear_fc2.weight, init_method_normal(scaled))


def head_init(std: float):
    """SimpleGPT's LM head: trunc-normal with std d^-½, truncated at ±3σ."""

    def init(weight: torch.Tensor) -> torch.Tensor:
        return nn.init.trunc_normal_(weight, 0.0, std, -3 * std, 3 * std)

    return init


class SimpleNorm(Scheme):
    name = "simplenorm"
    summary = "q,k,v = Norm(W_{q,k,v} x); x' = x + Norm(W_o a); x' = x + Norm(W_2(silu(Norm(W_1 x)) ⊙ Norm(W_3 x)))"

    def norm_module(self, cfg, position):
        return (RMSNorm if position == "final" else NoNorm), {}

    def linear_modules(self, cfg, column_linear, row_linear) -> dict:
        return {"linear_qkv": normed_linear(QKVNorms, column_linear),
                "linear_proj": normed_linear(FullWidthNorm, row_linear),
                "linear_fc1": normed_linear(FC1Norms, column_linear),
                "linear_fc2": normed_linear(FullWidthNorm, row_linear)}

    def configure_layer(self, layer, cfg):
        if layer.config.perform_initialization:
            depth_init(layer, cfg.model.init_std)
        for sublayer, norm, residual in layer.sublayers():
            pre_norm(layer, sublayer, norm, residual)

    def te_final_norm(self, cfg) -> bool:
        return True

    def transformer_config_overrides(self, cfg) -> dict:
        return {"embedding_init_method_std": 1.0}

    def head_init_method(self, cfg):
        return head_init(cfg.model.hidden_size ** -0.5)

    def decays_all_parameters(self, cfg) -> bool:
        return True

    def check(self, cfg, opts):
        if cfg.gpas.enabled and cfg.gpas.position == "after_norm":
            raise ConfigError("gpas.position=after_norm gates the output of the pre-norm, and norm.scheme=simplenorm "
                              "has none (its norms follow the linears): use after_sublayer (GPAS after each residual "
                              "add), before_sublayer or after_branch")
        m = cfg.model
        groups = m.num_query_groups or m.num_attention_heads
        if groups % cfg.parallel.tensor or m.ffn_hidden_size % cfg.parallel.tensor:
            raise ConfigError(f"norm.scheme=simplenorm shards its q/k/v and MLP norms with the projections: "
                              f"model.num_query_groups ({groups}) and model.ffn_hidden_size ({m.ffn_hidden_size}) "
                              f"must be multiples of parallel.tensor ({cfg.parallel.tensor})")

    def export_plan(self, cfg) -> ExportPlan:
        return ExportPlan(llama_reason="SimpleNorm normalises the output of every linear, which no stock Llama does",
                          hf_fields={"norm_type": "none", "final_norm_type": "rmsnorm", "linear_output_norm": True})


SIMPLENORM_SCHEMES = (SimpleNorm(),)
