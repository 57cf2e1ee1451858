#!/usr/bin/env python
r"""Forward + backward time of the GPAS residual add alone, unfused and fused (gpas.fused).

    python tools/bench_gpas_add.py                       # [512, 4, 1024] fp32, one CPU thread
    python tools/bench_gpas_add.py --shape 2048 1 4096 --dtype bf16 --rounds 50     # on a GPU

Rows: the plain residual add (no GPAS), the unfused gate after the add (``gpas.fused=none``), the
eager Function and the torch.compile'd one (``model/fused.py``), each timed in interleaved rounds
(median and minimum). On CPU the work runs on one thread timed by its CPU time, so other jobs on
the machine do not count; on a GPU by wall clock after a synchronize.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megatron_gpas.model.fused import EAGER, GatedSum, compiled_kernels  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def variants(alpha: torch.Tensor) -> dict:
    def unfused(x, f):  # what ResidualAdd + GPASGate compute with gpas.fused=none
        s = x + f
        a = F.silu(alpha[0]).to(s.dtype)
        return s - a * s.detach()

    def fused(kernels):
        return lambda x, f: GatedSum.apply(x, f, F.silu(alpha[0]).to(x.dtype), kernels)

    return {"residual add without GPAS": lambda x, f: x + f, "unfused (none)": unfused,
            "eager Function (eager)": fused(EAGER), "compiled Function (compile)": fused(compiled_kernels())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 4, 1024], metavar=("S", "B", "H"))
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if not cuda:
        torch.set_num_threads(1)
    clock = time.perf_counter if cuda else time.thread_time
    dtype = DTYPES[args.dtype]
    g = torch.Generator().manual_seed(0)
    x, f, grad = (torch.randn(*args.shape, generator=g).to(device, dtype) for _ in range(3))
    alpha = torch.full((1,), 0.1, device=device, requires_grad=True)

    def step(fn) -> float:
        xs, fs = x.clone().requires_grad_(), f.clone().requires_grad_()
        if cuda:
            torch.cuda.synchronize()
        start = clock()
        fn(xs, fs).backward(grad)
        if cuda:
            torch.cuda.synchronize()
        return clock() - start

    paths = variants(alpha)
    for fn in paths.values():
        for _ in range(args.warmup):
            step(fn)
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, fn in paths.items():
            times[name].append(step(fn))

    where = f"{torch.cuda.get_device_name()}" if cuda else "CPU, 1 thread, CPU time"
    print(f"shape {args.shape}, {args.dtype}, {where}; forward + backward, {args.rounds} rounds\n")
    print("| path | median (ms) | min (ms) |\n|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {1000 * statistics.median(values):.2f} | {1000 * min(values):.2f} |")


if __name__ == "__main__":
    main()
