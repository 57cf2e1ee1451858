"""Declarative Megatron-Core specs for our layers: which module fills which slot.

Backends:
  local  Megatron-Core's own parallel linears and DotProductAttention + our RMSNorm.
         Runs on CPU and GPU.
  te     Transformer Engine GEMMs and fused attention (GPU, BF16/FP8). Schemes whose
         input norm is a plain pre-norm keep TE's fused LayerNorm-Linear.
"""

from __future__ import annotations

import dataclasses
import functools

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_submodules,
    get_gpt_layer_with_transformer_engine_submodules,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_gpas.config import Config
from megatron_gpas.model.layer import NormLayer
from megatron_gpas.model.norms import RMSNorm
from megatron_gpas.model.schemes import SCHEMES


@functools.cache
def transformer_engine_available() -> bool:
    try:
        import torch
        import transformer_engine.pytorch  # noqa: F401

        return torch.cuda.is_available()
    except Exception:
        return False


def layer_submodules(cfg: Config):
    scheme = SCHEMES[cfg.norm.scheme]
    if cfg.model.backend == "te":
        if not scheme.fusable_input_norm:
            raise NotImplementedError(f"the te backend has no unfused layout yet for scheme '{scheme.name}'")
        # LayerNorm-Linear fused: the input norms live inside linear_qkv / linear_fc1.
        return get_gpt_layer_with_transformer_engine_submodules()
    submodules = get_gpt_layer_local_submodules(normalization="RMSNorm")
    # Megatron's local RMSNorm (WrappedTorchNorm) refuses sequence parallelism; ours is SP-correct.
    # The keys map (input_layernorm. -> self_attention.linear_qkv.layer_norm_) is kept, so
    # checkpoints stay interchangeable with the TE layout.
    return dataclasses.replace(submodules, input_layernorm=RMSNorm, pre_mlp_layernorm=RMSNorm)


def layer_spec(cfg: Config) -> ModuleSpec:
    return ModuleSpec(
        module=NormLayer,
        params={"scheme": cfg.norm.scheme, "gpas": cfg.gpas},
        submodules=layer_submodules(cfg),
    )


def final_norm(cfg: Config):
    if cfg.model.backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return RMSNorm


def decoder_block_spec(cfg: Config, config: TransformerConfig, vp_stage: int | None) -> TransformerBlockSubmodules:
    """The layers this pipeline rank (and virtual stage) builds, plus the final norm."""
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer_spec(cfg)] * num_layers, layer_norm=final_norm(cfg))
