"""Parameter counts of a configured model, without materialising it (``--dry-run``).

Each pipeline stage is built as the trainer builds it (the same GPTModel chunks, the scheme's
norms, transforms and GPAS gates) on PyTorch's meta device: shapes without storage, so
Llama-3-8B costs no more memory than the tiny model. Megatron-Core reads its layout (TP/PP
ranks and groups) from process groups; a single-process "fake" process group (PyTorch's, whose
collectives do nothing) stands in for the job, once per pipeline stage, as its first
tensor-parallel rank.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron.core import parallel_state

from megatron_gpas.config import Config, padded_vocab_size
from megatron_gpas.model.builder import build_model_chunks, transformer_config
from megatron_gpas.optim import MUON, optimizer_route


@dataclass
class StageCount:
    stage: int  # pipeline rank
    layers: list[tuple[int, int]]  # global 1-based layer ranges, one per model chunk (virtual stage)
    parameters: int  # the stage's parameters, over all its tensor-parallel ranks
    per_rank: int  # what one tensor-parallel rank of the stage holds
    embedding: bool  # holds the input embedding
    head: bool  # holds the final norm and the LM head
    per_rank_muon: int = 0  # of per_rank: the trainable parameters optim.optimizer=muon routes to Muon
    per_rank_trainable: int = 0  # of per_rank: the ones any optimizer updates (gpas.freeze leaves gates out)


@dataclass
class ParameterCount:
    total: int
    embedding: int  # input embedding (padded vocabulary × hidden)
    head: int  # LM head (untied), padded vocabulary × hidden
    stages: list[StageCount]

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding - self.head


def _ranges(numbers: list[int]) -> list[tuple[int, int]]:
    return [(numbers[0], numbers[-1])] if numbers else []


def count_parameters(cfg: Config) -> ParameterCount:
    """The model's parameters per pipeline stage, as the configured layout splits them."""
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    if dist.is_initialized():
        raise RuntimeError("count_parameters builds its own stand-in process groups; call it before any starts")
    cfg = copy.deepcopy(cfg)
    # Transformer Engine's modules hold the same parameters under the same names (spec.py); its
    # GEMMs need a GPU, the count does not.
    cfg.model.backend, cfg.train.fp8 = "local", None
    p = cfg.parallel
    model_config = transformer_config(cfg, bf16=False, on_cpu=True)
    model_config.perform_initialization = False
    tp = p.tensor
    stages, embedding, head = [], 0, 0
    for stage in range(p.pipeline):
        # Megatron's rank order puts TP innermost: the stage's first rank is stage × TP (DP = 1)
        dist.init_process_group("fake", rank=stage * tp, world_size=tp * p.pipeline, store=FakeStore())
        try:
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=tp, pipeline_model_parallel_size=p.pipeline,
                virtual_pipeline_model_parallel_size=p.virtual_pipeline if p.virtual_pipeline > 1 else None,
                create_gloo_process_groups=False,
            )
            with torch.device("meta"):
                chunks = build_model_chunks(cfg, model_config)
        finally:
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
        whole = per_rank = muon = trainable = 0
        for chunk in chunks:
            for name, param in chunk.named_parameters():
                # a tensor-parallel weight is split over the TP ranks; the others are replicated
                n = param.numel() * (tp if getattr(param, "tensor_model_parallel", False) else 1)
                whole += n
                per_rank += param.numel()
                if param.requires_grad:
                    trainable += param.numel()
                    # the routing rule of optim.py (Megatron's own), for the planner's Muon state
                    muon += param.numel() if optimizer_route(param) == MUON else 0
                if name.startswith("embedding."):
                    embedding += n
                elif name.startswith("output_layer."):
                    head += n
        stages.append(StageCount(
            stage=stage,
            layers=[r for chunk in chunks for r in _ranges([layer.layer_number for layer in chunk.decoder.layers])],
            parameters=whole, per_rank=per_rank, per_rank_muon=muon, per_rank_trainable=trainable,
            embedding=any(chunk.pre_process for chunk in chunks), head=any(chunk.post_process for chunk in chunks),
        ))
    return ParameterCount(total=sum(s.parameters for s in stages), embedding=embedding, head=head, stages=stages)


def describe_parameters(cfg: Config, count: ParameterCount) -> list[str]:
    """Console lines: totals, then one line per pipeline stage."""
    m, tp = cfg.model, cfg.parallel.tensor
    padded = padded_vocab_size(m, tp)
    vocab = f"vocabulary {m.vocab_size:,}" + (f" padded to {padded:,}" if padded != m.vocab_size else "")
    lines = [f"parameters {count.total:,}: embedding {count.embedding:,}, LM head {count.head:,}, "
             f"non-embedding {count.non_embedding:,} ({vocab}, hidden {m.hidden_size:,})"]
    for s in count.stages:
        parts = ["embedding"] if s.embedding else []
        parts += [f"layers {a}-{b}" if a != b else f"layer {a}" for a, b in s.layers]
        parts += ["final norm + LM head"] if s.head else []
        lines.append(f"pipeline stage {s.stage}: {', '.join(parts)}: {s.parameters:,} parameters, "
                     f"{s.per_rank:,} per tensor-parallel rank (TP={tp})")
    return lines
