#!/usr/bin/env python
r"""Activation profile: per-layer statistics of the residual stream on held-out data.

    python tools/activation_profile.py runs/demo/checkpoints --data data/val_text_document \
        --samples 32 --seq-len 1024 --output profile.json --plot profile.png

For the input of every layer (the residual stream it reads, as the training tag
activations/variance/layer_{l}) and the last layer's output (before the final norm): variance
and RMS over all elements, max |x|, the fraction of elements more than 6 standard deviations
from their token's mean, OSP's excess kurtosis per token (averaged), and the largest channel
mean |x| over the median one (massive activations). MODEL and --data as tools/layer_importance.py.
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
    return cli("activation_profile", argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
