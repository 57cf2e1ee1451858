"""Hugging Face export and import for every scheme (± GPAS) and the GPAS ablations.

Launches (tests/parallel_worker.py):
  A. one process: per model, a Trainer with weights put in a regime where every parameter
     matters (norms 1 ± 0.3, distinct non-zero gates; test_model_reference.randomize), its
     step-0 checkpoint, the Megatron logits on a probe batch and its greedy continuation of a
     prompt (recomputing the whole sequence each step: no KV cache);
  B. ``torchrun --nproc-per-node 2``: every model loads that checkpoint under TP=2+SP or PP=2
     (alternating) and saves it again: the checkpoints exported below are TP=2 / PP=2 ones;
  then, in this process, ``export_checkpoint`` on each B checkpoint; the HF model's logits
  (fp32) must equal A's, and its ``generate`` (with KV cache) the greedy tokens;
  C. ``torchrun --nproc-per-node 2``: a few exports imported back under TP=2 / PP=2
     (tools/convert_from_hf.py's path), then exported again: the weights must be bitwise equal.

Tolerance: max |logits_HF − logits_Megatron| ≤ 1e-5 · max |logits_Megatron| (fp32; measured
≤ 1.3e-6 for the custom class and ≤ 2e-6 for the folded native exports, whose only inexactness
is RMSNorm's ε/P²). A wrong mapping (swapped norms, a misplaced gate, a QKV mix-up) moves the
logits by O(1) of their scale (test_model_reference / test_schemes_reference show this).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from synthetic import synthetic_run_overrides
from test_parallel import _launch

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

VOCAB = 250  # the model's vocabulary; Megatron pads it to 256 (multiple of 64 · TP)
LOGIT_REL_TOL = 1e-5
FOLDED_LOGIT_REL_TOL = 1e-4  # the converter's own acceptance threshold for fp32 folds
SEQ = 16
GATES = [(0.3, -0.2), (-0.5, 0.6), (0.9, 0.4), (0.1, -0.7)]  # per layer (attention, MLP with per_sublayer)
NEGATIVE_GATES = [(0.3, 0.3), (2.0, 2.0), (0.1, 0.1), (0.2, 0.2)]  # 1 − SiLU(2) = −0.76: the stream flips sign

# name -> (overrides, expected export format)
MODELS = {
    "pre": (["norm.scheme=pre"], "llama"),
    "pre_gpas": (["norm.scheme=pre", "gpas.enabled=true"], "llama"),
    "post": (["norm.scheme=post"], "custom"),
    "post_gpas": (["norm.scheme=post", "gpas.enabled=true"], "custom"),
    "deepnorm": (["norm.scheme=deepnorm"], "custom"),
    "deepnorm_gpas": (["norm.scheme=deepnorm", "gpas.enabled=true"], "custom"),
    "sandwich": (["norm.scheme=sandwich"], "custom"),
    "sandwich_gpas": (["norm.scheme=sandwich", "gpas.enabled=true"], "custom"),
    "mixln": (["norm.scheme=mixln", "norm.mixln_post_layers=2"], "custom"),
    "mixln_gpas": (["norm.scheme=mixln", "norm.mixln_post_layers=2", "gpas.enabled=true"], "custom"),
    "lns": (["norm.scheme=lns", "norm.lns_mode=init"], "llama"),
    "lns_gpas": (["norm.scheme=lns", "norm.lns_mode=fixed", "gpas.enabled=true"], "llama"),
    "lns_fixed": (["norm.scheme=lns", "norm.lns_mode=fixed"], "llama"),
    # ablations (every pre-norm gate position folds; per-sub-layer gates; other activations)
    "pre_gpas_before_sublayer": (["gpas.enabled=true", "gpas.position=before_sublayer", "gpas.per_sublayer=true"],
                                 "llama"),
    "pre_gpas_after_norm": (["gpas.enabled=true", "gpas.position=after_norm", "gpas.activation=tanh"], "llama"),
    "pre_gpas_after_branch": (["gpas.enabled=true", "gpas.position=after_branch",
                               "gpas.activation=scaled_silu", "gpas.silu_beta=3.0"], "llama"),
    "sandwich_gpas_per_sublayer": (["norm.scheme=sandwich", "gpas.enabled=true", "gpas.per_sublayer=true",
                                    "gpas.activation=identity"], "custom"),
    "pre_gpas_negative_scale": (["gpas.enabled=true"], "custom"),
    # norm replacements: LayerNorm's centring and biases, OSP's merges fold into a stock Llama;
    # a final norm bias (no place in Llama's head), DyT and BHyT need our class
    "pre_ln": (["norm.kind=layernorm"], "custom"),
    "pre_ln_gpas_final_bias0": (["norm.kind=layernorm", "gpas.enabled=true"], "llama"),
    "pre_ln_nobias": (["norm.kind=layernorm", "norm.bias=false"], "llama"),
    "pre_rmsnorm_gpas_nobias": (["norm.scheme=pre_rmsnorm", "gpas.enabled=true", "norm.bias=false"], "llama"),
    "crmsnorm_gpas": (["norm.scheme=crmsnorm", "gpas.enabled=true"], "custom"),
    "crmsnorm_final_bias0": (["norm.scheme=crmsnorm"], "llama"),
    "sandwich_ln_gpas": (["norm.scheme=sandwich", "norm.kind=layernorm", "gpas.enabled=true"], "custom"),
    "osp": (["norm.scheme=osp"], "llama"),
    "osp_gpas": (["norm.scheme=osp", "gpas.enabled=true"], "llama"),
    "dyt_gpas": (["norm.scheme=dyt", "gpas.enabled=true", "norm.options.alpha0=[0.9, 0.6, 0.4]"], "custom"),
    "bhyt_gpas": (["norm.scheme=bhyt", "gpas.enabled=true"], "custom"),
    "bhyt_final": (["norm.scheme=bhyt", "norm.options.lambdas=[3.0, 3.0, 2.0]"], "custom"),
    "bhytstar": (["norm.scheme=bhytstar"], "custom"),
    # SimpleNorm: an RMSNorm after every linear, no pre-norms (re-saved under PP2, imported back under TP2+SP)
    "simplenorm_gpas": (["norm.scheme=simplenorm", "gpas.enabled=true", "norm.eps=1e-5"], "custom"),
}
LAYOUTS = (["parallel.tensor=2", "parallel.sequence_parallel=true"], ["parallel.pipeline=2"])
ROUND_TRIPS = {"pre_gpas": LAYOUTS[0], "mixln_gpas": LAYOUTS[1], "sandwich_gpas_per_sublayer": LAYOUTS[0],
               "lns_gpas": LAYOUTS[1], "osp_gpas": LAYOUTS[0], "dyt_gpas": LAYOUTS[1], "bhyt_gpas": LAYOUTS[0],
               "simplenorm_gpas": LAYOUTS[0]}


def _overrides(ws: Path, name: str, *extra: str) -> list[str]:
    return [
        "model.preset=tiny", f"model.vocab_size={VOCAB}", "model.make_vocab_size_divisible_by=64",
        "model.num_query_groups=2",
        "train.steps=1", f"train.seq_length={SEQ}", "train.micro_batch_size=2", "train.global_batch_size=2",
        "train.eval_iters=1",
        *synthetic_run_overrides(ws, ws / "runs" / name, vocab_size=VOCAB),
        *MODELS[name][0], *extra,
    ]


@pytest.fixture(scope="module")
def references(workspace) -> dict:
    """Launch A: step-0 checkpoints with randomized weights, Megatron logits and greedy tokens."""
    ws = workspace
    g = torch.Generator().manual_seed(3)
    probe = {"tokens": torch.randint(0, VOCAB, (2, SEQ), generator=g).tolist(),
             "greedy_prompt": torch.randint(0, VOCAB, (1, 5), generator=g).tolist(), "greedy_steps": 6}
    cases = [{"name": "data", "kind": "dataset", "prefix": str(ws / "data" / "synthetic"), "vocab_size": VOCAB}]
    for name in MODELS:
        gates = NEGATIVE_GATES if name == "pre_gpas_negative_scale" else GATES
        randomize = {"seed": 11, "gates": gates, "zero_final_bias": name.endswith("final_bias0")}
        cases.append({"name": name, "kind": "save_init",
                      "overrides": _overrides(ws, name, f"checkpoint.save='{ws / 'ref' / name}'"),
                      "randomize": randomize,
                      "probe": {**probe, "out": str(ws / f"{name}_probe.pt")}})
    _launch(ws, "reference", 1, cases, timeout=600)
    return {name: torch.load(ws / f"{name}_probe.pt") for name in MODELS} | {"probe": probe}


@pytest.fixture(scope="module")
def parallel_checkpoints(workspace, references) -> dict[str, Path]:
    """Launch B: every model re-saved from a TP=2+SP or PP=2 layout."""
    ws = workspace
    cases, roots = [], {}
    for i, name in enumerate(MODELS):
        roots[name] = ws / "parallel" / name
        cases.append({"name": name, "kind": "save_init", "overrides": _overrides(
            ws, name, *LAYOUTS[i % 2], f"checkpoint.load='{ws / 'ref' / name}'", "checkpoint.load_optimizer=false",
            f"checkpoint.save='{roots[name]}'")})
    results = _launch(ws, "resave", 2, cases, timeout=600)
    for name, root in roots.items():
        assert results[0]["cases"][name]["latest"] == str(root / "iter_0000000")
        layout = json.loads((root / "iter_0000000" / "metadata.json").read_text())
        assert layout  # a real dist-checkpoint
    return roots


@pytest.fixture(scope="module")
def exports(workspace, parallel_checkpoints) -> dict:
    from megatron_gpas.hf.export import export_checkpoint

    return {name: export_checkpoint(str(root), str(workspace / "hf" / name), progress=False)
            for name, root in parallel_checkpoints.items()}


def _rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


def _load_hf(path: str, native: bool):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    if native:  # plain transformers, no remote code
        return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_export_matches_megatron(name, exports, references):
    result, expected_format = exports[name], MODELS[name][1]
    assert result.format == expected_format, result.reason
    native = result.format == "llama"
    files = set(os.listdir(result.out_dir))
    assert {"config.json", "generation_config.json", "megatron_gpas_export.json"} <= files
    config = json.loads(Path(result.out_dir, "config.json").read_text())
    if native:
        assert config["model_type"] == "llama" and "auto_map" not in config
        assert not any(f.endswith(".py") for f in files), "a native export needs no code"
    else:
        assert config["model_type"] == "megatron_gpas" and "AutoModelForCausalLM" in config["auto_map"]
    model = _load_hf(result.out_dir, native)
    assert type(model).__name__ == ("LlamaForCausalLM" if native else "MegatronGPASForCausalLM")

    probe, reference = references["probe"], references[name]
    with torch.no_grad():
        logits = model(torch.tensor(probe["tokens"])).logits
    assert logits.shape == reference["logits"].shape == (2, SEQ, VOCAB)
    error = _rel_error(logits, reference["logits"])
    tolerance = FOLDED_LOGIT_REL_TOL if result.fold_error is not None else LOGIT_REL_TOL
    print(f"[{name}] format {result.format}, logit error {error:.2e}, fold error {result.fold_error}")
    assert error <= tolerance, f"{name}: HF logits differ from Megatron's by {error:.2e} (relative)"

    prompt = torch.tensor(probe["greedy_prompt"])
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=probe["greedy_steps"],
                               do_sample=False, eos_token_id=None, pad_token_id=0)
    assert generated.tolist() == reference["greedy"].tolist(), f"{name}: greedy tokens differ"


def test_fold_decisions_are_explained(exports):
    assert "folded" in exports["pre_gpas"].reason and exports["pre_gpas"].fold_error <= 1e-5
    assert "1/√l" in exports["lns_fixed"].reason and "GPAS" not in exports["lns_fixed"].reason
    assert exports["pre"].fold_error is None  # nothing to fold
    negative = exports["pre_gpas_negative_scale"]
    assert "≤ 0" in negative.reason and "layer 2" in negative.reason, negative.reason
    report = json.loads(Path(exports["pre_gpas"].out_dir, "megatron_gpas_export.json").read_text())
    assert report["format"] == "llama" and len(report["cumulative_scales"]) == 2 * 4 + 1


def test_fold_cumulative_scales_follow_the_gates(exports):
    """P before each norm: the product of all earlier factors 1 − SiLU(α) (one gate, two sub-layers)."""
    import torch.nn.functional as F

    expected, p = [], 1.0
    for alpha, _ in GATES:
        beta = 1.0 - float(F.silu(torch.tensor(alpha, dtype=torch.float32).double()))  # α is stored in fp32
        expected += [p, p * beta]
        p *= beta * beta
    expected.append(p)
    assert exports["pre_gpas"].cumulative_scales == pytest.approx(expected, rel=1e-12)


def test_fold_tolerance_falls_back_to_custom_code(workspace, parallel_checkpoints):
    from megatron_gpas.hf.export import ExportError, export_checkpoint

    result = export_checkpoint(str(parallel_checkpoints["pre_gpas"]), str(workspace / "hf_strict"),
                               fold_tolerance=1e-12, progress=False)
    assert result.format == "custom" and "tolerance" in result.reason
    with pytest.raises(ExportError, match="Sandwich-LN"):
        export_checkpoint(str(parallel_checkpoints["sandwich"]), str(workspace / "hf_forced"), target="llama",
                          progress=False)
    assert not (workspace / "hf_forced").exists() and not (workspace / "hf_forced.partial").exists()
    with pytest.raises(ExportError, match="not empty"):
        export_checkpoint(str(parallel_checkpoints["pre"]), str(workspace / "hf" / "pre"), progress=False)


def test_sharded_safetensors(workspace, parallel_checkpoints, references):
    from megatron_gpas.hf.export import export_checkpoint

    result = export_checkpoint(str(parallel_checkpoints["mixln_gpas"]), str(workspace / "hf_sharded"),
                               max_shard_bytes=100_000, progress=False)
    assert len(result.weight_files) > 3 and "model.safetensors.index.json" in os.listdir(result.out_dir)
    model = _load_hf(result.out_dir, native=False)
    with torch.no_grad():
        logits = model(torch.tensor(references["probe"]["tokens"])).logits
    assert _rel_error(logits, references["mixln_gpas"]["logits"]) <= LOGIT_REL_TOL


def test_round_trip_hf_megatron_hf_is_exact(workspace, exports):
    """HF → Megatron (imported under TP=2 or PP=2) → HF gives the same tensors, bit for bit."""
    from megatron_gpas.hf.export import export_checkpoint

    ws = workspace
    cases = [{"name": name, "kind": "import_hf", "hf_dir": exports[name].out_dir, "save": str(ws / "imported" / name),
              "overrides": list(layout)} for name, layout in ROUND_TRIPS.items()]
    _launch(ws, "import", 2, cases, timeout=600)
    for name in ROUND_TRIPS:
        again = export_checkpoint(str(ws / "imported" / name), str(ws / "hf_again" / name), progress=False)
        assert again.format == exports[name].format
        before = load_file(os.path.join(exports[name].out_dir, "model.safetensors"))
        after = load_file(os.path.join(again.out_dir, "model.safetensors"))
        assert sorted(before) == sorted(after)
        for key in before:
            assert torch.equal(before[key], after[key]), f"{name}: {key} changed in the round trip"


def test_weights_only_checkpoint_refuses_optimizer_resume(workspace, exports):
    from megatron_gpas.checkpoint import CheckpointError  # noqa: F401  (the error type the message comes from)

    ws = workspace
    imported = ws / "imported" / "pre_gpas"
    if not imported.exists():  # the round-trip test creates it; run it standalone too
        _launch(ws, "import_single", 1, [{"name": "pre_gpas", "kind": "import_hf",
                                          "hf_dir": exports["pre_gpas"].out_dir, "save": str(imported),
                                          "overrides": []}], timeout=300)
    overrides = [o for o in _overrides(ws, "pre") if not o.startswith("norm.")]
    results = _launch(ws, "resume_weights_only", 1, [
        {"name": "resume", "kind": "expect_error", "overrides": [*overrides, f"checkpoint.load='{imported}'"]},
        {"name": "init", "kind": "expect_error",
         "overrides": [*overrides, f"checkpoint.load='{imported}'", "checkpoint.load_optimizer=false"]},
    ], timeout=300)
    resume = results[0]["cases"]["resume"]
    assert resume["raised"] and "weights only" in resume["message"], resume
    assert results[0]["cases"]["init"] == {"raised": False, "seconds": results[0]["cases"]["init"]["seconds"]}
