"""HF model → megatron_gpas checkpoint → HF export → lm-evaluation-harness, offline.

A tiny Llama with a byte-level BPE tokenizer.json (tests/hf_fixtures.py) is imported
(tools/convert_from_hf.py's path), exported again from the checkpoint alone (its tokenizer
copy included), and evaluated with the offline harness on two local tasks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_fixtures import make_tiny_hf_model_dir
from test_lm_eval_offline import data_root, olmo_wheel  # noqa: F401  (fixtures)
from test_parallel import _launch

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path, dict]:
    from megatron_gpas.hf.export import export_checkpoint

    ws = tmp_path_factory.mktemp("e2e")
    source = make_tiny_hf_model_dir(ws / "source")
    _launch(ws, "import", 1, [{"name": "import", "kind": "import_hf", "hf_dir": str(source),
                               "save": str(ws / "checkpoint"), "overrides": []}], timeout=300)
    result = export_checkpoint(str(ws / "checkpoint"), str(ws / "exported"), progress=False)
    return source, ws / "exported", result.tokenizer | {"format": result.format}


def test_import_then_export_reproduces_the_model(exported):
    from transformers import AutoTokenizer, LlamaForCausalLM

    source, out, report = exported
    assert report["format"] == "llama"
    before, after = load_file(str(source / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(before) == sorted(after)
    assert all(torch.equal(before[k], after[k]) for k in before)

    # The tokenizer came from the checkpoint's own copy, and matches training's tokenization:
    # no BOS (the source tokenizer's template prepends <s>; training data never had it).
    assert report["exported"] and report["kind"] == "huggingface" and report["probe_mismatches"] == 0
    tokenizer = AutoTokenizer.from_pretrained(out)
    source_tokenizer = AutoTokenizer.from_pretrained(source)
    text = "What is the best way to cut a leaf?"
    assert source_tokenizer.encode(text)[0] == source_tokenizer.bos_token_id
    assert tokenizer.encode(text) == source_tokenizer.encode(text)[1:]
    assert tokenizer.eos_token_id == json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    model = LlamaForCausalLM.from_pretrained(out)
    assert model.config.eos_token_id == tokenizer.eos_token_id


def test_harness_runs_offline_on_the_export(exported, data_root):  # noqa: F811
    from megatron_gpas.evaluation.harness import run_offline_harness

    _, out, _ = exported
    summary = run_offline_harness(out, tasks="piqa_local,boolq_local", limit=3, data_dir=data_root, batch_size=4)
    for task in ("piqa_local", "boolq_local"):
        result = summary["results"][task]
        assert result["samples"] == 3
        assert 0.0 <= result["acc"] <= 1.0
