"""tools/plan_run.py and megatron_gpas/planner.py: exact counts against built models, the memory
formula against a hand computation, the layout search, the CLI end to end.

Measured peak memory can only be compared on a GPU (tools/gpu_check.py); here the estimate is
checked against the formula written out by hand, not against a measurement."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_gpas import planner
from megatron_gpas.config import PRESETS, load_config
from megatron_gpas.metrics import flops_per_token
from megatron_gpas.model.builder import build_model_chunks, transformer_config
from megatron_gpas.model.inventory import count_parameters
from megatron_gpas.model.schemes import SCHEMES
from megatron_gpas.validation import validate

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.preset=tiny", "train.seq_length=128"]


def built_model_counts(cfg) -> tuple[int, int]:
    """(parameters, of which Muon's) of the model really built on CPU (one process, TP = PP = 1),
    the Muon share by optim.py's routing of the built model's parameters."""
    from megatron_gpas.optim import MUON, optimizer_routing

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29581", rank=0, world_size=1)
    try:
        parallel_state.initialize_model_parallel(1, 1, create_gloo_process_groups=False)
        model_config = transformer_config(cfg, bf16=False, on_cpu=True)
        model_config.perform_initialization = False  # the shapes are what is counted, not the values
        chunks = build_model_chunks(cfg, model_config)
        total = sum(p.numel() for chunk in chunks for p in chunk.parameters())
        routes = optimizer_routing(chunks)
        numel = {name: p.numel() for chunk in chunks for name, p in chunk.named_parameters()}
        muon = sum(numel[name] for name, route in routes.items() if route == MUON)
        return total, muon
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


SCHEME_OVERRIDES = {"dyt": ["norm.options.alpha0=[1.0, 1.0, 1.0]"]}


@pytest.fixture(scope="module", autouse=True)
def _no_process_group():
    """The meta-device count builds its own stand-in groups, so it needs none to exist: another
    module's in-process Trainers leave the default group up for their own next Trainer."""
    from megatron_gpas import distributed

    distributed.shutdown()
    yield


@pytest.mark.parametrize("gpas", [False, True])
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_counts_equal_the_built_model(scheme, gpas):
    cfg = load_config(None, TINY + [f"norm.scheme={scheme}", f"gpas.enabled={gpas}"] + SCHEME_OVERRIDES.get(scheme, []))
    count = count_parameters(cfg)
    total, muon = built_model_counts(cfg)
    assert count.total == total
    assert count.stages[0].per_rank_muon == muon > 0  # the planner's Muon state is sized on these


def test_presets_count_their_closed_form():
    """Presets too large to build for real here: the meta-device count against the closed form of
    a Llama (embedding and head untied, per layer QKV, output, SwiGLU and two norms, final norm)."""
    for preset in PRESETS:
        cfg = load_config(None, [f"model.preset={preset}"])
        m = cfg.model
        d = m.kv_channels or m.hidden_size // m.num_attention_heads
        g = m.num_query_groups or m.num_attention_heads
        h, a, f = m.hidden_size, m.num_attention_heads, m.ffn_hidden_size
        vocab = -(-m.vocab_size // 128) * 128
        layer = h * (a + 2 * g) * d + a * d * h + 3 * h * f + 2 * h
        assert count_parameters(cfg).total == 2 * vocab * h + m.num_layers * layer + h, preset


def test_llama3_8b_count_and_flops():
    cfg = load_config(REPO / "examples/llama3_8b_pre_gpas.yaml", ["gpas.enabled=false", "parallel.pipeline=2"])
    count = count_parameters(cfg)
    assert count.total == 8_030_261_248  # Meta's count
    assert sum(s.parameters for s in count.stages) == count.total
    assert planner.legacy_flops_per_token(count.total) == 6 * 8_030_261_248


def test_memory_formula_against_a_hand_computation():
    """TP=2 + SP, PP=2, DP=2 (8 GPUs), Adam BF16 with the distributed optimizer, local backend with
    Megatron's DotProductAttention (the one attention that keeps the s² scores)."""
    L, h, a, g, f, V, s, b = 4, 64, 4, 2, 172, 32000, 128, 2
    cfg = load_config(None, [f"model.num_layers={L}", f"model.hidden_size={h}", f"model.num_attention_heads={a}",
                             f"model.num_query_groups={g}", f"model.ffn_hidden_size={f}", f"model.vocab_size={V}",
                             f"train.seq_length={s}", f"train.micro_batch_size={b}", "train.global_batch_size=16",
                             "parallel.tensor=2", "parallel.pipeline=2", "parallel.sequence_parallel=true",
                             "parallel.distributed_optimizer=true", "model.attention=megatron"])
    t, dp, d = 2, 2, h // a
    # parameters of one TP rank: matrices split in two, RMSNorm weights whole; vocabulary 32000 = 125 × 256
    layer = (h * (a + 2 * g) * d + a * d * h + 3 * h * f) // t + 2 * h
    stage0_params = V * h // t + 2 * layer
    stage1_params = 2 * layer + h + V * h // t
    # per layer and micro-batch: norm/attention/MLP inputs 8sbh (/t: SP), Q and attention output
    # 2sb·(a·d) each, K and V 2sb·(g·d) each, fc1 output 2sb·2f, SwiGLU output 2sbf, scores 2as²b
    per_layer = (8 * s * b * h / t + (2 * s * b * a * d * 2 + 2 * s * b * g * d * 2 + 2 * s * b * 2 * f
                                      + 2 * s * b * f + 2 * a * s * s * b) / t)
    microbatches = 16 // (b * dp)  # 4 ≥ PP: stage 0 holds 2 micro-batches of its 2 layers, stage 1 one
    stage0_acts = 2 * 2 * per_layer
    stage1_acts = 1 * 2 * per_layer + 2 * (2 * s * b * h) / t + s * b * V * (2 + 4) / t
    assert microbatches == 4

    stages = planner.memory_per_gpu(cfg, count_parameters(cfg), world_size=8)
    for got, n, acts in zip(stages, (stage0_params, stage1_params), (stage0_acts, stage1_acts)):
        assert got.parameters == n
        assert got.weights == 2 * n and got.gradients == 4 * n
        assert got.optimizer == 12 * n / dp  # fp32 master + two moments, sharded over DP
        assert got.activations == pytest.approx(acts, rel=1e-12)

    # selective recompute: the s² term goes; full: 2sbh/t per layer remains
    sel = planner.memory_per_gpu(cfg, count_parameters(cfg), world_size=8, recompute="selective")[0]
    assert sel.activations == pytest.approx(stage0_acts - 4 * 2 * a * s * s * b / t)
    full = planner.memory_per_gpu(cfg, count_parameters(cfg), world_size=8, recompute="full")[0]
    assert full.activations == pytest.approx(4 * 2 * s * b * h / t)

    # Muon (no distributed optimizer): 4 B momentum for the 2-D matrices, 8 B Adam moments for the rest,
    # fp32 master weights for all; the embedding goes to Adam
    muon_cfg = load_config(None, [o for o in cfg_overrides(cfg) if "distributed_optimizer" not in o]
                           + ["optim.optimizer=muon"])
    m0 = planner.memory_per_gpu(muon_cfg, count_parameters(muon_cfg), world_size=8)[0]
    matrices = 2 * (layer - 2 * h)
    assert m0.optimizer == 4 * matrices + 8 * (stage0_params - matrices) + 4 * stage0_params


def test_fp32_runs_double_weights_and_activations():
    bf16 = load_config(None, TINY)
    fp32 = load_config(None, TINY + ["train.precision=fp32"])
    assert planner.activation_bytes_per_layer(fp32, 2) == 2 * planner.activation_bytes_per_layer(bf16, 2)
    a, b = (planner.memory_per_gpu(c, count_parameters(c), world_size=1)[0] for c in (bf16, fp32))
    assert b.weights == 2 * a.weights and b.gradients == a.gradients
    assert b.optimizer == 8 * b.parameters and a.optimizer == 12 * a.parameters  # no master copy in FP32


def test_in_flight_micro_batches():
    # 1F1B: rank i holds p − i micro-batches, or all m when fewer
    assert [planner.in_flight_chunks(4, 1, i, 8) for i in range(4)] == [4, 3, 2, 1]
    assert planner.in_flight_chunks(4, 1, 0, 2) == 2
    # interleaved, v = 2: rank 0 holds L·(1 + (p − 1)/(p·v)) layers (Korthikanti et al.), a chunk being L/(p·v)
    p, v = 4, 2
    assert planner.in_flight_chunks(p, v, 0, 8) / (p * v) == 1 + (p - 1) / (p * v)


def cfg_overrides(cfg) -> list[str]:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    return [f"model.num_layers={m.num_layers}", f"model.hidden_size={m.hidden_size}",
            f"model.num_attention_heads={m.num_attention_heads}", f"model.num_query_groups={m.num_query_groups}",
            f"model.ffn_hidden_size={m.ffn_hidden_size}", f"model.vocab_size={m.vocab_size}",
            f"train.seq_length={t.seq_length}", f"train.micro_batch_size={t.micro_batch_size}",
            f"train.global_batch_size={t.global_batch_size}", f"parallel.tensor={p.tensor}",
            f"parallel.pipeline={p.pipeline}", f"parallel.sequence_parallel={p.sequence_parallel}",
            f"parallel.distributed_optimizer={p.distributed_optimizer}"]


def test_search_keeps_valid_fitting_layouts_and_ranks_no_bubble_first():
    cfg = load_config(None, TINY + ["train.global_batch_size=8"])
    peak = planner.peak_flops_of("H100")
    everything = planner.search(cfg, 4, planner.parse_memory("1TB"), peak, reserve_gib=0)
    memory = planner.parse_memory("0.06GB")  # 55 MiB usable: the tiny model fits only some layouts
    budget = planner.usable_bytes(memory, reserve_gib=0)
    layouts = planner.search(cfg, 4, memory, peak, reserve_gib=0)
    assert 0 < len(layouts) < len(everything)
    for l in layouts:
        c = planner.with_layout(cfg, l.tensor, l.pipeline, l.micro_batch, l.sequence_parallel, l.distributed_optimizer)
        validate(c, world_size=4, check_files=False, require_data=False)
        stages = planner.memory_per_gpu(c, count_parameters(c), world_size=4, recompute=l.recompute)
        assert max(s.total for s in stages) <= budget
        assert l.tensor * l.pipeline * l.data == 4
    speeds = [l.tokens_per_s for l in layouts]
    assert speeds == sorted(speeds, reverse=True)

    # with ample memory: pure DP (no bubble) beats PP=2 at the same micro-batch and optimizer
    def find(tp, pp, mb):
        return next(l for l in everything if (l.tensor, l.pipeline, l.micro_batch, l.distributed_optimizer)
                    == (tp, pp, mb, False))
    dp4, pp2 = find(1, 1, 1), find(1, 2, 1)
    assert everything.index(dp4) < everything.index(pp2)
    assert pp2.efficiencies["pipeline"] == pytest.approx(4 / (4 + 1))  # m = 8/(1·2) = 4, bubble (p−1)/(m+p−1)
    assert dp4.efficiencies["pipeline"] == 1.0


def test_search_takes_the_cheapest_recompute_that_fits():
    """One GPU, 51 MiB: micro-batch 2 fits as it is, 4 only without the s² scores (selective),
    8 only with full recomputation (a small vocabulary, so that the logits do not dominate)."""
    cfg = load_config(None, ["model.preset=tiny", "model.vocab_size=512", "train.seq_length=512",
                             "train.global_batch_size=8", "model.attention=megatron"])
    layouts = planner.search(cfg, 1, planner.parse_memory("0.05GB"), 1e15, reserve_gib=0)
    by_mb = {l.micro_batch: l for l in layouts}
    assert len(by_mb) == len(layouts)  # DP = 1: no distributed-optimizer twin
    assert {mb: l.recompute for mb, l in by_mb.items()} == {1: "none", 2: "none", 4: "selective", 8: "full"}
    assert by_mb[8].note == "with train.recompute=full" and by_mb[2].note == ""
    assert by_mb[8].overrides[-1] == "train.recompute=full" and not any("recompute" in o for o in by_mb[2].overrides)
    assert by_mb[8] is layouts[-1]  # full recomputation costs a third: last


def test_bad_inputs_give_clear_errors():
    for text in ("80XB", "-5GB", "", "GB"):
        with pytest.raises(planner.ConfigError, match="--gpu-mem"):
            planner.parse_memory(text)
    assert planner.parse_memory("80GB") == planner.parse_memory("80GiB") == 80 * 2**30
    with pytest.raises(planner.ConfigError, match="unknown GPU"):
        planner.peak_flops_of("Z80")
    cfg = load_config(None, TINY + ["train.global_batch_size=8"])
    with pytest.raises(planner.ConfigError, match="no TP x PP x DP x micro-batch layout of 3 GPUs"):
        planner.search(cfg, 3, planner.parse_memory("80GB"), 1e15)


def run_tool(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / "tools/plan_run.py"), *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_cli_end_to_end_with_json(tmp_path):
    out = tmp_path / "plan.json"
    proc = run_tool(str(REPO / "examples/llama3_8b_pre_gpas.yaml"), "gpas.enabled=false", "--gpus", "8",
                    "--gpu-mem", "80GB", "--top", "5", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    plan = json.loads(out.read_text())
    assert plan["parameters"]["total"] == 8_030_261_248
    cfg = load_config(REPO / "examples/llama3_8b_pre_gpas.yaml", ["gpas.enabled=false"])
    assert plan["flops_per_token"] == {"megatron": flops_per_token(cfg), "legacy_6n": 6.0 * 8_030_261_248}
    assert plan["layouts"] and all(l["memory_gib"] <= plan["usable_gib"] for l in plan["layouts"])
    assert "Megatron formula" in proc.stdout and "legacy 6N" in proc.stdout and "Assumptions" in proc.stdout
    assert "best as overrides: parallel.tensor=" in proc.stdout
    # the config's own layout (TP=2 + SP, DP=4, distributed optimizer) with each recompute level
    assert set(plan["config_layout"]) == {"none", "selective", "full"}


def load_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("plan_run_tool", REPO / "tools/plan_run.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_cli_input_errors(capsys):
    """Exit status 2 and one line naming the option (in this process: the subprocess above
    already covers the entry point)."""
    tool = load_tool()
    config = str(REPO / "examples/llama3_8b_pre_gpas.yaml")
    for args, message in [(["--gpu-mem", "80 bananas"], "--gpu-mem: expected a positive size"),
                          (["--gpus", "0"], "--gpus must be a positive number"),
                          (["--gpu", "Z80"], "--gpu: unknown GPU 'Z80'"),
                          (["--gpu-mem", "2GB"], "leaves nothing after the 3.0 GiB reserve"),
                          (["--gpus", "3"], "no TP x PP x DP x micro-batch layout of 3 GPUs passes validation")]:
        assert tool.main([config, *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("plan_run: ") and message in err, (args, err)


def test_transformer_engine_layouts_are_planned_without_transformer_engine():
    """backend=te keeps no s² scores (fused attention), nor does the local backend's default SDPA;
    the plan needs no TE on the planning machine."""
    local = load_config(None, TINY + ["train.global_batch_size=8", "model.attention=megatron"])
    sdpa = load_config(None, TINY + ["train.global_batch_size=8"])
    te = load_config(None, TINY + ["train.global_batch_size=8", "model.backend=te"])
    assert planner.activation_bytes_per_layer(te, 2) == planner.activation_bytes_per_layer(local, 2, "selective")
    assert planner.activation_bytes_per_layer(sdpa, 2) == planner.activation_bytes_per_layer(te, 2)
    assert planner.activation_bytes_per_layer(te, 2) < planner.activation_bytes_per_layer(local, 2)
    s, b, a = sdpa.train.seq_length, 2, sdpa.model.num_attention_heads  # the difference is the scores, 2·a·s²·b bytes in BF16
    assert planner.activation_bytes_per_layer(local, b) - planner.activation_bytes_per_layer(sdpa, b) == \
        pytest.approx(2 * a * s * s * b * (1 if planner.bf16_run(local) else 2))
    assert len(planner.search(te, 4, planner.parse_memory("80GB"), 1e15)) == \
        len(planner.search(local, 4, planner.parse_memory("80GB"), 1e15))


def test_every_documented_plan_command_runs(tmp_path, capsys):
    """The plan_run commands of the README and docs, in this process (the CLI test above runs one
    as a subprocess)."""
    import re
    import shlex

    tool = load_tool()
    commands = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = re.sub(r"\\\n\s*", " ", doc.read_text())
        commands += [shlex.split(line.strip()) for line in text.splitlines()
                     if line.lstrip().startswith("python tools/plan_run.py")]
    assert len(commands) >= 3
    for argv in commands:
        argv = argv[2:]
        if "--json" in argv:
            argv[argv.index("--json") + 1] = str(tmp_path / "plan.json")
        assert tool.main([str(REPO / argv[0]), *argv[1:]]) == 0, argv
        assert "best as overrides" in capsys.readouterr().out, argv
