"""The norm-replacement schemes ± GPAS against an independent plain-PyTorch reference.

The reference reuses only the attention, SwiGLU, RoPE and weight decoding of
``test_model_reference.py`` (plain torch); every norm, transform and residual rule of the new
schemes is written out here from methods.md §3-§5, nothing is imported from megatron_gpas'
model code for the reference side. Per layer, per sub-layer f with its norm N:

    pre (norm.kind=layernorm)  x' = x + f(LN_{γ,β}(x))                  LN = (x − μ)/sqrt(var + ε)·γ + β
    post (layernorm)           x' = LN_{γ,β}(x + f(x))                  (+GPAS on the shortcut)
    pre_rmsnorm                x' = x + c(f(RMS_{γ,β}(x))),  x_0 = c(E[t])      c(v) = v − mean(v)
    crmsnorm                   x̃' = x̃ + c(f(CRMS_{γ,β}(x̃)))[:d−1],  x̃_0 = c(E[t])[:d−1]
                               CRMS(x̃) = [n; −Σn]·γ + β,  n = x̃ / sqrt((Σx̃² + (Σx̃)²)/d + ε)
    osp                        N(x) = g·x/sqrt(mean(x²) + ε) (one scalar g), x_0 = R₁E[t],
                               logits = W·R₂·N_final(x_L)
    dyt                        N(x) = γ⊙tanh(α·x), x_0 = s·E[t]
    bhyt / bhytstar            N(x; m) = γ⊙tanh(λ·x/(κ·sqrt(m + ε))); attention norm m = mean(x²);
                               MLP norm m = (1−a)²·(mean(x²) + c_attn·λ₁²/κ²) (bhyt; λ₁, the gate
                               factor and c_attn constants) or mean(h²) (bhytstar);
                               c_attn = ‖W_Vᵀ W_Oᵀ‖²_F / (T·d), W_V with one value head per query head;
                               final norm RMSNorm (λ_final = 0) or N(x; mean(x²))
    +GPAS                      after each add: x' = G(...),  G(y) = y − SiLU(α)·sg(y)

Weights are put in a regime where every parameter matters (test_model_reference.randomize:
fan-in-scaled matrices, norm weights 1 ± 0.3, biases ~0.2, DyT α and BHyT λ distinct per norm,
distinct gates). Tolerances as
in test_schemes_reference.py: logits 1e-5 and every matrix/vector gradient 1e-4 of the
reference's scale; scalar parameters (gates, α, λ, g, s: sums over all tokens) 5e-4 of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

from test_model_reference import (  # noqa: F401  (BASE_OVERRIDES: for conftest's megatron_env)
    BATCH,
    GRAD_REL_TOL,
    LOGIT_REL_TOL,
    SEQ,
    assert_rel_close,
    build,
    inputs,
    make_cfg,
    BASE_OVERRIDES,
    megatron_to_reference,
    randomize,
    ref_attention,
    ref_swiglu,
    reference_leaves,
    shape_of,
)
from test_schemes_reference import GATES, ref_gate, SchemeSpec

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

SCALAR_GRAD_REL_TOL = 5e-4
NUM_LAYERS = 4


# =========================================================================== reference norms


def r_rms(x, w, b, eps):
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w
    return y if b is None else y + b


def r_layernorm(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps) * w
    return y if b is None else y + b


def r_crms(xt, w, b, eps):
    d = xt.shape[-1] + 1
    mean_square = ((xt * xt).sum(-1, keepdim=True) + xt.sum(-1, keepdim=True) ** 2) / d
    n = xt / torch.sqrt(mean_square + eps)
    y = torch.cat([n, -n.sum(-1, keepdim=True)], -1) * w
    return y if b is None else y + b


def r_dyt(x, w, alpha):
    return w * torch.tanh(alpha * x)


def r_bhyt(x, w, lam, kappa, mean_square, eps):
    return w * torch.tanh(lam * x / (kappa * torch.sqrt(mean_square + eps)))


def r_centre(v):
    return v - v.mean(-1, keepdim=True)


def r_value_output_gain(p, pre, shape):
    """‖W_Vᵀ W_Oᵀ‖²_F with W_V repeated per query head (the GQA expansion)."""
    per_group = shape.heads // shape.groups
    wv = p[pre + "wv"].reshape(shape.groups, shape.head_dim, shape.hidden)
    wv = torch.repeat_interleave(wv, per_group, dim=0).reshape(-1, shape.hidden)
    return ((wv.T @ p[pre + "wo"].T) ** 2).sum()


# =========================================================================== reference model


@dataclass(frozen=True)
class Case:
    scheme: str
    gpas: bool = False
    overrides: tuple = ()
    kind: str = "rmsnorm"  # paper hosts
    bias: bool = True
    single_scale: bool = True  # osp
    projection: bool = True  # osp
    alpha0: tuple = (0.9, 0.6, 0.4)  # dyt
    embedding_scale: bool = True  # dyt
    lambdas: tuple = (2.0, 1.0, 0.0)  # bhyt
    kappa: float = 10.0
    seq_for_c: int = SEQ
    post: bool = False  # the paper's post host


def ref_forward(tokens, p, shape, case: Case, c_attn: dict | None = None):
    eps = shape.eps
    x = p["embedding"][tokens]
    if case.scheme == "dyt" and case.embedding_scale:
        x = p["embedding_scale"] * x
    elif case.scheme == "osp" and case.projection:
        x = x @ p["R1"].T
    elif case.scheme == "pre_rmsnorm":
        x = r_centre(x)
    elif case.scheme == "crmsnorm":
        x = r_centre(x)[..., :-1]

    def norm(y, key, position_lam=None, mean_square=None):
        w, b = p.get(key + ".weight"), p.get(key + ".bias") if case.bias else None
        if case.scheme in ("pre", "post"):
            return (r_layernorm if case.kind == "layernorm" else r_rms)(y, w, b, eps)
        if case.scheme == "pre_rmsnorm":
            return r_rms(y, w, b, eps)
        if case.scheme == "crmsnorm":
            return r_crms(y, w, b, eps)
        if case.scheme == "osp":
            return r_rms(y, w, None, eps)  # w is the scalar g (or a vector without single_scale)
        if case.scheme == "dyt":
            return r_dyt(y, w, p[key + ".alpha"])
        if case.scheme in ("bhyt", "bhytstar"):
            m = (y * y).mean(-1, keepdim=True) if mean_square is None else mean_square
            return r_bhyt(y, w, p[key + ".lam"], case.kappa, m, eps)
        raise ValueError(case.scheme)

    def branch_map(v):
        if case.scheme == "pre_rmsnorm":
            return r_centre(v)
        if case.scheme == "crmsnorm":
            return r_centre(v)[..., :-1]
        return v

    for i in range(shape.num_layers):
        pre = f"layers.{i}."
        alpha = p[pre + "alpha"][0] if case.gpas else None
        gate = (lambda y: ref_gate(y, alpha, SchemeSpec())) if case.gpas else (lambda y: y)
        attn = lambda y: ref_attention(y, p, pre, shape, None)  # noqa: E731
        mlp = lambda y: ref_swiglu(y, p, pre, None)  # noqa: E731
        if case.post:
            x = norm(gate(x) + attn(x), pre + "n_attn")
            x = norm(gate(x) + mlp(x), pre + "n_mlp")
            continue
        layer_input_ms = (x * x).mean(-1, keepdim=True)
        x = gate(x + branch_map(attn(norm(x, pre + "n_attn"))))
        estimate = None
        if case.scheme == "bhyt":
            lam1 = p[pre + "n_attn.lam"].detach()
            estimate = layer_input_ms + c_attn[i] * lam1 ** 2 / case.kappa ** 2
            if case.gpas:
                estimate = estimate * (1 - alpha.detach() * torch.sigmoid(alpha.detach())) ** 2
        x = gate(x + branch_map(mlp(norm(x, pre + "n_mlp", mean_square=estimate))))
    if case.scheme in ("bhyt", "bhytstar") and case.lambdas[2] == 0:
        x = r_rms(x, p["final.weight"], None, eps)
    else:
        x = norm(x, "final")
    if case.scheme == "osp" and case.projection:
        x = x @ p["R2"].T
    return x @ p["head"].T


def to_reference(leaves: dict, shape) -> dict:
    """The reference's names: matrices decoded as in test_model_reference; norms by position."""
    p = megatron_to_reference(leaves, shape)
    for i in range(shape.num_layers):
        m = f"decoder.layers.{i}."
        for slot, key in (("input_layernorm.", "n_attn"), ("pre_mlp_layernorm.", "n_mlp")):
            for name, t in leaves.items():
                if name.startswith(m + slot):
                    p[f"layers.{i}.{key}.{name[len(m + slot):]}"] = t
    for name, t in leaves.items():
        if name.startswith("decoder.final_layernorm."):
            p["final." + name.removeprefix("decoder.final_layernorm.")] = t
    p.update({k: leaves[n] for k, n in (("R1", "embedding_transform.weight"), ("R2", "head_transform.weight"),
                                       ("embedding_scale", "embedding_transform.scale")) if n in leaves})
    return p


# =========================================================================== Megatron side


def case_overrides(case: Case) -> list[str]:
    out = [f"norm.scheme={case.scheme}", f"gpas.enabled={str(case.gpas).lower()}", *case.overrides]
    if case.scheme in ("pre", "post"):
        out += [f"norm.kind={case.kind}", f"norm.bias={str(case.bias).lower()}"]
    if case.scheme in ("pre_rmsnorm", "crmsnorm"):
        out.append(f"norm.bias={str(case.bias).lower()}")
    if case.scheme == "osp":
        out += [f"norm.options.single_scale={str(case.single_scale).lower()}",
                f"norm.options.embedding_projection={str(case.projection).lower()}"]
    if case.scheme == "dyt":
        out += [f"norm.options.alpha0=[{', '.join(map(str, case.alpha0))}]",
                f"norm.options.embedding_scale={str(case.embedding_scale).lower()}"]
    if case.scheme in ("bhyt", "bhytstar"):
        out += [f"norm.options.lambdas=[{', '.join(map(str, case.lambdas))}]", f"norm.options.kappa={case.kappa}"]
    return out


SCALARS = ("gpas.alpha", ".alpha", ".lam", "embedding_transform.scale")


def is_scalar(name: str, param) -> bool:
    return param.numel() <= 2 and name.endswith(SCALARS + ("layernorm.weight",))


def perturb(model, seed: int, gates=GATES, zero_final_bias: bool = False) -> None:
    """Every parameter in a regime where it visibly matters (test_model_reference.randomize knows
    the new parameter kinds: norm biases 0.2·N(0,1), DyT α 0.3..0.9, BHyT λ 1..3, the embedding
    scale 0.7..1.3), optionally without a final-norm bias; BHyT's c_attn recomputed from the new
    weights. ``gates``: (attention, MLP) value per layer."""
    randomize(model, seed, gates)
    with torch.no_grad():
        if zero_final_bias:
            model.decoder.final_layernorm.bias.zero_()
        for layer in model.decoder.layers:
            if hasattr(layer.pre_mlp_layernorm, "c_attn"):
                layer.scheme.refresh(layer, layer.run_cfg)


def expected_extra_parameters(case: Case) -> set[str]:
    if case.scheme == "osp" and case.projection:
        return {"embedding_transform.weight", "head_transform.weight"}
    if case.scheme == "dyt" and case.embedding_scale:
        return {"embedding_transform.scale"}
    return set()


GQA = ("model.num_query_groups=2",)
CASES: dict[str, Case] = {
    "pre_layernorm": Case("pre", kind="layernorm"),
    "pre_layernorm+gpas": Case("pre", gpas=True, kind="layernorm"),
    "pre_layernorm_nobias": Case("pre", kind="layernorm", bias=False),
    "pre_rmsnorm_bias": Case("pre", kind="rmsnorm", bias=True),
    "post_layernorm+gpas": Case("post", gpas=True, kind="layernorm", post=True),
    "pre_rmsnorm": Case("pre_rmsnorm"),
    "pre_rmsnorm+gpas": Case("pre_rmsnorm", gpas=True),
    "crmsnorm": Case("crmsnorm"),
    "crmsnorm+gpas": Case("crmsnorm", gpas=True),
    "crmsnorm_nobias": Case("crmsnorm", bias=False),
    "osp": Case("osp"),
    "osp+gpas": Case("osp", gpas=True),
    "osp_no_ssnorm": Case("osp", single_scale=False),
    "osp_no_embproj": Case("osp", projection=False),
    "dyt": Case("dyt"),
    "dyt+gpas": Case("dyt", gpas=True),
    "dyt_no_scale": Case("dyt", embedding_scale=False),
    "bhyt": Case("bhyt", overrides=GQA),
    "bhyt+gpas": Case("bhyt", gpas=True, overrides=GQA),
    "bhyt_final_lambda": Case("bhyt", lambdas=(3.0, 3.0, 2.0), kappa=4.0, overrides=GQA),
    "bhytstar": Case("bhytstar", overrides=GQA),
    "bhytstar+gpas": Case("bhytstar", gpas=True, overrides=GQA),
}


@pytest.mark.parametrize("name", list(CASES))
def test_scheme_matches_reference(megatron_env, name):
    from megatron_gpas.model.schemes import get_scheme

    case = CASES[name]
    cfg = make_cfg(*case_overrides(case))
    shape = shape_of(cfg)
    model = build(cfg)
    perturb(model, seed=11)
    names = {n for n, _ in model.named_parameters()}
    assert (names - {n for n in names if n.startswith(("decoder.", "embedding.word", "output_layer"))}
            == expected_extra_parameters(case)), name
    assert sum(n.endswith("gpas.alpha") for n in names) == (NUM_LAYERS if case.gpas else 0)
    c_attn = None
    if case.scheme == "bhyt":  # c_attn of the perturbed weights, checked against the reference's
        get_scheme(cfg).before_step([model], 0, cfg)
        leaves = {n: t.detach().double() for n, t in model.named_parameters()}
        p = to_reference(leaves, shape)
        c_attn = [r_value_output_gain(p, f"layers.{i}.", shape) / (case.seq_for_c * shape.hidden)
                  for i in range(NUM_LAYERS)]
        for i, layer in enumerate(model.decoder.layers):
            assert abs(layer.pre_mlp_layernorm.c_attn.item() / c_attn[i].item() - 1) < 1e-5, f"{name} c_attn {i}"

    tokens, position_ids, labels = inputs(shape.vocab)
    logits = model(tokens, position_ids, None)
    loss = F.cross_entropy(logits.reshape(-1, shape.vocab).float(), labels.reshape(-1))
    model.zero_grad(set_to_none=True)
    loss.backward()

    leaves = reference_leaves(model)
    ref_logits = ref_forward(tokens, to_reference(leaves, shape), shape, case, c_attn)
    assert_rel_close(logits.detach(), ref_logits.detach(), LOGIT_REL_TOL, f"{name} logits")
    F.cross_entropy(ref_logits.reshape(-1, shape.vocab), labels.reshape(-1)).backward()
    for pname, param in model.named_parameters():
        if not param.requires_grad:
            continue
        assert param.grad is not None, f"{name}: {pname} has no gradient in the Megatron model"
        ref_grad = leaves[pname].grad
        assert ref_grad is not None, f"{name}: {pname} has no gradient in the reference"
        scalar = is_scalar(pname, param)
        if scalar:
            assert param.grad.abs().min().item() > 0, f"{name}: {pname} gradient is zero"
        assert_rel_close(param.grad, ref_grad, SCALAR_GRAD_REL_TOL if scalar else GRAD_REL_TOL,
                         f"{name} grad {pname}")


def test_crmsnorm_residual_has_d_minus_1_dimensions(megatron_env):
    cfg = make_cfg(*case_overrides(CASES["crmsnorm"]))
    model = build(cfg)
    seen = {}

    def record(module, args, kwargs):
        seen["x"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    hook = model.decoder.layers[1].register_forward_pre_hook(record, with_kwargs=True)
    tokens, position_ids, _ = inputs(cfg.model.vocab_size)
    with torch.no_grad():
        model(tokens, position_ids, None)
    hook.remove()
    assert seen["x"].shape[-1] == cfg.model.hidden_size - 1


def test_dyt_initial_values(megatron_env):
    """α0 per position (attention, MLP, final), the embedding scale √d, the embedding init d^-½."""
    cfg = make_cfg(*case_overrides(CASES["dyt"]), "model.hidden_size=256", "model.ffn_hidden_size=688")
    model = build(cfg)
    for layer in model.decoder.layers:
        assert layer.input_layernorm.alpha.item() == pytest.approx(0.9)
        assert layer.pre_mlp_layernorm.alpha.item() == pytest.approx(0.6)
    assert model.decoder.final_layernorm.alpha.item() == pytest.approx(0.4)
    assert model.embedding_transform.scale.item() == pytest.approx(16.0)
    std = model.embedding.word_embeddings.weight.double().std().item()
    assert abs(std / (1 / 16) - 1) < 0.05


def test_osp_projections_are_orthogonal_and_identical_across_builds(megatron_env):
    cfg = make_cfg(*case_overrides(CASES["osp"]))
    a, b = build(cfg, seed=1), build(cfg, seed=2)
    for name in ("embedding_transform.weight", "head_transform.weight"):
        w = dict(a.named_parameters())[name].double()
        torch.testing.assert_close(w @ w.T, torch.eye(w.shape[0], dtype=torch.float64), atol=1e-5, rtol=0)
        # drawn from train.seed, not the global RNG: every TP rank holds the same replica
        assert torch.equal(w.float(), dict(b.named_parameters())[name])
    assert not torch.equal(dict(a.named_parameters())["embedding_transform.weight"],
                           dict(a.named_parameters())["head_transform.weight"])
    assert dict(a.named_parameters())["decoder.final_layernorm.weight"].shape == (1,)


def test_reference_variants_are_distinguishable(megatron_env):
    """Guard against vacuous comparisons: on one set of weights the estimated and exact BHyT
    statistics (close by design: 2e-3 of the logits' scale), LayerNorm and RMSNorm, the
    biases and the embedding transforms all move the logits more than 100× the tolerance."""
    pairs = [("bhyt", "bhytstar"), ("pre_layernorm", "pre_rmsnorm_bias"), ("osp", "osp_no_embproj"),
             ("dyt", "dyt_no_scale"), ("pre_layernorm", "pre_layernorm_nobias")]
    for a, b in pairs:
        cfg = make_cfg(*case_overrides(CASES[a]))
        shape = shape_of(cfg)
        model = build(cfg)
        perturb(model, seed=11)
        leaves = {n: t.detach().double() for n, t in model.named_parameters()}
        p = to_reference(leaves, shape)
        p.setdefault("R1", torch.eye(shape.hidden, dtype=torch.float64) * 1.3)
        p.setdefault("R2", torch.eye(shape.hidden, dtype=torch.float64) * 0.7)
        p.setdefault("embedding_scale", torch.tensor(1.7, dtype=torch.float64))
        for i in range(NUM_LAYERS):
            for key in ("n_attn", "n_mlp"):
                p.setdefault(f"layers.{i}.{key}.bias", torch.full((shape.hidden,), 0.3, dtype=torch.float64))
        c_attn = [torch.tensor(0.05 * (i + 1), dtype=torch.float64) for i in range(NUM_LAYERS)]
        tokens, _, _ = inputs(shape.vocab)
        out_a = ref_forward(tokens, p, shape, CASES[a], c_attn)
        out_b = ref_forward(tokens, p, shape, CASES[b], c_attn)
        diff = (out_a - out_b).abs().max().item()
        assert diff > 1e2 * LOGIT_REL_TOL * out_a.abs().max().item(), f"{a} vs {b}: only {diff:.2e}"
