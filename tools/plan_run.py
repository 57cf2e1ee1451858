#!/usr/bin/env python
"""Plan a run: parameters, FLOPs per token, per-GPU memory of the config's layout, and the
fastest layouts of N GPUs that fit their memory.

    python tools/plan_run.py examples/llama3_8b_pre_gpas.yaml --gpus 8 --gpu-mem 80GB
    python tools/plan_run.py examples/paper/pre_gpas_1b.yaml train.seq_length=2048 --gpus 1 --json plan.json

The formulas and assumptions are in megatron_gpas/planner.py's docstring and printed under
"Assumptions". Parameter counts are exact (the model built on the meta device); memory and
throughput are estimates (checked against measured peak memory only on a GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_gpas.config import ConfigError, load_config  # noqa: E402
from megatron_gpas.metrics import flops_per_token  # noqa: E402
from megatron_gpas.model.inventory import count_parameters, describe_parameters  # noqa: E402
from megatron_gpas import planner  # noqa: E402

ASSUMPTIONS = [
    "FLOPs/token, Megatron: 6*[L*(h*(q+2kv) + q*s + q*h + 3*h*f) + h*V], causal attention counted once",
    "FLOPs/token, legacy 6N: 6 x all parameters (embedding included), no attention s-term",
    "weights 2 B/param (BF16; FP32 runs 4), gradients 4 B/param (grad_reduce_in_fp32)",
    "optimizer: Adam 12 B/param (fp32 master + 2 moments; FP32 runs 8), Muon 4 B momentum + master for "
    "its 2-D matrices, Adam for the rest; distributed optimizer divides it by DP",
    "activations/layer/micro-batch (Korthikanti 2022, adapted to SwiGLU+GQA, no dropout): "
    "8sbh (/t with SP) + sb(4q+4kv+6f)/t + 2as^2b/t (model.attention=megatron on local only; sdpa and te "
    "keep none); "
    "train.recompute: selective drops its modules' terms (core_attn s^2, mlp 6sbf/t, layernorm 4sbh), "
    "full keeps 2sbh (/t with SP) per group of recompute_num_layers (+ one group being recomputed; block: "
    "the first N layers)",
    "last stage: + 4sbh (/t with SP) + 6sbV/t (logits BF16 + fp32 cross entropy); FP32 runs: activations x2",
    "pipeline: rank i holds min(p-i, m) micro-batches (1F1B); interleaved: Megatron's warm-up count",
    f"fits: peak stage <= GPU memory x (1 - {planner.MARGIN}) - reserve ({planner.RESERVE_GIB} GiB by default) "
    "(CUDA context, workspaces, fragmentation not modelled)",
    f"throughput: MFU = {planner.BASE_MFU} x TP (1 - 0.05 log2 t) x bubble vm/(vm+p-1) x micro-batch "
    "(-3% per halving below 8192 tokens) x recompute (selective 0.97, full 0.75); DP/SP/dist-opt free",
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.seq_length=4096")
    parser.add_argument("--gpus", type=int, default=None,
                        help="search layouts of this many GPUs (default: the config's TP x PP, DP 1)")
    parser.add_argument("--gpu-mem", default="80GB", help="memory of one GPU, e.g. 80GB, 141GB (default 80GB)")
    parser.add_argument("--gpu", default="H100", help="GPU for the peak FLOP/s of tokens/s (default H100)")
    parser.add_argument("--reserve-gib", type=float, default=planner.RESERVE_GIB,
                        help=f"memory kept free for CUDA context and workspaces (default {planner.RESERVE_GIB})")
    parser.add_argument("--top", type=int, default=10, help="layouts to print (default 10)")
    parser.add_argument("--json", metavar="OUT", help="also write the plan as JSON")
    args = parser.parse_args(argv)
    from megatron_gpas import console

    console.configure(verbose=False)  # the meta-device builds' library warnings are noise here
    try:
        plan = make_plan(args)
    except ConfigError as e:
        print(f"plan_run: {e}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(plan, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    return 0


def make_plan(args) -> dict:
    if args.top < 1:
        raise ConfigError(f"--top must be positive, got {args.top}")
    gpu_memory = planner.parse_memory(args.gpu_mem)
    if args.reserve_gib < 0 or planner.usable_bytes(gpu_memory, args.reserve_gib) <= 0:
        raise ConfigError(f"--gpu-mem {args.gpu_mem} leaves nothing after the {args.reserve_gib} GiB reserve "
                          f"and the {planner.MARGIN:.0%} margin (--reserve-gib must be >= 0)")
    peak = planner.peak_flops_of(args.gpu)
    cfg = load_config(args.config, args.overrides)
    p = cfg.parallel
    model_parallel = p.tensor * p.pipeline
    world = args.gpus if args.gpus is not None else model_parallel
    if world < 1:
        raise ConfigError(f"--gpus must be a positive number of GPUs, got {world}")

    count = count_parameters(cfg)
    megatron, legacy = flops_per_token(cfg), planner.legacy_flops_per_token(count.total)
    print(f"config {args.config}  ({cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, "
          f"seq {cfg.train.seq_length}, global batch {cfg.train.global_batch_size}, "
          f"{'BF16' if planner.bf16_run(cfg) else 'FP32'}, optimizer {cfg.optim.optimizer}, backend {cfg.model.backend})")
    for line in describe_parameters(cfg, count):
        print(line)
    print(f"FLOPs per token: Megatron formula {megatron:.4e}; legacy 6N {legacy:.4e} "
          f"(ratio {megatron / legacy:.3f})")

    plan = {"config": args.config, "overrides": args.overrides, "gpus": world, "gpu_memory_gib": gpu_memory / planner.GIB,
            "gpu": args.gpu, "usable_gib": planner.usable_bytes(gpu_memory, args.reserve_gib) / planner.GIB,
            "parameters": {"total": count.total, "embedding": count.embedding, "head": count.head,
                           "non_embedding": count.non_embedding,
                           "stages": [{"stage": s.stage, "parameters": s.parameters, "per_tp_rank": s.per_rank,
                                       "layers": s.layers} for s in count.stages]},
            "flops_per_token": {"megatron": megatron, "legacy_6n": legacy},
            "assumptions": ASSUMPTIONS}

    if world % model_parallel == 0:
        print(f"\nmemory per GPU of the config's layout on {world} GPU{"s" if world > 1 else ""} (TP={p.tensor}, PP={p.pipeline}, "
              f"DP={world // model_parallel}, micro-batch {cfg.train.micro_batch_size}, SP={p.sequence_parallel}, "
              f"distributed optimizer={p.distributed_optimizer}), GiB:")
        print(f"  {'recompute':<10} {'stage':>5} {'weights':>8} {'grads':>8} {'optim':>8} {'activ.':>8} {'total':>8}")
        plan["config_layout"] = {}
        for recompute in planner.RECOMPUTE:
            layout = planner.evaluate_layout(cfg, world, count, recompute, peak)
            plan["config_layout"][recompute] = asdict_layout(layout)
            mark = "*" if recompute == cfg.train.recompute else ""  # the config's train.recompute
            for s in layout.stage_memory_gib:
                print(f"  {recompute + mark:<10} {s['stage']:>5} {s['weights']:>8.2f} {s['gradients']:>8.2f} "
                      f"{s['optimizer']:>8.2f} {s['activations']:>8.2f} {s['total']:>8.2f}")
        print(f"  (* train.recompute={cfg.train.recompute}, the config's)")
    else:
        print(f"\n(the config's layout TP={p.tensor} x PP={p.pipeline} does not divide {world} GPUs: only the search)")
    layouts = planner.search(cfg, world, gpu_memory, peak, reserve_gib=args.reserve_gib)
    plan["layouts"] = [asdict_layout(layout) for layout in layouts]
    print(f"\n{len(layouts)} layouts of {world} x {args.gpu_mem} GPUs ({args.gpu}) validate and fit "
          f"{planner.usable_bytes(gpu_memory, args.reserve_gib) / planner.GIB:.1f} GiB; top {min(args.top, len(layouts))} "
          "by estimated throughput:")
    if layouts:
        print(f"  {'#':>2} {'TP':>3} {'PP':>3} {'DP':>3} {'mb':>3} {'SP':>3} {'dopt':>4} {'mem GiB':>8} "
              f"{'est MFU':>7} {'tokens/s':>10}  note")
        for i, l in enumerate(layouts[:args.top], 1):
            print(f"  {i:>2} {l.tensor:>3} {l.pipeline:>3} {l.data:>3} {l.micro_batch:>3} {'y' if l.sequence_parallel else 'n':>3} "
                  f"{'y' if l.distributed_optimizer else 'n':>4} {l.memory_gib:>8.1f} {100 * l.mfu:>6.1f}% "
                  f"{l.tokens_per_s:>10,.0f}  {l.note}")
        print(f"  best as overrides: {' '.join(layouts[0].overrides)}")
    else:
        print("  none: more GPUs, more memory, a shorter sequence or a smaller global batch")
    print("\nAssumptions (estimates; measured peak memory is checked on a GPU by tools/gpu_check.py):")
    for a in ASSUMPTIONS:
        print(f"  - {a}")
    return plan


def asdict_layout(layout: planner.Layout) -> dict:
    from dataclasses import asdict

    return asdict(layout) | {"overrides": layout.overrides, "note": layout.note}


if __name__ == "__main__":
    sys.exit(main())
