"""Config loading, presets, overrides and fail-fast validation (megatron_gpas.config).

Every invalid config must be rejected by ``load_config``/``validate`` with its own specific
message, and the CLI must report it (exit 2) before any process group starts.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from megatron_gpas.config import PRESETS, Config, ConfigError, load_config, parse_override
from megatron_gpas.validation import validate

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "examples"


# --------------------------------------------------------------------------- helpers


def _write_yaml(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


@pytest.fixture
def files(tmp_path) -> dict[str, str]:
    """Empty stand-ins for the files a valid config needs (validate only checks existence)."""
    prefix = tmp_path / "data" / "corpus_text_document"
    prefix.parent.mkdir()
    for suffix in (".bin", ".idx"):
        Path(str(prefix) + suffix).touch()
    tokenizer = tmp_path / "tokenizer.model"
    tokenizer.touch()
    return {"prefix": str(prefix), "tokenizer": str(tokenizer)}


def _base_tree(files: dict[str, str]) -> dict:
    """A small config that passes every check with world_size=1 and check_files=True."""
    return {
        "model": {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "ffn_hidden_size": 172,
                  "vocab_size": 32000},
        "norm": {"scheme": "pre"},
        "gpas": {"enabled": True, "activation": "silu"},
        "train": {"steps": 10, "seq_length": 128, "micro_batch_size": 2, "global_batch_size": 8},
        "optim": {"lr": 1.0e-3, "warmup_steps": 2},
        "data": {"paths": [files["prefix"]], "tokenizer": {"kind": "sentencepiece", "path": files["tokenizer"]}},
    }


@pytest.fixture
def base_yaml(tmp_path, files) -> Path:
    return _write_yaml(tmp_path / "base.yaml", _base_tree(files))


def _load_and_validate(path, overrides, world_size=1, check_files=True) -> Config:
    cfg = load_config(path, overrides)
    validate(cfg, world_size=world_size, check_files=check_files)
    return cfg


def _te_available() -> bool:
    from megatron_gpas.model.spec import transformer_engine_available

    return transformer_engine_available()


# --------------------------------------------------------------------------- the valid base


def test_base_config_is_valid(base_yaml):
    cfg = _load_and_validate(base_yaml, [])
    assert cfg.model.num_layers == 4 and cfg.gpas.enabled is True
    assert cfg.data.paths == [str(base_yaml.parent / "data" / "corpus_text_document")]


# --------------------------------------------------------------------------- invalid configs

# (id, overrides on top of the valid base, world size, distinctive part of the message)
INVALID = [
    ("heads_not_divisible_by_tp",
     ["parallel.tensor=3"], 3,
     "model.num_attention_heads (4) is not divisible by parallel.tensor (3)"),
    ("layers_not_divisible_by_pp_x_vp",
     ["parallel.pipeline=2", "parallel.virtual_pipeline=3"], 2,
     "model.num_layers (4) is not divisible by parallel.pipeline × parallel.virtual_pipeline (2 × 3 = 6)"),
    ("kv_groups_not_divisible_by_tp",
     ["model.num_attention_heads=8", "model.num_query_groups=2", "parallel.tensor=4"], 4,
     "KV groups (model.num_query_groups = 2) are not divisible by parallel.tensor (4)"),
    ("global_batch_not_divisible_by_micro_x_dp",
     ["train.micro_batch_size=4", "train.global_batch_size=12"], 2,
     "train.global_batch_size (12) is not divisible by train.micro_batch_size × data-parallel size (4 × 2)"),
    ("seq_length_above_preset_limit",
     ["model.preset=71m", "train.seq_length=2048"], 1,
     "train.seq_length (2048) exceeds the model's limit model.max_seq_length (1024, preset 71m)"),
    ("unknown_norm_scheme",
     ["norm.scheme=no_such_scheme"], 1,
     "unknown norm.scheme 'no_such_scheme'"),
    ("unknown_gpas_activation",
     ["gpas.activation=no_such_activation"], 1,
     "unknown gpas.activation 'no_such_activation'"),
    ("missing_data_files",
     ["data.paths=[/nonexistent/corpus_text_document]"], 1,
     "data file not found: /nonexistent/corpus_text_document.bin"),
    ("virtual_pipeline_without_pipeline",
     ["parallel.virtual_pipeline=2"], 1,
     "parallel.virtual_pipeline > 1 needs parallel.pipeline > 1"),
    ("sequence_parallel_with_tp1",
     ["parallel.sequence_parallel=true"], 1,
     "parallel.sequence_parallel needs parallel.tensor > 1"),
    ("weights_paths_length_mismatch",
     ["data.weights=[0.5, 0.5]"], 1,
     "data.weights has 2 entries but data.paths has 1"),
    ("world_not_divisible_by_tp_x_pp",
     ["parallel.tensor=2"], 3,
     "world size 3 is not divisible by parallel.tensor × parallel.pipeline (2 × 1)"),
    ("ffn_not_divisible_by_tp",
     ["model.ffn_hidden_size=170", "parallel.tensor=4"], 4,
     "model.ffn_hidden_size (170) is not divisible by parallel.tensor (4)"),
    ("hidden_not_divisible_by_heads",
     ["model.hidden_size=66"], 1,
     "model.hidden_size (66) is not divisible by model.num_attention_heads (4)"),
    ("missing_tokenizer_file",
     ["data.tokenizer.path=/nonexistent/tokenizer.model"], 1,
     "tokenizer file not found: data.tokenizer.path = '/nonexistent/tokenizer.model'"),
    ("bad_split",
     ["data.split='90,10'"], 1,
     "data.split must be three non-negative numbers like '98,1,1', got '90,10'"),
    ("unknown_precision",
     ["train.precision=fp16"], 1,
     "train.precision must be auto, bf16 or fp32, got 'fp16'"),
]


@pytest.mark.parametrize("overrides,world_size,message", [case[1:] for case in INVALID],
                         ids=[case[0] for case in INVALID])
def test_invalid_config_is_rejected_with_its_message(base_yaml, overrides, world_size, message):
    with pytest.raises(ConfigError) as info:
        _load_and_validate(base_yaml, overrides, world_size=world_size)
    assert message in str(info.value)


def test_invalid_cases_have_distinct_messages():
    messages = [case[3] for case in INVALID]
    assert len(set(messages)) == len(messages)


# Values that used to crash late (ZeroDivisionError, NaN weights, a silent eval loss of 0) or were
# accepted: each is refused by load_config/validate with a message naming the key.
# (override on top of the valid base, distinctive part of the message)
INVALID_VALUES = {
    "global_batch_zero": ("train.global_batch_size=0", "train.global_batch_size must be positive, got 0"),
    "log_interval_zero": ("logging.interval=0", "logging.interval must be >= 1, got 0"),
    "log_interval_negative": ("logging.interval=-5", "logging.interval must be >= 1, got -5"),
    "eval_iters_negative": ("train.eval_iters=-1", "train.eval_iters must be >= 0 (0 = no evaluation), got -1"),
    "eval_interval_negative": ("train.eval_interval=-10", "train.eval_interval must be >= 0"),
    "save_interval_negative": ("checkpoint.save_interval=-1", "checkpoint.save_interval must be >= 0"),
    "exit_after_steps_negative": ("train.exit_after_steps=-1", "train.exit_after_steps must be >= 0"),
    "exit_duration_negative": ("train.exit_duration_minutes=-0.5", "train.exit_duration_minutes must be >= 0"),
    "max_skipped_negative": ("train.max_skipped_steps=-1", "train.max_skipped_steps must be >= 0"),
    "spike_factor_negative": ("train.loss_spike_factor=-2", "train.loss_spike_factor must be 0 (off) or > 1"),
    "spike_factor_below_one": ("train.loss_spike_factor=0.5", "train.loss_spike_factor must be 0 (off) or > 1"),
    "spike_window_zero": ("train.loss_spike_window=0", "train.loss_spike_window must be >= 1, got 0"),
    "seed_negative": ("train.seed=-1", "train.seed must be >= 0"),
    "norm_eps_negative": ("norm.eps=-1e-6", "norm.eps must be >= 0, got -1e-06"),
    "norm_eps_inf": ("norm.eps=.inf", "config key 'norm.eps' must be a finite number, got inf"),
    "lr_inf": ("optim.lr=.inf", "config key 'optim.lr' must be a finite number, got inf"),
    "lr_inf_plain": ("optim.lr=inf", "config key 'optim.lr' must be a finite number, got inf"),
    "lr_nan": ("optim.lr=.nan", "config key 'optim.lr' must be a finite number, got nan"),
    "lr_negative": ("optim.lr=-1e-3", "optim.lr must be positive, got -0.001"),
    "adam_eps_zero": ("optim.adam_eps=0", "optim.adam_eps must be positive, got 0.0"),
    "adam_eps_negative": ("optim.adam_eps=-1e-8", "optim.adam_eps must be positive"),
    "adam_beta1_one": ("optim.adam_beta1=1.0", "optim.adam_beta1 must be in [0, 1), got 1.0"),
    "adam_beta1_negative": ("optim.adam_beta1=-0.1", "optim.adam_beta1 must be in [0, 1), got -0.1"),
    "adam_beta2_above_one": ("optim.adam_beta2=1.5", "optim.adam_beta2 must be in [0, 1), got 1.5"),
    "weight_decay_inf": ("optim.weight_decay=.inf", "config key 'optim.weight_decay' must be a finite number"),
    "min_lr_ratio_nan": ("optim.min_lr_ratio=.nan", "config key 'optim.min_lr_ratio' must be a finite number"),
    "min_lr_ratio_above_one": ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio must be in [0, 1], got 1.5"),
    "decay_steps_zero": ("optim.decay_steps=0", "optim.decay_steps must be positive (or null = train.steps), got 0"),
    "clip_grad_inf": ("optim.clip_grad=.inf", "config key 'optim.clip_grad' must be a finite number"),
    "gate_clip_negative": ("gpas.clip_grad=-1", "gpas.clip_grad must be >= 0 (0 disables), got -1.0"),
    "muon_lr_inf": ("optim.muon_lr=.inf", "config key 'optim.muon_lr' must be a finite number"),
    "muon_momentum_nan": ("optim.muon_momentum=.nan", "config key 'optim.muon_momentum' must be a finite number"),
    "muon_scale_inf": ("optim.muon_scale=.inf", "config key 'optim.muon_scale' must be a finite number"),
    "muon_weight_decay_negative": ("optim.muon_weight_decay=-0.1", "optim.muon_weight_decay must be >= 0"),
    "vocab_multiple_zero": ("model.make_vocab_size_divisible_by=0", "model.make_vocab_size_divisible_by must be >= 1"),
    "query_groups_negative": ("model.num_query_groups=-2", "model.num_query_groups must be positive (or null), got -2"),
    "rope_base_zero": ("model.rope_base=0", "model.rope_base must be positive"),
    "blend_weight_nan": ("data.weights=[.nan]", "config key 'data.weights[0]' must be a finite number"),
    "num_workers_negative": ("data.num_workers=-1", "data.num_workers must be >= 0"),
}


@pytest.mark.parametrize("override,message", INVALID_VALUES.values(), ids=INVALID_VALUES.keys())
def test_invalid_value_is_rejected_naming_the_key(base_yaml, override, message):
    with pytest.raises(ConfigError) as info:
        _load_and_validate(base_yaml, [override])
    assert message in str(info.value)


def test_scheme_options_must_be_finite(base_yaml):
    with pytest.raises(ConfigError, match=r"config key 'norm\.options\.alpha0\[1\]' must be a finite number, got inf"):
        _load_and_validate(base_yaml, ["norm.scheme=dyt", "norm.options.alpha0=[0.5, .inf, 0.5]"])


@pytest.mark.parametrize("key,value", [("optim", "lr"), ("train", "loss_spike_factor"), ("norm", "eps")])
def test_non_finite_values_set_in_code_are_rejected_by_validate(base_yaml, key, value):
    """Configs built or changed in Python bypass the loader's check; validate has its own."""
    for bad in (float("inf"), float("nan")):
        cfg = load_config(base_yaml)
        setattr(getattr(cfg, key), value, bad)
        with pytest.raises(ConfigError, match=rf"config key '{key}\.{value}' must be a finite number, got {bad}"):
            validate(cfg, world_size=1)


def test_zero_means_off_where_documented(base_yaml):
    """0 = off for these keys (the ranges above refuse only what has no meaning)."""
    _load_and_validate(base_yaml, ["train.eval_iters=0", "train.eval_interval=0", "checkpoint.save_interval=0",
                                   "train.exit_after_steps=0", "train.exit_duration_minutes=0",
                                   "train.max_skipped_steps=0", "train.loss_spike_factor=0", "optim.clip_grad=0",
                                   "norm.eps=0"])


# (TP, the two nearest widths that split over TP ranks, the two nearest multiples of lcm(64·TP, 256));
# worked out by hand for the 1B preset's FFN width 5461 (= 8/3 × 2048, as the GPAS paper has it)
FFN_SUGGESTIONS = [(2, "5460 or 5462", 256, "5376 or 5632"),
                   (4, "5460 or 5464", 256, "5376 or 5632"),
                   (8, "5456 or 5464", 512, "5120 or 5632")]


@pytest.mark.parametrize("tp,nearest,step,friendly", FFN_SUGGESTIONS, ids=[f"tp{c[0]}" for c in FFN_SUGGESTIONS])
def test_ffn_width_error_suggests_valid_widths(tp, nearest, step, friendly):
    with pytest.raises(ConfigError) as info:
        validate(load_config(None, ["model.preset=1b", f"parallel.tensor={tp}", "data.paths=[x]"]),
                 world_size=tp, check_files=False)
    msg = str(info.value)
    assert f"model.ffn_hidden_size (5461) is not divisible by parallel.tensor ({tp})" in msg
    assert f"are {nearest};" in msg and f"(multiples of {step}" in msg and msg.endswith(f"are {friendly}")
    for width in nearest.split(" or ") + friendly.split(" or "):  # every suggestion is accepted
        validate(load_config(None, ["model.preset=1b", f"parallel.tensor={tp}", "data.paths=[x]",
                                    f"model.ffn_hidden_size={width}"]), world_size=tp, check_files=False)


@pytest.mark.parametrize("overrides,world_size,suggestion", [
    (["model.preset=1b", "model.ffn_hidden_size=5632", "parallel.tensor=3"], 3,
     "parallel.tensor can be 1, 2, 4, 8, 16, 32"),
    (["model.preset=llama3-8b", "parallel.tensor=16"], 16, "parallel.tensor can be 1, 2, 4, 8"),
    (["model.preset=1b", "parallel.pipeline=5"], 5, "the product can be 1, 2, 3, 4, 6, 8, 12, 24"),
    (["model.preset=1b", "train.micro_batch_size=4", "train.global_batch_size=10"], 1,
     "e.g. train.global_batch_size=8 or 12"),
    (["model.preset=1b", "parallel.pipeline=2"], 3, "run 2 or 4 processes"),
], ids=["heads", "kv_groups", "layers", "batch", "world"])
def test_divisibility_errors_suggest_values(overrides, world_size, suggestion):
    with pytest.raises(ConfigError, match=re.escape(suggestion)):
        validate(load_config(None, [*overrides, "data.paths=[x]"]), world_size=world_size, check_files=False)


def test_backend_te_without_transformer_engine(base_yaml):
    if _te_available():
        pytest.skip("Transformer Engine with a CUDA GPU is available here")
    with pytest.raises(ConfigError, match=r"model\.backend=te needs Transformer Engine"):
        _load_and_validate(base_yaml, ["model.backend=te"])


def test_bf16_without_gpu(base_yaml):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is available here")
    with pytest.raises(ConfigError, match=r"train\.precision=bf16 needs a CUDA GPU"):
        _load_and_validate(base_yaml, ["train.precision=bf16"])


@pytest.mark.parametrize("overrides,message", [
    (["train.fp8=e4m3"], r"train\.fp8 needs model\.backend=te"),
    (["train.fp8=e5m2"], r"train\.fp8 must be e4m3 or hybrid"),
])
def test_fp8_options_are_checked(base_yaml, overrides, message):
    with pytest.raises(ConfigError, match=message):
        _load_and_validate(base_yaml, overrides)


def test_unknown_top_level_section(tmp_path, files):
    tree = _base_tree(files)
    tree["trainer"] = {"steps": 3}
    with pytest.raises(ConfigError) as info:
        load_config(_write_yaml(tmp_path / "c.yaml", tree))
    msg = str(info.value)
    assert "unknown config key 'trainer'" in msg
    assert "Did you mean 'train'?" in msg


def test_unknown_key_inside_section_has_did_you_mean_hint(tmp_path, files):
    tree = _base_tree(files)
    tree["train"]["step"] = 3
    with pytest.raises(ConfigError) as info:
        load_config(_write_yaml(tmp_path / "c.yaml", tree))
    msg = str(info.value)
    assert "unknown config key 'train.step'" in msg
    assert "Did you mean 'steps'?" in msg
    assert "Valid keys here: steps," in msg


def test_unknown_key_via_override(base_yaml):
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.warmup'\. Did you mean 'warmup_steps'\?"):
        load_config(base_yaml, ["optim.warmup=10"])


def test_unknown_preset(base_yaml):
    with pytest.raises(ConfigError) as info:
        load_config(base_yaml, ["model.preset=gpt5"])
    msg = str(info.value)
    assert "unknown model.preset 'gpt5'" in msg
    assert "71m" in msg and "llama3-8b" in msg  # lists the known ones


@pytest.mark.parametrize("override,message", [
    ('train.steps="abc"', "config key 'train.steps' must be an integer, got 'abc'"),
    ("train.steps=abc", "config key 'train.steps' must be an integer, got 'abc'"),
    ("train.steps=2.5", "config key 'train.steps' must be an integer, got 2.5"),
    ("gpas.enabled=yes please", "config key 'gpas.enabled' must be true/false, got 'yes please'"),
    ("optim.lr=fast", "config key 'optim.lr' must be a number, got 'fast'"),
    ("norm.scheme=3", "config key 'norm.scheme' must be a string, got 3"),
    ("train.seq_length=null", "config key 'train.seq_length' must not be null"),
])
def test_wrong_type(base_yaml, override, message):
    with pytest.raises(ConfigError) as info:
        load_config(base_yaml, [override])
    assert message in str(info.value)


def test_wrong_type_in_yaml_file(tmp_path, files):
    tree = _base_tree(files)
    tree["train"]["steps"] = "abc"
    with pytest.raises(ConfigError, match=r"config key 'train\.steps' must be an integer, got 'abc'"):
        load_config(_write_yaml(tmp_path / "c.yaml", tree))


def test_section_must_be_a_mapping(base_yaml):
    with pytest.raises(ConfigError, match=r"config section 'train' must be a mapping"):
        load_config(base_yaml, ["train=5"])


@pytest.mark.parametrize("text", ["train.steps", "gpas.enabled:true", ""])
def test_malformed_override_without_equals(base_yaml, text):
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(base_yaml, [text])
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        parse_override(text)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_check_files_false_skips_file_checks(base_yaml):
    cfg = load_config(base_yaml, ["data.paths=[/nonexistent/x]", "data.tokenizer.path=/nonexistent/t.model"])
    validate(cfg, world_size=1, check_files=False)
    with pytest.raises(ConfigError, match="data file not found"):
        validate(cfg, world_size=1, check_files=True)


def test_world_size_defaults_to_environment(base_yaml, monkeypatch):
    cfg = load_config(base_yaml, ["parallel.tensor=2"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    validate(cfg)  # TP=2 over 2 ranks
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="world size 3 is not divisible"):
        validate(cfg)


# --------------------------------------------------------------------------- presets


def test_preset_71m_fills_the_shape(base_yaml):
    # The base sets the shape explicitly; a fresh file with only the preset gets the preset's shape.
    cfg = load_config(None, ["model.preset=71m"])
    m = cfg.model
    assert (m.hidden_size, m.num_layers, m.num_attention_heads, m.ffn_hidden_size) == (512, 12, 8, 1368)
    assert (m.vocab_size, m.rope_base, m.max_seq_length) == (32000, 10000.0, 1024)
    assert m.num_query_groups is None and m.kv_channels is None


def test_preset_250m_has_head_dim_48():
    m = load_config(None, ["model.preset=250m"]).model
    assert (m.hidden_size, m.num_layers, m.num_attention_heads, m.kv_channels, m.ffn_hidden_size) == \
        (768, 24, 16, 48, 2560)


def test_preset_llama3_8b():
    m = load_config(None, ["model.preset=llama3-8b"]).model
    assert m.num_query_groups == 8
    assert m.vocab_size == 128256
    assert m.rope_base == 500000.0
    assert (m.hidden_size, m.num_layers, m.num_attention_heads, m.ffn_hidden_size) == (4096, 32, 32, 14336)


def test_preset_7b():
    m = load_config(None, ["model.preset=7b"]).model
    assert (m.hidden_size, m.num_layers, m.num_attention_heads, m.ffn_hidden_size) == (4096, 32, 32, 11008)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_a_valid_shape(name):
    cfg = load_config(None, [f"model.preset={name}", "data.paths=[x]", "train.seq_length=256"])
    validate(cfg, world_size=1, check_files=False)


def test_explicit_keys_override_the_preset(tmp_path):
    path = _write_yaml(tmp_path / "c.yaml", {"model": {"preset": "71m", "num_layers": 6, "vocab_size": 50304}})
    m = load_config(path).model
    assert m.num_layers == 6 and m.vocab_size == 50304  # explicit
    assert m.hidden_size == 512 and m.ffn_hidden_size == 1368  # from the preset
    m = load_config(path, ["model.hidden_size=256"]).model  # an override is explicit too
    assert m.hidden_size == 256 and m.num_layers == 6 and m.num_attention_heads == 8


def test_preset_given_by_override_over_a_file_with_a_shape(base_yaml):
    # base.yaml sets num_layers=4, hidden 64, ...: explicit, so they survive the preset
    m = load_config(base_yaml, ["model.preset=130m"]).model
    assert m.num_layers == 4 and m.hidden_size == 64
    assert m.max_seq_length == 1024  # not in base.yaml: from the preset
    assert m.rope_base == 10000.0


# --------------------------------------------------------------------------- overrides


def test_dotted_overrides_are_yaml_typed(base_yaml):
    cfg = load_config(base_yaml, ["train.steps=20", "gpas.enabled=false", "optim.lr=1e-3",
                                  "optim.clip_grad=1", "data.weights=[1, 2]",
                                  "data.paths=[a, b]", "checkpoint.save=null", "logging.dir=runs/x"])
    assert cfg.train.steps == 20 and type(cfg.train.steps) is int
    assert cfg.gpas.enabled is False
    assert cfg.optim.lr == 1e-3 and type(cfg.optim.lr) is float
    assert cfg.optim.clip_grad == 1.0 and type(cfg.optim.clip_grad) is float  # int widened to float
    assert cfg.data.weights == [1.0, 2.0] and all(type(w) is float for w in cfg.data.weights)
    assert cfg.data.paths == ["a", "b"]
    assert cfg.checkpoint.save is None
    assert cfg.logging.dir == "runs/x"


def test_override_wins_over_file_and_creates_sections(base_yaml):
    cfg = load_config(base_yaml, ["train.steps=7", "data.tokenizer.kind='null'",
                                         "data.tokenizer.vocab_size=300"])
    assert cfg.train.steps == 7
    assert cfg.data.tokenizer.kind == "null" and cfg.data.tokenizer.vocab_size == 300
    assert cfg.train.seq_length == 128  # untouched keys keep the file's values


def test_later_override_wins(base_yaml):
    assert load_config(base_yaml, ["train.steps=3", "train.steps=5"]).train.steps == 5


def test_warmup_as_long_as_the_decay_is_rejected(base_yaml):
    with pytest.raises(ConfigError, match=r"optim\.warmup_steps \(10\)"):
        _load_and_validate(base_yaml, ["optim.warmup_steps=10", "train.steps=10"])


def test_float_override_in_exponent_form_without_dot(base_yaml):
    cfg = load_config(base_yaml, ["optim.lr=1e-3", "optim.adam_eps=1e-8"])
    assert cfg.optim.lr == 1e-3 and type(cfg.optim.lr) is float
    assert cfg.optim.adam_eps == 1e-8


# --------------------------------------------------------------------------- the CLI fails fast


def _run_cli(*args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("WORLD_SIZE", None)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "megatron_gpas.pretrain", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - start


# A process group started by the trainer would show up as one of these (CPU bridge notice,
# the trainer's setup lines, or torch.distributed's own messages).
_STARTED_MARKERS = ("[setup]", "No CUDA device: Megatron-Core runs on CPU", "ProcessGroup", "init_process_group")


@pytest.mark.parametrize("tree_change,message", [
    # rejected while loading (no Megatron import at all)
    (lambda t: t["train"].update(step=3), "unknown config key 'train.step'. Did you mean 'steps'?"),
    # rejected by validate(): the layout
    (lambda t: t.setdefault("parallel", {}).update(tensor=3), "is not divisible by parallel.tensor (3)"),
    # rejected by validate(): the data files
    (lambda t: t["data"].update(paths=["/nonexistent/corpus"]), "data file not found: /nonexistent/corpus.bin"),
    # values that used to fail late: a ZeroDivisionError in the first step, NaN weights
    (lambda t: t["train"].update(global_batch_size=0), "train.global_batch_size must be positive, got 0"),
    (lambda t: t["optim"].update(lr=float("inf")), "config key 'optim.lr' must be a finite number, got inf"),
], ids=["unknown_key", "tp_layout", "missing_data", "global_batch_zero", "lr_inf"])
def test_cli_exits_2_with_the_message_before_any_process_group(tmp_path, files, tree_change, message):
    tree = _base_tree(files)
    tree_change(tree)
    bad = _write_yaml(tmp_path / "bad.yaml", tree)
    proc, elapsed = _run_cli("--config", str(bad))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"error: " in proc.stderr and message in proc.stderr, proc.stderr
    for marker in _STARTED_MARKERS:
        assert marker not in proc.stdout + proc.stderr, f"{marker!r} printed: a process group was started"
    # "fails in seconds": ~0.2 s for a load error, ~7 s for a validate error (imports); generous for busy CI
    assert elapsed < 60, f"took {elapsed:.1f}s"


def test_cli_bad_override_exits_2(base_yaml):
    proc, _ = _run_cli("--config", str(base_yaml), "train.steps")
    assert proc.returncode == 2
    assert "error: override 'train.steps' must look like section.key=value" in proc.stderr


def test_cli_never_reaches_init_distributed_on_a_bad_config(tmp_path, files, monkeypatch, capsys):
    """In-process: the error is reported with init_distributed never called."""
    import megatron_gpas.distributed as distributed
    from megatron_gpas import pretrain

    def forbidden(*args, **kwargs):
        raise AssertionError("init_distributed called for an invalid config")

    monkeypatch.setattr(distributed, "init_distributed", forbidden)
    tree = _base_tree(files)
    tree["data"]["weights"] = [1.0, 2.0]
    bad = _write_yaml(tmp_path / "bad.yaml", tree)
    assert pretrain.main(["--config", str(bad)]) == 2
    assert "error: data.weights has 2 entries but data.paths has 1" in capsys.readouterr().err


# --------------------------------------------------------------------------- example configs


def _example_files() -> list[Path]:
    return sorted(EXAMPLES.rglob("*.yaml"))


def test_examples_exist():
    names = {str(p.relative_to(EXAMPLES)) for p in _example_files()}
    expected = {"demo_pre_gpas.yaml", "llama3_8b_pre_gpas.yaml"}
    for size in ("71m", "130m", "250m", "350m", "1b", "7b"):
        expected |= {f"paper/pre_{size}.yaml", f"paper/pre_gpas_{size}.yaml"}
    assert expected <= names, expected - names


@pytest.mark.parametrize("path", _example_files(), ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_example_config_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.model.backend == "local", "keep examples on backend local; model.backend=te is an override"
    tp_pp = cfg.parallel.tensor * cfg.parallel.pipeline
    t = cfg.train
    validate(cfg, world_size=tp_pp, check_files=False)  # DP=1
    for dp in (2, 4, 8):  # and every data-parallel size the global batch allows
        if t.global_batch_size % (t.micro_batch_size * dp) == 0:
            validate(cfg, world_size=tp_pp * dp, check_files=False)


def test_example_configs_are_up_to_date_with_their_generator():
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    try:
        import make_paper_configs
    finally:
        sys.path.pop(0)
    for rel, text in make_paper_configs.render_all().items():
        assert (EXAMPLES / rel).read_text() == text, f"examples/{rel} is stale: run tools/make_paper_configs.py"


# Table 1 of the GPAS paper (targets.md): size -> (lr, warmup, steps, global batch)
PAPER_TABLE = {"71m": (1e-3, 1000, 10_000, 512), "130m": (1e-3, 2000, 20_000, 512),
               "250m": (1e-3, 4000, 40_000, 512), "350m": (5e-4, 6000, 60_000, 512),
               "1b": (5e-4, 10_000, 100_000, 512), "7b": (3e-4, 10_000, 150_000, 2048)}


@pytest.mark.parametrize("size", sorted(PAPER_TABLE))
@pytest.mark.parametrize("method", ["pre", "pre_gpas"])
def test_paper_configs_follow_table_1(size, method):
    cfg = load_config(EXAMPLES / "paper" / f"{method}_{size}.yaml")
    lr, warmup, steps, gbs = PAPER_TABLE[size]
    assert cfg.model.preset == size and cfg.model.hidden_size == PRESETS[size]["hidden_size"]
    assert cfg.norm.scheme == "pre"
    assert cfg.gpas.enabled is (method == "pre_gpas")
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.train.steps, cfg.train.global_batch_size) == \
        (lr, warmup, steps, gbs)
    assert cfg.train.seq_length == 256 and cfg.train.precision == "auto"
    o = cfg.optim
    assert (o.adam_beta1, o.adam_beta2, o.adam_eps, o.weight_decay, o.min_lr_ratio) == (0.9, 0.999, 1e-8, 0.0, 0.1)
    if size == "7b":
        assert (o.clip_grad, cfg.gpas.clip_grad) == (1.0, 0.01)
    else:
        assert (o.clip_grad, cfg.gpas.clip_grad) == (0.0, 0.0)


def test_demo_config_matches_the_tokenizer_and_assets():
    cfg = load_config(EXAMPLES / "demo_pre_gpas.yaml")
    assert cfg.gpas.enabled and cfg.norm.scheme == "pre"
    assert cfg.model.vocab_size >= 32000  # the demo tokenizer has 32000 pieces
    assert cfg.data.paths == ["demo_assets/data/shakespeare_text_document"]
    assert cfg.data.tokenizer.path == "demo_assets/tokenizer.model"
    assert cfg.optim.warmup_steps < cfg.train.steps
