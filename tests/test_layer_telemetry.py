"""Per-layer telemetry (megatron_gpas/layer_telemetry.py): the same tags and values in every layout,
and values checked against what they measure.

DyT+GPAS on the tiny model (its norms carry the learned scalar α the telemetry logs as a scale; the
GPAS gate is a layer parameter outside both sub-layers), 3 steps logged every step from the same
step-0 weights: 1 process against TP=2+SP (sequence-split branch statistics, TP-sharded weights and
gradients, duplicated norm weights counted once), PP=2 (layers on different stages) and DP=2 with
the distributed optimizer (each rank holds the reduced gradient of its shard only). Independent
checks in one process: the layers' gradient norms and the rest make up train/grad_norm (Megatron's
CPU norm is computed less exactly: 5e-4); the weight norm after step 3 and the update ratio of
step 3 from the step-2 and step-3 checkpoints, read back and computed here; each sub-layer's norm
below its layer's, their squares summing to it without the gate.
"""

from __future__ import annotations

import math

import pytest
import torch

from test_simplenorm import TINY_OVERRIDES, _from_init

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

STEPS = 3
LAYERS = 4
LAYOUTS = {
    "tp2_sp": ["parallel.tensor=2", "parallel.sequence_parallel=true"],
    "pp2": ["parallel.pipeline=2"],
    "dp2_distopt": ["parallel.distributed_optimizer=true"],
}
REL_TOL = 1e-4  # the same fp32 sums in another order
TAG_PREFIXES = ("layers/", "scales/")


def _run_overrides(ws, run: str, *extra: str) -> list[str]:
    from synthetic import synthetic_run_overrides

    return [*TINY_OVERRIDES, "norm.scheme=dyt", "norm.options.alpha0=[1.0,1.0,1.0]", "gpas.enabled=true",
            f"train.steps={STEPS}", "train.micro_batch_size=2", "train.global_batch_size=4", "train.eval_interval=0",
            "train.eval_iters=1", "optim.lr=1e-2", "optim.warmup_steps=0", "optim.clip_grad=0",
            *synthetic_run_overrides(ws, ws / "runs" / run), "logging.layer_telemetry=true", *extra]


@pytest.fixture(scope="module")
def single(workspace) -> dict:
    from test_parallel import _launch

    ws = workspace
    cases = [
        {"name": "dataset", "kind": "dataset", "prefix": str(ws / "data" / "synthetic")},
        {"name": "init", "kind": "save_init", "overrides": _run_overrides(ws, "init", f"checkpoint.save='{ws / 'ckpt_init'}'")},
        {"name": "reference", "kind": "train",
         "overrides": _run_overrides(ws, "reference", *_from_init(ws), f"checkpoint.save='{ws / 'ckpt_ref'}'",
                                     "checkpoint.save_interval=1")},
    ]
    return _launch(ws, "telemetry_single", 1, cases, timeout=300)[0]["cases"]


@pytest.fixture(scope="module")
def multi(workspace, single) -> list[dict]:
    from test_parallel import _launch

    ws = workspace
    cases = [{"name": layout, "kind": "train", "overrides": _run_overrides(ws, layout, *overrides, *_from_init(ws))}
             for layout, overrides in LAYOUTS.items()]
    return [r["cases"] for r in _launch(ws, "telemetry_multi", 2, cases, timeout=400)]


def _telemetry(case: dict) -> list[dict[str, float]]:
    """Per logged step, the telemetry tags."""
    return [{k: v for k, v in h.items() if k.startswith(TAG_PREFIXES)} for h in case["history"] if "train/loss" in h]


def test_tags_are_complete(single):
    steps = _telemetry(single["reference"])
    assert len(steps) == STEPS
    want = {"layers/grad_norm/outside_layers"}
    for l in range(1, LAYERS + 1):
        for suffix in ("", "_attn", "_mlp"):
            want |= {f"layers/{kind}/layer_{l}{suffix}" for kind in ("grad_norm", "weight_norm", "update_ratio")}
        for sub in ("attn", "mlp"):
            want |= {f"layers/branch_rms/layer_{l}_{sub}", f"layers/branch_to_shortcut/layer_{l}_{sub}",
                     f"scales/{sub}_norm.alpha/layer_{l}"}
    for values in steps:
        assert set(values) == want, sorted(set(values) ^ want)
        assert all(math.isfinite(v) and v > 0 for v in values.values()), values


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_gives_the_same_telemetry(layout, single, multi):
    reference = _telemetry(single["reference"])
    got = _telemetry(multi[0][layout])
    assert len(got) == len(reference)
    for step, (values, want) in enumerate(zip(got, reference), start=1):
        assert set(values) == set(want), f"step {step}: {sorted(set(values) ^ set(want))}"
        off = {k: (values[k], want[k]) for k in want if abs(values[k] - want[k]) > REL_TOL * abs(want[k])}
        assert not off, f"{layout} step {step}: {off}"


def test_gradient_norms_make_up_the_total(single):
    history = [h for h in single["reference"]["history"] if "train/loss" in h]
    for h in history:
        layers = [h[f"layers/grad_norm/layer_{l}"] for l in range(1, LAYERS + 1)]
        total = math.sqrt(sum(x * x for x in layers) + h["layers/grad_norm/outside_layers"] ** 2)
        assert total == pytest.approx(h["train/grad_norm"], rel=5e-4)
        for l in range(1, LAYERS + 1):
            whole, attn, mlp = (h[f"layers/grad_norm/layer_{l}{s}"] for s in ("", "_attn", "_mlp"))
            # the gate is the layer's own: its gradient is the remainder
            gate = math.sqrt(max(whole**2 - attn**2 - mlp**2, 0.0))
            assert attn < whole and mlp < whole and gate > 0


def test_weight_norm_and_update_ratio_match_the_checkpoints(workspace, single):
    """layers/weight_norm after step 3 and layers/update_ratio of step 3, computed here from the step-2
    and step-3 checkpoints (every parameter of the layer: both sub-layers and the gate)."""
    from megatron_gpas.hf.dcp_reader import CheckpointReader

    readers = {step: CheckpointReader(str(workspace / "ckpt_ref" / f"iter_{step:07d}")) for step in (2, 3)}
    keys = [k for k in readers[3].metadata if k.startswith("decoder.layers.")]
    last = [h for h in single["reference"]["history"] if "train/loss" in h][-1]
    for l in range(1, LAYERS + 1):
        before = torch.cat([readers[2].read_layer(k, l - 1).double().reshape(-1) for k in keys])
        after = torch.cat([readers[3].read_layer(k, l - 1).double().reshape(-1) for k in keys])
        assert last[f"layers/weight_norm/layer_{l}"] == pytest.approx(float(after.norm()), rel=1e-6)
        assert last[f"layers/update_ratio/layer_{l}"] == pytest.approx(float((after - before).norm() / before.norm()),
                                                                       rel=1e-5)
