"""Validation of a whole run configuration, before any process group starts.

It sits above the config (``config.validate_settings``: shapes, layout, batch, data) and the
model registries (schemes, GPAS activations), so neither has to import the other; each
check fails in seconds with a message that names the key.
"""

from __future__ import annotations

import os
import shutil

from megatron_gpas.checkpoint_integrity import format_size
from megatron_gpas.checkpoint_paths import (CheckpointError, checkpoint_step, existing_parent, find_latest,
                                            pretrained_checkpoint)
from megatron_gpas.config import Config, ConfigError, head_dim, padded_vocab_size, rank_from_env, validate_settings
from megatron_gpas.model.gpas import ACTIVATIONS, fixed_gate_values
from megatron_gpas.model.schemes import GATE_POSITIONS, SCHEMES, Scheme
from megatron_gpas.optim import validate_optimizer


def validate(cfg: Config, world_size: int | None = None, check_files: bool = True, require_data: bool = True) -> None:
    """Raise ConfigError with a specific message for the first problem found.
    ``require_data=False``: the run reads no training data (e.g. a checkpoint import)."""
    _validate_network(cfg)
    SCHEMES[cfg.norm.scheme].validate(cfg)
    _validate_with_network(cfg)
    validate_settings(cfg, world_size, check_files, require_data)
    validate_optimizer(cfg)
    if cfg.model.backend == "te":
        from megatron_gpas.model.spec import transformer_engine_available

        if not transformer_engine_available():
            raise ConfigError("model.backend=te needs Transformer Engine with a CUDA GPU; install the 'te' extra "
                              "(pip install -e '.[te]') on a GPU machine, or use model.backend=local")
    if check_files:
        if cfg.checkpoint.pretrained is not None:
            pretrained_checkpoint(cfg.checkpoint.pretrained)
        _validate_checkpoint_dirs(cfg)


def _validate_with_network(cfg: Config) -> None:
    """Run options whose validity depends on the scheme or GPAS placement."""
    t, g = cfg.train, cfg.gpas
    if t.recompute == "selective" and "layernorm" in t.recompute_modules and g.enabled \
            and g.position == "before_sublayer":
        raise ConfigError(
            "train.recompute_modules=layernorm with gpas.position=before_sublayer: the norm slot then returns "
            "(normed, gated residual), and Megatron-Core's norm recompute frees every output of the norm, the "
            "residual the add still needs included. Leave layernorm out or choose another gpas.position")
    scheme = SCHEMES[cfg.norm.scheme]
    if cfg.parallel.overlap_param_gather and type(scheme).before_step is not Scheme.before_step:
        raise ConfigError(
            f"parallel.overlap_param_gather with norm.scheme={cfg.norm.scheme}: the scheme reads the weights before "
            "a step (its before_step hook), when with the overlap only this rank's shard of them is up to date "
            "(the rest is gathered during the forward); set parallel.overlap_param_gather=false")


def _validate_checkpoint_dirs(cfg: Config) -> None:
    """checkpoint.load holds a checkpoint (or may not), checkpoint.save and logging.dir can be
    written, and saving would not outdate newer checkpoints of another run (or of this one)."""
    c = cfg.checkpoint
    start_step = 0  # the step this run starts from
    if c.load:
        try:
            found = find_latest(c.load) if os.path.isdir(c.load) else None
        except CheckpointError as e:
            raise ConfigError(f"checkpoint.load: {e}") from e
        if found is None and not (c.load_if_exists or c.pretrained):
            what = ("does not exist" if not os.path.exists(c.load) else
                    "is not a directory" if not os.path.isdir(c.load) else
                    "holds no complete checkpoint (iter_N/ with metadata.json)")
            raise ConfigError(f"checkpoint.load={c.load} {what}. To start from scratch when it holds no checkpoint "
                              "yet (the first start of a job that resumes itself), set checkpoint.load_if_exists=true")
        if found is not None and c.load_optimizer:
            start_step = checkpoint_step(found) or 0
    if c.save:
        _need_writable("checkpoint.save", c.save)
        try:
            newest = find_latest(c.save) if os.path.isdir(c.save) else None
        except CheckpointError:  # ``latest`` names an incomplete checkpoint and there is no other: nothing to lose
            newest = None
        newest_step = checkpoint_step(newest) if newest else None
        if newest_step is not None and newest_step > start_step and not c.overwrite:
            raise ConfigError(
                f"checkpoint.save={c.save} holds a checkpoint of step {newest_step} ({newest}), but this run starts "
                f"at step {start_step}: its saves would outdate that checkpoint and move latest back, so steps "
                f"{start_step + 1}..{newest_step} would be lost on resume. Resume it (checkpoint.load={c.save}), "
                "save elsewhere, or set checkpoint.overwrite=true")
        _warn_if_little_space(cfg)
    _need_writable("logging.dir", cfg.logging.dir)


def _need_writable(key: str, path: str) -> None:
    """ConfigError unless ``path`` is a directory this process can write, or can be created."""
    existing = existing_parent(path)
    if not os.path.isdir(existing):
        raise ConfigError(f"{key}={path} cannot be created: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={path} is not writable: no write permission on {existing}")


# Bytes a checkpoint stores per parameter: the weight, the optimizer's fp32 copy and two fp32
# Adam moments (a 37k-parameter fp32 checkpoint measured 15.6).
CHECKPOINT_BYTES_PER_PARAMETER = 16


def approximate_parameter_count(cfg: Config) -> int:
    """Parameters of the model, from its shape: embedding and output layer (untied), per layer
    the attention and SwiGLU matrices and two norms (scheme extras are a rounding error)."""
    m = cfg.model
    heads, groups, d = m.num_attention_heads, m.num_query_groups or m.num_attention_heads, head_dim(m)
    per_layer = m.hidden_size * (heads + 2 * groups) * d + heads * d * m.hidden_size \
        + 3 * m.hidden_size * m.ffn_hidden_size + 2 * m.hidden_size
    return 2 * padded_vocab_size(m, cfg.parallel.tensor) * m.hidden_size + m.num_layers * per_layer + m.hidden_size


def _warn_if_little_space(cfg: Config) -> None:
    existing = existing_parent(cfg.checkpoint.save)
    estimate = approximate_parameter_count(cfg) * CHECKPOINT_BYTES_PER_PARAMETER
    free = shutil.disk_usage(existing).free
    if free < estimate and rank_from_env() == 0:
        print(f"[warn] checkpoint.save={cfg.checkpoint.save}: {format_size(free)} free on {existing}, less than one "
              f"checkpoint of this model (about {format_size(estimate)}); saves will fail when the disk is full",
              flush=True)


def _validate_network(cfg: Config) -> None:
    """The scheme and GPAS names and options."""
    n, g, m = cfg.norm, cfg.gpas, cfg.model

    def need(cond: bool, msg: str):
        if not cond:
            raise ConfigError(msg)

    need(n.scheme in SCHEMES, f"unknown norm.scheme '{n.scheme}'. Known schemes: {', '.join(sorted(SCHEMES))}")
    need(g.activation in ACTIVATIONS,
         f"unknown gpas.activation '{g.activation}'. Known: {', '.join(sorted(ACTIVATIONS))}")
    need(g.position in GATE_POSITIONS, f"unknown gpas.position '{g.position}'. Known: {', '.join(GATE_POSITIONS)}")
    pre_norm_hosts = ", ".join(name for name, scheme in SCHEMES.items() if scheme.pre_norm_host)
    need(g.position == "after_sublayer" or SCHEMES[n.scheme].pre_norm_host,
         f"gpas.position={g.position} is defined for pre-norm hosts ({pre_norm_hosts}) only; "
         f"norm.scheme={n.scheme} places GPAS on the shortcut (gpas.position=after_sublayer)")
    if g.enabled and g.activation == "relu" and g.init <= 0 and not g.freeze and not g.allow_dead_gate:
        raise ConfigError(
            "gpas.activation=relu with gpas.init <= 0: ReLU'(0) = 0 in PyTorch, so the gates never move and "
            "the model stays the baseline (methods.md §1.2). Set gpas.init > 0, use leaky_relu, or set "
            "gpas.allow_dead_gate=true to run it on purpose")
    if g.fixed_values is not None:
        need(os.path.exists(g.fixed_values), f"gpas.fixed_values not found: {g.fixed_values}")
        try:
            values = fixed_gate_values(g.fixed_values, m.num_layers)
        except (ValueError, RuntimeError, OSError) as e:  # (CheckpointError is a RuntimeError)
            raise ConfigError(str(e)) from e
        need(values.shape[1] == 1 or g.per_sublayer,
             f"gpas.fixed_values {g.fixed_values} holds one value per sub-layer (2 per layer); "
             "set gpas.per_sublayer=true or give one value per layer")
