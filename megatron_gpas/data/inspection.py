"""Look inside an indexed dataset: counts, dtype, length statistics, decoded samples, integrity
(``tools/inspect_data.py``).

The integrity check is ``check_indexed_dataset``, the one training runs at start-up.
``check_ids`` additionally streams the ``.bin`` and verifies every token id is below the
vocabulary size. Everything reads in blocks, so memory does not grow with the dataset.
"""

from __future__ import annotations

import os
import random

import numpy as np

from megatron_gpas.data import indexed
from megatron_gpas.data.datasets import check_indexed_dataset, check_token_ids
from megatron_gpas.tokenizer import Tokenizer, tokenizer_from_config

_BLOCK = 1 << 22  # index entries per block


def tokenizer_from_report(report: dict | None) -> Tokenizer | None:
    """The tokenizer a preprocessing report names, if its files are still there unchanged."""
    desc = (report or {}).get("tokenizer")
    if not desc or "config" not in desc:
        return None
    try:
        tokenizer = tokenizer_from_config(desc["config"])
    except (OSError, ValueError):
        return None
    return tokenizer if tokenizer.describe()["sha256"] == desc.get("sha256") else None


def _length_stats(lengths: np.ndarray) -> dict:
    if len(lengths) == 0:
        return {"min": None, "max": None, "mean": None}
    lo, hi, total = None, None, 0
    for start in range(0, len(lengths), _BLOCK):
        block = lengths[start:start + _BLOCK]
        lo = int(block.min()) if lo is None else min(lo, int(block.min()))
        hi = int(block.max()) if hi is None else max(hi, int(block.max()))
        total += int(block.sum(dtype=np.int64))
    return {"min": lo, "max": hi, "mean": round(total / len(lengths), 2)}


def inspect_dataset(prefix: str, tokenizer: Tokenizer | None = None, *, samples: int = 3,
                    sample_tokens: int = 64, seed: int | None = None, check_ids: bool = False,
                    vocab_size: int | None = None) -> dict:
    """Everything ``tools/inspect_data.py`` prints, as a dict. Raises DataCorruptError on corruption.

    ``tokenizer`` decodes the samples; without one, the tokenizer named in
    ``PREFIX.report.json`` is used when its files are unchanged. ``samples`` sequences are
    shown: the first ones, or random ones with ``seed``.
    """
    dataset = check_indexed_dataset(prefix, allow_empty=True)
    index = dataset.index
    report = indexed.read_json(prefix + ".report.json")
    if tokenizer is None:
        tokenizer = tokenizer_from_report(report)
    num = len(dataset)
    info = {
        "prefix": prefix,
        "dtype": np.dtype(index.dtype).name,
        "bin_bytes": os.path.getsize(prefix + ".bin"),
        "idx_bytes": os.path.getsize(prefix + ".idx"),
        "sequences": num,
        "documents": int(index.document_count) - 1,
        "tokens": int(sum(int(index.sequence_lengths[s:s + _BLOCK].sum(dtype=np.int64))
                          for s in range(0, num, _BLOCK))),
        "tokens_per_sequence": _length_stats(index.sequence_lengths),
        "integrity": "ok",
        "tokenizer": tokenizer.name if tokenizer else None,
        "report": None,
    }
    if report is not None:
        info["report"] = {k: report[k] for k in ("documents", "skipped", "tokenizer", "preprocessing", "index")
                          if k in report}

    vocab = vocab_size or (tokenizer.vocab_size if tokenizer else None) or \
        ((report or {}).get("tokenizer") or {}).get("vocab_size")
    if check_ids:
        if vocab is None:
            raise ValueError("checking token ids needs the vocabulary size: give a tokenizer or --vocab-size")
        info["token_ids"] = check_token_ids(dataset, vocab)

    picks = list(range(min(samples, num)))
    if seed is not None and num:
        picks = sorted(random.Random(seed).sample(range(num), min(samples, num)))
    info["samples"] = []
    for i in picks:
        ids = dataset[i][:sample_tokens].tolist()
        sample = {"index": i, "length": int(index.sequence_lengths[i]), "ids": ids}
        if tokenizer is not None:
            sample["text"] = tokenizer.decode(ids)
            sample["ends_with_eod"] = bool(dataset[i][-1] == tokenizer.eod_id) if sample["length"] else False
        info["samples"].append(sample)
    return info
