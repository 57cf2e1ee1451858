"""The scheme abstraction's promises, and the checks around the norm-replacement schemes.

  * no scheme name appears in the trainer, the optimizer, the checkpoint code or the exporter
    (each scheme is one module plus one registry entry); the config imports no model code;
  * Transformer Engine layout per scheme: the fused LayerNorm-Linear and TENorm only where the
    norm is a plain RMSNorm/LayerNorm;
  * invalid combinations are refused before any process group, each with its own message;
  * BHyT's estimated post-attention statistics track the exact ones at initialisation;
  * OSP's EmbProj matrices go to Muon, the embedding, head and norm scalars to Adam;
  * the evaluation and fine-tuning tools run on checkpoints of the new schemes.
"""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_model_reference import BASE_OVERRIDES, build, inputs, make_cfg  # noqa: F401  (conftest's megatron_env reads it)

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "megatron_gpas"
# the trainer, the optimizer, the checkpoint code and the exporter
SCHEME_AGNOSTIC = ["training.py", "optim.py", "checkpoint.py", "checkpoint_paths.py", "validation.py",
                   "hf/export.py", "hf/fold.py", "hf/mapping.py", "hf/import_hf.py", "hf/hf_config.py",
                   "model/builder.py", "model/spec.py", "model/layer.py", "model/sublayer.py", "model/norms.py"]


def test_no_scheme_names_outside_the_scheme_modules():
    from megatron_gpas.model.schemes import SCHEMES

    found = []
    for rel in SCHEME_AGNOSTIC:
        tree = ast.parse((PACKAGE / rel).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in SCHEMES:
                found.append(f"{rel}:{node.lineno} {node.value!r}")
    assert not found, "scheme names outside model/schemes/: " + ", ".join(found)


def test_config_and_checkpoint_paths_import_no_model_code():
    code = ("import sys, megatron_gpas.config, megatron_gpas.checkpoint_paths; "
            "bad = [m for m in sys.modules if m.startswith(('megatron_gpas.model', 'megatron_gpas.checkpoint.', "
            "'megatron.core.models'))]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


# --------------------------------------------------------------------------- TE layout

# overrides -> (fused input norms, TENorm final norm)
TE_LAYOUTS = {
    "pre": ((), (True, True)),
    "pre+gpas": (("gpas.enabled=true",), (True, True)),
    "pre+gpas@before_sublayer": (("gpas.enabled=true", "gpas.position=before_sublayer"), (False, True)),
    "pre@layernorm": (("norm.kind=layernorm",), (True, True)),
    "pre@rmsnorm+bias": (("norm.bias=true",), (False, False)),
    "sandwich": (("norm.scheme=sandwich",), (False, True)),
    "pre_rmsnorm": (("norm.scheme=pre_rmsnorm",), (False, False)),
    "pre_rmsnorm_nobias": (("norm.scheme=pre_rmsnorm", "norm.bias=false"), (True, True)),
    "crmsnorm": (("norm.scheme=crmsnorm",), (False, False)),
    "osp": (("norm.scheme=osp",), (False, False)),
    "osp_multiscale": (("norm.scheme=osp", "norm.options.single_scale=false"), (False, True)),
    "dyt": (("norm.scheme=dyt", "norm.options.alpha0=[1.0, 1.0, 1.0]"), (False, False)),
    "bhyt": (("norm.scheme=bhyt",), (False, True)),
    "bhyt_final_lambda": (("norm.scheme=bhyt", "norm.options.lambdas=[2.0, 1.0, 1.0]"), (False, False)),
    "bhytstar": (("norm.scheme=bhytstar",), (False, True)),
    "simplenorm": (("norm.scheme=simplenorm",), (False, True)),
}


@pytest.mark.parametrize("case", list(TE_LAYOUTS))
def test_transformer_engine_layout_per_scheme(case):
    from megatron_gpas.model.schemes import get_scheme

    overrides, (fused, te_final) = TE_LAYOUTS[case]
    cfg = make_cfg(*overrides)
    scheme = get_scheme(cfg)
    assert scheme.fusable_input_norm(cfg) is fused
    assert scheme.te_final_norm(cfg) is te_final


# --------------------------------------------------------------------------- invalid combinations

INVALID = {
    "dyt_without_alpha0": (["norm.scheme=dyt"], "needs its initial α per position for hidden size 64"),
    "dyt_alpha0_length": (["norm.scheme=dyt", "norm.options.alpha0=[1.0, 1.0]"], "three positive numbers"),
    "option_typo": (["norm.scheme=bhyt", "norm.options.lambda=[2.0, 1.0, 0.0]"],
                    "unknown config key 'norm.options.lambda'. Did you mean 'lambdas'"),
    "option_of_another_scheme": (["norm.scheme=osp", "norm.options.kappa=4"], "unknown config key 'norm.options.kappa'"),
    "option_type": (["norm.scheme=osp", "norm.options.single_scale=maybe"], "norm.options.single_scale' must be true/false"),
    "kind_on_own_norm": (["norm.scheme=osp", "norm.kind=layernorm"], "norm.scheme=osp has its own norm"),
    "bias_on_dyt": (["norm.scheme=dyt", "norm.options.alpha0=[1, 1, 1]", "norm.bias=true"],
                    "norm.bias is not an option of norm.scheme=dyt"),
    "unknown_kind": (["norm.kind=batchnorm"], "unknown norm.kind 'batchnorm'"),
    "bhyt_gate_in_branch": (["norm.scheme=bhyt", "gpas.enabled=true", "gpas.position=after_norm"],
                            "use gpas.position=after_sublayer or before_sublayer, or norm.scheme=bhytstar"),
    "bhyt_lambdas": (["norm.scheme=bhyt", "norm.options.lambdas=[0.0, 1.0, 0.0]"], "norm.options.lambdas must be"),
    "bhyt_kappa": (["norm.scheme=bhyt", "norm.options.kappa=0"], "norm.options.kappa must be positive"),
    "gate_position_on_post": (["norm.scheme=post", "gpas.position=after_norm"], "defined for pre-norm hosts"),
    "simplenorm_gate_after_norm": (["norm.scheme=simplenorm", "gpas.enabled=true", "gpas.position=after_norm"],
                                   "simplenorm has none"),
    "simplenorm_tp_width": (["norm.scheme=simplenorm", "model.num_query_groups=1", "parallel.tensor=2"],
                            "must be multiples of parallel.tensor"),
    "muon_with_distributed_optimizer": (["optim.optimizer=muon", "parallel.distributed_optimizer=true"],
                                        "distributed_optimizer"),
    "negative_eps": (["norm.eps=-1e-6"], "norm.eps must be >= 0"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_combinations_are_refused_with_their_own_message(case):
    from megatron_gpas.config import ConfigError
    from megatron_gpas.validation import validate

    overrides, message = INVALID[case]
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        validate(make_cfg("data.paths=[x]", *overrides), world_size=1, check_files=False)


def test_the_cli_refuses_before_any_process_group(tmp_path):
    result = subprocess.run([sys.executable, "-m", "megatron_gpas.pretrain", "model.preset=tiny",
                             "norm.scheme=dyt", "data.paths=[x]"], capture_output=True, text=True, cwd=REPO,
                            timeout=120)
    assert result.returncode == 2 and "norm.options.alpha0" in result.stderr, result.stderr


# --------------------------------------------------------------------------- BHyT's estimate

BHYT_INIT = ("model.init_std=0.2", "model.embedding_init_std=0.3")
BHYT_ESTIMATE_RANGE = (0.4, 1.1)
BHYT_MIN_C_SHARE = 0.02


def test_bhyt_estimate_tracks_the_exact_statistics_at_init(megatron_env):
    """The post-attention estimate mean(x²) + c_attn·λ₁²/κ² against the exact mean(h²) of the
    MLP norm's input, per token, in every layer of a freshly initialised model whose attention
    branch is large enough for c_attn to matter. c_attn models attention as an average over all
    T positions; causal attention averages over t ≤ T, so the estimate is low, more so in deeper
    layers (measured 0.83, 0.72, 0.62, 0.54 for layers 1-4): it must stay within
    BHYT_ESTIMATE_RANGE and be closer to the exact value than mean(x²) alone, i.e. the c_attn term
    corrects in the right direction without overshooting."""
    cfg = make_cfg("norm.scheme=bhyt", *BHYT_INIT)
    model = build(cfg)
    records = []
    for layer in model.decoder.layers:
        norm, record = layer.pre_mlp_layernorm, {}

        def estimate(original=norm.mean_square_estimate, record=record):
            record["estimate"] = original()
            return record["estimate"]

        norm.mean_square_estimate = estimate
        norm.register_forward_pre_hook(lambda module, args, record=record: record.update(h=args[0]))
        record["c_term"] = (norm.c_attn * layer.input_layernorm.lam.square() / 100).item()
        records.append(record)
    tokens, positions, _ = inputs(cfg.model.vocab_size)
    with torch.no_grad():
        model(tokens, positions, None)
    for record in records:
        exact = record["h"].double().square().mean(-1, keepdim=True)
        ratio = (record["estimate"].double() / exact).mean().item()
        share = record["c_term"] / record["estimate"].double().mean().item()
        print(f"estimate/exact {ratio:.3f}, c_attn term {100 * share:.1f}% of the estimate")
        assert BHYT_ESTIMATE_RANGE[0] < ratio < BHYT_ESTIMATE_RANGE[1]
        assert share > BHYT_MIN_C_SHARE
        assert abs(ratio - 1) < abs(ratio * (1 - share) - 1)  # better than without c_attn


# --------------------------------------------------------------------------- Muon routing


def test_muon_takes_the_osp_projections(megatron_env):
    from megatron_gpas.optim import optimizer_routing

    model = build(make_cfg("norm.scheme=osp", "optim.optimizer=muon"))
    routes = optimizer_routing([model])
    assert routes["embedding_transform.weight"] == routes["head_transform.weight"] == "muon"
    assert routes["embedding.word_embeddings.weight"] == routes["output_layer.weight"] == "adam"
    scalars = [name for name in routes if name.endswith("layernorm.weight")]
    assert scalars and all(routes[name] == "adam" for name in scalars)  # SSNorm's g
    assert {routes[n] for n in routes if n.endswith(("linear_qkv.weight", "linear_fc2.weight"))} == {"muon"}


# --------------------------------------------------------------------------- tools on the new schemes

NEW_SCHEMES = {
    "pre_ln_gpas": ["norm.kind=layernorm", "gpas.enabled=true"],
    "crmsnorm_gpas": ["norm.scheme=crmsnorm", "gpas.enabled=true"],
    "osp_muon": ["norm.scheme=osp", "optim.optimizer=muon"],
    "dyt_gpas": ["norm.scheme=dyt", "gpas.enabled=true", "norm.options.alpha0=[0.9, 0.6, 0.4]"],
    "bhyt_gpas": ["norm.scheme=bhyt", "gpas.enabled=true", "norm.options.refresh_interval=1"],
}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> dict:
    """Per scheme: 2 pretraining steps ending with an evaluation, and the checkpoint."""
    from megatron.core import parallel_state

    from megatron_gpas import distributed
    from megatron_gpas.config import load_config
    from megatron_gpas.training import Trainer
    from synthetic import write_synthetic_dataset

    ws = tmp_path_factory.mktemp("scheme_tools")
    prefix = write_synthetic_dataset(str(ws / "synthetic"), vocab_size=128, num_docs=60, doc_len=100)
    out = {"ws": ws, "prefix": prefix}
    for name, overrides in NEW_SCHEMES.items():
        if parallel_state.model_parallel_is_initialized():
            distributed.shutdown(keep_process_group=True)
        trainer = Trainer(load_config(None, [
            "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.ffn_hidden_size=64",
            "model.vocab_size=128", "model.make_vocab_size_divisible_by=64", "model.max_seq_length=64",
            *overrides, "train.steps=2", "train.seq_length=16", "train.micro_batch_size=2",
            "train.global_batch_size=4", "train.eval_iters=2", "optim.lr=1.0e-2", f"data.paths=['{prefix}']",
            "data.tokenizer.kind='null'", "data.tokenizer.vocab_size=128", f"data.cache_dir='{ws / 'cache'}'",
            "data.split='80,20,0'", f"checkpoint.save='{ws / name}'", f"logging.dir='{ws / 'runs' / name}'",
            "logging.tensorboard=false", "logging.plots=false"]))
        try:
            out[name] = trainer.train()["eval/loss"]
        finally:
            trainer.close(keep_process_group=True)
    return out


@pytest.mark.parametrize("name", list(NEW_SCHEMES))
def test_evaluate_tool_reproduces_the_trainer_eval_loss(pretrained, name):
    from test_evaluate import evaluate_tool

    out = pretrained["ws"] / f"{name}.json"
    code = evaluate_tool.main([str(pretrained["ws"] / name), "--data", pretrained["prefix"], "--output", str(out),
                               "--split", "valid", "--num-batches", "2", "--micro-batch-size", "2",
                               "--global-batch-size", "4"])
    assert code == 0
    assert json.loads(out.read_text())["loss"] == pytest.approx(pretrained[name], rel=1e-12)


def test_fine_tuning_runs_on_a_new_scheme_checkpoint(pretrained):
    ws = pretrained["ws"]
    data = ws / "sft.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"{i} {i + 1}", "response": f"{i + 2} {i + 3}"})
                              for i in range(5, 45)) + "\n")
    result = subprocess.run([
        sys.executable, "-m", "megatron_gpas.finetune", f"checkpoint.pretrained={ws / 'bhyt_gpas'}",
        f"sft.train_files=[{data}]",
        "train.steps=2", "train.seq_length=16", "train.micro_batch_size=2", "train.global_batch_size=4",
        f"checkpoint.save={ws / 'ft'}", f"logging.dir={ws / 'ft_runs'}", "logging.tensorboard=false",
        "logging.plots=false"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    saved = (ws / "ft" / "iter_0000002" / "run_config.yaml").read_text()
    assert "scheme: bhyt" in saved and "refresh_interval: 1" in saved  # the network came from the checkpoint
    losses = [json.loads(line)["train/loss"] for line in (ws / "ft_runs" / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in line]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
