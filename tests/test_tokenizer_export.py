"""Every tokenizer kind travels with a checkpoint and exports to an equivalent HF tokenizer.

The checkpoint's copy (``iter_N/tokenizer/``) must hold every file the tokenizer reads (a
GPT-2 vocabulary given alone brings its merges file), and the exported Hugging Face
tokenizer must give our ids, our end-of-document id and no BOS/EOS: the data the model was
trained on. The source files are deleted before exporting, so only the copy can serve.
When a checkpoint's recorded tokenizer files are gone, the copy stands in for them (finetune,
evaluate), but only for the tokenizer it is a copy of.
"""

import shutil

import pytest
import yaml

from megatron_gpas.hf.tokenizer_export import (TOKENIZER_DIR, TOKENIZER_SPEC, copy_into_checkpoint, export_tokenizer,
                                               recorded_or_copy)
from megatron_gpas.tokenizer import tokenizer_from_config
from test_tokenizer_and_preprocess import (  # noqa: F401  (fixtures)
    AWKWARD_TEXTS,
    generated_sentences,
    gpt2_files,
    hf_tokenizer,
    sp_tokenizer,
    tiktoken_file,
)


def _source_files(kind, sp_tokenizer, hf_tokenizer, gpt2_files, tiktoken_file, dest):
    """Copy the fixture's files to ``dest``; returns the path a config names."""
    dest.mkdir()
    if kind == "gpt2":  # the vocabulary file alone: the merges file must be found and copied too
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(gpt2_files / name, dest)
        return dest / "vocab.json"
    source = {"sentencepiece": sp_tokenizer.path, "huggingface": hf_tokenizer.path, "tiktoken": tiktoken_file}[kind]
    return shutil.copy(source, dest)


@pytest.mark.parametrize("kind", ["sentencepiece", "huggingface", "gpt2", "tiktoken"])
def test_checkpoint_copy_exports_an_equivalent_hf_tokenizer(kind, sp_tokenizer, hf_tokenizer, gpt2_files,
                                                            tiktoken_file, tmp_path):
    from transformers import AutoTokenizer

    path = _source_files(kind, sp_tokenizer, hf_tokenizer, gpt2_files, tiktoken_file, tmp_path / "src")
    cfg = {"kind": "auto", "path": str(path)}
    ours = tokenizer_from_config(cfg)
    checkpoint = tmp_path / "iter_0000010"
    copy_into_checkpoint(cfg, checkpoint)
    shutil.rmtree(tmp_path / "src")

    spec = yaml.safe_load((checkpoint / TOKENIZER_DIR / TOKENIZER_SPEC).read_text())
    assert spec["kind"] == kind  # resolved from "auto"
    if kind == "gpt2":
        assert (spec["path"], spec["merges_path"]) == ("vocab.json", "merges.txt")

    out = tmp_path / "hf"
    out.mkdir()
    report, (bos, eos) = export_tokenizer(str(checkpoint), {"data": {"tokenizer": cfg}}, str(out))
    assert report["exported"], report
    assert report["kind"] == kind, report
    assert report["probe_mismatches"] == 0, report
    assert eos == ours.eod_id

    hf = AutoTokenizer.from_pretrained(out)
    assert hf.eos_token_id == ours.eod_id
    # (the last awkward text holds a literal "<|endoftext|>": ordinary text for us)
    texts = generated_sentences(30, seed=9) + AWKWARD_TEXTS
    for text in texts:
        ids = ours.encode(text)
        assert hf.encode(text) == ids, text  # no BOS, no EOS: as the training data was tokenized
        assert hf.decode(ids) == ours.decode(ids)


def test_null_tokenizer_has_no_hf_form(tmp_path):
    cfg = {"kind": "null", "vocab_size": 300}
    copy_into_checkpoint(cfg, tmp_path / "ckpt")
    report, (bos, eos) = export_tokenizer(str(tmp_path / "ckpt"), {}, str(tmp_path))
    assert report == {"exported": False, "reason": "a null tokenizer has no Hugging Face form", "eos_token_id": 299}
    assert (bos, eos) == (None, 299)


def test_the_copy_stands_in_only_for_the_missing_tokenizer_it_copies(gpt2_files, tmp_path):
    source = tmp_path / "tokenizers" / "gpt2"
    shutil.copytree(gpt2_files, source)
    recorded = {"kind": "gpt2", "path": str(source / "vocab.json"), "eod_token": "<|endoftext|>"}
    checkpoint = tmp_path / "iter_0000010"
    copy_into_checkpoint(recorded, checkpoint)
    copy = {**recorded, "path": str(checkpoint / TOKENIZER_DIR / "vocab.json"),
            "merges_path": str(checkpoint / TOKENIZER_DIR / "merges.txt")}
    assert recorded_or_copy(recorded, str(checkpoint)) == (recorded, None)  # its files are there: itself
    shutil.rmtree(source)
    spec, note = recorded_or_copy(recorded, str(checkpoint))
    assert spec == copy
    assert note == f"tokenizer {source / 'vocab.json'} not found; using the checkpoint's copy {copy['path']}"
    assert tokenizer_from_config(spec).encode("a b") == tokenizer_from_config({"kind": "gpt2", "path": str(
        gpt2_files / "vocab.json")}).encode("a b")
    assert recorded_or_copy({**recorded, "path": str(source)}, str(checkpoint))[0] == copy  # a gpt2 directory
    for other in ({**recorded, "kind": "huggingface"}, {**recorded, "eod_token": "<|other|>"},
                  {**recorded, "merges_path": str(source / "other_merges.txt")},
                  {"kind": "tiktoken", "path": str(source / "vocab.json")}):
        assert recorded_or_copy(other, str(checkpoint)) == (other, None), other
    assert recorded_or_copy(recorded, str(tmp_path / "no_copy")) == (recorded, None)
