#!/usr/bin/env python
r"""OSP's excess-kurtosis outlier metric of a model (Outlier-Safe Pre-Training, arXiv 2506.19697).

    python tools/kurtosis.py exports/demo --data data/c4_val_1000 --output kurtosis.json --plot kurtosis.png
    python tools/kurtosis.py runs/demo/checkpoints --data data/c4_val_1000 --length-one-quirk

For every hidden state of output_hidden_states=True (the embedding output and every layer's
output, the last one after the final norm) and every token: relu(mean(x^4) / std(x)^4 - 3),
std unbiased and centred, the 4th moment not centred. Printed and written: the mean per
hidden state and overall (over tokens, samples and hidden states).

MODEL: a Hugging Face directory with config.json of model_type llama (LlamaForCausalLM) or
megatron_gpas (this package's MegatronGPASForCausalLM, imported from the package: code shipped
inside the directory is never run), or a Megatron checkpoint (a save root or iter_N/), exported
to a temporary directory first (our class, exact for every scheme).

--data: an indexed dataset prefix (tools/preprocess_data.py). Its documents are concatenated in
order and cut into --samples sequences of --seq-len tokens (OSP: the first 1000 documents of C4
validation, 128 x 2048). Errors before any weights are read if the data is missing, too short
or holds ids outside the model's vocabulary.

Context: by default each sample is ONE sequence of --seq-len tokens (contextual hidden states).
OSP's own script evaluates model(seq.unsqueeze(1)), a batch of --seq-len sequences of one token
each (no context, every token at position 0); --length-one-quirk reproduces that. OSP's
maintainers published that script as the code behind the paper's numbers (1818.56 Adam, 0.04
OSP), so use the flag to compare with them. See docs/kurtosis.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
# Importing megatron.core (for its IndexedDataset) warns about missing GPUs, apex and fused kernels.
warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
warnings.filterwarnings("ignore", message="torch.distributed is disabled")

from megatron_gpas.analysis.kurtosis import (DEFAULT_DTYPE, DTYPES, OSP_SAMPLES, OSP_SEQ_LEN,  # noqa: E402
                                             STAT_DTYPES, KurtosisError, Settings, format_report, measure,
                                             plot_per_layer)
from megatron_gpas.checkpoint_paths import CheckpointError  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="tools/kurtosis.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="Hugging Face model directory, or Megatron save root / iter_N/")
    p.add_argument("--data", required=True, metavar="PREFIX", help="indexed dataset prefix (PREFIX.bin/.idx)")
    p.add_argument("--samples", type=int, default=OSP_SAMPLES, help=f"sequences (default {OSP_SAMPLES}, as OSP)")
    p.add_argument("--seq-len", type=int, default=OSP_SEQ_LEN,
                   help=f"tokens per sequence (default {OSP_SEQ_LEN}, as OSP)")
    p.add_argument("--documents", type=int, default=None, metavar="N",
                   help="use only the dataset's first N documents (OSP: 1000 of C4 validation); default all")
    p.add_argument("--length-one-quirk", action="store_true",
                   help="reproduce OSP's script: each sample as seq-len sequences of ONE token (no context). "
                        "Default: off, each sample is one contextual sequence")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=DEFAULT_DTYPE,
                   help=f"model dtype (default {DEFAULT_DTYPE}, as OSP's script)")
    p.add_argument("--stat-dtype", choices=tuple(STAT_DTYPES), default="float32",
                   help="precision of the statistic (default float32; native: the hidden states' own dtype)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--batch-size", type=int, default=1, help="samples per forward pass (default 1)")
    p.add_argument("--name", help="model name for the plot title and the JSON (default: from MODEL's path)")
    p.add_argument("--output", metavar="JSON", help="write per-layer and overall values and the settings here")
    p.add_argument("--plot", metavar="PNG", help="write a plot of the per-layer values here")
    p.add_argument("--export-dir", help="where a Megatron checkpoint's temporary export goes (default: system temp)")
    p.add_argument("--progress-interval", type=float, default=10.0,
                   help="seconds between progress lines (default 10; 0: no progress output)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = Settings(samples=args.samples, seq_len=args.seq_len, length_one_quirk=args.length_one_quirk,
                        dtype=args.dtype, stat_dtype=args.stat_dtype, device=args.device, batch_size=args.batch_size,
                        documents=args.documents, export_dir=args.export_dir,
                        progress_interval=args.progress_interval)
    for path, what in ((args.output, "--output"), (args.plot, "--plot")):
        parent = os.path.dirname(os.path.abspath(path)) if path else None
        if parent and not os.path.isdir(parent):
            print(f"error: {what} {path}: directory {parent} does not exist", file=sys.stderr)
            return 2
    try:
        report = measure(args.model, args.data, settings, name=args.name, log=lambda line: print(line, flush=True))
    except (KurtosisError, CheckpointError, ValueError, FileNotFoundError) as e:  # (DataCorruptError, ExportError are ValueErrors)
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        print(f"[kurtosis] wrote {args.output}")
    if args.plot:
        print(f"[kurtosis] wrote {plot_per_layer(report, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
