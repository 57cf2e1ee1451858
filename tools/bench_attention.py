#!/usr/bin/env python
r"""Core attention alone: model.attention=sdpa (fused SDPA) against megatron (DotProductAttention).

    python tools/bench_attention.py                       # CPU: seq 256, 1024, 2048
    python tools/bench_attention.py --seq 8192 --heads 32 --groups 8 --head-dim 128 --batch 1

Forward + backward of the two modules on the same random q, k, v (Megatron's [s, b, heads, d]
layout), timed in interleaved rounds (median per call, and the range of the per-round ratios),
plus the bytes autograd keeps for the backward (the s × s score and probability matrices of
DotProductAttention against the fused kernel's per-row statistics). fp32 on CPU, bf16 on GPU.
The whole-step comparison is ``tools/bench_schemes.py --schemes pre:megatron --gpas off``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
warnings.filterwarnings("ignore")

import torch  # noqa: E402


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for the backward while ``fn`` runs (distinct storages)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, nargs="+", default=[256, 1024, 2048])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--groups", type=int, default=8, help="KV groups (GQA); = heads for MHA")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=2, help="timed forward+backward calls per module per round")
    args = p.parse_args(argv)

    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_gpas import distributed
    from megatron_gpas.config import load_config
    from megatron_gpas.model.attention import SDPAttention

    gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    distributed.init_distributed(load_config(None, []))  # DotProductAttention's buffers need parallel_state
    try:
        config = TransformerConfig(num_layers=1, hidden_size=args.heads * args.head_dim, num_attention_heads=args.heads,
                                   num_query_groups=args.groups, kv_channels=args.head_dim, attention_dropout=0.0,
                                   masked_softmax_fusion=False, attention_softmax_in_fp32=True, bf16=gpu,
                                   params_dtype=dtype)
        modules = {cls.__name__: cls(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                                     attention_type="self") for cls in (SDPAttention, DotProductAttention)}
        name = torch.cuda.get_device_name() if gpu else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
        print(f"device: {name}, {dtype}; batch {args.batch}, {args.heads} heads, {args.groups} KV groups, "
              f"head dim {args.head_dim}; {args.rounds} rounds × {args.calls} calls")
        print("\n| seq | sdpa fwd+bwd (ms) | megatron fwd+bwd (ms) | megatron / sdpa (per-round min–max) "
              "| saved for backward: sdpa | megatron |")
        print("|---|---|---|---|---|---|")
        for seq in args.seq:
            g = torch.Generator().manual_seed(seq)
            q, k, v = (torch.randn(seq, args.batch, n, args.head_dim, generator=g).to(device, dtype).requires_grad_()
                       for n in (args.heads, args.groups, args.groups))
            grad = torch.randn(seq, args.batch, args.heads * args.head_dim, generator=g).to(device, dtype)

            def call(module):
                out = module(q, k, v, None)
                out.backward(grad)

            for module in modules.values():  # warm-up
                call(module)
            times = {n: [] for n in modules}
            for r in range(args.rounds):
                for n in list(modules)[r % 2:] + list(modules)[:r % 2]:
                    if gpu:
                        torch.cuda.synchronize()
                    started = time.perf_counter()
                    for _ in range(args.calls):
                        call(modules[n])
                    if gpu:
                        torch.cuda.synchronize()
                    times[n].append((time.perf_counter() - started) / args.calls)
            ours, theirs = times["SDPAttention"], times["DotProductAttention"]
            ratios = [b / a for a, b in zip(ours, theirs)]
            saved = {n: saved_bytes(lambda m=m: m(q, k, v, None)) / 2**20 for n, m in modules.items()}
            print(f"| {seq} | {1000 * statistics.median(ours):.1f} | {1000 * statistics.median(theirs):.1f} | "
                  f"{statistics.median(theirs) / statistics.median(ours):.2f} ({min(ratios):.2f}–{max(ratios):.2f}) | "
                  f"{saved['SDPAttention']:.1f} MiB | {saved['DotProductAttention']:.1f} MiB |", flush=True)
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
