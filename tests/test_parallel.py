"""Real multi-process (gloo, CPU) runs: parallel layouts against one process, clipping
semantics, sequence-parallel tagging, resume (same and different layout) and crash-safe saves.

Two launches do all the work (tests/parallel_worker.py runs several cases per launch):
  A. one process: dataset, the step-0 checkpoint every run starts from, the 1-process
     reference (6 steps), a 3+3 interrupted/resumed run, a save that dies mid-way; the initial
     weights of INIT_MODELS (and of the default model with another train.seed);
  B. ``torchrun --nproc-per-node 2``: TP=2+SP, PP=2, PP=2×VP=2, DP=2+distributed optimizer
     (4 steps each from the same step-0 weights), a resume of A's step-3 checkpoint under
     TP=2+SP, and the distributed-optimizer state reload error on CPU; the initial weights of
     INIT_MODELS under TP=2+SP, PP=2 and PP=2×VP=2.

Every run loads the step-0 checkpoint weights-only (checkpoint.load_optimizer=false, which
the distributed optimizer on CPU needs anyway), uses the same data, and trains with both
clips active: optim.clip_grad=0.5 (pre-clip global norms are ~1) and gpas.clip_grad=1e-4
(pre-clip gate norms are 3.5e-4 and more, 1.7e-4 and more after the global clip).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from synthetic import synthetic_run_overrides

TESTS_DIR = Path(__file__).resolve().parent
WORKER = TESTS_DIR / "parallel_worker.py"

CLIP_GRAD = 0.5
GATE_CLIP_GRAD = 1e-4
STEPS = 6  # the LR schedule of every run spans 6 steps
EQUIV_STEPS = 4  # parallel layouts stop after 4 (train.exit_after_steps)
RESUME_AT = 3
NUM_LAYERS = 4

# Tolerances. Parallel layouts reduce the same fp32 numbers in a different order
# (TP-split matmuls, SP/DP/PP all-reduces), so they agree to rounding, not bitwise.
# Observed on CPU (4 steps, all layouts): loss rel 2e-8, global grad norm rel 5e-7,
# gate grad norm rel 3e-6 (TP2+SP: the gate grads are SP partial sums), α abs 2e-8
# (α itself is ~1e-3 after 4 steps, moving ~1e-3 per step).
LOSS_RTOL, LOSS_ATOL = 1e-6, 0.0
NORM_RTOL, NORM_ATOL = 1e-5, 0.0
# The gate gradient sums terms ~100x larger than the result, so its rounding noise is
# amplified (up to 1.2e-5 seen in the all-schemes runs): a looser bound for it.
GATE_NORM_RTOL = 1e-4
ALPHA_RTOL, ALPHA_ATOL = 1e-5, 1e-6  # 1.4e-7 seen on other data (DP2+DistOpt)
POST_CLIP_RTOL = 2e-6  # post-clip norm vs the value predicted from the pre-clip norms (fp32 re-reduction)

LAYOUTS = {
    "tp2_sp": ["parallel.tensor=2", "parallel.sequence_parallel=true"],
    "pp2": ["parallel.pipeline=2"],
    "pp2_vp2": ["parallel.pipeline=2", "parallel.virtual_pipeline=2"],
    "dp2_distopt": ["parallel.distributed_optimizer=true"],
}

# Initial weights must not depend on the layout (megatron_gpas/model/init.py): the default model,
# DeepNorm with its β-init (a TP-sharded redraw inside each layer) and OSP (replicated random
# projections after the embedding and before the head), each saved at step 0 from a fresh build.
INIT_MODELS = {
    "pre_gpas": [],
    "deepnorm_beta": ["norm.scheme=deepnorm", "norm.deepnorm_beta_init=true"],
    "osp": ["norm.scheme=osp"],
}
INIT_LAYOUTS = ("tp2_sp", "pp2", "pp2_vp2")
OTHER_SEED = 7  # train.seed of one more 1-process build of the default model (the base runs use 42)

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


# --------------------------------------------------------------------------- launching


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")}
    env["OMP_NUM_THREADS"] = str(threads)
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _launch(workdir: Path, name: str, nproc: int, cases: list[dict], timeout: int) -> list[dict]:
    spec_path = workdir / f"{name}_spec.json"
    out_pattern = str(workdir / f"{name}_results_{{rank}}.json")
    spec_path.write_text(json.dumps({"out": out_pattern, "cases": cases}))
    for attempt in range(2):  # a second try only if the picked port was taken meanwhile
        if nproc == 1:
            cmd = [sys.executable, str(WORKER), str(spec_path)]
        else:
            torchrun = Path(sys.executable).with_name("torchrun")
            launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
            cmd = [*launcher, "--nnodes=1", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
                   f"--master-port={_free_port()}", str(WORKER), str(spec_path)]
        proc = subprocess.run(cmd, cwd=TESTS_DIR.parent, env=_child_env(max(1, 2 // nproc)),
                              capture_output=True, text=True, timeout=timeout)
        output = proc.stdout + proc.stderr
        if proc.returncode == 0 or "address already in use" not in output.lower() or attempt == 1:
            break
    (workdir / f"{name}.log").write_text(output)
    results = []
    for rank in range(nproc):
        path = Path(out_pattern.format(rank=rank))
        results.append(json.loads(path.read_text()) if path.exists() else {})
    if proc.returncode != 0:
        errors = "\n".join(r.get("error", "") for r in results if r.get("error"))
        pytest.fail(f"launch {name} ({nproc} processes) failed with rc {proc.returncode}\n{errors}\n"
                    f"--- output tail ---\n{output[-6000:]}")
    return results


def _overrides(ws: Path, run: str, *extra: str) -> list[str]:
    return [
        "model.preset=tiny", "model.vocab_size=256", "model.make_vocab_size_divisible_by=64",
        "gpas.enabled=true", f"gpas.clip_grad={GATE_CLIP_GRAD!r}",
        f"train.steps={STEPS}", "train.seq_length=64", "train.micro_batch_size=2", "train.global_batch_size=8",
        "train.eval_interval=0", "train.eval_iters=1",
        "optim.lr=3.0e-3", "optim.warmup_steps=2", f"optim.clip_grad={CLIP_GRAD!r}",
        *synthetic_run_overrides(ws, ws / "runs" / run),
        *extra,
    ]


def _init_case(ws: Path, model: str, layout: str, *extra: str) -> dict:
    """Save the step-0 weights of a fresh build of ``model`` in ``layout`` (no checkpoint loaded)."""
    root = ws / "init_weights" / model / layout
    return {"name": f"init/{model}/{layout}", "kind": "save_init",
            "overrides": _overrides(ws, f"init_{model}_{layout}", *INIT_MODELS[model], *extra,
                                    f"checkpoint.save='{root}'")}


@pytest.fixture(scope="module")
def single(workspace) -> dict:
    """Launch A (one process)."""
    ws = workspace
    from_init = [f"checkpoint.load='{ws / 'ckpt_init'}'", "checkpoint.load_optimizer=false"]
    cases = [
        {"name": "dataset", "kind": "dataset", "prefix": str(ws / "data" / "synthetic")},
        {"name": "init", "kind": "save_init", "overrides": _overrides(ws, "init", f"checkpoint.save='{ws / 'ckpt_init'}'")},
        {"name": "reference", "kind": "train", "overrides": _overrides(ws, "reference", *from_init)},
        {"name": "resume_part1", "kind": "train",
         "overrides": _overrides(ws, "resume1", *from_init, f"train.exit_after_steps={RESUME_AT}",
                                 f"checkpoint.save='{ws / 'ckpt_resume'}'")},
        {"name": "resume_part2", "kind": "train",
         "overrides": _overrides(ws, "resume2", f"checkpoint.load='{ws / 'ckpt_resume'}'",
                                 f"checkpoint.save='{ws / 'ckpt_crash'}'")},
        {"name": "crash_save", "kind": "crash_save", "root": str(ws / "ckpt_crash"),
         "overrides": _overrides(ws, "crash", f"checkpoint.load='{ws / 'ckpt_crash'}'",
                                 f"checkpoint.save='{ws / 'ckpt_crash'}'")},
        *[_init_case(ws, model, "single") for model in INIT_MODELS if model != "pre_gpas"],  # "init" is pre_gpas
        _init_case(ws, "pre_gpas", "other_seed", f"train.seed={OTHER_SEED}"),
    ]
    return _launch(ws, "single", 1, cases, timeout=300)[0]["cases"]


@pytest.fixture(scope="module")
def multi(workspace, single) -> list[dict]:
    """Launch B (two processes); needs A's checkpoints. One results dict per rank."""
    ws = workspace
    from_init = [f"checkpoint.load='{ws / 'ckpt_init'}'", "checkpoint.load_optimizer=false"]
    cases = []
    for name, layout in LAYOUTS.items():
        case = {"name": name, "kind": "train",
                "overrides": _overrides(ws, name, *layout, *from_init, f"train.exit_after_steps={EQUIV_STEPS}")}
        if name == "tp2_sp":
            case["sp_audit"] = True
        cases.append(case)
        if name == "tp2_sp":
            cases.append({"name": "tp2_sp_resume", "kind": "train",
                          "overrides": _overrides(ws, "tp2_sp_resume", *layout,
                                                  f"checkpoint.load='{ws / 'ckpt_resume'}'")})
    cases.append({"name": "distopt_resume_error", "kind": "expect_error",
                  "overrides": _overrides(ws, "distopt_error", *LAYOUTS["dp2_distopt"],
                                          f"checkpoint.load='{ws / 'ckpt_init'}'", "checkpoint.load_optimizer=true")})
    cases += [_init_case(ws, model, layout, *LAYOUTS[layout]) for model in INIT_MODELS for layout in INIT_LAYOUTS]
    return [r["cases"] for r in _launch(ws, "multi", 2, cases, timeout=420)]


# --------------------------------------------------------------------------- helpers


def _close(a: float, b: float, rtol: float, atol: float) -> bool:
    return abs(a - b) <= atol + rtol * abs(b)


def _mismatches(run: list[dict], ref: list[dict], key: str, rtol: float, atol: float) -> list[str]:
    return [f"step {r['step']}: {key} {r[key]!r} vs reference {q[key]!r} (diff {r[key] - q[key]:.3e})"
            for r, q in zip(run, ref) if not _close(r[key], q[key], rtol, atol)]


# --------------------------------------------------------------------------- 1. equivalence


def test_reference_clips_are_active(single):
    """Both clips must bite at every compared step, or the equivalence below proves little."""
    records = single["reference"]["records"]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records[:EQUIV_STEPS]:
        assert r["updated"]
        assert r["grad_norm"] > 1.5 * CLIP_GRAD, f"global clip inactive at step {r['step']}: {r['grad_norm']}"
        c1 = min(1.0, CLIP_GRAD / (r["grad_norm"] + 1e-6))
        assert r["gate_grad_norm"] * c1 > 1.5 * GATE_CLIP_GRAD, \
            f"gate clip inactive at step {r['step']}: {r['gate_grad_norm']} (after global clip x{c1:.3g})"
    # the logged history agrees with the recorded step results
    history: dict[int, dict] = {}
    for h in single["reference"]["history"]:  # train and eval scalars of a step are separate entries
        history.setdefault(h["step"], {}).update(h)
    for r in records:
        h = history[r["step"]]
        assert h["train/loss"] == r["loss"] and h["train/grad_norm"] == r["grad_norm"]
        assert h["train/gate_grad_norm"] == r["gate_grad_norm"]
        assert [h[f"gpas/alpha/layer_{l}"] for l in range(1, NUM_LAYERS + 1)] == r["alpha"]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parallel_layout_matches_single_process(layout, single, multi):
    ref = single["reference"]["records"][:EQUIV_STEPS]
    case = multi[0][layout]
    run = case["records"]
    assert case["start_step"] == 0 and case["world_size"] == 2
    assert [r["step"] for r in run] == list(range(1, EQUIV_STEPS + 1))
    # every rank saw the same (globally reduced) numbers
    for other in multi[1:]:
        assert other[layout]["records"] == run
    problems = (_mismatches(run, ref, "loss", LOSS_RTOL, LOSS_ATOL)
                + _mismatches(run, ref, "grad_norm", NORM_RTOL, NORM_ATOL)
                + _mismatches(run, ref, "gate_grad_norm", GATE_NORM_RTOL, NORM_ATOL))
    for r, q in zip(run, ref):
        for layer, (a, b) in enumerate(zip(r["alpha"], q["alpha"]), start=1):
            if not _close(a, b, ALPHA_RTOL, ALPHA_ATOL):
                problems.append(f"step {r['step']}: alpha layer {layer} {a!r} vs reference {b!r}")
    # the gates did move (so comparing them checks the clipped gate updates)
    assert all(abs(a) > 1e-4 for a in run[-1]["alpha"]), run[-1]["alpha"]
    assert not problems, f"{layout} differs from 1 process:\n  " + "\n  ".join(problems)


# --------------------------------------------------------------------------- 1b. initial weights


def _initial_weights(single: dict, multi: list[dict], model: str, layout: str) -> dict:
    """The model tensors of a step-0 checkpoint (global, unsharded, keyed by global names)."""
    from megatron_gpas.hf.dcp_reader import CheckpointReader

    if (model, layout) == ("pre_gpas", "single"):
        path = single["init"]["latest"]  # the checkpoint every run above starts from
    else:
        path = (single if layout in ("single", "other_seed") else multi[0])[f"init/{model}/{layout}"]["latest"]
    reader = CheckpointReader(path)
    return {key: reader.read(key) for key in reader.metadata if not key.startswith("optimizer.")}


@pytest.mark.parametrize("model", list(INIT_MODELS))
def test_initial_weights_are_the_same_in_every_layout(model, single, multi):
    """The same train.seed gives bit-identical initial weights under TP=2+SP, PP=2 and
    PP=2×VP=2 as in one process: every stage builds its parameters from streams of their own."""
    reference = _initial_weights(single, multi, model, "single")
    assert {"embedding.word_embeddings.weight", "output_layer.weight",
            "decoder.layers.self_attention.linear_qkv.weight"} <= set(reference), sorted(reference)
    if model == "osp":
        assert {"embedding_transform.weight", "head_transform.weight"} <= set(reference), sorted(reference)
    for layout in INIT_LAYOUTS:
        weights = _initial_weights(single, multi, model, layout)
        assert set(weights) == set(reference), (layout, set(weights) ^ set(reference))
        differ = [key for key, value in reference.items() if not torch.equal(weights[key], value)]
        assert not differ, f"{model}: initial weights under {layout} differ from 1 process: {differ}"


def test_initial_weights_come_from_the_seed_one_stream_per_layer(single, multi):
    """Guards the comparison above against trivial agreement: the random weights change with
    train.seed, and no two layers (or the embedding and the head) draw the same values."""
    weights = _initial_weights(single, multi, "pre_gpas", "single")
    other = _initial_weights(single, multi, "pre_gpas", "other_seed")
    random_keys = [key for key, value in weights.items() if value.dim() >= 2 and value.float().std() > 0]
    assert len(random_keys) == 6, random_keys  # embedding, head; qkv, proj, fc1, fc2 (stacked)
    for key in random_keys:
        assert not torch.equal(weights[key], other[key]), f"{key} does not depend on train.seed"
        if key.startswith("decoder.layers."):  # stacked [layer, ...]
            rows = weights[key].flatten(1)
            assert all(not torch.equal(rows[i], rows[j]) for i in range(NUM_LAYERS) for j in range(i)), key
    assert not torch.equal(weights["embedding.word_embeddings.weight"].flatten()[:1000],
                           weights["output_layer.weight"].flatten()[:1000])


# --------------------------------------------------------------------------- 2. clip semantics


def _expected_post_clip(pre_total: float, pre_gate: float) -> tuple[float, float]:
    """Independent statement of the two-stage clip: all params at CLIP_GRAD, then the gates
    (already scaled by the first coefficient) jointly at GATE_CLIP_GRAD; coefficients are
    min(1, max / (norm + 1e-6)) as in torch.nn.utils.clip_grad_norm_."""
    c1 = min(1.0, CLIP_GRAD / (pre_total + 1e-6))
    gate_after_global = pre_gate * c1
    c2 = min(1.0, GATE_CLIP_GRAD / (gate_after_global + 1e-6))
    post_gate = gate_after_global * c2
    pre_main_sq = max(pre_total**2 - pre_gate**2, 0.0)
    post_total = math.sqrt(pre_main_sq * c1**2 + post_gate**2)
    return post_total, post_gate


@pytest.mark.parametrize("layout", ["reference", *LAYOUTS])
def test_two_stage_clip_semantics(layout, single, multi):
    records = single["reference"]["records"] if layout == "reference" else multi[0][layout]["records"]
    for r in records:
        pre_total, pre_gate = r["grad_norm"], r["gate_grad_norm"]
        post_total, post_gate = r["clipped_grad_norm"], r["clipped_gate_grad_norm"]
        assert post_total is not None and post_gate is not None
        exp_total, exp_gate = _expected_post_clip(pre_total, pre_gate)
        assert _close(post_total, exp_total, POST_CLIP_RTOL, 0.0), (r["step"], post_total, exp_total)
        assert _close(post_gate, exp_gate, POST_CLIP_RTOL, 0.0), (r["step"], post_gate, exp_gate)
        # The headline semantics: the total ends at min(pre, clip) and the gates at
        # min(pre_gate·c1, gate clip). Up to the 1e-6 in the coefficients (relative
        # 1e-6/norm) and, for the total, the gates' extra shrink (gates are part of it).
        c1 = min(1.0, CLIP_GRAD / (pre_total + 1e-6))
        assert post_gate <= GATE_CLIP_GRAD * (1 + 1e-6)
        # |c·n − max| = max·1e-6/(n + 1e-6) when clipping: relative 1e-6/n
        assert _close(post_gate, min(pre_gate * c1, GATE_CLIP_GRAD), 1e-6 / (pre_gate * c1) + 1e-6, 0.0)
        assert post_total <= min(pre_total, CLIP_GRAD) * (1 + 1e-6)
        gate_shrink = pre_gate * c1 / min(pre_total, CLIP_GRAD)  # bound on the gates' share
        assert _close(post_total, min(pre_total, CLIP_GRAD), 1e-6 / pre_total + gate_shrink**2 + 1e-6, 0.0)


# --------------------------------------------------------------------------- 3. SP tagging


def test_sequence_parallel_tags_every_replicated_parameter(multi):
    for rank, cases in enumerate(multi):
        audit = cases["tp2_sp"]["sp_audit"]
        assert audit["config_sequence_parallel"] is True
        # the word embedding and the output layer are TP-sharded, hence not audited
        assert any("word_embeddings" in n for n in audit["tensor_parallel"]), audit["tensor_parallel"]
        assert any("output_layer" in n for n in audit["tensor_parallel"]), audit["tensor_parallel"]
        # the replicated ones include every gate and the norms
        assert sum("alpha" in n for n in audit["checked"]) == NUM_LAYERS, audit["checked"]
        assert any("final_layernorm" in n for n in audit["checked"]), audit["checked"]
        assert not audit["offenders"], (
            f"rank {rank}: {len(audit['offenders'])} replicated (non tensor-parallel) parameters lack "
            f"sequence_parallel=True under SP: {audit['offenders']}")


# --------------------------------------------------------------------------- 4. resume


def test_resume_is_bitwise_identical(single):
    ref = single["reference"]["records"]
    part1, part2 = single["resume_part1"], single["resume_part2"]
    assert part1["summary"].get("stopped_early") is True and part1["end_step"] == RESUME_AT
    assert part2["start_step"] == RESUME_AT and part2["start_consumed"] == RESUME_AT * 8
    assert part2["end_step"] == STEPS
    resumed = part1["records"] + part2["records"]
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm", "gate_grad_norm", "lr", "alpha"):
        got, want = [r[key] for r in resumed], [r[key] for r in ref]
        assert got == want, f"{key} after resume differs from the uninterrupted run:\n{got}\n{want}"


def test_resume_tp1_checkpoint_under_tp2_sp(single, multi):
    """A TP1 step-3 checkpoint (optimizer state included) resumed under TP=2+SP continues the
    uninterrupted TP1 run: same tolerances as the layout equivalence (well below 1e-4)."""
    ref = single["reference"]["records"][RESUME_AT:]
    case = multi[0]["tp2_sp_resume"]
    assert case["start_step"] == RESUME_AT and case["start_consumed"] == RESUME_AT * 8
    assert case["end_step"] == STEPS
    run = case["records"]
    assert [r["step"] for r in run] == list(range(RESUME_AT + 1, STEPS + 1))
    problems = (_mismatches(run, ref, "loss", LOSS_RTOL, LOSS_ATOL)
                + _mismatches(run, ref, "grad_norm", NORM_RTOL, NORM_ATOL)
                + _mismatches(run, ref, "gate_grad_norm", GATE_NORM_RTOL, NORM_ATOL)
                + _mismatches(run, ref, "lr", 0.0, 0.0))
    for r, q in zip(run, ref):
        for layer, (a, b) in enumerate(zip(r["alpha"], q["alpha"]), start=1):
            if not _close(a, b, ALPHA_RTOL, ALPHA_ATOL):
                problems.append(f"step {r['step']}: alpha layer {layer} {a!r} vs reference {b!r}")
    assert not problems, "TP2+SP resume of a TP1 checkpoint diverges:\n  " + "\n  ".join(problems)


def test_distributed_optimizer_state_resume_errors_on_cpu(multi):
    for cases in multi:
        err = cases["distopt_resume_error"]
        assert err["raised"], "resuming the distributed optimizer's state on CPU should fail clearly"
        assert err["type"] == "CheckpointError"
        assert "distributed optimizer" in err["message"] and "load_optimizer=false" in err["message"]


# --------------------------------------------------------------------------- 5. crash-safe saves


def test_interrupted_save_is_never_the_resume_point(single):
    crash = single["crash_save"]
    complete = crash["latest_before"]
    assert complete is not None and complete.endswith(f"iter_{STEPS:07d}")
    assert crash["resumed_step_before"] == STEPS
    assert crash["save_raised"] == "simulated crash during checkpoint save"
    listing = crash["listing"]
    assert os.path.basename(crash["crash_partial"]) in listing  # the dead save stays a .partial ...
    assert os.path.basename(crash["crash_final"]) not in listing  # ... never renamed
    assert crash["latest_file"] == os.path.basename(complete)
    assert crash["latest_after"] == complete
    assert crash["resumed_step_after"] == STEPS and crash["resumed_consumed_after"] == STEPS * 8
    # saving that step again succeeds and replaces the stale .partial
    assert crash["latest_after_retry"] == crash["crash_final"]
    assert os.path.basename(crash["crash_partial"]) not in crash["listing_after_retry"]


def test_find_latest_skips_partial_directories(tmp_path):
    from megatron_gpas import checkpoint

    root = tmp_path / "ckpt"
    root.mkdir()
    # only an interrupted save (even one whose metadata.json got written): nothing to resume
    partial = root / "iter_0000005.partial"
    partial.mkdir()
    (partial / "metadata.json").write_text("{}")
    assert checkpoint.find_latest(str(root)) is None
    # a complete one plus a newer interrupted one: the complete one wins
    complete = root / "iter_0000003"
    complete.mkdir()
    (complete / "metadata.json").write_text("{}")
    (root / "latest").write_text("iter_0000003\n")
    (root / "iter_0000009.partial").mkdir()
    assert checkpoint.find_latest(str(root)) == str(complete)
    # a pointer to something missing or incomplete (a crash between the steps of a save):
    # fall back to the newest complete checkpoint
    (root / "latest").write_text("iter_0000004\n")
    assert checkpoint.find_latest(str(root)) == str(complete)
    (root / "iter_0000004").mkdir()  # e.g. a save whose files are not all there
    (root / "iter_0000004" / "common.pt").write_text("")
    assert checkpoint.find_latest(str(root)) == str(complete)
    # ... and with no complete checkpoint at all, an error rather than a silent fresh start
    import shutil

    shutil.rmtree(complete)
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.find_latest(str(root))
