"""model.attention=sdpa (PyTorch's fused attention) against Megatron-Core's DotProductAttention.

The core attention alone (output and the gradients w.r.t. q, k, v) and a whole tiny model
(logits and every parameter's gradient) must agree with the Megatron path within fp32
rounding. Under TP2+SP, PP2, VP and DP the sdpa path is the default that tests/test_parallel.py
trains with, checked there against a one-process run.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_gpas.config import ConfigError, load_config, validate_settings
from megatron_gpas.model.attention import SDPAttention
from megatron_gpas.model.builder import build_model_chunks, transformer_config

BASE_OVERRIDES = ["model.preset=tiny", "model.vocab_size=256", "model.make_vocab_size_divisible_by=64",
                  "train.seq_length=64"]

# fp32 against fp32, two summation orders (the fused kernel's online softmax and its recomputing
# backward against the full score matrix): |Δ| ≤ REL · max|reference|, both against
# DotProductAttention in fp32 and against it in float64 (the ground truth). Measured: outputs
# ≤ 1e-6; gradients ≤ 4e-6 (dq of the MQA case, s=130, scores up to ~16). DotProductAttention's
# own error against float64 is ≤ 8e-7: the fused backward rounds a few times more, as expected
# of flash attention, well inside fp32 training noise.
ATTENTION_REL_TOL = 1e-5
# The whole model compounds the attention's rounding through 4 layers, norms and the head;
# measured ≤ 1e-6 for logits and ≤ 2e-6 for parameter gradients.
MODEL_REL_TOL = 1e-5


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str):
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert scale > 0, f"{what}: reference is identically zero"
    assert err <= rel * scale, f"{what}: max|Δ| = {err:.3e} > {rel:.0e} × scale {scale:.3e}"


def attention_config(heads: int, groups: int, head_dim: int, attention_dropout: float = 0.0) -> TransformerConfig:
    return TransformerConfig(num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads,
                             num_query_groups=groups, kv_channels=head_dim, attention_dropout=attention_dropout,
                             masked_softmax_fusion=False, attention_softmax_in_fp32=True)


def core_attention(cls, config: TransformerConfig, **kwargs):
    return cls(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self", **kwargs)


SHAPES = {  # name: (heads, KV groups, head dim)
    "mha": (4, 4, 16),
    "gqa": (8, 2, 8),
    "mqa": (4, 1, 32),
}


@pytest.mark.parametrize("seq", [2, 7, 64, 130])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_core_attention_matches_dot_product_attention(megatron_env, shape, seq):
    heads, groups, head_dim = SHAPES[shape]
    config = attention_config(heads, groups, head_dim)
    batch = 3
    g = torch.Generator().manual_seed(seq)
    # Megatron's layout [s, b, heads, d]; scores of order 1-10 so the softmax is far from uniform
    q = 2 * torch.randn(seq, batch, heads, head_dim, generator=g)
    k = 2 * torch.randn(seq, batch, groups, head_dim, generator=g)
    v = torch.randn(seq, batch, groups, head_dim, generator=g)
    weight = torch.randn(seq, batch, heads * head_dim, generator=g)  # a loss that weights every output

    def run(cls, dtype):
        inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = core_attention(cls, config)(*inputs, None)
        assert out.shape == (seq, batch, heads * head_dim)
        grads = torch.autograd.grad((out * weight.to(dtype)).sum(), inputs)
        return [t.double() for t in (out.detach(), *grads)]

    ours, theirs = run(SDPAttention, torch.float32), run(DotProductAttention, torch.float32)
    exact = run(DotProductAttention, torch.float64)  # the ground truth both round away from
    for name, a, b, x in zip(("output", "dq", "dk", "dv"), ours, theirs, exact):
        what = f"{shape} s={seq} {name}"
        assert_rel_close(a, b, ATTENTION_REL_TOL, what)
        assert_rel_close(a, x, ATTENTION_REL_TOL, what + " (against float64)")


def test_softmax_scale_is_passed_through(megatron_env):
    config = attention_config(4, 2, 16)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(16, 2, n, 16, generator=g) for n in (4, 2, 2))
    ours = core_attention(SDPAttention, config, softmax_scale=0.7)(q, k, v, None)
    theirs = core_attention(DotProductAttention, config, softmax_scale=0.7)(q, k, v, None)
    assert_rel_close(ours, theirs, ATTENTION_REL_TOL, "softmax_scale=0.7")
    default = core_attention(SDPAttention, config)(q, k, v, None)
    assert (default - ours).abs().max() > 1e-2  # the scale changes the result


def test_unsupported_features_are_refused(megatron_env):
    config = attention_config(4, 4, 16)
    with pytest.raises(NotImplementedError, match="non-causal"):
        SDPAttention(config=config, layer_number=1, attn_mask_type=AttnMaskType.padding, attention_type="self")
    with pytest.raises(NotImplementedError, match="attention dropout"):
        core_attention(SDPAttention, config, attention_dropout=0.1)
    with pytest.raises(NotImplementedError, match="attention dropout"):
        core_attention(SDPAttention, attention_config(4, 4, 16, attention_dropout=0.1))
    module = core_attention(SDPAttention, config)
    q = torch.randn(8, 1, 4, 16)
    with pytest.raises(NotImplementedError, match="attention masks"):
        module(q, q, q, torch.ones(1, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="as many keys as queries"):
        module(q[:1], q, q, None)


# ------------------------------------------------------------------ whole model

def build(*overrides: str):
    cfg = load_config(None, [*BASE_OVERRIDES, *overrides])
    return build_model_chunks(cfg, transformer_config(cfg, bf16=False, on_cpu=True))[0]


def logits_and_grads(model, tokens, position_ids, weight):
    model.zero_grad(set_to_none=True)
    logits = model(tokens, position_ids, None)
    (logits * weight).sum().backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def logits_and_grads_of_both(model, reference, g: torch.Generator):
    """``logits_and_grads`` of two models on the same random batch and loss weights."""
    batch, seq = 2, 64
    tokens = torch.randint(0, 256, (batch, seq), generator=g)
    position_ids = torch.arange(seq).expand(batch, seq)
    weight = torch.randn(batch, seq, model.vocab_size, generator=g)
    return (logits_and_grads(model, tokens, position_ids, weight),
            logits_and_grads(reference, tokens, position_ids, weight))


@pytest.mark.parametrize("extra", [[], ["model.num_query_groups=2", "gpas.enabled=true"]], ids=["mha", "gqa_gpas"])
def test_whole_model_matches_megatron_attention(megatron_env, extra):
    sdpa, megatron = build("model.attention=sdpa", *extra), build("model.attention=megatron", *extra)
    assert type(sdpa.decoder.layers[0].self_attention.core_attention) is SDPAttention
    assert type(megatron.decoder.layers[0].self_attention.core_attention) is DotProductAttention
    # same seed, same init streams: the same weights; made larger than the init (std 0.02) so
    # that attention visibly shapes the logits
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for (name, a), (_, b) in zip(sdpa.named_parameters(), megatron.named_parameters(), strict=True):
            assert torch.equal(a, b), name
            if a.ndim == 2:
                a.copy_(torch.randn(a.shape, generator=g) / a.shape[1] ** 0.5)
                b.copy_(a)
    (logits, grads), (ref_logits, ref_grads) = logits_and_grads_of_both(sdpa, megatron, g)
    assert_rel_close(logits, ref_logits, MODEL_REL_TOL, "logits")
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert_rel_close(grads[name], ref_grads[name], MODEL_REL_TOL, f"grad {name}")


# ------------------------------------------------------------------ config key

def test_attention_key_defaults_to_sdpa_and_is_validated():
    cfg = load_config(None, BASE_OVERRIDES)
    assert cfg.model.attention == "sdpa"
    validate_settings(cfg, world_size=1, check_files=False, require_data=False)
    validate_settings(load_config(None, [*BASE_OVERRIDES, "model.attention=megatron"]), world_size=1,
                      check_files=False, require_data=False)
    with pytest.raises(ConfigError, match="model.attention must be 'sdpa'.*or 'megatron'.*got 'flash'"):
        validate_settings(load_config(None, [*BASE_OVERRIDES, "model.attention=flash"]), world_size=1,
                          check_files=False, require_data=False)


# ------------------------------------------------------------------ benchmarks

def tool_module(name: str):
    """A module of tools/ (not a package), imported."""
    import importlib
    import sys
    from pathlib import Path

    tools = str(Path(__file__).resolve().parents[1] / "tools")
    sys.path.insert(0, tools)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(tools)


def bench_variant_overrides():
    """tools/bench_schemes.py's variant parser."""
    return tool_module("bench_schemes").variant_overrides


def test_bench_attention_runs_and_bench_schemes_parses_the_attention():
    """tools/bench_attention.py end to end at a toy size (its own process: it starts and tears
    down its process groups), and bench_schemes' ``:megatron`` variant suffix."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(root / "tools" / "bench_attention.py"), "--seq", "8", "16",
                          "--groups", "2", "--rounds", "1", "--calls", "1"],
                         capture_output=True, text=True, timeout=300, cwd=root)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith(("| 8 |", "| 16 |"))]
    assert len(rows) == 2, run.stdout

    variant_overrides = bench_variant_overrides()
    assert variant_overrides("pre@layernorm:megatron", False, 256) == [
        "norm.scheme=pre", "gpas.enabled=false", "model.attention=megatron", "norm.kind=layernorm"]
    assert not any(o.startswith("model.attention") for o in variant_overrides("osp+muon", True, 256))
