"""Causal self-attention through PyTorch's ``scaled_dot_product_attention`` (flash attention).

Megatron-Core's ``DotProductAttention`` (the ``local`` backend's core attention until now)
materialises the ``[b, heads, s, s]`` score matrix; at sequence 8192 that alone rules out
large shapes without Transformer Engine. ``SDPAttention`` is a drop-in for it in the layer spec
(``core_attention``: same constructor and forward arguments, same ``[s, b, hp]`` output) that
lets PyTorch pick a fused kernel (flash / memory-efficient on CUDA, the flash kernel on CPU).

What the core attention sees under parallelism is unchanged: tensor parallelism hands it this
rank's heads (and whole KV groups, validated in config), sequence parallelism acts on the
linear layers only, so the sequence here is always the full one.

It computes only what our models use: causal self-attention, no dropout, no mask or packed
sequences at run time, a plain softmax. Anything else is refused (config validation refuses
the config keys before any process group starts; the module refuses the rest when built or
called) rather than computed differently from ``DotProductAttention``.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


class SDPAttention(MegatronModule):
    """Causal core attention, ``[s, b, np, hn]`` query/key/value in, ``[s, b, np·hn]`` out."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ):
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        unsupported = {
            "a non-causal attention mask": attn_mask_type != AttnMaskType.causal,
            "attention dropout": dropout != 0,
            "context parallelism": config.context_parallel_size != 1,
            "sliding-window attention": config.window_size is not None,
            f"softmax_type={config.softmax_type!r}": config.softmax_type != "vanilla",
            # DotProductAttention's layer scaling divides the scores by the layer number and
            # multiplies them back inside the softmax (an fp16 overflow guard); not mirrored here
            "apply_query_key_layer_scaling": config.apply_query_key_layer_scaling,
        }
        refused = [what for what, present in unsupported.items() if present]
        if refused:
            raise NotImplementedError(f"SDPAttention (model.attention=sdpa) does not support {', '.join(refused)}; "
                                      "use model.attention=megatron")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type

        # this tensor-parallel rank's share of the heads, as DotProductAttention computes it
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        tp = pg_collection.tp.size()
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, tp)
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, tp)
        self.num_query_groups_per_partition = divide(config.num_query_groups, tp)
        self.softmax_scale = 1.0 / math.sqrt(config.kv_channels) if softmax_scale is None else softmax_scale

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params=None,
    ) -> Tensor:
        # The causal mask is built by the kernel (is_causal); a mask, bias or packed-sequence
        # boundaries given at run time would be ignored by it, so they are refused.
        if attention_mask is not None or attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("SDPAttention computes plain causal attention: attention masks, attention "
                                      "bias and packed sequences are not supported (use model.attention=megatron)")
        if attn_mask_type not in (None, AttnMaskType.causal):
            raise NotImplementedError(f"SDPAttention supports only causal masks, got {attn_mask_type}")
        sq, b = query.shape[:2]
        if key.size(0) != sq:  # a KV cache (inference) would need a bottom-right-aligned causal mask
            raise NotImplementedError(f"SDPAttention needs as many keys as queries, got {key.size(0)} and {sq}")
        # [s, b, n, hn] -> [b, n, s, hn], the layout SDPA takes (strided views, no copies)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        # GQA: SDPA shares each KV group among its query heads itself (no repeated K/V copies),
        # in the same order as DotProductAttention's repeat_interleave (head i uses group i // (np/ng))
        gqa = self.num_query_groups_per_partition < self.num_attention_heads_per_partition
        context = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=gqa)
        # [b, np, s, hn] -> [s, b, np·hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
