"""Text generation from the Megatron model chunks of a Trainer, in any TP/PP/VP layout (``tools/generate.py``).

Each step runs the whole sequence forward again (no KV cache) through the trainer's own pipeline
schedule, forward only, and takes the logits at each prompt's last position from the last
pipeline stage: gathered over tensor parallelism, then broadcast over the pipeline, so every rank
holds them and draws the same next token (sampling uses one seeded CPU generator per process,
seeded alike). Prompts of different lengths share a batch, right-padded: attention is causal, so
the padding after a sequence never changes its logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class SamplingSettings:
    """``temperature`` 0 is greedy (argmax); else logits / temperature, then ``top_k`` (0: all)
    and ``top_p`` (1: all, nucleus sampling) restrict the tokens drawn from."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def check(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max new tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.top_k < 0:
            problems.append(f"top-k must be >= 0 (0: no limit), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top-p must be in (0, 1], got {self.top_p}")
        if problems:
            raise ValueError("; ".join(problems))


def restrict(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """``logits`` [n, V] with the tokens outside the top-k and outside the top-p nucleus (the
    fewest most probable tokens whose probabilities sum to at least top_p) set to -inf."""
    logits = logits.clone()
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits[logits < kth] = float("-inf")
    if top_p < 1:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        # drop a token when the more probable ones alone already reach top_p (the first always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        logits.scatter_(-1, order, ordered.masked_fill(drop, float("-inf")))
    return logits


def next_tokens(logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator) -> torch.Tensor:
    """One token per row of ``logits`` [n, V] (float32, CPU)."""
    if settings.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(restrict(logits / settings.temperature, settings.top_k, settings.top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _logits_step(device, data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"].to(device), batch["position_ids"].to(device), None)
    return output, lambda output_tensor, non_loss_data=True: output_tensor  # the logits, collected as they are


@torch.no_grad()
def last_logits(trainer, sequences: list[list[int]]) -> torch.Tensor:
    """[n, vocab] float32 CPU logits at the last token of each sequence, on every rank."""
    from megatron.core import parallel_state

    cfg, device = trainer.cfg, trainer.device
    lengths = [len(s) for s in sequences]
    tp = cfg.parallel.tensor
    width = -(-max(lengths) // tp) * tp  # sequence parallelism splits the sequence over TP ranks
    tokens = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        tokens[row, :len(seq)] = torch.tensor(seq)
    batch = {"tokens": tokens, "position_ids": torch.arange(width).expand_as(tokens).contiguous()}
    # Interleaved pipelining needs a multiple of parallel.pipeline micro-batches: the same batch
    # again (the tool sets the global batch so), its logits read from the first.
    repeats = trainer.num_microbatches
    iterators = [iter([batch] * repeats) for _ in trainer.model]
    store = trainer.forward_backward(
        forward_step_func=lambda it, model: _logits_step(device, it, model),
        data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=trainer.model if len(trainer.model) > 1 else trainer.model[0],
        num_microbatches=repeats, seq_length=width, micro_batch_size=len(sequences),
        forward_only=True, collect_non_loss_data=True)
    vocab = cfg.model.vocab_size  # the padded columns are no tokens
    picked = torch.empty(len(sequences), vocab, dtype=torch.float32, device=device)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        # [n, width, V / TP], the output layer's vocabulary shard: its last positions, then gathered
        rows = torch.arange(len(sequences), device=device)
        shard = store[0][rows, torch.tensor(lengths, device=device) - 1].float().contiguous()
        shards = [torch.empty_like(shard) for _ in range(tp)]
        dist.all_gather(shards, shard, group=parallel_state.get_tensor_model_parallel_group())
        picked.copy_(torch.cat(shards, dim=-1)[:, :vocab])
    if cfg.parallel.pipeline > 1:
        dist.broadcast(picked, parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    return picked.cpu()


@torch.no_grad()
def generate(trainer, prompts: list[list[int]], settings: SamplingSettings, eos_id: int | None) -> list[list[int]]:
    """The new tokens after each prompt: up to ``settings.max_new_tokens``, ending with
    ``eos_id`` when the model produces it. Collective: every rank of the job calls it."""
    from megatron_gpas.training import params_synced

    settings.check()
    if not prompts or any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts) + settings.max_new_tokens
    if longest > trainer.cfg.train.seq_length:  # the model was built for train.seq_length positions
        raise ValueError(f"prompt + new tokens reach {longest} positions, more than train.seq_length "
                         f"{trainer.cfg.train.seq_length}")
    generator = torch.Generator().manual_seed(settings.seed)
    sequences = [list(p) for p in prompts]
    new: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for chunk in trainer.model:
        chunk.eval()
    with params_synced(trainer.model):
        for _ in range(settings.max_new_tokens):
            picked = next_tokens(last_logits(trainer, sequences), settings, generator).tolist()
            for row, token in enumerate(picked):
                if done[row]:
                    continue
                new[row].append(token)
                sequences[row].append(token)
                done[row] = token == eos_id
            if all(done):
                break
    return new
