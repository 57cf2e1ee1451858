"""Hugging Face implementation of the megatron_gpas schemes (shipped inside exported model directories).

Every layer runs its two sub-layers f ∈ {attention, MLP} (Llama's own modules, so KV caching,
attention backends and generation work as for Llama) through one residual block; l is the
1-based layer number, N the number of layers, G the GPAS gate of the layer:

    pre / lns   x' = x + f(LN(x))            (lns fixed: LN(x)·1/√l)   GPAS: x' = G(x + f(LN(x)))
    sandwich    x' = x + LN_b(f(LN(x)))                                 GPAS: after the add
    post        x' = LN(x + f(x))                                       GPAS: x' = LN(G(x) + f(x))
    deepnorm    x' = LN(a·x + f(x)), a = (2N)^¼                         GPAS: x' = LN(a·G(x) + f(x))
    mixln       layers l ≤ mixln_post_layers as post, the rest as pre

    G(y) = y − act(α)·stopgrad(y);  pre-norm hosts may place G before the sub-layer
    (y = G(x); x' = y + f(LN(y))), after the norm (f(G(LN(x)))) or after the branch (G(f(...)))

All models end with the final RMSNorm and an untied LM head. Depends only on torch and
transformers (≥ 5).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from .configuration_megatron_gpas import MegatronGPASConfig


def gate_activation(name: str, alpha: torch.Tensor, silu_beta: float) -> torch.Tensor:
    if name == "silu":
        return F.silu(alpha)
    if name == "scaled_silu":
        return alpha * torch.sigmoid(silu_beta * alpha)
    if name == "tanh":
        return torch.tanh(alpha)
    if name == "relu":
        return F.relu(alpha)
    if name == "leaky_relu":
        return F.leaky_relu(alpha, negative_slope=0.01)
    if name == "identity":
        return alpha
    raise ValueError(f"unknown GPAS activation {name!r}")


class MegatronGPASDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: MegatronGPASConfig, layer_idx: int):
        super().__init__()
        self.config = config
        layer_number = layer_idx + 1
        scheme = config.norm_scheme
        self.self_attn = LlamaAttention(config=config, layer_idx=layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # Sandwich-LN: a norm on each sub-layer's output before the add.
        sandwich = scheme == "sandwich"
        self.attn_output_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps) if sandwich else None
        self.mlp_output_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps) if sandwich else None

        self.post_norm = scheme in ("post", "deepnorm") or (scheme == "mixln" and layer_number <= config.mixln_post_layers)
        self.shortcut_scale = (2 * config.num_hidden_layers) ** 0.25 if scheme == "deepnorm" else 1.0
        self.norm_output_scale = 1.0 / math.sqrt(layer_number) if scheme == "lns" and config.lns_mode == "fixed" else 1.0
        self.gpas_alpha = nn.Parameter(torch.zeros(2 if config.gpas_per_sublayer else 1)) if config.gpas else None
        # Post-norm layers gate the shortcut (the paper's DeepNorm/Post placement).
        self.gate_position = "shortcut" if self.post_norm else config.gpas_position

    def gate(self, x: torch.Tensor, sublayer: int, position: str) -> torch.Tensor:
        if self.gpas_alpha is None or position != self.gate_position:
            return x
        alpha = self.gpas_alpha[sublayer if self.config.gpas_per_sublayer else 0]
        a = gate_activation(self.config.gpas_activation, alpha, self.config.gpas_silu_beta).to(x.dtype)
        return x - a * (x.detach() if self.config.gpas_stop_gradient else x)

    def residual_block(self, x, norm, sublayer_fn, branch_norm, sublayer: int) -> torch.Tensor:
        if self.post_norm:
            shortcut = self.gate(x, sublayer, "shortcut") * self.shortcut_scale
            return norm(shortcut + sublayer_fn(x))
        x = self.gate(x, sublayer, "before_sublayer")
        y = norm(x)
        if self.norm_output_scale != 1.0:
            y = y * self.norm_output_scale
        y = sublayer_fn(self.gate(y, sublayer, "after_norm"))
        if branch_norm is not None:
            y = branch_norm(y)
        out = x + self.gate(y, sublayer, "after_branch")
        return self.gate(out, sublayer, "after_sublayer")

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, position_embeddings=None, **kwargs) -> torch.Tensor:
        def attention(y):
            return self.self_attn(hidden_states=y, attention_mask=attention_mask, position_ids=position_ids,
                                  past_key_values=past_key_values, use_cache=use_cache,
                                  position_embeddings=position_embeddings, **kwargs)[0]

        hidden_states = self.residual_block(hidden_states, self.input_layernorm, attention, self.attn_output_norm, 0)
        return self.residual_block(hidden_states, self.post_attention_layernorm, self.mlp, self.mlp_output_norm, 1)


class MegatronGPASPreTrainedModel(LlamaPreTrainedModel):
    config_class = MegatronGPASConfig
    config: MegatronGPASConfig
    _no_split_modules = ["MegatronGPASDecoderLayer"]
    _can_record_outputs = {"hidden_states": MegatronGPASDecoderLayer, "attentions": LlamaAttention}

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, MegatronGPASDecoderLayer) and module.gpas_alpha is not None:
            from transformers import initialization as init

            init.zeros_(module.gpas_alpha)


class MegatronGPASModel(MegatronGPASPreTrainedModel, LlamaModel):
    def __init__(self, config: MegatronGPASConfig):
        MegatronGPASPreTrainedModel.__init__(self, config)  # LlamaModel.__init__ would build Llama layers
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [MegatronGPASDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class MegatronGPASForCausalLM(MegatronGPASPreTrainedModel, LlamaForCausalLM):
    def __init__(self, config: MegatronGPASConfig):
        MegatronGPASPreTrainedModel.__init__(self, config)
        self.model = MegatronGPASModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


__all__ = ["MegatronGPASForCausalLM", "MegatronGPASModel", "MegatronGPASPreTrainedModel"]
