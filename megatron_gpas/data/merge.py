"""Concatenate indexed datasets into one, streaming (``tools/merge_datasets.py``).

    report = merge_datasets(["out/shards/c4_*"], "out/c4")

Inputs are dataset prefixes, globs over them, or directories (every ``*.idx`` inside),
merged in the order given (globs and directories sorted by name, which is shard order
for ``preprocess``'s zero-padded names). Each input is checked with
``check_indexed_dataset`` first, so a corrupt shard fails the merge before any writing.

Megatron-Core's ``IndexedDatasetBuilder.add_index`` does the merge: it streams each
``.bin`` into the output with ``shutil.copyfileobj`` and appends the input's index. With
``indexed.new_builder``'s typed index arrays, memory is 12 bytes per sequence of the
output (plus Megatron's ~40 bytes per sequence while writing the ``.idx``), independent
of the token count. The output is committed atomically, and ``PREFIX.report.json``
lists the inputs, sums the skip counts of their preprocessing reports and records their common
tokenizer and largest token id (inputs of different tokenizers are refused).
"""

from __future__ import annotations

import glob
import os
import sys
import time
from typing import Sequence

from megatron_gpas.data import indexed
from megatron_gpas.data.preprocess import EXAMPLES_PER_REASON
from megatron_gpas.tokenizer import describe_briefly, tokenizer_identity


def expand_dataset_prefixes(specs: Sequence[str | os.PathLike]) -> list[str]:
    """Dataset prefixes from prefixes, globs (over prefixes or files) and directories."""
    prefixes: list[str] = []
    for spec in map(os.fspath, specs):
        spec = spec.removesuffix(".bin").removesuffix(".idx")
        if os.path.isdir(spec):
            found = sorted(p[:-4] for p in glob.glob(os.path.join(glob.escape(spec), "*.idx")))
            if not found:
                raise ValueError(f"directory {spec!r} holds no indexed datasets (*.idx)")
            prefixes += found
        elif os.path.isfile(spec + ".idx") or os.path.isfile(spec + ".bin"):
            prefixes.append(spec)
        elif set("*?[") & set(spec):
            found = sorted({p[:-4] for p in glob.glob(spec + ".idx")} | {p[:-4] for p in glob.glob(spec + ".bin")})
            if not found:
                raise FileNotFoundError(f"no indexed datasets match {spec!r}")
            prefixes += found
        else:
            raise FileNotFoundError(f"indexed dataset not found: {spec!r} (no {spec}.idx)")
    seen = set()
    for p in prefixes:
        if os.path.realpath(p) in seen:
            raise ValueError(f"dataset {p!r} is given more than once")
        seen.add(os.path.realpath(p))
    if not prefixes:
        raise ValueError("no datasets to merge")
    return prefixes


def _sum_preprocessing_reports(prefixes: Sequence[str]) -> dict:
    """Totals of the inputs' preprocessing reports (PREFIX.report.json, where present)."""
    totals = {"documents": {"read": 0, "written": 0, "skipped": 0}, "skipped": {}, "inputs_without_report": []}
    for prefix in prefixes:
        report = indexed.read_json(prefix + ".report.json")
        if report is None or "documents" not in report:
            totals["inputs_without_report"].append(prefix)
            continue
        for k in totals["documents"]:
            totals["documents"][k] += report["documents"][k]
        for reason, info in report.get("skipped", {}).items():
            entry = totals["skipped"].setdefault(reason, {"count": 0, "first": []})
            entry["count"] += info["count"]
            entry["first"] += info.get("first", [])[: max(0, EXAMPLES_PER_REASON - len(entry["first"]))]
    return totals


def _common_tokenizer(prefixes: Sequence[str]) -> tuple[dict | None, int | None]:
    """(tokenizer, largest token id) of the merged data, from the inputs' reports: known only when
    every input records them. Inputs tokenized with different tokenizers are refused."""
    reports = [indexed.read_json(prefix + ".report.json") or {} for prefix in prefixes]
    tokenizers = [(prefix, r["tokenizer"]) for prefix, r in zip(prefixes, reports) if r.get("tokenizer")]
    for prefix, desc in tokenizers[1:]:
        if tokenizer_identity(desc) != tokenizer_identity(tokenizers[0][1]):
            raise ValueError(f"cannot merge datasets tokenized with different tokenizers: {tokenizers[0][0]} "
                             f"({describe_briefly(tokenizers[0][1])}) and {prefix} ({describe_briefly(desc)})")
    max_ids = [r.get("max_token_id") for r in reports if r.get("tokens_written") != 0]  # (no tokens: no largest id)
    tokenizer = tokenizers[0][1] if tokenizers and len(tokenizers) == len(prefixes) else None
    max_id = max((m for m in max_ids if m is not None), default=None) if None not in max_ids else None
    return tokenizer, max_id


def merge_datasets(inputs: Sequence[str | os.PathLike], output_prefix: str | os.PathLike,
                   progress: bool = True) -> dict:
    """Concatenate the datasets ``inputs`` into ``output_prefix``; returns the report."""
    from megatron_gpas.data.datasets import check_indexed_dataset

    prefixes = expand_dataset_prefixes(inputs)
    out = os.fspath(output_prefix)
    if os.path.realpath(out) in {os.path.realpath(p) for p in prefixes}:
        raise ValueError(f"the output {out!r} is also an input")

    # Check everything before writing anything.
    summaries = []
    for prefix in prefixes:
        dataset = check_indexed_dataset(prefix, allow_empty=True)  # a shard of only bad records is fine
        index = dataset.index
        summaries.append({
            "prefix": prefix,
            "dtype": index.dtype,
            "sequences": int(index.sequence_count),
            "documents": int(index.document_count) - 1,
            "tokens": int(index.sequence_lengths.sum(dtype="int64")),
        })
        del dataset, index  # release the memory maps
    dtypes = {s["dtype"] for s in summaries}
    if len(dtypes) > 1:
        listing = ", ".join(f"{s['prefix']} ({s['dtype'].__name__})" for s in summaries)
        raise ValueError(f"cannot merge datasets of different token dtypes (tokenized with different "
                         f"vocabulary sizes?): {listing}")
    tokenizer, max_token_id = _common_tokenizer(prefixes)

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    indexed.remove_if_exists(out + ".report.json")  # a report is only ever next to the data it describes
    bin_tmp, idx_tmp = indexed.tmp_prefix_paths(out)
    start = time.monotonic()
    builder = indexed.new_builder(bin_tmp, summaries[0]["dtype"])
    try:
        for i, prefix in enumerate(prefixes, start=1):
            builder.add_index(prefix)
            if progress:
                print(f"[merge] {i}/{len(prefixes)} {prefix}", file=sys.stderr, flush=True)
        builder.finalize(idx_tmp)
    except BaseException:
        builder.data_file.close()
        indexed.discard(out)
        raise
    indexed.commit(out)
    merged = check_indexed_dataset(out, allow_empty=True)  # the output must pass the same check as its inputs

    report = {
        "output_prefix": out,
        "bin_path": out + ".bin",
        "idx_path": out + ".idx",
        "dtype": summaries[0]["dtype"].__name__,
        "inputs": [dict(s, dtype=s["dtype"].__name__) for s in summaries],
        "index": {"sequences": int(merged.index.sequence_count),
                  "documents": int(merged.index.document_count) - 1,
                  "tokens": sum(s["tokens"] for s in summaries)},
        "preprocessing": _sum_preprocessing_reports(prefixes),
        # what training checks at start-up (None: an input's report does not say)
        "tokenizer": tokenizer,
        "max_token_id": max_token_id,
        "elapsed_s": round(time.monotonic() - start, 3),
    }
    # Megatron-Core's GPTDataset reads only .bin/.idx; the report is for people and tools.
    indexed.write_json_atomically(out + ".report.json", report)
    return report
