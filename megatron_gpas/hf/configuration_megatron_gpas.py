"""Hugging Face configuration of a megatron_gpas model (shipped inside exported model directories).

A Llama configuration plus the normalization scheme and GPAS options of the run. This file
and ``modeling_megatron_gpas.py`` depend only on torch and transformers (≥ 5), so an exported
directory loads with ``trust_remote_code=True`` on a machine without megatron_gpas.
"""

from __future__ import annotations

from transformers import LlamaConfig


class MegatronGPASConfig(LlamaConfig):
    model_type = "megatron_gpas"

    norm_scheme: str = "pre"  # post | deepnorm | sandwich | mixln | lns; every other scheme is pre-norm
    mixln_post_layers: int = 0  # Mix-LN: layers 1..k are Post-LN
    lns_mode: str = "init"  # LNS: "fixed" multiplies each norm's output by 1/√l
    gpas: bool = False
    gpas_activation: str = "silu"  # silu | identity | tanh | relu | leaky_relu | scaled_silu
    gpas_silu_beta: float = 8.0
    gpas_position: str = "after_sublayer"  # pre-norm hosts: before_sublayer | after_norm | after_branch
    gpas_per_sublayer: bool = False
    gpas_stop_gradient: bool = True
    # the norm module (every position unless final_norm_type says otherwise):
    # rmsnorm | layernorm | dyt (γ⊙tanh(α·x)) | bhyt | bhytstar (γ⊙tanh(λ·x/(κ·rms))) | none (no pre-norm)
    norm_type: str = "rmsnorm"
    norm_bias: bool = False  # rmsnorm / layernorm with a bias β
    final_norm_type: str | None = None  # None: norm_type
    bhyt_kappa: float = 10.0
    linear_output_norm: bool = False  # SimpleNorm: an RMSNorm on the output of every projection
    normalized_transformer: bool = False  # nGPT: the sphere updates, s_qk/s_uv/s_z and the √head_dim attention scale (norm_type none)
    # anGPT (with normalized_transformer): h ← ν(α) ⊙ (h + α ⊙ (f(h) − h)), ν(α) = 1/√(α² + (1 − α)²), its
    # constant factors folded into the weights; qk_norm: the per-head q/k norms (False: none);
    # attention_position_factor: the attention output at position t (0-based) × √(t + 1)
    approximately_normalized: bool = False
    qk_norm: bool = True
    attention_position_factor: bool = False
