"""Pre-LN (LayerNorm) ≡ Pre-RMSNorm ≡ Pre-CRMSNorm (Jiang et al., methods.md §3), with GPAS.

A Pre-LN + GPAS model with every parameter in a regime where it matters (LayerNorm γ 1 ± 0.3,
β ~0.2, output projections with a mean over their hidden axis, gates ≠ 0) is saved, then
``tools/convert_norm.py`` converts it LN → RMS → CRMS → LN. Checks:
  * the four checkpoints' logits agree in float64 (the models built from each checkpoint and
    run in float64): the paper's equivalence claim, to 1e-10 of the logits' scale;
  * a conversion keeps every tensor bit for bit (only the scheme changes), and it refuses a
    plain Pre-RMSNorm (Llama) checkpoint;
  * training from the three forms (fp32, Adam, 3 steps, the same data) gives the same losses,
    gradient norms and gates at every step (fp32 rounding: rel 1e-5).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from synthetic import synthetic_run_overrides
from test_parallel import _launch

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

REPO = Path(__file__).resolve().parents[1]
FORMS = ("pre_layernorm", "pre_rmsnorm", "crmsnorm")
STEPS = 3
VOCAB = 256


def _overrides(ws: Path, run: str, *extra: str) -> list[str]:
    return ["model.preset=tiny", f"model.vocab_size={VOCAB}", "model.make_vocab_size_divisible_by=64",
            "norm.scheme=pre", "norm.kind=layernorm", "gpas.enabled=true", "norm.eps=1e-5",
            f"train.steps={STEPS}", "train.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=4",
            "train.eval_iters=1", "optim.lr=3.0e-3", "optim.warmup_steps=0", "optim.clip_grad=0.0",
            *synthetic_run_overrides(ws, ws / "runs" / run), *extra]


def _convert(source: Path, output: Path, target: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "convert_norm.py"), str(source), str(output),
                           "--to", target], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def checkpoints(workspace) -> dict[str, Path]:
    ws = workspace
    _launch(ws, "ln_init", 1, [
        {"name": "data", "kind": "dataset", "prefix": str(ws / "data" / "synthetic")},
        {"name": "ln", "kind": "save_init", "overrides": _overrides(ws, "init", f"checkpoint.save='{ws / 'ln'}'"),
         "randomize": {"seed": 5, "gates": [(0.3,), (-0.4,), (0.6,), (0.2,)]}},
        {"name": "llama", "kind": "save_init",
         "overrides": _overrides(ws, "llama", "norm.kind=rmsnorm", f"checkpoint.save='{ws / 'llama'}'")},
    ], timeout=300)
    roots = {"ln": ws / "ln"}
    for source, target, name in (("ln", "pre_rmsnorm", "rms"), ("rms", "crmsnorm", "crms"),
                                 ("crms", "pre_layernorm", "ln_again")):
        result = _convert(roots[source], ws / name, target)
        assert result.returncode == 0, result.stderr
        roots[name] = ws / name
    return roots


def _logits64(ws: Path, root: Path) -> torch.Tensor:
    """The checkpoint's logits on a fixed batch, its model run in float64."""
    from megatron_gpas import checkpoint, distributed
    from megatron_gpas.checkpoint_paths import find_latest
    from megatron_gpas.config import load_config
    from megatron_gpas.model.builder import build_model_chunks, transformer_config

    path = find_latest(str(root))
    cfg = load_config(path + "/run_config.yaml", ["data.paths=[]", "checkpoint.save=null", "checkpoint.load=null"])
    distributed.init_distributed(cfg)
    try:
        model = build_model_chunks(cfg, transformer_config(cfg, bf16=False, on_cpu=True))
        checkpoint.load(cfg, path, model, None, None, load_optimizer=False)
        model = model[0].double().eval()
        tokens = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            return model(tokens, torch.arange(32).expand(2, 32), None)[..., :VOCAB]
    finally:
        distributed.shutdown(keep_process_group=True)


def test_forms_compute_the_same_logits_in_float64(workspace, checkpoints):
    logits = {name: _logits64(workspace, root) for name, root in checkpoints.items()}
    scale = logits["ln"].abs().max().item()
    for name in ("rms", "crms", "ln_again"):
        diff = (logits[name] - logits["ln"]).abs().max().item()
        assert diff <= 1e-10 * scale, f"{name}: logits differ from Pre-LN's by {diff:.2e} (scale {scale:.2e})"


def test_conversion_keeps_every_tensor(checkpoints):
    from megatron_gpas.checkpoint_paths import find_latest
    from megatron_gpas.hf.dcp_reader import CheckpointReader

    original = CheckpointReader(find_latest(str(checkpoints["ln"])))
    for name, scheme in (("rms", "pre_rmsnorm"), ("crms", "crmsnorm"), ("ln_again", "pre")):
        converted = CheckpointReader(find_latest(str(checkpoints[name])))
        assert converted.run_config["norm"]["scheme"] == scheme
        assert set(converted.metadata) == {k for k in original.metadata if not k.startswith("optimizer.")}
        for key in converted.metadata:
            assert torch.equal(original.read(key), converted.read(key)), f"{name}: {key} changed"
    # the writes of this model have a mean over the hidden axis (which the conversion need not remove)
    assert original.read("embedding.word_embeddings.weight").mean(-1).abs().max() > 1e-3


def test_plain_pre_rmsnorm_has_no_layernorm_form(workspace, checkpoints):
    result = _convert(workspace / "llama", workspace / "refused", "pre_layernorm")
    assert result.returncode == 2 and "not one of the equivalent forms" in result.stderr, result.stderr
    assert not (workspace / "refused").exists()


def test_training_trajectories_are_equal(workspace, checkpoints):
    ws = workspace
    starts = {"pre_layernorm": checkpoints["ln"], "pre_rmsnorm": checkpoints["rms"], "crmsnorm": checkpoints["crms"]}
    cases = [{"name": form, "kind": "train",
              "overrides": _overrides(ws, f"train_{form}", *_form_overrides(form),
                                      f"checkpoint.load='{root}'", "checkpoint.load_optimizer=false")}
             for form, root in starts.items()]
    runs = _launch(ws, "trajectories", 1, cases, timeout=300)[0]["cases"]
    reference = runs["pre_layernorm"]["records"]
    assert [r["step"] for r in reference] == list(range(1, STEPS + 1))
    assert len({round(r["loss"], 4) for r in reference}) == STEPS  # it trains
    for form in ("pre_rmsnorm", "crmsnorm"):
        for r, q in zip(runs[form]["records"], reference):
            for key in ("loss", "grad_norm", "gate_grad_norm"):
                assert r[key] == pytest.approx(q[key], rel=1e-5), (form, r["step"], key)
            assert r["alpha"] == pytest.approx(q["alpha"], abs=1e-7), (form, r["step"])


def _form_overrides(form: str) -> list[str]:
    from megatron_gpas.model.schemes.zero_mean import EQUIVALENT_FORMS

    return [f"norm.{key}={value}" for key, value in EQUIVALENT_FORMS[form].items()]
