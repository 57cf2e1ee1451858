#!/usr/bin/env python
r"""Compare training runs: overlaid PNGs and a Markdown table (megatron_gpas/compare_runs.py).

    python tools/compare_runs.py runs/pre runs/pre_gpas --output compare/ --smooth 0.6
    python tools/compare_runs.py runs/a runs/b --names "Pre-LN" "Pre+GPAS"

RUN_DIR: a run's logging.dir (metrics.jsonl; config.yaml for its scheme; summary.json for tokens
and wall time). Writes into --output: train_loss.png, eval_loss.png, throughput.png,
gpas_gates_over_steps.png, activation_variance_over_steps.png, depth_<group>_<name>.png for every
per-layer tag family (<group>/<name>/layer_<l>), compare.md (the table, the figures, what each run
lacks) and compare.json (the table's numbers unrounded). Exit status 2 on bad input, before any plot.
"""

from __future__ import annotations

import argparse
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from megatron_gpas.compare_runs import TABLE, CompareError, compare, markdown_table  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="logging.dir of each run")
    parser.add_argument("--output", default="compare", help="folder for the PNGs and tables (default: compare/)")
    parser.add_argument("--names", nargs="+", help="labels of the runs, in order (default: folder (scheme))")
    parser.add_argument("--smooth", type=float, default=0.0,
                        help="EMA weight in [0, 1) for the train loss, as TensorBoard's slider (default 0: raw)")
    args = parser.parse_args(argv)
    try:
        result = compare(args.runs, args.output, names=args.names, smooth=args.smooth)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown_table(result["rows"]), end="")
    for line in result["notes"] + result["missing"]:
        print(f"[missing] {line}")
    for path in result["figures"]:
        print(f"[compare] wrote {path}")
    print(f"[compare] wrote {os.path.join(args.output, TABLE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
