"""Weights & Biases logging (``logging.wandb``), rank 0 only, through ``MetricsWriter``.

The same scalars as TensorBoard at the same steps, and the resolved config as the W&B run config.
``wandb`` is optional (``pip install megatron_gpas[wandb]``) and imported only when enabled. Files go
under ``logging.dir/wandb``; in ``offline`` mode (the default) nothing leaves the machine until
``wandb sync``. Every start of a run (a resume after preemption included) logs to the same W&B run
id, kept in ``logging.dir/wandb/run_id``.
"""

from __future__ import annotations

import os
import uuid

from megatron_gpas.config import Config, ConfigError
from megatron_gpas.run_folder import WANDB_DIR

RUN_ID_FILE = "run_id"


def require_wandb():
    """The ``wandb`` module, or a ConfigError saying how to install it (at validation, before any work)."""
    try:
        import wandb
    except ImportError as e:
        raise ConfigError(f"logging.wandb.enabled=true needs the wandb package, which cannot be imported ({e}): "
                          "pip install 'megatron_gpas[wandb]' (or pip install wandb), or set "
                          "logging.wandb.enabled=false") from e
    return wandb


def _run_id(folder: str, resumed: bool) -> str:
    """The run id of ``logging.dir``: the saved one when this start resumes the run, else a new one."""
    path = os.path.join(folder, RUN_ID_FILE)
    if resumed and os.path.isfile(path):
        with open(path) as f:
            return f.read().strip()
    run_id = uuid.uuid4().hex[:12]
    with open(path, "w") as f:
        f.write(run_id + "\n")
    return run_id


class WandbRun:
    """One W&B run for ``logging.dir``; ``resumed``: this start continues the run of that folder."""

    def __init__(self, cfg: Config, resumed: bool):
        wandb = require_wandb()
        w = cfg.logging.wandb
        folder = os.path.join(cfg.logging.dir, WANDB_DIR)
        os.makedirs(folder, exist_ok=True)
        # console off: train.log already holds the console, and a second stdout wrapper would
        # interleave with run_folder.ConsoleLog's; no system stats sampler process per run
        settings = wandb.Settings(console="off", x_disable_stats=True, silent=True, disable_git=True)
        self.run = wandb.init(
            project=w.project, entity=w.entity, name=w.name or os.path.basename(os.path.abspath(cfg.logging.dir)),
            group=w.group, tags=list(w.tags), mode=w.mode, dir=cfg.logging.dir, config=cfg.to_dict(),
            id=_run_id(folder, resumed), resume="allow", settings=settings)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()
