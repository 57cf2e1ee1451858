"""Build Megatron-Core GPTModel chunks (one per virtual pipeline stage) from our Config."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import init_method_normal

from megatron_gpas.config import Config, head_dim, padded_vocab_size
from megatron_gpas.model.fused import gate_kernels
from megatron_gpas.model.init import init_stream, redraw_, seeded_init_method
from megatron_gpas.model.norms import RMSNorm
from megatron_gpas.model.schemes import get_scheme
from megatron_gpas.model.spec import decoder_block_spec
from megatron_gpas.model.sublayer import ResidualAdd
from megatron_gpas.model.unit_norm import normalize_weights_


def transformer_config(cfg: Config, *, bf16: bool, on_cpu: bool) -> TransformerConfig:
    m, p = cfg.model, cfg.parallel
    dtype = torch.bfloat16 if bf16 else torch.float32
    use_te = m.backend == "te"
    fields = dict(
        # shape
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=head_dim(m),
        ffn_hidden_size=m.ffn_hidden_size,
        # Llama block: RMSNorm, SwiGLU, no biases, no dropout (as the GPAS code)
        # the norm TE fuses where the scheme allows it (our own modules everywhere else)
        normalization="LayerNorm" if cfg.norm.kind == "layernorm" else "RMSNorm",
        layernorm_epsilon=cfg.norm.eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # init (official GPAS code): every linear N(0, 0.02) — no depth scaling of the
        # output projections — and the embedding N(0, sqrt(2/5))
        init_method_std=m.init_std,
        output_layer_init_method=init_method_normal(m.init_std),
        embedding_init_method_std=m.embedding_init_std,
        # drawn on the CPU on GPU machines too: whole tensors, then each TP rank's shard, so the
        # initial weights do not depend on the layout (model/init.py)
        use_cpu_initialization=True,
        # parallelism
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline if p.virtual_pipeline > 1 else None,
        sequence_parallel=p.sequence_parallel,
        pipeline_dtype=dtype,
        # gloo mixes up batched isend/irecv under interleaving (megatron-notes §9.4)
        batch_p2p_comm=not on_cpu,
        # precision (FP8 GEMMs through Transformer Engine on top of BF16)
        bf16=bf16,
        params_dtype=dtype,
        fp8=cfg.train.fp8,
        **({"fp8_recipe": cfg.train.fp8_recipe} if cfg.train.fp8 else {}),
        # fusions: only where the kernels exist
        bias_dropout_fusion=not on_cpu,
        masked_softmax_fusion=False,
        apply_rope_fusion=use_te,
        gradient_accumulation_fusion=use_te,
        persist_layer_norm=False,
        attention_softmax_in_fp32=True,
        **recompute_fields(cfg),
    )
    fields.update(get_scheme(cfg).transformer_config_overrides(cfg))
    # the word embedding draws from a stream of its own (model/init.py), with the scheme's std
    fields["embedding_init_method"] = seeded_init_method(init_method_normal(fields["embedding_init_method_std"]),
                                                         cfg.train.seed, "embedding")
    return TransformerConfig(**fields)


def recompute_fields(cfg: Config) -> dict:
    """train.recompute as Megatron-Core's TransformerConfig fields: selective checkpoints the named
    modules inside every layer; full checkpoints whole layers in TransformerBlock (uniform: groups
    of recompute_num_layers; block: the first recompute_num_layers of each model chunk)."""
    t = cfg.train
    if t.recompute == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": list(t.recompute_modules)}
    if t.recompute == "full":
        return {"recompute_granularity": "full", "recompute_method": t.recompute_method,
                "recompute_num_layers": t.recompute_num_layers}
    return {}


def schedule_config(cfg: Config, config: TransformerConfig) -> TransformerConfig:
    """The config Megatron's DDP and pipeline schedules read: pipeline stages exchange the
    residual stream, ``[s, b, hidden_size]``, so its width is the scheme's residual width (the
    modules keep theirs)."""
    width = get_scheme(cfg).residual_width(cfg)
    if width == config.hidden_size:
        return config
    schedule = copy.copy(config)
    schedule.hidden_size = width
    return schedule


def attach_embedding_transform(model: GPTModel, transform: nn.Module) -> None:
    """x_0 = transform(embedding(tokens)); the module is ``model.embedding_transform``."""
    model.embedding_transform = transform
    model.embedding.register_forward_hook(lambda module, args, output: model.embedding_transform(output))


def attach_head_transform(model: GPTModel, transform: nn.Module) -> None:
    """logits = output_layer(transform(h)); the module is ``model.head_transform``."""
    model.head_transform = transform

    def transform_input(module, args, kwargs):
        return (model.head_transform(args[0]), *args[1:]), kwargs

    model.output_layer.register_forward_pre_hook(transform_input, with_kwargs=True)


def attach_logit_transform(model: GPTModel, transform: nn.Module) -> None:
    """logits = transform(output_layer(h)); the module is ``model.logit_transform``."""
    model.logit_transform = transform

    def transform_output(module, args, output):
        logits, bias = output
        return model.logit_transform(logits), bias

    model.output_layer.register_forward_hook(transform_output)


def _in_stream(seed: int, make_transform, cfg: Config, config: TransformerConfig):
    """A scheme's transform, its random init drawn from the stream named after it."""
    with init_stream(seed, make_transform.__name__):
        return make_transform(cfg, config)


def set_fusions(model: nn.Module, cfg: Config) -> None:
    """Every norm and residual add of ``model`` on the fused paths the config asks for (norm.fused,
    gpas.fused); the modules' own default is the unfused formula."""
    kernels = gate_kernels(cfg.gpas.fused)
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.fused = cfg.norm.fused and module.fusable
        elif isinstance(module, ResidualAdd):
            module.gate_kernels = kernels


def build_model_chunks(cfg: Config, config: TransformerConfig) -> list[GPTModel]:
    """One GPTModel per virtual pipeline stage held by this rank (a single one without VP), on
    the current GPU when there is one.

    Every random init draws from a stream named by what it initialises (model/init.py), so the
    weights are those of a one-process build whatever the TP/PP/VP layout: the embedding (its
    init method), each layer (``NormLayer``), the LM head (the one remaining draw in GPTModel's
    construction, which therefore runs in the head's stream) and the schemes' transforms.
    """
    vp = cfg.parallel.virtual_pipeline
    seed = cfg.train.seed
    scheme = get_scheme(cfg)
    chunks = []
    for vp_stage in range(vp) if vp > 1 else [None]:
        with init_stream(seed, "output_layer"):
            model = GPTModel(
                config=config,
                transformer_layer_spec=decoder_block_spec(cfg, config, vp_stage),
                vocab_size=padded_vocab_size(cfg.model, cfg.parallel.tensor),
                max_sequence_length=cfg.train.seq_length,
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                share_embeddings_and_output_weights=False,
                position_embedding_type="rope",
                rotary_base=int(cfg.model.rope_base),
                parallel_output=True,
                vp_stage=vp_stage,
            )
        head_init = scheme.head_init_method(cfg)
        if model.post_process and head_init is not None and config.perform_initialization:
            with init_stream(seed, "output_layer", "head_init"):  # drawn whole: the same in every TP layout
                redraw_(model.output_layer.weight, head_init)
        if model.pre_process and (transform := _in_stream(seed, scheme.embedding_transform, cfg, config)) is not None:
            attach_embedding_transform(model, transform)
        if model.post_process and (transform := _in_stream(seed, scheme.head_transform, cfg, config)) is not None:
            attach_head_transform(model, transform)
        if model.post_process and (transform := scheme.logit_transform(cfg, config, model.output_layer)) is not None:
            attach_logit_transform(model, transform)
        if config.perform_initialization:  # on the sphere at init (vectors cut by TP: all-reduced sums)
            normalize_weights_(scheme.unit_norm_axes(model))
        set_fusions(model, cfg)
        chunks.append(model)
    # built on the CPU (use_cpu_initialization); used where the GPU is. A meta-device build (parameter
    # counts, the trainer's memory check) stays where it is: meta tensors cannot be copied
    on_meta = any(param.is_meta for chunk in chunks for param in chunk.parameters())
    if torch.cuda.is_available() and not on_meta:
        chunks = [chunk.cuda(torch.cuda.current_device()) for chunk in chunks]
    return chunks
