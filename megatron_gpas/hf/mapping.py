"""Name and layout mapping between Megatron-Core checkpoint tensors and Hugging Face Llama tensors.

Megatron side: global (unsharded) tensors of one layer, keyed by the suffix after
``decoder.layers.`` (dist-checkpoint keys, identical for the local and TE backends), plus the
non-layer tensors. HF side: ``model.layers.{i}.<suffix>`` of ``LlamaForCausalLM`` and of
our ``MegatronGPASForCausalLM`` (which adds ``gpas_alpha``, Sandwich's branch norms, norm biases,
DyT's α, BHyT's λ and c_attn). The embedding and head transforms of a scheme (a d×d projection
or a scalar) are folded into the embedding / head table at export (``fold_transforms``).

Layouts that are not a rename:
  linear_qkv  per query group g: [q heads of g ..., k_g, v_g] rows   <->  q_proj, k_proj, v_proj
  linear_fc1  [gate; up] rows                                        <->  gate_proj, up_proj
  embedding / output layer: Megatron pads the vocabulary (to a multiple of 128·TP); HF keeps
  the model's declared vocab_size rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MEGATRON_LAYER_PREFIX = "decoder.layers."

# Megatron layer suffix -> HF layer suffix, for tensors that only change name.
RENAMED_LAYER_TENSORS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
    "gpas.alpha": "gpas_alpha",
    "self_attn_bda.branch_norm.weight": "attn_output_norm.weight",
    "mlp_bda.branch_norm.weight": "mlp_output_norm.weight",
    "self_attn_bda.branch_norm.bias": "attn_output_norm.bias",
    "mlp_bda.branch_norm.bias": "mlp_output_norm.bias",
}
# The norms' other tensors keep their own name after the norm's HF name.
NORM_SLOTS = {"self_attention.linear_qkv.layer_norm_": "input_layernorm.",
              "mlp.linear_fc1.layer_norm_": "post_attention_layernorm."}
# Norms on the output of a linear (SimpleNorm): Megatron's fused q/k/v and gate/up hold one weight per part.
OUTPUT_NORMS = {
    "self_attention.linear_qkv.output_norm.q_norm.weight": "self_attn.q_proj.norm.weight",
    "self_attention.linear_qkv.output_norm.k_norm.weight": "self_attn.k_proj.norm.weight",
    "self_attention.linear_qkv.output_norm.v_norm.weight": "self_attn.v_proj.norm.weight",
    "self_attention.linear_proj.output_norm.weight": "self_attn.o_proj.norm.weight",
    "mlp.linear_fc1.output_norm.gate_norm.weight": "mlp.gate_proj.norm.weight",
    "mlp.linear_fc1.output_norm.up_norm.weight": "mlp.up_proj.norm.weight",
    "mlp.linear_fc2.output_norm.weight": "mlp.down_proj.norm.weight",
}
RENAMED_LAYER_TENSORS.update(OUTPUT_NORMS)
# nGPT's scales (stored reparameterised, as trained; the HF class applies the same factors).
NGPT_SCALES = {
    "self_attention.core_attention.sqk.weight": "self_attn.sqk",
    "mlp.linear_fc1.output_norm.gate.weight": "mlp.suv_gate",
    "mlp.linear_fc1.output_norm.up.weight": "mlp.suv_up",
    "self_attn_bda.alpha.weight": "attn_alpha",
    "mlp_bda.alpha.weight": "mlp_alpha",
}
RENAMED_LAYER_TENSORS.update(NGPT_SCALES)
NORM_TENSORS = ("bias", "alpha", "lam", "c_attn")  # RMSNorm/LayerNorm bias, DyT α, BHyT λ and c_attn
RENAMED_LAYER_TENSORS.update({megatron + name: hf + name for megatron, hf in NORM_SLOTS.items()
                              for name in NORM_TENSORS})
QKV = "self_attention.linear_qkv.weight"
FC1 = "mlp.linear_fc1.weight"
LAYER_TENSORS = (*RENAMED_LAYER_TENSORS, QKV, FC1)

# Megatron key -> HF key, outside the layers (the vocabulary dimension is dim 0 for both), in
# HF order; the final norm's optional tensors are written when the checkpoint has them.
GLOBAL_TENSORS = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    **{f"decoder.final_layernorm.{name}": f"model.norm.{name}" for name in NORM_TENSORS},
    "output_layer.weight": "lm_head.weight",
    "logit_transform.sz.weight": "lm_head.sz",  # nGPT's logit scale s_z
}
VOCAB_TENSORS = ("embedding.word_embeddings.weight", "output_layer.weight", "logit_transform.sz.weight")
HEAD_TENSORS = ("logit_transform.sz.weight",)  # written after lm_head.weight when the checkpoint has them
# Scheme transforms around the embedding and the LM head, folded into their tables at export.
EMBEDDING_PROJECTION, EMBEDDING_SCALE = "embedding_transform.weight", "embedding_transform.scale"
HEAD_PROJECTION = "head_transform.weight"
TRANSFORM_TENSORS = (EMBEDDING_PROJECTION, EMBEDDING_SCALE, HEAD_PROJECTION)


def fold_transforms(embedding: torch.Tensor, head: torch.Tensor, transforms: dict[str, torch.Tensor]):
    """(embedding, head) tables that compute the transforms themselves (float64 in, float64 out):
    x_0 = R₁·E[t] is (E·R₁ᵀ)[t];  s·E[t] is (s·E)[t];  W·(R₂·h) is (W·R₂)·h."""
    if EMBEDDING_PROJECTION in transforms:
        embedding = embedding @ transforms[EMBEDDING_PROJECTION].T
    if EMBEDDING_SCALE in transforms:
        embedding = embedding * transforms[EMBEDDING_SCALE].reshape(())
    if HEAD_PROJECTION in transforms:
        head = head @ transforms[HEAD_PROJECTION]
    return embedding, head


def hf_layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


@dataclass(frozen=True)
class AttentionShape:
    hidden: int
    heads: int
    groups: int  # key/value heads
    head_dim: int
    ffn: int

    @property
    def q_per_group(self) -> int:
        return self.heads // self.groups


def layer_to_hf(megatron: dict[str, torch.Tensor], shape: AttentionShape) -> dict[str, torch.Tensor]:
    """One layer's Megatron tensors (suffix -> tensor) as HF layer tensors (suffix -> tensor)."""
    hf = {RENAMED_LAYER_TENSORS[k]: v for k, v in megatron.items() if k in RENAMED_LAYER_TENSORS}
    if "gpas_alpha" in hf:
        hf["gpas_alpha"] = hf["gpas_alpha"].reshape(-1)  # [1] or [2] (one per sub-layer)
    for key in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        if key in hf and hf[key].numel() == 1:  # a single-scale norm (OSP's SSNorm): the same weight on every channel
            hf[key] = hf[key].expand(shape.hidden)
    s = shape
    qkv = megatron[QKV].view(s.groups, s.q_per_group + 2, s.head_dim, s.hidden)
    hf["self_attn.q_proj.weight"] = qkv[:, : s.q_per_group].reshape(s.heads * s.head_dim, s.hidden)
    hf["self_attn.k_proj.weight"] = qkv[:, s.q_per_group].reshape(s.groups * s.head_dim, s.hidden)
    hf["self_attn.v_proj.weight"] = qkv[:, s.q_per_group + 1].reshape(s.groups * s.head_dim, s.hidden)
    gate, up = megatron[FC1].split(s.ffn, dim=0)
    hf["mlp.gate_proj.weight"], hf["mlp.up_proj.weight"] = gate, up
    return {k: v.contiguous() for k, v in hf.items()}


def layer_from_hf(hf: dict[str, torch.Tensor], shape: AttentionShape) -> dict[str, torch.Tensor]:
    """The inverse of ``layer_to_hf`` (HF layer suffix -> tensor, to Megatron suffixes)."""
    back = {v: k for k, v in RENAMED_LAYER_TENSORS.items()}
    megatron = {back[k]: v for k, v in hf.items() if k in back}
    if "gpas.alpha" in megatron:
        megatron["gpas.alpha"] = megatron["gpas.alpha"].reshape(-1)
    s = shape
    q = hf["self_attn.q_proj.weight"].view(s.groups, s.q_per_group, s.head_dim, s.hidden)
    k = hf["self_attn.k_proj.weight"].view(s.groups, 1, s.head_dim, s.hidden)
    v = hf["self_attn.v_proj.weight"].view(s.groups, 1, s.head_dim, s.hidden)
    megatron[QKV] = torch.cat([q, k, v], dim=1).reshape(-1, s.hidden)
    megatron[FC1] = torch.cat([hf["mlp.gate_proj.weight"], hf["mlp.up_proj.weight"]], dim=0)
    return {k: v.contiguous() for k, v in megatron.items()}


def resize_vocab(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Keep the first ``rows`` vocabulary rows, or pad with zero rows (Megatron's padded vocabulary)."""
    if tensor.shape[0] >= rows:
        return tensor[:rows].contiguous()
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])
