"""tools/kurtosis.py: OSP's excess-kurtosis metric (megatron_gpas/analysis/kurtosis.py).

The metric against an independent float64 formula written here (explicit sums, no torch.std)
on crafted vectors whose value is known by hand; the tool on a tiny random LlamaForCausalLM
against a direct computation from ``model(..., output_hidden_states=True)``, contextual and
with OSP's length-one quirk (inputs reshaped to [seq, 1]); a Megatron checkpoint against its
own export (the copy of our modeling code inside the export is never run); the CLI's errors,
all raised before any weights are loaded.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_gpas.analysis import kurtosis as K

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

REPO_ROOT = Path(__file__).resolve().parent.parent
VOCAB = 256
DOC_LENGTHS = (37, 5, 60, 23, 81, 12, 44, 70)  # 332 tokens; uneven, so document boundaries fall mid-sample
SAMPLES, SEQ = 3, 24  # 72 tokens: documents 0-2 (the third only in part)


def _load_tool():
    spec = importlib.util.spec_from_file_location("kurtosis_tool", REPO_ROOT / "tools" / "kurtosis.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


kurtosis_tool = _load_tool()


def reference_kurtosis(hidden: torch.Tensor) -> torch.Tensor:
    """OSP's per-token statistic in float64 from explicit sums: relu(m4 / s⁴ − 3), m4 = mean(x⁴)
    (not centred), s² = Σ(x − mean)² / (n − 1) (centred, unbiased)."""
    x = hidden.double()
    n = x.shape[-1]
    mean = x.sum(-1, keepdim=True) / n
    variance = ((x - mean) ** 2).sum(-1) / (n - 1)
    fourth = (x ** 4).sum(-1) / n
    return torch.clamp(fourth / variance ** 2 - 3.0, min=0.0)


# --------------------------------------------------------------------------- the metric


def test_one_outlier_gives_n_minus_3():
    # x = (M, 0, ..., 0): mean(x⁴) = M⁴/n and the unbiased variance is (M² − n·(M/n)²)/(n − 1) = M²/n,
    # so mean(x⁴)/std⁴ = n whatever M: excess kurtosis n − 3.
    for n, outlier in ((1024, 1.0), (1024, 3.0e3), (4096, 7.5)):
        x = torch.zeros(n, dtype=torch.float64)
        x[17] = outlier
        assert K.excess_kurtosis(x, torch.float64).item() == pytest.approx(n - 3, rel=1e-12)
        assert reference_kurtosis(x).item() == pytest.approx(n - 3, rel=1e-12)
    # the same in float32 from a bf16 hidden state (the tool's default path)
    x = torch.zeros(2048, dtype=torch.bfloat16)
    x[5] = 40.0
    assert K.excess_kurtosis(x).item() == pytest.approx(2045, rel=1e-5)


def test_fourth_moment_is_not_centred_and_relu_clamps():
    # (c+1, c−1, c+1, c−1): mean c, unbiased variance 4/3, mean(x⁴) = c⁴ + 6c² + 1.
    c = 2.0
    x = torch.tensor([c + 1, c - 1, c + 1, c - 1], dtype=torch.float64)
    expected = (c ** 4 + 6 * c ** 2 + 1) / (4 / 3) ** 2 - 3  # 20.0625; centred (textbook) kurtosis: clamped to 0
    assert K.excess_kurtosis(x, torch.float64).item() == pytest.approx(expected, rel=1e-12)
    # ±1 around 0: mean(x⁴)/std⁴ = ((n − 1)/n)² < 3, so relu gives exactly 0
    signs = torch.tensor([1.0, -1.0] * 512, dtype=torch.float64)
    assert K.excess_kurtosis(signs, torch.float64).item() == 0.0


def test_gaussian_is_near_zero_and_heavy_tails_match_the_reference():
    g = torch.Generator().manual_seed(0)
    gaussian = torch.randn(64, 4096, generator=g, dtype=torch.float64)
    k = K.excess_kurtosis(gaussian, torch.float64)
    assert torch.allclose(k, reference_kurtosis(gaussian), rtol=1e-10, atol=1e-12)
    assert (k >= 0).all() and (k == 0).any()  # the relu acts on about half of the vectors
    assert k.mean().item() < 0.1  # E relu(N(0, √(24/n))) ≈ 0.03
    # Student-t (3 degrees of freedom), batched like hidden states [batch, seq, hidden]
    heavy = torch.distributions.StudentT(3.0).sample((2, 5, 512)).double()
    ref = reference_kurtosis(heavy)
    assert ref.shape == (2, 5) and ref.max() > 5
    assert torch.allclose(K.excess_kurtosis(heavy, torch.float64), ref, rtol=1e-10)
    assert torch.allclose(K.excess_kurtosis(heavy.float()), ref.float(), rtol=1e-4)  # default float32
    assert K.excess_kurtosis(heavy.bfloat16(), None).dtype == torch.bfloat16  # "native": the input's dtype
    # a zero-variance vector has no kurtosis: non-finite, which the evaluation skips and counts
    assert not torch.isfinite(K.excess_kurtosis(torch.zeros(8))).item()


# --------------------------------------------------------------------------- fixtures


def _documents() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, VOCAB, size=n) for n in DOC_LENGTHS]


def write_dataset(prefix: str, documents: list[np.ndarray]) -> str:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for doc in documents:
        builder.add_document(torch.from_numpy(doc.astype(np.int64)), [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict:
    """A tiny random LlamaForCausalLM (safetensors) and an indexed dataset of random documents."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("kurtosis")
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.1, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "llama")
    assert (root / "llama" / "model.safetensors").is_file()
    prefix = write_dataset(str(root / "docs"), _documents())
    return {"root": root, "llama": root / "llama", "data": prefix,
            "stream": np.concatenate(_documents())}


def run_tool(ws: dict, name: str, model, *args: str) -> dict:
    out = ws["root"] / f"{name}.json"
    code = kurtosis_tool.main([str(model), "--data", ws["data"], "--output", str(out), "--progress-interval", "0",
                               *args])
    assert code == 0
    return json.loads(out.read_text())


def direct_per_layer(model_dir: Path, tokens: torch.Tensor, *, quirk: bool, dtype=torch.float32) -> list[float]:
    """Per-hidden-state mean kurtosis from the model's own output_hidden_states, one sample per call."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    per_sample = []
    with torch.no_grad():
        for row in tokens:
            input_ids = row.reshape(-1, 1) if quirk else row.unsqueeze(0)  # OSP: model(seq.unsqueeze(1))
            hidden_states = model(input_ids, output_hidden_states=True).hidden_states
            per_sample.append([reference_kurtosis(h).mean().item() for h in hidden_states])
    return np.mean(per_sample, axis=0).tolist()  # every sample has seq tokens: = the mean over tokens


def stream_samples(ws: dict, samples: int) -> torch.Tensor:
    """The test's documents concatenated, as ``samples`` rows of SEQ tokens (written independently
    of the tool's reader)."""
    return torch.from_numpy(ws["stream"][:samples * SEQ].astype(np.int64)).reshape(samples, SEQ)


def _values(report: dict) -> list[float]:
    return [layer["kurtosis"] for layer in report["per_layer"]]


# --------------------------------------------------------------------------- data


def test_samples_are_the_documents_concatenated_in_order(ws):
    data = K.load_samples(ws["data"], SAMPLES, SEQ, vocab_size=VOCAB)
    assert torch.equal(data.tokens, stream_samples(ws, SAMPLES))
    assert (data.documents_in_dataset, data.documents_considered, data.documents_used) == (8, 8, 3)
    assert (data.tokens_considered, data.tokens_unused) == (332, 332 - 72)
    # --documents N: only the first N documents (OSP: the first 1000 of C4 validation)
    first3 = K.load_samples(ws["data"], 2, 51, max_documents=3)
    assert first3.tokens_considered == 102 and first3.tokens_unused == 0 and first3.documents_used == 3
    with pytest.raises(K.KurtosisError, match=r"its first 3 \(of 8\) documents hold 102 tokens, but 2 samples × 52"):
        K.load_samples(ws["data"], 2, 52, max_documents=3)


# --------------------------------------------------------------------------- end to end (Hugging Face)


def test_contextual_equals_direct_computation(ws):
    tokens = stream_samples(ws, SAMPLES)
    # --batch-size 2: a full batch and a partial one
    report = run_tool(ws, "contextual", ws["llama"], "--samples", str(SAMPLES), "--seq-len", str(SEQ),
                      "--dtype", "float32", "--batch-size", "2", "--plot", str(ws["root"] / "contextual.png"))
    expected = direct_per_layer(ws["llama"], tokens, quirk=False)
    assert len(report["per_layer"]) == 4  # embedding + 3 layers (the last after the final norm)
    assert _values(report) == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert report["overall"] == pytest.approx(float(np.mean(expected)), rel=1e-5)
    assert report["settings"]["mode"] == "contextual" and report["settings"]["dtype"] == "float32"
    assert report["model"]["class"] == "LlamaForCausalLM" and report["nonfinite_tokens"] == 0
    assert report["data"]["tokens_used"] == SAMPLES * SEQ and report["data"]["documents_used"] == 3
    assert [layer["name"] for layer in report["per_layer"]] == [
        "embedding", "layer 1", "layer 2", "layer 3 (after final norm)"]
    assert min(expected[1:]) > 0  # a non-trivial check: the layers' values are not clamped to 0
    assert (ws["root"] / "contextual.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ws["contextual"] = report


def test_length_one_quirk_equals_direct_computation_on_seq_by_1_inputs(ws):
    tokens = stream_samples(ws, SAMPLES)
    report = run_tool(ws, "quirk", ws["llama"], "--samples", str(SAMPLES), "--seq-len", str(SEQ),
                      "--dtype", "float32", "--batch-size", "2", "--length-one-quirk")
    expected = direct_per_layer(ws["llama"], tokens, quirk=True)
    assert _values(report) == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert report["settings"]["mode"] == "length_one_quirk" and report["settings"]["length_one_quirk"]
    contextual = ws.get("contextual") or run_tool(ws, "contextual2", ws["llama"], "--samples", str(SAMPLES),
                                                  "--seq-len", str(SEQ), "--dtype", "float32")
    # The embedding output has no context either way; every layer after it does.
    assert _values(report)[0] == pytest.approx(_values(contextual)[0], rel=1e-6)
    for quirk_value, contextual_value in zip(_values(report)[1:], _values(contextual)[1:]):
        assert abs(quirk_value - contextual_value) > 1e-3 * max(abs(contextual_value), 1e-3)


def test_default_dtype_is_bfloat16_and_equals_the_direct_bf16_computation(ws):
    tokens = stream_samples(ws, 2)
    report = run_tool(ws, "bf16", ws["llama"], "--samples", "2", "--seq-len", str(SEQ), "--length-one-quirk")
    assert report["settings"]["dtype"] == "bfloat16"  # OSP's script runs the model in bf16
    expected = direct_per_layer(ws["llama"], tokens, quirk=True, dtype=torch.bfloat16)
    assert _values(report) == pytest.approx(expected, rel=1e-4, abs=1e-6)


# --------------------------------------------------------------------------- Megatron checkpoints


def save_random_checkpoint(root: Path, data: str, overrides: list[str], gates: list[tuple], mutate=None) -> Path:
    """A single-process step-0 checkpoint under ``root / "ckpt"`` of a tiny model (``overrides`` on top
    of a 32-wide shape), its weights and gates randomized so every parameter matters, then ``mutate(model)``."""
    from megatron.core import parallel_state
    from megatron.core.utils import unwrap_model

    from megatron_gpas import distributed
    from megatron_gpas.config import load_config
    from megatron_gpas.training import Trainer
    from test_model_reference import randomize

    if parallel_state.model_parallel_is_initialized():
        distributed.shutdown(keep_process_group=True)
    trainer = Trainer(load_config(None, [
        "model.hidden_size=32", "model.num_attention_heads=4", "model.ffn_hidden_size=64",
        f"model.vocab_size={VOCAB}", "model.make_vocab_size_divisible_by=64", "model.max_seq_length=64",
        "train.steps=1", f"train.seq_length={SEQ}", "train.micro_batch_size=1", "train.global_batch_size=1",
        f"data.paths=['{data}']", "data.tokenizer.kind='null'", f"data.tokenizer.vocab_size={VOCAB}",
        f"checkpoint.save='{root / 'ckpt'}'", f"logging.dir='{root / 'run'}'", "logging.tensorboard=false",
        "logging.plots=false", *overrides]), data_builder=lambda trainer: (None, None))
    try:
        model = unwrap_model(trainer.model[0])
        randomize(model, seed=5, gates=gates)
        if mutate is not None:
            with torch.no_grad():
                mutate(model)
        trainer.save_checkpoint()
    finally:
        trainer.close()
    return root / "ckpt"


@pytest.fixture(scope="module")
def megatron_checkpoint(ws) -> Path:
    """A Sandwich-LN + GPAS model (a custom-class export)."""
    return save_random_checkpoint(ws["root"] / "megatron", ws["data"],
                                  ["model.num_layers=2", "norm.scheme=sandwich", "gpas.enabled=true"], [(0.4,), (-0.3,)])


def test_megatron_checkpoint_equals_its_export(ws, megatron_checkpoint):
    from megatron_gpas.hf.export import export_checkpoint

    exported = export_checkpoint(str(megatron_checkpoint), str(ws["root"] / "megatron" / "export"), target="custom",
                                 progress=False)
    # The export ships our modeling code for trust_remote_code users; the tool must never run it.
    for name in ("modeling_megatron_gpas.py", "configuration_megatron_gpas.py"):
        (Path(exported.out_dir) / name).write_text("raise RuntimeError('code from the model directory was run')\n")
    args = ("--samples", "2", "--seq-len", str(SEQ), "--dtype", "float32")
    from_checkpoint = run_tool(ws, "megatron_root", megatron_checkpoint, *args)
    from_iter_dir = run_tool(ws, "megatron_iter", megatron_checkpoint / "iter_0000000", *args)
    from_export = run_tool(ws, "megatron_export", exported.out_dir, *args)
    assert from_checkpoint["model"]["kind"] == "megatron" and from_export["model"]["kind"] == "huggingface"
    assert from_checkpoint["export"]["format"] == "custom"
    assert from_checkpoint["model"]["class"] == from_export["model"]["class"] == "MegatronGPASForCausalLM"
    assert len(from_checkpoint["per_layer"]) == 3
    assert _values(from_checkpoint) == pytest.approx(_values(from_export), rel=1e-6, abs=1e-9)
    assert _values(from_iter_dir) == pytest.approx(_values(from_export), rel=1e-6, abs=1e-9)
    assert max(_values(from_export)) > 0


# --------------------------------------------------------------------------- CLI errors


@pytest.fixture
def no_model_loading(monkeypatch):
    """Bad inputs must be refused before any weights are read."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    import megatron_gpas.analysis.model_inputs as model_inputs

    monkeypatch.setattr(model_inputs, "load_model", refuse)
    import megatron_gpas.hf.export as export

    monkeypatch.setattr(export, "export_checkpoint", refuse)


def _error_of(capsys, argv: list[str]) -> str:
    assert kurtosis_tool.main(argv) == 2
    return capsys.readouterr().err


def test_cli_errors(ws, capsys, no_model_loading, tmp_path):
    data, llama = ws["data"], str(ws["llama"])
    small = ["--samples", "2", "--seq-len", "8"]
    cases = {
        "missing model": ([str(tmp_path / "nope"), "--data", data, *small], "does not exist"),
        "neither": ([str(tmp_path), "--data", data, *small],
                    "neither a Hugging Face model directory (it has no config.json) nor a Megatron checkpoint"),
        "missing data": ([llama, "--data", str(tmp_path / "missing"), *small], "missing.idx does not exist"),
        "too short": ([llama, "--data", data, "--samples", "128", "--seq-len", "2048"],
                      "its documents hold 332 tokens, but 128 samples × 2048 tokens need 262,144"),
        "documents": ([llama, "--data", data, "--documents", "9", *small],
                      "--documents 9, but", ),
        "batch size": ([llama, "--data", data, "--batch-size", "0", *small], "--batch-size must be positive"),
        "samples": ([llama, "--data", data, "--samples", "0"], "--samples and --seq-len must be positive"),
        "output dir": ([llama, "--data", data, "--output", str(tmp_path / "no" / "r.json"), *small],
                       "does not exist"),
    }
    for name, (argv, message) in cases.items():
        assert message in _error_of(capsys, argv), name

    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 50257}))
    assert "model_type 'gpt2'; supported: 'llama'" in _error_of(capsys, [str(other), "--data", data, *small])

    # A token id the model's embedding does not have: located in the data.
    docs = _documents()
    docs[1] = docs[1].copy()
    docs[1][3] = VOCAB + 44
    bad = write_dataset(str(tmp_path / "bad"), docs)
    err = _error_of(capsys, [llama, "--data", bad, "--samples", "2", "--seq-len", "30"])
    assert f"token id {VOCAB + 44} (document 1, sample 1, position {37 + 3 - 30})" in err
    assert f"the model's vocabulary has {VOCAB} ids" in err

    # A save root whose `latest` names a checkpoint that is not complete
    broken = tmp_path / "ckpt"
    (broken / "iter_0000010").mkdir(parents=True)
    (broken / "latest").write_text("iter_0000010\n")
    assert "names a checkpoint that is not complete" in _error_of(capsys, [str(broken), "--data", data, *small])
