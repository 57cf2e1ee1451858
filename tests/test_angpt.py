"""anGPT (norm.scheme=angpt, methods.md §7.2, research-wave2.md §1) against an independent plain-PyTorch
reference, its constants and its weight constraint.

Reference (float64, written out here; nGPT's helpers from test_ngpt.py), with ν(α) = 1/√(α² + (1−α)²),
α = |α̂·α_init·√d|, and the constants from their definitions (d = 64, d_head = 16, d_ffn = 172):

    q, k, v = W_q h, W_k h, √(d/d_head)·W_v h;  q, k = RoPE(q, k)
    q, k ← s_qk ⊙ norm_head(q, k)   (qk_norm=factor: s_qk ⊙ √(d/d_head)·(q, k))
    y = softmax(q·k · √d_head, causal) v   (attention_factor=sqrt_pos: × √t at position t = 1..s)
    h ← ν(α_A) ⊙ (h + α_A ⊙ (√(d_head/d)·W_o y − h))
    gate, up = √d·√(d/d_ffn)·s_gate ⊙ W_gate h,  √(d/d_ffn)·ν_acf·s_up ⊙ W_up h
    h ← ν(α_M) ⊙ (h + α_M ⊙ (√(d_ffn/d)·W_2(silu(gate) ⊙ up) − h));  logits = s_z ⊙ (W_head h)

ν_acf is configured (3.5) in the reference tests, so the reference does not depend on the model's
Monte Carlo; the estimate itself is checked against a literal Monte Carlo over unit-row matrices
written here, the Gaussian limit by quadrature and the paper's 3.74. The ≤ 1 constraint: rows
outside the unit ball land on it, rows inside are bitwise unchanged. Training under the layouts,
resume, recompute and export: test_sphere_schemes.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from test_model_reference import LOGIT_REL_TOL, assert_matches_reference, inputs, ref_rope
from test_ngpt import _perturb, ref_attention_sqrt_scale, ref_norm, to_reference
from test_simplenorm import TINY_OVERRIDES, _build, _shape

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

BASE_OVERRIDES = [*TINY_OVERRIDES, "norm.scheme=angpt"]
ACF = 3.5
OPTIONS = {
    "default": {"alpha_init": 0.05, "qk_norm": "exact", "attention_factor": "none"},
    "factor_qk_sqrt_pos_alpha_0.01": {"alpha_init": 0.01, "qk_norm": "factor", "attention_factor": "sqrt_pos"},
}


# =========================================================================== reference (plain PyTorch)


def ref_angpt_forward(tokens, p: dict, shape: dict, opts: dict, blocks_out: list | None = None,
                      lerp_factor: bool = True) -> torch.Tensor:
    heads, d_head, d, ffn = shape["heads"], shape["head_dim"], shape["hidden"], shape["ffn"]
    base = d ** -0.5
    nu_qkv, nu_p, nu_uz, nu_d = math.sqrt(d / d_head), math.sqrt(d_head / d), math.sqrt(d / ffn), math.sqrt(ffn / d)
    h = p["embedding"][tokens]
    b, s, _ = h.shape

    def update(h, branch, alpha_param):
        alpha = (alpha_param * (opts["alpha_init"] / base)).abs()
        nu = 1 / torch.sqrt(alpha**2 + (1 - alpha) ** 2) if lerp_factor else 1.0
        return nu * (h + alpha * (branch - h))

    for i in range(shape["layers"]):
        l = f"layers.{i}."
        sqk = (p[l + "sqk"] * (1.0 / base)).view(heads, d_head)
        q = ref_rope((h @ p[l + "wq"].T).view(b, s, heads, d_head), shape["rope_base"])
        k = ref_rope((h @ p[l + "wk"].T).view(b, s, heads, d_head), shape["rope_base"])
        v = nu_qkv * (h @ p[l + "wv"].T).view(b, s, heads, d_head)
        if opts["qk_norm"] == "exact":
            q, k = sqk * ref_norm(q), sqk * ref_norm(k)
        else:
            q, k = sqk * nu_qkv * q, sqk * nu_qkv * k
        y = ref_attention_sqrt_scale(q, k, v)
        if opts["attention_factor"] == "sqrt_pos":
            y = y * torch.arange(1, s + 1, dtype=y.dtype).sqrt().view(1, s, 1)
        h = update(h, nu_p * (y @ p[l + "wo"].T), p[l + "alpha_attn"])
        gate = (h @ p[l + "w_gate"].T) * (p[l + "suv_gate"] * math.sqrt(d) * nu_uz)
        up = (h @ p[l + "w_up"].T) * (p[l + "suv_up"] * nu_uz * ACF)
        h = update(h, nu_d * ((F.silu(gate) * up) @ p[l + "w2"].T), p[l + "alpha_mlp"])
        if blocks_out is not None:
            blocks_out.append(h)
    return (h @ p["head"].T) * (p["sz"] * (1.0 / base))


def _cfg(*overrides):
    from megatron_gpas.config import load_config

    return load_config(None, [*BASE_OVERRIDES, *overrides])


def _option_overrides(opts: dict) -> list[str]:
    return [f"norm.options.{key}={value}" for key, value in opts.items()] + [f"norm.options.acf_factor={ACF}"]


# =========================================================================== forward and gradients


@pytest.mark.parametrize("variant", list(OPTIONS))
def test_logits_and_gradients_match_reference(variant, megatron_env):
    opts = OPTIONS[variant]
    cfg = _cfg(*_option_overrides(opts))
    shape = _shape(cfg)
    model = _build(cfg)
    _perturb(model, scheme="angpt")
    tokens, position_ids, labels = inputs(shape["vocab"])
    leaves = {n: p.detach().double().clone().requires_grad_(True) for n, p in model.named_parameters()}
    ref_logits = ref_angpt_forward(tokens, to_reference(leaves, shape), shape, opts)
    per_token = model(tokens, position_ids, None, labels=labels)
    assert_matches_reference(model, per_token, ref_logits, leaves, tokens, position_ids, labels)


def test_reference_tells_the_options_apart(megatron_env):
    """The two option sets, and ν(α), change the logits far beyond the tolerance."""
    cfg = _cfg(*_option_overrides(OPTIONS["default"]))
    shape = _shape(cfg)
    model = _build(cfg)
    _perturb(model, scheme="angpt")
    tokens, _, _ = inputs(shape["vocab"])
    p = to_reference({n: q.detach().double() for n, q in model.named_parameters()}, shape)
    logits = ref_angpt_forward(tokens, p, shape, OPTIONS["default"])
    for other in (ref_angpt_forward(tokens, p, shape, OPTIONS["factor_qk_sqrt_pos_alpha_0.01"]),
                  ref_angpt_forward(tokens, p, shape, OPTIONS["default"], lerp_factor=False)):
        assert (other - logits).abs().max() > 1e3 * LOGIT_REL_TOL * logits.abs().max()


def test_lerp_factor_keeps_the_residual_stream_near_unit_norm(megatron_env):
    """At init (unit-norm rows, α = 0.05) the mean ‖h‖ after every block stays within 5% of 1 — with
    ν(α) removed it decays by ≈ √(0.95² + 0.05²) per sub-layer."""
    cfg = _cfg(f"norm.options.acf_factor={ACF}")
    shape = _shape(cfg)
    model = _build(cfg)
    tokens, position_ids, _ = inputs(shape["vocab"])
    blocks = []
    hooks = [layer.register_forward_hook(lambda m, a, out: blocks.append(out[0] if isinstance(out, tuple) else out))
             for layer in model.decoder.layers]
    with torch.no_grad():
        model(tokens, position_ids, None)
    for hook in hooks:
        hook.remove()
    means = [float(h.norm(dim=-1).mean()) for h in blocks]
    assert all(abs(m - 1) < 0.05 for m in means), means
    ref_blocks: list = []
    p = to_reference({n: q.detach().double() for n, q in model.named_parameters()}, shape)
    ref_angpt_forward(tokens, p, shape, OPTIONS["default"], ref_blocks, lerp_factor=False)
    assert float(ref_blocks[-1].norm(dim=-1).mean()) < 0.85


# =========================================================================== constants and init


def _literal_acf(d: int, d_ffn: int, draws: int) -> float:
    """1/E‖u ⊙ silu(√d·v)‖ by the construction itself: unit-norm x, W_u and W_v [d_ffn, d] with unit rows."""
    g = torch.Generator().manual_seed(1)
    norms = []
    for _ in range(draws):
        x = torch.randn(d, dtype=torch.float64, generator=g)
        w = torch.randn(2, d_ffn, d, dtype=torch.float64, generator=g)
        u, v = math.sqrt(d / d_ffn) * (w / w.norm(dim=-1, keepdim=True)) @ (x / x.norm())
        norms.append(float((u * F.silu(math.sqrt(d) * v)).norm()))
    return 1 / (sum(norms) / len(norms))


def _gaussian_limit_acf(ratio: float) -> float:
    """1/√E[silu(z)²], z ~ N(0, d/d_ffn): the d → ∞ limit, by the trapezoid rule."""
    z = torch.linspace(-12, 12, 200001, dtype=torch.float64)
    sigma = math.sqrt(ratio)
    density = torch.exp(-0.5 * (z / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    return 1 / math.sqrt(float(torch.trapezoid(F.silu(z) ** 2 * density, z)))


def test_acf_factor_estimate():
    """The build-time Monte Carlo against the literal construction (d = 64, d_ffn = 256; 1%), the Gaussian
    limit at d = 2048 (0.5%) and the paper's ν_acf ≈ 3.74 for d = 2048, d_ffn = 4d (1%)."""
    from megatron_gpas.model.schemes.angpt import estimate_acf_factor

    assert estimate_acf_factor(64, 256) == pytest.approx(_literal_acf(64, 256, 400), rel=1e-2)
    assert estimate_acf_factor(2048, 8192) == pytest.approx(_gaussian_limit_acf(0.25), rel=5e-3)
    assert estimate_acf_factor(2048, 8192) == pytest.approx(3.74, rel=1e-2)
    assert estimate_acf_factor(2048, 8192) == estimate_acf_factor(2048, 8192, seed=0)  # deterministic


def test_init_rows_unit_norm_and_scales(megatron_env):
    """Every weight's rows (input axis) at norm 1; α = α_init (here 0.01) through the reparameterisation."""
    cfg = _cfg("norm.options.alpha_init=0.01")
    model = _build(cfg)
    d = cfg.model.hidden_size
    matrices = {n: p for n, p in model.named_parameters() if p.ndim == 2}
    assert len(matrices) == 2 + 4 * cfg.model.num_layers
    for name, param in matrices.items():
        norms = param.norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-6, rtol=0, msg=name)
    from megatron_gpas.model.schemes import SCHEMES

    for layer in model.decoder.layers:
        for update in (layer.self_attn_bda, layer.mlp_bda):
            torch.testing.assert_close(update.alpha.weight, torch.full((d,), d ** -0.5))
            torch.testing.assert_close(update.alpha(), torch.full((d,), 0.01))
        # what the telemetry logs as scales/{attn,mlp}_alpha/layer_l: the mean |α|
        scales = SCHEMES["angpt"].layer_scales(layer)
        assert set(scales) == {"attn_alpha", "mlp_alpha"}
        assert all(float(v) == pytest.approx(0.01, rel=1e-6) for v in scales.values())


@pytest.mark.parametrize("clamp", [True, False])
def test_projection_clamps_rows_outside_and_leaves_rows_inside(clamp, megatron_env):
    """project_unit_norm on a real optimizer's parameters (the FP32 path): with the clamp, rows of norm > 1
    land at 1 and rows of norm ≤ 1 are bitwise unchanged (anGPT); without it every row lands at 1 (nGPT).
    Along axis 0 (columns) as well."""
    from megatron_gpas.model.unit_norm import project_unit_norm

    g = torch.Generator().manual_seed(3)
    rows = torch.randn(12, 8, generator=g, dtype=torch.float64)
    rows = rows / rows.norm(dim=1, keepdim=True) * torch.linspace(0.5, 1.5, 12, dtype=torch.float64).unsqueeze(1)
    weights = {1: torch.nn.Parameter(rows.float()), 0: torch.nn.Parameter(rows.float().T.contiguous())}
    before = {axis: w.detach().clone() for axis, w in weights.items()}
    optimizer = torch.optim.SGD(list(weights.values()), lr=0.1)
    project_unit_norm(optimizer, {w: axis for axis, w in weights.items()}, clamp=clamp)
    for axis, w in weights.items():
        norms_before = before[axis].double().norm(dim=axis)
        norms = w.detach().double().norm(dim=axis)
        outside = norms_before > 1
        assert 0 < int(outside.sum()) < len(outside)
        torch.testing.assert_close(norms[outside], torch.ones_like(norms[outside]), atol=1e-6, rtol=0)
        inside = before[axis].index_select(1 - axis, torch.nonzero(~outside).flatten())
        after_inside = w.detach().index_select(1 - axis, torch.nonzero(~outside).flatten())
        if clamp:
            assert torch.equal(after_inside, inside)
        else:
            torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-6, rtol=0)


# =========================================================================== checks


@pytest.mark.parametrize("override,message", [
    ("gpas.enabled=true", "miscalibrate every factor"),
    ("model.num_query_groups=2", "no GQA"),
    ("norm.options.qk_norm=rms", "qk_norm='rms'"),
    ("norm.options.attention_factor=sqrt_len", "attention_factor='sqrt_len'"),
    ("norm.options.alpha_init=0", "must be > 0"),
    ("norm.options.acf_factor=-1", "or 0 to estimate it"),
    ("norm.options.nu_qkv=2", "nu_qkv"),
])
def test_bad_configurations_are_refused(override, message):
    from megatron_gpas.config import ConfigError
    from megatron_gpas.validation import validate

    validate(_cfg("data.paths=[x]"), world_size=1, check_files=False)
    with pytest.raises(ConfigError, match=message):
        validate(_cfg(override, "data.paths=[x]"), world_size=1, check_files=False)
