#!/usr/bin/env python
r"""Tokenize .jsonl/.txt files into a Megatron indexed dataset (PREFIX.bin/.idx/.report.json).

    python tools/preprocess_data.py --input demo_assets/corpus.jsonl \
        --output-prefix data/shakespeare --tokenizer-path demo_assets/tokenizer.model --workers 4

See megatron_gpas/data/preprocess.py for the input formats and the report.
"""

import argparse
import os
import sys
import warnings

# Runnable from a checkout without installing the package.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

# Importing megatron.core warns about missing fused kernels, irrelevant to tokenizing.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

from megatron_gpas.data.preprocess import SKIP_REASONS, TXT_MODES, build_indexed_dataset  # noqa: E402
from megatron_gpas.tokenizer import TOKENIZER_KINDS, load_tokenizer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="input files (.jsonl/.txt) or directories (their *.jsonl/*.txt files)")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.report.json")
    p.add_argument("--tokenizer-kind", default="auto", choices=TOKENIZER_KINDS,
                   help="auto picks from the file suffix: .model = sentencepiece, .json = huggingface")
    p.add_argument("--tokenizer-path", help="tokenizer file (.model or tokenizer.json)")
    p.add_argument("--eod-token", help="end-of-document token, if the tokenizer's EOS cannot be found")
    p.add_argument("--vocab-size", type=int, help="vocabulary size (only for --tokenizer-kind null)")
    p.add_argument("--text-key", default="text", help="JSON key holding the document text (default: text)")
    p.add_argument("--txt-mode", default="file", choices=TXT_MODES,
                   help="how a .txt file splits into documents (default: the whole file is one)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    p.add_argument("--no-append-eod", dest="append_eod", action="store_false",
                   help="do not append the end-of-document token to each document")
    p.add_argument("--strict", action="store_true", help="fail at the first bad record instead of skipping it")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        opts = {"vocab_size": args.vocab_size} if args.tokenizer_kind == "null" else {}
        if args.eod_token is not None:
            opts["eod_token"] = args.eod_token
        tokenizer = load_tokenizer(args.tokenizer_kind, args.tokenizer_path, **opts)
        report = build_indexed_dataset(
            args.input,
            args.output_prefix,
            tokenizer,
            text_key=args.text_key,
            txt_mode=args.txt_mode,
            append_eod=args.append_eod,
            workers=args.workers,
            strict=args.strict,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    docs = report["documents"]
    print(f"tokenizer: {report['tokenizer']['name']} (vocab {report['tokenizer']['vocab_size']}, "
          f"eod {report['tokenizer']['eod_id']}), dtype {report['dtype']}")
    print(f"documents: {docs['read']} read, {docs['written']} written, {docs['skipped']} skipped")
    for reason in SKIP_REASONS:
        info = report["skipped"][reason]
        if info["count"]:
            print(f"  skipped {reason}: {info['count']} (first at {', '.join(info['first_locations'])})")
    print(f"tokens written: {report['tokens_written']:,}")
    print(f"wrote {report['bin_path']}, {report['idx_path']}, {args.output_prefix}.report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
