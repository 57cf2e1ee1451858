"""Run planner: parameters, FLOPs, per-GPU memory and a layout search (``tools/plan_run.py``).

Every number is an estimate from the config alone, except the parameter counts, which come
from the model itself (``megatron_gpas.model.inventory``, built on the meta device as the
trainer builds it). The formulas and assumptions, also printed by the tool:

FLOPs per token
  * Megatron's formula (``metrics.flops_per_token``, used for MFU): causal attention counted
    once, 6·[L·(h·(q+2kv) + q·s + q·h + 3·h·f) + h·V].
  * legacy 6·N: six FLOPs per parameter per token (forward 2, backward 4), N = all parameters,
    embedding included; it ignores attention's s-dependent term.

Per-GPU memory (bytes), P = the parameters one GPU holds (its pipeline stage, its TP shard):
  * weights: 2·P in BF16 runs, 4·P in FP32 runs.
  * gradients: 4·P, our DDP reduces gradients in fp32 (``grad_reduce_in_fp32=True``).
  * optimizer state: Adam: fp32 master weights + two fp32 moments = 12·P in BF16 runs (no master
    in FP32 runs: 8·P); Muon: one fp32 momentum for the parameters it routes to Muon (2-D
    matrices, optim.py's rule) + master weights, and Adam's two moments for the rest. The
    distributed optimizer divides the optimizer state (master weights included) by DP.
  * activations: Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
    Transformer Models"), per layer and micro-batch s·b·h·(34 + 5·a·s/h) bytes for a GPT layer
    (GeLU MLP of 4h, dropout). Adapted term by term to our layer (Llama: RMSNorm, SwiGLU of
    width f with three matrices, GQA with q = a·d query and kv = g·d key/value widths, no
    dropout, so no masks):
        replicated over TP ranks (split by t only with sequence parallelism):
            norm inputs 4·sbh, attention input (QKV GEMM) 2·sbh, MLP input (fc1) 2·sbh = 8·sbh
        split over TP ranks:
            Q 2·sbq, K and V 2·sb·kv each, attention output (proj input) 2·sbq  = sb·(4q + 4kv)
            fc1 output (gate and up, 2f wide) 4·sbf, SwiGLU output (fc2 input) 2·sbf = 6·sbf
            attention scores: softmax output 2·a·s²·b (no dropout: no mask, no dropout output,
            so 2 of the paper's 5·a·s²·b) with ``model.attention=megatron`` on the ``local``
            backend (DotProductAttention materialises them); none with the default ``sdpa`` or on
            ``te`` (fused/flash attention keeps no s² tensor, only a·s·b softmax statistics).
    With GeLU (6f→4f), q = kv = h and the paper's dropout terms back this is exactly 34 + 5as/h.
    Recomputation (``train.recompute``, Megatron-Core's): selective drops what its modules
    (``train.recompute_modules``) would keep: core_attn the s² term, mlp the fc1 and SwiGLU
    outputs (6·sbf/t; its input stays), layernorm the norm outputs (the QKV and fc1 inputs, 4·sbh,
    /t with SP). Full keeps only the input of each group of ``recompute_num_layers`` layers,
    2·sbh (/t with SP), and holds one group's activations but one layer's while the group is
    recomputed (one layer's transient is left out, as in the paper); block keeps the inputs of
    its first ``recompute_num_layers`` layers and everything of the others.
    The last stage adds the final norm and LM head inputs (2·sbh each, /t with SP) and the
    logits, s·b·V/t in BF16 plus fp32 for the cross entropy (6 bytes).
    FP32 runs store 4-byte activations: twice all of this (logits: 8 bytes).
    In-flight micro-batches (1F1B): pipeline rank i holds min(p − i, m) micro-batches' worth;
    interleaved with v chunks, Megatron's warm-up 2·(p − i − 1) + (v − 1)·p + 1 chunks (rank 0:
    L·(1 + (p − 1)/(p·v)) layers, the paper's factor).
  * not counted: CUDA context, NCCL and cuBLAS workspaces, allocator fragmentation, pipeline
    send/receive buffers, temporaries during the optimizer step; a fixed reserve
    (``RESERVE_GIB``) and a margin (``MARGIN``) of the GPU's memory stand for them.

Throughput model (ranks layouts; not a measurement): tokens/s = MFU·peak·N / FLOPs per token, with
MFU = ``BASE_MFU`` (NeMo's Llama-3-8B figure, targets.md) × TP × pipeline × micro-batch × recompute
efficiencies:
  * TP: 1 − 0.05·log2(t) within a node of 8 GPUs (all-reduce/all-gather per layer on NVLink);
    t > 8 crosses nodes: × 0.5.
  * pipeline bubble: v·m / (v·m + p − 1) (Megatron: bubble (p − 1)/(v·m) of the ideal time).
  * micro-batch: GEMMs below 8192 tokens per micro-batch lose 3% per halving.
  * recompute: selective ≈ 0.97 (the attention core forward again), full = 3/4 (a second
    forward: 8 instead of 6 FLOPs per parameter and token).
  * DP, the distributed optimizer and SP are taken as free (communication overlapped; SP moves
    the same volume as TP's all-reduce), so ties go to the layout using less memory.

The estimate is checked against measured peak memory only on a GPU (tools/gpu_check.py); the
tests here check the formulas against hand computations and the counts against the model.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field

from megatron_gpas.config import Config, ConfigError, head_dim, padded_vocab_size, recompute_overrides
from megatron_gpas.metrics import PEAK_BF16_TFLOPS, flops_per_token
from megatron_gpas.model.inventory import ParameterCount, count_parameters

GIB = 2**30
RESERVE_GIB = 3.0  # CUDA context, NCCL/cuBLAS workspaces (a few GiB on H100 in practice)
MARGIN = 0.10  # of the GPU's memory, for fragmentation and temporaries
BASE_MFU = 0.528  # NeMo, Llama-3-8B on H100, same formula (targets.md)
GPUS_PER_NODE = 8
RECOMPUTE = ("none", "selective", "full")
RECOMPUTE_EFFICIENCY = {"none": 1.0, "selective": 0.97, "full": 0.75}


def parse_memory(text: str) -> float:
    """'80GB', '80GiB', '141 GB', '0.5TB' → bytes. GB is read as GiB: an "80GB" GPU (H100)
    has 80 GiB (81,559 MiB), so the vendor's GB is the binary one."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(GB|GIB|G|TB|TIB|T|MB|MIB|M)?\s*", str(text).upper())
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"--gpu-mem: expected a positive size like 80GB, 141GiB or 0.5TB, got {text!r}")
    unit = (match.group(2) or "GB")[0]
    return float(match.group(1)) * {"M": 2**20, "G": 2**30, "T": 2**40}[unit]


def bf16_run(cfg: Config) -> bool:
    # auto = BF16 on a GPU, which is what a plan is for
    return cfg.train.precision in ("auto", "bf16")


# --------------------------------------------------------------------------- formulas


def legacy_flops_per_token(total_parameters: int) -> float:
    return 6.0 * total_parameters


def activation_bytes_per_layer(cfg: Config, micro_batch: int, recompute: str = "none") -> float:
    """One layer's stored activations for one micro-batch on one GPU (module docstring); selective
    recomputes ``train.recompute_modules``, full stands for one layer's kept input."""
    m, p = cfg.model, cfg.parallel
    s, b, h, t = cfg.train.seq_length, micro_batch, m.hidden_size, p.tensor
    sp = p.sequence_parallel and t > 1
    width = 1 if bf16_run(cfg) else 2  # the formula counts 2-byte activations; FP32 runs store 4
    if recompute == "full":
        return width * 2 * s * b * h / (t if sp else 1)
    modules = cfg.train.recompute_modules if recompute == "selective" else ()
    d = head_dim(m)
    q, kv = m.num_attention_heads * d, (m.num_query_groups or m.num_attention_heads) * d
    replicated = 8 * s * b * h - (4 * s * b * h if "layernorm" in modules else 0)
    split = s * b * (4 * q + 4 * kv + (0 if "mlp" in modules else 6 * m.ffn_hidden_size))
    if "core_attn" not in modules and m.backend != "te" and m.attention == "megatron":
        split += 2 * m.num_attention_heads * s * s * b
    return width * ((replicated / (t if sp else 1)) + split / t)


def chunk_activation_bytes(cfg: Config, micro_batch: int, recompute: str, layers: int, in_flight: int) -> float:
    """The activations a model chunk of ``layers`` layers holds at its peak with ``in_flight``
    micro-batches' worth stored. Full recompute follows train.recompute_method and
    recompute_num_layers when the config asks for full, else Megatron's uniform groups of 1."""
    if recompute != "full":
        return in_flight * layers * activation_bytes_per_layer(cfg, micro_batch, recompute)
    t = cfg.train
    method, n = (t.recompute_method, t.recompute_num_layers) if t.recompute == "full" else ("uniform", 1)
    kept = activation_bytes_per_layer(cfg, micro_batch, "full")
    whole = activation_bytes_per_layer(cfg, micro_batch, "none")
    if method == "block":
        n = min(n, layers)
        return in_flight * (n * kept + (layers - n) * whole)
    # the group being recomputed in the backward holds n layers' activations (one is not counted, as for n = 1)
    return in_flight * math.ceil(layers / n) * kept + (n - 1) * whole


def last_stage_extra_bytes(cfg: Config, micro_batch: int) -> float:
    """Final norm and LM head inputs, and the logits (BF16 + fp32 for the cross entropy)."""
    m, p = cfg.model, cfg.parallel
    s, b, h, t = cfg.train.seq_length, micro_batch, m.hidden_size, p.tensor
    sp = p.sequence_parallel and t > 1
    width = 1 if bf16_run(cfg) else 2
    return width * 4 * s * b * h / (t if sp else 1) + (6 if bf16_run(cfg) else 8) * s * b * padded_vocab_size(m, t) / t


def in_flight_chunks(pipeline: int, virtual: int, rank: int, microbatches: int) -> int:
    """Model chunks' worth of micro-batch activations pipeline rank ``rank`` holds at its peak
    (1F1B warm-up + 1; interleaved: Megatron's warm-up count), capped at all of them."""
    if pipeline == 1:
        return 1
    if virtual == 1:
        return min(pipeline - rank, microbatches)
    return min(2 * (pipeline - rank - 1) + (virtual - 1) * pipeline + 1, microbatches * virtual)


@dataclass
class StageMemory:
    stage: int
    parameters: int  # on one GPU
    weights: float
    gradients: float
    optimizer: float
    activations: float
    in_flight: int  # model chunks' worth of micro-batches held (see in_flight_chunks)

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


def memory_per_gpu(cfg: Config, count: ParameterCount, world_size: int,
                   recompute: str | None = None) -> list[StageMemory]:
    """Per-GPU memory of each pipeline stage on ``world_size`` GPUs (one TP rank; the ranks of a
    stage hold equal shares up to replicated norms), with ``recompute`` (default: the config's
    train.recompute). Formulas in the module docstring."""
    p, t = cfg.parallel, cfg.train
    recompute = t.recompute if recompute is None else recompute
    dp = world_size // (p.tensor * p.pipeline)
    microbatches = t.global_batch_size // (t.micro_batch_size * dp)
    bf16 = bf16_run(cfg)
    layers_per_chunk = cfg.model.num_layers // (p.pipeline * p.virtual_pipeline)
    out = []
    for st in count.stages:
        n, trainable = st.per_rank, st.per_rank_trainable or st.per_rank
        if cfg.optim.optimizer == "muon":
            muon = st.per_rank_muon
            # Muon: one momentum for its matrices; Adam: two moments for the rest; master weights for all (BF16)
            state = 4 * muon + 8 * (trainable - muon) + (4 * trainable if bf16 else 0)
        else:
            state = (12 if bf16 else 8) * trainable
        if p.distributed_optimizer:
            state /= dp
        chunks = in_flight_chunks(p.pipeline, p.virtual_pipeline, st.stage, microbatches)
        acts = chunk_activation_bytes(cfg, t.micro_batch_size, recompute, layers_per_chunk, chunks)
        if st.head:
            acts += last_stage_extra_bytes(cfg, t.micro_batch_size)
        out.append(StageMemory(stage=st.stage, parameters=n, weights=(2 if bf16 else 4) * n,
                               gradients=4 * trainable, optimizer=state, activations=acts, in_flight=chunks))
    return out


# --------------------------------------------------------------------------- throughput


def efficiencies(cfg: Config, world_size: int, recompute: str) -> dict[str, float]:
    p, t = cfg.parallel, cfg.train
    dp = world_size // (p.tensor * p.pipeline)
    m = t.global_batch_size // (t.micro_batch_size * dp)
    tp = 1 - 0.05 * math.log2(p.tensor)
    if p.tensor > GPUS_PER_NODE:
        tp *= 0.5
    v = p.virtual_pipeline
    bubble = v * m / (v * m + p.pipeline - 1)
    tokens = t.micro_batch_size * t.seq_length
    mb = max(0.5, 1 - 0.03 * max(0.0, math.log2(8192 / tokens)))
    return {"tp": tp, "pipeline": bubble, "micro_batch": mb, "recompute": RECOMPUTE_EFFICIENCY[recompute]}


PARTS = ("weights", "gradients", "optimizer", "activations", "total")


@dataclass
class Layout:
    tensor: int
    pipeline: int
    data: int
    micro_batch: int
    sequence_parallel: bool
    distributed_optimizer: bool
    recompute: str
    memory_gib: float  # the heaviest stage, without reserve
    recompute_switch: list[str] = field(default_factory=list)  # overrides from the config's train.recompute to this one
    stage_memory_gib: list[dict] = field(default_factory=list)
    mfu: float = 0.0
    tokens_per_s: float = 0.0
    efficiencies: dict = field(default_factory=dict)

    @property
    def overrides(self) -> list[str]:
        out = [f"parallel.tensor={self.tensor}", f"parallel.pipeline={self.pipeline}",
               f"parallel.sequence_parallel={str(self.sequence_parallel).lower()}",
               f"parallel.distributed_optimizer={str(self.distributed_optimizer).lower()}",
               f"train.micro_batch_size={self.micro_batch}"]
        return out + self.recompute_switch

    @property
    def note(self) -> str:
        return f"with train.recompute={self.recompute}" if self.recompute_switch else ""


def _powers_of_two_dividing(n: int, limit: int) -> list[int]:
    return [d for d in (2**i for i in range(0, 31)) if d <= limit and n % d == 0]


def usable_bytes(gpu_memory: float, reserve_gib: float = RESERVE_GIB) -> float:
    return gpu_memory * (1 - MARGIN) - reserve_gib * GIB


def with_layout(cfg: Config, tensor: int, pipeline: int, micro_batch: int, sp: bool, dist_opt: bool,
                virtual: int = 1) -> Config:
    c = copy.deepcopy(cfg)
    c.parallel.tensor, c.parallel.pipeline, c.parallel.virtual_pipeline = tensor, pipeline, virtual
    c.parallel.sequence_parallel, c.parallel.distributed_optimizer = sp, dist_opt
    c.train.micro_batch_size = micro_batch
    return c


def evaluate_layout(cfg: Config, world_size: int, count: ParameterCount, recompute: str,
                    peak_flops: float) -> Layout:
    p, t = cfg.parallel, cfg.train
    dp = world_size // (p.tensor * p.pipeline)
    stages = memory_per_gpu(cfg, count, world_size, recompute)
    eff = efficiencies(cfg, world_size, recompute)
    mfu = BASE_MFU * math.prod(eff.values())
    return Layout(
        tensor=p.tensor, pipeline=p.pipeline, data=dp, micro_batch=t.micro_batch_size,
        sequence_parallel=p.sequence_parallel, distributed_optimizer=p.distributed_optimizer,
        recompute=recompute, memory_gib=max(s.total for s in stages) / GIB,
        recompute_switch=recompute_overrides(cfg, recompute),
        stage_memory_gib=[{"stage": s.stage, "parameters": s.parameters, "in_flight": s.in_flight,
                           **{k: getattr(s, k) / GIB for k in PARTS}} for s in stages],
        mfu=mfu, tokens_per_s=mfu * peak_flops * world_size / flops_per_token(cfg), efficiencies=eff,
    )


def search(cfg: Config, world_size: int, gpu_memory: float, peak_flops: float,
           max_tensor: int = GPUS_PER_NODE, reserve_gib: float = RESERVE_GIB) -> list[Layout]:
    """Every TP × PP × DP × micro-batch (× SP, distributed optimizer) layout of ``world_size``
    GPUs that passes our validation, with the cheapest recompute level that fits
    ``usable_bytes(gpu_memory)``; fastest first (ties: less memory). Global batch, sequence length
    and virtual pipeline (1) are the recipe's, not searched."""
    from megatron_gpas.validation import validate

    if world_size < 1:
        raise ConfigError(f"--gpus must be a positive number of GPUs, got {world_size}")
    budget = usable_bytes(gpu_memory, reserve_gib)
    counts: dict[tuple[int, int], ParameterCount] = {}
    out, valid, refusal = [], 0, None
    for tp in _powers_of_two_dividing(world_size, max_tensor):
        for pp in [d for d in range(1, world_size // tp + 1) if (world_size // tp) % d == 0]:
            dp = world_size // (tp * pp)
            for mb in _powers_of_two_dividing(cfg.train.global_batch_size, cfg.train.global_batch_size // dp or 1):
                for sp in ([False, True] if tp > 1 else [False]):
                    # with DP = 1 the distributed optimizer shards nothing: the same layout twice
                    for dist_opt in ((False, True) if dp > 1 else (False,)):
                        c = with_layout(cfg, tp, pp, mb, sp, dist_opt)
                        # the layout's checks; whether Transformer Engine is importable here is the
                        # planning machine's business, not the layout's (plans are made on laptops)
                        checked = copy.deepcopy(c)
                        checked.model.backend = "local"
                        try:
                            validate(checked, world_size=world_size, check_files=False, require_data=False)
                        except ConfigError as e:
                            refusal = refusal or e
                            continue
                        valid += 1
                        if (tp, pp) not in counts:
                            counts[(tp, pp)] = count_parameters(c)
                        for recompute in RECOMPUTE:
                            layout = evaluate_layout(c, world_size, counts[(tp, pp)], recompute, peak_flops)
                            if layout.memory_gib * GIB <= budget:
                                out.append(layout)
                                break  # more recompute only costs time
    if not valid:
        gpus = f"{world_size} GPU{'s' if world_size > 1 else ''}"
        raise ConfigError(f"no TP x PP x DP x micro-batch layout of {gpus} passes validation "
                          f"(global batch {cfg.train.global_batch_size}); e.g.: {refusal}")
    out.sort(key=lambda l: (-l.tokens_per_s, l.memory_gib))
    return out


def peak_flops_of(gpu: str) -> float:
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key.upper() == gpu.upper():
            return PEAK_BF16_TFLOPS[key] * 1e12
    raise ConfigError(f"--gpu: unknown GPU {gpu!r}; known: {', '.join(PEAK_BF16_TFLOPS)}")


# --------------------------------------------------------------------------- the trainer's check


def _heaviest(cfg: Config, count: ParameterCount, world_size: int) -> StageMemory:
    return max(memory_per_gpu(cfg, count, world_size), key=lambda s: s.total)


def with_recompute(cfg: Config, level: str) -> Config:
    """``cfg`` at recompute ``level`` (a level it does not ask for takes Megatron's defaults)."""
    c = copy.deepcopy(cfg)
    if level != c.train.recompute:
        defaults = type(c.train)()
        for key in ("recompute_modules", "recompute_method", "recompute_num_layers"):
            setattr(c.train, key, getattr(defaults, key))
        c.train.recompute = level
    return c


def memory_shortfall(cfg: Config, world_size: int, gpu_memory: float,
                     reserve_gib: float = RESERVE_GIB) -> str | None:
    """None if the config's layout fits ``gpu_memory`` (the planner's estimate of its heaviest
    stage within ``usable_bytes``), else what it needs (the breakdown) and what would fit: the
    largest smaller micro-batch at its recompute level, and the cheapest higher recompute level
    at its micro-batch. Builds the model on the meta device (no process group may run yet)."""
    from megatron_gpas.config import data_parallel_size, divisors

    count = count_parameters(cfg)
    budget = usable_bytes(gpu_memory, reserve_gib)
    worst = _heaviest(cfg, count, world_size)
    if worst.total <= budget:
        return None
    t = cfg.train
    parts = ", ".join(f"{name} {getattr(worst, name) / GIB:.2f}" for name in PARTS[:-1])
    lines = [f"the estimated memory per GPU, {worst.total / GIB:.2f} GiB (pipeline stage {worst.stage}: {parts} GiB; "
             f"micro-batch {t.micro_batch_size}, train.recompute={t.recompute}), exceeds the "
             f"{budget / GIB:.2f} GiB usable of {gpu_memory / GIB:.2f} GiB (less a {MARGIN:.0%} margin and "
             f"{reserve_gib:g} GiB reserve; docs/planning.md)"]
    options = []
    per_replica = t.global_batch_size // data_parallel_size(cfg, world_size)
    for mb in sorted((d for d in divisors(per_replica) if d < t.micro_batch_size), reverse=True):
        c = copy.deepcopy(cfg)
        c.train.micro_batch_size = mb
        if (total := _heaviest(c, count, world_size).total) <= budget:
            options.append(f"train.micro_batch_size={mb} ({total / GIB:.2f} GiB)")
            break
    for level in RECOMPUTE[RECOMPUTE.index(t.recompute) + 1:]:
        if (total := _heaviest(with_recompute(cfg, level), count, world_size).total) <= budget:
            options.append(f"{' '.join(recompute_overrides(cfg, level))} ({total / GIB:.2f} GiB, about "
                           f"{1 - RECOMPUTE_EFFICIENCY[level]:.0%} slower)")
            break
    lines.append("would fit: " + " or ".join(options) if options else
                 "no smaller micro-batch or recompute level fits: more GPUs (tools/plan_run.py searches layouts)")
    return "; ".join(lines)
