#!/usr/bin/env python
r"""Concatenate Megatron indexed datasets into one, streaming, with Megatron-Core's add_index.

    python tools/merge_datasets.py --input 'data/shards/c4_*' --output-prefix data/c4

Inputs are prefixes, quoted globs or directories, merged in order (globs and directories
sorted by name). Every input is integrity-checked before anything is written; the output
is committed atomically and described by PREFIX.report.json (which also sums the inputs'
preprocessing reports). Memory: ~12 bytes per sequence, whatever the token count.
"""

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tools/: the shared CLI pieces
from preprocess_data import _raise_on_sigterm  # noqa: E402  (also sets up sys.path, logs)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="PREFIX",
                   help="dataset prefixes (PREFIX.bin/.idx), globs over them, or directories")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.report.json")
    p.add_argument("--quiet", action="store_true", help="no per-input progress lines")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    from megatron_gpas.data.merge import merge_datasets

    try:
        report = merge_datasets(args.input, args.output_prefix, progress=not args.quiet)
    except (ValueError, FileNotFoundError) as e:  # DataCorruptError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    index, pre = report["index"], report["preprocessing"]
    print(f"merged {len(report['inputs'])} datasets into {report['output_prefix']}.{{bin,idx}} ({report['dtype']}): "
          f"{index['documents']:,} documents, {index['tokens']:,} tokens")
    if not pre["inputs_without_report"]:
        docs = pre["documents"]
        print(f"preprocessing totals: {docs['read']:,} read, {docs['written']:,} written, {docs['skipped']:,} skipped")
    print(f"report: {report['output_prefix']}.report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
