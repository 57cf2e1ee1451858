"""What happens to preprocessed datasets afterwards: merging (library, CLI, the SLURM script
run locally), inspection and integrity checks, and training start-up (blends, corrupt data,
a tokenizer larger than the embedding)."""

import gzip
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_gpas.data.datasets import DataCorruptError, check_indexed_dataset
from megatron_gpas.data.inspection import inspect_dataset
from megatron_gpas.data.merge import merge_datasets
from megatron_gpas.data.preprocess import build_indexed_dataset, preprocess
from megatron_gpas.tokenizer import NullTokenizer
from test_tokenizer_and_preprocess import REPO_ROOT, generated_sentences, read_dataset, read_files, write_jsonl
from test_tokenizer_and_preprocess import sp_tokenizer  # noqa: F401  (a fixture)


def _inputs(tmp_path: Path) -> list[Path]:
    """Three inputs in three formats; the second has a bad record."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    a = write_jsonl(tmp_path / "a.jsonl", generated_sentences(40, seed=21))
    b = tmp_path / "b.jsonl.gz"
    lines = [json.dumps({"text": s}) for s in generated_sentences(30, seed=22)]
    lines.insert(5, '{"title": "no text here"}')
    b.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    c = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": generated_sentences(25, seed=23)}), c)
    return [a, b, c]


# ----------------------------------------------------------------------------- merge


def test_merge_equals_a_single_run_over_the_concatenated_input(sp_tokenizer, tmp_path):
    inputs = _inputs(tmp_path)
    single = build_indexed_dataset(inputs, tmp_path / "single", sp_tokenizer, progress_interval_s=None)
    shards = preprocess(inputs, tmp_path / "shards" / "s", sp_tokenizer, shard_by_file=True, progress_interval_s=None)
    report = merge_datasets([tmp_path / "shards" / "s_*"], tmp_path / "merged", progress=False)
    assert read_files(tmp_path / "merged") == read_files(tmp_path / "single")
    assert [i["prefix"] for i in report["inputs"]] == [r["output_prefix"] for r in shards]
    assert report["index"] == {"sequences": 95, "documents": 95, "tokens": single["tokens_written"]}
    pre = report["preprocessing"]
    assert pre["documents"] == single["documents"] == {"read": 96, "written": 95, "skipped": 1}
    assert pre["skipped"]["missing_key"]["count"] == 1 and pre["inputs_without_report"] == []

    # Size parts merge back into the unsharded output too.
    (parts,) = preprocess(inputs, tmp_path / "parts", sp_tokenizer, shard_size=500, progress_interval_s=None)
    assert len(parts["parts"]) > 3
    merge_datasets([p["prefix"] for p in parts["parts"]], tmp_path / "merged_parts", progress=False)
    assert read_files(tmp_path / "merged_parts") == read_files(tmp_path / "single")


def test_merge_refuses_bad_inputs_before_writing(tmp_path):
    write = lambda name, vocab, texts: build_indexed_dataset(  # noqa: E731
        [write_jsonl(tmp_path / f"{name}.jsonl", texts)], tmp_path / name, NullTokenizer(vocab),
        progress_interval_s=None)
    write("small", 100, ["1 2", "3"])
    write("large", 70000, ["1 2"])
    write("other", 100, ["4 5 6"])
    write("empty", 100, ["", " "])  # all skipped: an empty (but valid) dataset
    out = tmp_path / "out" / "m"

    with pytest.raises(ValueError, match=r"different token dtypes .*small \(uint16\), .*large \(int32\)"):
        merge_datasets([tmp_path / "small", tmp_path / "large"], out, progress=False)
    with open(tmp_path / "other.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(DataCorruptError, match=r"other' is corrupt: the index describes 8 bytes .* has 10 bytes"):
        merge_datasets([tmp_path / "small", tmp_path / "other"], out, progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="also an input"):
        merge_datasets([tmp_path / "small"], tmp_path / "small", progress=False)
    with pytest.raises(FileNotFoundError, match="no .*nothing.idx"):
        merge_datasets([tmp_path / "nothing"], out, progress=False)

    with pytest.raises(ValueError, match="more than once"):
        merge_datasets([tmp_path / "small", tmp_path / "small.idx"], out, progress=False)
    report = merge_datasets([tmp_path / "empty", tmp_path / "small"], out, progress=False)
    assert read_dataset(out) == [[1, 2, 99], [3, 99]] and report["preprocessing"]["documents"]["skipped"] == 2


@pytest.mark.parametrize("mode", ["local", "submit"])
def test_slurm_script_matches_a_single_run(mode, sp_tokenizer, tmp_path):
    """slurm/preprocess.sbatch, 2 array tasks over 3 files, then the merge: run locally, and
    submitted to tests/slurm_emulator/sbatch (SLURM's job semantics, run synchronously here)."""
    (tmp_path / "raw").mkdir()
    inputs = _inputs(tmp_path / "raw")
    env = dict(os.environ, INPUTS=f"{tmp_path / 'raw'}/*", OUT=str(tmp_path / "out"), NAME="corpus",
               TOKENIZER=sp_tokenizer.path, TASKS="2", WORKERS="1", PYTHON=sys.executable)
    sbatch_log = tmp_path / "sbatch.jsonl"
    if mode == "submit":
        env.update(PATH=f"{REPO_ROOT / 'tests' / 'slurm_emulator'}{os.pathsep}{env['PATH']}",
                   SBATCH_LOG=str(sbatch_log))
    stage = ["submit"] if mode == "submit" else []
    # (in tmp_path: the emulator writes each job's log where SLURM would, in the submit directory)
    proc = subprocess.run(["bash", str(REPO_ROOT / "slurm" / "preprocess.sbatch"), *stage],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if mode == "local":
        assert "running 2 tasks over 3 files" in proc.stdout
    else:
        assert proc.stdout.strip() == "submitted: 3 files in 2 array tasks (job 1000), merge job 1001"
        array, merge = [json.loads(line) for line in sbatch_log.read_text().splitlines()]
        assert (array["array"], array["returncodes"]) == ([0, 1], [0, 0])
        assert (merge["opts"]["dependency"], merge["returncodes"]) == ("afterok:1000", [0])
        # each array task's log as #SBATCH --output=%x-%A_%a.out names it
        assert sorted(p.name for p in tmp_path.glob("preprocess*.out")) == [
            "preprocess-1000_0.out", "preprocess-1000_1.out", "preprocess-merge-1001_4294967294.out"]
    shards = sorted(p.name for p in (tmp_path / "out" / "shards").glob("*.idx"))
    assert shards == ["corpus_00000.idx", "corpus_00001.idx", "corpus_00002.idx"]

    build_indexed_dataset(inputs, tmp_path / "single", sp_tokenizer, progress_interval_s=None)
    assert read_files(tmp_path / "out" / "corpus") == read_files(tmp_path / "single")
    merged = json.loads((tmp_path / "out" / "corpus.report.json").read_text())
    assert merged["preprocessing"]["documents"] == {"read": 96, "written": 95, "skipped": 1}


# ----------------------------------------------------------------------------- inspection


def _corrupt(prefix: Path, how: str) -> None:
    idx = Path(f"{prefix}.idx")
    data = bytearray(idx.read_bytes())
    n = struct.unpack("<Q", data[18:26])[0]
    if how == "idx_truncated":
        data = data[:-8]
    elif how == "idx_header":
        data[:9] = b"NOTANIDX!"
    elif how == "pointer":  # sequence 1 claims to start elsewhere
        data[34 + 4 * n + 8:34 + 4 * n + 16] = struct.pack("<q", 2)
    elif how == "length":  # sequence 0 claims 1 more token: pointers and .bin size disagree
        data[34:38] = struct.pack("<i", struct.unpack("<i", data[34:38])[0] + 1)
    elif how == "bin_truncated":
        Path(f"{prefix}.bin").write_bytes(Path(f"{prefix}.bin").read_bytes()[:-2])
    idx.write_bytes(bytes(data))


CORRUPTIONS = {
    "idx_truncated": r"header announces 4 sequences and 4 documents \(122 bytes\) but .*\.idx has 114 bytes",
    "idx_header": r"is not a Megatron index file",
    "pointer": r"sequence 1 starts at byte 2, but sequence 0 starts at 0 with 3 tokens of 2 bytes",
    "length": r"sequence 1 starts at byte \d+, but sequence 0 starts at 0 with \d+ tokens",
    "bin_truncated": r"the index describes \d+ bytes of tokens but .*\.bin has \d+ bytes",
}


def test_inspect_dataset_reports_what_is_in_the_files(sp_tokenizer, tmp_path):
    texts = generated_sentences(4, seed=31)
    build_indexed_dataset([write_jsonl(tmp_path / "d.jsonl", texts)], tmp_path / "d", sp_tokenizer,
                          progress_interval_s=None)
    # Independent reading of the files: the .bin is the documents' ids back to back.
    tokens = np.fromfile(tmp_path / "d.bin", dtype=np.uint16)
    expected = [sp_tokenizer.encode(t) + [sp_tokenizer.eod_id] for t in texts]
    assert tokens.tolist() == sum(expected, [])

    info = inspect_dataset(str(tmp_path / "d"), samples=2, sample_tokens=5, check_ids=True)
    assert (info["sequences"], info["documents"], info["tokens"], info["dtype"]) == (4, 4, len(tokens), "uint16")
    assert info["tokens_per_sequence"]["max"] == max(map(len, expected))
    assert info["tokenizer"] == sp_tokenizer.name  # found through the report
    assert info["token_ids"] == {"checked_tokens": len(tokens), "max_id": int(tokens.max()),
                                 "vocab_size": sp_tokenizer.vocab_size}
    assert [s["ids"] for s in info["samples"]] == [e[:5] for e in expected[:2]]
    assert info["samples"][0]["text"] == sp_tokenizer.decode(expected[0][:5])
    assert info["samples"][0]["ends_with_eod"] is True
    assert info["report"]["documents"]["written"] == 4

    # Ids beyond the vocabulary (the data came from another tokenizer) are caught by check_ids.
    with pytest.raises(DataCorruptError, match=r"holds token id \d+ .* but the vocabulary has 50 ids"):
        inspect_dataset(str(tmp_path / "d"), samples=0, check_ids=True, vocab_size=50)


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_corruption_is_detected(how, tmp_path):
    build_indexed_dataset([write_jsonl(tmp_path / "d.jsonl", ["1 2", "3 4 5", "6", "7 8"])], tmp_path / "d",
                          NullTokenizer(10), progress_interval_s=None)
    check_indexed_dataset(str(tmp_path / "d"))
    _corrupt(tmp_path / "d", how)
    with pytest.raises(DataCorruptError, match=CORRUPTIONS[how]):
        check_indexed_dataset(str(tmp_path / "d"))


def test_inspect_cli(tmp_path):
    build_indexed_dataset([write_jsonl(tmp_path / "good.jsonl", ["1 2", "3 4 5"])], tmp_path / "good",
                          NullTokenizer(10), progress_interval_s=None)
    shutil.copy(tmp_path / "good.bin", tmp_path / "bad.bin")
    shutil.copy(tmp_path / "good.idx", tmp_path / "bad.idx")
    _corrupt(tmp_path / "bad", "pointer")
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "inspect_data.py"), str(tmp_path / "good"),
                           str(tmp_path / "bad"), "--check-ids"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "2 sequences, 2 documents, 7 tokens" in proc.stdout
    assert "token ids: all 7 below the vocabulary size 10 (max 9)" in proc.stdout
    assert "sample 1 (4 tokens): [3, 4, 5, 9]" in proc.stdout and "text: '3 4 5 9'" in proc.stdout
    assert f"error: indexed dataset '{tmp_path / 'bad'}' is corrupt: sequence 1 starts at byte" in proc.stderr


# ----------------------------------------------------------------------------- training side


def _training_overrides(paths, *extra) -> list[str]:
    return ["model.preset=tiny", "model.vocab_size=256", "train.seq_length=16", "train.steps=4",
            "train.micro_batch_size=2", "train.global_batch_size=2", "train.eval_iters=1",
            f"data.paths={[str(p) for p in paths]}", "data.tokenizer.kind='null'", "data.tokenizer.vocab_size=256",
            *extra]


def test_preprocessed_datasets_blend_for_training(tmp_path):
    """Two preprocessed datasets, blended 1:3 with a train/valid/test split, as training builds them."""
    from megatron_gpas.config import load_config
    from megatron_gpas.data.datasets import build_datasets, describe_blend

    tok = NullTokenizer(256)
    for name, base in (("a", 10), ("b", 100)):  # disjoint id ranges tell the sources apart
        texts = [" ".join(str(base + (i + j) % 50) for j in range(40)) for i in range(60)]
        build_indexed_dataset([write_jsonl(tmp_path / f"{name}.jsonl", texts)], tmp_path / name, tok,
                              progress_interval_s=None)
    cfg = load_config(None, _training_overrides([tmp_path / "a", tmp_path / "b"], "data.weights=[0.25, 0.75]",
                                                "data.split='80,10,10'", "train.steps=200"))
    train, valid, test = build_datasets(cfg, tok.eod_id, tok.vocab_size, str(tmp_path / "cache"))
    assert describe_blend(cfg).splitlines() == [  # what the run log says about the blend
        f"[data] {tmp_path / name}: weight {w}, 60 documents, 2,460 tokens; split 80,10,10 (train/valid/test)"
        for name, w in (("a", "0.250"), ("b", "0.750"))]
    assert len(train) == 400 and valid is not None and test is not None
    shares = np.bincount(train.dataset_index, minlength=2) / len(train)
    assert shares.tolist() == pytest.approx([0.25, 0.75], abs=0.01)
    ids_of = {0: set(range(10, 60)) | {tok.eod_id}, 1: set(range(100, 150)) | {tok.eod_id}}
    for k in range(0, 400, 7):  # every sample holds tokens of the dataset it was drawn from
        sample = train[k]
        assert set(sample["tokens"].tolist()) <= ids_of[int(train.dataset_index[k])]


def test_training_start_up_rejects_corrupt_data_and_a_too_large_vocabulary(tmp_path):
    from megatron_gpas.config import load_config
    from megatron_gpas.training import Trainer

    build_indexed_dataset([write_jsonl(tmp_path / "d.jsonl", ["1 2"] * 20)], tmp_path / "d", NullTokenizer(256),
                          progress_interval_s=None)
    _corrupt(tmp_path / "d", "idx_truncated")
    with pytest.raises(DataCorruptError, match=rf"indexed dataset '{tmp_path / 'd'}' is corrupt: its header"):
        Trainer(load_config(None, _training_overrides([tmp_path / "d"])))
    with pytest.raises(ValueError, match="the tokenizer has 300 tokens but model.vocab_size is 256"):
        Trainer(load_config(None, _training_overrides([tmp_path / "d"], "data.tokenizer.vocab_size=300")))
