"""Tokenizers and the text -> Megatron indexed dataset preprocessing (CPU, offline).

Test tokenizers are built inside the tests: a tiny SentencePiece model trained on a
generated corpus, and a tiny byte-level BPE tokenizer.json with a ``</s>`` token.
"""

import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_gpas.data.preprocess import SKIP_REASONS, build_indexed_dataset
from megatron_gpas.tokenizer import (
    HFTokenizer,
    NullTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    tokenizer_from_config,
)

REPO_ROOT = Path(__file__).resolve().parent.parent

# Importing megatron.core on CPU warns about missing fused kernels and ranks; not our concern here.
pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:megatron.*"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:megatron.*"),
]

WORDS = (
    "the king queen lord lady night day love death sword crown heaven earth fair foul "
    "speak hear tell come go stay sweet gentle noble brave father mother son daughter "
    "thou thee thy art hath doth shall will what why where when how good ill"
).split()


def generated_sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    sentences = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
        sentences.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ","]))
    return sentences


def write_jsonl(path: Path, texts: list[str]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    return path


def read_dataset(prefix) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))]


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory) -> SentencePieceTokenizer:
    import sentencepiece

    out = tmp_path_factory.mktemp("sp")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(generated_sentences(2000, seed=1)),
        model_prefix=str(out / "tiny"),
        vocab_size=200,
        model_type="bpe",
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return SentencePieceTokenizer(out / "tiny.model")


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory) -> HFTokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(generated_sentences(2000, seed=2), trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return HFTokenizer(path)


# ----------------------------------------------------------------------------- tokenizers


def test_tokenizer_basics(sp_tokenizer, hf_tokenizer, tmp_path):
    assert sp_tokenizer.eod_id == 2 and sp_tokenizer.vocab_size <= 200  # SentencePiece's default </s>
    assert hf_tokenizer.eod_id == 0 and hf_tokenizer.vocab_size <= 400  # </s> is the first special token
    for tok in (sp_tokenizer, hf_tokenizer):
        ids = tok.encode("Good night, sweet lady.")
        assert ids and tok.eod_id not in ids  # no BOS/EOS added by encode
        assert all(0 <= i < tok.vocab_size for i in ids)
        # Pickles by path, so it can be shipped to worker processes.
        assert pickle.loads(pickle.dumps(tok)).encode("Good night, sweet lady.") == ids

    # "auto" picks by suffix; the config helper goes through the same path.
    assert isinstance(load_tokenizer("auto", sp_tokenizer.path), SentencePieceTokenizer)
    assert isinstance(load_tokenizer("auto", hf_tokenizer.path), HFTokenizer)
    assert isinstance(tokenizer_from_config({"kind": "sentencepiece", "path": sp_tokenizer.path}),
                      SentencePieceTokenizer)
    null = tokenizer_from_config({"kind": "null", "vocab_size": 50})
    assert null.encode("3 4 5") == [3, 4, 5] and null.decode([3, 4]) == "3 4" and null.eod_id == 49

    with pytest.raises(FileNotFoundError, match="nope.model"):
        load_tokenizer("sentencepiece", tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_tokenizer("auto", tmp_path / "missing.json")
    with pytest.raises(ValueError, match="sentencepiece, huggingface, null, auto"):
        load_tokenizer("tiktoken", sp_tokenizer.path)
    with pytest.raises(ValueError, match="unknown keys"):
        tokenizer_from_config({"kind": "auto", "path": sp_tokenizer.path, "vocab": 3})


def test_hf_tokenizer_without_eos_needs_eod_token(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2, "[SEP]": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))

    with pytest.raises(ValueError, match="eod_token"):
        HFTokenizer(path)
    assert HFTokenizer(path, eod_token="[SEP]").eod_id == 3
    assert tokenizer_from_config({"kind": "huggingface", "path": str(path), "eod_token": "[SEP]"}).eod_id == 3


# ----------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("tokenizer_fixture", ["sp_tokenizer", "hf_tokenizer"])
def test_round_trip(tokenizer_fixture, request, tmp_path):
    tok = request.getfixturevalue(tokenizer_fixture)
    texts = generated_sentences(40, seed=3) + ["Two lines,\nand   extra  spaces — plus café."]
    prefix = tmp_path / "out" / "docs"
    report = build_indexed_dataset([write_jsonl(tmp_path / "docs.jsonl", texts)], prefix, tok,
                                   progress_interval_s=None)

    docs = read_dataset(prefix)
    assert len(docs) == len(texts)
    for text, ids in zip(texts, docs):
        assert ids == tok.encode(text) + [tok.eod_id]
        assert tok.decode(ids[:-1]) == tok.decode(tok.encode(text))

    assert report["documents"] == {"read": len(texts), "written": len(texts), "skipped": 0}
    assert report["tokens_written"] == sum(map(len, docs))
    assert report["dtype"] == "uint16"
    assert report["tokenizer"] == {"name": tok.name, "vocab_size": tok.vocab_size, "eod_id": tok.eod_id}
    assert json.loads((tmp_path / "out" / "docs.report.json").read_text()) == report


def test_no_append_eod(sp_tokenizer, tmp_path):
    texts = generated_sentences(5, seed=4)
    build_indexed_dataset([write_jsonl(tmp_path / "d.jsonl", texts)], tmp_path / "d", sp_tokenizer,
                          append_eod=False, progress_interval_s=None)
    assert read_dataset(tmp_path / "d") == [sp_tokenizer.encode(t) for t in texts]


def test_multi_worker_output_is_byte_identical(sp_tokenizer, tmp_path):
    inputs = [write_jsonl(tmp_path / "a.jsonl", generated_sentences(150, seed=5)),
              write_jsonl(tmp_path / "b.jsonl", generated_sentences(150, seed=6))]
    build_indexed_dataset(inputs, tmp_path / "one", sp_tokenizer, workers=1, progress_interval_s=None)
    build_indexed_dataset(inputs, tmp_path / "three", sp_tokenizer, workers=3, chunksize=7,
                          progress_interval_s=None)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"one{suffix}").read_bytes() == (tmp_path / f"three{suffix}").read_bytes()
    assert len(read_dataset(tmp_path / "three")) == 300


def test_txt_modes(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("1 2\n3\n\n4 5\n\n\n6\n")
    tok = NullTokenizer(100)
    expected = {
        "file": [[1, 2, 3, 4, 5, 6, 99]],
        "line": [[1, 2, 99], [3, 99], [4, 5, 99], [6, 99]],
        "paragraph": [[1, 2, 3, 99], [4, 5, 99], [6, 99]],
    }
    for mode, docs in expected.items():
        build_indexed_dataset([path], tmp_path / mode, tok, txt_mode=mode, progress_interval_s=None)
        assert read_dataset(tmp_path / mode) == docs, mode


def test_bad_records_are_counted_with_locations(tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = [
        b'{"text": "1 2"}',          # 1 ok
        b"{not json",                # 2 invalid_json
        b"[1, 2]",                   # 3 invalid_json (not an object)
        b'{"body": "3"}',            # 4 missing_key
        b'{"text": 42}',             # 5 non_string_text
        b'{"text": "   "}',          # 6 empty_text
        b"",                         # 7 blank line: not a record
        b'{"text": "4 \xff"}',       # 8 invalid_utf8
        b'{"text": "5 6"}',          # 9 ok
    ] + [b'{"other": 1}'] * 7        # 10-16 missing_key: only the first 5 locations are kept
    bad.write_bytes(b"\n".join(lines) + b"\n")
    para = tmp_path / "para.txt"
    para.write_bytes(b"1 2\n\n3\n4 \xfe\n5\n\n6\n")  # paragraph starting at line 3, bad byte on line 4
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")

    def run(inputs, mode, **kw):
        return build_indexed_dataset(inputs, tmp_path / "out", NullTokenizer(10), txt_mode=mode,
                                     progress_interval_s=None, **kw)

    report = run([bad], "file")
    skipped = report["skipped"]
    assert set(skipped) == set(SKIP_REASONS)
    assert skipped["invalid_json"] == {"count": 2, "first_locations": [f"{bad}:2", f"{bad}:3"]}
    assert skipped["missing_key"] == {"count": 8, "first_locations": [f"{bad}:{n}" for n in (4, 10, 11, 12, 13)]}
    assert skipped["non_string_text"] == {"count": 1, "first_locations": [f"{bad}:5"]}
    assert skipped["empty_text"] == {"count": 1, "first_locations": [f"{bad}:6"]}
    assert skipped["invalid_utf8"] == {"count": 1, "first_locations": [f"{bad}:8"]}
    assert report["documents"] == {"read": 15, "written": 2, "skipped": 13}
    assert read_dataset(tmp_path / "out") == [[1, 2, 9], [5, 6, 9]]

    report = run([para, empty], "paragraph")
    assert report["skipped"]["invalid_utf8"]["first_locations"] == [f"{para}:4"]
    assert report["documents"] == {"read": 3, "written": 2, "skipped": 1}  # empty.txt has no paragraphs
    report = run([empty], "file")
    assert report["skipped"]["empty_text"]["first_locations"] == [f"{empty}:1"]

    # strict: fail at the first bad record, naming file and line, and write nothing.
    with pytest.raises(ValueError, match=rf"{bad}:2: invalid_json"):
        build_indexed_dataset([bad], tmp_path / "strict", NullTokenizer(10), strict=True,
                              progress_interval_s=None)
    assert not list(tmp_path.glob("strict*"))


class _FailingTokenizer(NullTokenizer):
    """Raises on the n-th document, to simulate a crash in the middle of a run."""

    def __init__(self, fail_at: int):
        super().__init__(10)
        self.calls, self.fail_at = 0, fail_at

    def encode(self, text):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("injected failure")
        return super().encode(text)


@pytest.mark.parametrize("where", ["mid_stream", "finalize"])
def test_failure_leaves_no_dataset_behind(where, tmp_path, monkeypatch):
    from megatron.core.datasets import indexed_dataset

    src = write_jsonl(tmp_path / "d.jsonl", ["1 2", "3 4", "5 6", "7 8"])
    if where == "finalize":
        def failing_finalize(self, idx_path):
            raise RuntimeError("injected failure")

        monkeypatch.setattr(indexed_dataset.IndexedDatasetBuilder, "finalize", failing_finalize)
        tok = NullTokenizer(10)
    else:
        tok = _FailingTokenizer(fail_at=3)

    with pytest.raises(RuntimeError, match="injected failure"):
        build_indexed_dataset([src], tmp_path / "out" / "d", tok, progress_interval_s=None)
    assert os.listdir(tmp_path / "out") == []  # no .bin, .idx, temporaries or report


def test_failed_rerun_keeps_previous_outputs(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", ["1 2", "3 4", "5 6"])
    build_indexed_dataset([src], tmp_path / "d", NullTokenizer(10), progress_interval_s=None)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("d.*")}
    with pytest.raises(RuntimeError):
        build_indexed_dataset([src], tmp_path / "d", _FailingTokenizer(fail_at=2), progress_interval_s=None)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("d.*")} == before


def test_cli(tmp_path):
    data = tmp_path / "inputs"
    data.mkdir()
    write_jsonl(data / "a.jsonl", ["1 2 3", "4 5"])
    (data / "b.txt").write_text("6 7\n")
    (data / "notes.md").write_text("ignored: not .jsonl/.txt")
    with open(data / "a.jsonl", "a") as f:
        f.write("{broken\n")

    cli = [sys.executable, str(REPO_ROOT / "tools" / "preprocess_data.py")]
    prefix = tmp_path / "out" / "tiny"
    proc = subprocess.run(
        cli + ["--input", str(data), "--output-prefix", str(prefix),
               "--tokenizer-kind", "null", "--vocab-size", "16", "--workers", "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "4 read, 3 written, 1 skipped" in proc.stdout
    assert f"invalid_json: 1 (first at {data / 'a.jsonl'}:3)" in proc.stdout
    assert read_dataset(prefix) == [[1, 2, 3, 15], [4, 5, 15], [6, 7, 15]]
    assert json.loads(prefix.with_suffix(".report.json").read_text())["tokens_written"] == 10

    # Errors are reported as one line and exit code 1 (this one fails before importing megatron).
    proc = subprocess.run(cli + ["--input", str(tmp_path / "missing.jsonl"), "--output-prefix", str(prefix),
                                 "--tokenizer-kind", "null", "--vocab-size", "16"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "error: input not found" in proc.stderr
