"""Declarative Megatron-Core specs for our layers: which module fills which slot.

Backends:
  local  Megatron-Core's own parallel linears and DotProductAttention + our norms.
         Runs on CPU and GPU.
  te     Transformer Engine GEMMs and fused attention (GPU, BF16/FP8). When the scheme's
         input norm is a plain pre-norm feeding the GEMM, TE's fused LayerNorm-Linear is
         used; every other scheme gets the unfused layout (our norm module, TE linears),
         so FP8 still covers all GEMMs.
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
from megatron_gpas.model.layer import NormLayer
from megatron_gpas.model.norms import RMSNorm
from megatron_gpas.model.schemes import SCHEMES
from megatron_gpas.model.sublayer import SublayerNorm

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


def unfused_submodules(column_linear, row_linear, core_attention) -> TransformerLayerSubmodules:
    """Norm modules of our own in front of each sub-layer, the given GEMM/attention modules."""
    return TransformerLayerSubmodules(
        input_layernorm=SublayerNorm,
        self_attention=ModuleSpec(
            module=SelfAttention,
            params={"attn_mask_type": AttnMaskType.causal},
            submodules=SelfAttentionSubmodules(
                linear_qkv=column_linear, core_attention=core_attention, linear_proj=row_linear,
                q_layernorm=IdentityOp, k_layernorm=IdentityOp,
            ),
        ),
        self_attn_bda=get_bias_dropout_add,  # replaced by ResidualAdd in NormLayer
        pre_mlp_layernorm=SublayerNorm,
        mlp=functools.partial(MLP.as_mlp_submodule,
                              submodules=MLPSubmodules(linear_fc1=column_linear, linear_fc2=row_linear)),
        mlp_bda=get_bias_dropout_add,
        sharded_state_dict_keys_map=dict(NORM_KEYS_AS_FUSED),
    )


def layer_submodules(cfg: Config) -> TransformerLayerSubmodules:
    if cfg.model.backend == "local":
        return unfused_submodules(ColumnParallelLinear, RowParallelLinear, DotProductAttention)
    if SCHEMES[cfg.norm.scheme].fusable_input_norm(cfg.gpas.position):
        # LayerNorm-Linear fused: the input norms live inside linear_qkv / linear_fc1.
        return get_gpt_layer_with_transformer_engine_submodules()
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear,
        TEDotProductAttention,
        TERowParallelLinear,
    )

    return unfused_submodules(TEColumnParallelLinear, TERowParallelLinear, TEDotProductAttention)


def layer_spec(cfg: Config) -> ModuleSpec:
    return ModuleSpec(
        module=NormLayer,
        params={"norm": cfg.norm, "gpas": cfg.gpas},
        submodules=layer_submodules(cfg),
    )


def final_norm(cfg: Config):
    # Every scheme ends with a final RMSNorm, Post-LN and DeepNorm included (methods.md §1.3.7).
    if cfg.model.backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return RMSNorm


def decoder_block_spec(cfg: Config, config: TransformerConfig, vp_stage: int | None) -> TransformerBlockSubmodules:
    """The layers this pipeline rank (and virtual stage) builds, plus the final norm."""
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer_spec(cfg)] * num_layers, layer_norm=final_norm(cfg))
