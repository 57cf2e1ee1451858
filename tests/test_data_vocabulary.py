"""The data against the run at start-up (``check_before_start``, before any process group):
token ids >= model.vocab_size used to be a bare IndexError at step 1, and data tokenized with
another tokenizer trained silently. Datasets are made by the real preprocessing and merge code,
with the ``null`` tokenizer (text = whitespace-separated ids, EOD = vocabulary - 1).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import megatron_gpas.distributed as distributed
from megatron_gpas.config import ConfigError, load_config
from megatron_gpas.data import datasets
from megatron_gpas.data.datasets import DataCorruptError
from megatron_gpas.data.merge import merge_datasets
from megatron_gpas.data.preprocess import build_indexed_dataset
from megatron_gpas.tokenizer import NullTokenizer
from megatron_gpas.training import check_before_start
from synthetic import write_synthetic_dataset

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

DOCS = 30  # enough documents for every split of '80,20,0'


def tokenize(tmp_path: Path, name: str, vocab: int, largest: int) -> str:
    """A dataset of DOCS documents tokenized by null:<vocab>, whose largest id is ``largest``
    (the end-of-document id vocab-1 is not appended)."""
    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": f"{i % 7} {i % 5 + 1} {largest if i == 3 else 2}"}) + "\n"
                           for i in range(DOCS)))
    build_indexed_dataset([src], tmp_path / name, NullTokenizer(vocab), append_eod=False, progress_interval_s=None)
    return str(tmp_path / name)


def run_config(prefix: str, vocab: int, model_vocab: int | None = None):
    return load_config(None, ["model.preset=tiny", f"model.vocab_size={model_vocab or vocab}", "train.seq_length=8",
                              f"data.paths=['{prefix}']", "data.tokenizer.kind='null'",
                              f"data.tokenizer.vocab_size={vocab}", "data.split='80,20,0'"])


def test_preprocessing_records_the_largest_token_id(tmp_path):
    prefix = tokenize(tmp_path, "data", vocab=300, largest=250)
    report = json.loads(Path(prefix + ".report.json").read_text())
    assert report["max_token_id"] == 250
    assert build_indexed_dataset([tmp_path / "data.jsonl"], tmp_path / "eod", NullTokenizer(300),
                                 progress_interval_s=None)["max_token_id"] == 299  # the appended EOD


def test_data_of_the_runs_tokenizer_passes(tmp_path, capsys):
    prefix = tokenize(tmp_path, "data", vocab=300, largest=299)
    tokenizer = check_before_start(run_config(prefix, vocab=300), world_size=1)
    assert tokenizer.vocab_size == 300
    assert "warning" not in capsys.readouterr().out


def test_data_of_another_tokenizer_is_refused_naming_both(tmp_path):
    prefix = tokenize(tmp_path, "data", vocab=300, largest=250)
    with pytest.raises(ConfigError) as info:
        check_before_start(run_config(prefix, vocab=512), world_size=1)
    msg = str(info.value)
    assert f"data.paths entry '{prefix}' was tokenized with null:300, vocabulary 300" in msg
    assert "but data.tokenizer is null:512, vocabulary 512" in msg


def test_ids_beyond_the_vocabulary_in_unreported_data_are_found_by_a_scan(tmp_path, capsys):
    """No report (data written by other tools): the .bin is scanned; the first bad id is named."""
    prefix = write_synthetic_dataset(str(tmp_path / "synthetic"), vocab_size=512, num_docs=DOCS, doc_len=40)
    with pytest.raises(DataCorruptError, match=rf"'{prefix}' holds token id \d{{3}} .* but model\.vocab_size has 256"):
        check_before_start(run_config(prefix, vocab=256), world_size=1)
    check_before_start(run_config(prefix, vocab=512), world_size=1)  # the right vocabulary passes
    assert f"[data] warning: {prefix}: no tokenizer recorded" in capsys.readouterr().out


def test_the_trainer_refuses_such_data_before_any_process_group(tmp_path, monkeypatch):
    from megatron_gpas.training import Trainer

    def forbidden(*args, **kwargs):
        raise AssertionError("a process group was started")

    monkeypatch.setattr(distributed, "init_distributed", forbidden)
    prefix = write_synthetic_dataset(str(tmp_path / "synthetic"), vocab_size=512, num_docs=DOCS, doc_len=40)
    with pytest.raises(DataCorruptError, match="but model.vocab_size has 256 ids"):
        Trainer(run_config(prefix, vocab=256))


def test_unreported_data_too_large_to_scan_gets_a_warning(tmp_path, monkeypatch, capsys):
    prefix = write_synthetic_dataset(str(tmp_path / "synthetic"), vocab_size=512, num_docs=DOCS, doc_len=40)
    monkeypatch.setattr(datasets, "SCAN_LIMIT_BYTES", 0)
    check_before_start(run_config(prefix, vocab=256), world_size=1)  # not scanned: it cannot be refused
    assert f"too large to scan at start-up; check it with tools/inspect_data.py {prefix} --check-ids " \
           "--vocab-size 256" in capsys.readouterr().out


def test_the_token_type_bounds_the_ids_without_a_scan(tmp_path, monkeypatch, capsys):
    """uint16 data (vocabularies below 65500) cannot hold an id >= a model vocabulary of 65536+."""
    prefix = write_synthetic_dataset(str(tmp_path / "synthetic"), vocab_size=512, num_docs=DOCS, doc_len=40)
    monkeypatch.setattr(datasets, "SCAN_LIMIT_BYTES", 0)
    check_before_start(run_config(prefix, vocab=512, model_vocab=65536), world_size=1)
    assert "too large to scan" not in capsys.readouterr().out


def test_an_older_report_without_the_largest_id_trusts_the_matching_tokenizer(tmp_path, monkeypatch, capsys):
    prefix = tokenize(tmp_path, "data", vocab=300, largest=250)
    report = json.loads(Path(prefix + ".report.json").read_text())
    del report["max_token_id"]
    Path(prefix + ".report.json").write_text(json.dumps(report))
    monkeypatch.setattr(datasets, "SCAN_LIMIT_BYTES", 0)
    check_before_start(run_config(prefix, vocab=300), world_size=1)  # its ids are below 300 <= model.vocab_size
    assert "warning" not in capsys.readouterr().out


def test_a_report_with_ids_beyond_the_model_is_refused(tmp_path):
    """A report that records the largest id but no tokenizer (e.g. written by another tool)."""
    prefix = tokenize(tmp_path, "data", vocab=300, largest=250)
    report = json.loads(Path(prefix + ".report.json").read_text())
    del report["tokenizer"]
    report["max_token_id"] = 260
    Path(prefix + ".report.json").write_text(json.dumps(report))
    with pytest.raises(ConfigError, match=rf"'{prefix}' holds token ids up to 260 .* but model.vocab_size is 256"):
        check_before_start(run_config(prefix, vocab=256), world_size=1)


def test_merged_data_carries_the_tokenizer_and_the_largest_id(tmp_path):
    a = tokenize(tmp_path, "a", vocab=300, largest=120)
    b = tokenize(tmp_path, "b", vocab=300, largest=280)
    report = merge_datasets([a, b], tmp_path / "merged", progress=False)
    assert report["max_token_id"] == 280
    assert report["tokenizer"]["name"] == "null:300"
    check_before_start(run_config(str(tmp_path / "merged"), vocab=300), world_size=1)
    with pytest.raises(ConfigError, match="was tokenized with null:300"):
        check_before_start(run_config(str(tmp_path / "merged"), vocab=280), world_size=1)

    other = tokenize(tmp_path, "other", vocab=400, largest=10)  # uint16 too: only the reports tell them apart
    with pytest.raises(ValueError, match=r"different tokenizers: .*a \(null:300.*other \(null:400"):
        merge_datasets([a, other], tmp_path / "mixed", progress=False)
