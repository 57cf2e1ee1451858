"""Declarative Megatron-Core specs for our layers: which module fills which slot.

The scheme (``schemes/``) says which norm module fills each position (attention, MLP,
final); ``sublayer_norm`` gives it the slot options (deferred, output scale, gates).

Backends:
  local  Megatron-Core's own parallel linears + our norms; the core attention is PyTorch's fused
         scaled_dot_product_attention (model.attention=sdpa, model/attention.py) or Megatron's
         DotProductAttention (model.attention=megatron). Runs on CPU and GPU.
  te     Transformer Engine GEMMs and fused attention (GPU, BF16/FP8; model.attention is ignored).
         When the scheme's input norm is a plain RMSNorm/LayerNorm feeding the GEMM, TE's fused LayerNorm-Linear
         is used (and TENorm for a plain final norm); every other scheme gets the unfused
         layout (our norm modules, TE linears), so FP8 still covers all GEMMs.
Checkpoint keys are the same in every layout (the norms are stored under TE's fused
names, ``...linear_qkv.layer_norm_weight``), so checkpoints move between backends.
"""

from __future__ import annotations

import functools

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_submodules
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

from megatron_gpas.config import Config
from megatron_gpas.model.attention import SDPAttention
from megatron_gpas.model.layer import NormLayer
from megatron_gpas.model.schemes import get_scheme
from megatron_gpas.model.sublayer import sublayer_norm

# Local layout keys -> TE's fused names, so the two layouts share checkpoints.
NORM_KEYS_AS_FUSED = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


@functools.cache
def transformer_engine_available() -> bool:
    try:
        import torch
        import transformer_engine.pytorch  # noqa: F401

        return torch.cuda.is_available()
    except Exception:
        return False


def norm_spec(cfg: Config, position: str, slot: bool = True) -> ModuleSpec:
    """The scheme's norm for ``position`` (attention | mlp | final), as a sub-layer slot or plain."""
    cls, kwargs = get_scheme(cfg).norm_module(cfg, position)
    return ModuleSpec(module=sublayer_norm(cls) if slot else cls, params=kwargs)


def unfused_submodules(cfg: Config, column_linear, row_linear, core_attention) -> TransformerLayerSubmodules:
    """Norm modules of our own in front of each sub-layer, the given GEMM/attention modules (the
    scheme's linears, built on them)."""
    scheme = get_scheme(cfg)
    linear = scheme.linear_modules(cfg, column_linear, row_linear)
    core_attention = scheme.core_attention(cfg, core_attention)
    return TransformerLayerSubmodules(
        input_layernorm=norm_spec(cfg, "attention"),
        self_attention=ModuleSpec(
            module=SelfAttention,
            params={"attn_mask_type": AttnMaskType.causal},
            submodules=SelfAttentionSubmodules(
                linear_qkv=linear["linear_qkv"], core_attention=core_attention, linear_proj=linear["linear_proj"],
                q_layernorm=IdentityOp, k_layernorm=IdentityOp,
            ),
        ),
        self_attn_bda=get_bias_dropout_add,  # replaced by ResidualAdd in NormLayer
        pre_mlp_layernorm=norm_spec(cfg, "mlp"),
        mlp=functools.partial(MLP.as_mlp_submodule,
                              submodules=MLPSubmodules(linear_fc1=linear["linear_fc1"], linear_fc2=linear["linear_fc2"])),
        mlp_bda=get_bias_dropout_add,
        sharded_state_dict_keys_map=dict(NORM_KEYS_AS_FUSED),
    )


def layer_submodules(cfg: Config) -> TransformerLayerSubmodules:
    if cfg.model.backend == "local":
        core_attention = SDPAttention if cfg.model.attention == "sdpa" else DotProductAttention
        return unfused_submodules(cfg, ColumnParallelLinear, RowParallelLinear, core_attention)
    if get_scheme(cfg).fusable_input_norm(cfg):
        # LayerNorm-Linear fused: the input norms live inside linear_qkv / linear_fc1.
        return get_gpt_layer_with_transformer_engine_submodules()
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear,
        TEDotProductAttention,
        TERowParallelLinear,
    )

    return unfused_submodules(cfg, TEColumnParallelLinear, TERowParallelLinear, TEDotProductAttention)


def layer_spec(cfg: Config) -> ModuleSpec:
    return ModuleSpec(module=NormLayer, params={"cfg": cfg}, submodules=layer_submodules(cfg))


def final_norm(cfg: Config):
    """The scheme's final norm (every scheme has one, Post-LN and DeepNorm included,
    methods.md §1.3.7); TENorm computes it on the te backend when it is a plain (RMS/Layer)Norm."""
    if cfg.model.backend == "te" and get_scheme(cfg).te_final_norm(cfg):
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return norm_spec(cfg, "final", slot=False)


def decoder_block_spec(cfg: Config, config: TransformerConfig, vp_stage: int | None) -> TransformerBlockSubmodules:
    """The layers this pipeline rank (and virtual stage) builds, plus the final norm."""
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer_spec(cfg)] * num_layers, layer_norm=final_norm(cfg))
