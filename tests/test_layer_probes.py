"""tools/layer_importance.py and tools/activation_profile.py (megatron_gpas/analysis/layer_probes.py).

Layer importance on a tiny random LlamaForCausalLM: every layer's "loss without it" equals the loss of
the same model rebuilt here without that layer (the layer deleted from the stack, an independent
construction), and a layer whose weights are all zero has importance exactly 0 — also for a Megatron
Pre-LN + GPAS checkpoint (gate α = 0) read through its export. The activation profile against float64
statistics computed here from ``output_hidden_states`` (layer inputs) and a hook (the last layer's
output). The CLI's errors come before any weights are read (test_kurtosis' guard).
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from test_kurtosis import (VOCAB, _documents, no_model_loading, reference_kurtosis,  # noqa: F401
                           save_random_checkpoint, write_dataset)

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLES, SEQ, LAYERS, ZEROED = 3, 24, 3, 1  # the second layer (0-based 1) is zeroed


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_tool", REPO_ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict:
    """A tiny random LlamaForCausalLM, a copy with one layer's weights zeroed, and a dataset."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("layer_probes")
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.1, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(root / "llama")
    with torch.no_grad():
        for param in model.model.layers[ZEROED].parameters():
            param.zero_()
    model.save_pretrained(root / "zeroed")
    prefix = write_dataset(str(root / "docs"), _documents())
    tokens = torch.from_numpy(__import__("numpy").concatenate(_documents())[:SAMPLES * SEQ].astype("int64"))
    return {"root": root, "data": prefix, "tokens": tokens.reshape(SAMPLES, SEQ)}


def run(ws: dict, tool: str, model, name: str) -> dict:
    out = ws["root"] / f"{name}.json"
    plot = ws["root"] / f"{name}.png"
    code = _tool(tool).main([str(model), "--data", ws["data"], "--samples", str(SAMPLES), "--seq-len", str(SEQ),
                             "--output", str(out), "--plot", str(plot), "--progress-interval", "0"])
    assert code == 0 and plot.stat().st_size > 0
    return json.loads(out.read_text())


def _loss(model, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(tokens, use_cache=False).logits[:, :-1].double()
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)))


def test_importance_equals_the_model_rebuilt_without_the_layer(ws):
    from transformers import LlamaForCausalLM

    report = run(ws, "layer_importance", ws["root"] / "llama", "importance")
    model = LlamaForCausalLM.from_pretrained(ws["root"] / "llama", dtype=torch.float32).eval()
    assert report["loss"] == pytest.approx(_loss(model, ws["tokens"]), rel=1e-5)
    assert [r["layer"] for r in report["per_layer"]] == list(range(1, LAYERS + 1))
    for r in report["per_layer"]:
        smaller = copy.deepcopy(model)
        del smaller.model.layers[r["layer"] - 1]
        smaller.config.num_hidden_layers = LAYERS - 1
        expected = _loss(smaller, ws["tokens"])
        assert r["loss_without"] == pytest.approx(expected, rel=1e-5)
        assert r["importance"] == pytest.approx(expected - report["loss"], abs=1e-5)
        assert abs(r["importance"]) > 1e-3  # every random layer matters


def test_a_zeroed_layer_has_importance_zero(ws):
    report = run(ws, "layer_importance", ws["root"] / "zeroed", "zeroed")
    importance = [r["importance"] for r in report["per_layer"]]
    assert importance[ZEROED] == 0.0
    assert all(abs(v) > 1e-3 for i, v in enumerate(importance) if i != ZEROED)


@pytest.fixture(scope="module")
def megatron_zeroed(ws) -> Path:
    """A Pre-LN + GPAS Megatron checkpoint, random weights, one layer's weights (and gate) zero."""
    def zero_layer(model):
        for param in model.decoder.layers[ZEROED].parameters():
            param.zero_()

    return save_random_checkpoint(ws["root"] / "megatron", ws["data"], [f"model.num_layers={LAYERS}", "gpas.enabled=true"],
                                  [(0.4,), (-0.3,), (0.2,)], zero_layer)


def test_a_zeroed_megatron_layer_has_importance_zero(ws, megatron_zeroed):
    report = run(ws, "layer_importance", megatron_zeroed, "megatron_zeroed")
    assert report["export"]["format"] == "custom" and report["model"]["class"] == "MegatronGPASForCausalLM"
    importance = [r["importance"] for r in report["per_layer"]]
    assert importance[ZEROED] == 0.0
    assert all(abs(v) > 1e-4 for i, v in enumerate(importance) if i != ZEROED), importance


def test_activation_profile_equals_statistics_computed_here(ws):
    from transformers import LlamaForCausalLM

    report = run(ws, "activation_profile", ws["root"] / "llama", "profile")
    model = LlamaForCausalLM.from_pretrained(ws["root"] / "llama", dtype=torch.float32).eval()
    outputs = []
    model.model.layers[-1].register_forward_hook(lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
    states = [[] for _ in range(LAYERS + 1)]
    with torch.no_grad():
        for row in ws["tokens"]:
            hidden = model(row.unsqueeze(0), output_hidden_states=True).hidden_states
            for l in range(LAYERS):  # hidden_states[l]: the input of layer l + 1 (the last one is after the final norm)
                states[l].append(hidden[l].double())
            states[LAYERS].append(outputs[-1].double())
    names = [f"layer_{l}_input" for l in range(1, LAYERS + 1)] + [f"layer_{LAYERS}_output"]
    assert [r["name"] for r in report["per_state"]] == names
    for r, parts in zip(report["per_state"], states):
        x = torch.cat(parts, dim=1)[0]  # [tokens, d]
        n = x.numel()
        mean = x.sum() / n
        assert r["variance"] == pytest.approx(float((x - mean).square().sum() / n), rel=1e-5)
        assert r["rms"] == pytest.approx(float((x.square().sum() / n).sqrt()), rel=1e-5)
        assert r["max_abs"] == pytest.approx(float(x.abs().max()), rel=1e-6)
        token_mean = x.mean(-1, keepdim=True)
        token_std = ((x - token_mean).square().sum(-1, keepdim=True) / (x.shape[-1] - 1)).sqrt()
        assert r["outlier_fraction"] == pytest.approx(float(((x - token_mean).abs() > 6 * token_std).double().mean()),
                                                      abs=1e-12)
        assert r["kurtosis"] == pytest.approx(float(reference_kurtosis(x).mean()), rel=1e-4)
        channel = x.abs().mean(0)
        assert r["top_channel_ratio"] == pytest.approx(float(channel.max() / channel.median()), rel=1e-5)


@pytest.mark.parametrize("tool", ["layer_importance", "activation_profile"])
def test_cli_errors_come_before_the_model_is_read(ws, tool, capsys, no_model_loading, tmp_path):  # noqa: F811
    main = _tool(tool).main
    cases = [
        ([str(tmp_path / "missing"), "--data", ws["data"]], "does not exist"),
        ([str(ws["root"] / "llama"), "--data", ws["data"], "--samples", "100", "--seq-len", str(SEQ)], "need"),
        ([str(ws["root"] / "llama"), "--data", ws["data"], "--output", str(tmp_path / "no" / "x.json")],
         "does not exist"),
        ([str(ws["root"] / "llama"), "--data", ws["data"], "--samples", "1", "--batch-size", "0"], "batch-size"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        assert message in capsys.readouterr().err
