"""The Hugging Face configuration of a run: from its ``run_config.yaml`` (export) and back (import)."""

from __future__ import annotations

from megatron_gpas.hf.configuration_megatron_gpas import MegatronGPASConfig
from megatron_gpas.hf.mapping import AttentionShape

# What an exported directory's config.json needs to load our class with trust_remote_code.
AUTO_MAP = {
    "AutoConfig": "configuration_megatron_gpas.MegatronGPASConfig",
    "AutoModel": "modeling_megatron_gpas.MegatronGPASModel",
    "AutoModelForCausalLM": "modeling_megatron_gpas.MegatronGPASForCausalLM",
}
# Fields of our class beyond LlamaConfig, and the run_config entries they come from.
SCHEME_FIELDS = ("norm_scheme", "mixln_post_layers", "lns_mode", "gpas", "gpas_activation", "gpas_silu_beta",
                 "gpas_position", "gpas_per_sublayer", "gpas_stop_gradient", "norm_type", "norm_bias",
                 "final_norm_type", "bhyt_kappa", "linear_output_norm", "normalized_transformer",
                 "approximately_normalized", "qk_norm", "attention_position_factor")


def custom_config(run_config: dict, hf_fields: dict, *, bos_token_id=None, eos_token_id=None,
                  dtype=None) -> MegatronGPASConfig:
    """Our HF class' config for a run (every field from the run's effective config; ``hf_fields``:
    the scheme's description of its norms, from its export plan)."""
    m, n, g = run_config["model"], run_config["norm"], run_config["gpas"]
    heads = m["num_attention_heads"]
    mixln_post = n.get("mixln_post_layers")
    return MegatronGPASConfig(
        vocab_size=m["vocab_size"],
        hidden_size=m["hidden_size"],
        intermediate_size=m["ffn_hidden_size"],
        num_hidden_layers=m["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=m.get("num_query_groups") or heads,
        head_dim=m.get("kv_channels") or m["hidden_size"] // heads,
        max_position_embeddings=m["max_seq_length"],
        rms_norm_eps=n["eps"],
        rope_parameters={"rope_type": "default", "rope_theta": float(m["rope_base"])},
        hidden_act="silu",
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        initializer_range=m.get("init_std", 0.02),
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=None,
        dtype=dtype,
        norm_scheme=n["scheme"],
        mixln_post_layers=m["num_layers"] // 4 if mixln_post is None else mixln_post,
        lns_mode=n.get("lns_mode", "init"),
        gpas=bool(g["enabled"]),
        gpas_activation=g["activation"],
        gpas_silu_beta=float(g["silu_beta"]),
        gpas_position=g["position"],
        gpas_per_sublayer=bool(g["per_sublayer"]),
        gpas_stop_gradient=bool(g["stop_gradient"]),
        **hf_fields,
    )


def llama_config(config: MegatronGPASConfig, biases: bool = False):
    """The stock LlamaConfig with the same shape (for native exports); ``biases``: the attention and
    MLP linears have biases (a norm's bias folded into its consumers)."""
    from transformers import LlamaConfig

    fields = {k: v for k, v in config.to_dict().items() if k not in SCHEME_FIELDS}
    for key in ("model_type", "architectures", "auto_map", "transformers_version"):
        fields.pop(key, None)
    fields.update(attention_bias=biases, mlp_bias=biases)
    return LlamaConfig(**fields)


def attention_shape(config) -> AttentionShape:
    return AttentionShape(hidden=config.hidden_size, heads=config.num_attention_heads,
                          groups=config.num_key_value_heads, head_dim=config.head_dim,
                          ffn=config.intermediate_size)
