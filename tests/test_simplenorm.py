"""SimpleNorm (norm.scheme=simplenorm, methods.md §6) against an independent plain-PyTorch reference.

Reference block (float64, written out here; only ``ref_rmsnorm`` and ``ref_rope`` are shared with
test_model_reference.py, both plain PyTorch):

    q = RMSNorm_q(W_q x), k = RMSNorm_k(W_k x), v = RMSNorm_v(W_v x)   each over its full width, then RoPE
    h  = x + RMSNorm_o(W_o · SDPA_causal(q, k, v))
    x' = h + RMSNorm_2(W_2 (silu(RMSNorm_1(W_1 h)) ⊙ RMSNorm_3(W_3 h)))
    logits = W_out · RMSNorm_final(x_L)
    GPAS G(y) = y − silu(α)·sg(y): after each add (default), before the sub-layer or after the branch

Tolerances are those of test_model_reference.py (fp32 model vs float64 reference, relative to
the max |reference|): logits 1e-5, every parameter's gradient 1e-4.

Also in one process: SimpleGPT's init, weight decay on every parameter but the gates, the linear LR
decay. The TP=2 checks run in two processes: the sharded-width statistics of the q/k/v and fc1
norms (``test_sharded_width_rms_equals_the_unsharded_one``, float64) and whole training runs
(TP=2+SP, DP=2 with the distributed optimizer, a TP=1 checkpoint resumed under TP=2+SP) against one
process, plus fresh builds under TP=2+SP and PP=2×VP=2 (bitwise the 1-process weights). Bitwise in
one process: a resume, and full and selective recompute. Last, the TP=2 checkpoint exported to our
HF class (logits and greedy tokens against Megatron's). About 90 s on two CPU cores.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from synthetic import synthetic_run_overrides
from test_model_reference import LOGIT_REL_TOL, assert_matches_reference, inputs, ref_rmsnorm, ref_rope
from test_parallel import _launch
from test_parallel_schemes import _layout_run_mismatches, _merge_checksums, _resumed_run_mismatches

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

# the tiny shape of the scheme tests (test_ngpt.py too): 4 layers, hidden 64, 4 heads, ffn 172
TINY_OVERRIDES = ["model.preset=tiny", "model.vocab_size=256", "model.make_vocab_size_divisible_by=64",
                  "train.seq_length=32"]
BASE_OVERRIDES = [*TINY_OVERRIDES, "norm.scheme=simplenorm", "norm.eps=1e-5"]
GATES = [(0.3, -0.2), (-0.5, 0.6), (0.9, 0.4), (0.1, -0.7)]


# =========================================================================== reference (plain PyTorch)


def ref_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention, q [b, s, h, d], k/v [b, s, g, d]; query head j uses K/V head j // (h/g)."""
    b, s, h, d = q.shape
    kv_of_head = torch.arange(h) // (h // k.shape[2])
    scores = torch.einsum("bqnd,bknd->bnqk", q, k[:, :, kv_of_head]) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bnqk,bknd->bqnd", torch.softmax(scores, -1), v[:, :, kv_of_head]).reshape(b, s, h * d)


def ref_simplenorm_forward(tokens, p: dict, shape: dict, position: str | None) -> torch.Tensor:
    """Logits [b, s, V]; ``position`` None: no GPAS, else the gate's place."""
    h, g, d, eps = shape["heads"], shape["groups"], shape["head_dim"], shape["eps"]
    x = p["embedding"][tokens]
    b, s, _ = x.shape

    def normed(y, w, n):  # RMSNorm(y Wᵀ) over the linear's whole output
        return ref_rmsnorm(y @ w.T, n, eps)

    def attention(y, l):
        q = normed(y, p[l + "wq"], p[l + "nq"]).view(b, s, h, d)
        k = normed(y, p[l + "wk"], p[l + "nk"]).view(b, s, g, d)
        v = normed(y, p[l + "wv"], p[l + "nv"]).view(b, s, g, d)
        a = ref_sdpa(ref_rope(q, shape["rope_base"]), ref_rope(k, shape["rope_base"]), v)
        return normed(a, p[l + "wo"], p[l + "no"])

    def mlp(y, l):
        inner = F.silu(normed(y, p[l + "w1"], p[l + "n1"])) * normed(y, p[l + "w3"], p[l + "n3"])
        return normed(inner, p[l + "w2"], p[l + "n2"])

    for i in range(shape["layers"]):
        l = f"layers.{i}."
        for sub, f in enumerate((attention, mlp)):
            if position is None:
                x = x + f(x, l)
                continue
            alpha = p[l + "alpha"][sub if p[l + "alpha"].numel() == 2 else 0]

            def gate(y, alpha=alpha):
                return y - F.silu(alpha) * y.detach()

            if position == "after_sublayer":
                x = gate(x + f(x, l))
            elif position == "before_sublayer":
                x = gate(x)
                x = x + f(x, l)
            elif position == "after_branch":
                x = x + gate(f(x, l))
            else:
                raise ValueError(position)
    return ref_rmsnorm(x, p["norm_final"], eps) @ p["head"].T


def to_reference(meg: dict, shape: dict) -> dict:
    """Megatron tensors (by name) → the reference's, by differentiable slicing."""
    h, g, d, hidden, ffn = shape["heads"], shape["groups"], shape["head_dim"], shape["hidden"], shape["ffn"]
    p = {"embedding": meg["embedding.word_embeddings.weight"], "norm_final": meg["decoder.final_layernorm.weight"],
         "head": meg["output_layer.weight"]}
    for i in range(shape["layers"]):
        m, r = f"decoder.layers.{i}.", f"layers.{i}."
        blocks = meg[m + "self_attention.linear_qkv.weight"].view(g, h // g + 2, d, hidden)
        p[r + "wq"] = blocks[:, : h // g].reshape(h * d, hidden)
        p[r + "wk"] = blocks[:, h // g].reshape(g * d, hidden)
        p[r + "wv"] = blocks[:, h // g + 1].reshape(g * d, hidden)
        qkv_norm = m + "self_attention.linear_qkv.output_norm."
        p[r + "nq"], p[r + "nk"], p[r + "nv"] = (meg[qkv_norm + f"{n}_norm.weight"] for n in "qkv")
        p[r + "wo"] = meg[m + "self_attention.linear_proj.weight"]
        p[r + "no"] = meg[m + "self_attention.linear_proj.output_norm.weight"]
        p[r + "w1"], p[r + "w3"] = meg[m + "mlp.linear_fc1.weight"].split(ffn)
        p[r + "n1"] = meg[m + "mlp.linear_fc1.output_norm.gate_norm.weight"]
        p[r + "n3"] = meg[m + "mlp.linear_fc1.output_norm.up_norm.weight"]
        p[r + "w2"] = meg[m + "mlp.linear_fc2.weight"]
        p[r + "n2"] = meg[m + "mlp.linear_fc2.output_norm.weight"]
        if m + "gpas.alpha" in meg:
            p[r + "alpha"] = meg[m + "gpas.alpha"]
    return p


# =========================================================================== Megatron side


def _cfg(*overrides):
    from megatron_gpas.config import load_config

    return load_config(None, [*BASE_OVERRIDES, *overrides])


def _shape(cfg) -> dict:
    m = cfg.model
    return {"layers": m.num_layers, "hidden": m.hidden_size, "heads": m.num_attention_heads,
            "groups": m.num_query_groups or m.num_attention_heads, "head_dim": m.hidden_size // m.num_attention_heads,
            "ffn": m.ffn_hidden_size, "eps": cfg.norm.eps, "rope_base": m.rope_base, "vocab": m.vocab_size}


def _build(cfg):
    from megatron_gpas.model.builder import build_model_chunks, transformer_config

    return build_model_chunks(cfg, transformer_config(cfg, bf16=False, on_cpu=True))[0]


@torch.no_grad()
def _perturb(model, seed: int = 11) -> None:
    """Every parameter visibly matters: norm weights 1 ± 0.3, distinct gates, fan-in-scaled linears."""
    g = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("gpas.alpha"):
            param.copy_(torch.tensor(GATES[int(name.split(".")[2])], dtype=param.dtype)[: param.numel()])
        elif param.ndim == 1:
            param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=g))
        else:
            param.copy_(torch.randn(param.shape, generator=g) / math.sqrt(param.shape[1]))


CASES = {
    "plain": [],
    "gqa": ["model.num_query_groups=2"],  # k and v narrower than q: their own widths
    "gpas": ["gpas.enabled=true"],  # GPAS after each residual add
    "gpas_before_sublayer_gqa": ["gpas.enabled=true", "gpas.position=before_sublayer", "model.num_query_groups=2"],
    "gpas_after_branch_per_sublayer": ["gpas.enabled=true", "gpas.position=after_branch", "gpas.per_sublayer=true"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_gradients_match_reference(megatron_env, case):
    cfg = _cfg(*CASES[case])
    shape = _shape(cfg)
    model = _build(cfg)
    _perturb(model)
    tokens, position_ids, labels = inputs(shape["vocab"])
    leaves = {n: p.detach().double().clone().requires_grad_(True) for n, p in model.named_parameters()}
    position = cfg.gpas.position if cfg.gpas.enabled else None
    ref_logits = ref_simplenorm_forward(tokens, to_reference(leaves, shape), shape, position)

    names = [n for n, _ in model.named_parameters()]
    assert sum("output_norm" in n for n in names) == 7 * shape["layers"], names  # q k v o 1 3 2 in every layer
    assert not any("layernorm" in n and "final" not in n for n in names), names  # no pre-norms
    per_token = model(tokens, position_ids, None, labels=labels)
    assert_matches_reference(model, per_token, ref_logits, leaves, tokens, position_ids, labels, f"{case} ")


def test_reference_tells_the_norms_apart(megatron_env):
    """Each norm changes the logits well beyond the tolerance (a norm dropped or given another
    part's statistics would be seen): q normalised per head instead of over its full width, too."""
    cfg = _cfg("model.num_query_groups=2")
    shape = _shape(cfg)
    model = _build(cfg)
    _perturb(model)
    tokens = inputs(shape["vocab"])[0]
    p = to_reference({n: t.detach().double() for n, t in model.named_parameters()}, shape)
    base = ref_simplenorm_forward(tokens, p, shape, None)
    for key in ("nq", "nk", "nv", "no", "n1", "n3", "n2"):
        changed = dict(p, **{f"layers.1.{key}": torch.ones_like(p[f"layers.1.{key}"])})
        delta = (ref_simplenorm_forward(tokens, changed, shape, None) - base).abs().max()
        assert delta > 1e3 * LOGIT_REL_TOL * base.abs().max(), key


def test_init_follows_simplegpt(megatron_env):
    """W_q, W_k, W_v, W_1 std 0.02; W_o, W_2, W_3 std 0.02/√(2l); embedding N(0, 1); head std d^-½
    cut at ±3σ; every norm weight 1 (sample stds within 6 %: ≥ 4096 draws each)."""
    cfg = _cfg("model.hidden_size=128", "model.ffn_hidden_size=344")
    model = _build(cfg)
    params = dict(model.named_parameters())
    ffn, d = 344, 128

    def std_close(t, want, what):
        assert abs(t.double().std().item() / want - 1) < 0.06, f"{what}: std {t.std().item():.4g} vs {want:.4g}"

    for i, layer in enumerate(model.decoder.layers):
        l, m = i + 1, f"decoder.layers.{i}."
        scaled = 0.02 / math.sqrt(2 * l)
        std_close(params[m + "self_attention.linear_qkv.weight"], 0.02, f"layer {l} W_qkv")
        std_close(params[m + "mlp.linear_fc1.weight"][:ffn], 0.02, f"layer {l} W_1")
        std_close(params[m + "mlp.linear_fc1.weight"][ffn:], scaled, f"layer {l} W_3")
        std_close(params[m + "self_attention.linear_proj.weight"], scaled, f"layer {l} W_o")
        std_close(params[m + "mlp.linear_fc2.weight"], scaled, f"layer {l} W_2")
    std_close(params["embedding.word_embeddings.weight"], 1.0, "embedding")
    head = params["output_layer.weight"]
    assert head.abs().max() <= 3 * d ** -0.5
    std_close(head, d ** -0.5 * 0.9866, "head")  # the std of N(0, σ) cut at ±3σ is 0.9866σ
    for name, param in params.items():
        if param.ndim == 1:
            assert torch.equal(param, torch.ones_like(param)), name


def test_weight_decay_on_every_parameter_but_the_gates(megatron_env):
    """SimpleGPT decays all parameters (norm weights included); GPAS gates are spared. Megatron's
    rule (pre-norm schemes) spares every 1-D parameter."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_gpas.optim import build_optimizer

    def decay_by_shape(cfg) -> dict[bool, set[float]]:
        model = _build(cfg)
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
        optimizer, _ = build_optimizer(cfg, [ddp], bf16=False)
        seen: dict[str, float] = {}
        for group in optimizer.param_groups:
            for param in group["params"]:
                seen[id(param)] = group["wd_mult"]
        names = {id(p): n for n, p in model.named_parameters()}
        assert set(seen) == set(names)
        return {names[k]: v for k, v in seen.items()}

    simple = decay_by_shape(_cfg("gpas.enabled=true"))
    assert {n for n, wd in simple.items() if wd == 0.0} == {n for n in simple if n.endswith("gpas.alpha")}
    assert simple["decoder.layers.0.self_attention.linear_qkv.output_norm.q_norm.weight"] == 1.0
    pre = decay_by_shape(_cfg("norm.scheme=pre", "gpas.enabled=true"))
    assert pre["decoder.final_layernorm.weight"] == 0.0


def test_linear_decay_schedule(megatron_env):
    """SimpleGPT's schedule, optim.decay_style=linear: linear warmup from 0, then linear decay to
    lr × min_lr_ratio at train.steps (here 2 warmup steps, 10 steps, ratio 0.1)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_gpas.optim import build_optimizer

    cfg = _cfg("optim.decay_style=linear", "optim.lr=1e-3", "optim.warmup_steps=2", "optim.min_lr_ratio=0.1",
               "train.steps=10")
    model = _build(cfg)
    optimizer, scheduler = build_optimizer(cfg, [DistributedDataParallel(model.config, DistributedDataParallelConfig(),
                                                                         model)], bf16=False)
    lrs = []
    for _ in range(10):
        scheduler.step(1)
        lrs.append(optimizer.param_groups[0]["lr"])
    want = [1e-3 * n / 2 if n <= 2 else 1e-3 * (0.1 + 0.9 * (10 - n) / 8) for n in range(1, 11)]
    assert lrs == pytest.approx(want, rel=1e-12)


def test_decay_style_is_checked():
    from megatron_gpas.config import ConfigError
    from megatron_gpas.validation import validate

    with pytest.raises(ConfigError, match="optim.decay_style must be one of cosine, linear, got 'step'"):
        validate(_cfg("optim.decay_style=step", "data.paths=[x]"), world_size=1, check_files=False)


# =========================================================================== TP=2: sharded-width statistics


def _sharded_width_worker(rank: int, port: int, result_path: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_gpas.model.builder import transformer_config
    from megatron_gpas.model.schemes.simplenorm import OutputNorms

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    parallel_state.initialize_model_parallel(2, 1, create_gloo_process_groups=False)
    try:
        config = transformer_config(_cfg("model.num_query_groups=2", "parallel.tensor=2"), bf16=False, on_cpu=True)
        config.params_dtype = torch.float64
        tp_group = parallel_state.get_tensor_model_parallel_group()
        heads, groups, d, ffn, eps = 4, 2, 16, 172, 1e-5
        g = torch.Generator().manual_seed(3)
        out = {}
        # global outputs [s, b, width] in Megatron's layouts, and global norm weights per part
        qkv = torch.randn(5, 2, (heads + 2 * groups) * d, generator=g, dtype=torch.float64) * 3
        fc1 = torch.randn(5, 2, 2 * ffn, generator=g, dtype=torch.float64)
        for name, x, parts, local_groups, length in (
                ("qkv", qkv, {"q": heads // groups, "k": 1, "v": 1}, groups // 2, d),
                ("fc1", fc1, {"gate": 1, "up": 1}, 1, ffn // 2)):
            norms = OutputNorms(config, parts, local_groups, length, eps, tp_group)
            weights = {p: 1 + 0.3 * torch.randn(n * groups * d if name == "qkv" else ffn, generator=g,
                                                 dtype=torch.float64) for p, n in parts.items()}
            with torch.no_grad():
                for p, w in weights.items():
                    norms.part_weight(p).copy_(w.chunk(2)[rank])
            if name == "qkv":  # rank r holds query groups [r·g/2, (r+1)·g/2)
                local = x.view(5, 2, groups, -1).chunk(2, dim=2)[rank].reshape(5, 2, -1)
            else:  # rank r holds [W_1 rows of r; W_3 rows of r]
                local = torch.cat([half.chunk(2, dim=-1)[rank] for half in x.split(ffn, dim=-1)], dim=-1)
            local = local.clone().requires_grad_(True)
            y = norms(local)
            upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(10 + rank), dtype=torch.float64)
            (y * upstream).sum().backward()
            out[name] = {"y": y.detach(), "grad_x": local.grad, "upstream": upstream,
                         "grad_w": {p: norms.part_weight(p).grad for p in parts},
                         "weights": weights, "x": x}
        torch.save(out, result_path.format(rank=rank))
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def test_sharded_width_rms_equals_the_unsharded_one(tmp_path):
    """Under TP=2 each rank holds half of q, k, v (GQA: 2 query groups) and half of W_1h, W_3h;
    the outputs, input gradients and weight gradients of the sharded norms, put together, equal
    RMSNorm over each part's full width (float64, to 1e-12)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = str(tmp_path / "rank{rank}.pt")
    mp.start_processes(_sharded_width_worker, args=(port, path), nprocs=2, start_method="spawn")
    ranks = [torch.load(path.format(rank=r)) for r in range(2)]
    heads, groups, d, ffn = 4, 2, 16, 172

    def close(a, b, what):
        assert (a - b).abs().max() <= 1e-12 * b.abs().max(), what

    # qkv: put the ranks' query groups back together, then compare per part over the full width
    r0 = ranks[0]["qkv"]
    x = r0["x"].clone().requires_grad_(True)
    leaves = {p: w.clone().requires_grad_(True) for p, w in r0["weights"].items()}
    blocks = x.view(5, 2, groups, heads // groups + 2, d)
    parts = {"q": blocks[..., : heads // groups, :], "k": blocks[..., heads // groups, :],
             "v": blocks[..., heads // groups + 1, :]}
    ref = {p: ref_rmsnorm(t.reshape(5, 2, -1), leaves[p], 1e-5) for p, t in parts.items()}
    whole = lambda key: torch.cat([r["qkv"][key].view(5, 2, groups // 2, -1) for r in ranks], dim=2)  # noqa: E731
    y = whole("y").view(5, 2, groups, heads // groups + 2, d)
    got = {"q": y[..., : heads // groups, :], "k": y[..., heads // groups, :], "v": y[..., heads // groups + 1, :]}
    upstream = whole("upstream").view_as(y)
    ups = {"q": upstream[..., : heads // groups, :], "k": upstream[..., heads // groups, :],
           "v": upstream[..., heads // groups + 1, :]}
    for p in parts:
        close(got[p].reshape(5, 2, -1), ref[p], f"qkv output {p}")
    sum((ref[p] * ups[p].reshape(5, 2, -1)).sum() for p in parts).backward()
    close(whole("grad_x").reshape(x.shape), x.grad, "qkv input gradient")
    for p in parts:
        close(torch.cat([r["qkv"]["grad_w"][p] for r in ranks]), leaves[p].grad, f"qkv weight gradient {p}")

    # fc1: [W_1h; W_3h], each rank [its W_1 half; its W_3 half]
    r0 = ranks[0]["fc1"]
    x = r0["x"].clone().requires_grad_(True)
    leaves = {p: w.clone().requires_grad_(True) for p, w in r0["weights"].items()}
    gate, up = x.split(ffn, dim=-1)
    unshard = lambda key, i: torch.cat([r["fc1"][key].split(ffn // 2, -1)[i] for r in ranks], -1)  # noqa: E731
    ref_gate, ref_up = ref_rmsnorm(gate, leaves["gate"], 1e-5), ref_rmsnorm(up, leaves["up"], 1e-5)
    close(unshard("y", 0), ref_gate, "fc1 output W_1")
    close(unshard("y", 1), ref_up, "fc1 output W_3")
    ((ref_gate * unshard("upstream", 0)).sum() + (ref_up * unshard("upstream", 1)).sum()).backward()
    close(torch.cat([unshard("grad_x", 0), unshard("grad_x", 1)], -1), x.grad, "fc1 input gradient")
    for p in ("gate", "up"):
        close(torch.cat([r["fc1"]["grad_w"][p] for r in ranks]), leaves[p].grad, f"fc1 weight gradient {p}")


# =========================================================================== training under the layouts

STEPS, SAVE_AT, EQUIV_STEPS = 4, 2, 3
# Tolerances against one process: test_parallel_schemes' (loss rel 1e-6, global grad norm 1e-5, gate
# grad norm 1e-4, α abs 1e-6, its checksum bounds); measured here: loss ≤ 8e-8, grad norm ≤ 1.7e-6,
# gate grad norm ≤ 5.5e-6, α ≤ 3e-8. The runs start from perturbed weights (``randomize``): from
# SimpleGPT's init (0.02-std linears) Adam's first, sign-like step turns the TP rounding of
# near-zero gradient elements into loss differences of ~1.3e-6 by step 2.
GATES_OF_LAYERS = [list(g) for g in GATES]
LAYOUTS = {
    "tp2_sp": ["parallel.tensor=2", "parallel.sequence_parallel=true"],
    "dp2_distopt": ["parallel.distributed_optimizer=true"],
    "pp2_vp2": ["parallel.pipeline=2", "parallel.virtual_pipeline=2"],
}


def _run_overrides(ws, run: str, *extra: str) -> list[str]:
    """GQA (k, v narrower than q, one query group per TP rank) with GPAS after each add, weight
    decay on (the scheme decays its norm weights too), the global clip on."""
    return [*BASE_OVERRIDES, "model.num_query_groups=2", "gpas.enabled=true", "gpas.clip_grad=0.0",
            f"train.steps={STEPS}", "train.micro_batch_size=2", "train.global_batch_size=4",
            "train.eval_interval=0", "train.eval_iters=1", "optim.lr=3.0e-3", "optim.warmup_steps=0",
            "optim.weight_decay=0.1", "optim.clip_grad=0.5",
            *synthetic_run_overrides(ws, ws / "runs" / run), *extra]


def _from_init(ws) -> list[str]:
    return [f"checkpoint.load='{ws / 'ckpt_init'}'", "checkpoint.load_optimizer=false"]


# activation recomputation reruns the same fp32 operations: bitwise the same run (Megatron's
# layernorm recompute targets the pre-norm slots, which SimpleNorm leaves empty)
RECOMPUTE = {"full": ["train.recompute=full"],
             "selective": ["train.recompute=selective", "train.recompute_modules=[core_attn,mlp,layernorm]"]}
INIT_LAYOUTS = {"tp2_sp": LAYOUTS["tp2_sp"], "pp2_vp2": LAYOUTS["pp2_vp2"]}


def _fresh_init(ws, layout: str) -> dict:
    """SimpleGPT's init (depth-scaled W_o, W_2 and W_3 rows of fc1, N(0, 1) embedding, the cut head),
    saved at step 0 from a fresh build in ``layout``."""
    extra = INIT_LAYOUTS.get(layout, [])
    return {"name": f"fresh_{layout}", "kind": "save_init",
            "overrides": _run_overrides(ws, f"fresh_{layout}", *extra, f"checkpoint.save='{ws / 'fresh' / layout}'")}


@pytest.fixture(scope="module")
def single(workspace) -> dict:
    """One process: step-0 checkpoint (weights where every parameter matters: norm weights 1 ± 0.3,
    distinct gates), the 4-step reference, and steps 1-2 saved then resumed for 3-4."""
    ws = workspace
    cases = [
        {"name": "dataset", "kind": "dataset", "prefix": str(ws / "data" / "synthetic")},
        {"name": "init", "kind": "save_init", "randomize": {"seed": 11, "gates": GATES_OF_LAYERS},
         "overrides": _run_overrides(ws, "init", f"checkpoint.save='{ws / 'ckpt_init'}'")},
        {"name": "reference", "kind": "train", "checksums": True, "overrides": _run_overrides(ws, "reference", *_from_init(ws))},
        {"name": "first_half", "kind": "train",
         "overrides": _run_overrides(ws, "first_half", *_from_init(ws), f"checkpoint.save='{ws / 'ckpt_half'}'",
                                     f"train.exit_after_steps={SAVE_AT}")},
        {"name": "second_half", "kind": "train", "checksums": True,
         "overrides": _run_overrides(ws, "second_half", f"checkpoint.load='{ws / 'ckpt_half'}'")},
        _fresh_init(ws, "single"),
        *({"name": f"recompute_{name}", "kind": "train",
           "overrides": _run_overrides(ws, f"recompute_{name}", *overrides, *_from_init(ws),
                                       f"train.exit_after_steps={EQUIV_STEPS}")}
          for name, overrides in RECOMPUTE.items()),
    ]
    return _launch(ws, "simplenorm_single", 1, cases, timeout=300)[0]["cases"]


@pytest.fixture(scope="module")
def multi(workspace, single) -> list[dict]:
    """Two processes: TP=2+SP, DP=2 with the distributed optimizer and PP=2×VP=2 from the step-0 weights (3 steps),
    and the 1-process step-2 checkpoint (optimizer included) resumed under TP=2+SP, saved at step 4."""
    ws = workspace
    cases = [{"name": layout, "kind": "train", "checksums": True, "sp_audit": layout == "tp2_sp",
              "overrides": _run_overrides(ws, layout, *overrides, *_from_init(ws), f"train.exit_after_steps={EQUIV_STEPS}")}
             for layout, overrides in LAYOUTS.items()]
    cases += [_fresh_init(ws, layout) for layout in INIT_LAYOUTS]
    cases.append({"name": "resume_tp2_sp", "kind": "train", "checksums": True,
                  "overrides": _run_overrides(ws, "resume_tp2_sp", *LAYOUTS["tp2_sp"],
                                              f"checkpoint.load='{ws / 'ckpt_half'}'", f"checkpoint.save='{ws / 'ckpt_tp2'}'")})
    return [r["cases"] for r in _launch(ws, "simplenorm_multi", 2, cases, timeout=400)]


def test_initial_weights_are_the_same_in_every_layout(single, multi):
    """TP=2+SP and PP=2×VP=2 builds start from the 1-process weights, bitwise (model/init.py)."""
    from megatron_gpas.hf.dcp_reader import CheckpointReader

    def weights(path: str) -> dict:
        reader = CheckpointReader(path)
        return {key: reader.read(key) for key in reader.metadata if not key.startswith("optimizer.")}

    reference = weights(single["fresh_single"]["latest"])
    assert sum("output_norm" in key for key in reference) == 7, sorted(reference)  # stacked over the layers
    for layout in INIT_LAYOUTS:
        built = weights(multi[0][f"fresh_{layout}"]["latest"])
        assert set(built) == set(reference)
        differ = [key for key, value in reference.items() if not torch.equal(built[key], value)]
        assert not differ, f"initial weights under {layout} differ from 1 process: {differ}"


def test_resume_is_bitwise(single):
    """Steps 3-4 after a save at step 2 and a resume equal the uninterrupted run exactly."""
    reference, resumed = single["reference"]["records"], single["second_half"]
    assert resumed["start_step"] == SAVE_AT and [r["step"] for r in resumed["records"]] == [SAVE_AT + 1, STEPS]
    for r, q in zip(resumed["records"], reference[SAVE_AT:]):
        assert {k: v for k, v in r.items() if k != "checksums"} == {k: v for k, v in q.items() if k != "checksums"}
    got = _merge_checksums([resumed["records"][-1]["checksums"]])
    want = _merge_checksums([reference[-1]["checksums"]])
    assert {k: v[:3] for k, v in got.items()} == {k: v[:3] for k, v in want.items()}


@pytest.mark.parametrize("name", list(RECOMPUTE))
def test_recompute_is_bitwise(name, single):
    """The norms after the linears recomputed with the layer (full) or with the MLP (selective):
    losses, gradient norms and gates of every step exactly those of the run without recompute."""
    run, ref = single[f"recompute_{name}"]["records"], single["reference"]["records"][:EQUIV_STEPS]
    assert [r["step"] for r in run] == list(range(1, EQUIV_STEPS + 1))
    for r, q in zip(run, ref):
        assert {k: v for k, v in r.items() if k != "checksums"} == {k: v for k, v in q.items() if k != "checksums"}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, single, multi):
    """Loss, global and gate gradient norms, α and every parameter's Σw, Σw², Σ(w − w₀)² after each
    step as in one process, within test_parallel_schemes' tolerances (the same fp32 sums in another order)."""
    reference = single["reference"]
    ref = reference["records"][:EQUIV_STEPS]
    case = multi[0][layout]
    assert case["world_size"] == 2 and [r["step"] for r in case["records"]] == list(range(1, EQUIV_STEPS + 1))
    assert all(r["grad_norm"] > 0.5 for r in ref), "the global clip must bite"
    problems = _layout_run_mismatches([c[layout] for c in multi], ref, gpas=True)
    assert not problems, f"{layout} differs from 1 process:\n  " + "\n  ".join(problems)
    if layout == "tp2_sp":
        for rank, cases in enumerate(multi):
            audit = cases[layout]["sp_audit"]
            sharded = [n for n in audit["tensor_parallel"] if "linear_qkv.output_norm" in n or "linear_fc1.output_norm" in n]
            assert len(sharded) == 5 * 4, audit["tensor_parallel"]  # q k v W_1 W_3 norms of 4 layers
            assert not audit["offenders"], f"rank {rank}: replicated parameters without the SP tag: {audit['offenders']}"


def test_tp1_checkpoint_resumes_under_tp2_sp(single, multi):
    """The 1-process step-2 checkpoint (the q/k/v and fc1 norm weights resharded over TP, optimizer
    state included) continues under TP=2+SP as the uninterrupted 1-process run."""
    ref = single["reference"]["records"][SAVE_AT:]
    runs = [c["resume_tp2_sp"] for c in multi]
    assert runs[0]["start_step"] == SAVE_AT and [r["step"] for r in runs[0]["records"]] == [SAVE_AT + 1, STEPS]
    problems = _resumed_run_mismatches(runs, ref, gpas=True)
    assert not problems, "\n  ".join(problems)


# =========================================================================== Hugging Face export

@pytest.fixture(scope="module")
def megatron_probe(workspace, multi) -> dict:
    """The TP=2+SP step-4 checkpoint loaded at TP=1: its logits and greedy tokens (hf_fixtures.probe_megatron)."""
    from hf_fixtures import probe_megatron

    return probe_megatron(workspace, "simplenorm_probe", _run_overrides(workspace, "probe"), workspace / "ckpt_tp2")


def test_export_matches_megatron(workspace, megatron_probe):
    """The TP=2 checkpoint exported to our HF class (an RMSNorm on every projection's output, no
    pre-norms): logits equal Megatron's within 1e-5 of their scale, greedy generation (KV cache) the same."""
    from hf_fixtures import assert_custom_export_matches

    assert_custom_export_matches(workspace / "ckpt_tp2", workspace / "hf", megatron_probe)
