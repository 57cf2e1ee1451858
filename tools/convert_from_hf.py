#!/usr/bin/env python
r"""Import a Hugging Face Llama model (or a megatron_gpas export) as a megatron_gpas checkpoint.

    python tools/convert_from_hf.py exports/demo checkpoints/demo_imported
    torchrun --nproc-per-node 4 tools/convert_from_hf.py HF_DIR OUT parallel.tensor=2 parallel.pipeline=2

The checkpoint (OUTPUT/iter_0000000, weights only, step 0) loads under any TP/PP/DP layout.
Continue pretraining with ``checkpoint.load=OUTPUT checkpoint.load_optimizer=false``, or
fine-tune with ``checkpoint.pretrained=OUTPUT`` (python -m megatron_gpas.finetune). Extra
``key=value`` arguments are config overrides (e.g. the parallel layout used for the import,
which only matters for memory: each rank holds its shard of the model).
"""

import argparse
import os
import sys
import warnings

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

from megatron_gpas.config import ConfigError  # noqa: E402
from megatron_gpas.hf.import_hf import HFImportError, import_hf_model  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hf_dir")
    p.add_argument("output", help="checkpoint save root (the checkpoint is OUTPUT/iter_0000000)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    try:
        import_hf_model(args.hf_dir, args.output, args.overrides)
    except (HFImportError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
