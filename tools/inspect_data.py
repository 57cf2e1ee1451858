#!/usr/bin/env python
r"""Inspect Megatron indexed datasets: counts, dtype, decoded samples, and an integrity check.

    python tools/inspect_data.py data/c4                 # summary + 3 decoded samples
    python tools/inspect_data.py data/c4 --samples 5 --seed 0 --check-ids
    python tools/inspect_data.py 'data/shards/c4_*' --samples 0 --json

The tokenizer for decoding is the one named in PREFIX.report.json (when its files are
unchanged) unless --tokenizer-path is given. Exit status 1 with an explanation when a
dataset is corrupt (the same check training runs at start-up).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tools/: the shared CLI pieces
from preprocess_data import add_tokenizer_args, tokenizer_from_args  # noqa: E402  (also sets up sys.path, logs)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prefix", nargs="+", help="dataset prefixes (PREFIX.bin/.idx), globs or directories")
    add_tokenizer_args(p)
    p.add_argument("--samples", type=int, default=3, help="sequences to show (default: 3)")
    p.add_argument("--sample-tokens", type=int, default=64, help="tokens shown per sample (default: 64)")
    p.add_argument("--seed", type=int, help="show random sequences (with this seed) instead of the first ones")
    p.add_argument("--check-ids", action="store_true",
                   help="also read every token and check it is below the vocabulary size")
    p.add_argument("--json", action="store_true", help="print one JSON object per dataset")
    return p.parse_args(argv)


def _print_human(info: dict) -> None:
    stats = info["tokens_per_sequence"]
    print(f"{info['prefix']}: {info['dtype']}, .bin {info['bin_bytes']:,} bytes, .idx {info['idx_bytes']:,} bytes")
    print(f"  {info['sequences']:,} sequences, {info['documents']:,} documents, {info['tokens']:,} tokens; "
          f"tokens per sequence min {stats['min']}, mean {stats['mean']}, max {stats['max']}")
    print(f"  integrity: {info['integrity']} (index header, sizes, offsets, document boundaries)")
    if "token_ids" in info:
        ids = info["token_ids"]
        print(f"  token ids: all {ids['checked_tokens']:,} below the vocabulary size {ids['vocab_size']} "
              f"(max {ids['max_id']})")
    report = info["report"]
    if report and "documents" in report:
        docs, tok = report["documents"], report.get("tokenizer", {})
        skipped = {r: e["count"] for r, e in report.get("skipped", {}).items() if e["count"]}
        print(f"  report: tokenizer {tok.get('name')} (vocab {tok.get('vocab_size')}, eod {tok.get('eod_id')}); "
              f"{docs['read']:,} read, {docs['written']:,} written, {docs['skipped']:,} skipped {skipped or ''}")
    for sample in info["samples"]:
        print(f"  sample {sample['index']} ({sample['length']} tokens): {sample['ids']}")
        if "text" in sample:
            print(f"    text: {sample['text']!r}" + ("" if sample["ends_with_eod"] else "  [no EOD at the end]"))
    if info["samples"] and info["tokenizer"] is None:
        print("  (no tokenizer to decode with: give --tokenizer-path)")


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_gpas.data.datasets import DataCorruptError
    from megatron_gpas.data.inspection import inspect_dataset
    from megatron_gpas.data.merge import expand_dataset_prefixes

    failed = 0
    try:
        prefixes = expand_dataset_prefixes(args.prefix)
        tokenizer = tokenizer_from_args(args) if (args.tokenizer_path or args.tokenizer_kind == "null") else None
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for prefix in prefixes:
        try:
            info = inspect_dataset(prefix, tokenizer, samples=args.samples, sample_tokens=args.sample_tokens,
                                   seed=args.seed, check_ids=args.check_ids, vocab_size=args.vocab_size)
        except (DataCorruptError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        if args.json:
            print(json.dumps(info))
        else:
            _print_human(info)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
