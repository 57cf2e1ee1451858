#!/usr/bin/env python
r"""Tokenize JSONL / Parquet / text files into Megatron indexed datasets (.bin/.idx/.report.json).

    python tools/preprocess_data.py --input 'raw/*.jsonl.zst' --output-prefix data/c4 \
        --tokenizer-path tokenizer.model --workers 8

Inputs are files, directories (searched recursively) or quoted globs: .jsonl, .jsonl.gz,
.jsonl.zst (also .json.gz/.json.zst, as C4 names its JSON Lines), .parquet, .txt, .txt.gz, .txt.zst. See docs/data-preprocessing.md and
megatron_gpas/data/preprocess.py for outputs, reports, sharding and resumption.
"""

import argparse
import logging
import os
import re
import signal
import sys
import warnings

# Runnable from a checkout without installing the package.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


def quiet_library_logs() -> None:
    """Importing megatron (and torch through it) warns about GPUs and fused kernels and turns on
    INFO logging; none of it concerns data tools. Shared by the data tools in tools/."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found"
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")


quiet_library_logs()

from megatron_gpas.data.preprocess import SKIP_REASONS, preprocess  # noqa: E402
from megatron_gpas.data.readers import TXT_MODES  # noqa: E402
from megatron_gpas.tokenizer import TOKENIZER_KINDS, load_tokenizer  # noqa: E402

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'512M', '2G', '1.5GB', '1000000' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(?:i?B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 512M, 2G, 1000000)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])


def add_tokenizer_args(p: argparse.ArgumentParser) -> None:
    """The tokenizer options, shared with tools/inspect_data.py."""
    g = p.add_argument_group("tokenizer (local files only)")
    g.add_argument("--tokenizer-kind", default="auto", choices=TOKENIZER_KINDS,
                   help="auto: .model = SentencePiece (or a tiktoken rank file), tokenizer.json = Hugging Face, "
                        "vocab.json/encoder.json = GPT-2 BPE, .tiktoken = tiktoken")
    g.add_argument("--tokenizer-path", help="tokenizer file, or a directory holding one")
    g.add_argument("--merges-path", help="gpt2: merges.txt / vocab.bpe (default: next to the vocabulary)")
    g.add_argument("--tiktoken-pattern", help="tiktoken: pre-tokenizer regex, or cl100k (default), o200k, gpt2")
    g.add_argument("--eod-token", help="end-of-document token, if the tokenizer's own cannot be found")
    g.add_argument("--vocab-size", type=int, help="vocabulary size (only for --tokenizer-kind null)")


def tokenizer_from_args(args):
    return load_tokenizer(args.tokenizer_kind, args.tokenizer_path, merges_path=args.merges_path,
                          pattern=args.tiktoken_pattern, eod_token=args.eod_token,
                          vocab_size=args.vocab_size if args.tokenizer_kind == "null" else None)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="input files, directories or (quoted) globs")
    p.add_argument("--output-prefix", required=True,
                   help="writes PREFIX.bin/.idx/.report.json (PREFIX_<key>.* with several text keys)")
    add_tokenizer_args(p)
    p.add_argument("--text-key", nargs="+", default=["text"], metavar="KEY",
                   help="JSON key / Parquet column of the text (default: text); several keys write one "
                        "dataset per key")
    p.add_argument("--txt-mode", default="file", choices=TXT_MODES,
                   help="how a text file splits into documents (default: the whole file is one)")
    p.add_argument("--no-append-eod", dest="append_eod", action="store_false",
                   help="do not append the end-of-document token to each document")
    p.add_argument("--strict", action="store_true", help="fail at the first bad record instead of skipping it")

    g = p.add_argument_group("parallelism and sharding")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1, in-process)")
    g.add_argument("--chunk-records", type=int, default=1024, help="records per work unit (default: 1024)")
    g.add_argument("--chunk-bytes", type=parse_size, default=1 << 20,
                   help="bytes of text per work unit (default: 1M); bounds memory with --max-inflight")
    g.add_argument("--max-inflight", type=int, help="work units between reading and writing (default: 2 x workers)")
    g.add_argument("--shard-by", choices=["none", "file"], default="none",
                   help="file: one output (PREFIX_<nnnnn>) per input file, each resumable on its own")
    g.add_argument("--shard-size", type=parse_size,
                   help="roll over to a new output part (<name>_part<nnnn>) when a .bin reaches this size")
    g.add_argument("--task-index", type=int, default=int(os.environ.get("SLURM_ARRAY_TASK_ID", 0)),
                   help="with --task-count: process shards i where i %% count == index "
                        "(default: $SLURM_ARRAY_TASK_ID or 0)")
    g.add_argument("--task-count", type=int, default=1, help="number of array tasks sharing the shards")
    g.add_argument("--force", action="store_true", help="redo outputs whose report says they are up to date")
    g.add_argument("--progress-interval", type=float, default=10.0,
                   help="seconds between progress lines when stderr is not a terminal (default: 10)")
    return p.parse_args(argv)


def _raise_on_sigterm(signum, frame):
    # SLURM sends SIGTERM at the time limit: unwind so that temporary outputs are removed.
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        tokenizer = tokenizer_from_args(args)
        reports = preprocess(
            args.input, args.output_prefix, tokenizer,
            text_keys=args.text_key, txt_mode=args.txt_mode, append_eod=args.append_eod,
            workers=args.workers, strict=args.strict,
            shard_by_file=args.shard_by == "file", shard_size=args.shard_size,
            task_index=args.task_index, task_count=args.task_count, force=args.force,
            chunk_records=args.chunk_records, chunk_bytes=args.chunk_bytes, max_inflight=args.max_inflight,
            progress_interval_s=args.progress_interval,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    print(f"tokenizer: {tokenizer.name} (vocab {tokenizer.vocab_size}, eod {tokenizer.eod_id})")
    for report in reports:
        docs = report["documents"]
        parts = report["parts"]
        where = (parts[0]["prefix"] + ".{bin,idx}" if len(parts) == 1
                 else f"{len(parts)} parts {report['output_prefix']}_part*")
        if report["status"] == "up_to_date":
            print(f"{report['output_prefix']}: up to date ({docs['written']} documents), skipped")
            continue
        print(f"{report['output_prefix']} [{report['text_key']}] ({report['dtype']}): {docs['read']} read, "
              f"{docs['written']} written, {docs['skipped']} skipped; {report['tokens_written']:,} tokens -> {where}")
        for reason in SKIP_REASONS:
            info = report["skipped"][reason]
            if info["count"]:
                first = ", ".join(e["location"] for e in info["first"])
                print(f"  skipped {reason}: {info['count']} (first at {first})")
        if docs["written"] == 0:
            print(f"  warning: {report['output_prefix']} holds no documents", file=sys.stderr)
        print(f"  report: {report['output_prefix']}.report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
