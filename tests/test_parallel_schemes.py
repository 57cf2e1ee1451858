"""Every normalization scheme, with and without GPAS, under the parallel layouts (gloo, CPU).

Twelve models of the GPAS paper's hosts (norm.scheme ∈ pre, post, deepnorm, sandwich, mixln,
lns × gpas.enabled) each start from their own step-0 checkpoint and must train the same under
TP=2+SP, PP=2, PP=2×VP=2 and DP=2+distributed optimizer as in one process. The fourteen
norm-replacement models (Pre-LN with LayerNorm, pre_rmsnorm, crmsnorm, osp, dyt, bhyt,
bhytstar × gpas.enabled) run the layouts that cover their own code paths: TP=2+SP (replicated
parameters' SP reduction, BHyT's TP all-reduce of W_O·W_V, the replicated EmbProj), PP=2×VP=2
(pipeline stages of another residual width, embedding and head transforms on their own stages),
and, for the schemes with new parameter kinds (OSP's projections and SSNorm scalars, DyT's α and
embedding scale, BHyT's λ), DP=2 + the distributed optimizer.
Three launches of tests/parallel_worker.py do all the work:

  A. one process: dataset; per model the step-0 checkpoint and the 1-process reference
     (4 steps; the LR schedule of every run spans 4 steps);
  B. ``torchrun --nproc-per-node 2``: the 12 × 4 layout runs (3 steps each, same step-0
     weights, loaded weights-only), sequentially in one process group; the PP=2 runs of
     Mix-LN and Sandwich+GPAS also save a step-2 checkpoint (optimizer included), which is
     resumed under TP=2+SP for steps 3-4; a build-only SP audit of frozen gates;
  C. one process: the same two PP=2 step-2 checkpoints resumed at TP=1 for steps 3-4.

Settings: optim.clip_grad=0.5 (0.2 for DyT; the global clip, on: pre-clip norms are above it at
every step of every model, asserted, so the update depends on the globally reduced norm);
gpas.clip_grad=0 (the gate clip is off here; tests/test_parallel.py covers it).
Mix-LN uses norm.mixln_post_layers=2: layers 1-2 Post-LN, 3-4 Pre-LN, so under PP=2 the
two stages hold different kinds of layers and under PP=2×VP=2 every rank holds one of each.
LNS without GPAS uses norm.lns_mode=init (norm weights start at 1/√l, checked as built in
every layout), LNS+GPAS uses lns_mode=fixed (the forward itself depends on the global l).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from synthetic import synthetic_run_overrides
from test_parallel import _close, _launch

CLIP_GRAD = 0.5
# DyT's gradient norms start lower (~0.48): its clip threshold is lower so the clip bites as well
CLIP_GRAD_OF = {"dyt": 0.2, "dyt_gpas": 0.2}
STEPS = 4  # train.steps of every run (LR schedule)
EQUIV_STEPS = 3  # the 2-process layout runs stop after 3 (train.exit_after_steps)
SAVE_AT = 2  # the PP=2 runs of RESUME_MODELS also save at step 2 (checkpoint.save_interval)
NUM_LAYERS = 4
MIXLN_POST_LAYERS = 2
GLOBAL_BATCH = 4

PAPER_SCHEMES = ("pre", "post", "deepnorm", "sandwich", "mixln", "lns")
# norm-replacement models: name -> (norm.scheme, overrides)
NEW_SCHEMES = {
    "pre_ln": ("pre", ["norm.kind=layernorm"]),
    "pre_rmsnorm": ("pre_rmsnorm", []),
    "crmsnorm": ("crmsnorm", []),
    "osp": ("osp", []),
    "dyt": ("dyt", ["norm.options.alpha0=[0.9, 0.6, 0.4]"]),
    # c_attn refreshed before steps 0 and 3: the step-2 resume below needs the saved value
    "bhyt": ("bhyt", ["norm.options.refresh_interval=3"]),
    "bhytstar": ("bhytstar", []),
}
SCHEME_OVERRIDES = {name: ([f"norm.scheme={scheme}"] + extra) for name, (scheme, extra) in NEW_SCHEMES.items()}
SCHEME_OVERRIDES.update({scheme: [f"norm.scheme={scheme}"] for scheme in PAPER_SCHEMES})
MODELS = {f"{name}{'_gpas' if gpas else ''}": (name, gpas)
          for name in (*PAPER_SCHEMES, *NEW_SCHEMES) for gpas in (False, True)}
RESUME_MODELS = ("mixln", "sandwich_gpas", "bhyt_gpas")
FROZEN_AUDITS = ("sandwich_gpas", "mixln_gpas")  # + gpas.freeze=true, build-only SP audit at TP2+SP

LAYOUTS = {
    "tp2_sp": ["parallel.tensor=2", "parallel.sequence_parallel=true"],
    "pp2": ["parallel.pipeline=2"],
    "pp2_vp2": ["parallel.pipeline=2", "parallel.virtual_pipeline=2"],
    "dp2_distopt": ["parallel.distributed_optimizer=true"],
}


def _layouts_of(model: str) -> tuple[str, ...]:
    name, gpas = MODELS[model]
    if name in PAPER_SCHEMES or model in RESUME_MODELS:
        return tuple(LAYOUTS)
    if name in ("osp", "dyt", "bhyt") and gpas:
        return ("tp2_sp", "pp2_vp2", "dp2_distopt")
    return ("tp2_sp", "pp2_vp2")


RUNS = [(model, layout) for model in MODELS for layout in _layouts_of(model)]

# Tolerances: the layouts reduce the same fp32 numbers in another order, so they agree to
# rounding, not bitwise. Observed on CPU over all 48 layout runs (3 steps) and the 4 resumes:
#   loss rel 9e-8, global grad norm rel 1.3e-6 (sandwich, TP2+SP),
#   gate grad norm rel 1.2e-5 and α abs 1.2e-7: dL/dα = −act'(α)·Σ g⊙x is a sum of terms
#   ~100× larger than the result, so its rounding noise is amplified accordingly
#   (|α| >= 3e-3 after 3 steps, each step moves it by ~1e-3);
#   parameter checksums (gates excluded, they are compared through α), over two different
#   initial draws of train.seed 42 (before and after model/init.py's layout-invariant init):
#   Σw 1.3e-6 of Σ|w| and Σw² rel 1.1e-6 (both Pre-RMSNorm's norm biases under TP2+SP, where
#   Adam divides gradients of opposite signs over the steps); update size Σ(w − w₀)² rel 4e-6
#   for every tensor, and up to 1 fp32 spacing of its value for a scalar (OSP's g, DyT's α,
#   BHyT's λ): a scalar whose steps cancel out moves only ~1000 spacings in 3 steps.
# The bounds leave a margin of 4-20× over that.
LOSS_RTOL = 1e-6
NORM_RTOL = 1e-5
GATE_NORM_RTOL = 1e-4
ALPHA_ATOL = 1e-6
# BHyT's tanh norms make the last layer's gate gradient a small difference of large terms: the
# layouts' 1e-7 rounding moves it by ~1e-4 (relative) and Adam turns that into α differences of
# up to 5.6e-6 after 3 steps (seen for bhyt_gpas and bhytstar_gpas, layer 4; every other number
# of those runs is within the bounds above). Their gate gradient norms stay within GATE_NORM_RTOL.
ALPHA_ATOL_OF = {"bhyt_gpas": 2e-5, "bhytstar_gpas": 2e-5}
SUM_TOL = 1e-5  # |ΔΣw| <= SUM_TOL · Σ|w|
SUMSQ_RTOL = 1e-5  # Σw²
# fp32 weights are known to their spacing, 2^-23 of their magnitude (to within 2×): the update size
# Σ(w − w₀)² of a parameter is compared within MOVED_RTOL plus MOVED_SPACINGS spacings of every
# element (|ΔΣ(w − w₀)²| <= 2·sqrt(Σ(w − w₀)²)·MOVED_SPACINGS·2^-23·sqrt(Σw²)), and every parameter
# must move by at least MIN_UPDATE_SPACINGS spacings (RMS over its elements) in 3 steps, so the
# comparison is of updates, not of rounding.
FP32_SPACING = 2.0 ** -23
MOVED_RTOL = 1e-4
MOVED_SPACINGS = 4
MIN_UPDATE_SPACINGS = 100
MIN_GATE = 2e-4  # |α| of every gate after 3 steps (200× ALPHA_ATOL)

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


# --------------------------------------------------------------------------- launching


def _model_overrides(model: str) -> list[str]:
    scheme, gpas = MODELS[model]
    extra = [*SCHEME_OVERRIDES[scheme], f"gpas.enabled={'true' if gpas else 'false'}"]
    if scheme == "mixln":
        extra.append(f"norm.mixln_post_layers={MIXLN_POST_LAYERS}")
    if scheme == "lns":
        extra.append(f"norm.lns_mode={'fixed' if gpas else 'init'}")
    return extra


def _overrides(ws: Path, model: str, run: str, *extra: str) -> list[str]:
    return [
        "model.preset=tiny", "model.vocab_size=256", "model.make_vocab_size_divisible_by=64",
        *_model_overrides(model), "gpas.clip_grad=0.0",
        f"train.steps={STEPS}", "train.seq_length=32", "train.micro_batch_size=2",
        f"train.global_batch_size={GLOBAL_BATCH}", "train.eval_interval=0", "train.eval_iters=1",
        "optim.lr=3.0e-3", "optim.warmup_steps=0", f"optim.clip_grad={CLIP_GRAD_OF.get(model, CLIP_GRAD)!r}",
        *synthetic_run_overrides(ws, ws / "runs" / model / run),
        *extra,
    ]


def _from_init(ws: Path, model: str) -> list[str]:
    return [f"checkpoint.load='{ws / 'ckpt_init' / model}'", "checkpoint.load_optimizer=false"]


def _step2_checkpoint(ws: Path, model: str) -> Path:
    return ws / "ckpt_pp2" / model / f"iter_{SAVE_AT:07d}"


def _resume_from_pp2(ws: Path, model: str) -> list[str]:
    return [f"checkpoint.load='{_step2_checkpoint(ws, model)}'"]


@pytest.fixture(scope="module")
def single(workspace) -> dict:
    """Launch A (one process): step-0 checkpoints and 1-process references."""
    ws = workspace
    cases = [{"name": "dataset", "kind": "dataset", "prefix": str(ws / "data" / "synthetic")}]
    for model in MODELS:
        cases.append({"name": f"{model}/init", "kind": "save_init",
                      "overrides": _overrides(ws, model, "init", f"checkpoint.save='{ws / 'ckpt_init' / model}'")})
        cases.append({"name": f"{model}/reference", "kind": "train", "checksums": True, "structure": True,
                      "overrides": _overrides(ws, model, "reference", *_from_init(ws, model))})
        if MODELS[model][0] in NEW_SCHEMES:  # steps 1-2 saved, then resumed for 3-4 (same layout)
            save = f"checkpoint.save='{ws / 'ckpt_half' / model}'"
            cases.append({"name": f"{model}/first_half", "kind": "train",
                          "overrides": _overrides(ws, model, "first_half", *_from_init(ws, model), save,
                                                  f"train.exit_after_steps={SAVE_AT}")})
            cases.append({"name": f"{model}/second_half", "kind": "train", "checksums": True,
                          "overrides": _overrides(ws, model, "second_half",
                                                  f"checkpoint.load='{ws / 'ckpt_half' / model}'")})
    return _launch(ws, "schemes_single", 1, cases, timeout=420)[0]["cases"]


@pytest.fixture(scope="module")
def multi(workspace, single) -> list[dict]:
    """Launch B (two processes); one results dict per rank."""
    ws = workspace
    cases = []
    for model, layout in RUNS:
        extra = [*LAYOUTS[layout], *_from_init(ws, model), f"train.exit_after_steps={EQUIV_STEPS}"]
        if layout == "pp2" and model in RESUME_MODELS:
            extra += [f"checkpoint.save='{ws / 'ckpt_pp2' / model}'", f"checkpoint.save_interval={SAVE_AT}"]
        cases.append({"name": f"{model}/{layout}", "kind": "train", "checksums": True, "structure": True,
                      "sp_audit": layout == "tp2_sp", "overrides": _overrides(ws, model, layout, *extra)})
    for model in FROZEN_AUDITS:
        cases.append({"name": f"{model}/frozen_audit", "kind": "audit",
                      "overrides": _overrides(ws, model, "frozen_audit", *LAYOUTS["tp2_sp"], "gpas.freeze=true")})
    for model in RESUME_MODELS:
        cases.append({"name": f"{model}/resume_tp2_sp", "kind": "train", "checksums": True,
                      "overrides": _overrides(ws, model, "resume_tp2_sp", *LAYOUTS["tp2_sp"],
                                              *_resume_from_pp2(ws, model))})
    return [r["cases"] for r in _launch(ws, "schemes_multi", 2, cases, timeout=600)]


@pytest.fixture(scope="module")
def resumed_tp1(workspace, multi) -> dict:
    """Launch C (one process): B's PP=2 step-2 checkpoints resumed at TP=1."""
    ws = workspace
    cases = [{"name": f"{model}/resume_tp1", "kind": "train", "checksums": True,
              "overrides": _overrides(ws, model, "resume_tp1", *_resume_from_pp2(ws, model))}
             for model in RESUME_MODELS]
    return _launch(ws, "schemes_resume", 1, cases, timeout=300)[0]["cases"]


# --------------------------------------------------------------------------- helpers


def _merge_checksums(per_rank: list[dict]) -> dict[str, tuple]:
    """Global (Σw, Σw², Σ|w|, Σ(w − w₀)², numel) per parameter from the ranks' shares
    (see parallel_worker._param_checksums): tensor-parallel shards partition the global
    tensor, everything else is replicated over TP."""
    shards: dict[str, dict[int, list]] = {}
    for share in per_rank:
        if not share:  # data-parallel rank > 0
            continue
        for name, values in share["values"].items():
            shards.setdefault(name, {})
            assert share["tp_rank"] not in shards[name], f"{name} reported twice by TP rank {share['tp_rank']}"
            shards[name][share["tp_rank"]] = values
    merged = {}
    for name, by_tp in shards.items():
        first = by_tp[min(by_tp)]
        if first[5]:  # tensor-parallel
            merged[name] = tuple(sum(by_tp[r][i] for r in sorted(by_tp)) for i in range(5))
        else:
            # replicated over TP: every TP rank applied the same reduced update, bitwise
            for r, other in by_tp.items():
                assert other[:5] == first[:5], f"{name}: TP rank {r} holds {other[:5]}, TP rank 0 {first[:5]}"
            merged[name] = tuple(first[:5])
    return merged


def _checksum_mismatches(got: dict, want: dict, what: str, moved: bool = True) -> list[str]:
    """Σw within SUM_TOL·Σ|w|, Σw² within SUMSQ_RTOL, and (``moved``) the update size
    Σ(w − w₀)² within MOVED_RTOL and MOVED_SPACINGS; gates are left to the per-step α comparison."""
    problems = []
    if set(got) != set(want):
        return [f"{what}: parameter sets differ: only here {sorted(set(got) - set(want))}, "
                f"only in the reference {sorted(set(want) - set(got))}"]
    for name in sorted(want):
        if name.endswith("gpas.alpha"):
            continue
        (s, q, _, m, n), (ws, wq, wa, wm, wn) = got[name], want[name]
        if n != wn:
            problems.append(f"{what}: {name} has {n} elements vs {wn}")
        if abs(s - ws) > SUM_TOL * wa:
            problems.append(f"{what}: {name} Σw {s!r} vs {ws!r} (diff {s - ws:.3e}, Σ|w| {wa:.3e})")
        if not _close(q, wq, SUMSQ_RTOL, 0.0):
            problems.append(f"{what}: {name} Σw² {q!r} vs {wq!r} (rel diff {(q - wq) / wq:.3e})")
        resolution = 2 * math.sqrt(wm) * MOVED_SPACINGS * FP32_SPACING * math.sqrt(wq)
        if moved and not _close(m, wm, MOVED_RTOL, resolution):
            problems.append(f"{what}: {name} Σ(w − w₀)² {m!r} vs {wm!r} (rel diff {(m - wm) / max(wm, 1e-300):.3e})")
    return problems


def _record_mismatches(run: list[dict], ref: list[dict], gpas: bool, alpha_atol: float = ALPHA_ATOL) -> list[str]:
    problems = []
    for r, q in zip(run, ref):
        step = r["step"]
        if not _close(r["loss"], q["loss"], LOSS_RTOL, 0.0):
            problems.append(f"step {step}: loss {r['loss']!r} vs {q['loss']!r}")
        if not _close(r["grad_norm"], q["grad_norm"], NORM_RTOL, 0.0):
            problems.append(f"step {step}: grad_norm {r['grad_norm']!r} vs {q['grad_norm']!r}")
        if gpas and not _close(r["gate_grad_norm"], q["gate_grad_norm"], GATE_NORM_RTOL, 0.0):
            problems.append(f"step {step}: gate_grad_norm {r['gate_grad_norm']!r} vs {q['gate_grad_norm']!r}")
        if len(r["alpha"]) != len(q["alpha"]):
            problems.append(f"step {step}: {len(r['alpha'])} gates vs {len(q['alpha'])}")
        for layer, (a, b) in enumerate(zip(r["alpha"], q["alpha"]), start=1):
            if not _close(a, b, 0.0, alpha_atol):
                problems.append(f"step {step}: alpha layer {layer} {a!r} vs {b!r}")
    return problems


def _layout_run_mismatches(runs: list[dict], ref: list[dict], gpas: bool) -> list[str]:
    """A run from the same start in another layout (``runs``: its ranks' results) against the 1-process
    records of the same steps (``ref``): per-step numbers and the weights after the last step."""
    problems = _record_mismatches(runs[0]["records"], ref, gpas=gpas)
    problems += _checksum_mismatches(_merge_checksums([c["records"][-1]["checksums"] for c in runs]),
                                     _merge_checksums([ref[-1]["checksums"]]), f"weights after step {ref[-1]['step']}")
    return problems


def _resumed_run_mismatches(runs: list[dict], ref: list[dict], gpas: bool) -> list[str]:
    """A checkpoint resumed in another layout (``runs``: its ranks' results) against the uninterrupted
    run's records from the same step (``ref``): per-step numbers, the learning rate, and the weights
    after the last step (not Σ(w − w₀)²: the resumed run's w₀ is the checkpoint's)."""
    problems = _record_mismatches(runs[0]["records"], ref, gpas=gpas)
    problems += [f"step {r['step']}: lr {r['lr']} vs {q['lr']}" for r, q in zip(runs[0]["records"], ref) if r["lr"] != q["lr"]]
    problems += _checksum_mismatches(_merge_checksums([c["records"][-1]["checksums"] for c in runs]),
                                     _merge_checksums([ref[-1]["checksums"]]), f"weights after step {ref[-1]['step']}",
                                     moved=False)
    return problems


def _without_checksums(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "checksums"} for r in records]


def _expected_slot(model: str, layer: int) -> dict:
    """The scheme definitions of model/schemes/, stated independently for one layer (the
    norm-replacement schemes are pre-norm hosts with GPAS after the add)."""
    scheme, gpas = MODELS[model]
    post = scheme in ("post", "deepnorm") or (scheme == "mixln" and layer <= MIXLN_POST_LAYERS)
    lns_factor = 1.0 / math.sqrt(layer) if scheme == "lns" else 1.0
    return {
        "deferred": post,
        "post_norm": post,
        "output_scale": lns_factor if (scheme == "lns" and gpas) else 1.0,  # lns_mode=fixed with GPAS
        "norm_weight_mean": lns_factor if (scheme == "lns" and not gpas) else 1.0,  # lns_mode=init
        "shortcut_scale": (2 * NUM_LAYERS) ** 0.25 if scheme == "deepnorm" else 1.0,
        "branch_norm": scheme == "sandwich",
        "norm_gate": None,
        "residual_gate": ("shortcut" if post else "after_add") if gpas else None,
    }


# --------------------------------------------------------------------------- 1. references


@pytest.mark.parametrize("model", list(MODELS))
def test_reference_run_is_informative(model, single):
    """The 1-process reference: right structure, every compared quantity actually moves,
    the global clip bites at every step."""
    scheme, gpas = MODELS[model]
    case = single[f"{model}/reference"]
    structure = case["structure"]
    assert sorted(structure, key=int) == [str(l) for l in range(1, NUM_LAYERS + 1)]
    for layer, info in structure.items():
        assert info["gate"] is gpas and info["gate_learnable"] is (True if gpas else None)
        for sublayer, slot in enumerate(info["slots"]):
            got = {k: slot[k] for k in _expected_slot(model, int(layer))}
            want = _expected_slot(model, int(layer))
            for key in ("output_scale", "norm_weight_mean", "shortcut_scale"):
                assert math.isclose(got.pop(key), want.pop(key), rel_tol=1e-6), (model, layer, sublayer, key)
            assert got == want, (model, layer, sublayer)
            assert slot["sublayer"] == sublayer

    records = case["records"]
    assert case["start_step"] == 0 and [r["step"] for r in records] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in records]
    assert all(math.isfinite(x) for x in losses) and len({round(x, 6) for x in losses}) == STEPS, losses
    for r in records:
        assert r["updated"]
        assert r["grad_norm"] > 1.2 * CLIP_GRAD_OF.get(model, CLIP_GRAD), f"{model}: global clip inactive at step {r['step']}: {r['grad_norm']}"
        if gpas:
            assert r["gate_grad_norm"] > 0 and len(r["alpha"]) == NUM_LAYERS
        else:
            assert r["gate_grad_norm"] == 0.0 and r["alpha"] == []
    if gpas:  # the gates moved far beyond ALPHA_ATOL by the last compared step
        assert all(abs(a) > MIN_GATE for a in records[EQUIV_STEPS - 1]["alpha"]), records[EQUIV_STEPS - 1]["alpha"]
    # every parameter moved clearly (the gates: see above): the checksum comparisons mean something
    end = _merge_checksums([records[EQUIV_STEPS - 1]["checksums"]])
    spacings = {name: math.sqrt(v[3] / v[1]) / FP32_SPACING for name, v in end.items()}  # RMS update / spacing
    still = {name: n for name, n in spacings.items() if n < MIN_UPDATE_SPACINGS and not name.endswith("gpas.alpha")}
    assert not still, f"{model}: updates after {EQUIV_STEPS} steps below {MIN_UPDATE_SPACINGS} fp32 spacings: {still}"
    start = _merge_checksums([case["start_checksums"]])
    assert set(start) == set(end) and all(v[3] == 0.0 for v in start.values())
    if scheme == "sandwich":
        assert sum("branch_norm" in n for n in start) == 2 * NUM_LAYERS


@pytest.mark.parametrize("model", [m for m in MODELS if MODELS[m][0] in NEW_SCHEMES])
def test_resume_is_bitwise(model, single):
    """Steps 3-4 after a save at step 2 and a resume (optimizer, scheduler, RNG and every
    scheme buffer, e.g. BHyT's c_attn, from the checkpoint) equal the uninterrupted run exactly."""
    reference = single[f"{model}/reference"]["records"]
    resumed = single[f"{model}/second_half"]
    assert resumed["start_step"] == SAVE_AT
    assert [r["step"] for r in resumed["records"]] == [SAVE_AT + 1, STEPS]
    for r, q in zip(resumed["records"], reference[SAVE_AT:]):
        assert {k: v for k, v in r.items() if k != "checksums"} == \
            {k: v for k, v in q.items() if k != "checksums"}, f"{model} step {r['step']}"
    got = _merge_checksums([resumed["records"][-1]["checksums"]])
    want = _merge_checksums([reference[-1]["checksums"]])
    assert {k: v[:3] for k, v in got.items()} == {k: v[:3] for k, v in want.items()}  # Σw, Σw², Σ|w| bitwise


# --------------------------------------------------------------------------- 2. equivalence


@pytest.mark.parametrize("model,layout", RUNS)
def test_layout_matches_single_process(model, layout, single, multi):
    _, gpas = MODELS[model]
    reference = single[f"{model}/reference"]
    ref = reference["records"][:EQUIV_STEPS]
    name = f"{model}/{layout}"
    case = multi[0][name]
    run = case["records"]
    assert case["start_step"] == 0 and case["world_size"] == 2
    assert [r["step"] for r in run] == list(range(1, EQUIV_STEPS + 1))
    for other in multi[1:]:  # every rank saw the same (globally reduced) numbers
        assert _without_checksums(other[name]["records"]) == _without_checksums(run)

    # each rank built its layers as the 1-process run did (global layer numbers), and together
    # the ranks hold every layer
    held = set()
    for rank, cases in enumerate(multi):
        for layer, info in cases[name]["structure"].items():
            assert info == reference["structure"][layer], f"rank {rank} layer {layer} built differently"
            held.add(layer)
    assert held == set(reference["structure"])

    problems = _record_mismatches(run, ref, gpas, ALPHA_ATOL_OF.get(model, ALPHA_ATOL))
    problems += _checksum_mismatches(_merge_checksums([c[name]["start_checksums"] for c in multi]),
                                     _merge_checksums([reference["start_checksums"]]), "loaded step-0 weights",
                                     moved=False)
    problems += _checksum_mismatches(_merge_checksums([c[name]["records"][-1]["checksums"] for c in multi]),
                                     _merge_checksums([ref[-1]["checksums"]]), f"weights after step {EQUIV_STEPS}")
    assert not problems, f"{name} differs from 1 process:\n  " + "\n  ".join(problems)


# --------------------------------------------------------------------------- 3. SP tagging


def _check_sp_audit(model: str, audit: dict, rank: int, frozen: bool = False) -> None:
    scheme, gpas = MODELS[model]
    assert audit["config_sequence_parallel"] is True
    assert any("word_embeddings" in n for n in audit["tensor_parallel"]), audit["tensor_parallel"]
    assert any("output_layer" in n for n in audit["tensor_parallel"]), audit["tensor_parallel"]
    checked = audit["checked"]
    assert sum("gpas.alpha" in n for n in checked) == (NUM_LAYERS if gpas else 0), checked
    assert sum("branch_norm" in n for n in checked) == (2 * NUM_LAYERS if scheme == "sandwich" else 0), checked
    assert sum(n.endswith("layernorm.weight") for n in checked) == 2 * NUM_LAYERS + 1, checked  # 2 per layer + final
    assert not audit["offenders"], (
        f"{model}{' (frozen gates)' if frozen else ''} rank {rank}: replicated (non tensor-parallel) "
        f"parameters lack sequence_parallel=True under SP: {audit['offenders']}")


@pytest.mark.parametrize("model", list(MODELS))
def test_sequence_parallel_tags_every_replicated_parameter(model, multi):
    for rank, cases in enumerate(multi):
        _check_sp_audit(model, cases[f"{model}/tp2_sp"]["sp_audit"], rank)


@pytest.mark.parametrize("model", FROZEN_AUDITS)
def test_sequence_parallel_tags_frozen_gates(model, multi):
    for rank, cases in enumerate(multi):
        case = cases[f"{model}/frozen_audit"]
        assert all(info["gate"] and info["gate_learnable"] is False for info in case["structure"].values())
        _check_sp_audit(model, case["sp_audit"], rank, frozen=True)


# --------------------------------------------------------------------------- 4. resume across layouts


@pytest.mark.parametrize("target", ["tp2_sp", "tp1"])
@pytest.mark.parametrize("model", RESUME_MODELS)
def test_resume_pp2_checkpoint_under_other_layout(model, target, workspace, single, multi, resumed_tp1):
    """A PP=2 step-2 checkpoint (optimizer and scheduler state included) resumed under
    TP=2+SP or in one process continues the uninterrupted 1-process run: steps 3-4 within
    the layout tolerances (loss rel 1e-6, global grad norm rel 1e-5, gate grad norm rel 1e-4,
    α abs 1e-6, LR exact, final Σw and Σw² of every non-gate parameter as above)."""
    _, gpas = MODELS[model]
    assert (_step2_checkpoint(workspace, model) / "metadata.json").is_file()
    reference = single[f"{model}/reference"]
    ref = reference["records"][SAVE_AT:]
    name = f"{model}/resume_{target}"
    per_rank = [c[name] for c in multi] if target == "tp2_sp" else [resumed_tp1[name]]
    case = per_rank[0]
    assert case["start_step"] == SAVE_AT and case["start_consumed"] == SAVE_AT * GLOBAL_BATCH
    assert case["end_step"] == STEPS
    run = case["records"]
    assert [r["step"] for r in run] == list(range(SAVE_AT + 1, STEPS + 1))
    problems = _record_mismatches(run, ref, gpas, ALPHA_ATOL_OF.get(model, ALPHA_ATOL))
    problems += [f"step {r['step']}: lr {r['lr']!r} vs {q['lr']!r}" for r, q in zip(run, ref) if r["lr"] != q["lr"]]
    problems += _checksum_mismatches(_merge_checksums([c["records"][-1]["checksums"] for c in per_rank]),
                                     _merge_checksums([ref[-1]["checksums"]]), f"weights after step {STEPS}",
                                     moved=False)  # w₀ = the step-2 weights here, step 0 there
    assert not problems, f"{name}: resume of the PP=2 checkpoint diverges:\n  " + "\n  ".join(problems)
