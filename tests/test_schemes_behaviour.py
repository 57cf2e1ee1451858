"""Behaviour of the normalization schemes and the GPAS options (methods.md §1.2-1.5, §2).

  * α = 0: every GPAS variant on every host is bit-identical to its host without GPAS;
  * DeepNorm: β-init statistics (xavier-normal gains 1 for q, k and (8N)^-¼ for v, o, gate,
    up, down), the GPAS default without β-init and its switch, the residual scale (2N)^¼;
  * each ablation switch changes exactly what it names (stop-gradient, activation,
    per-sub-layer gates, after_norm placement, freeze, fixed values);
  * config validation of the new options, each with its own message;
  * checkpoints: refusal across scheme/GPAS options, Mix-LN's homogeneous layers and
    stacked dist-checkpoint keys.

Model-level checks use the tiny 4-layer model of test_model_reference.py; training steps
use a single-process Trainer on the synthetic dataset of tests/synthetic.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from megatron.core import parallel_state
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import unwrap_model

from megatron_gpas import distributed
from megatron_gpas.checkpoint import RUN_CONFIG, CheckpointError, check_compatible, find_latest
from megatron_gpas.config import ConfigError, load_config, save_config
from megatron_gpas.validation import validate
from megatron_gpas.model.gpas import GPASGate, is_gate
from megatron_gpas.training import Trainer
from process_groups import release_parallel_state
from synthetic import write_synthetic_dataset
from test_model_reference import BASE_OVERRIDES, build, inputs, make_cfg
from test_schemes_reference import perturb

pytestmark = [
    pytest.mark.usefixtures("parallel_state_released"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

NUM_LAYERS = 4  # model.preset=tiny
ZERO_GATES = [(0.0, 0.0)] * NUM_LAYERS


# --------------------------------------------------------------------------- environment


@pytest.fixture
def mp():
    """Megatron's parallel state (world of 1) for building models; Trainer tests tear it
    down and rebuild it themselves, so it is (re)initialised per test when missing."""
    if not parallel_state.model_parallel_is_initialized():
        distributed.init_distributed(load_config(None, BASE_OVERRIDES))
    yield


def forward_backward(model, seed: int = 7):
    tokens, position_ids, labels = inputs(model.vocab_size, seed)
    model.zero_grad(set_to_none=True)
    logits = model(tokens, position_ids, None)
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)).backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


# =========================================================================== α = 0 is the host

# host name -> (host overrides, GPAS variants on it)
PRE_POSITIONS = [["gpas.position=before_sublayer"], ["gpas.position=after_norm"], ["gpas.position=after_branch"]]
ZERO_GATE_VARIANTS = {
    "pre": (["norm.scheme=pre"], [
        [], *PRE_POSITIONS, ["gpas.stop_gradient=false"], ["gpas.per_sublayer=true"],
        ["gpas.activation=identity"], ["gpas.activation=tanh"], ["gpas.activation=relu"],
        ["gpas.activation=leaky_relu"], ["gpas.activation=scaled_silu"],
    ]),
    "post": (["norm.scheme=post"], [[], ["gpas.per_sublayer=true"]]),
    "deepnorm": (["norm.scheme=deepnorm"], [[], ["gpas.stop_gradient=false"]]),
    "sandwich": (["norm.scheme=sandwich"], [[], *PRE_POSITIONS]),
    "mixln": (["norm.scheme=mixln", "norm.mixln_post_layers=2"], [[], ["gpas.per_sublayer=true"]]),
    "lns_fixed": (["norm.scheme=lns", "norm.lns_mode=fixed"], [[], *PRE_POSITIONS]),
    "lns_init": (["norm.scheme=lns", "norm.lns_mode=init"], [[]]),
    "simplenorm": (["norm.scheme=simplenorm"], [[], ["gpas.position=before_sublayer"], ["gpas.position=after_branch"]]),
}


@pytest.mark.parametrize("host", list(ZERO_GATE_VARIANTS))
def test_zero_gates_are_bit_identical_to_the_host(mp, host):
    host_overrides, variants = ZERO_GATE_VARIANTS[host]
    base = build(make_cfg(*host_overrides, "gpas.enabled=false"), seed=99)
    perturb(base, seed=3)
    base_logits, base_grads = forward_backward(base)
    base_params = dict(base.named_parameters())
    for extra in variants:
        what = f"{host} + GPAS {extra or '(default)'}"
        model = build(make_cfg(*host_overrides, "gpas.enabled=true", *extra))
        gate_names = {n for n, _ in model.named_parameters() if n.endswith("gpas.alpha")}
        assert len(gate_names) == NUM_LAYERS
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in gate_names:
                    param.zero_()
                else:
                    param.copy_(base_params[name])
        assert set(base_params) == {n for n, _ in model.named_parameters()} - gate_names, what
        logits, grads = forward_backward(model)
        assert torch.equal(logits, base_logits), f"{what}: logits differ at α = 0"
        for name, grad in grads.items():
            if name in gate_names and extra == ["gpas.activation=relu"]:
                assert torch.equal(grad, torch.zeros_like(grad)), f"{what}: ReLU'(0) = 0, the gate cannot move"
            elif name in gate_names:
                assert grad is not None and grad.abs().min().item() > 0, f"{what}: {name} gets no gradient at α = 0"
            else:
                assert torch.equal(grad, base_grads[name]), f"{what}: grad {name} differs at α = 0"


# =========================================================================== DeepNorm

DN_SHAPE = [
    "model.num_layers=8", "model.hidden_size=256", "model.num_attention_heads=4", "model.num_query_groups=2",
    "model.ffn_hidden_size=512", "model.vocab_size=256", "model.make_vocab_size_divisible_by=64",
    "train.seq_length=32", "norm.scheme=deepnorm",
]
DN_REL = 0.03  # std within 3 % (sampling error of one slice: 0.3-0.4 %; the alternatives differ by ≥ 10 %)


def projection_slices(layer, hidden: int, heads: int, groups: int, head_dim: int, ffn: int) -> dict:
    """HF-layout q, k, v, o, gate, up, down of one layer from Megatron's fused weights."""
    qkv = layer.self_attention.linear_qkv.weight.detach().view(groups, heads // groups + 2, head_dim, hidden)
    fc1 = layer.mlp.linear_fc1.weight.detach()
    return {
        "q": qkv[:, : heads // groups], "k": qkv[:, heads // groups], "v": qkv[:, heads // groups + 1],
        "o": layer.self_attention.linear_proj.weight.detach(),
        "gate": fc1[:ffn], "up": fc1[ffn:], "down": layer.mlp.linear_fc2.weight.detach(),
    }


def xavier_std(fan_in: int, fan_out: int, gain: float) -> float:
    return gain * math.sqrt(2.0 / (fan_in + fan_out))


@pytest.mark.parametrize("gpas,beta_init_flag,expect_beta", [
    (False, None, True),   # plain DeepNorm: β-init (the default)
    (True, None, False),   # DeepNorm+GPAS: official code, no β-init (plain 0.02)
    (True, True, True),    # ... switched on
    (False, False, False),  # plain DeepNorm with the β-init switched off
], ids=["deepnorm", "deepnorm+gpas", "deepnorm+gpas+beta_init", "deepnorm-beta_init"])
def test_deepnorm_init_statistics(mp, gpas, beta_init_flag, expect_beta):
    overrides = [*DN_SHAPE, f"gpas.enabled={str(gpas).lower()}"]
    if beta_init_flag is not None:
        overrides.append(f"norm.deepnorm_beta_init={str(beta_init_flag).lower()}")
    cfg = make_cfg(*overrides)
    n, h, heads, groups, ffn = 8, 256, 4, 2, 512
    d = h // heads
    beta = (8 * n) ** -0.25
    expected = {
        "q": xavier_std(h, heads * d, 1.0), "k": xavier_std(h, groups * d, 1.0),
        "v": xavier_std(h, groups * d, beta), "o": xavier_std(heads * d, h, beta),
        "gate": xavier_std(h, ffn, beta), "up": xavier_std(h, ffn, beta), "down": xavier_std(ffn, h, beta),
    } if expect_beta else dict.fromkeys(("q", "k", "v", "o", "gate", "up", "down"), 0.02)
    model = build(cfg, seed=cfg.train.seed)
    assert len(model.decoder.layers) == n
    for layer in model.decoder.layers:
        # residual scale (2N)^¼ on the shortcut of both sub-layers
        assert layer.self_attn_bda.shortcut_scale == pytest.approx((2 * n) ** 0.25, rel=1e-12)
        assert layer.mlp_bda.shortcut_scale == pytest.approx((2 * n) ** 0.25, rel=1e-12)
        for key, w in projection_slices(layer, h, heads, groups, d, ffn).items():
            w = w.double()
            std = w.std().item()
            assert abs(std / expected[key] - 1) < DN_REL, \
                f"layer {layer.layer_number} {key}: std {std:.5f}, want {expected[key]:.5f}"
            assert abs(w.mean().item()) < 0.02 * expected[key], f"layer {layer.layer_number} {key}: mean"
        for norm in (layer.input_layernorm, layer.pre_mlp_layernorm):
            assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    # untouched by the β-init: embedding sqrt(2/5), untied head 0.02
    emb = model.embedding.word_embeddings.weight.detach().double()
    head = model.output_layer.weight.detach().double()
    assert abs(emb.std().item() / math.sqrt(2 / 5) - 1) < DN_REL
    assert abs(head.std().item() / 0.02 - 1) < DN_REL
    # the β-init draws differ per layer
    assert not torch.equal(model.decoder.layers[0].mlp.linear_fc2.weight, model.decoder.layers[1].mlp.linear_fc2.weight)


@pytest.mark.parametrize("scheme", ["pre", "post", "deepnorm", "sandwich", "mixln", "lns"])
def test_residual_scale_only_for_deepnorm(mp, scheme):
    model = build(make_cfg(f"norm.scheme={scheme}", "gpas.enabled=true"))
    want = (2 * NUM_LAYERS) ** 0.25 if scheme == "deepnorm" else 1.0  # 8^¼ = 1.6818
    for layer in model.decoder.layers:
        assert layer.self_attn_bda.shortcut_scale == pytest.approx(want, rel=1e-12)
        assert layer.mlp_bda.shortcut_scale == pytest.approx(want, rel=1e-12)


# =========================================================================== ablation switches


def _gate_config() -> TransformerConfig:
    return TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)


def _gate(alpha: float, **kwargs) -> GPASGate:
    gate = GPASGate(_gate_config(), **kwargs).double()
    with torch.no_grad():
        gate.alpha.fill_(alpha)
    return gate


def _x_and_upstream(seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(4, 3, 8, generator=g, dtype=torch.float64),
            torch.randn(4, 3, 8, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("alpha", [-1.0, 0.0, 0.4, 2.0])
def test_without_stop_gradient_the_x_gradient_is_scaled(alpha):
    x, upstream = _x_and_upstream(1)
    results = {}
    for sg in (True, False):
        gate = _gate(alpha, stop_gradient=sg)
        xx = x.clone().requires_grad_(True)
        y = gate(xx)
        y.backward(upstream)
        results[sg] = (y.detach(), xx.grad, gate.alpha.grad.clone())
    scale = 1.0 - alpha / (1.0 + math.exp(-alpha))
    (y_sg, gx_sg, ga_sg), (y_no, gx_no, ga_no) = results[True], results[False]
    assert torch.equal(y_sg, y_no)  # same forward
    assert torch.equal(gx_sg, upstream)  # sg: identity Jacobian
    torch.testing.assert_close(gx_no, scale * upstream, rtol=1e-13, atol=1e-14)  # w/o sg: (1 − a(α))·g
    torch.testing.assert_close(ga_no, ga_sg, rtol=1e-12, atol=1e-13)  # dL/dα is the same either way


def test_without_stop_gradient_in_the_model_only_gradients_change(mp):
    models = {}
    for sg in ("true", "false"):
        models[sg] = build(make_cfg("gpas.enabled=true", f"gpas.stop_gradient={sg}"))
        perturb(models[sg], seed=4)
    logits_sg, grads_sg = forward_backward(models["true"])
    logits_no, grads_no = forward_backward(models["false"])
    assert torch.equal(logits_sg, logits_no)
    emb = "embedding.word_embeddings.weight"
    assert (grads_sg[emb] - grads_no[emb]).abs().max() > 1e-2 * grads_sg[emb].abs().max()
    assert all(not layer.gpas.stop_gradient for layer in models["false"].decoder.layers)


def _sigmoid(a: float) -> float:
    return 1.0 / (1.0 + math.exp(-a))


# name -> (a(α), a'(0)) from methods.md §1.2
ACTIVATION_TABLE = {
    "silu": (lambda a: a * _sigmoid(a), 0.5),
    "identity": (lambda a: a, 1.0),
    "tanh": (math.tanh, 1.0),
    "relu": (lambda a: max(a, 0.0), 0.0),
    "leaky_relu": (lambda a: a if a > 0 else 0.01 * a, 0.01),
    "scaled_silu": (lambda a: a * _sigmoid(8.0 * a), 0.5),  # β = 8 (gpas.silu_beta default)
}


@pytest.mark.parametrize("name", list(ACTIVATION_TABLE))
def test_activation_values_and_slope_at_zero(mp, name):
    act, slope0 = ACTIVATION_TABLE[name]
    for alpha in (-2.0, -0.3, 0.5, 1.7):
        gate = _gate(alpha, activation=name)
        assert gate.scale().item() == pytest.approx(1.0 - act(alpha), rel=1e-12, abs=1e-15)
        x, _ = _x_and_upstream(2)
        torch.testing.assert_close(gate(x), (1.0 - act(alpha)) * x, rtol=1e-13, atol=1e-14)
    # a'(0) from the gate gradient: dL/dα = −a'(0)·Σ g⊙x
    gate = _gate(0.0, activation=name)
    x, upstream = _x_and_upstream(3)
    gate(x).backward(upstream)
    measured = -gate.alpha.grad.item() / float((upstream * x).sum())
    assert measured == pytest.approx(slope0, rel=1e-12, abs=1e-15)
    # the config option reaches every layer's gate
    model = build(make_cfg("gpas.enabled=true", f"gpas.activation={name}"))
    for layer in model.decoder.layers:
        assert layer.gpas.activation == name
        with torch.no_grad():
            layer.gpas.alpha.fill_(0.8)
        assert layer.gpas.scale().item() == pytest.approx(1.0 - act(0.8), rel=1e-6)


def test_scaled_silu_beta_is_configurable(mp):
    model = build(make_cfg("gpas.enabled=true", "gpas.activation=scaled_silu", "gpas.silu_beta=2.5"))
    gate = model.decoder.layers[0].gpas
    with torch.no_grad():
        gate.alpha.fill_(0.6)
    assert gate.scale().item() == pytest.approx(1.0 - 0.6 * _sigmoid(2.5 * 0.6), rel=1e-6)


def _capture(module, store: dict, key: str, output: bool = False):
    if output:
        return module.register_forward_hook(
            lambda m, args, out: store.__setitem__(key, (out[0] if isinstance(out, tuple) else out).detach().clone()))
    return module.register_forward_pre_hook(lambda m, args: store.__setitem__(key, args[0].detach().clone()))


def _run_layer0(model, hooks_spec) -> dict:
    store: dict = {}
    handles = [_capture(module, store, key, output) for key, module, output in hooks_spec]
    try:
        tokens, position_ids, _ = inputs(model.vocab_size)
        with torch.no_grad():
            model(tokens, position_ids, None)
    finally:
        for handle in handles:
            handle.remove()
    return store


def test_per_sublayer_gates_act_on_their_own_add(mp):
    default = build(make_cfg("gpas.enabled=true"))
    assert all(layer.gpas.alpha.shape == (1,) for layer in default.decoder.layers)
    model = build(make_cfg("gpas.enabled=true", "gpas.per_sublayer=true"))
    perturb(model, seed=6, gates=ZERO_GATES)
    layers = model.decoder.layers
    assert all(layer.gpas.alpha.shape == (2,) for layer in layers)
    assert sum(n.endswith("gpas.alpha") for n, _ in model.named_parameters()) == NUM_LAYERS
    layer0 = layers[0]
    spec = [("h", layer0.pre_mlp_layernorm, False), ("out", layer0, True)]  # after the attn add / the MLP add

    def run(a_attn, a_mlp):
        with torch.no_grad():
            layer0.gpas.alpha.copy_(torch.tensor([a_attn, a_mlp]))
        return _run_layer0(model, spec)

    alpha = 0.7
    scale = 1.0 - alpha * _sigmoid(alpha)
    base, attn_only, mlp_only = run(0.0, 0.0), run(alpha, 0.0), run(0.0, alpha)
    # the attention gate scales the stream after the attention add ...
    torch.testing.assert_close(attn_only["h"], scale * base["h"], rtol=1e-6, atol=1e-6)
    # ... and the MLP gate leaves it alone but scales the stream after the MLP add
    assert torch.equal(mlp_only["h"], base["h"])
    torch.testing.assert_close(mlp_only["out"], scale * base["out"], rtol=1e-6, atol=1e-6)
    assert (attn_only["h"] - base["h"]).abs().max() > 0.1 * base["h"].abs().max()


def test_after_norm_placement_equals_its_equation(mp):
    """x' = x + f(GPAS(LN(x))): the gate scales the normalized input of each sub-layer and
    neither the shortcut nor the stream."""
    cfg = make_cfg("gpas.enabled=true", "gpas.position=after_norm")
    model = build(cfg)
    perturb(model, seed=8, gates=[(0.6, 0.0)] * NUM_LAYERS)
    layer0 = model.decoder.layers[0]
    a = 0.6 * _sigmoid(0.6)
    seen = _run_layer0(model, [
        ("x", layer0.input_layernorm, False),
        ("qkv_in", layer0.self_attention.linear_qkv, False),
        ("attn_out", layer0.self_attention.linear_proj, True),
        ("h", layer0.pre_mlp_layernorm, False),
        ("fc1_in", layer0.mlp.linear_fc1, False),
        ("mlp_out", layer0.mlp.linear_fc2, True),
        ("out", layer0, True),
    ])

    def rmsnorm(x, w):
        return w.detach() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm.eps))

    torch.testing.assert_close(seen["qkv_in"], (1 - a) * rmsnorm(seen["x"], layer0.input_layernorm.weight),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen["h"], seen["x"] + seen["attn_out"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(seen["fc1_in"], (1 - a) * rmsnorm(seen["h"], layer0.pre_mlp_layernorm.weight),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen["out"], seen["h"] + seen["mlp_out"], rtol=1e-6, atol=1e-6)


def test_fixed_values_without_freeze_only_initialise(mp, tmp_path):
    """gpas.fixed_values alone sets the initial values (learnable); per_sublayer takes pairs,
    and a list of L numbers gives both sub-layers the same value (README)."""
    pairs = tmp_path / "pairs.yaml"
    pairs.write_text(yaml.safe_dump([[0.1, -0.2], [0.3, 0.4], [-0.5, 0.6], [0.7, 0.8]]))
    singles = tmp_path / "singles.json"
    singles.write_text("[0.25, -0.5, 1.0, 0.125]")
    model = build(make_cfg("gpas.enabled=true", "gpas.per_sublayer=true", f"gpas.fixed_values={pairs}"))
    for layer, want in zip(model.decoder.layers, [[0.1, -0.2], [0.3, 0.4], [-0.5, 0.6], [0.7, 0.8]]):
        assert torch.equal(layer.gpas.alpha.detach(), torch.tensor(want, dtype=torch.float32))
        assert layer.gpas.alpha.requires_grad
    model = build(make_cfg("gpas.enabled=true", "gpas.per_sublayer=true", f"gpas.fixed_values={singles}"))
    for layer, want in zip(model.decoder.layers, [0.25, -0.5, 1.0, 0.125]):
        assert torch.equal(layer.gpas.alpha.detach(), torch.tensor([want, want]))


# --------------------------------------------------------------------------- Trainer runs


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("schemes_behaviour")
    write_synthetic_dataset(str(ws / "synthetic"), vocab_size=256)
    return ws


def trainer_overrides(ws: Path, run: str, *extra: str) -> list[str]:
    return [
        *BASE_OVERRIDES,  # tiny 4-layer model, vocab 256, seq 32
        "gpas.enabled=true", "gpas.clip_grad=0.01", "optim.clip_grad=1.0", "optim.lr=1.0e-3",
        "train.steps=2", "train.micro_batch_size=2", "train.global_batch_size=2", "train.eval_iters=1",
        f"data.paths=['{ws / 'synthetic'}']", "data.tokenizer.kind='null'", "data.tokenizer.vocab_size=256",
        f"data.cache_dir='{ws / 'data_cache'}'",
        f"logging.dir='{ws / 'runs' / run}'", "logging.tensorboard=false", "logging.plots=false",
        *extra,
    ]


def make_trainer(overrides: list[str]) -> Trainer:
    release_parallel_state()
    return Trainer(load_config(None, overrides))


def params_of(trainer: Trainer) -> dict[str, torch.nn.Parameter]:
    return dict(unwrap_model(trainer.model[0]).named_parameters())


def one_step(trainer: Trainer) -> dict:
    return trainer.train_step(trainer._iterators(trainer.train_ds, 0))


@pytest.fixture(scope="module")
def mixln_checkpoint(workspace):
    """A Mix-LN+GPAS run (learnable gates): one step, then a checkpoint."""
    root = workspace / "ckpt_mixln"
    trainer = make_trainer(trainer_overrides(workspace, "mixln", "norm.scheme=mixln", "norm.mixln_post_layers=1",
                                             f"checkpoint.save='{root}'"))
    try:
        gates = {n: p.detach().clone() for n, p in params_of(trainer).items() if n.endswith("gpas.alpha")}
        values = one_step(trainer)
        moved = {n: p.detach().clone() for n, p in params_of(trainer).items() if n.endswith("gpas.alpha")}
        trainer.save_checkpoint()
        return {"root": root, "path": find_latest(str(root)), "cfg": trainer.cfg, "values": values,
                "gates_before": gates, "gates": moved}
    finally:
        trainer.close(keep_process_group=True)


def test_learnable_gates_move_and_are_clipped_as_a_group(mixln_checkpoint):
    """Control for the frozen/fixed runs below: learnable gates get a gradient and move."""
    assert mixln_checkpoint["values"]["train/gate_grad_norm"] > 0
    for name, before in mixln_checkpoint["gates_before"].items():
        after = mixln_checkpoint["gates"][name]
        assert not torch.equal(before, after), f"{name} did not move"


def _check_frozen_step(trainer: Trainer, expected_gates: dict[str, torch.Tensor]):
    params = params_of(trainer)
    gates = {n: p for n, p in params.items() if n.endswith("gpas.alpha")}
    assert len(gates) == NUM_LAYERS
    for name, p in gates.items():
        assert not p.requires_grad, name
        assert torch.equal(p.detach(), expected_gates[name]), f"{name}: {p.tolist()} != {expected_gates[name].tolist()}"
    # no optimizer state: the gates are not among the optimizer's parameters
    assert not any(is_gate(p) for p in trainer.optimizer.get_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    values = one_step(trainer)
    result = trainer.last_step_result
    assert result.updated and result.grad_norm > 0
    assert result.gate_grad_norm == 0.0 and values["train/gate_grad_norm"] == 0.0
    for name, p in params.items():
        if name in gates:
            assert torch.equal(p.detach(), before[name]), f"frozen {name} moved"
            assert p.grad is None and getattr(p, "main_grad", None) is None, f"frozen {name} got a gradient"
        else:
            assert not torch.equal(p.detach(), before[name]), f"{name} did not move"
    gate_values = trainer.gate_values()[0]
    assert torch.equal(gate_values.float(), torch.stack([expected_gates[n] for n in sorted(gates)]))


def test_freeze_with_fixed_values_from_yaml(workspace):
    values = [0.5, -0.25, 1.5, 0.125]
    path = workspace / "gates.yaml"
    path.write_text(yaml.safe_dump(values))
    trainer = make_trainer(trainer_overrides(workspace, "fixed_yaml", "gpas.freeze=true",
                                             f"gpas.fixed_values='{path}'"))
    try:
        expected = {f"decoder.layers.{i}.gpas.alpha": torch.tensor([v], dtype=torch.float32)
                    for i, v in enumerate(values)}
        _check_frozen_step(trainer, expected)
    finally:
        trainer.close(keep_process_group=True)


def test_freeze_with_fixed_values_from_checkpoint_directory(workspace, mixln_checkpoint):
    """Gates of another run (Mix-LN) read offline from its checkpoint directory (the root,
    resolved through ``latest``) into a frozen Pre-LN+GPAS run."""
    saved = mixln_checkpoint["gates"]
    assert len({float(v) for v in saved.values()}) == NUM_LAYERS and all(float(v) != 0 for v in saved.values())
    trainer = make_trainer(trainer_overrides(workspace, "fixed_ckpt", "gpas.freeze=true",
                                             f"gpas.fixed_values='{mixln_checkpoint['root']}'"))
    try:
        _check_frozen_step(trainer, saved)
    finally:
        trainer.close(keep_process_group=True)


# =========================================================================== config validation

VALIDATION_BASE = [*BASE_OVERRIDES, "data.paths=['/nonexistent/corpus']", "data.tokenizer.kind='null'",
                   "data.tokenizer.vocab_size=256"]


def _validate(*overrides: str) -> None:
    validate(load_config(None, [*VALIDATION_BASE, *overrides]), world_size=1, check_files=False)


INVALID = {
    "unknown_position": (["gpas.enabled=true", "gpas.position=middle"], "unknown gpas.position 'middle'"),
    "position_on_deepnorm": (["norm.scheme=deepnorm", "gpas.enabled=true", "gpas.position=after_norm"],
                             "gpas.position=after_norm is defined for pre-norm hosts"),
    "position_on_mixln": (["norm.scheme=mixln", "gpas.enabled=true", "gpas.position=before_sublayer"],
                          "gpas.position=before_sublayer is defined for pre-norm hosts"),
    "position_on_post": (["norm.scheme=post", "gpas.enabled=true", "gpas.position=after_branch"],
                         "gpas.position=after_branch is defined for pre-norm hosts"),
    "relu_dead_gate": (["gpas.enabled=true", "gpas.activation=relu"], "gpas.activation=relu with gpas.init <= 0"),
    "bad_lns_mode": (["norm.scheme=lns", "norm.lns_mode=learned"], "norm.lns_mode must be 'init' or 'fixed', got 'learned'"),
    "mixln_too_many": (["norm.scheme=mixln", "norm.mixln_post_layers=5"],
                       "norm.mixln_post_layers (5) must be between 0 and model.num_layers (4)"),
    "mixln_negative": (["norm.scheme=mixln", "norm.mixln_post_layers=-1"],
                       "norm.mixln_post_layers (-1) must be between 0 and model.num_layers (4)"),
    "missing_fixed_values": (["gpas.enabled=true", "gpas.fixed_values=/nonexistent/gates.yaml"],
                             "gpas.fixed_values not found: /nonexistent/gates.yaml"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_new_options_are_rejected(case):
    overrides, message = INVALID[case]
    with pytest.raises(ConfigError) as excinfo:
        _validate(*overrides)
    assert message in str(excinfo.value)
    # its own message: no other invalid case's message matches it
    others = {m for c, (_, m) in INVALID.items() if c != case and m != message}
    assert not any(m in str(excinfo.value) for m in others)
    if case == "position_on_deepnorm":
        assert "pre, sandwich, lns" in str(excinfo.value) and "norm.scheme=deepnorm" in str(excinfo.value)


@pytest.mark.parametrize("overrides", [
    *[[f"norm.scheme={s}", "gpas.enabled=true", f"gpas.position={p}"]
      for s in ("pre", "sandwich", "lns") for p in ("after_sublayer", "before_sublayer", "after_norm", "after_branch")],
    *[[f"norm.scheme={s}", "gpas.enabled=true"] for s in ("post", "deepnorm", "mixln")],
    ["gpas.enabled=true", "gpas.activation=relu", "gpas.allow_dead_gate=true"],
    ["gpas.enabled=true", "gpas.activation=relu", "gpas.init=0.1"],
    ["norm.scheme=lns", "norm.lns_mode=fixed"],
    ["norm.scheme=mixln", "norm.mixln_post_layers=0"],
    ["norm.scheme=mixln", "norm.mixln_post_layers=4"],
], ids=lambda o: ",".join(x.split(".", 1)[1] for x in o))
def test_valid_new_options_pass(overrides):
    _validate(*overrides)


def test_existing_fixed_values_file_passes(tmp_path):
    path = tmp_path / "gates.yaml"
    path.write_text(yaml.safe_dump([0.1, 0.2, 0.3, 0.4]))
    _validate("gpas.enabled=true", f"gpas.fixed_values={path}")


# =========================================================================== checkpoints


def _saved_config_dir(tmp_path: Path, *overrides: str) -> str:
    """A directory holding a run_config.yaml as checkpoint.save writes it."""
    path = tmp_path / "iter_0000001"
    path.mkdir()
    save_config(make_cfg(*overrides), path / RUN_CONFIG)
    return str(path)


ARCH_CHANGES = [  # (host, change, the one reported difference)
    ("pre", ["norm.scheme=sandwich"], "norm.scheme: checkpoint has 'pre', config has 'sandwich'"),
    ("pre", ["gpas.position=after_norm"], "gpas.position: checkpoint has 'after_sublayer', config has 'after_norm'"),
    ("pre", ["gpas.enabled=false"], "gpas.enabled: checkpoint has True, config has False"),
    ("pre", ["gpas.per_sublayer=true"], "gpas.per_sublayer: checkpoint has False, config has True"),
    ("pre", ["gpas.stop_gradient=false"], "gpas.stop_gradient: checkpoint has True, config has False"),
    ("pre", ["gpas.activation=tanh"], "gpas.activation: checkpoint has 'silu', config has 'tanh'"),
    ("lns", ["norm.lns_mode=fixed"], "norm.lns_mode: checkpoint has 'init', config has 'fixed'"),
    # effective value: the default k = floor(4 / 4) = 1 Post-LN layer
    ("mixln", ["norm.mixln_post_layers=2"], "norm.mixln_post_layers: checkpoint has 1, config has 2"),
    ("pre", ["norm.eps=1.0e-5"], "norm.eps: checkpoint has 1e-06, config has 1e-05"),
]


@pytest.mark.parametrize("host,change,line", ARCH_CHANGES, ids=[c[1][0].split("=")[0] for c in ARCH_CHANGES])
def test_checkpoint_refuses_another_scheme_or_gpas_option(tmp_path, host, change, line):
    path = _saved_config_dir(tmp_path, f"norm.scheme={host}", "gpas.enabled=true")
    check_compatible(make_cfg(f"norm.scheme={host}", "gpas.enabled=true"), path)  # same: fine
    with pytest.raises(CheckpointError) as excinfo:
        check_compatible(make_cfg(f"norm.scheme={host}", "gpas.enabled=true", *change), path)
    assert line in str(excinfo.value)
    assert str(excinfo.value).count(": checkpoint has ") == 1  # exactly the one difference


@pytest.mark.parametrize("host,saved,loaded", [
    ("mixln", [], ["norm.mixln_post_layers=1"]),  # default k = floor(L/4) = 1 builds the same model
    ("pre", [], ["gpas.silu_beta=3.0"]),  # beta only matters for scaled_silu
    ("pre", [], ["norm.lns_mode=fixed", "norm.mixln_post_layers=2"]),  # options of other schemes
])
def test_checkpoint_compares_effective_architecture(tmp_path, host, saved, loaded):
    path = _saved_config_dir(tmp_path, f"norm.scheme={host}", "gpas.enabled=true", *saved)
    check_compatible(make_cfg(f"norm.scheme={host}", "gpas.enabled=true", *loaded), path)


def test_checkpoint_lists_every_difference(tmp_path):
    path = _saved_config_dir(tmp_path, "norm.scheme=pre", "gpas.enabled=true")
    with pytest.raises(CheckpointError) as excinfo:
        check_compatible(make_cfg("norm.scheme=sandwich", "gpas.enabled=true", "gpas.position=after_branch"), path)
    message = str(excinfo.value)
    assert "norm.scheme: checkpoint has 'pre', config has 'sandwich'" in message
    assert "gpas.position: checkpoint has 'after_sublayer', config has 'after_branch'" in message


@pytest.mark.parametrize("change", [["gpas.freeze=true"], ["gpas.clip_grad=0.5"], ["gpas.init=0.3"],
                                    ["norm.deepnorm_beta_init=true"]])
def test_checkpoint_accepts_non_architectural_options(tmp_path, change):
    path = _saved_config_dir(tmp_path, "norm.scheme=pre", "gpas.enabled=true")
    check_compatible(make_cfg("norm.scheme=pre", "gpas.enabled=true", *change), path)


def test_real_mixln_checkpoint_refuses_pre(workspace, mixln_checkpoint):
    path = mixln_checkpoint["path"]
    check_compatible(mixln_checkpoint["cfg"], path)
    overrides = trainer_overrides(workspace, "resume_pre", "norm.scheme=pre",
                                  f"checkpoint.load='{mixln_checkpoint['root']}'")
    release_parallel_state()
    with pytest.raises(CheckpointError) as excinfo:
        Trainer(load_config(None, overrides))
    assert "norm.scheme: checkpoint has 'mixln', config has 'pre'" in str(excinfo.value)
    assert not parallel_state.model_parallel_is_initialized()  # the failed Trainer cleaned up


@pytest.mark.parametrize("k", [None, 1, 2])
def test_mixln_parameter_names_are_homogeneous(mp, k):
    overrides = ["norm.scheme=mixln", "gpas.enabled=true"]
    if k is None:
        k = NUM_LAYERS // 4  # the default: ⌊L/4⌋
    else:
        overrides.append(f"norm.mixln_post_layers={k}")
    model = build(make_cfg(*overrides))
    pre = build(make_cfg("norm.scheme=pre", "gpas.enabled=true"))

    def local_names(m) -> list[set[str]]:
        per_layer = [set() for _ in range(NUM_LAYERS)]
        for name in m.state_dict():
            if name.startswith("decoder.layers."):
                index, local = name[len("decoder.layers."):].split(".", 1)
                per_layer[int(index)].add(local)
        return per_layer

    layers = local_names(model)
    assert all(names == layers[0] for names in layers), "Mix-LN layers have different parameters"
    assert layers[0] == local_names(pre)[0]  # and the same as a Pre-LN layer
    assert {"input_layernorm.weight", "pre_mlp_layernorm.weight", "gpas.alpha"} <= layers[0]
    # the roles differ nonetheless: layers 1..k normalize after the add
    deferred = [layer.input_layernorm.deferred for layer in model.decoder.layers]
    assert deferred == [l <= k for l in range(1, NUM_LAYERS + 1)]


def test_mixln_checkpoint_keys_are_stacked_over_layers(mixln_checkpoint):
    metadata = FileSystemReader(mixln_checkpoint["path"]).read_metadata().state_dict_metadata
    layer_keys = {k: v for k, v in metadata.items()
                  if "decoder.layers." in k and isinstance(v, TensorStorageMetadata)}
    model_keys = {k for k in layer_keys if not k.startswith("optimizer.")}
    assert model_keys == {
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
        "decoder.layers.self_attention.linear_qkv.weight",
        "decoder.layers.self_attention.linear_proj.weight",
        "decoder.layers.mlp.linear_fc1.layer_norm_weight",
        "decoder.layers.mlp.linear_fc1.weight",
        "decoder.layers.mlp.linear_fc2.weight",
        "decoder.layers.gpas.alpha",
    }
    for key, meta in layer_keys.items():
        assert meta.size[0] == NUM_LAYERS, f"{key}: size {tuple(meta.size)}"
    assert tuple(metadata["decoder.layers.gpas.alpha"].size) == (NUM_LAYERS, 1)
    assert not any(k.startswith("decoder.layers.0.") or ".layers.0." in k for k in metadata)
    assert any(k.startswith("optimizer.") for k in layer_keys)  # optimizer states are stacked too


# --------------------------------------------------------------------------- layer-input variance


def test_layer_input_variance_matches_the_hidden_states(workspace):
    """The logged per-layer variance is the population variance of every element of each
    layer's input over the step's micro-batches (checked against tensors captured by
    independent hooks), and nothing is recorded on steps that are not logged."""
    trainer = make_trainer(trainer_overrides(workspace, "variance", "train.global_batch_size=4"))
    try:
        layers = list(unwrap_model(trainer.model[0]).decoder.layers)
        captured = {i: [] for i in range(len(layers))}
        handles = [layer.register_forward_pre_hook(
            lambda module, args, kwargs, i=i: captured[i].append(kwargs["hidden_states"].detach().clone()),
            with_kwargs=True) for i, layer in enumerate(layers)]
        iterator = trainer._iterators(trainer.train_ds, 0)
        trainer.train_step(iterator)  # inactive: records nothing
        assert torch.equal(trainer.activation_stats.collect(), torch.zeros(len(layers), dtype=torch.float64))
        for store in captured.values():
            store.clear()
        trainer.activation_stats.active = True
        trainer.train_step(iterator)
        trainer.activation_stats.active = False
        measured = trainer.activation_stats.collect()
        for handle in handles:
            handle.remove()
        assert all(len(store) == 2 for store in captured.values())  # two micro-batches
        expected = torch.tensor([torch.cat([t.double().flatten() for t in captured[i]]).var(unbiased=False)
                                 for i in range(len(layers))], dtype=torch.float64)
        torch.testing.assert_close(measured, expected, rtol=1e-9, atol=0)
        # layer 1's input is the embedding output: N(0, 2/5) at init
        assert abs(float(measured[0]) - 0.4) < 0.05
    finally:
        trainer.close(keep_process_group=True)
