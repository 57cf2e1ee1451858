"""nGPT (norm.scheme=ngpt, methods.md §7.1) against an independent plain-PyTorch reference.

Reference (float64, written out here; ``ref_rope`` is shared with test_model_reference.py), with
norm(v) = v/‖v‖₂ and the effective scales s = s_param · init_value / init_scaling (base = 1/√d):

    q, k, v = W_q h, W_k h, W_v h;  q, k = RoPE(q, k);  q, k = s_qk ⊙ norm_head(q, k)   s_qk = √d·ŝ_qk
    y = softmax(q·k · √d_head, causal) v                      (the official attention scale √d_head)
    h ← norm(norm(h) + |α_A| ⊙ (norm(W_o y) − norm(h)))        α = (0.05·√d)·α̂
    gate, up = split(√d · s_uv ⊙ W_fc h);  h ← norm(norm(h) + |α_M| ⊙ (norm(W_2(silu(gate) ⊙ up)) − norm(h)))
    logits = s_z ⊙ (W_head h)                                  s_z = √d·ŝ_z; no final norm

Tolerances of test_model_reference.py (fp32 model vs float64 reference, relative to max |ref|):
logits 1e-5, gradients 1e-4. ‖h‖ = 1 after every block to 1e-6 (fp32).

The projection: after every optimizer step the rows of the embedding, head, W_q/W_k/W_v and fc1 and
the columns of W_o and W_2 have norm 1 (1e-6) and the optimizer's fp32 master copies equal the model's
values — checked in 1 process and, with real gloo processes, under TP=2+SP, PP=2 and DP=2 with the
distributed optimizer (whose flat shards cut weights apart, asserted), where the runs also match one
process within test_parallel_schemes' tolerances. Bitwise: a resume and full/selective recompute in one process, and a fresh
TP=2+SP build against the 1-process weights. Last, the TP=2 checkpoint exported to our HF class
(logits 1e-5, greedy tokens). About 90 s on two CPU cores.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from test_model_reference import BATCH, GRAD_REL_TOL, LOGIT_REL_TOL, SEQ, assert_rel_close, inputs, ref_rope
from test_simplenorm import RECOMPUTE, TINY_OVERRIDES, _build, _from_init, _shape

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
def _perturb(model, seed: int = 11) -> None:
    """Every scale visibly matters (its init × (1 ± 0.6), some negative: |α|), matrices unit-norm but random."""
    from megatron_gpas.model.schemes import SCHEMES

    g = torch.Generator().manual_seed(seed)
    axes = SCHEMES["ngpt"].unit_norm_axes(model)
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
    with torch.no_grad():
        assert_rel_close(model(tokens, position_ids, None), ref_logits, LOGIT_REL_TOL, "logits")
    per_token.mean().backward()
    F.cross_entropy(ref_logits.reshape(-1, shape["vocab"]), labels.reshape(-1)).backward()
    for name, param in model.named_parameters():
        assert_rel_close(param.grad, leaves[name].grad, GRAD_REL_TOL, f"grad {name}")


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


# =========================================================================== training under the layouts

STEPS, SAVE_AT, EQUIV_STEPS = 4, 2, 3
LAYOUTS = {
    "tp2_sp": ["parallel.tensor=2", "parallel.sequence_parallel=true"],
    "dp2_distopt": ["parallel.distributed_optimizer=true"],
    "pp2": ["parallel.pipeline=2"],
}


def _run_overrides(ws, run: str, *extra: str) -> list[str]:
    """The official recipe's optimizer (AdamW 0.9/0.95, no weight decay, no warmup, clip 1.0) at a
    learning rate that moves the tiny model's weights visibly off the sphere before the projection."""
    from synthetic import synthetic_run_overrides

    return [*BASE_OVERRIDES, f"train.steps={STEPS}", "train.micro_batch_size=2", "train.global_batch_size=4",
            "train.eval_interval=0", "train.eval_iters=1", "optim.lr=1.5e-2", "optim.warmup_steps=0",
            "optim.weight_decay=0.0", "optim.clip_grad=1.0", "optim.adam_beta2=0.95",
            *synthetic_run_overrides(ws, ws / "runs" / run), *extra]


@pytest.fixture(scope="module")
def single(workspace) -> dict:
    """One process: the step-0 checkpoint, the 4-step reference, steps 1-2 saved then resumed for 3-4."""
    from test_parallel import _launch

    ws = workspace
    cases = [
        {"name": "dataset", "kind": "dataset", "prefix": str(ws / "data" / "synthetic")},
        {"name": "init", "kind": "save_init", "overrides": _run_overrides(ws, "init", f"checkpoint.save='{ws / 'ckpt_init'}'")},
        {"name": "reference", "kind": "train", "checksums": True, "unit_norms": True,
         "overrides": _run_overrides(ws, "reference", *_from_init(ws))},
        {"name": "first_half", "kind": "train",
         "overrides": _run_overrides(ws, "first_half", *_from_init(ws), f"checkpoint.save='{ws / 'ckpt_half'}'",
                                     f"train.exit_after_steps={SAVE_AT}")},
        {"name": "second_half", "kind": "train", "checksums": True, "unit_norms": True,
         "overrides": _run_overrides(ws, "second_half", f"checkpoint.load='{ws / 'ckpt_half'}'")},
        *({"name": f"recompute_{name}", "kind": "train",
           "overrides": _run_overrides(ws, f"recompute_{name}", *overrides, *_from_init(ws),
                                       f"train.exit_after_steps={EQUIV_STEPS}")}
          for name, overrides in RECOMPUTE.items()),
        {"name": "fresh_single", "kind": "save_init",
         "overrides": _run_overrides(ws, "fresh_single", f"checkpoint.save='{ws / 'fresh_single'}'")},
    ]
    return _launch(ws, "ngpt_single", 1, cases, timeout=300)[0]["cases"]


@pytest.fixture(scope="module")
def multi(workspace, single) -> list[dict]:
    """Two processes: TP=2+SP, DP=2 with the distributed optimizer and PP=2 from the step-0 weights."""
    from test_parallel import _launch

    ws = workspace
    cases = [{"name": layout, "kind": "train", "checksums": True, "unit_norms": True, "sp_audit": layout == "tp2_sp",
              "overrides": _run_overrides(ws, layout, *overrides, *_from_init(ws), f"train.exit_after_steps={EQUIV_STEPS}",
                                          *([f"checkpoint.save='{ws / 'ckpt_tp2'}'"] if layout == "tp2_sp" else []))}
             for layout, overrides in LAYOUTS.items()]
    cases.append({"name": "resume_tp2_sp", "kind": "train", "checksums": True, "unit_norms": True,
                  "overrides": _run_overrides(ws, "resume_tp2_sp", *LAYOUTS["tp2_sp"],
                                              f"checkpoint.load='{ws / 'ckpt_half'}'")})
    cases.append({"name": "fresh_tp2_sp", "kind": "save_init",
                  "overrides": _run_overrides(ws, "fresh_tp2_sp", *LAYOUTS["tp2_sp"], f"checkpoint.save='{ws / 'fresh_tp2'}'")})
    return [r["cases"] for r in _launch(ws, "ngpt_multi", 2, cases, timeout=400)]


def _assert_unit_norms(records: list[dict], what: str) -> None:
    for r in records:
        norms = r["unit_norms"]
        assert norms["weights"] > 0 and norms["model"] < UNIT_TOL, f"{what} step {r['step']}: {norms}"
        assert norms["master_vs_model"] == 0.0, f"{what} step {r['step']}: {norms}"


def test_weights_are_unit_norm_after_every_step_in_one_process(single):
    records = single["reference"]["records"]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)) and all(r["updated"] for r in records)
    _assert_unit_norms(records, "1 process")
    assert records[0]["unit_norms"]["weights"] == 2 + 4 * 4  # embedding, head, 4 per layer


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_keeps_unit_norms_and_matches_single_process(layout, single, multi):
    from test_parallel_schemes import _checksum_mismatches, _merge_checksums, _record_mismatches

    ref = single["reference"]["records"][:EQUIV_STEPS]
    for rank, cases in enumerate(multi):
        _assert_unit_norms(cases[layout]["records"], f"{layout} rank {rank}")
    if layout == "dp2_distopt":
        # the master copies are flat shards that cut weights (and their vectors) apart
        assert all(c[layout]["records"][0]["unit_norms"]["masters"] > 0 for c in multi)
        assert sum(c[layout]["records"][0]["unit_norms"]["partial_shards"] for c in multi) > 0
    case = multi[0][layout]
    assert case["world_size"] == 2 and [r["step"] for r in case["records"]] == list(range(1, EQUIV_STEPS + 1))
    problems = _record_mismatches(case["records"], ref, gpas=False)
    problems += _checksum_mismatches(_merge_checksums([c[layout]["records"][-1]["checksums"] for c in multi]),
                                     _merge_checksums([ref[-1]["checksums"]]), f"weights after step {EQUIV_STEPS}")
    assert not problems, f"{layout} differs from 1 process:\n  " + "\n  ".join(problems)
    if layout == "tp2_sp":
        for rank, cases in enumerate(multi):
            audit = cases[layout]["sp_audit"]
            assert not audit["offenders"], f"rank {rank}: replicated parameters without the SP tag: {audit['offenders']}"


@pytest.mark.parametrize("name", list(RECOMPUTE))
def test_recompute_is_bitwise(name, single):
    """Full (the layer) and selective (core attention with s_qk, MLP with s_uv) recomputation: every
    step's loss, gradient norms and learning rate exactly those of the run without it."""
    strip = lambda r: {k: v for k, v in r.items() if k not in ("checksums", "unit_norms")}  # noqa: E731
    run, ref = single[f"recompute_{name}"]["records"], single["reference"]["records"][:EQUIV_STEPS]
    assert [r["step"] for r in run] == list(range(1, EQUIV_STEPS + 1))
    assert [strip(r) for r in run] == [strip(r) for r in ref]


def test_resume_is_bitwise(single):
    from test_parallel_schemes import _merge_checksums

    reference, resumed = single["reference"]["records"], single["second_half"]
    assert resumed["start_step"] == SAVE_AT and [r["step"] for r in resumed["records"]] == [SAVE_AT + 1, STEPS]
    strip = lambda r: {k: v for k, v in r.items() if k not in ("checksums", "unit_norms")}  # noqa: E731
    for r, q in zip(resumed["records"], reference[SAVE_AT:]):
        assert strip(r) == strip(q)
    got = _merge_checksums([resumed["records"][-1]["checksums"]])
    want = _merge_checksums([reference[-1]["checksums"]])
    assert {k: v[:3] for k, v in got.items()} == {k: v[:3] for k, v in want.items()}


def test_tp1_checkpoint_resumes_under_tp2_sp(single, multi):
    """The 1-process step-2 checkpoint (s_qk, s_uv and s_z resharded over TP, optimizer state included)
    continues under TP=2+SP as the uninterrupted 1-process run, its weights on the sphere after every step."""
    from test_parallel_schemes import _resumed_run_mismatches

    ref = single["reference"]["records"][SAVE_AT:]
    runs = [c["resume_tp2_sp"] for c in multi]
    assert runs[0]["start_step"] == SAVE_AT and [r["step"] for r in runs[0]["records"]] == [SAVE_AT + 1, STEPS]
    for rank, run in enumerate(runs):
        _assert_unit_norms(run["records"], f"resumed under TP=2+SP, rank {rank}")
    problems = _resumed_run_mismatches(runs, ref, gpas=False)
    assert not problems, "\n  ".join(problems)


def test_initial_weights_are_the_same_under_tp2(single, multi):
    """A fresh TP=2+SP build (its draws, the init projection, the TP-sharded s_qk, s_uv, s_z) saves the
    1-process weights, bitwise (model/init.py)."""
    from megatron_gpas.hf.dcp_reader import CheckpointReader

    def weights(path: str) -> dict:
        reader = CheckpointReader(path)
        return {key: reader.read(key) for key in reader.metadata if not key.startswith("optimizer.")}

    reference, built = weights(single["fresh_single"]["latest"]), weights(multi[0]["fresh_tp2_sp"]["latest"])
    assert set(built) == set(reference) and "logit_transform.sz.weight" in reference, sorted(reference)
    differ = [key for key, value in reference.items() if not torch.equal(built[key], value)]
    assert not differ, f"initial weights under TP=2+SP differ from 1 process: {differ}"


# =========================================================================== Hugging Face export

@pytest.fixture(scope="module")
def megatron_probe(workspace, multi) -> dict:
    """The TP=2+SP step-3 checkpoint loaded at TP=1: its logits and greedy tokens (hf_fixtures.probe_megatron)."""
    from hf_fixtures import probe_megatron

    return probe_megatron(workspace, "ngpt_probe", _run_overrides(workspace, "probe"), workspace / "ckpt_tp2")


def test_export_matches_megatron(workspace, megatron_probe):
    """The TP=2 checkpoint exported to our HF class (sphere updates, s_qk after RoPE, the √head_dim
    attention scale, s_uv, s_z, no final norm): logits equal Megatron's within 1e-5 of their scale,
    greedy generation (KV cache) the same tokens."""
    from hf_fixtures import assert_custom_export_matches

    assert_custom_export_matches(workspace / "ckpt_tp2", workspace / "hf", megatron_probe)


def test_hf_import_round_trip_is_bitwise(workspace, multi):
    """Megatron (TP=2) → our HF class → Megatron (tools/convert_from_hf.py's path, 1 process): every model
    tensor back bitwise (the vocabulary tensors' real rows; s_qk, s_uv, s_z, α included)."""
    from test_parallel import _launch

    from megatron_gpas import checkpoint
    from megatron_gpas.hf.dcp_reader import CheckpointReader
    from megatron_gpas.hf.export import export_checkpoint

    ws = workspace
    export_checkpoint(str(ws / "ckpt_tp2"), str(ws / "hf_round_trip"), progress=False)
    case = {"name": "import", "kind": "import_hf", "hf_dir": str(ws / "hf_round_trip"), "save": str(ws / "ckpt_imported"),
            "overrides": []}
    imported = CheckpointReader(_launch(ws, "ngpt_import", 1, [case], timeout=300)[0]["cases"]["import"]["path"])
    original = CheckpointReader(checkpoint.find_latest(str(ws / "ckpt_tp2")))
    keys = {k for k in original.metadata if not k.startswith("optimizer.")}
    assert keys == {k for k in imported.metadata if not k.startswith("optimizer.")}
    vocab = 256
    for key in sorted(keys):
        a, b = original.read(key), imported.read(key)
        if key.startswith(("embedding.", "output_layer.", "logit_transform.")):
            a, b = a[:vocab], b[:vocab]
        assert torch.equal(a, b), key
