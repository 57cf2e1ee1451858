"""The fused GPAS residual add (gpas.fused, model/fused.py) and the fused norms (norm.fused).

  operator  GatedSum / GatedShortcutSum against the gate written out here in plain PyTorch:
            forward and the gradients of the shortcut, the branch and a; the eager kernels
            bitwise in fp32, the torch.compile'd ones within rounding (COMPILE_* below)
  module    ResidualAdd fused against a float64 reference with every gate activation (its own
            definitions here), per-sub-layer gates, both fused positions; and against the
            unfused ResidualAdd bitwise in fp32, bias and dropout included
  model     logits and every parameter gradient of whole models, fused (the defaults) against
            gpas.fused=none norm.fused=false in 1 process; TP2+SP and PP2 training runs (gloo,
            torchrun) whose per-step numbers and parameter checksums are bitwise equal
  norms     F.rms_norm / F.layer_norm against the formula in float64, fp32 and bf16
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_gpas.config import ConfigError, inherit_architecture, load_config, validate_settings
from megatron_gpas.model.builder import set_fusions
from megatron_gpas.model.fused import EAGER, GatedShortcutSum, GatedSum, compiled_kernels, gate_kernels
from megatron_gpas.model.gpas import GPASGate
from megatron_gpas.model.norms import CompressedRMSNorm, LayerNorm, RMSNorm, ScalarRMSNorm
from megatron_gpas.model.sublayer import ResidualAdd
from test_parallel import _launch, _overrides
from test_sdpa_attention import (BASE_OVERRIDES, assert_rel_close, bench_variant_overrides, build,
                                 logits_and_grads_of_both, tool_module)

# torch.compile'd kernels against the eager ops (fp32): the forward is elementwise (FMA contraction
# on a GPU may move it by an ulp); ∂a is a sum of N products, possibly in another order, so its error
# is bounded relative to Σ|g⊙s|. (Measured on CPU at the test's size: both equal the eager ops.)
COMPILE_REL_TOL = 1e-6
COMPILE_SUM_REL_TOL = 1e-5
# float64 fused operator against the reference gate with the test's own activations (which round
# differently from torch's F.silu etc.): agreement to float64 rounding.
FLOAT64_REL_TOL = 1e-12
# Norm kernels against the float64 formula in fp32.
LAYER_NORM_REL_TOL = 1e-6
# Whole models (4 layers, head) whose fused paths round differently from the unfused ones
# (F.layer_norm's kernel; the compiled gate's reduction): measured ≤ 5e-7 for logits and weight
# gradients. A gate gradient sums terms far larger than the result (as in tests/test_parallel.py),
# so one gate's rounding error is on the scale of the largest gate gradient, against which the gate
# gradients are compared together: measured ≤ 1.2e-5.
MODEL_REL_TOL = 1e-5
GATE_GRAD_REL_TOL = 1e-4

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

UNFUSED = ["gpas.fused=none", "norm.fused=false"]


def _config() -> TransformerConfig:
    return TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)


def _tensors(*shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype) for shape in shapes]


def _grads(output, upstream, inputs):
    grads = torch.autograd.grad((output * upstream).sum(), inputs, allow_unused=True)
    return [output.detach(), *grads]


# --------------------------------------------------------------------------- operator


def reference_gated_sum(x, f, a):
    """after_add: y = s − a·sg(s), s = x + f (the unfused gate, written here)."""
    s = x + f
    return s - a * s.detach()


def reference_gated_shortcut(x, f, a, k):
    """shortcut: y = k·(x − a·sg(x)) + f."""
    return (x - a * x.detach()) * k + f


def _operator(position: str, kernels, x, f, a, k: float):
    if position == "after_add":
        return GatedSum.apply(x, f, a, kernels)
    return GatedShortcutSum.apply(x, f, a, k, kernels)


def _reference(position: str, x, f, a, k: float):
    return reference_gated_sum(x, f, a) if position == "after_add" else reference_gated_shortcut(x, f, a, k)


@pytest.mark.parametrize("kernel", ["eager", "compile"])
@pytest.mark.parametrize("position,k", [("after_add", 1.0), ("shortcut", 1.0), ("shortcut", 1.7)])
def test_operator_matches_the_plain_gate(position, k, kernel):
    x, f, upstream = _tensors((16, 3, 64), (16, 3, 64), (16, 3, 64), seed=1)
    kernels = EAGER if kernel == "eager" else compiled_kernels()

    def run(fn):
        inputs = [x.clone().requires_grad_(), f.clone().requires_grad_(), torch.tensor(0.37, requires_grad=True)]
        return _grads(fn(*inputs), upstream, inputs)

    ours = run(lambda *inputs: _operator(position, kernels, *inputs, k))
    reference = run(lambda *inputs: _reference(position, *inputs, k))
    names = ("y", "dshortcut", "dbranch", "da")
    if kernel == "eager":
        for name, a, b in zip(names, ours, reference):
            assert torch.equal(a, b), f"{position} k={k} {name}: max|Δ| = {(a - b).abs().max():.3e}"
        return
    for name, a, b in zip(names[:3], ours[:3], reference[:3]):
        assert_rel_close(a, b, COMPILE_REL_TOL, f"compiled {position} k={k} {name}")
    saved, scale = (x + f, 1.0) if position == "after_add" else (x, k)  # ∂a = −Σ (scale·g)⊙saved
    bound = COMPILE_SUM_REL_TOL * (scale * upstream * saved).abs().sum()
    assert (ours[3] - reference[3]).abs() <= bound, (ours[3], reference[3], bound)


def test_operator_with_a_frozen_gate_saves_nothing_for_it():
    x, f = _tensors((4, 2, 8), (4, 2, 8))
    x.requires_grad_()
    a = torch.tensor(0.5)  # a gate with requires_grad=False (gpas.freeze)
    y = GatedSum.apply(x, f, a, EAGER)
    assert torch.equal(y, reference_gated_sum(x, f, a))
    assert y.grad_fn.saved_tensors == (None,)
    (dx,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(dx, torch.ones_like(x))


# --------------------------------------------------------------------------- module

# The gate activations, written here (methods.md §1.2)
ACTIVATIONS = {
    "silu": lambda a: a * torch.sigmoid(a),
    "identity": lambda a: a,
    "tanh": torch.tanh,
    "relu": lambda a: torch.where(a > 0, a, torch.zeros_like(a)),
    "leaky_relu": lambda a: torch.where(a > 0, a, 0.01 * a),
    "scaled_silu": lambda a: a * torch.sigmoid(8.0 * a),
}
ALPHAS = (-0.3, 0.7)  # per sub-layer; the MLP one (sublayer 1) is used, where ReLU is not dead


def _residual_add(activation: str, position: str, kernels, dtype, k: float = 1.0) -> ResidualAdd:
    gate = GPASGate(_config(), activation, per_sublayer=True).to(dtype)
    with torch.no_grad():
        gate.alpha.copy_(torch.tensor(ALPHAS, dtype=dtype))
    add = ResidualAdd()
    add.attach_gate(gate, position, sublayer=1)
    add.shortcut_scale = k
    add.gate_kernels = kernels
    add.gate = gate  # (kept alive and reachable for the test; the layer owns it in a model)
    return add


def _run_residual_add(add: ResidualAdd, x, f, upstream, bias=None, dropout=0.0, seed=0):
    inputs = [x.clone().requires_grad_(), f.clone().requires_grad_()]
    if bias is not None:
        inputs.append(bias.clone().requires_grad_())
    torch.manual_seed(seed)
    out = add(training=dropout > 0, fused=False)((inputs[1], inputs[2] if bias is not None else None), inputs[0],
                                                 dropout)
    return _grads(out, upstream, [*inputs, add.gate.alpha])


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("position", ["after_add", "shortcut"])
def test_fused_residual_add_matches_the_reference_gate(activation, position):
    k = 1.0 if position == "after_add" else 1.7
    x, f, upstream = _tensors((8, 2, 32), (8, 2, 32), (8, 2, 32), dtype=torch.float64, seed=2)
    fused = _residual_add(activation, position, EAGER, torch.float64, k)
    assert fused.fused_gate() == position
    ours = _run_residual_add(fused, x, f, upstream)

    alpha = torch.tensor(ALPHAS, dtype=torch.float64, requires_grad=True)
    inputs = [x.clone().requires_grad_(), f.clone().requires_grad_()]
    a = ACTIVATIONS[activation](alpha[1])
    reference = _grads(_reference(position, *inputs, a, k), upstream, [*inputs, alpha])
    for name, got, want in zip(("y", "dshortcut", "dbranch", "dalpha"), ours, reference):
        assert_rel_close(got, want, FLOAT64_REL_TOL, f"{activation} {position} {name}")
    assert ours[3][0] == 0 and ours[3][1] != 0  # the gate of the other sub-layer gets nothing

    # fp32: bitwise the unfused module
    x, f, upstream = (t.float() for t in (x, f, upstream))
    fused = _run_residual_add(_residual_add(activation, position, EAGER, torch.float32, k), x, f, upstream)
    unfused = _run_residual_add(_residual_add(activation, position, None, torch.float32, k), x, f, upstream)
    for name, got, want in zip(("y", "dshortcut", "dbranch", "dalpha"), fused, unfused):
        assert torch.equal(got, want), f"{activation} {position} {name} fp32: fused differs from unfused"


@pytest.mark.parametrize("position", ["after_add", "shortcut"])
def test_fused_residual_add_with_bias_and_dropout_is_bitwise_the_unfused_one(position):
    x, f, upstream = _tensors((8, 2, 32), (8, 2, 32), (8, 2, 32), seed=3)
    (bias,) = _tensors((32,), seed=4)
    runs = [_run_residual_add(_residual_add("silu", position, kernels, torch.float32), x, f, upstream, bias=bias,
                              dropout=0.3, seed=5) for kernels in (EAGER, None)]
    for name, got, want in zip(("y", "dshortcut", "dbranch", "dbias", "dalpha"), *runs):
        assert torch.equal(got, want), f"{position} {name}"
    dbranch = runs[0][2]
    assert 0.15 < (dbranch == 0).float().mean() < 0.45  # dropout did drop (p = 0.3)


def test_placements_that_stay_unfused():
    add = _residual_add("silu", "after_branch", EAGER, torch.float32)
    assert add.fused_gate() is None
    add = _residual_add("silu", "after_add", EAGER, torch.float32)
    add.gate.stop_gradient = False  # the "w/o sg" ablation
    assert add.fused_gate() is None
    add = _residual_add("silu", "after_add", None, torch.float32)  # gpas.fused=none
    assert add.fused_gate() is None


def test_kernel_modes():
    assert gate_kernels("eager") is EAGER and gate_kernels("none") is None
    assert gate_kernels("compile") is compiled_kernels() and compiled_kernels().name == "compile"
    assert gate_kernels("auto") is (compiled_kernels() if torch.cuda.is_available() else EAGER)
    with pytest.raises(ValueError, match="gpas.fused must be one of auto, compile, eager, none"):
        gate_kernels("fast")


# --------------------------------------------------------------------------- whole model, 1 process

MODELS = {  # name: (overrides, fused gate position of each sub-layer of layer 1 and of layer 2)
    "pre_gpas": (["gpas.enabled=true"], ("after_add", "after_add")),
    "deepnorm_gpas": (["gpas.enabled=true", "norm.scheme=deepnorm"], ("shortcut", "shortcut")),
    "mixln_gpas_per_sublayer": (["gpas.enabled=true", "norm.scheme=mixln", "gpas.per_sublayer=true"],
                                ("shortcut", "after_add")),  # layer 1 is a Post-LN layer
    "pre_layernorm_gpas": (["gpas.enabled=true", "norm.kind=layernorm"], ("after_add", "after_add")),
}


def _compare_models(overrides: list[str], fused_overrides: list[str], rel: float | None):
    """Logits and all gradients of a model with ``fused_overrides`` against the unfused one
    (bitwise when ``rel`` is None); returns the fused model."""
    fused, unfused = build(*overrides, *fused_overrides), build(*overrides, *UNFUSED)
    with torch.no_grad():  # gates away from 0 (where they are the identity), other weights as built
        for model in (fused, unfused):
            for layer in model.decoder.layers:
                layer.gpas.alpha.copy_(torch.linspace(0.1, 0.2, layer.gpas.alpha.numel()) * layer.layer_number)
    g = torch.Generator().manual_seed(3)
    (logits, grads), (ref_logits, ref_grads) = logits_and_grads_of_both(fused, unfused, g)
    assert grads.keys() == ref_grads.keys()
    gates = [n for n in grads if n.endswith("gpas.alpha")]
    assert len(gates) == len(fused.decoder.layers) and all(ref_grads[n].abs().max() > 0 for n in gates)
    compared = [("logits", logits, ref_logits), *((f"grad {n}", grads[n], ref_grads[n]) for n in grads)]
    for name, got, want in compared:
        if rel is None:
            assert torch.equal(got, want), f"{name}: max|Δ| = {(got - want).abs().max():.3e}"
        elif not name.endswith("gpas.alpha"):
            assert_rel_close(got, want, rel, name)
    if rel is not None:
        assert_rel_close(torch.cat([grads[n] for n in gates]), torch.cat([ref_grads[n] for n in gates]),
                         GATE_GRAD_REL_TOL, "gate gradients")
    return fused


@pytest.mark.parametrize("model", list(MODELS))
def test_fused_model_matches_the_unfused_one(megatron_env, model):
    overrides, positions = MODELS[model]
    layernorm = "norm.kind=layernorm" in overrides
    fused = _compare_models(overrides, [], MODEL_REL_TOL if layernorm else None)
    layers = fused.decoder.layers
    assert [add.fused_gate() for add in (layers[0].self_attn_bda, layers[1].self_attn_bda)] == list(positions)
    assert all(add.gate_kernels is EAGER for layer in layers for add in (layer.self_attn_bda, layer.mlp_bda))
    assert fused.decoder.final_layernorm.fused and layers[0].input_layernorm.fused


def test_compiled_model_matches_the_unfused_one(megatron_env):
    fused = _compare_models(["gpas.enabled=true"], ["gpas.fused=compile"], MODEL_REL_TOL)
    assert fused.decoder.layers[0].mlp_bda.gate_kernels is compiled_kernels()


# --------------------------------------------------------------------------- TP2+SP and PP2

LAYOUT_RUNS = {  # name: (layout, model, fused gate position)
    "tp2_sp": (["parallel.tensor=2", "parallel.sequence_parallel=true"], [], "after_add"),
    "pp2": (["parallel.pipeline=2"], ["norm.scheme=deepnorm"], "shortcut"),  # the shortcut gate across stages
}


@pytest.fixture(scope="module")
def layout_runs(workspace) -> list[dict]:
    """One torchrun launch (2 processes): each layout trained 2 steps fused and unfused."""
    ws = workspace
    cases = [{"name": "dataset", "kind": "dataset", "prefix": str(ws / "data" / "synthetic")}]
    for name, (layout, model, _) in LAYOUT_RUNS.items():
        for variant, extra in (("fused", []), ("unfused", UNFUSED)):
            cases.append({"name": f"{name}/{variant}", "kind": "train", "checksums": True, "structure": True,
                          "overrides": _overrides(ws, f"{name}_{variant}", *layout, *model, *extra,
                                                  "train.exit_after_steps=2")})
    return [r["cases"] for r in _launch(ws, "fused", 2, cases, timeout=300)]


@pytest.mark.parametrize("layout", list(LAYOUT_RUNS))
def test_fused_training_is_bitwise_the_unfused_one_in_parallel_layouts(layout, layout_runs):
    position = LAYOUT_RUNS[layout][2]
    for rank, cases in enumerate(layout_runs):
        for variant, gate, norm in (("fused", position, True), ("unfused", None, False)):
            slots = [slot for layer in cases[f"{layout}/{variant}"]["structure"].values() for slot in layer["slots"]]
            assert slots and all(s["fused_gate"] == gate and s["norm_fused"] == norm for s in slots), (variant, slots)
        fused, unfused = cases[f"{layout}/fused"]["records"], cases[f"{layout}/unfused"]["records"]
        assert [r["step"] for r in fused] == [1, 2]
        assert all(abs(a) > 1e-4 for a in fused[-1]["alpha"])  # the gates moved
        assert fused == unfused, f"{layout} rank {rank}: fused training differs from unfused"


# --------------------------------------------------------------------------- norms


def _norm(cls, width: int, dtype, fused: bool, bias: bool = False):
    kwargs = {"bias": bias} if cls is not ScalarRMSNorm else {}
    norm = cls(_config(), width, 1e-6, **kwargs).to(dtype)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
    norm.fused = fused
    return norm


def reference_norm(cls, x, weight, bias, eps=1e-6):
    """The norm's equation in float64."""
    if cls is LayerNorm:
        x = x - x.mean(-1, keepdim=True)
    y = weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if bias is None else y + bias


@pytest.mark.parametrize("cls,bias", [(RMSNorm, False), (RMSNorm, True), (LayerNorm, True), (ScalarRMSNorm, False)])
def test_fused_norm_matches_the_formula(cls, bias):
    x, upstream = _tensors((6, 2, 48), (6, 2, 48), seed=7)
    x = 3 + x  # a mean LayerNorm must remove
    fused, plain = _norm(cls, 48, torch.float32, True, bias), _norm(cls, 48, torch.float32, False, bias)

    def run(norm):
        xs = x.clone().requires_grad_()
        return _grads(norm(xs), upstream, [xs, *norm.parameters()])

    ours = run(fused)
    x64 = x.double().requires_grad_()
    params64 = [p.detach().double().requires_grad_() for p in fused.parameters()]
    reference = _grads(reference_norm(cls, x64, params64[0], params64[1] if bias else None), upstream.double(),
                       [x64, *params64])
    for name, got, want in zip(("y", "dx", "dweight", "dbias"), ours, reference):
        assert_rel_close(got.double(), want, LAYER_NORM_REL_TOL, f"{cls.__name__} {name}")
    if cls is not LayerNorm:  # on CPU F.rms_norm is the formula op for op
        assert all(torch.equal(a, b) for a, b in zip(ours, run(plain)))


@pytest.mark.parametrize("cls", [RMSNorm, LayerNorm])
def test_fused_norm_in_bf16_keeps_fp32_statistics(cls):
    """A large mean (LayerNorm) and a wide row: statistics in bf16 would be far off; the fused norm
    is the float64 norm of the same bf16 input, rounded (the weight applied in bf16 after it)."""
    (x,) = _tensors((4, 2, 1024), seed=8)
    x = (x + (50 if cls is LayerNorm else 0)).bfloat16()
    fused, plain = _norm(cls, 1024, torch.bfloat16, True), _norm(cls, 1024, torch.bfloat16, False)
    with torch.no_grad():
        y = fused(x)
        normalized = reference_norm(cls, x.double(), 1.0, None).bfloat16()
        expected = fused.weight * normalized
        if fused.bias is not None:
            expected = expected + fused.bias
    assert y.dtype == torch.bfloat16
    # one bf16 rounding of the normalized value (it may land on the other side) then the affine's
    ulps = ((y.double() - expected.double()).abs() / expected.double().abs().clamp_min(1e-3)).max()
    assert ulps <= 2 ** -7, f"{cls.__name__} bf16: {ulps:.3e}"
    if cls is RMSNorm:  # and bitwise the formula on CPU
        assert torch.equal(y, plain(x))


def test_set_fusions_follows_the_config():
    norms = torch.nn.ModuleList([_norm(RMSNorm, 8, torch.float32, False), _norm(LayerNorm, 8, torch.float32, False),
                                 CompressedRMSNorm(_config(), 8), _residual_add("silu", "after_add", None,
                                                                                torch.float32)])
    set_fusions(norms, load_config(None, ["gpas.fused=eager"]))
    assert [getattr(m, "fused", None) for m in norms[:3]] == [True, True, False]  # CRMSNorm has no kernel
    assert norms[3].gate_kernels is EAGER
    set_fusions(norms, load_config(None, UNFUSED))
    assert [m.fused for m in norms[:3]] == [False, False, False] and norms[3].gate_kernels is None


# --------------------------------------------------------------------------- config and benchmark


def test_config_keys_are_validated_and_not_inherited():
    cfg = load_config(None, BASE_OVERRIDES)
    assert (cfg.gpas.fused, cfg.norm.fused) == ("auto", True)
    with pytest.raises(ConfigError, match="gpas.fused must be one of auto, compile, eager, none, got 'fast'"):
        validate_settings(load_config(None, [*BASE_OVERRIDES, "gpas.fused=fast"]), world_size=1, check_files=False,
                          require_data=False)
    with pytest.raises(ConfigError, match="gpas.fused' must be a string, got False"):  # YAML's off
        load_config(None, ["gpas.fused=off"])
    tree = inherit_architecture({}, {"norm": {"scheme": "deepnorm", "fused": False},
                                     "gpas": {"enabled": True, "fused": "none"}})
    assert tree["norm"] == {"scheme": "deepnorm"} and tree["gpas"] == {"enabled": True}


def test_bench_schemes_unfused_variant():
    variant_overrides = bench_variant_overrides()
    assert variant_overrides("pre~unfused", True, 256) == [
        "norm.scheme=pre", "gpas.enabled=true", "gpas.fused=none", "norm.fused=false"]
    assert variant_overrides("pre@layernorm~unfused:megatron", False, 256) == [
        "norm.scheme=pre", "gpas.enabled=false", "model.attention=megatron", "norm.kind=layernorm",
        "gpas.fused=none", "norm.fused=false"]
    assert not any("fused" in o for o in variant_overrides("pre", True, 256))


def test_bench_gpas_add_runs(capsys):
    """tools/bench_gpas_add.py at the operator tests' size (in this process: the compiled kernels are warm)."""
    threads = torch.get_num_threads()
    try:
        tool_module("bench_gpas_add").main(["--shape", "16", "3", "64", "--rounds", "2", "--warmup", "1"])
    finally:
        torch.set_num_threads(threads)  # the tool runs on one CPU thread
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "ms" not in line]
    assert [row.split(" | ")[0] for row in rows] == [
        "| residual add without GPAS", "| unfused (none)", "| eager Function (eager)", "| compiled Function (compile)"]
