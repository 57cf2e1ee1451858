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

Every other scheme (OSP, DyT, BHyT, Pre-(C)RMSNorm) is a pre-norm host; its norm module is
``norm_type`` (the exporter folds embedding/head transforms and centring into the weights):

    rmsnorm    γ ⊙ x / sqrt(mean(x²) + ε) (+ β)        layernorm  γ ⊙ (x − μ)/sqrt(var + ε) (+ β)
    dyt        γ ⊙ tanh(α·x)
    bhyt       γ ⊙ tanh(λ·x / (κ·sqrt(m + ε))): m = mean(x²) in front of the attention, and
               (1 − act(α))²·(mean(x²) + c_attn·λ₁²/κ²) of the layer input x in front of the MLP
    bhytstar   the same with m = mean(x²) of the norm's own input everywhere

SimpleNorm (``linear_output_norm``, norm_type ``none``: no pre-norms) puts an RMSNorm on the output
of every projection (q, k, v over their whole width, o, gate, up, down):

    simplenorm x' = x + RMSNorm_o(W_o·Attn(RMSNorm_q(W_q x), RMSNorm_k(W_k x), RMSNorm_v(W_v x)))
               x' = x + RMSNorm_down(W_down(silu(RMSNorm_gate(W_gate x)) ⊙ RMSNorm_up(W_up x)))

nGPT (``normalized_transformer``, norm_type and final_norm_type ``none``), norm(v) = v/‖v‖₂, scales stored
reparameterised as trained (s = ŝ · factor, base = 1/√d):

    q, k = RoPE(W_q x, W_k x);  q, k ← s_qk ⊙ norm_head(q), s_qk ⊙ norm_head(k)   s_qk = ŝ_qk·√d
    x' = norm(norm(x) + |α_A| ⊙ (norm(W_o Attn(q, k, v; scale √head_dim)) − norm(x)))   α = α̂·0.05·√d
    x' = norm(norm(x) + |α_M| ⊙ (norm(W_down(silu(√d·s_gate ⊙ W_gate x) ⊙ √d·s_up ⊙ W_up x)) − norm(x)))
    logits = s_z ⊙ (W_head x)                                                       s_z = ŝ_z·√d

anGPT (``normalized_transformer`` and ``approximately_normalized``): the same scales, its constant factors
ν folded into the weights (W_v, W_o, W_down, s_gate, s_up; W_q, W_k without ``qk_norm``), no norms of x:

    x' = ν(α) ⊙ (x + |α| ⊙ (f(x) − x)),  ν(α) = 1/√(α² + (1 − α)²)   (f: nGPT's attention or MLP, unnormalised)

All other models end with the final norm (``final_norm_type``, default ``norm_type``) and an untied LM
head. Depends only on torch and transformers (≥ 5).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.llama.modeling_llama import (
    ALL_ATTENTION_FUNCTIONS,
    LlamaAttention,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
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


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, bias: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def forward(self, x: torch.Tensor, mean_square=None) -> torch.Tensor:
        y = self.weight * self.normalize(x)
        return y if self.bias is None else y + self.bias


class LayerNorm(RMSNorm):
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        centred = x.float() - x.float().mean(-1, keepdim=True)
        return (centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class NoNorm(nn.Module):
    def forward(self, x: torch.Tensor, mean_square=None) -> torch.Tensor:
        return x


class NormedLinear(nn.Linear):
    """y = RMSNorm(W x) over the whole output (SimpleNorm); the norm's weight is ``<proj>.norm.weight``."""

    def __init__(self, linear: nn.Linear, eps: float):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None,
                         device=linear.weight.device, dtype=linear.weight.dtype)
        self.norm = RMSNorm(linear.out_features, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x))


def normalize_linear_outputs(module: nn.Module, names: tuple[str, ...], eps: float) -> None:
    for name in names:
        setattr(module, name, NormedLinear(getattr(module, name), eps))


class DynamicTanh(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.alpha = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor, mean_square=None) -> torch.Tensor:
        return self.weight * torch.tanh(self.alpha.float() * x.float()).to(x.dtype)


class BoundedTanh(nn.Module):
    def __init__(self, hidden_size: int, eps: float, kappa: float, estimated: bool = False):
        super().__init__()
        self.eps, self.kappa = eps, kappa
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.lam = nn.Parameter(torch.ones(1))
        if estimated:  # BHyT's post-attention norm: c_attn of its layer (computed in training)
            self.register_buffer("c_attn", torch.zeros(1))

    def forward(self, x: torch.Tensor, mean_square=None) -> torch.Tensor:
        x32 = x.float()
        if mean_square is None:
            mean_square = x32.pow(2).mean(-1, keepdim=True)
        r = torch.rsqrt(mean_square + self.eps) / self.kappa
        return self.weight * torch.tanh(self.lam.float() * r * x32).to(x.dtype)


def make_norm(config: MegatronGPASConfig, position: str) -> nn.Module:
    """The norm of ``position`` (attention | mlp | final | branch)."""
    kind = config.final_norm_type if position == "final" and config.final_norm_type else config.norm_type
    if kind in ("rmsnorm", "layernorm"):
        return (LayerNorm if kind == "layernorm" else RMSNorm)(config.hidden_size, config.rms_norm_eps,
                                                             config.norm_bias)
    if kind == "none":
        return NoNorm()
    if kind == "dyt":
        return DynamicTanh(config.hidden_size)
    if kind in ("bhyt", "bhytstar"):
        estimated = kind == "bhyt" and position == "mlp"
        return BoundedTanh(config.hidden_size, config.rms_norm_eps, config.bhyt_kappa, estimated)
    raise ValueError(f"unknown norm_type {kind!r}")


def unit(x: torch.Tensor) -> torch.Tensor:
    """x / ‖x‖₂ along the last axis, in fp32, cast back."""
    x32 = x.float()
    return (x32 / x32.norm(dim=-1, keepdim=True)).to(x.dtype)


class NGPTAttention(LlamaAttention):
    """Llama's attention with nGPT's q/k: s_qk ⊙ norm_head(·) after RoPE (without the norm when
    ``qk_norm`` is off), scores scaled by √head_dim; anGPT's position factor √(t + 1) on the output."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.scaling = math.sqrt(self.head_dim)
        self.sqk = nn.Parameter(torch.ones(config.num_attention_heads * self.head_dim))
        self.sqk_factor = math.sqrt(config.hidden_size)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                cache=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q, k, v = (proj(hidden_states).view(hidden_shape).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        s = (self.sqk * self.sqk_factor).view(-1, 1, self.head_dim).to(q.dtype)  # [heads, 1, head_dim]
        q, k = (s * unit(q), s * unit(k)) if self.config.qk_norm else (s * q, s * k)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attention(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
        out = out.reshape(*input_shape, -1)
        if self.config.attention_position_factor:
            out = out * (kwargs["position_ids"] + 1).to(out.dtype).sqrt().unsqueeze(-1)
        return self.o_proj(out.contiguous()), weights


class NGPTMLP(LlamaMLP):
    """SwiGLU with s_uv·√d on the gate and up projections' outputs."""

    def __init__(self, config):
        super().__init__(config)
        self.suv_gate = nn.Parameter(torch.ones(config.intermediate_size))
        self.suv_up = nn.Parameter(torch.ones(config.intermediate_size))
        self.suv_factor = math.sqrt(config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x) * (self.suv_gate * self.suv_factor).to(x.dtype)
        up = self.up_proj(x) * (self.suv_up * self.suv_factor).to(x.dtype)
        return self.down_proj(self.act_fn(gate) * up)


class ScaledHead(nn.Linear):
    """logits = s_z ⊙ (W x), s_z = ŝ_z·√d (nGPT); ``sz`` is ŝ_z."""

    def __init__(self, config):
        super().__init__(config.hidden_size, config.vocab_size, bias=False)
        self.sz = nn.Parameter(torch.ones(config.vocab_size))
        self.sz_factor = math.sqrt(config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * (self.sz * self.sz_factor).to(x.dtype)


class MegatronGPASDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: MegatronGPASConfig, layer_idx: int):
        super().__init__()
        self.config = config
        layer_number = layer_idx + 1
        scheme = config.norm_scheme
        self.ngpt = config.normalized_transformer
        self.self_attn = (NGPTAttention if self.ngpt else LlamaAttention)(config=config, layer_idx=layer_idx)
        self.mlp = (NGPTMLP if self.ngpt else LlamaMLP)(config)
        if self.ngpt:  # α̂ of the sphere updates (α = α̂·0.05·√d)
            self.attn_alpha = nn.Parameter(torch.ones(config.hidden_size))
            self.mlp_alpha = nn.Parameter(torch.ones(config.hidden_size))
            self.alpha_factor = 0.05 * math.sqrt(config.hidden_size)
        if config.linear_output_norm:
            normalize_linear_outputs(self.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj"), config.rms_norm_eps)
            normalize_linear_outputs(self.mlp, ("gate_proj", "up_proj", "down_proj"), config.rms_norm_eps)
        self.input_layernorm = make_norm(config, "attention")
        self.post_attention_layernorm = make_norm(config, "mlp")
        # Sandwich-LN: a norm on each sub-layer's output before the add.
        sandwich = scheme == "sandwich"
        self.attn_output_norm = make_norm(config, "branch") if sandwich else None
        self.mlp_output_norm = make_norm(config, "branch") if sandwich else None
        self.estimated_statistics = config.norm_type == "bhyt"  # BHyT's post-attention norm

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

    def residual_block(self, x, norm, sublayer_fn, branch_norm, sublayer: int, mean_square=None) -> torch.Tensor:
        if self.ngpt:
            alpha = ((self.attn_alpha, self.mlp_alpha)[sublayer] * self.alpha_factor).abs().to(x.dtype)
            if self.config.approximately_normalized:  # x' = ν(α) ⊙ (x + |α| ⊙ (f(x) − x))
                return torch.rsqrt(alpha.square() + (1 - alpha).square()) * (x + alpha * (sublayer_fn(x) - x))
            a = unit(x)  # x' = norm(norm(x) + |α| ⊙ (norm(f(x)) − norm(x)))
            return unit(a + alpha * (unit(sublayer_fn(x)) - a))
        if self.post_norm:
            shortcut = self.gate(x, sublayer, "shortcut") * self.shortcut_scale
            return norm(shortcut + sublayer_fn(x))
        x = self.gate(x, sublayer, "before_sublayer")
        y = norm(x, mean_square)
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

        estimate = self.post_attention_estimate(hidden_states) if self.estimated_statistics else None
        hidden_states = self.residual_block(hidden_states, self.input_layernorm, attention, self.attn_output_norm, 0)
        return self.residual_block(hidden_states, self.post_attention_layernorm, self.mlp, self.mlp_output_norm, 1,
                                   estimate)

    def post_attention_estimate(self, x: torch.Tensor) -> torch.Tensor:
        """BHyT: mean(h²) of the MLP norm's input h estimated from the layer input x."""
        x = self.gate(x, 0, "before_sublayer")
        lam = self.input_layernorm.lam.float()
        estimate = x.float().pow(2).mean(-1, keepdim=True) + self.post_attention_layernorm.c_attn * lam.square() \
            / self.input_layernorm.kappa ** 2
        if self.gpas_alpha is not None and self.gate_position == "after_sublayer":
            alpha = self.gpas_alpha[0]
            scale = 1.0 - gate_activation(self.config.gpas_activation, alpha.float(), self.config.gpas_silu_beta)
            estimate = estimate * scale.square()
        return estimate


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
        self.norm = make_norm(config, "final")
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class MegatronGPASForCausalLM(MegatronGPASPreTrainedModel, LlamaForCausalLM):
    def __init__(self, config: MegatronGPASConfig):
        MegatronGPASPreTrainedModel.__init__(self, config)
        self.model = MegatronGPASModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = ScaledHead(config) if config.normalized_transformer else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


__all__ = ["MegatronGPASForCausalLM", "MegatronGPASModel", "MegatronGPASPreTrainedModel"]
