"""Every normalization scheme ± GPAS (and the GPAS ablations) against an independent reference.

The reference extends the plain-PyTorch Llama decoder of ``test_model_reference.py`` (its
attention, SwiGLU, RMSNorm and Megatron→reference weight mapping are imported from there;
nothing here imports megatron_gpas' model code for the reference side). Per layer l
(1-based, N = num_layers), per sub-layer f ∈ {Attn, FFN} with its norm weight w:

    pre        x' = x + f(LN_w(x))                 +GPAS: x' = G(x + f(LN_w(x)))
    post       x' = LN_w(x + f(x))                 +GPAS: x' = LN_w(G(x) + f(x))
    deepnorm   x' = LN_w(a·x + f(x)), a=(2N)^¼     +GPAS: x' = LN_w(a·G(x) + f(x))
    sandwich   x' = x + LN_b(f(LN_w(x)))           +GPAS: after the add
    mixln      layers l ≤ k post, the rest pre (k = norm.mixln_post_layers)
    lns        pre with LN_w(x)·1/√l (lns_mode=fixed), or w initialised to 1/√l (init)
    logits = W_out · LN_final(x_L)                 (every scheme, post/deepnorm included)

    G(y) = y − act(α)·sg(y)   (stop_gradient=false: y − act(α)·y)
    pre-norm ablations: before_sublayer  y = G(x); x' = y + f(LN(y))
                        after_norm       x' = x + f(G(LN(x)))
                        after_branch     x' = x + G(f(LN(x)))

One gate α per layer shared by both sub-layers, or [α_attn, α_mlp] with per_sublayer.

Weights are put in a regime where every parameter matters: fan-in-scaled linears, all norm
weights (sandwich's branch norms included) 1 ± 0.3, gates distinct and non-zero.

Tolerances (fp32 Megatron vs float64 reference), relative to the max |reference| of the
compared tensor: logits and loss 1e-5 and every weight's gradient 1e-4 (as in
test_model_reference.py; measured ≤ 2e-6 and ≤ 4e-6); each gate's gradient 5e-4 relative to
itself (a sum over all tokens with cancellation, one number per gate: measured ≤ 7.3e-5,
worst for scaled_silu with β=3). A misplaced norm, gate, factor or weight moves the logits
by ≥ 1e-2 of their scale (``test_reference_variants_are_distinguishable``) and a gate's
gradient by O(1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from test_model_reference import (  # noqa: F401  (BASE_OVERRIDES: for conftest's megatron_env)
    randomize,
    BATCH,
    GRAD_REL_TOL,
    LOGIT_REL_TOL,
    SEQ,
    RefShape,
    assert_rel_close,
    build,
    inputs,
    make_cfg,
    BASE_OVERRIDES,
    megatron_to_reference,
    ref_attention,
    ref_rmsnorm,
    ref_swiglu,
    reference_leaves,
    shape_of,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

GATE_GRAD_REL_TOL = 5e-4
NUM_LAYERS = 4  # model.preset=tiny
# distinct, non-zero gates; the second column is the MLP gate with gpas.per_sublayer
GATES = [(0.3, -0.2), (-0.5, 0.6), (0.9, 0.4), (0.1, -0.7)]


# =========================================================================== reference


@dataclass(frozen=True)
class SchemeSpec:
    """What the reference computes; written out per case, not read from the package."""

    scheme: str = "pre"
    gpas: bool = False
    position: str = "after_sublayer"
    stop_gradient: bool = True
    per_sublayer: bool = False
    activation: str = "silu"
    silu_beta: float = 8.0
    mixln_k: int = 1
    lns_mode: str = "init"


def ref_activation(name: str, alpha: torch.Tensor, beta: float) -> torch.Tensor:
    if name == "silu":
        return alpha * torch.sigmoid(alpha)
    if name == "identity":
        return alpha
    if name == "tanh":
        return torch.tanh(alpha)
    if name == "relu":
        return torch.where(alpha > 0, alpha, torch.zeros_like(alpha))
    if name == "leaky_relu":
        return torch.where(alpha > 0, alpha, 0.01 * alpha)
    if name == "scaled_silu":
        return alpha * torch.sigmoid(beta * alpha)
    raise ValueError(name)


def ref_gate(y: torch.Tensor, alpha: torch.Tensor, spec: SchemeSpec) -> torch.Tensor:
    a = ref_activation(spec.activation, alpha, spec.silu_beta)
    return y - a * (y.detach() if spec.stop_gradient else y)


def ref_layer_is_post(spec: SchemeSpec, l: int) -> bool:
    if spec.scheme in ("post", "deepnorm"):
        return True
    if spec.scheme == "mixln":
        return l <= spec.mixln_k
    return False


def ref_forward_scheme(tokens: torch.Tensor, p: dict, shape: RefShape, spec: SchemeSpec) -> torch.Tensor:
    n = shape.num_layers
    x = p["embedding"][tokens]
    for i in range(n):
        l, pre = i + 1, f"layers.{i}."
        shortcut_scale = (2 * n) ** 0.25 if spec.scheme == "deepnorm" else 1.0
        lns_factor = 1.0 / math.sqrt(l) if spec.scheme == "lns" and spec.lns_mode == "fixed" else 1.0
        sublayers = [
            ("norm_attn", "branch_norm_attn", lambda y: ref_attention(y, p, pre, shape, None)),
            ("norm_mlp", "branch_norm_mlp", lambda y: ref_swiglu(y, p, pre, None)),
        ]
        for sub, (norm_key, branch_key, f) in enumerate(sublayers):
            if spec.gpas:
                alpha = p[pre + "alpha"][sub if spec.per_sublayer else 0]
                gate = lambda y, alpha=alpha: ref_gate(y, alpha, spec)  # noqa: E731
            else:
                gate = lambda y: y  # noqa: E731
            w = p[pre + norm_key]
            if ref_layer_is_post(spec, l):
                x = ref_rmsnorm(shortcut_scale * gate(x) + f(x), w, shape.eps)
                continue

            def norm_in(y, w=w):
                out = ref_rmsnorm(y, w, shape.eps)
                return out * lns_factor if lns_factor != 1.0 else out

            def branch(y, branch_key=branch_key):
                return ref_rmsnorm(y, p[pre + branch_key], shape.eps) if spec.scheme == "sandwich" else y

            if not spec.gpas or spec.position == "after_sublayer":
                x = gate(x + branch(f(norm_in(x))))
            elif spec.position == "before_sublayer":
                y = gate(x)
                x = y + branch(f(norm_in(y)))
            elif spec.position == "after_norm":
                x = x + branch(f(gate(norm_in(x))))
            elif spec.position == "after_branch":
                x = x + gate(branch(f(norm_in(x))))
            else:
                raise ValueError(spec.position)
    return ref_rmsnorm(x, p["norm_final"], shape.eps) @ p["head"].T


def to_reference(leaves: dict, shape: RefShape) -> dict:
    """test_model_reference's mapping plus sandwich's branch norms (when the model has them)."""
    p = megatron_to_reference(leaves, shape)
    for i in range(shape.num_layers):
        m = f"decoder.layers.{i}."
        for bda, key in (("self_attn_bda", "branch_norm_attn"), ("mlp_bda", "branch_norm_mlp")):
            name = f"{m}{bda}.branch_norm.weight"
            if name in leaves:
                p[f"layers.{i}.{key}"] = leaves[name]
    return p


# =========================================================================== Megatron side


def perturb(model, seed: int, gates=GATES) -> None:
    """Fan-in-scaled linears, every norm weight (branch norms too) 1 ± 0.3, distinct gates."""
    randomize(model, seed, gates)


def case_overrides(spec: SchemeSpec) -> list[str]:
    out = [f"norm.scheme={spec.scheme}", f"gpas.enabled={str(spec.gpas).lower()}"]
    if spec.scheme == "mixln":
        out.append(f"norm.mixln_post_layers={spec.mixln_k}")
    if spec.scheme == "lns":
        out.append(f"norm.lns_mode={spec.lns_mode}")
    if spec.gpas:
        out += [f"gpas.position={spec.position}", f"gpas.stop_gradient={str(spec.stop_gradient).lower()}",
                f"gpas.per_sublayer={str(spec.per_sublayer).lower()}", f"gpas.activation={spec.activation}",
                f"gpas.silu_beta={spec.silu_beta}"]
    return out


HOSTS = {
    "pre": SchemeSpec("pre"),
    "post": SchemeSpec("post"),
    "deepnorm": SchemeSpec("deepnorm"),
    "sandwich": SchemeSpec("sandwich"),
    "mixln_k1": SchemeSpec("mixln", mixln_k=1),
    "mixln_k2": SchemeSpec("mixln", mixln_k=2),
    "lns_fixed": SchemeSpec("lns", lns_mode="fixed"),
    "lns_init": SchemeSpec("lns", lns_mode="init"),
}
CASES: dict[str, SchemeSpec] = {}
for _name, _spec in HOSTS.items():
    CASES[_name] = _spec
    CASES[_name + "+gpas"] = SchemeSpec(**{**_spec.__dict__, "gpas": True})
CASES.update({
    # GPAS ablations on the Pre-LN host
    "pre+gpas@before_sublayer": SchemeSpec("pre", gpas=True, position="before_sublayer"),
    "pre+gpas@after_norm": SchemeSpec("pre", gpas=True, position="after_norm"),
    "pre+gpas@after_branch": SchemeSpec("pre", gpas=True, position="after_branch"),
    "pre+gpas@no_sg": SchemeSpec("pre", gpas=True, stop_gradient=False),
    "pre+gpas@per_sublayer": SchemeSpec("pre", gpas=True, per_sublayer=True),
    "pre+gpas@scaled_silu_b3": SchemeSpec("pre", gpas=True, activation="scaled_silu", silu_beta=3.0),
    # the ablation positions interacting with the other pre-norm hosts' extras
    "sandwich+gpas@after_branch": SchemeSpec("sandwich", gpas=True, position="after_branch"),
    "lns_fixed+gpas@after_norm": SchemeSpec("lns", gpas=True, position="after_norm", lns_mode="fixed"),
    # per-sublayer gates on a host where GPAS sits on the shortcut
    "mixln_k2+gpas@per_sublayer": SchemeSpec("mixln", gpas=True, mixln_k=2, per_sublayer=True),
})


@pytest.mark.parametrize("case", list(CASES))
def test_scheme_matches_reference(megatron_env, case):
    spec = CASES[case]
    cfg = make_cfg(*case_overrides(spec))
    shape = shape_of(cfg)
    model = build(cfg)
    perturb(model, seed=11)
    names = [n for n, _ in model.named_parameters()]
    # the parameter set each scheme must have
    assert sum(n.endswith("gpas.alpha") for n in names) == (NUM_LAYERS if spec.gpas else 0)
    assert sum(n.endswith("branch_norm.weight") for n in names) == (2 * NUM_LAYERS if spec.scheme == "sandwich" else 0)
    if spec.scheme == "sandwich":
        assert "decoder.layers.0.self_attn_bda.branch_norm.weight" in names
        assert "decoder.layers.0.mlp_bda.branch_norm.weight" in names
    assert len(names) == 3 + NUM_LAYERS * (6 + spec.gpas + 2 * (spec.scheme == "sandwich"))

    tokens, position_ids, labels = inputs(shape.vocab)
    logits = model(tokens, position_ids, None)
    assert logits.shape == (BATCH, SEQ, shape.vocab)
    loss = F.cross_entropy(logits.reshape(-1, shape.vocab).float(), labels.reshape(-1))
    model.zero_grad(set_to_none=True)
    loss.backward()

    leaves = reference_leaves(model)
    ref_logits = ref_forward_scheme(tokens, to_reference(leaves, shape), shape, spec)
    assert_rel_close(logits.detach(), ref_logits.detach(), LOGIT_REL_TOL, f"{case} logits")
    ref_loss = F.cross_entropy(ref_logits.reshape(-1, shape.vocab), labels.reshape(-1))
    assert abs(loss.item() - ref_loss.item()) <= LOGIT_REL_TOL * ref_loss.item(), f"{case} loss"
    ref_loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{case}: {name} has no gradient in the Megatron model"
        assert leaves[name].grad is not None, f"{case}: {name} has no gradient in the reference"
        tol = GATE_GRAD_REL_TOL if name.endswith("gpas.alpha") else GRAD_REL_TOL
        if name.endswith("gpas.alpha"):
            assert param.grad.abs().min().item() > 0, f"{case}: {name} gradient is zero"
        assert_rel_close(param.grad, leaves[name].grad, tol, f"{case} grad {name}")


@pytest.mark.parametrize("mode", ["fixed", "init"])
def test_lns_factor_per_layer(megatron_env, mode):
    """The LNS factor is 1/√l for the global 1-based layer l, on both norms of the layer and
    not on the final norm: a fixed multiplier (weights 1) or the initial weight value."""
    cfg = make_cfg("norm.scheme=lns", f"norm.lns_mode={mode}", "gpas.enabled=true")
    model = build(cfg)
    for layer in model.decoder.layers:
        l = layer.layer_number
        factor = 1.0 / math.sqrt(l)
        for norm in (layer.input_layernorm, layer.pre_mlp_layernorm):
            if mode == "fixed":
                assert norm.output_scale == pytest.approx(factor, rel=1e-15)
                assert torch.equal(norm.weight, torch.ones_like(norm.weight))
                assert norm.weight.requires_grad
            else:
                assert norm.output_scale == 1.0
                assert torch.equal(norm.weight, torch.full_like(norm.weight, factor))
                assert norm.weight.requires_grad  # learnable (GPAS code)
    assert [layer.layer_number for layer in model.decoder.layers] == [1, 2, 3, 4]
    final = model.decoder.final_layernorm.weight
    assert torch.equal(final, torch.ones_like(final))


def test_lns_modes_are_identical_at_init(megatron_env):
    """lns_mode=fixed and lns_mode=init compute the same function at init (same weights);
    and that function is the reference's pre-LN with the 1/√l multiplier."""
    models = {}
    for mode in ("fixed", "init"):
        cfg = make_cfg("norm.scheme=lns", f"norm.lns_mode={mode}", "gpas.enabled=true")
        models[mode] = build(cfg, seed=5)
    fixed, init = models["fixed"], models["init"]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for (name, p_fixed), (name_init, p_init) in zip(fixed.named_parameters(), init.named_parameters()):
            assert name == name_init
            if p_fixed.ndim == 2:  # linears/embedding: the same larger random values in both
                p_fixed.copy_(torch.randn(p_fixed.shape, generator=g) / math.sqrt(p_fixed.shape[1]))
                p_init.copy_(p_fixed)
            elif name.endswith("gpas.alpha"):
                p_fixed.fill_(0.4)
                p_init.fill_(0.4)
    tokens, position_ids, _ = inputs(256)
    with torch.no_grad():
        out_fixed = fixed(tokens, position_ids, None)
        out_init = init(tokens, position_ids, None)
    torch.testing.assert_close(out_fixed, out_init, rtol=1e-6, atol=1e-6 * out_init.abs().max().item())
    cfg = make_cfg("norm.scheme=lns", "norm.lns_mode=fixed", "gpas.enabled=true")
    shape = shape_of(cfg)
    leaves = {n: t.detach() for n, t in reference_leaves(fixed).items()}
    ref = ref_forward_scheme(tokens, to_reference(leaves, shape), shape,
                             SchemeSpec("lns", gpas=True, lns_mode="fixed"))
    assert_rel_close(out_fixed, ref, LOGIT_REL_TOL, "lns at init vs reference")


def test_reference_variants_are_distinguishable(megatron_env):
    """Guard against vacuous comparisons: on one set of weights, every pair of variants the
    tests tell apart differs by far more than the logit tolerance; stop_gradient differs
    in the gradients only."""
    cfg = make_cfg("norm.scheme=sandwich", "gpas.enabled=true", "gpas.per_sublayer=true")
    shape = shape_of(cfg)
    model = build(cfg)
    perturb(model, seed=11)
    leaves = reference_leaves(model)
    p = to_reference({n: t.detach() for n, t in leaves.items()}, shape)
    tokens, _, labels = inputs(shape.vocab)
    # lns_init(+gpas) is pre(+gpas) with other weights; no_sg has the forward of pre+gpas
    variants = {name: spec for name, spec in CASES.items()
                if name != "pre+gpas@no_sg" and not (spec.scheme == "lns" and spec.lns_mode == "init")}
    with torch.no_grad():
        outs = {name: ref_forward_scheme(tokens, p, shape, spec) for name, spec in variants.items()}
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            scale = max(outs[a].abs().max().item(), outs[b].abs().max().item())
            diff = (outs[a] - outs[b]).abs().max().item()
            assert diff > 1e3 * LOGIT_REL_TOL * scale, f"{a} vs {b}: reference logits differ by only {diff:.2e}"

    def embedding_grad(spec):
        leaves_ = {n: t.detach().clone().requires_grad_(True) for n, t in leaves.items()}
        out = ref_forward_scheme(tokens, to_reference(leaves_, shape), shape, spec)
        F.cross_entropy(out.reshape(-1, shape.vocab), labels.reshape(-1)).backward()
        return leaves_["embedding.word_embeddings.weight"].grad

    sg, no_sg = embedding_grad(CASES["pre+gpas"]), embedding_grad(CASES["pre+gpas@no_sg"])
    assert (sg - no_sg).abs().max().item() > 1e3 * GRAD_REL_TOL * sg.abs().max().item()
