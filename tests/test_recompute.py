"""Activation recomputation (train.recompute), the memory check before a run and the overlapped
parameter all-gather (parallel.overlap_param_gather).

Two launches of tests/parallel_worker.py (real training, gloo on CPU):
  A. one process, Mix-LN + GPAS (layer 1 Post-LN, whose deferred norm slot is the identity;
     layers 2-4 Pre-LN): no recompute (the reference), selective with every module Megatron-Core
     has for our layer (core_attn, mlp, layernorm), full (uniform groups of 1 layer) and full
     (block: the first 2 layers). Recomputation reruns the same fp32 operations on the same
     inputs, so losses, gradient norms and gates must agree bitwise.
  B. two processes: selective under TP=2+SP and full under PP=2 against A's reference (the
     parallel layouts' tolerances of tests/test_parallel.py); DP=2 with the distributed
     optimizer and overlap_grad_reduce, with and without overlap_param_gather, across an
     evaluation and a checkpoint save every 2 steps: the same numbers and the same checkpoints
     bitwise (the all-gather only moves the same values at another time).
"""

from __future__ import annotations

import re

import pytest

from synthetic import synthetic_run_overrides
from test_parallel import (ALPHA_ATOL, ALPHA_RTOL, GATE_NORM_RTOL, LOSS_ATOL, LOSS_RTOL, NORM_ATOL, NORM_RTOL, _close,
                           _launch, _mismatches)

from megatron_gpas.config import ConfigError, load_config, recompute_overrides
from megatron_gpas.model.inventory import count_parameters
from megatron_gpas.validation import validate

STEPS = 3
NUM_LAYERS = 4
SELECTIVE = ["train.recompute=selective", "train.recompute_modules=[core_attn,mlp,layernorm]"]
FULL = ["train.recompute=full"]
# bitwise like no recompute: the recomputed parts' gradients are summed in the same order
BITWISE = {
    "selective": ["train.recompute=selective", "train.recompute_modules=[core_attn,mlp]"],
    "full_uniform": FULL,
    "full_block": [*FULL, "train.recompute_method=block", "train.recompute_num_layers=2"],
}
# the recomputed norm's input gradient (the norm uses x twice) meets the residual's in another order
ROUNDED = {"selective_layernorm": ["train.recompute=selective", "train.recompute_modules=[layernorm]"]}
RECOMPUTE = {**BITWISE, **ROUNDED}
DP2_OVERLAP = ["parallel.distributed_optimizer=true", "parallel.overlap_grad_reduce=true",
               "train.eval_interval=2", "checkpoint.save_interval=2"]

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


def _overrides(ws, run: str, *extra: str) -> list[str]:
    return [
        "model.preset=tiny", "model.vocab_size=256", "model.make_vocab_size_divisible_by=64",
        "norm.scheme=mixln", "gpas.enabled=true", "gpas.clip_grad=1e-4",
        f"train.steps={STEPS}", "train.seq_length=64", "train.micro_batch_size=2", "train.global_batch_size=8",
        "train.eval_interval=0", "train.eval_iters=1", "optim.lr=3.0e-3", "optim.clip_grad=0.5",
        f"checkpoint.load='{ws / 'ckpt_init'}'", "checkpoint.load_optimizer=false",
        *synthetic_run_overrides(ws, ws / "runs" / run),
        *extra,
    ]


@pytest.fixture(scope="module")
def single(workspace) -> dict:
    ws = workspace
    cases = [
        {"name": "dataset", "kind": "dataset", "prefix": str(ws / "data" / "synthetic")},
        {"name": "init", "kind": "save_init",
         "overrides": [o for o in _overrides(ws, "init", f"checkpoint.save='{ws / 'ckpt_init'}'")
                       if not o.startswith("checkpoint.load")]},
        {"name": "none", "kind": "train", "probe_recompute": True, "overrides": _overrides(ws, "none")},
        *[{"name": name, "kind": "train", "probe_recompute": True, "overrides": _overrides(ws, name, *extra)}
          for name, extra in RECOMPUTE.items()],
        # Megatron's DotProductAttention, whose s x s scores core_attn recompute drops
        *[{"name": name, "kind": "train", "probe_recompute": True,
           "overrides": _overrides(ws, name, "model.attention=megatron", *extra)}
          for name, extra in (("megatron_none", []), ("megatron_core_attn", ["train.recompute=selective"]))],
    ]
    return _launch(ws, "recompute_single", 1, cases, timeout=300)[0]["cases"]


@pytest.fixture(scope="module")
def multi(workspace, single) -> list[dict]:
    ws = workspace
    cases = [
        {"name": "tp2_sp_selective", "kind": "train", "probe_recompute": True,
         "overrides": _overrides(ws, "tp2", "parallel.tensor=2", "parallel.sequence_parallel=true", *SELECTIVE)},
        {"name": "pp2_full", "kind": "train", "probe_recompute": True,
         "overrides": _overrides(ws, "pp2", "parallel.pipeline=2", *FULL)},
        *[{"name": name, "kind": "train",
           "overrides": _overrides(ws, name, *DP2_OVERLAP, *extra, f"checkpoint.save='{ws / ('ckpt_' + name)}'",
                                   "train.steps=4")}
          for name, extra in (("dp2_plain", []), ("dp2_overlap", ["parallel.overlap_param_gather=true"]))],
    ]
    return [r["cases"] for r in _launch(ws, "recompute_multi", 2, cases, timeout=420)]


def _numbers(case: dict) -> list[tuple]:
    return [(r["step"], r["loss"], r["grad_norm"], r["gate_grad_norm"], r["alpha"]) for r in case["records"]]


def _variances(case: dict) -> list[list[float]]:
    return [[h[f"activations/variance/layer_{l}"] for l in range(1, NUM_LAYERS + 1)]
            for h in case["history"] if "activations/variance/layer_1" in h]


# --------------------------------------------------------------------------- recomputation


def test_reference_trains(single):
    ref = single["none"]["records"]
    assert [r["step"] for r in ref] == list(range(1, STEPS + 1))
    assert all(r["updated"] for r in ref) and ref[-1]["loss"] < ref[0]["loss"]
    assert all(abs(a) > 1e-4 for a in ref[-1]["alpha"]), ref[-1]["alpha"]  # the gates moved


@pytest.mark.parametrize("mode", list(BITWISE))
def test_recompute_trains_bitwise_like_no_recompute(mode, single):
    """Same fp32 operations on the same inputs, gradients summed in the same order: every per-step
    number agrees exactly, gates and the logged layer-input variances (recorded once per layer, not
    again when recomputed) too."""
    assert _numbers(single[mode]) == _numbers(single["none"])
    assert _variances(single[mode]) == _variances(single["none"]) and len(_variances(single["none"])) == STEPS


def test_core_attn_recompute_drops_the_attention_scores(single):
    """model.attention=megatron materialises the s x s scores; with core_attn recomputed (Megatron's
    default module) they are not kept: bitwise the same training, and the bytes saved in the forward
    fall by at least the softmax probabilities (a·s²·b fp32 per layer and micro-batch). Its
    recomputation allocates on "cuda" inside the checkpoint, which the CPU runtime maps."""
    plain, recomputed = single["megatron_none"], single["megatron_core_attn"]
    assert _numbers(recomputed) == _numbers(plain)
    assert recomputed["probe"]["calls"]["core_attention"] == 2 * plain["probe"]["calls"]["core_attention"]
    heads, s, b, mb = 4, 64, 2, 4
    probabilities = heads * s * s * b * 4 * NUM_LAYERS * mb
    assert plain["probe"]["saved_bytes"] - recomputed["probe"]["saved_bytes"] >= probabilities


def _problems(run: list[dict], ref: list[dict]) -> list[str]:
    """Differences beyond the tolerances of the parallel layouts (tests/test_parallel.py)."""
    problems = (_mismatches(run, ref, "loss", LOSS_RTOL, LOSS_ATOL) + _mismatches(run, ref, "grad_norm", NORM_RTOL, NORM_ATOL)
                + _mismatches(run, ref, "gate_grad_norm", GATE_NORM_RTOL, NORM_ATOL))
    return problems + [f"step {r['step']}: alpha {a} vs {b}" for r, q in zip(run, ref)
                       for a, b in zip(r["alpha"], q["alpha"]) if not _close(a, b, ALPHA_RTOL, ALPHA_ATOL)]


def test_layernorm_recompute_trains_like_no_recompute_to_rounding(single):
    """Recomputing the norms changes the order in which x's gradient terms are summed (the norm's
    own two uses of x, then the residual's): the same numbers to rounding (observed: grad norm
    rel 6e-8, gate grad norm rel 7e-6, α 8e-8), within the parallel layouts' tolerances."""
    run, ref = single["selective_layernorm"]["records"], single["none"]["records"]
    assert [r["loss"] for r in run[:1]] == [r["loss"] for r in ref[:1]]  # the first forward is the same
    assert not _problems(run, ref), "\n".join(_problems(run, ref))
    got, want = _variances(single["selective_layernorm"]), _variances(single["none"])
    assert got[0] == want[0]  # from step 2 on, the weights differ by rounding
    assert sum(got, []) == pytest.approx(sum(want, []), rel=1e-6)


def test_recompute_really_recomputes(single):
    """Forward calls during one step (4 micro-batches of 4 layers) and the bytes autograd saves in
    the forward: recomputed parts run twice, and less is kept for the backward."""
    mb = 4  # global batch 8 / micro-batch 2
    probes = {name: single[name]["probe"] for name in ("none", *RECOMPUTE)}
    once = mb * NUM_LAYERS
    parts = ("layer", "core_attention", "mlp", "input_layernorm")
    assert probes["none"]["calls"] == dict.fromkeys(parts, once)
    assert probes["selective"]["calls"] == {"layer": once, "core_attention": 2 * once, "mlp": 2 * once,
                                            "input_layernorm": once}
    # the input norm of the Post-LN layer 1 is the identity (the norm runs after the add): nothing to redo
    assert probes["selective_layernorm"]["calls"] == {"layer": once, "core_attention": once, "mlp": once,
                                                      "input_layernorm": 2 * once - mb}
    for name in ("full_uniform", "full_block"):
        recomputed = mb * (NUM_LAYERS if name == "full_uniform" else 2)  # block: the first 2 layers
        assert probes[name]["calls"] == dict.fromkeys(parts, once + recomputed), name
    saved = {name: p["saved_bytes"] for name, p in probes.items()}
    # (the layernorm recompute frees the norm outputs after they were saved: not visible in this count)
    assert saved["selective"] < 0.8 * saved["none"], saved
    assert saved["full_uniform"] < saved["full_block"] < saved["none"], saved
    assert saved["full_uniform"] < 0.25 * saved["none"], saved


@pytest.mark.parametrize("layout", ["tp2_sp_selective", "pp2_full"])
def test_recompute_under_parallel_layouts_matches_one_process(layout, single, multi):
    ref = single["none"]["records"]
    run = multi[0][layout]["records"]
    assert len(run) == STEPS and multi[1][layout]["records"] == run
    assert not _problems(run, ref), "\n".join(_problems(run, ref))
    probe = multi[0][layout]["probe"]  # rank 0's layers: TP 4 layers, PP 2; each run twice
    layers = probe["layers"]
    assert layers == (NUM_LAYERS if layout.startswith("tp2") else NUM_LAYERS // 2)
    part = "core_attention" if layout.startswith("tp2") else "layer"
    assert probe["calls"][part] == 2 * 4 * layers, probe


# --------------------------------------------------------------------------- overlapped param gather


def test_overlap_param_gather_changes_nothing(workspace, multi):
    """DP=2, distributed optimizer, overlap_grad_reduce: with overlap_param_gather the updated
    parameters arrive in the next forward's pre-hooks; evaluation and saves gather them first.
    Losses, norms, gates, evaluation losses and the saved weights are bitwise the same."""
    from megatron_gpas.hf.dcp_reader import CheckpointReader

    plain, overlap = multi[0]["dp2_plain"], multi[0]["dp2_overlap"]
    assert len(plain["records"]) == 4 and _numbers(overlap) == _numbers(plain)
    for rank in multi[1:]:  # every rank reports the same gates (synchronised before they are read)
        assert _numbers(rank["dp2_overlap"]) == _numbers(plain)
    evals = [(h["step"], h["eval/loss"]) for h in overlap["history"] if "eval/loss" in h]
    assert [s for s, _ in evals] == [2, 4] and evals == [(h["step"], h["eval/loss"]) for h in plain["history"]
                                                       if "eval/loss" in h]
    for step in (2, 4):
        readers = [CheckpointReader(str(workspace / f"ckpt_{name}" / f"iter_{step:07d}"))
                   for name in ("dp2_plain", "dp2_overlap")]
        keys = [k for k in readers[0].metadata if not k.startswith("optimizer.")]
        assert any("alpha" in k for k in keys), keys
        for key in keys:
            a, b = readers[0].read(key), readers[1].read(key)
            assert a.equal(b), f"step {step}: {key} differs with overlap_param_gather"
        init = CheckpointReader(str(sorted((workspace / "ckpt_init").glob("iter_*"))[-1]))
        assert not init.read("output_layer.weight").equal(readers[0].read("output_layer.weight"))


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("overrides, message", [
    (["train.recompute=partial"], "train.recompute must be none, selective, full"),
    (["train.recompute=selective", "train.recompute_modules=[core_attn,moe]"], "train.recompute_modules must be"),
    (["train.recompute=selective", "train.recompute_modules=[]"], "train.recompute_modules must be"),
    (["train.recompute=full", "train.recompute_method=random"], "train.recompute_method must be uniform or block"),
    (["train.recompute=full", "train.recompute_num_layers=3"], r"must divide the layers per model chunk \(4\)"),
    (["train.recompute=full", "train.recompute_num_layers=3", "parallel.pipeline=2"],
     r"train.recompute_num_layers \(3\) exceeds the layers per model chunk \(2"),
    (["train.recompute=full", "train.recompute_num_layers=0"], "train.recompute_num_layers must be >= 1"),
    (["train.recompute_num_layers=2"], "train.recompute_num_layers applies to train.recompute=full"),
    (["train.recompute=full", "train.recompute_modules=[mlp]"], "train.recompute_modules applies to train.recompute=selective"),
    (["train.recompute=selective", "train.recompute_modules=[layernorm]", "gpas.enabled=true",
      "gpas.position=before_sublayer"], "recompute_modules=layernorm with gpas.position=before_sublayer"),
    (["parallel.overlap_param_gather=true", "parallel.distributed_optimizer=true"],
     "overlap_param_gather needs parallel.distributed_optimizer=true and parallel.overlap_grad_reduce=true"),
    (["parallel.overlap_param_gather=true", "parallel.overlap_grad_reduce=true"],
     "overlap_param_gather needs parallel.distributed_optimizer=true"),
    (["norm.scheme=bhyt", "parallel.overlap_param_gather=true", "parallel.overlap_grad_reduce=true",
      "parallel.distributed_optimizer=true"], "norm.scheme=bhyt: the scheme reads the weights before a step"),
    (["train.memory_check=maybe"], "train.memory_check must be error, warn, skip"),
    (["train.gpu_memory_gib=-1"], "train.gpu_memory_gib must be >= 0"),
])
def test_bad_recompute_and_overlap_keys_are_refused(overrides, message):
    cfg = load_config(None, ["model.preset=tiny", "train.global_batch_size=8", *overrides])
    with pytest.raises(ConfigError, match=message):
        validate(cfg, world_size=2, check_files=False, require_data=False)


def test_recompute_maps_onto_megatron_fields():
    from megatron_gpas.model.builder import recompute_fields

    def fields(*overrides):
        return recompute_fields(load_config(None, ["model.preset=tiny", *overrides]))

    assert fields() == {}
    assert fields("train.recompute=selective") == {"recompute_granularity": "selective",
                                                   "recompute_modules": ["core_attn"]}  # Megatron's default
    assert fields(*RECOMPUTE["full_block"]) == {"recompute_granularity": "full", "recompute_method": "block",
                                                "recompute_num_layers": 2}


# --------------------------------------------------------------------------- planner and memory check


def test_planner_reads_train_recompute():
    from megatron_gpas import planner

    # Megatron's DotProductAttention: the one attention that keeps the s² scores core_attn recomputes
    base = ["model.preset=tiny", "train.seq_length=512", "train.micro_batch_size=4", "train.global_batch_size=8",
            "model.attention=megatron"]
    cfg = load_config(None, base)
    count = count_parameters(cfg)

    def acts(*overrides):
        c = load_config(None, base + list(overrides))
        return planner.memory_per_gpu(c, count, world_size=1)[0].activations

    s, b, h, f, a, L = 512, 4, 64, 172, 4, 4
    per_layer = planner.activation_bytes_per_layer(cfg, b)
    head = planner.last_stage_extra_bytes(cfg, b)
    assert acts() == pytest.approx(L * per_layer + head)
    # selective: each module takes its own terms away (BF16 bytes)
    assert acts("train.recompute=selective") == pytest.approx(L * (per_layer - 2 * a * s * s * b) + head)
    assert acts("train.recompute=selective", "train.recompute_modules=[mlp]") == \
        pytest.approx(L * (per_layer - 6 * s * b * f) + head)
    assert acts("train.recompute=selective", "train.recompute_modules=[layernorm]") == \
        pytest.approx(L * (per_layer - 4 * s * b * h) + head)
    # full: uniform groups of n keep L/n inputs and recompute one group (n − 1 layers beyond the paper's count)
    kept = 2 * s * b * h
    assert acts(*FULL) == pytest.approx(L * kept + head)
    assert acts(*FULL, "train.recompute_num_layers=2") == pytest.approx(2 * kept + per_layer + head)
    assert acts(*FULL, "train.recompute_method=block", "train.recompute_num_layers=1") == \
        pytest.approx(kept + 3 * per_layer + head)
    # the search names the override where the config's level does not fit
    small_vocab = load_config(None, base + ["model.vocab_size=512"])  # the logits do not dominate
    layouts = planner.search(small_vocab, 1, planner.parse_memory("0.05GB"), 1e15, reserve_gib=0)
    needing = [l for l in layouts if l.recompute != "none"]
    assert needing and all(l.note == f"with train.recompute={l.recompute}" and
                           f"train.recompute={l.recompute}" in l.overrides for l in needing)
    assert all(not any(o.startswith("train.recompute") for o in l.overrides) for l in layouts if l.recompute == "none")
    # switching away from a level resets its own keys, so that the overrides validate
    grouped = load_config(None, base + [*FULL, "train.recompute_num_layers=2"])
    for level, switch in (("none", ["train.recompute=none", "train.recompute_num_layers=1"]),
                          ("selective", ["train.recompute=selective", "train.recompute_num_layers=1"]), ("full", [])):
        assert recompute_overrides(grouped, level) == switch
        validate(load_config(None, base + [*FULL, "train.recompute_num_layers=2", *switch]), world_size=1,
                 check_files=False, require_data=False)


MEMORY_BASE = ["model.preset=tiny", "model.vocab_size=512", "train.seq_length=512", "train.micro_batch_size=8",
               "train.global_batch_size=8", "train.precision=fp32", "model.attention=megatron"]


def test_memory_check_says_what_fits(tmp_path, capsys):
    """CPU: the check runs only with train.gpu_memory_gib. 3.46 GiB leaves 0.11 GiB after the margin and
    reserve; micro-batch 8 (fp32, the s² scores of 512 tokens) needs 0.21 GiB."""
    from megatron_gpas import planner
    from megatron_gpas.training import check_memory

    assert check_memory(load_config(None, MEMORY_BASE)) is None  # no GPU, no key: nothing to compare with
    cfg = load_config(None, MEMORY_BASE + ["train.gpu_memory_gib=3.46", "train.memory_check=error"])
    with pytest.raises(ConfigError) as err:
        check_memory(cfg, world_size=1)
    message = str(err.value)
    assert "exceeds the 0.11 GiB usable of 3.46 GiB" in message and "activations" in message
    # what would fit, each checked against the planner
    would_fit = message.split("would fit: ")[1]
    mb = int(re.search(r"train.micro_batch_size=(\d+) \(", would_fit).group(1))
    level = re.search(r"train.recompute=(\w+) \(", would_fit).group(1)
    count = count_parameters(cfg)
    budget = planner.usable_bytes(3.46 * planner.GIB)

    def total(*overrides):
        c = load_config(None, MEMORY_BASE + list(overrides))
        return max(s.total for s in planner.memory_per_gpu(c, count, 1))

    assert total(f"train.micro_batch_size={mb}") <= budget < total(f"train.micro_batch_size={2 * mb}")
    assert level == "selective" and total("train.recompute=selective") <= budget
    # warn: the same message on the console, and the run goes on; skip: no estimate at all
    warn = load_config(None, MEMORY_BASE + ["train.gpu_memory_gib=3.46"])
    assert check_memory(warn, world_size=1) == message.split("train.memory_check: ")[1].split(". To start")[0]
    assert "[warn] train.memory_check: the estimated memory" in capsys.readouterr().out
    assert check_memory(load_config(None, MEMORY_BASE + ["train.gpu_memory_gib=3.46", "train.memory_check=skip"])) is None
    assert check_memory(load_config(None, MEMORY_BASE + ["train.gpu_memory_gib=80"]), world_size=1) is None
    with pytest.raises(ConfigError, match="3.00 GiB of GPU memory leave nothing after the 10% margin"):
        check_memory(load_config(None, MEMORY_BASE + ["train.gpu_memory_gib=3"]), world_size=1)


def test_memory_check_stops_a_run_before_any_process_group(tmp_path):
    import torch.distributed as dist

    from synthetic import write_synthetic_dataset

    from megatron_gpas.training import Trainer

    (tmp_path / "data").mkdir()
    write_synthetic_dataset(str(tmp_path / "data" / "synthetic"))
    cfg = load_config(None, MEMORY_BASE + ["train.gpu_memory_gib=3.46", "train.memory_check=error",
                                           *synthetic_run_overrides(tmp_path, tmp_path / "run")])
    with pytest.raises(ConfigError, match="train.memory_check: the estimated memory per GPU"):
        Trainer(cfg)
    assert not dist.is_initialized()
