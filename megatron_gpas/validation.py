"""Validation of a whole run configuration, before any process group starts.

It sits above the config (``config.validate_settings``: shapes, layout, batch, data) and the
model registries (schemes, GPAS activations), so neither has to import the other; each
check fails in seconds with a message that names the key.
"""

from __future__ import annotations

import os

from megatron_gpas.checkpoint_paths import pretrained_checkpoint
from megatron_gpas.config import Config, ConfigError, validate_settings
from megatron_gpas.model.gpas import ACTIVATIONS, fixed_gate_values
from megatron_gpas.model.schemes import GATE_POSITIONS, SCHEMES
from megatron_gpas.optim import validate_optimizer


def validate(cfg: Config, world_size: int | None = None, check_files: bool = True, require_data: bool = True) -> None:
    """Raise ConfigError with a specific message for the first problem found.
    ``require_data=False``: the run reads no training data (e.g. a checkpoint import)."""
    _validate_network(cfg)
    SCHEMES[cfg.norm.scheme].validate(cfg)
    validate_settings(cfg, world_size, check_files, require_data)
    validate_optimizer(cfg)
    if cfg.model.backend == "te":
        from megatron_gpas.model.spec import transformer_engine_available

        if not transformer_engine_available():
            raise ConfigError("model.backend=te needs Transformer Engine with a CUDA GPU; install the 'te' extra "
                              "(pip install -e '.[te]') on a GPU machine, or use model.backend=local")
    if cfg.checkpoint.pretrained is not None and check_files:
        pretrained_checkpoint(cfg.checkpoint.pretrained)


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
        except (ValueError, RuntimeError) as e:
            raise ConfigError(str(e)) from e
        need(values.shape[1] == 1 or g.per_sublayer,
             f"gpas.fixed_values {g.fixed_values} holds one value per sub-layer (2 per layer); "
             "set gpas.per_sublayer=true or give one value per layer")
