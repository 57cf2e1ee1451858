"""Muon (optim.optimizer=muon): Megatron-Core 0.19.2's own TensorParallelMuon on the 2-D
hidden matrices, Adam on everything else, on a real tiny model (docs/muon.md).

In this process (no launch):
  * validation: every invalid Muon key or combination is refused with its own message;
  * routing: every parameter of the tiny model (GPAS on) listed with its optimizer and
    checked against the sub-optimizers Megatron built; ``optimizer_route`` overrides;
  * two real Muon steps against a plain-torch reference written here (Newton–Schulz with
    the "simple" coefficients, Nesterov momentum, 0.2·√max(m,n), decoupled weight decay, the
    fused QKV split into Q, K and V), the Adam-routed parameters' first step against AdamW,
    both groups' LR schedules, and the global clip acting on both optimizers;
  * resume: 4 steps vs 2 + save + load + 2, bitwise (weights and optimizer state), with the
    default bf16 Newton-Schulz; an Adam run refuses the Muon checkpoint's optimizer state.
One ``torchrun --nproc-per-node 2`` launch (tests/parallel_worker.py): Muon with the
distributed optimizer refused before any process group, then TP=2+SP (muon_tp_mode
duplicated), TP=2 (distributed), PP=2 and DP=2, 3 steps each from the same step-0 weights,
against the 1-process reference (run in this process with the worker's functions).

The model uses GQA (2 query groups of 2 heads): the QKV split then has Q blocks twice as
tall as K and V, and under TP=2 every rank holds one whole group.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import parallel_worker
from megatron.core.utils import unwrap_model
from megatron_gpas.checkpoint import CheckpointError
from megatron_gpas.config import ConfigError, load_config
from megatron_gpas.validation import validate
from megatron_gpas.optim import build_optimizer, optimizer_route, optimizer_routing
from megatron_gpas.training import Trainer
from synthetic import synthetic_run_overrides, write_synthetic_dataset
from test_model_reference import randomize
from test_parallel import _close, _launch
from test_parallel_schemes import _merge_checksums

pytestmark = [
    pytest.mark.usefixtures("parallel_state_released"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Please use DTensor instead:FutureWarning"),  # dist-checkpointing's save
]

NUM_LAYERS = 4  # model.preset=tiny: hidden 64, 4 heads of 16, ffn 172
HIDDEN, HEAD_DIM, QUERY_GROUPS, HEADS_PER_GROUP = 64, 16, 2, 2
STEPS = 4  # train.steps (LR schedule) of every run
EQUIV_STEPS = 3  # the parallel layouts and their reference stop after 3
GLOBAL_BATCH = 4
ADAM_LR, MUON_LR = 3.0e-3, 2.0e-2
WEIGHT_DECAY, MUON_WEIGHT_DECAY = 0.1, 0.05
MIN_LR_RATIO = 0.1  # optim.min_lr_ratio default
CLIP_GRAD = 0.5  # pre-clip norms are ~1.3-1.8: the global clip bites at every step (asserted)
BETA1, BETA2, ADAM_EPS = 0.9, 0.999, 1e-8  # optim.adam_* defaults
# OSP's Muon, the defaults of the optim.muon_* keys
MOMENTUM, NS_STEPS, SCALE = 0.95, 5, 0.2
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # "simple"

MUON_TENSORS = ("self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
                "mlp.linear_fc1.weight", "mlp.linear_fc2.weight")
ADAM_LAYER_TENSORS = ("input_layernorm.weight", "pre_mlp_layernorm.weight", "gpas.alpha")
# every trainable parameter of the tiny GPAS model and its optimizer, by global name
EXPECTED_ROUTING = {
    "embedding.word_embeddings.weight": "adam",
    **{f"decoder.layers.{l}.{t}": "muon" for l in range(NUM_LAYERS) for t in MUON_TENSORS},
    **{f"decoder.layers.{l}.{t}": "adam" for l in range(NUM_LAYERS) for t in ADAM_LAYER_TENSORS},
    "decoder.final_layernorm.weight": "adam",
    "output_layer.weight": "adam",
}

LAYOUTS = {
    "tp2_sp": ["parallel.tensor=2", "parallel.sequence_parallel=true"],  # muon_tp_mode=duplicated
    "tp2_distributed": ["parallel.tensor=2", "optim.muon_tp_mode=distributed"],
    "pp2": ["parallel.pipeline=2"],
    "dp2": [],
}

# Tolerances of the step reference (fp32 run vs float64 reference on the same inputs),
# relative to the largest element of the update, beyond the fp32 rounding of the weight.
# Observed: Muon 1.0e-5 (Newton-Schulz in fp32), Adam 2.5e-7. A wrong reference (no
# Nesterov, unsplit QKV, TP-blockwise halves, weight decay left out or misplaced) is off by
# >= 9e-3 (asserted: > 100 × the tolerance).
MUON_STEP_RTOL = 5e-5
ADAM_STEP_RTOL = 2e-6
# Parallel layouts vs one process: the same fp32 numbers reduced in another order, then
# Newton-Schulz on (up to rounding) the same momentum. Observed over 3 steps, all layouts
# (DP=2 is bitwise equal): loss equal, grad norm rel 3.1e-7, α abs 1.1e-7 (|α| >= 1.8e-3),
# parameter checksums (gates excluded, they are compared through α): Σw 6.2e-8 of Σ|w|,
# Σw² rel 1.1e-7, update size Σ(w − w₀)² rel 3.0e-6. Muon in TP-blockwise mode would change
# the update size by tens of percent (the halves in test_muon_steps_match_the_reference).
LOSS_RTOL, NORM_RTOL, ALPHA_ATOL = 1e-6, 1e-5, 1e-6
SUM_TOL, SUMSQ_RTOL, MOVED_RTOL = 1e-6, 1e-6, 5e-5


def _overrides(ws: Path, run: str, *extra: str) -> list[str]:
    return [
        "model.preset=tiny", "model.vocab_size=256", "model.make_vocab_size_divisible_by=64",
        f"model.num_query_groups={QUERY_GROUPS}", "gpas.enabled=true",
        f"train.steps={STEPS}", "train.seq_length=32", "train.micro_batch_size=2",
        f"train.global_batch_size={GLOBAL_BATCH}", "train.eval_interval=0", "train.eval_iters=1",
        "optim.optimizer=muon", f"optim.lr={ADAM_LR!r}", f"optim.muon_lr={MUON_LR!r}",
        f"optim.weight_decay={WEIGHT_DECAY!r}", f"optim.muon_weight_decay={MUON_WEIGHT_DECAY!r}",
        "optim.warmup_steps=0", f"optim.clip_grad={CLIP_GRAD!r}",
        "optim.muon_matmul_precision=highest",  # fp32 Newton-Schulz: comparable at fp32 tolerance
        *synthetic_run_overrides(ws, ws / "runs" / run),
        *extra,
    ]


def _cosine_lr(peak: float, step: int) -> float:
    """The LR of the ``step``-th update (1-based): cosine from peak to peak·min_lr_ratio over
    train.steps, no warmup (Megatron's OptimizerParamScheduler, stated independently)."""
    low = peak * MIN_LR_RATIO
    return low + (peak - low) * 0.5 * (1 + math.cos(math.pi * (step - 1) / STEPS))


@pytest.fixture(scope="module")
def dataset(workspace) -> Path:
    write_synthetic_dataset(str(workspace / "data" / "synthetic"))
    return workspace


# =========================================================================== 1. validation

VALID = ["optim.optimizer=muon"]


def _validate(overrides: list[str], world_size: int = 1) -> None:
    validate(load_config(None, ["model.preset=tiny", *overrides]), world_size=world_size, check_files=False,
             require_data=False)


@pytest.mark.parametrize("overrides, world_size, message", [
    (["optim.optimizer=sgd"], 1, "optim.optimizer must be one of adam, muon, got 'sgd'"),
    (["optim.optimizer=muon", "parallel.distributed_optimizer=true"], 2,
     "optim.optimizer=muon with parallel.distributed_optimizer=true is not supported"),
    (["optim.optimizer=muon", "optim.muon_tp_mode=blockwise"], 1, "optim.muon_tp_mode=blockwise orthogonalises"),
    (["optim.muon_tp_mode=auto"], 1, "optim.muon_tp_mode must be one of duplicated, distributed, got 'auto'"),
    (["optim.optimizer=muon", "optim.muon_coefficients=custom"], 1, "optim.muon_coefficients must be one of"),
    (["optim.muon_coefficients=cubic"], 1, "optim.muon_coefficients must be one of simple, quintic"),
    (["optim.weight_decay=-1"], 1, "optim.weight_decay must be >= 0, got -1.0"),
    (["optim.muon_ns_steps=0"], 1, "optim.muon_ns_steps must be >= 1, got 0"),
    (["optim.muon_momentum=1.0"], 1, "optim.muon_momentum must be in [0, 1), got 1.0"),
    (["optim.muon_scale=0"], 1, "optim.muon_scale must be positive, got 0.0"),
    (["optim.muon_lr=0"], 1, "optim.muon_lr must be positive (or null = optim.lr), got 0.0"),
    (["optim.muon_weight_decay=-0.1"], 1, "optim.muon_weight_decay must be >= 0"),
    (["optim.muon_matmul_precision=low"], 1, "optim.muon_matmul_precision must be one of medium, high, highest"),
])
def test_invalid_muon_settings_are_rejected(overrides, world_size, message):
    with pytest.raises(ConfigError) as info:
        _validate(overrides, world_size)
    assert message in str(info.value)


def test_distributed_optimizer_message_names_the_reason_and_the_alternative():
    with pytest.raises(ConfigError) as info:
        _validate(["optim.optimizer=muon", "parallel.distributed_optimizer=true"], world_size=2)
    text = str(info.value)
    assert "LayerWiseDistributedOptimizer" in text and "partial gradients" in text
    assert "parallel.distributed_optimizer=false" in text and "docs/muon.md" in text


@pytest.mark.parametrize("overrides, world_size", [
    (VALID, 1),
    ([*VALID, "optim.muon_tp_mode=distributed", "optim.muon_coefficients=quintic", "optim.muon_nesterov=false",
      "optim.muon_lr=1e-2", "optim.muon_weight_decay=0", "optim.muon_matmul_precision=high"], 1),
    ([*VALID, "parallel.tensor=2", "parallel.pipeline=2"], 4),
    (["optim.optimizer=adam", "parallel.distributed_optimizer=true"], 2),  # Adam keeps its distributed optimizer
])
def test_valid_muon_settings_pass(overrides, world_size):
    _validate(overrides, world_size)


def test_routing_rule_on_plain_tensors():
    """The default rule, and the optimizer_route attribute that overrides it either way."""
    matrix = torch.nn.Parameter(torch.zeros(8, 4))  # e.g. OSP's EmbProj: a plain replicated d×d weight
    assert optimizer_route(matrix) == "muon"
    embedding = torch.nn.Parameter(torch.zeros(8, 4))
    embedding.is_embedding_or_output_parameter = True
    assert optimizer_route(embedding) == "adam"
    for shape in [(8,), (), (2, 4, 4)]:
        assert optimizer_route(torch.nn.Parameter(torch.zeros(shape))) == "adam", shape
    matrix.optimizer_route, embedding.optimizer_route = "adam", "muon"
    assert optimizer_route(matrix) == "adam" and optimizer_route(embedding) == "muon"


# =========================================================================== 2. two real steps


def _qkv_blocks(w: torch.Tensor) -> list[torch.Tensor]:
    """Q, K, V of a fused QKV weight: its rows are, per query group, the group's query heads,
    then its key head, then its value head (Megatron's layout); each block gathers its rows
    over all groups."""
    per_group = w.reshape(QUERY_GROUPS, (HEADS_PER_GROUP + 2) * HEAD_DIM, w.shape[1])
    q = HEADS_PER_GROUP * HEAD_DIM
    return [per_group[:, :q], per_group[:, q:q + HEAD_DIM], per_group[:, q + HEAD_DIM:]]


def _newton_schulz(x: torch.Tensor) -> torch.Tensor:
    """OSP's / Keller Jordan's iteration: X/‖X‖_F (transposed when rows > cols), then 5 ×
    X ← aX + (bA + cA²)X with A = XXᵀ and the "simple" coefficients."""
    a, b, c = NS_COEFFICIENTS
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(NS_STEPS):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if transposed else x


def _orthogonalised(u: torch.Tensor, qkv: bool, split: bool = True) -> torch.Tensor:
    """SCALE·√max(m,n)·NS(u), per Q, K and V block for the fused QKV weight."""
    def scaled(block):
        return SCALE * math.sqrt(max(block.shape)) * _newton_schulz(block)

    if not (qkv and split):
        return scaled(u)
    blocks = [scaled(block.reshape(-1, u.shape[1])).reshape(block.shape) for block in _qkv_blocks(u)]
    return torch.cat(blocks, dim=1).reshape(u.shape)


def _reference_muon_updates(grads: list[torch.Tensor], qkv: bool, nesterov: bool = True, split: bool = True):
    """Orthogonalised update of every step, with OSP's momentum (optimization.py):
    buf ← β·buf + g; u ← g + β·buf (Nesterov), else u ← buf.

    emerging_optimizers keeps an EMA instead: buf' ← β·buf' + (1−β)·g = (1−β)·buf (by
    induction) and its Nesterov u' = lerp(g, buf', β) = (1−β)·g + β·buf' = (1−β)·u. Newton–Schulz
    starts by dividing by the Frobenius norm, so NS(u') = NS(u): the same update."""
    buf, out = torch.zeros_like(grads[0]), []
    for g in grads:
        buf = MOMENTUM * buf + g
        out.append(_orthogonalised(g + MOMENTUM * buf if nesterov else buf, qkv, split))
    return out


@pytest.fixture(scope="module")
def stepped(dataset) -> dict:
    """Two real steps of a Muon run; every sub-optimizer's inner step records, per parameter,
    the weight and (clipped) gradient it got and its group's lr and weight decay."""
    trainer = Trainer(load_config(None, _overrides(dataset, "stepped")))
    try:
        model = unwrap_model(trainer.model[0])
        # At the official init (linears N(0, 0.02)) attention is near-uniform and the Q/K
        # gradients are nearly rank-deficient (condition ~1e7), where Newton-Schulz amplifies
        # fp32 rounding to ~5e-4; fan-in-scaled weights give well-conditioned gradients.
        randomize(model, seed=3)
        name_of = {id(p): n for n, p in model.named_parameters()}
        out = {"routing": optimizer_routing(trainer.model), "trainer_routing": trainer.routing,
               "optimizer_of": {}, "steps": [], "log": []}
        for sub in trainer.optimizer.chained_optimizers:
            inner = sub.optimizer  # the torch optimizer Megatron built (Muon or AdamW)
            for group in inner.param_groups:
                for p in group["params"]:
                    out["optimizer_of"][name_of[id(p)]] = type(inner).__name__
            real_step = inner.step

            def recording_step(*args, _inner=inner, _real=real_step, **kwargs):
                out["steps"][-1].update({
                    name_of[id(p)]: {"w": p.detach().clone().double(), "g": p.grad.detach().clone().double(),
                                     "lr": group["lr"], "wd": group["weight_decay"]}
                    for group in _inner.param_groups for p in group["params"]})
                return _real(*args, **kwargs)

            inner.step = recording_step
        iterator = trainer._iterators(trainer.train_ds, 0)
        for _ in range(2):
            out["steps"].append({})
            values = trainer.train_step(iterator)
            out["log"].append({**values, "grad_norm": trainer.last_step_result.grad_norm})
            for name, p in model.named_parameters():
                out["steps"][-1][name]["after"] = p.detach().clone().double()
        # optimizer_route overrides, on a second optimizer over the same model
        params = dict(model.named_parameters())
        forced = {"decoder.layers.0.self_attention.linear_proj.weight": "adam", "output_layer.weight": "muon"}
        for name, route in forced.items():
            params[name].optimizer_route = route
        try:
            optimizer, _ = build_optimizer(trainer.cfg, trainer.model, bf16=False)
            out["forced_optimizer_of"] = {name_of[id(p)]: type(sub.optimizer).__name__
                                          for sub in optimizer.chained_optimizers
                                          for group in sub.optimizer.param_groups for p in group["params"]}
            out["forced_routing"] = optimizer_routing(trainer.model)
            out["bad_routes"] = {}
            for name, route in [("decoder.final_layernorm.weight", "muon"), ("decoder.layers.1.gpas.alpha", "sgd")]:
                params[name].optimizer_route = route
                try:
                    build_optimizer(trainer.cfg, trainer.model, bf16=False)
                except ValueError as e:
                    out["bad_routes"][name] = str(e)
                del params[name].optimizer_route
        finally:
            for name in forced:
                del params[name].optimizer_route
        return out
    finally:
        trainer.close(keep_process_group=True)


def test_every_parameter_is_routed_as_specified(stepped):
    assert stepped["routing"] == EXPECTED_ROUTING
    # ... and that is where Megatron put them
    kinds = {"muon": "TensorParallelMuon", "adam": "AdamW"}
    assert stepped["optimizer_of"] == {name: kinds[route] for name, route in EXPECTED_ROUTING.items()}
    # the trainer's gathered routing (printed at setup) counts global sizes
    sizes = {name: numel for name, (_, numel) in stepped["trainer_routing"].items()}
    assert sizes["decoder.layers.0.self_attention.linear_qkv.weight"] == HIDDEN * (HIDDEN + 2 * QUERY_GROUPS * HEAD_DIM)
    assert {name: route for name, (route, _) in stepped["trainer_routing"].items()} == EXPECTED_ROUTING


def test_optimizer_route_attribute_forces_either_way(stepped):
    expected = {**EXPECTED_ROUTING, "decoder.layers.0.self_attention.linear_proj.weight": "adam",
                "output_layer.weight": "muon"}
    assert stepped["forced_routing"] == expected
    kinds = {"muon": "TensorParallelMuon", "adam": "AdamW"}
    assert stepped["forced_optimizer_of"] == {name: kinds[route] for name, route in expected.items()}
    bad = stepped["bad_routes"]
    assert "decoder.final_layernorm.weight (1-D, shape (64,)) is routed to Muon" in bad["decoder.final_layernorm.weight"]
    assert "optimizer_route='sgd', expected one of adam, muon" in bad["decoder.layers.1.gpas.alpha"]


def test_lr_schedule_and_weight_decay_per_group(stepped):
    """Muon's group follows optim.muon_lr and optim.muon_weight_decay; Adam's keep optim.lr,
    optim.weight_decay on matrices and no decay on 1-D parameters; both on the cosine."""
    for step, record in enumerate(stepped["steps"], start=1):
        for name, route in EXPECTED_ROUTING.items():
            entry = record[name]
            if route == "muon":
                lr, wd = _cosine_lr(MUON_LR, step), MUON_WEIGHT_DECAY
            else:
                lr, wd = _cosine_lr(ADAM_LR, step), WEIGHT_DECAY if entry["w"].dim() == 2 else 0.0
            assert math.isclose(entry["lr"], lr, rel_tol=1e-12) and entry["wd"] == wd, (step, name, entry["lr"], lr)
        logged = stepped["log"][step - 1]
        assert math.isclose(logged["train/lr"], _cosine_lr(ADAM_LR, step), rel_tol=1e-12)
        assert math.isclose(logged["train/muon_lr"], _cosine_lr(MUON_LR, step), rel_tol=1e-12)


def test_global_clip_covers_both_optimizers(stepped):
    """The gradients both optimizers got have the clipped global norm: the first clip stage
    scaled Muon's and Adam's parameters together."""
    for record, logged in zip(stepped["steps"], stepped["log"]):
        pre = logged["grad_norm"]
        assert pre > 1.5 * CLIP_GRAD
        post = math.sqrt(sum(float((entry["g"] ** 2).sum()) for entry in record.values()))
        assert math.isclose(post, CLIP_GRAD * pre / (pre + 1e-6), rel_tol=1e-6), (post, pre)


def _update_error(entry: dict, expected_update: torch.Tensor, wd: float) -> float:
    """max |actual − expected| of the parameter change, relative to the largest expected
    change, beyond the rounding of the stored fp32 weight (≤ 2⁻²³·|w|, which matters for
    weights ~1 moving by lr ~1e-3)."""
    expected = -entry["lr"] * wd * entry["w"] - entry["lr"] * expected_update
    excess = (entry["after"] - entry["w"] - expected).abs() - entry["after"].abs() * 2.0**-23
    return float(excess.clamp(min=0).max() / expected.abs().max().clamp(min=1e-30))


def test_muon_steps_match_the_reference(stepped):
    """Two steps of every Muon-routed matrix against the reference (momentum across steps)."""
    problems, sensitivity = [], []
    for name, route in EXPECTED_ROUTING.items():
        if route != "muon":
            continue
        records = [step[name] for step in stepped["steps"]]
        qkv = name.endswith("linear_qkv.weight")
        grads = [r["g"] for r in records]
        for step, (record, update) in enumerate(zip(records, _reference_muon_updates(grads, qkv)), start=1):
            error = _update_error(record, update, MUON_WEIGHT_DECAY)
            if error > MUON_STEP_RTOL:
                problems.append(f"step {step} {name}: relative error {error:.2e}")
        # the comparison can tell a wrong reference apart (missing Nesterov at step 2,
        # unsplit QKV, TP-blockwise Newton-Schulz on two row halves)
        sensitivity.append(_update_error(records[1], _reference_muon_updates(grads, qkv, nesterov=False)[1],
                                         MUON_WEIGHT_DECAY))
        if qkv:
            sensitivity.append(_update_error(records[0], _reference_muon_updates(grads, qkv, split=False)[0],
                                             MUON_WEIGHT_DECAY))
        if not qkv:
            halves = torch.cat([_orthogonalised(h, False) for h in grads[0].chunk(2, dim=0)])
            sensitivity.append(_update_error(records[0], halves, MUON_WEIGHT_DECAY))
        sensitivity.append(_update_error(records[0], _reference_muon_updates(grads, qkv)[0], 0.0))  # no decay
    assert not problems, "Muon steps differ from the reference:\n  " + "\n  ".join(problems)
    assert min(sensitivity) > 100 * MUON_STEP_RTOL, sensitivity


def test_adam_routed_parameters_take_an_adamw_step(stepped):
    """Step 1 from a fresh state is AdamW's p ← p(1 − lr·wd) − lr·g/(|g| + eps) (bias-corrected
    moments of one gradient), at optim.lr, decaying only the matrices."""
    problems, sensitivity = [], []
    for name, route in EXPECTED_ROUTING.items():
        if route != "adam":
            continue
        entry = stepped["steps"][0][name]
        g = entry["g"]
        update = g / (g.abs() + ADAM_EPS)
        decays = entry["w"].dim() == 2
        error = _update_error(entry, update, WEIGHT_DECAY if decays else 0.0)
        if error > ADAM_STEP_RTOL:
            problems.append(f"{name}: relative error {error:.2e}")
        sensitivity.append(_update_error(entry, update, 0.0 if decays else WEIGHT_DECAY))  # decay misplaced
    assert not problems, "Adam steps differ from AdamW:\n  " + "\n  ".join(problems)
    assert min(sensitivity) > 100 * ADAM_STEP_RTOL, sensitivity


# =========================================================================== 3. resume


def _run(overrides: list[str]) -> dict:
    """A Trainer run: per-step numbers, final weights and optimizer state by parameter name."""
    trainer = Trainer(load_config(None, overrides))
    try:
        start = trainer.step
        records = []
        real_step = trainer.train_step

        def train_step(iterator):
            values = real_step(iterator)
            records.append((trainer.step, values["train/loss"], values["train/grad_norm"], values["train/lr"],
                            values["train/muon_lr"]))
            return values

        trainer.train_step = train_step
        trainer.train()
        model = unwrap_model(trainer.model[0])
        name_of = {id(p): n for n, p in model.named_parameters()}
        state = {}
        for sub in trainer.optimizer.chained_optimizers:
            for p, values in sub.optimizer.state.items():
                for key, value in values.items():
                    if torch.is_tensor(value) and value.dim() > 0:
                        state[f"{name_of[id(p)]}:{key}"] = value.detach().clone()
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        return {"start": start, "records": records, "weights": weights, "state": state}
    finally:
        trainer.close(keep_process_group=True)


@pytest.fixture(scope="module")
def resumed(dataset) -> dict:
    ws = dataset
    root = ws / "ckpt_resume"
    bf16_ns = "optim.muon_matmul_precision=medium"  # the default (bf16 Newton-Schulz): exact resume too
    out = {
        "full": _run(_overrides(ws, "full", bf16_ns)),
        "part1": _run(_overrides(ws, "part1", bf16_ns, "train.exit_after_steps=2", f"checkpoint.save='{root}'")),
        "part2": _run(_overrides(ws, "part2", bf16_ns, f"checkpoint.load='{root}'")),
        "checkpoint": root / "iter_0000002",
    }
    try:  # the Muon run's optimizer state cannot be resumed by an Adam run
        Trainer(load_config(None, _overrides(ws, "switch", "optim.optimizer=adam", f"checkpoint.load='{root}'")))
        out["switch_error"] = None
    except CheckpointError as e:
        out["switch_error"] = str(e)
    return out


def test_resume_is_bitwise_identical(resumed):
    full, part1, part2 = resumed["full"], resumed["part1"], resumed["part2"]
    assert part1["start"] == 0 and part2["start"] == 2
    assert part1["records"] + part2["records"] == full["records"]  # loss, grad norm, both LRs
    assert [r[0] for r in full["records"]] == list(range(1, STEPS + 1))
    assert full["weights"].keys() == part2["weights"].keys()
    for name, weight in full["weights"].items():
        assert torch.equal(part2["weights"][name], weight), name
    # the optimizer state, Muon's momentum buffers included, continued exactly
    momentum = {k for k in full["state"] if k.endswith(":momentum_buffer")}
    assert momentum == {f"{n}:momentum_buffer" for n, r in EXPECTED_ROUTING.items() if r == "muon"}
    assert full["state"].keys() == part2["state"].keys()
    for key, value in full["state"].items():
        assert torch.equal(part2["state"][key], value), key
    assert all(full["state"][k].abs().sum() > 0 for k in momentum)


def test_checkpoint_holds_the_momentum_buffers(resumed):
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(resumed["checkpoint"])).read_metadata().state_dict_metadata
    momentum = sorted(k.rsplit("momentum_buffer.", 1)[1] for k in keys if ".momentum_buffer." in k)
    assert momentum == sorted(f"decoder.layers.{t}" for t in MUON_TENSORS), momentum


def test_resuming_with_another_optimizer_is_refused(resumed):
    message = resumed["switch_error"]
    assert message is not None, "an Adam run resumed a Muon run's optimizer state"
    assert "optim.optimizer=muon" in message and "checkpoint.load_optimizer=false" in message


# =========================================================================== 4. parallel layouts


@pytest.fixture(scope="module")
def reference(dataset) -> dict:
    """The step-0 checkpoint every layout starts from, and the 1-process reference (in this
    process, with the worker's own recording)."""
    ws = dataset
    parallel_worker.run_save_init({"overrides": _overrides(ws, "init", f"checkpoint.save='{ws / 'ckpt_init'}'")})
    return parallel_worker.run_train({"checksums": True, "overrides": _overrides(ws, "reference", *_from_init(ws))})


def _from_init(ws: Path) -> list[str]:
    return [f"checkpoint.load='{ws / 'ckpt_init'}'", "checkpoint.load_optimizer=false",
            f"train.exit_after_steps={EQUIV_STEPS}"]


@pytest.fixture(scope="module")
def multi(dataset, reference) -> list[dict]:
    """One launch of two processes; one results dict per rank."""
    ws = dataset
    cases = [{"name": "distopt_error", "kind": "expect_error",  # first: no process group exists yet
              "overrides": _overrides(ws, "distopt_error", "parallel.distributed_optimizer=true")}]
    cases += [{"name": name, "kind": "train", "checksums": True,
               "overrides": _overrides(ws, name, *layout, *_from_init(ws))} for name, layout in LAYOUTS.items()]
    return [r["cases"] for r in _launch(ws, "muon_multi", 2, cases, timeout=420)]


def test_distributed_optimizer_is_refused_before_the_process_group(multi):
    for cases in multi:
        err = cases["distopt_error"]
        assert err["raised"] and err["type"] == "ConfigError", err
        assert "parallel.distributed_optimizer=true is not supported" in err["message"]
        assert err["process_group"] is False


def test_reference_is_informative(reference):
    records = reference["records"]
    assert [r["step"] for r in records] == list(range(1, EQUIV_STEPS + 1))
    assert all(r["updated"] and r["grad_norm"] > 1.5 * CLIP_GRAD for r in records)
    assert len({round(r["loss"], 6) for r in records}) == EQUIV_STEPS
    assert reference["routing"] == EXPECTED_ROUTING


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, reference, multi):
    """TP=2 (both TP modes), PP=2 and DP=2 train as one process: Muon's update does not depend
    on how the matrices are split."""
    run = multi[0][layout]
    assert run["world_size"] == 2 and run["start_step"] == 0
    assert run["routing"] == EXPECTED_ROUTING  # global names on every stage
    for other in multi[1:]:
        assert other[layout]["records"][-1]["loss"] == run["records"][-1]["loss"]
    problems = []
    for r, q in zip(run["records"], reference["records"], strict=True):
        step = r["step"]
        if not _close(r["loss"], q["loss"], LOSS_RTOL, 0.0):
            problems.append(f"step {step}: loss {r['loss']!r} vs {q['loss']!r}")
        if not _close(r["grad_norm"], q["grad_norm"], NORM_RTOL, 0.0):
            problems.append(f"step {step}: grad_norm {r['grad_norm']!r} vs {q['grad_norm']!r}")
        problems += [f"step {step}: alpha layer {l} {a!r} vs {b!r}"
                     for l, (a, b) in enumerate(zip(r["alpha"], q["alpha"], strict=True), start=1)
                     if not _close(a, b, 0.0, ALPHA_ATOL)]
    got = _merge_checksums([ranks[layout]["records"][-1]["checksums"] for ranks in multi])
    want = _merge_checksums([reference["records"][-1]["checksums"]])
    assert got.keys() == want.keys()
    for name, (s, q, _, m, n) in got.items():
        ws, wq, wa, wm, wn = want[name]
        assert n == wn, name
        if name.endswith("gpas.alpha"):
            continue
        if abs(s - ws) > SUM_TOL * wa:
            problems.append(f"{name}: Σw {s!r} vs {ws!r} (Σ|w| {wa:.3e})")
        if not _close(q, wq, SUMSQ_RTOL, 0.0):
            problems.append(f"{name}: Σw² {q!r} vs {wq!r}")
        if not _close(m, wm, MOVED_RTOL, 0.0):
            problems.append(f"{name}: Σ(w − w₀)² {m!r} vs {wm!r}")
        assert wm > 0, f"{name} did not move"
    assert not problems, f"{layout} differs from one process:\n  " + "\n  ".join(problems)
