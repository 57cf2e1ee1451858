"""Typed run configuration: YAML file + dotted overrides + presets + fail-fast validation.

    cfg = load_config("examples/tiny_pre_gpas.yaml", ["train.steps=20", "gpas.enabled=false"])

Every check here runs before any process group starts, so a bad run dies in
seconds with a message that names the offending key.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from megatron_gpas.tokenizer import TOKENIZER_KINDS


class ConfigError(ValueError):
    """An invalid configuration, reported before any expensive work starts."""


# gpas.fused (model/fused.py); "none", not "off": YAML reads off as false
GPAS_FUSED_MODES = ("auto", "compile", "eager", "none")


# --------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    preset: str | None = None  # fills the shape fields below (explicit keys win)
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # GQA groups; None = one per head (MHA)
    kv_channels: int | None = None  # head dim; None = hidden_size / num_attention_heads
    ffn_hidden_size: int = 172  # SwiGLU inner width
    vocab_size: int = 32000  # model vocabulary (>= tokenizer vocabulary)
    make_vocab_size_divisible_by: int = 128  # pad the embedding to a multiple of this × TP
    max_seq_length: int = 2048  # longest sequence this shape is configured for
    rope_base: float = 10000.0
    init_std: float = 0.02  # every linear layer, LM head included (official GPAS code)
    embedding_init_std: float = math.sqrt(2 / 5)  # "scaled embed" of the GPAS code
    backend: str = "local"  # local (Megatron-Core modules, CPU+GPU) | te (Transformer Engine, GPU)
    # local backend's core attention: sdpa (PyTorch's fused scaled_dot_product_attention, flash on
    # GPU and CPU) | megatron (Megatron-Core's DotProductAttention, the full score matrix).
    # Ignored on te, which has its own fused attention.
    attention: str = "sdpa"


@dataclass
class NormConfig:
    # the normalization scheme (megatron_gpas/model/schemes/): the GPAS paper's hosts pre | post |
    # deepnorm | sandwich | mixln | lns, and pre_rmsnorm | crmsnorm | osp | dyt | bhyt | bhytstar
    scheme: str = "pre"
    kind: str = "rmsnorm"  # the norm module of the GPAS paper's hosts: rmsnorm | layernorm
    bias: bool | None = None  # a learnable bias in every norm; None = the scheme's default
    eps: float = 1e-6
    mixln_post_layers: int | None = None  # Mix-LN: layers 1..k are Post-LN; None = ⌊L/4⌋
    lns_mode: str = "init"  # LNS: init = norm weights start at 1/√l (GPAS code) | fixed = constant 1/√l (LNS paper)
    deepnorm_beta_init: bool | None = None  # None = on for DeepNorm, off for DeepNorm+GPAS (official code)
    # options of the chosen scheme, typed and documented by the scheme itself (e.g. dyt: alpha0)
    options: dict[str, Any] = field(default_factory=dict)
    # RMSNorm/LayerNorm by PyTorch's F.rms_norm / F.layer_norm instead of the formula (model/norms.py)
    fused: bool = True


@dataclass
class GPASConfig:
    enabled: bool = False
    activation: str = "silu"  # silu | identity | tanh | relu | leaky_relu | scaled_silu
    silu_beta: float = 8.0  # scaled_silu: act(α) = α·σ(β·α)
    init: float = 0.0
    position: str = "after_sublayer"  # | before_sublayer | after_norm | after_branch (pre-norm hosts)
    stop_gradient: bool = True  # false: plain (1 − act(α))·x, the paper's "w/o sg" ablation
    per_sublayer: bool = False  # one gate per sub-layer instead of one per layer
    # gates keep their values: no gradient, no optimizer state, not clipped. Off for pretraining;
    # python -m megatron_gpas.finetune defaults it to true (the paper fine-tunes with frozen gates)
    freeze: bool = False
    fixed_values: str | None = None  # gate values per layer: YAML/JSON list file or a checkpoint dir
    allow_dead_gate: bool = False  # permit relu with init <= 0 (ReLU'(0) = 0: the gate never moves)
    clip_grad: float = 0.0  # joint L2 clip over all gates after the global clip; 0 = off
    # the gate fused into the residual add (model/fused.py): auto (compile on CUDA, eager elsewhere) |
    # compile (torch.compile'd kernels) | eager (one autograd Function, bitwise the unfused ops) | none
    fused: str = "auto"


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: int = 1  # model chunks per pipeline rank (interleaved 1F1B)
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    # all-gather the distributed optimizer's updated parameters during the next forward (bucket by
    # bucket) instead of right after the step; needs distributed_optimizer and overlap_grad_reduce
    overlap_param_gather: bool = False


@dataclass
class TrainConfig:
    steps: int = 100
    seq_length: int = 256
    micro_batch_size: int = 4
    global_batch_size: int = 8
    seed: int = 42
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    fp8: str | None = None  # Transformer Engine FP8 GEMMs: e4m3 | hybrid (needs model.backend=te)
    fp8_recipe: str = "delayed"  # delayed | tensorwise | mxfp8 | blockwise (Megatron-Core's recipes)
    eval_interval: int = 0  # 0 = evaluate only at the end
    eval_iters: int = 4  # validation global batches per evaluation
    exit_after_steps: int = 0  # stop (with a checkpoint) after this many steps of this run; 0 = off
    # wall-clock budget of this process in minutes, the final save included: stop with a checkpoint
    # (exit code 75, "requeue") when the next step and a save would not fit; 0 = off
    exit_duration_minutes: float = 0.0
    # divergence: halt (exit code 3) after this many consecutive skipped updates (non-finite loss or
    # gradient norm, or a loss spike); 0 = never halt
    max_skipped_steps: int = 3
    # loss-spike guard: skip the update of a step whose loss exceeds loss_spike_factor × the mean of the
    # last loss_spike_window applied steps' losses; 0 = off
    loss_spike_factor: float = 0.0
    loss_spike_window: int = 50
    # activation recomputation (Megatron-Core's own): none | selective (recompute_modules inside each
    # layer) | full (whole layers, keeping only their inputs; recompute_method and recompute_num_layers)
    recompute: str = "none"
    recompute_modules: list[str] = field(default_factory=lambda: ["core_attn"])  # selective: core_attn, mlp, layernorm
    recompute_method: str = "uniform"  # full: uniform (groups of recompute_num_layers) | block (the first N layers)
    recompute_num_layers: int = 1  # full: layers per group (uniform) or layers recomputed per model chunk (block)
    # before the model is built, the planner's memory estimate per GPU against the GPU's memory:
    # error | warn | skip. warn by default: the estimate is analytical (docs/planning.md), not yet
    # calibrated against measured peaks, so it may refuse a run that fits
    memory_check: str = "warn"
    gpu_memory_gib: float = 0.0  # the GPU memory the check assumes; 0 = the device's own (no check on CPU)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # the decay ends at lr × min_lr_ratio
    warmup_steps: int = 0
    decay_steps: int | None = None  # None = train.steps
    decay_style: str = "cosine"  # cosine | linear: from lr after the warmup to lr × min_lr_ratio at decay_steps
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0  # 1-D params (norm weights, gates) never decay, unless the scheme decays all (simplenorm)
    clip_grad: float = 0.0  # global L2 clip over all parameters, gates included; 0 = off
    # adam | muon: Muon on the 2-D hidden matrices, Adam (the keys above) on the rest (docs/muon.md)
    optimizer: str = "adam"
    # Muon group; defaults are OSP's Muon (Outlier-Safe Pre-Training), checked in optim.validate_optimizer
    muon_lr: float | None = None  # None = optim.lr (same warmup/cosine schedule, own peak)
    muon_weight_decay: float | None = None  # decoupled, θ ← θ − lr·wd·θ; None = optim.weight_decay
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_coefficients: str = "simple"  # Newton–Schulz coefficients; simple = (3.4445, −4.7750, 2.0315)
    muon_ns_steps: int = 5
    muon_scale: float = 0.2  # update = muon_scale·√max(m, n)·NS(momentum)
    muon_tp_mode: str = "duplicated"  # duplicated | distributed: whole-matrix NS, independent of TP
    muon_split_qkv: bool = True  # orthogonalise Q, K and V of the fused QKV weight separately
    muon_matmul_precision: str = "medium"  # NS matmuls: medium = bf16 (OSP) | high = TF32 | highest = fp32
    # on resume, take the LR schedule (optim.lr, warmup, decay, train.steps) from this config instead of
    # the checkpoint's (Megatron's --override-opt_param-scheduler)
    override_schedule: bool = False


@dataclass
class TokenizerConfig:
    kind: str = "auto"  # auto | sentencepiece | huggingface | gpt2 | tiktoken | null (megatron_gpas/tokenizer.py)
    path: str | None = None  # tokenizer file (gpt2: vocab.json/encoder.json or their directory)
    vocab_size: int | None = None  # only for kind=null
    eod_token: str | None = None  # end-of-document token, when the tokenizer's own cannot be found
    merges_path: str | None = None  # gpt2 only: merges.txt/vocab.bpe (default: next to the vocabulary)
    pattern: str | None = None  # tiktoken only: cl100k (default), o200k, gpt2 or a regex


@dataclass
class DataConfig:
    # Indexed-dataset path prefixes (PREFIX.bin/.idx). With several, `weights` blends them.
    paths: list[str] = field(default_factory=list)
    weights: list[float] | None = None
    split: str = "99,1,0"  # train,valid,test shares of the documents
    cache_dir: str | None = None  # GPTDataset index cache; default: <logging.dir>/data_cache
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    num_workers: int = 0  # DataLoader workers


@dataclass
class CheckpointConfig:
    save: str | None = None  # directory; None = no checkpoints
    load: str | None = None  # directory to resume from (latest complete checkpoint)
    # false: take only the weights (start at step 0 with a fresh optimizer), e.g. to
    # initialise from another run or to change the optimizer layout
    load_optimizer: bool = True
    save_interval: int = 0  # 0 = only at the end
    save_at_end: bool = True
    # Start from this checkpoint's weights (a checkpoint directory or a save root; fresh
    # optimizer, step 0), e.g. a pretraining run for fine-tuning. A checkpoint under `load`
    # wins: that is the run's own, resumed normally.
    pretrained: str | None = None
    # a checkpoint.load that holds no checkpoint is an error, unless this is true (the first start of
    # a job that resumes itself, e.g. slurm/pretrain.sbatch)
    load_if_exists: bool = False
    verify: bool = True  # check every file of a checkpoint against the checksums written at save time
    # a damaged newest checkpoint: false = stop with an error naming it and the newest intact one;
    # true = resume from the newest intact one (with a warning)
    fallback: bool = False
    # allow saving into a checkpoint.save whose newest checkpoint is ahead of this run's step
    # (it would overwrite or outdate that run's checkpoints)
    overwrite: bool = False


# How sft.chat_template renders one chat turn per role; {content} marks the message text.
CHAT_ROLES = ("system", "user", "assistant")
DEFAULT_CHAT_TEMPLATE = {role: f"{role}: {{content}}\n" for role in CHAT_ROLES}


@dataclass
class SFTConfig:
    """Instruction data for ``python -m megatron_gpas.finetune`` (docs/finetune.md)."""

    train_files: list[str] = field(default_factory=list)  # JSONL files of examples
    valid_files: list[str] = field(default_factory=list)  # separate validation JSONL files, or ...
    valid_fraction: float = 0.0  # ... hold out this share of the training examples (0 = none)
    format: str = "auto"  # auto (decided per record) | prompt_response | chat
    prompt_key: str = "prompt"
    response_key: str = "response"
    messages_key: str = "messages"  # chat: [{"role": "system"|"user"|"assistant", "content": str}, ...]
    chat_template: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_CHAT_TEMPLATE))  # per role
    packing: bool = True  # true: several whole examples per sequence; false: one per sequence, padded
    overlong: str = "truncate"  # examples longer than a sequence: truncate | skip
    strict: bool = False  # stop at the first malformed record (file:line) instead of skipping it
    shuffle: bool = True  # shuffle the training examples and, every epoch, the order of the sequences

    def __post_init__(self):
        # a partial chat_template (e.g. one override) keeps the default turns of the other roles
        self.chat_template = {**DEFAULT_CHAT_TEMPLATE, **self.chat_template}


WANDB_MODES = ("offline", "online")


@dataclass
class WandbConfig:
    """Weights & Biases logging beside TensorBoard (megatron_gpas/wandb_logging.py)."""
    enabled: bool = False
    project: str = "megatron_gpas"
    entity: str | None = None  # None: the account's default entity
    name: str | None = None  # None: the name of logging.dir
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    # offline by default: nothing leaves the machine until `wandb sync`
    mode: str = "offline"


@dataclass
class LoggingConfig:
    dir: str = "runs/default"  # TensorBoard events, metrics.jsonl, PNGs
    interval: int = 10
    tensorboard: bool = True
    plots: bool = True
    verbose: bool = False  # also show Megatron-Core's and PyTorch's warnings and INFO messages
    # per-layer gradient, weight, update, branch and scale statistics on logged steps (layer_telemetry.py);
    # costs a host copy of the layer weights on those steps
    layer_telemetry: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    norm: NormConfig = field(default_factory=NormConfig)
    gpas: GPASConfig = field(default_factory=GPASConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- presets

_PAPER = dict(vocab_size=32000, rope_base=10000.0, max_seq_length=1024)

# Shapes of the GPAS paper (targets.md) plus Llama-3-8B and a CPU-sized model.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=172,
                 vocab_size=32000, max_seq_length=512),
    "71m": dict(num_layers=12, hidden_size=512, num_attention_heads=8, ffn_hidden_size=1368, **_PAPER),
    "130m": dict(num_layers=12, hidden_size=768, num_attention_heads=12, ffn_hidden_size=2048, **_PAPER),
    "250m": dict(num_layers=24, hidden_size=768, num_attention_heads=16, kv_channels=48,
                 ffn_hidden_size=2560, **_PAPER),
    "350m": dict(num_layers=24, hidden_size=1024, num_attention_heads=16, ffn_hidden_size=2736, **_PAPER),
    "1b": dict(num_layers=24, hidden_size=2048, num_attention_heads=32, ffn_hidden_size=5461, **_PAPER),
    "7b": dict(num_layers=32, hidden_size=4096, num_attention_heads=32, ffn_hidden_size=11008,
               vocab_size=32000, rope_base=10000.0, max_seq_length=4096),
    "llama3-8b": dict(num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
                      ffn_hidden_size=14336, vocab_size=128256, rope_base=500000.0, max_seq_length=8192),
    # BHyT's from-scratch setup (untied head here; Llama 3.2 ties it)
    "llama3.2-1b": dict(num_layers=16, hidden_size=2048, num_attention_heads=32, num_query_groups=8,
                        ffn_hidden_size=8192, vocab_size=128256, rope_base=500000.0, max_seq_length=8192),
}


# --------------------------------------------------------------------------- loading


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unknown_key_error(key: str, section_cls, path: str) -> ConfigError:
    valid = [f.name for f in fields(section_cls)]
    hint = difflib.get_close_matches(key, valid, n=1)
    did_you_mean = f" Did you mean '{hint[0]}'?" if hint else ""
    where = f"{path}.{key}" if path else key
    return ConfigError(f"unknown config key '{where}'.{did_you_mean} Valid keys here: {', '.join(valid)}")


def _coerce(value, tp, where: str):
    """Check/convert a YAML value against a (simple) type annotation."""
    origin = getattr(tp, "__origin__", None)
    args = getattr(tp, "__args__", ())
    if value is None:
        if type(None) in args or tp is Any:
            return None
        raise ConfigError(f"config key '{where}' must not be null")
    if args and type(None) in args:  # Optional[X] / X | None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is list:
        if not isinstance(value, list):
            value = [value]
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{where}' must be a mapping, got {value!r}")
        return {k: _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{where}' must be true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"config key '{where}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{where}' must be a number, got {value!r}")
        # no key means infinity or NaN (optim.lr=.inf writes NaN weights); 0 is "off" where there is one
        if not math.isfinite(value):
            raise ConfigError(f"config key '{where}' must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{where}' must be a string, got {value!r}")
        return value
    return value


def _build(cls, data: dict, path: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{path or '<root>'}' must be a mapping, got {data!r}")
    hints = get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise _unknown_key_error(key, cls, path)
        where = f"{path}.{key}" if path else key
        tp = hints[key]
        kwargs[key] = _build(tp, value or {}, where) if _is_dataclass_type(tp) else _coerce(value, tp, where)
    return cls(**kwargs)


def parse_section(cls, data: dict, path: str):
    """A typed section (dataclass ``cls``) from a raw mapping, with the key and type checks of
    the config files (unknown keys get a "did you mean"); ``path`` names it in messages."""
    return _build(cls, data or {}, path)


def _set_dotted(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load YAML (optional), apply dotted overrides, expand the preset, validate the shape."""
    return config_from_tree(load_tree(path, overrides))


def load_tree(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> dict:
    """The raw config tree: the YAML file (optional) with the dotted overrides applied."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        with open(path) as f:
            tree = yaml.safe_load(f) or {}
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return tree


def config_from_tree(tree: dict) -> Config:
    """Typed config of a raw tree, with the preset expanded (keys the tree gives win)."""
    cfg = _build(Config, tree)
    apply_preset(cfg, explicit=set((tree.get("model") or {}).keys()))
    return cfg


# Keys a run started from a checkpoint (fine-tuning, evaluation) does not take from the
# checkpoint's run_config.yaml: the preset (its values are saved expanded), the gate's
# training options (the new run's choice), fixed gate values (the gates are in the weights) and the
# fused kernels (how this run computes the same network).
NOT_INHERITED = {"model": ("preset",), "norm": ("fused",), "gpas": ("freeze", "clip_grad", "fixed_values", "fused")}


def inherit_architecture(tree: dict, saved: dict, checkpoint: str | None = None, log=None) -> dict:
    """``tree`` with the network (model, norm, gpas) and data.tokenizer filled in from a
    checkpoint's saved config (run_config.yaml) wherever the tree does not give them.

    Keys the tree gives win, including the shape keys of a preset it names; a value that
    then conflicts with the checkpoint is refused by ``checkpoint.check_compatible``.
    An inherited tokenizer whose files are gone (the checkpoint was moved, or is read on another
    machine) is replaced by the copy inside ``checkpoint`` (its directory), saying so to ``log``.
    """
    tree = copy.deepcopy(tree)
    sections = {"model": ModelConfig, "norm": NormConfig, "gpas": GPASConfig}
    for name, section_cls in sections.items():
        given = tree.get(name) or {}
        if not isinstance(given, dict):
            raise ConfigError(f"config section '{name}' must be a mapping, got {given!r}")
        explicit = set(given)
        if name == "model" and given.get("preset") in PRESETS:
            explicit |= set(PRESETS[given["preset"]])
        known = {f.name for f in fields(section_cls)}
        for key, value in (saved.get(name) or {}).items():
            if key in known and key not in explicit and key not in NOT_INHERITED.get(name, ()):
                given[key] = value
        tree[name] = given
    data = tree.get("data") or {}
    if not data.get("tokenizer"):  # the tokenizer is taken whole or not at all
        known = {f.name for f in fields(TokenizerConfig)}
        saved_tokenizer = (saved.get("data") or {}).get("tokenizer") or {}
        data["tokenizer"] = {k: v for k, v in saved_tokenizer.items() if k in known}
        if checkpoint is not None:
            from megatron_gpas.hf.tokenizer_export import recorded_or_copy

            data["tokenizer"], note = recorded_or_copy(data["tokenizer"], checkpoint)
            if note and log:
                log(note)
    tree["data"] = data
    return tree


def apply_preset(cfg: Config, explicit: set[str] = frozenset()) -> None:
    name = cfg.model.preset
    if name is None:
        return
    if name not in PRESETS:
        raise ConfigError(f"unknown model.preset '{name}'. Known presets: {', '.join(PRESETS)}")
    for key, value in PRESETS[name].items():
        if key not in explicit:
            setattr(cfg.model, key, value)


def config_yaml(cfg: Config) -> str:
    """The whole config as YAML (every key, the preset expanded), loadable as a config file."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        f.write(config_yaml(cfg))


# --------------------------------------------------------------------------- derived values


def world_size_from_env() -> int:
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var):
            return int(os.environ[var])
    return 1


def rank_from_env() -> int:
    """This process's rank in the job, known before any process group starts (torchrun or SLURM)."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def data_parallel_size(cfg: Config, world_size: int) -> int:
    return world_size // (cfg.parallel.tensor * cfg.parallel.pipeline)


def head_dim(m: ModelConfig) -> int:
    return m.kv_channels if m.kv_channels is not None else m.hidden_size // m.num_attention_heads


def padded_vocab_size(m: ModelConfig, tensor_parallel: int) -> int:
    multiple = m.make_vocab_size_divisible_by * tensor_parallel
    return int(math.ceil(m.vocab_size / multiple) * multiple)


# --------------------------------------------------------------------------- validation


def _at_least(bound):
    return lambda v: v >= bound


def _positive(v) -> bool:
    return v > 0


# Ranges of single keys: (dotted key, test, what the key must be). Keys whose 0 means "off" say so.
KEY_RANGES: list[tuple[str, Any, str]] = [
    ("model.make_vocab_size_divisible_by", _at_least(1), ">= 1"),
    ("model.max_seq_length", _positive, "positive"),
    ("model.rope_base", _positive, "positive"),
    ("model.init_std", _at_least(0), ">= 0"),
    ("model.embedding_init_std", _at_least(0), ">= 0"),
    ("norm.eps", _at_least(0), ">= 0"),
    ("train.steps", _positive, "positive"),
    ("train.micro_batch_size", _positive, "positive"),
    ("train.global_batch_size", _positive, "positive"),
    ("train.seed", _at_least(0), ">= 0"),
    ("train.eval_interval", _at_least(0), ">= 0 (0 = evaluate only at the end)"),
    ("train.eval_iters", _at_least(0), ">= 0 (0 = no evaluation)"),
    ("train.exit_after_steps", _at_least(0), ">= 0 (0 = off)"),
    ("train.exit_duration_minutes", _at_least(0), ">= 0 (0 = off)"),
    ("train.max_skipped_steps", _at_least(0), ">= 0 (0 = never halt)"),
    # a factor <= 1 would skip every step whose loss is above the running mean
    ("train.loss_spike_factor", lambda v: v == 0 or v > 1, "0 (off) or > 1"),
    ("train.loss_spike_window", _at_least(1), ">= 1"),
    ("train.recompute_num_layers", _at_least(1), ">= 1"),
    ("train.gpu_memory_gib", _at_least(0), ">= 0 (0 = the device's own memory)"),
    ("optim.lr", _positive, "positive"),
    ("optim.min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("optim.adam_beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.adam_beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.adam_eps", _positive, "positive"),
    ("optim.weight_decay", _at_least(0), ">= 0"),
    ("optim.clip_grad", _at_least(0), ">= 0 (0 disables)"),
    ("gpas.clip_grad", _at_least(0), ">= 0 (0 disables)"),
    ("data.num_workers", _at_least(0), ">= 0"),
    ("checkpoint.save_interval", _at_least(0), ">= 0 (0 = only at the end)"),
    ("logging.interval", _at_least(1), ">= 1"),
]


def _dotted(cfg: Config, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def non_finite_keys(node, path: str = "") -> list[tuple[str, float]]:
    """(dotted key, value) of every float in a config (sections, lists, mappings) that is inf or NaN.
    Loading rejects them already; this catches configs built or changed in code."""
    if dataclasses.is_dataclass(node):
        return [bad for f in fields(node)
                for bad in non_finite_keys(getattr(node, f.name), f"{path}.{f.name}" if path else f.name)]
    if isinstance(node, dict):
        return [bad for key, value in node.items() for bad in non_finite_keys(value, f"{path}.{key}")]
    if isinstance(node, list):
        return [bad for i, value in enumerate(node) for bad in non_finite_keys(value, f"{path}[{i}]")]
    return [(path, node)] if isinstance(node, float) and not math.isfinite(node) else []


def nearest_multiples(value: int, k: int) -> list[int]:
    """The positive multiples of ``k`` just below and just above ``value``."""
    below = value // k * k
    return [m for m in (below, below + k) if m > 0]


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _ffn_suggestion(ffn: int, tp: int) -> str:
    """Nearby FFN widths that split over ``tp`` ranks: the nearest ones, and GEMM-friendly ones
    (multiples of 64 per rank; Llama rounds its widths to multiples of 256)."""
    step = math.lcm(64 * tp, 256)
    nearest = " or ".join(map(str, nearest_multiples(ffn, tp)))
    friendly = " or ".join(map(str, nearest_multiples(ffn, step)))
    return (f"the nearest widths that split over {tp} ranks are {nearest}; GEMM-friendly ones (multiples of "
            f"{step}: 64-aligned per rank, 256-aligned as Llama's) are {friendly}")


def validate_settings(cfg: Config, world_size: int | None = None, check_files: bool = True,
                      require_data: bool = True) -> None:
    """The checks that need no model code: shapes, parallel layout, batch, optimizer numbers,
    precision, data and tokenizer files. ``megatron_gpas.validation.validate`` runs these plus the
    scheme's and GPAS's checks; call that one. ``require_data=False``: the run reads no training
    data (e.g. a checkpoint import)."""
    m, p, t, o = cfg.model, cfg.parallel, cfg.train, cfg.optim
    world_size = world_size_from_env() if world_size is None else world_size

    def need(cond: bool, msg: str):
        if not cond:
            raise ConfigError(msg)

    need(m.backend in ("local", "te"), f"model.backend must be 'local' or 'te', got '{m.backend}'")
    need(m.attention in ("sdpa", "megatron"),
         f"model.attention must be 'sdpa' (PyTorch's fused attention) or 'megatron' (Megatron-Core's "
         f"DotProductAttention), got '{m.attention}'")
    need(cfg.gpas.fused in GPAS_FUSED_MODES,
         f"gpas.fused must be one of {', '.join(GPAS_FUSED_MODES)}, got '{cfg.gpas.fused}'")
    need(t.precision in ("auto", "bf16", "fp32"),
         f"train.precision must be auto, bf16 or fp32, got '{t.precision}'")
    _validate_wandb(cfg.logging.wandb)

    for key, value in non_finite_keys(cfg):
        raise ConfigError(f"config key '{key}' must be a finite number, got {value}")
    for key, ok, rule in KEY_RANGES:
        value = _dotted(cfg, key)
        need(ok(value), f"{key} must be {rule}, got {value}")

    # shape
    for key in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size"):
        need(getattr(m, key) > 0, f"model.{key} must be positive, got {getattr(m, key)}")
    for key in ("num_query_groups", "kv_channels"):
        value = getattr(m, key)
        need(value is None or value > 0, f"model.{key} must be positive (or null), got {value}")
    if m.kv_channels is None:
        need(m.hidden_size % m.num_attention_heads == 0,
             f"model.hidden_size ({m.hidden_size}) is not divisible by model.num_attention_heads "
             f"({m.num_attention_heads}); set model.kv_channels explicitly")
    groups = m.num_query_groups or m.num_attention_heads
    need(m.num_attention_heads % groups == 0,
         f"model.num_attention_heads ({m.num_attention_heads}) must be divisible by "
         f"model.num_query_groups ({groups}); divisors of {m.num_attention_heads}: "
         f"{', '.join(map(str, divisors(m.num_attention_heads)))}")

    # parallel layout
    for key in ("tensor", "pipeline", "virtual_pipeline"):
        need(getattr(p, key) >= 1, f"parallel.{key} must be >= 1, got {getattr(p, key)}")
    need(m.num_attention_heads % p.tensor == 0,
         f"model.num_attention_heads ({m.num_attention_heads}) is not divisible by parallel.tensor ({p.tensor}); "
         f"parallel.tensor can be {', '.join(map(str, divisors(m.num_attention_heads)))}")
    need(groups % p.tensor == 0,
         f"KV groups (model.num_query_groups = {groups}) are not divisible by parallel.tensor ({p.tensor}); "
         f"each tensor-parallel rank needs whole KV groups: parallel.tensor can be "
         f"{', '.join(map(str, divisors(groups)))}")
    need(m.ffn_hidden_size % p.tensor == 0,
         f"model.ffn_hidden_size ({m.ffn_hidden_size}) is not divisible by parallel.tensor ({p.tensor}): "
         + _ffn_suggestion(m.ffn_hidden_size, p.tensor))
    chunks = p.pipeline * p.virtual_pipeline
    need(m.num_layers % chunks == 0,
         f"model.num_layers ({m.num_layers}) is not divisible by parallel.pipeline × parallel.virtual_pipeline "
         f"({p.pipeline} × {p.virtual_pipeline} = {chunks}); the product can be "
         f"{', '.join(map(str, divisors(m.num_layers)))}")
    need(p.virtual_pipeline == 1 or p.pipeline > 1,
         "parallel.virtual_pipeline > 1 needs parallel.pipeline > 1")
    need(not p.sequence_parallel or p.tensor > 1, "parallel.sequence_parallel needs parallel.tensor > 1")
    need(world_size % (p.tensor * p.pipeline) == 0,
         f"world size {world_size} is not divisible by parallel.tensor × parallel.pipeline "
         f"({p.tensor} × {p.pipeline}); run "
         f"{' or '.join(map(str, nearest_multiples(world_size, p.tensor * p.pipeline)))} processes, or change the layout")
    dp = data_parallel_size(cfg, world_size)

    # batch and sequence
    need(t.global_batch_size % (t.micro_batch_size * dp) == 0,
         f"train.global_batch_size ({t.global_batch_size}) is not divisible by train.micro_batch_size × "
         f"data-parallel size ({t.micro_batch_size} × {dp}), e.g. train.global_batch_size="
         f"{' or '.join(map(str, nearest_multiples(t.global_batch_size, t.micro_batch_size * dp)))}")
    need(0 < t.seq_length <= m.max_seq_length,
         f"train.seq_length ({t.seq_length}) exceeds the model's limit model.max_seq_length "
         f"({m.max_seq_length}{', preset ' + m.preset if m.preset else ''})")
    if p.sequence_parallel:
        need(t.seq_length % p.tensor == 0,
             f"train.seq_length ({t.seq_length}) must be divisible by parallel.tensor ({p.tensor}) "
             f"with sequence parallelism, e.g. {' or '.join(map(str, nearest_multiples(t.seq_length, p.tensor)))}")
    if p.virtual_pipeline > 1:
        micro = t.global_batch_size // (t.micro_batch_size * dp)
        need(micro % p.pipeline == 0,
             f"interleaved pipelining needs the number of microbatches ({micro}) to be a multiple of "
             f"parallel.pipeline ({p.pipeline})")
    need(not p.overlap_param_gather or (p.distributed_optimizer and p.overlap_grad_reduce),
         "parallel.overlap_param_gather needs parallel.distributed_optimizer=true and "
         "parallel.overlap_grad_reduce=true (it overlaps the distributed optimizer's parameter all-gather, "
         "as Megatron-LM allows it only with both)")
    _validate_recompute(cfg)
    need(t.memory_check in MEMORY_CHECKS,
         f"train.memory_check must be {', '.join(MEMORY_CHECKS)}, got '{t.memory_check}'")

    # optimizer (the single-key ranges are in KEY_RANGES)
    need(o.decay_steps is None or o.decay_steps > 0,
         f"optim.decay_steps must be positive (or null = train.steps), got {o.decay_steps}")
    need(0 <= o.warmup_steps < (o.decay_steps or t.steps),
         f"optim.warmup_steps ({o.warmup_steps}) must be >= 0 and below the decay steps "
         f"({o.decay_steps or t.steps}: optim.decay_steps, else train.steps)")

    # runtime availability
    if t.fp8 is not None:
        need(t.fp8 in ("e4m3", "hybrid"), f"train.fp8 must be e4m3 or hybrid, got '{t.fp8}'")
        need(m.backend == "te", "train.fp8 needs model.backend=te (FP8 GEMMs come from Transformer Engine)")
        need(t.fp8_recipe in ("delayed", "tensorwise", "mxfp8", "blockwise"),
             f"unknown train.fp8_recipe '{t.fp8_recipe}'")
        need(t.precision != "fp32", "train.fp8 runs on top of BF16; set train.precision to auto or bf16")
    if t.precision == "bf16":
        import torch

        need(torch.cuda.is_available(), "train.precision=bf16 needs a CUDA GPU; use fp32 or auto on CPU")

    # data
    d = cfg.data
    if cfg.sft.train_files or cfg.sft.valid_files:
        need(not d.paths, "data.paths (pretraining data) and sft.train_files (fine-tuning data) are both set; "
                          "a run reads one of them")
        _validate_sft(cfg, check_files)
    else:
        need(len(d.paths) > 0 or not require_data, "data.paths is empty: give at least one indexed-dataset prefix (PREFIX.bin/.idx)")
    if d.weights is not None:
        need(len(d.weights) == len(d.paths),
             f"data.weights has {len(d.weights)} entries but data.paths has {len(d.paths)}")
        need(all(w > 0 for w in d.weights), "data.weights must all be positive")
    try:
        split = [float(x) for x in d.split.split(",")]
        need(len(split) == 3 and all(x >= 0 for x in split) and split[0] > 0, "")
    except (ValueError, ConfigError):
        raise ConfigError(f"data.split must be three non-negative numbers like '98,1,1', got '{d.split}'")
    need(d.tokenizer.kind in TOKENIZER_KINDS,
         f"unknown data.tokenizer.kind {d.tokenizer.kind!r}; valid kinds: {', '.join(TOKENIZER_KINDS)}")
    if check_files:
        for prefix in d.paths:
            for suffix in (".bin", ".idx"):
                need(os.path.isfile(prefix + suffix),
                     f"data file not found: {prefix + suffix} (data.paths entry '{prefix}')")
        if d.tokenizer.kind != "null":
            # gpt2 and auto also take a directory holding the tokenizer files
            need(d.tokenizer.path is not None and os.path.exists(d.tokenizer.path),
                 f"tokenizer file not found: data.tokenizer.path = {d.tokenizer.path!r}")
        if d.tokenizer.merges_path is not None:
            need(os.path.isfile(d.tokenizer.merges_path),
                 f"tokenizer merges file not found: data.tokenizer.merges_path = {d.tokenizer.merges_path!r}")


RECOMPUTE_LEVELS = ("none", "selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")
# Megatron-Core's selective modules that exist in our dense layer (the others are MoE/MLA/GDN parts)
RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm")
# "skip" rather than "off", which YAML reads as false
MEMORY_CHECKS = ("error", "warn", "skip")
RECOMPUTE_DEFAULTS = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                      for f in fields(TrainConfig) if f.name.startswith("recompute_")}
RECOMPUTE_KEYS = {"selective": ("recompute_modules",), "full": ("recompute_method", "recompute_num_layers")}


def recompute_overrides(cfg: Config, level: str) -> list[str]:
    """The overrides that switch ``cfg`` to recompute ``level``: train.recompute, and the keys of its
    own level that ``level`` does not take back at their defaults (validation refuses them)."""
    t = cfg.train
    if level == t.recompute:
        return []
    out = [f"train.recompute={level}"]
    for key, default in RECOMPUTE_DEFAULTS.items():
        if getattr(t, key) != default and key not in RECOMPUTE_KEYS.get(level, ()):
            out.append(f"train.{key}=" + (f"[{','.join(default)}]" if isinstance(default, list) else str(default)))
    return out


def _validate_recompute(cfg: Config) -> None:
    """train.recompute and its keys, by Megatron-Core's rules (TransformerConfig would refuse the
    same things only once the process groups run) plus ours: a key of another level is an error
    rather than ignored."""
    t, p = cfg.train, cfg.parallel
    if t.recompute not in RECOMPUTE_LEVELS:
        raise ConfigError(f"train.recompute must be {', '.join(RECOMPUTE_LEVELS)}, got '{t.recompute}'")
    for key, default in RECOMPUTE_DEFAULTS.items():
        if getattr(t, key) != default and key not in RECOMPUTE_KEYS.get(t.recompute, ()):
            level = next(level for level, keys in RECOMPUTE_KEYS.items() if key in keys)
            raise ConfigError(f"train.{key} applies to train.recompute={level}, but train.recompute is "
                              f"'{t.recompute}'")
    if t.recompute == "selective":
        unknown = [m for m in t.recompute_modules if m not in RECOMPUTE_MODULES]
        if unknown or not t.recompute_modules or len(set(t.recompute_modules)) != len(t.recompute_modules):
            raise ConfigError(f"train.recompute_modules must be distinct names out of {', '.join(RECOMPUTE_MODULES)} "
                              f"(Megatron-Core's modules of a dense layer), got {t.recompute_modules}")
        if "layernorm" in t.recompute_modules and t.fp8 is not None:
            raise ConfigError("train.recompute_modules=layernorm with train.fp8: Megatron-Core recomputes FP8 norms only "
                              "with Transformer Engine's non-delayed recipes; leave layernorm out")
    if t.recompute == "full":
        if t.recompute_method not in RECOMPUTE_METHODS:
            raise ConfigError(f"train.recompute_method must be {' or '.join(RECOMPUTE_METHODS)}, "
                              f"got '{t.recompute_method}'")
        # Megatron's TransformerBlock counts recompute layers per model chunk (pipeline stage, or
        # virtual stage with interleaving)
        per_chunk = cfg.model.num_layers // (p.pipeline * p.virtual_pipeline)
        n = t.recompute_num_layers
        if n > per_chunk:
            raise ConfigError(f"train.recompute_num_layers ({n}) exceeds the layers per model chunk ({per_chunk}: "
                              f"model.num_layers / (parallel.pipeline × parallel.virtual_pipeline))")
        if t.recompute_method == "uniform" and per_chunk % n:
            raise ConfigError(f"train.recompute_num_layers ({n}) must divide the layers per model chunk ({per_chunk}) "
                              f"with train.recompute_method=uniform (equal groups); it can be "
                              f"{', '.join(map(str, divisors(per_chunk)))}")


def check_vocab_padding(cfg: Config, saved: dict) -> None:
    """Refuse weights whose embedding and output layer have another number of rows than this
    run's: the vocabulary is padded to a multiple of make_vocab_size_divisible_by × TP, and
    dist-checkpointing would load the overlapping rows of a differently padded tensor silently."""
    known = {f.name for f in fields(ModelConfig)}
    saved_model = ModelConfig(**{k: v for k, v in (saved.get("model") or {}).items() if k in known})
    saved_tp = (saved.get("parallel") or {}).get("tensor", 1)
    rows, here, tp = padded_vocab_size(saved_model, saved_tp), padded_vocab_size(cfg.model, cfg.parallel.tensor), \
        cfg.parallel.tensor
    if rows != here:
        hint = f", e.g. model.make_vocab_size_divisible_by={rows // tp}" if rows % tp == 0 else ""
        raise ConfigError(
            f"the checkpoint's embedding has {rows} rows (model.vocab_size {saved_model.vocab_size} padded at "
            f"parallel.tensor={saved_tp}) but this run pads it to {here} (model.make_vocab_size_divisible_by "
            f"{cfg.model.make_vocab_size_divisible_by} × parallel.tensor {tp}); make them agree{hint}")


def _validate_wandb(w: WandbConfig) -> None:
    if w.mode not in WANDB_MODES:
        raise ConfigError(f"logging.wandb.mode must be one of {', '.join(WANDB_MODES)} (offline: written under "
                          f"logging.dir/wandb, uploaded later with `wandb sync`), got '{w.mode}'")
    if not w.enabled:
        return
    if not w.project.strip():
        raise ConfigError("logging.wandb.project must not be empty")
    for tag in w.tags:
        # W&B refuses empty tags and tags over 64 characters, but only when the run starts
        if not 1 <= len(tag) <= 64:
            raise ConfigError(f"logging.wandb.tags: each tag must have 1 to 64 characters, got {tag!r}")
    from megatron_gpas.wandb_logging import require_wandb

    require_wandb()


def _validate_sft(cfg: Config, check_files: bool) -> None:
    s = cfg.sft

    def need(cond: bool, msg: str):
        if not cond:
            raise ConfigError(msg)

    need(len(s.train_files) > 0, "sft.valid_files is set but sft.train_files is empty")
    need(s.format in ("auto", "prompt_response", "chat"),
         f"sft.format must be auto, prompt_response or chat, got '{s.format}'")
    need(s.overlong in ("truncate", "skip"), f"sft.overlong must be truncate or skip, got '{s.overlong}'")
    need(0 <= s.valid_fraction < 1, f"sft.valid_fraction must be in [0, 1), got {s.valid_fraction}")
    need(not (s.valid_files and s.valid_fraction > 0),
         "sft.valid_files and sft.valid_fraction are both set; validate on one of them")
    for key in ("prompt_key", "response_key", "messages_key"):
        need(bool(getattr(s, key)), f"sft.{key} must not be empty")
    for role, template in s.chat_template.items():
        need(role in CHAT_ROLES, f"sft.chat_template: unknown role '{role}'. Roles: {', '.join(CHAT_ROLES)}")
        need(template.count("{content}") == 1,
             f"sft.chat_template.{role} must contain '{{content}}' exactly once, got {template!r}")
    if check_files:
        for key in ("train_files", "valid_files"):
            for path in getattr(s, key):
                need(os.path.isfile(path), f"sft.{key} entry not found: {path}")
