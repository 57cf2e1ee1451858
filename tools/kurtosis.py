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
import os
import sys
import warnings

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
# Importing megatron.core (for its IndexedDataset) warns about missing GPUs, apex and fused kernels.
warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
warnings.filterwarnings("ignore", message="torch.distributed is disabled")

from megatron_gpas.analysis.kurtosis import (DEFAULT_DTYPE, OSP_SAMPLES, OSP_SEQ_LEN, STAT_DTYPES,  # noqa: E402
                                             Settings, format_report, measure, plot_per_layer)
from megatron_gpas.analysis.model_inputs import add_model_and_data_arguments, run_tool  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="tools/kurtosis.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_and_data_arguments(p, samples=OSP_SAMPLES, seq_len=OSP_SEQ_LEN, dtype=DEFAULT_DTYPE,
                                 what="the per-layer kurtosis")
    p.add_argument("--length-one-quirk", action="store_true",
                   help="reproduce OSP's script: each sample as seq-len sequences of ONE token (no context). "
                        "Default: off, each sample is one contextual sequence")
    p.add_argument("--stat-dtype", choices=tuple(STAT_DTYPES), default="float32",
                   help="precision of the statistic (default float32; native: the hidden states' own dtype)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = Settings(samples=args.samples, seq_len=args.seq_len, length_one_quirk=args.length_one_quirk,
                        dtype=args.dtype, stat_dtype=args.stat_dtype, device=args.device, batch_size=args.batch_size,
                        documents=args.documents, export_dir=args.export_dir,
                        progress_interval=args.progress_interval)
    return run_tool(args, "kurtosis", lambda: measure(args.model, args.data, settings, name=args.name,
                                                      log=lambda line: print(line, flush=True)),
                    format_report, plot_per_layer)


if __name__ == "__main__":
    sys.exit(main())
