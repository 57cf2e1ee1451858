#!/usr/bin/env python
r"""Layer importance: the loss increase when each layer is skipped (the GPAS paper's Fig. 7).

    python tools/layer_importance.py runs/demo/checkpoints --data data/val_text_document \
        --samples 32 --seq-len 1024 --output importance.json --plot importance.png

MODEL: a Megatron checkpoint (a save root or iter_N/, any TP/PP layout; exported to a temporary
directory of our Hugging Face class, exact for every scheme) or a Hugging Face directory
(model_type llama or megatron_gpas; code inside the directory is never run). --data: an
indexed dataset prefix; its documents are concatenated in order and cut into --samples
sequences of --seq-len tokens. For every layer l the model runs with layer l replaced by the
identity (its input passed on: both sub-layers and its GPAS gate skipped); the table gives the
mean next-token loss without it, the increase over the full model, and the perplexity ratio.
Everything is checked (data length, token ids against the vocabulary) before weights are read.
"""

from __future__ import annotations

import os
import sys
import warnings

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
# Importing megatron.core (for its IndexedDataset) warns about missing GPUs, apex and fused kernels.
warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")

from megatron_gpas.analysis.layer_probes import cli  # noqa: E402


def main(argv=None) -> int:
    return cli("layer_importance", argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
