"""The GPAS operator in isolation (methods.md §1.1), checked in float64.

    y = x − SiLU(α) · stopgrad(x)

  forward   y = (1 − SiLU(α)) · x
  backward  ∂L/∂x = g (identity),  ∂L/∂α = −SiLU'(α) · Σ g ⊙ x

Every expected value is computed here from first principles (math-module sigmoid,
hand-written SiLU derivative, finite differences), never through the package.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_gpas.model.gpas import GATE_GRAD_NORM_GROUP, GPASGate, is_gate

# Negative (including SiLU's minimiser −1.2785, where the scale peaks at 1.2785),
# zero, small positive, the zero of the scale (+1.2785) and beyond it (scale < 0).
ALPHAS = [-3.0, -1.2785, -0.5, 0.0, 0.3, 1.0, 1.2785, 2.0, 4.0]


def _sigmoid(a: float) -> float:
    return 1.0 / (1.0 + math.exp(-a))


def _silu(a: float) -> float:
    return a * _sigmoid(a)


def _silu_prime(a: float) -> float:
    s = _sigmoid(a)
    return s * (1.0 + a * (1.0 - s))


def _config(sequence_parallel: bool = False) -> TransformerConfig:
    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)
    # TransformerConfig refuses sequence_parallel=True without TP in __post_init__;
    # GPASGate only reads the flag, so set it on the built config.
    config.sequence_parallel = sequence_parallel
    return config


def _gate(alpha: float) -> GPASGate:
    gate = GPASGate(_config()).double()
    with torch.no_grad():
        gate.alpha.fill_(alpha)
    return gate


def _inputs(seed: int = 0, shape=(5, 3, 8)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    upstream = torch.randn(*shape, generator=g, dtype=torch.float64)
    return x, upstream


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("alpha", ALPHAS)
def test_forward_is_one_minus_silu_alpha_times_x(alpha):
    gate = _gate(alpha)
    x, _ = _inputs()
    y = gate(x)
    expected_scale = 1.0 - _silu(alpha)
    assert y.dtype == torch.float64 and y.shape == x.shape
    torch.testing.assert_close(y, expected_scale * x, rtol=1e-13, atol=1e-14)
    # The logging helper reports the same multiplier.
    assert gate.scale().item() == pytest.approx(expected_scale, rel=1e-13, abs=1e-15)


def test_forward_scale_range():
    # SiLU's minimum: the scale peaks at ~1.2785 > 1 (amplifies) for negative α.
    assert _gate(-1.2785).scale().item() == pytest.approx(1.27846, abs=1e-4)
    # The scale crosses 0 at α ≈ 1.2785 and is negative (sign flip, no clamp) beyond.
    assert abs(_gate(1.2785).scale().item()) < 1e-4
    x, _ = _inputs()
    for alpha in (2.0, 4.0):
        y = _gate(alpha)(x)
        assert 1.0 - _silu(alpha) < 0
        assert torch.all(torch.sign(y) == -torch.sign(x))
    # α = 0 is the identity, exactly.
    assert torch.equal(_gate(0.0)(x), x)


# --------------------------------------------------------------------------- backward


@pytest.mark.parametrize("alpha", ALPHAS)
def test_gradient_wrt_x_is_upstream_unchanged(alpha):
    gate = _gate(alpha)
    x, upstream = _inputs(1)
    x.requires_grad_(True)
    gate(x).backward(upstream)
    # Jacobian I: bit-identical, not merely close (a (1−a)·x implementation scales it).
    assert torch.equal(x.grad, upstream)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_gradient_wrt_alpha_matches_closed_form(alpha):
    gate = _gate(alpha)
    x, upstream = _inputs(2)
    gate(x).backward(upstream)
    expected = -_silu_prime(alpha) * float((upstream * x).sum())
    assert gate.alpha.grad.shape == (1,)
    assert gate.alpha.grad.item() == pytest.approx(expected, rel=1e-12, abs=1e-13)


def test_silu_prime_at_zero_is_half():
    # Sanity of the test's own derivative: a'(0) = 0.5 (methods.md §1.2).
    assert _silu_prime(0.0) == 0.5


@pytest.mark.parametrize("alpha", ALPHAS)
def test_gradient_wrt_alpha_matches_finite_difference(alpha):
    x, upstream = _inputs(3)

    def loss(a: float) -> float:
        with torch.no_grad():
            return float((upstream * _gate(a)(x)).sum())

    h = 1e-5
    finite_difference = (loss(alpha + h) - loss(alpha - h)) / (2 * h)
    gate = _gate(alpha)
    (upstream * gate(x)).sum().backward()
    assert gate.alpha.grad.item() == pytest.approx(finite_difference, rel=1e-7, abs=1e-8)


def test_gate_gradient_accumulates_over_shared_calls():
    # One gate per layer, applied after both residual adds: dL/dα is the sum of both uses.
    alpha = 0.7
    gate = _gate(alpha)
    x1, g1 = _inputs(4)
    x2, g2 = _inputs(5)
    ((g1 * gate(x1)).sum() + (g2 * gate(x2)).sum()).backward()
    expected = -_silu_prime(alpha) * float((g1 * x1).sum() + (g2 * x2).sum())
    assert gate.alpha.grad.item() == pytest.approx(expected, rel=1e-12)


# --------------------------------------------------------------------------- parameter


def test_gate_parameter_attributes():
    gate = GPASGate(_config())
    params = dict(gate.named_parameters())
    assert list(params) == ["alpha"], "the gate owns exactly one parameter"
    alpha = gate.alpha
    assert alpha.shape == (1,)  # [1], not 0-dim: Megatron's no-weight-decay rule keys on ndim == 1
    assert alpha.dtype == torch.float32
    assert alpha.requires_grad
    assert alpha.item() == 0.0
    assert getattr(alpha, "grad_norm_group", None) == "gpas" == GATE_GRAD_NORM_GROUP
    assert is_gate(alpha)
    assert hasattr(alpha, "sequence_parallel") and alpha.sequence_parallel is False


def test_gate_sequence_parallel_tag_follows_config():
    assert GPASGate(_config(sequence_parallel=True)).alpha.sequence_parallel is True
    assert GPASGate(_config(sequence_parallel=False)).alpha.sequence_parallel is False


def test_gate_tags_survive_dtype_cast():
    # .double()/.to() swap param.data in place, so the Python attributes must persist.
    gate = GPASGate(_config(sequence_parallel=True)).double()
    assert gate.alpha.dtype == torch.float64
    assert gate.alpha.grad_norm_group == "gpas" and gate.alpha.sequence_parallel is True


@pytest.mark.parametrize("init", [0.0, 0.25, -1.5])
def test_gate_init_is_configurable(init):
    gate = GPASGate(_config(), init=init)
    assert gate.alpha.dtype == torch.float32 and gate.alpha.shape == (1,)
    assert gate.alpha.item() == pytest.approx(init)
    x, _ = _inputs()
    y = gate.double()(x)
    torch.testing.assert_close(y, (1.0 - _silu(init)) * x, rtol=1e-6, atol=1e-7)  # init stored in fp32


def test_gate_registers_grad_norm_group_with_megatron_optimizer():
    import megatron.core.optimizer.optimizer as mcore_optimizer

    GPASGate(_config())
    assert "gpas" in mcore_optimizer.SEPARATE_GRAD_NORM_GROUPS


def test_unknown_activation_is_rejected():
    with pytest.raises(KeyError):
        GPASGate(_config(), activation="no-such-activation")
