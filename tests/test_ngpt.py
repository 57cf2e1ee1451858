"""nGPT (norm.scheme=ngpt, methods.md §7.1) against an independent plain-PyTorch reference.

Reference (float64, written out here; ``ref_rope`` is shared with test_model_reference.py), with
norm(v) = v/‖v‖₂ and the effective scales s = s_param · init_value / init_scaling (base = 1/√d):

    q, k, v = W_q h, W_k h, W_v h;  q, k = RoPE(q, k);  q, k = s_qk ⊙ norm_head(q, k)   s_qk = √d·ŝ_qk
    y = softmax(q·k · √d_head, causal) v                      (the official attention scale √d_head)
    h ← norm(norm(h) + |α_A| ⊙ (norm(W_o y) − norm(h)))        α = (0.05·√d)·α̂
    gate, up = split(√d · s_uv ⊙ W_fc h);  h ← norm(norm(h) + |α_M| ⊙ (norm(W_2(silu(gate) ⊙ up)) − norm(h)))
    logits = s_z ⊙ (W_head h)                                  s_z = √d·ŝ_z; no final norm

Tolerances of test_model_reference.py (fp32 model vs float64 reference, relative to max |ref|):
logits 1e-5, gradients 1e-4. ‖h‖ = 1 after every block to 1e-6 (fp32). Training under the parallel
layouts, the projection after every step, resume, recompute and export: test_sphere_schemes.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from test_model_reference import (BATCH, LOGIT_REL_TOL, SEQ, assert_matches_reference, assert_rel_close, inputs,
                                  ref_rope)
from test_simplenorm import TINY_OVERRIDES, _build, _shape

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

BASE_OVERRIDES = [*TINY_OVERRIDES, "norm.scheme=ngpt"]
UNIT_TOL = 1e-6


# =========================================================================== reference (plain PyTorch)


def ref_norm(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def ref_attention_sqrt_scale(q, k, v):
    """Causal softmax attention with the scores multiplied by √d_head; q, k, v [b, s, h, d]."""
    b, s, h, d = q.shape
    scores = torch.einsum("bqnd,bknd->bnqk", q, k) * math.sqrt(d)
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bnqk,bknd->bqnd", torch.softmax(scores, -1), v).reshape(b, s, h * d)


def ref_ngpt_forward(tokens, p: dict, shape: dict, blocks_out: list | None = None) -> torch.Tensor:
    heads, d_head, d = shape["heads"], shape["head_dim"], shape["hidden"]
    base = d ** -0.5
    h = p["embedding"][tokens]
    b, s, _ = h.shape

    def update(h, branch, alpha_param):
        alpha = alpha_param * (0.05 / base)
        a = ref_norm(h)
        return ref_norm(a + alpha.abs() * (ref_norm(branch) - a))

    for i in range(shape["layers"]):
        l = f"layers.{i}."
        sqk = (p[l + "sqk"] * (1.0 / base)).view(heads, d_head)
        q = ref_rope((h @ p[l + "wq"].T).view(b, s, heads, d_head), shape["rope_base"])
        k = ref_rope((h @ p[l + "wk"].T).view(b, s, heads, d_head), shape["rope_base"])
        v = (h @ p[l + "wv"].T).view(b, s, heads, d_head)
        y = ref_attention_sqrt_scale(sqk * ref_norm(q), sqk * ref_norm(k), v)
        h = update(h, y @ p[l + "wo"].T, p[l + "alpha_attn"])
        gate = (h @ p[l + "w_gate"].T) * (p[l + "suv_gate"] * math.sqrt(d))
        up = (h @ p[l + "w_up"].T) * (p[l + "suv_up"] * math.sqrt(d))
        h = update(h, (F.silu(gate) * up) @ p[l + "w2"].T, p[l + "alpha_mlp"])
        if blocks_out is not None:
            blocks_out.append(h)
    return (h @ p["head"].T) * (p["sz"] * (1.0 / base))


def to_reference(meg: dict, shape: dict) -> dict:
    """Megatron tensors (by name) → the reference's, by differentiable slicing."""
    h, d, hidden, ffn = shape["heads"], shape["head_dim"], shape["hidden"], shape["ffn"]
    p = {"embedding": meg["embedding.word_embeddings.weight"], "head": meg["output_layer.weight"],
         "sz": meg["logit_transform.sz.weight"]}
    for i in range(shape["layers"]):
        m, r = f"decoder.layers.{i}.", f"layers.{i}."
        blocks = meg[m + "self_attention.linear_qkv.weight"].view(h, 3, d, hidden)  # one query group per head
        p[r + "wq"], p[r + "wk"], p[r + "wv"] = (blocks[:, j].reshape(h * d, hidden) for j in range(3))
        p[r + "sqk"] = meg[m + "self_attention.core_attention.sqk.weight"]
        p[r + "wo"] = meg[m + "self_attention.linear_proj.weight"]
        p[r + "w_gate"], p[r + "w_up"] = meg[m + "mlp.linear_fc1.weight"].split(ffn)
        p[r + "suv_gate"] = meg[m + "mlp.linear_fc1.output_norm.gate.weight"]
        p[r + "suv_up"] = meg[m + "mlp.linear_fc1.output_norm.up.weight"]
        p[r + "w2"] = meg[m + "mlp.linear_fc2.weight"]
        p[r + "alpha_attn"] = meg[m + "self_attn_bda.alpha.weight"]
        p[r + "alpha_mlp"] = meg[m + "mlp_bda.alpha.weight"]
    return p


# =========================================================================== Megatron side


def _cfg(*overrides):
    from megatron_gpas.config import load_config

    return load_config(None, [*BASE_OVERRIDES, *overrides])


@torch.no_grad()
def _perturb(model, seed: int = 11, scheme: str = "ngpt") -> None:
    """Every scale visibly matters (its init × (1 ± 0.6), some negative: |α|), matrices unit-norm but random."""
    from megatron_gpas.model.schemes import SCHEMES

    g = torch.Generator().manual_seed(seed)
    axes = SCHEMES[scheme].unit_norm_axes(model)
    for name, param in model.named_parameters():
        if param.ndim == 1:
            param.mul_(1.0 + 0.6 * torch.randn(param.shape, generator=g))
        else:
            param.copy_(torch.randn(param.shape, generator=g))
            param.div_(param.norm(dim=axes[param], keepdim=True))


def test_logits_gradients_and_unit_blocks_match_reference(megatron_env):
    cfg = _cfg()
    shape = _shape(cfg)
    model = _build(cfg)
    _perturb(model)
    names = [n for n, _ in model.named_parameters()]
    assert not any("layernorm" in n or "norm.weight" in n and "output_norm" not in n for n in names), names
    tokens, position_ids, labels = inputs(shape["vocab"])
    leaves = {n: p.detach().double().clone().requires_grad_(True) for n, p in model.named_parameters()}
    ref_blocks: list = []
    ref_logits = ref_ngpt_forward(tokens, to_reference(leaves, shape), shape, ref_blocks)

    blocks = []
    hooks = [layer.register_forward_hook(lambda m, a, out: blocks.append(out[0] if isinstance(out, tuple) else out))
             for layer in model.decoder.layers]
    per_token = model(tokens, position_ids, None, labels=labels)
    for hook in hooks:
        hook.remove()
    assert len(blocks) == shape["layers"]
    for i, (h, ref_h) in enumerate(zip(blocks, ref_blocks)):
        torch.testing.assert_close(h.norm(dim=-1), torch.ones(SEQ, BATCH), atol=UNIT_TOL, rtol=0,
                                   msg=f"‖h‖ after block {i + 1}")
        assert_rel_close(h.transpose(0, 1), ref_h, LOGIT_REL_TOL, f"h after block {i + 1}")
    assert_matches_reference(model, per_token, ref_logits, leaves, tokens, position_ids, labels)


def test_reference_tells_the_scales_apart(megatron_env):
    """The attention scale (√d_head vs 1/√d_head) and |α| change the logits far beyond the tolerance."""
    cfg = _cfg()
    shape = _shape(cfg)
    model = _build(cfg)
    _perturb(model)
    tokens, _, _ = inputs(shape["vocab"])
    p = to_reference({n: q.detach().double() for n, q in model.named_parameters()}, shape)
    logits = ref_ngpt_forward(tokens, p, shape)
    flipped = {**p, **{k: -v for k, v in p.items() if "alpha" in k}}
    torch.testing.assert_close(ref_ngpt_forward(tokens, flipped, shape), logits)  # |α|: the sign is irrelevant
    halved = {**p, **{k: v * 0.5 for k, v in p.items() if k.endswith("sqk")}}
    assert (ref_ngpt_forward(tokens, halved, shape) - logits).abs().max() > 1e3 * LOGIT_REL_TOL * logits.abs().max()


def test_init_is_unit_norm_along_d_model(megatron_env):
    """N(0, 1/√d) (W_o, W_2 with /√(2L)), then every d_model vector normalised; scales at their init values."""
    cfg = _cfg()
    model = _build(cfg)
    d = cfg.model.hidden_size
    params = dict(model.named_parameters())
    expected_axes = {"embedding.word_embeddings.weight": 1, "output_layer.weight": 1}
    for i in range(cfg.model.num_layers):
        m = f"decoder.layers.{i}."
        expected_axes.update({m + "self_attention.linear_qkv.weight": 1, m + "self_attention.linear_proj.weight": 0,
                              m + "mlp.linear_fc1.weight": 1, m + "mlp.linear_fc2.weight": 0})
        torch.testing.assert_close(params[m + "self_attn_bda.alpha.weight"], torch.full((d,), d ** -0.5))
        torch.testing.assert_close(params[m + "mlp.linear_fc1.output_norm.gate.weight"], torch.ones(cfg.model.ffn_hidden_size))
    assert {n for n, p in params.items() if p.ndim == 2} == set(expected_axes)
    for name, axis in expected_axes.items():
        norms = params[name].norm(dim=axis)
        torch.testing.assert_close(norms, torch.ones_like(norms), atol=UNIT_TOL, rtol=0, msg=name)


@pytest.mark.parametrize("override,message", [("gpas.enabled=true", "there is no meaningful placement"),
                                               ("model.num_query_groups=2", "no GQA")])
def test_gpas_and_gqa_are_refused(override, message):
    from megatron_gpas.config import ConfigError
    from megatron_gpas.validation import validate

    validate(_cfg("data.paths=[x]"), world_size=1, check_files=False)
    with pytest.raises(ConfigError, match=message):
        validate(_cfg(override, "data.paths=[x]"), world_size=1, check_files=False)
