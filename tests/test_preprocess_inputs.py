"""Preprocessing inputs: compressed JSONL, Parquet, text, directories and globs, several text
keys, and bad records in every format, each counted and located."""

import gzip
import json
import os
from pathlib import Path

import pytest

from megatron_gpas.data.preprocess import preprocess
from megatron_gpas.data.readers import expand_inputs
from megatron_gpas.tokenizer import NullTokenizer
from test_tokenizer_and_preprocess import read_dataset, write_jsonl


TOK = NullTokenizer(1000)  # text "5 17 3" -> ids [5, 17, 3]; EOD 999


def id_texts(n: int, seed: int) -> list[str]:
    """Documents of NullTokenizer text with lengths 1..40 (whitespace-separated ids)."""
    import random

    rng = random.Random(seed)
    return [" ".join(str(rng.randrange(998)) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def run(inputs, prefix, **kwargs) -> list[dict]:
    return preprocess(inputs, prefix, TOK, progress_interval_s=None, **kwargs)


def write_parquet(path: Path, columns: dict, row_group_size: int = 7) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def test_compressed_and_parquet_inputs_give_the_same_dataset(tmp_path):
    texts = id_texts(60, seed=1)
    plain = write_jsonl(tmp_path / "plain.jsonl", texts)
    raw = plain.read_bytes()
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "c4-train.00000-of-01024.json.gz").write_bytes(gzip.compress(raw))  # C4's naming
    import zstandard

    # Two zstd frames: files concatenated from several compressor runs must read through.
    half = raw.index(b"\n", len(raw) // 2) + 1
    cctx = zstandard.ZstdCompressor()
    (tmp_path / "c.jsonl.zst").write_bytes(cctx.compress(raw[:half]) + cctx.compress(raw[half:]))
    write_parquet(tmp_path / "c.parquet", {"text": texts, "id": list(range(len(texts)))})
    (tmp_path / "c.txt.gz").write_bytes(gzip.compress("\n".join(texts).encode()))

    expected = [[int(t) for t in text.split()] + [999] for text in texts]
    for name, kwargs in [("plain.jsonl", {}), ("c.jsonl.gz", {}), ("c4-train.00000-of-01024.json.gz", {}),
                         ("c.jsonl.zst", {}), ("c.parquet", {}), ("c.txt.gz", {"txt_mode": "line"})]:
        (report,) = run([tmp_path / name], tmp_path / "out" / name, chunk_records=16, **kwargs)
        assert read_dataset(tmp_path / "out" / name) == expected, name
        assert report["documents"] == {"read": 60, "written": 60, "skipped": 0}, name
        assert report["inputs"][0]["records"] == 60


def test_directories_and_globs_expand_sorted_and_recursively(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / ".hidden").mkdir()
    for name in ["d/b.jsonl", "d/a.jsonl.gz", "d/sub/c.parquet", "d/.hidden/x.jsonl", "d/README.md",
                 "d/dataset_info.json", "d/sub/e.json.zst"]:
        (tmp_path / name).write_bytes(b"")
    d = str(tmp_path / "d")
    assert expand_inputs([d]) == [f"{d}/a.jsonl.gz", f"{d}/b.jsonl", f"{d}/sub/c.parquet", f"{d}/sub/e.json.zst"]
    assert expand_inputs([f"{d}/*.jsonl*"]) == [f"{d}/a.jsonl.gz", f"{d}/b.jsonl"]
    assert expand_inputs([f"{d}/**/*.parquet", f"{d}/b.jsonl"]) == [f"{d}/sub/c.parquet", f"{d}/b.jsonl"]

    with pytest.raises(ValueError, match="matches the unsupported file .*README.md"):
        expand_inputs([f"{d}/*"])
    with pytest.raises(ValueError, match="given more than once"):
        expand_inputs([d, f"{d}/b.jsonl"])
    with pytest.raises(FileNotFoundError, match="matches no files"):
        expand_inputs([f"{d}/*.zip"])
    with pytest.raises(ValueError, match="unsupported input file"):
        expand_inputs([f"{d}/README.md"])
    with pytest.raises(ValueError, match=r"dataset_info.json.*\(if it holds one JSON object per line, name it"):
        expand_inputs([f"{d}/dataset_info.json"])


def test_several_text_keys_write_one_dataset_per_key(tmp_path):
    rows = [{"text": "1 2", "title": "7"}, {"text": "3", "title": ""}, {"title": "8 9"}, {"text": "4", "title": 5}]
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    reports = run([src], tmp_path / "multi", text_keys=["text", "title"])
    by_key = {r["text_key"]: r for r in reports}
    assert read_dataset(tmp_path / "multi_text") == [[1, 2, 999], [3, 999], [4, 999]]
    assert read_dataset(tmp_path / "multi_title") == [[7, 999], [8, 9, 999]]
    assert by_key["text"]["skipped"]["missing_key"]["count"] == 1
    title_skips = by_key["title"]["skipped"]
    assert (title_skips["empty_text"]["count"], title_skips["non_string_text"]["count"]) == (1, 1)
    assert [e["location"] for e in title_skips["non_string_text"]["first"]] == [f"{src}:4"]
    assert all(r["documents"]["read"] == 4 for r in reports)
    assert (tmp_path / "multi_title.report.json").is_file()

    # The same keys from Parquet columns; a key that is no column is a missing key on every row.
    pq_src = write_parquet(tmp_path / "d.parquet", {"text": ["1 2", None, "3"], "title": ["7", "8", None]})
    reports = run([pq_src], tmp_path / "pq", text_keys=["text", "title", "body"])
    assert read_dataset(tmp_path / "pq_text") == [[1, 2, 999], [3, 999]]
    assert read_dataset(tmp_path / "pq_title") == [[7, 999], [8, 999]]
    body = {r["text_key"]: r for r in reports}["body"]
    assert body["documents"]["written"] == 0 and body["skipped"]["missing_key"]["count"] == 3
    assert [e["location"] for e in body["skipped"]["missing_key"]["first"]] == [f"{pq_src}:{n}" for n in (1, 2, 3)]

    with pytest.raises(ValueError, match="several text keys need JSONL or Parquet inputs"):
        run([write_jsonl(tmp_path / "x.jsonl", ["1"]), _text_file(tmp_path)], tmp_path / "bad", text_keys=["a", "b"])
    with pytest.raises(ValueError, match="distinct"):
        run([src], tmp_path / "bad", text_keys=["text", "text"])


def _text_file(tmp_path) -> Path:
    path = tmp_path / "t.txt"
    path.write_text("1 2\n")
    return path


def test_bad_records_in_parquet_and_compressed_inputs(tmp_path):
    import pyarrow as pa

    # Parquet: a binary column holding undecodable bytes, nulls, empties; rows are 1-based.
    pq_src = write_parquet(tmp_path / "b.parquet", {"text": pa.array([b"1 2", b"\xff 3", None, b"  ", b"4"],
                                                                       type=pa.binary())})
    (report,) = run([pq_src], tmp_path / "pq")
    assert read_dataset(tmp_path / "pq") == [[1, 2, 999], [4, 999]]
    sk = report["skipped"]
    assert [e["location"] for e in sk["invalid_utf8"]["first"]] == [f"{pq_src}:2"]
    assert [e["location"] for e in sk["missing_key"]["first"]] == [f"{pq_src}:3"]
    assert [e["location"] for e in sk["empty_text"]["first"]] == [f"{pq_src}:4"]
    assert report["documents"] == {"read": 5, "written": 2, "skipped": 3}

    # Compressed JSONL: line numbers are those of the decompressed text.
    gz = tmp_path / "b.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"text": "1"}\n\n{oops\n{"text": "2"}\n'))
    (report,) = run([gz], tmp_path / "gz")
    assert [e["location"] for e in report["skipped"]["invalid_json"]["first"]] == [f"{gz}:3"]
    with pytest.raises(ValueError, match=rf"^{gz}:3: invalid_json"):
        run([gz], tmp_path / "gz_strict", strict=True)


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_truncated_compressed_input_fails_with_its_location(suffix, tmp_path):
    import zstandard

    raw = "".join(json.dumps({"text": t}) + "\n" for t in id_texts(4000, seed=2)).encode()  # several zstd blocks
    data = gzip.compress(raw) if suffix == ".jsonl.gz" else zstandard.ZstdCompressor().compress(raw)
    src = tmp_path / f"cut{suffix}"
    src.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{src}: corrupt or truncated (gzip|zstd) data after the record at line \d+"):
        run([src], tmp_path / "out" / "cut")
    assert os.listdir(tmp_path / "out") == []  # nothing that looks like output
