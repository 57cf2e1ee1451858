#!/usr/bin/env python
r"""Step time of each normalization scheme (± GPAS) relative to Pre-LN, measured in one process.

    python tools/bench_schemes.py --quick                          # CPU: a small model, a few rounds
    python tools/bench_schemes.py --preset 1b --seq-length 2048    # one GPU, BF16
    python tools/bench_schemes.py --schemes pre osp dyt --gpas off --output bench.json

Every variant is built once (same shape, same random batches), then timed in interleaved rounds:
each round runs ``--steps`` training steps (forward + backward + gradient finalization + clip +
optimizer step, as the trainer does them) of every variant in turn, starting one variant later
each round, so slow drifts of the machine (clock, other load) and the order hit all variants
alike. Reported per variant: the median step time over the rounds, its ratio to the Pre-LN
(RMSNorm, no GPAS) median with the spread of the per-round ratios (min–max), tokens/s, MFU on a
GPU (Megatron's formula, metrics.flops_per_token, against the dense BF16 peak; stated in the
output) and memory: on a GPU the allocator's peak while the variant stepped and the part of it
the step itself added (activations, temporaries); on a CPU only the process's peak RSS (it only
grows, so it is reported once). The first ``--warmup`` steps of each variant are not timed.

A variant is a scheme name, optionally with ``+muon`` (the Muon optimizer instead of Adam),
``@layernorm`` (norm.kind=layernorm) and/or ``:megatron`` (model.attention=megatron: Megatron's
DotProductAttention instead of the default fused SDPA), e.g. ``osp+muon``, ``pre:megatron``,
and/or ``~unfused`` (gpas.fused=none norm.fused=false: the GPAS residual add and the norms unfused),
e.g. ``pre~unfused`` (before the ``:``); ``--gpas both`` adds each one with GPAS; a variant ending in
``+gpas`` is run with GPAS only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import statistics
import sys
import time
import warnings

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
warnings.filterwarnings("ignore")

import torch  # noqa: E402

# The papers' published step-time overheads vs their baselines (targets.md).
CLAIMS = {"osp+muon": "+2% (OSP, Muon and EmbProj)", "dyt": "−8% eager / 0% compiled (DyT)",
          "crmsnorm": "−1…−10% vs Pre-LN (Pre-CRMSNorm)", "pre_rmsnorm": "−1…−10% vs Pre-LN (Pre-RMSNorm)",
          "bhyt": "−15.8% (v1) / −1.6% (v3) vs RMSNorm (BHyT)", "ngpt": "+9.6% vs GPT (nGPT, anGPT paper)",
          "angpt": "+2.75% vs GPT+ (anGPT)", "simplenorm": "7 norms per layer instead of 2 (SimpleGPT)"}
DEFAULT_VARIANTS = ("pre", "pre@layernorm", "pre_rmsnorm", "crmsnorm", "osp", "osp+muon", "dyt", "bhyt", "bhytstar",
                    "simplenorm", "ngpt", "angpt")


def takes_gpas(variant: str) -> bool:
    """Whether the variant's scheme has a GPAS placement (nGPT and anGPT have none: ``Scheme.gpas_refusal``)."""
    from megatron_gpas.model.schemes import SCHEMES

    scheme = SCHEMES.get(re.split(r"[@+~:]", variant)[0])
    return scheme is None or scheme.gpas_refusal is None


def variant_overrides(variant: str, gpas: bool, hidden: int) -> list[str]:
    variant, _, attention = variant.partition(":")
    variant, _, fusion = variant.partition("~")
    if fusion not in ("", "unfused"):
        raise SystemExit(f"unknown variant suffix '~{fusion}' (known: ~unfused)")
    name, _, kind = variant.partition("@")
    scheme, _, optimizer = name.partition("+")
    out = [f"norm.scheme={scheme}", f"gpas.enabled={str(gpas).lower()}"]
    if attention:
        out.append(f"model.attention={attention}")
    if kind:
        out.append(f"norm.kind={kind}")
    if optimizer:
        out.append(f"optim.optimizer={optimizer}")
    if scheme == "dyt":
        out.append("norm.options.alpha0=[1.0, 1.0, 1.0]" if hidden < 2048 else "norm.options.alpha0=[1.0, 0.5, 0.5]")
    if fusion:  # every fusion off: the GPAS residual add and the norms as the plain formulas
        out += ["gpas.fused=none", "norm.fused=false"]
    return out


class Variant:
    """One model + optimizer, built and stepped with the trainer's own functions under the shared
    (world of 1) process groups."""

    def __init__(self, name: str, cfg, on_cpu: bool, bf16: bool):
        from megatron_gpas.model.builder import build_model_chunks, transformer_config
        from megatron_gpas.model.schemes import get_scheme
        from megatron_gpas.optim import build_optimizer
        from megatron_gpas.training import wire_schedules, wrap_for_training

        self.name, self.cfg = name, cfg
        config = transformer_config(cfg, bf16=bf16, on_cpu=on_cpu)
        self.model, config = wrap_for_training(cfg, build_model_chunks(cfg, config), config, on_cpu=on_cpu, bf16=bf16)
        self.optimizer, _ = build_optimizer(cfg, self.model, bf16=bf16)
        self.forward_backward = wire_schedules(cfg, config, self.model, self.optimizer)
        self.scheme = get_scheme(cfg)
        self.step_index = 0
        self.times: list[list[float]] = []

    def step(self, batches) -> None:
        from megatron_gpas.training import optimizer_step

        t = self.cfg.train

        def run_schedule():
            return self.forward_backward(forward_step_func=_forward_step, data_iterator=iter(batches),
                                         model=self.model[0], num_microbatches=len(batches),
                                         seq_length=t.seq_length, micro_batch_size=t.micro_batch_size,
                                         forward_only=False)

        optimizer_step(self.cfg, self.scheme, self.model, self.optimizer, self.step_index, run_schedule)
        self.step_index += 1


def _forward_step(data_iterator, model):
    tokens, labels, positions = next(data_iterator)
    per_token = model(tokens, positions, None, labels=labels)

    def loss(output):
        total = output.float().sum()
        return total, torch.tensor(output.numel(), device=output.device, dtype=torch.int), {"lm loss": total.detach()}

    return per_token, loss


def _synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="CPU-sized: 4 layers, hidden 256, vocabulary 4096, seq 128, 5 rounds of 3 steps")
    p.add_argument("--preset", default=None, help="model.preset (default: 1b on GPU, a small model with --quick)")
    p.add_argument("--seq-length", type=int, default=None)
    p.add_argument("--micro-batch-size", type=int, default=None)
    p.add_argument("--micro-batches", type=int, default=1, help="micro-batches per step")
    p.add_argument("--schemes", nargs="+", default=list(DEFAULT_VARIANTS), metavar="VARIANT")
    p.add_argument("--gpas", choices=("off", "on", "both"), default="both")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--output", help="write the results as JSON")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="extra config overrides for every variant")
    return p.parse_args(argv)


MFU_STATEMENT = ("MFU = tokens/s × FLOPs/token ÷ the GPU's dense BF16 peak (H100/H200/H800: 989.4 TFLOP/s); "
                 "FLOPs/token is Megatron's formula (metrics.flops_per_token: 6·[L·(h·(q+k+v) + q·s + q·h + "
                 "3·h·ffn) + h·V], causal attention counted once), the same as NeMo's published MFU")


def measure(args: argparse.Namespace) -> dict:
    """Build every variant, time them in interleaved rounds and return the report (a dict)."""
    from megatron_gpas import distributed
    from megatron_gpas.config import load_config
    from megatron_gpas.metrics import flops_per_token, peak_flops_per_gpu
    from megatron_gpas.validation import validate

    on_cpu = not torch.cuda.is_available()
    quick = args.quick or on_cpu
    preset = args.preset or ("tiny" if quick else "1b")
    seq = args.seq_length or (128 if quick else 2048)
    mbs = args.micro_batch_size or 4
    rounds = args.rounds or 5
    steps = args.steps or (3 if quick else 10)
    # small vocabulary: the layers, not the embedding and head, dominate the step as in large models
    shape = ["model.hidden_size=256", "model.ffn_hidden_size=688", "model.num_attention_heads=8",
             "model.vocab_size=4096", "model.make_vocab_size_divisible_by=128"] if quick and preset == "tiny" else []
    base = [f"model.preset={preset}", *shape, f"train.seq_length={seq}", f"train.micro_batch_size={mbs}",
            f"train.global_batch_size={mbs * args.micro_batches}", "train.steps=1000000", "optim.lr=1e-4",
            "data.tokenizer.kind='null'", *args.overrides]
    gpas_modes = {"off": [False], "on": [True], "both": [False, True]}[args.gpas]
    names = [("pre", False)]
    for v in args.schemes:  # "VARIANT+gpas" asks for that variant with GPAS only, whatever --gpas says
        if v.endswith("+gpas") and not takes_gpas(v):
            raise SystemExit(f"{v}: {v.split('+')[0]} has no GPAS placement (its config refuses gpas.enabled)")
        modes = gpas_modes if takes_gpas(v) else [False]  # nGPT, anGPT: without GPAS whatever --gpas says
        for pair in [(v.removesuffix("+gpas"), True)] if v.endswith("+gpas") else [(v, g) for g in modes]:
            if pair not in names:
                names.append(pair)

    configs = {}
    for variant, gpas in names:
        cfg = load_config(None, [*base, *variant_overrides(variant, gpas, 256 if quick else 2048)])
        cfg.data.tokenizer.vocab_size = cfg.model.vocab_size
        validate(cfg, world_size=1, check_files=False, require_data=False)
        configs[f"{variant}{'+gpas' if gpas else ''}"] = cfg
    first = next(iter(configs.values()))
    bf16 = not on_cpu
    device = distributed.init_distributed(first)
    try:
        variants = [Variant(name, cfg, on_cpu, bf16) for name, cfg in configs.items()]
        g = torch.Generator().manual_seed(0)
        vocab = first.model.vocab_size
        batches = []
        for _ in range(args.micro_batches):
            tokens = torch.randint(0, vocab, (mbs, seq + 1), generator=g)
            positions = torch.arange(seq).unsqueeze(0).expand(mbs, seq)
            batches.append(tuple(t.to(device) for t in (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(),
                                                       positions.contiguous())))
        tokens_per_step = mbs * args.micro_batches * seq
        print(f"[bench] {len(variants)} variants, preset {preset}, seq {seq}, {tokens_per_step} tokens/step, "
              f"{'bf16 on ' + torch.cuda.get_device_name() if bf16 else 'fp32 on CPU'}; "
              f"{args.warmup} warm-up + {rounds} rounds × {steps} steps", flush=True)
        for v in variants:
            for _ in range(args.warmup):
                v.step(batches)
        _synchronize()
        for r in range(rounds):
            for v in variants[r % len(variants):] + variants[:r % len(variants)]:
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                    resident_before = torch.cuda.memory_allocated()
                _synchronize()
                started = time.perf_counter()
                for _ in range(steps):
                    v.step(batches)
                _synchronize()
                v.times.append((time.perf_counter() - started) / steps)
                if torch.cuda.is_available():
                    # the allocator's peak while this variant stepped: its activations and
                    # temporaries on top of every variant's resident weights and optimizer state
                    v.peak_memory = max(getattr(v, "peak_memory", 0), torch.cuda.max_memory_allocated())
                    # what the step itself adds (activations, temporaries): the part that differs by scheme
                    v.step_memory = max(getattr(v, "step_memory", 0), torch.cuda.max_memory_allocated() - resident_before)
            print(f"[bench] round {r + 1}/{rounds} done", flush=True)
        resident = torch.cuda.memory_allocated() if torch.cuda.is_available() else None
    finally:
        distributed.shutdown()

    peak = peak_flops_per_gpu()
    base_times = variants[0].times
    results = []
    for v in variants:
        median = statistics.median(v.times)
        ratios = [t / b for t, b in zip(v.times, base_times)]
        row = {"variant": v.name, "median_step_s": median, "ratio": median / statistics.median(base_times),
               "ratio_min": min(ratios), "ratio_max": max(ratios), "tokens_per_s": tokens_per_step / median,
               "claim": CLAIMS.get(v.name.removesuffix("+gpas"), ""),
               "parameters": sum(p.numel() for chunk in v.model for p in chunk.parameters())}
        if peak is not None:
            row["mfu"] = tokens_per_step / median * flops_per_token(v.cfg) / peak
        if hasattr(v, "peak_memory"):
            row["peak_memory_gib"] = v.peak_memory / 2**30
            row["step_memory_gib"] = v.step_memory / 2**30
        results.append(row)
    report = {"device": device_name(), "date": datetime.date.today().isoformat(), "preset": preset,
              "seq_length": seq, "micro_batch_size": mbs, "tokens_per_step": tokens_per_step, "rounds": rounds,
              "steps": steps, "warmup": args.warmup, "precision": "bf16" if bf16 else "fp32",
              "overrides": list(args.overrides), "results": results}
    if peak is not None:
        report["mfu_statement"] = MFU_STATEMENT
        report["peak_flops"] = peak
    if resident is not None:
        report["resident_memory_gib"] = resident / 2**30
    else:
        report["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return report


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def markdown_table(report: dict) -> str:
    """The results as a Markdown table, with what the memory and MFU columns mean."""
    results = report["results"]
    has_mfu = "mfu" in results[0]
    has_memory = "peak_memory_gib" in results[0]
    lines = [f"| variant | step (ms) | vs Pre-LN (per-round min–max) | tokens/s |{' MFU |' if has_mfu else ''}"
             f"{' peak memory (GiB) | memory of the step (GiB) |' if has_memory else ''} paper's claim |",
             f"|---|---|---|---|{'---|' if has_mfu else ''}{'---|---|' if has_memory else ''}---|"]
    for row in results:
        mfu = f" {100 * row['mfu']:.1f}% |" if has_mfu else ""
        memory = f" {row['peak_memory_gib']:.1f} | {row['step_memory_gib']:.2f} |" if has_memory else ""
        lines.append(f"| {row['variant']} | {1000 * row['median_step_s']:.1f} | {row['ratio']:.3f} "
                     f"({row['ratio_min']:.3f}–{row['ratio_max']:.3f}) | {row['tokens_per_s']:,.0f} |{mfu}{memory} "
                     f"{row['claim']} |")
    lines.append("")
    if "peak_rss_gib" in report:
        lines.append(f"Peak RSS of the process (all variants): {report['peak_rss_gib']:.2f} GiB.")
    if has_memory:
        lines.append(f"Peak memory: the allocator's peak while the variant stepped, including the "
                     f"{report['resident_memory_gib']:.1f} GiB all variants keep resident (weights, gradients, "
                     "optimizer state); memory of the step: that peak minus what was allocated when its steps "
                     "began (its activations and temporaries).")
    if "mfu_statement" in report:
        lines.append(report["mfu_statement"] + ".")
    lines.append(f"Device: {report['device']}; date: {report['date']}.")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    report = measure(args)
    print("\n" + markdown_table(report))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
