"""The preprocessing pipeline: worker determinism, the in-flight bound, atomic outputs under
failures and kills, per-shard resumption, output parts, and the compact index builder."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from megatron_gpas.data import indexed
from megatron_gpas.data.preprocess import _TokenizerPool, build_indexed_dataset, preprocess
from megatron_gpas.data.readers import iter_chunks
from megatron_gpas.tokenizer import NullTokenizer
from test_tokenizer_and_preprocess import REPO_ROOT, generated_sentences, read_dataset, read_files, write_jsonl
from test_tokenizer_and_preprocess import sp_tokenizer  # noqa: F401  (a fixture)


# Report fields that legitimately differ between runs of the same job.
RUN_FIELDS = ("elapsed_s", "tokens_per_s", "workers", "status")


def _mixed_inputs(tmp_path: Path) -> list[Path]:
    """JSONL with a few bad records, and Parquet, with two text keys."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": s, "title": s.split()[0]} for s in generated_sentences(300, seed=11)]
    rows[7] = {"title": "no text"}
    lines = [json.dumps(r) for r in rows]
    lines[50] = "{broken"
    a = tmp_path / "a.jsonl"
    a.write_text("\n".join(lines) + "\n")
    b = tmp_path / "b.parquet"
    texts = generated_sentences(200, seed=12)
    pq.write_table(pa.table({"text": texts, "title": [t[:9] for t in texts]}), b, row_group_size=33)
    return [a, b]


def _strip(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in RUN_FIELDS}


def test_multi_worker_output_is_byte_identical(sp_tokenizer, tmp_path):
    inputs = _mixed_inputs(tmp_path)
    common = dict(text_keys=["text", "title"], shard_size=2000, progress_interval_s=None)
    one = preprocess(inputs, tmp_path / "one" / "d", sp_tokenizer, workers=1, **common)
    three = preprocess(inputs, tmp_path / "three" / "d", sp_tokenizer, workers=3, chunk_records=7,
                       chunk_bytes=300, max_inflight=4, **common)
    assert len(one) == len(three) == 2
    for r1, r3 in zip(one, three):
        assert len(r1["parts"]) > 1  # shard_size made several parts
        for p1, p3 in zip(r1["parts"], r3["parts"]):
            assert read_files(p1["prefix"]) == read_files(p3["prefix"])
        assert json.dumps(_strip(r1)).replace("/one/", "/X/") == json.dumps(_strip(r3)).replace("/three/", "/X/")
    text_report = one[0]
    assert text_report["documents"] == {"read": 500, "written": 498, "skipped": 2}
    # Parts hold consecutive documents: together they are the whole output, in order.
    docs = [d for p in text_report["parts"] for d in read_dataset(p["prefix"])]
    expected = [sp_tokenizer.encode(s) + [sp_tokenizer.eod_id] for i, s in enumerate(generated_sentences(300, seed=11))
                if i not in (7, 50)] + [sp_tokenizer.encode(s) + [sp_tokenizer.eod_id]
                                        for s in generated_sentences(200, seed=12)]
    assert docs == expected
    itemsize = 2
    for p in text_report["parts"][:-1]:  # each part closes at the first document past shard_size
        assert 2000 <= p["tokens"] * itemsize < 2000 + max(map(len, docs)) * itemsize


def test_in_flight_chunks_are_bounded(tmp_path):
    """The reader runs at most max_inflight chunks ahead of the writer, with real workers."""
    src = write_jsonl(tmp_path / "d.jsonl", [f"{i} {i + 1}" for i in range(2000)])
    pulled = consumed = 0
    worst = 0

    def counting_chunks():
        nonlocal pulled
        for chunk in iter_chunks(str(src), max_records=10):
            pulled += 1
            yield chunk

    with _TokenizerPool(NullTokenizer(5000), workers=2, max_inflight=3) as pool:
        for result in pool.map(counting_chunks(), ["text"], True, np.uint16):
            consumed += 1
            worst = max(worst, pulled - consumed)
            time.sleep(0.002)  # a slow writer: the reader must wait, not pile up chunks
    assert consumed == 200
    assert worst == 3 - 1  # max_inflight outstanding, one of which was just handed over


class _FailingTokenizer(NullTokenizer):
    """Raises ``error`` on the n-th document, to simulate a crash in the middle of a run."""

    def __init__(self, fail_at: int, error: BaseException = RuntimeError("injected failure")):
        super().__init__(10)
        self.calls, self.fail_at, self.error = 0, fail_at, error

    def encode(self, text):
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.error
        return super().encode(text)


@pytest.mark.parametrize("where", ["mid_stream", "finalize", "sigterm", "ctrl_c"])
def test_failure_leaves_no_dataset_behind(where, tmp_path, monkeypatch):
    """An error, SIGTERM (the CLI turns it into SystemExit) or Ctrl-C mid-run, or a failing
    finalize: every temporary is removed and nothing else is written."""
    from megatron.core.datasets import indexed_dataset

    src = write_jsonl(tmp_path / "d.jsonl", ["1 2", "3 4", "5 6", "7 8"])
    tok = NullTokenizer(10)
    expected = pytest.raises(RuntimeError, match="injected failure")
    if where == "finalize":
        def failing_finalize(self, idx_path):
            raise RuntimeError("injected failure")

        monkeypatch.setattr(indexed_dataset.IndexedDatasetBuilder, "finalize", failing_finalize)
    elif where == "mid_stream":
        tok = _FailingTokenizer(fail_at=3)
        expected = pytest.raises(RuntimeError, match=rf"{src}:3: the tokenizer failed on this record: injected failure")
    elif where == "sigterm":
        sys.path.insert(0, str(REPO_ROOT / "tools"))
        from preprocess_data import _raise_on_sigterm

        with pytest.raises(SystemExit) as exit_info:
            _raise_on_sigterm(signal.SIGTERM, None)
        tok = _FailingTokenizer(fail_at=3, error=exit_info.value)
        expected = pytest.raises(SystemExit)
    else:
        tok = _FailingTokenizer(fail_at=3, error=KeyboardInterrupt())
        expected = pytest.raises(KeyboardInterrupt)

    with expected:
        build_indexed_dataset([src], tmp_path / "out" / "d", tok, progress_interval_s=None)
    assert os.listdir(tmp_path / "out") == []  # no .bin, .idx, temporaries or report


def test_failed_rerun_keeps_previous_outputs(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", ["1 2", "3 4", "5 6"])
    build_indexed_dataset([src], tmp_path / "d", NullTokenizer(10), progress_interval_s=None)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("d.*") if not p.name.endswith(".report.json")}
    with pytest.raises(RuntimeError):  # force: the same inputs and tokenizer config would be up to date
        build_indexed_dataset([src], tmp_path / "d", _FailingTokenizer(fail_at=2), force=True,
                              progress_interval_s=None)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("d.*")} == before
    # The report went first: the old outputs are no longer vouched for, so a rerun redoes them.
    assert not (tmp_path / "d.report.json").exists()


def test_killed_run_leaves_no_complete_looking_output(tmp_path):
    """SIGKILL the CLI while it writes: no .bin/.idx pair and no report; a rerun succeeds."""
    src = tmp_path / "big.jsonl"
    src.write_bytes(b'{"text": "1 2 3 4 5 6 7 8"}\n' * 1_500_000)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "tools" / "preprocess_data.py"), "--input", str(src),
         "--output-prefix", str(out / "d"), "--tokenizer-kind", "null", "--vocab-size", "10"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    bin_tmp = out / "d.bin.tmp"
    deadline = time.monotonic() + 240
    while not (bin_tmp.exists() and bin_tmp.stat().st_size > 0):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the run never started writing"
        time.sleep(0.05)
    proc.kill()
    assert proc.wait(timeout=120) == -signal.SIGKILL
    proc.stderr.close()
    assert sorted(p.name for p in out.iterdir()) == ["d.bin.tmp"]  # a temporary, which no reader opens

    build_indexed_dataset([write_jsonl(tmp_path / "small.jsonl", ["1 2", "3"])], out / "d", NullTokenizer(10),
                          progress_interval_s=None)
    assert sorted(p.name for p in out.iterdir()) == ["d.bin", "d.idx", "d.report.json"]
    assert read_dataset(out / "d") == [[1, 2, 9], [3, 9]]


def test_rerun_resumes_per_shard(tmp_path):
    files = [write_jsonl(tmp_path / f"{n}.jsonl", [f"{i} {i + 1}" for i in range(k)]) for n, k in
             (("a", 3), ("b", 4), ("c", 5))]
    prefix = tmp_path / "out" / "d"
    tok = NullTokenizer(100)

    def run(**kw):
        return preprocess(files, prefix, tok, shard_by_file=True, progress_interval_s=None, **kw)

    first = run()
    assert [r["output_prefix"] for r in first] == [f"{prefix}_{i:05d}" for i in range(3)]
    assert [r["status"] for r in first] == ["written"] * 3
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}

    assert [r["status"] for r in run()] == ["up_to_date"] * 3
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == stamps  # nothing rewritten

    # A changed input (size and mtime), a shard whose run never finished (no report), and a
    # shard whose .bin was damaged are redone; the others are not touched.
    write_jsonl(files[1], ["7 7 7"])
    os.remove(f"{prefix}_00002.report.json")
    reports = run()
    assert [r["status"] for r in reports] == ["up_to_date", "written", "written"]
    assert read_dataset(f"{prefix}_00001") == [[7, 7, 7, 99]]
    assert Path(f"{prefix}_00000.bin").stat().st_mtime_ns == stamps[Path(f"{prefix}_00000.bin")]
    with open(f"{prefix}_00000.bin", "ab") as f:
        f.write(b"\0\0")
    assert [r["status"] for r in run()] == ["written", "up_to_date", "up_to_date"]

    # Other options or another tokenizer: everything is redone. force=True redoes regardless.
    assert [r["status"] for r in run(append_eod=False)] == ["written"] * 3
    assert [r["status"] for r in preprocess(files, prefix, NullTokenizer(101), shard_by_file=True,
                                            append_eod=False, progress_interval_s=None)] == ["written"] * 3
    assert [r["status"] for r in preprocess(files, prefix, NullTokenizer(101), shard_by_file=True, append_eod=False,
                                            force=True, progress_interval_s=None)] == ["written"] * 3


def test_array_tasks_split_the_shards(tmp_path):
    files = [write_jsonl(tmp_path / f"{i}.jsonl", [f"{i} {i}"]) for i in range(5)]
    prefix = tmp_path / "d"
    done = []
    for task in (1, 0):
        reports = preprocess(files, prefix, NullTokenizer(10), shard_by_file=True, task_index=task, task_count=2,
                             progress_interval_s=None)
        done += [r["output_prefix"] for r in reports]
    assert sorted(done) == [f"{prefix}_{i:05d}" for i in range(5)]
    assert [read_dataset(f"{prefix}_{i:05d}") for i in range(5)] == [[[i, i, 9]] for i in range(5)]
    with pytest.raises(ValueError, match="task_index must be in"):
        preprocess(files, prefix, NullTokenizer(10), task_index=2, task_count=2)


def test_rerun_with_fewer_parts_removes_stale_parts(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [" ".join(["1"] * 50)] * 10)
    (report,) = preprocess([src], tmp_path / "d", NullTokenizer(10), shard_size=200, progress_interval_s=None)
    assert len(report["parts"]) == 5  # documents of 51 uint16 tokens (102 bytes): two per part
    (report,) = preprocess([src], tmp_path / "d", NullTokenizer(10), shard_size=500, progress_interval_s=None)
    assert len(report["parts"]) == 2  # five per part
    assert sorted(p.name for p in tmp_path.glob("d_part*")) == [f"d_part000{i}.{s}" for i in range(2)
                                                                 for s in ("bin", "idx")]


def test_compact_builder_writes_what_megatrons_builder_writes(tmp_path):
    """indexed.new_builder only swaps the index lists for typed arrays: same bytes out."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60000, size=rng.integers(1, 50)).astype(np.uint16) for _ in range(100)]
    for name, make in (("plain", lambda p: IndexedDatasetBuilder(p, dtype=np.uint16)),
                       ("compact", lambda p: indexed.new_builder(p, np.uint16))):
        part = make(str(tmp_path / f"{name}_a.bin"))
        for d in docs[:60]:
            part.add_document(d, [len(d)])
        part.finalize(str(tmp_path / f"{name}_a.idx"))
        merged = make(str(tmp_path / f"{name}_m.bin"))
        for d in docs[60:70]:
            merged.add_document(d, [len(d)])
        merged.add_index(str(tmp_path / f"{name}_a"))
        for d in docs[70:]:
            merged.add_document(d, [len(d)])
        merged.finalize(str(tmp_path / f"{name}_m.idx"))
    assert read_files(tmp_path / "plain_a") == read_files(tmp_path / "compact_a")
    assert read_files(tmp_path / "plain_m") == read_files(tmp_path / "compact_m")
    assert read_dataset(tmp_path / "compact_m") == [d.tolist() for d in docs[60:70] + docs[:60] + docs[70:]]
