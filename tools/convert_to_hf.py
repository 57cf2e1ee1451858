#!/usr/bin/env python
r"""Convert a megatron_gpas checkpoint (any TP/PP/DP layout) into a Hugging Face model directory.

    python tools/convert_to_hf.py runs/demo/checkpoints exports/demo
    python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('exports/demo', trust_remote_code=True)"

CHECKPOINT is a checkpoint directory (iter_NNNNNNN) or a save root (its latest complete
checkpoint is used). Everything else (scheme, GPAS options, tokenizer) comes from the
checkpoint. Pre-LN, Pre+GPAS and LNS(+GPAS) become a stock LlamaForCausalLM (gates and LNS
factors folded into the weights, checked on a probe batch); every other scheme, or a fold
that is not exact enough, becomes our MegatronGPASForCausalLM, whose code is written into the
directory (load with trust_remote_code=True). The decision and measurements are in
OUTPUT_DIR/megatron_gpas_export.json. Runs on CPU, one layer in memory at a time.
"""

import argparse
import os
import sys
import warnings

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

# light modules only: Megatron-Core is imported in main, after console.configure
from megatron_gpas import console  # noqa: E402
from megatron_gpas.checkpoint_paths import CheckpointError  # noqa: E402

DTYPE_NAMES = ("float32", "bfloat16", "float16")  # megatron_gpas.hf.export.DTYPES


def parse_size(text: str) -> int:
    units = {"KB": 1024, "MB": 1024**2, "GB": 1024**3}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint directory or save root")
    p.add_argument("output_dir")
    p.add_argument("--format", choices=("auto", "llama", "custom"), default="auto",
                   help="auto: stock Llama where exact, else custom code (default); llama: fail if not exact")
    p.add_argument("--dtype", choices=("auto", *DTYPE_NAMES), default="auto",
                   help="weight dtype (auto: the checkpoint's)")
    p.add_argument("--fold-tolerance", type=float, default=None,
                   help="accepted relative logit error of a folded Llama (default 1e-4 fp32, 2e-2 bf16)")
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (e.g. 2GB, 500MB)")
    p.add_argument("--tokenizer", default=None, help="tokenizer file/dir, if the checkpoint carries none")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--verbose", action="store_true",
                   help="also show Megatron-Core's and PyTorch's warnings and INFO messages")
    args = p.parse_args(argv)
    console.configure(args.verbose)
    if not args.verbose:
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # reading a checkpoint without a job
    from megatron_gpas.hf.export import ExportError, export_checkpoint

    try:
        result = export_checkpoint(args.checkpoint, args.output_dir, target=args.format, dtype=args.dtype,
                                   fold_tolerance=args.fold_tolerance, max_shard_bytes=parse_size(args.max_shard_size),
                                   tokenizer_path=args.tokenizer, progress=not args.no_progress,
                                   overwrite=args.overwrite)
    except (ExportError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[export] {result.checkpoint} -> {result.out_dir}")
    print(f"[export] format: {'stock LlamaForCausalLM' if result.format == 'llama' else 'MegatronGPASForCausalLM (trust_remote_code=True)'}"
          f" ({result.reason})")
    print(f"[export] dtype {result.dtype}, weights: {', '.join(result.weight_files)}")
    tok = result.tokenizer
    if tok.get("exported"):
        print(f"[export] tokenizer: {tok['kind']} ({tok['probe_mismatches']}/{tok['probe_texts']} sample texts "
              "tokenize differently from training)")
        if tok["chat_template"]:
            print("[export] chat template: the fine-tuning run's sft.chat_template (tokenizer_config.json)")
        for difference in tok["known_differences"]:
            print(f"WARNING: the exported tokenizer differs from training: {difference}", file=sys.stderr)
        if tok["probe_mismatches"]:  # every score of this export would measure a slightly different model
            print(f"WARNING: the exported tokenizer does not tokenize as training did; texts that differ: "
                  f"{tok['mismatching_texts']}", file=sys.stderr)
    else:
        print(f"[export] tokenizer: not exported ({tok.get('reason')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
