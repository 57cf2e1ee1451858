"""Supervised fine-tuning entry point (docs/finetune.md).

    python -m megatron_gpas.finetune --config examples/finetune_demo.yaml [section.key=value ...]
    torchrun --nproc-per-node 2 -m megatron_gpas.finetune --config FILE parallel.tensor=2 ...
    (--print-config and --dry-run as for megatron_gpas.pretrain)

The pretraining trainer with the same parallelism, logging and checkpoints. What differs:
  * data: the JSONL instruction files of ``sft.*`` (megatron_gpas/data/instruct.py), not data.paths;
    the loss covers response tokens only, and weighs every one of a global batch the same;
  * start: the weights of ``checkpoint.pretrained`` (fresh optimizer, step 0), unless
    ``checkpoint.load`` holds a checkpoint of this run, which is then resumed;
  * the network (model, norm, gpas except freeze/clip_grad) and data.tokenizer default to that
    checkpoint's run_config.yaml, so a config needs only data and optimizer settings; a value
    given explicitly that conflicts with the checkpoint is refused;
  * ``gpas.freeze`` defaults to true (the GPAS paper fine-tunes with frozen gates);
    ``gpas.freeze=false`` trains them.
"""

from __future__ import annotations

import os
import sys

import yaml

from megatron_gpas.checkpoint_paths import pretrained_checkpoint
from megatron_gpas.config import (Config, ConfigError, check_vocab_padding, config_from_tree, inherit_architecture,
                                  load_tree)

# (megatron_gpas.validation and the training modules import Megatron-Core: they are imported where
# needed, after the command line has decided what the libraries may print, megatron_gpas.console)


def is_logging_process() -> bool:
    """Rank 0 of the job, known before any process group starts (torchrun or SLURM)."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0


def architecture_source(cfg: Config) -> str | None:
    """The checkpoint whose run_config.yaml gives the network: this run's own latest
    checkpoint under checkpoint.load when there is one (a resume), else checkpoint.pretrained."""
    from megatron_gpas.checkpoint_paths import CheckpointError, find_latest

    if cfg.checkpoint.load:
        try:
            path = find_latest(cfg.checkpoint.load)
        except CheckpointError as e:
            raise ConfigError(f"checkpoint.load: {e}") from e
        if path is not None:
            return path
    if cfg.checkpoint.pretrained:
        return pretrained_checkpoint(cfg.checkpoint.pretrained)
    return None


def load_finetune_config(path: str | None, overrides: list[str] | None = None) -> tuple[Config, str | None]:
    """(config, architecture checkpoint): the file and overrides, with what they leave out of
    the network taken from the checkpoint, gates frozen unless said otherwise; validated."""
    cfg, source, saved = resolve_finetune_config(path, overrides)
    check_finetune_config(cfg, source, saved)
    return cfg, source


def resolve_finetune_config(path: str | None, overrides: list[str] | None = None) \
        -> tuple[Config, str | None, dict | None]:
    """(config, architecture checkpoint, its saved run config): the file and overrides, with what
    they leave out of the network taken from the checkpoint, gates frozen unless said otherwise;
    not validated yet (``check_finetune_config``)."""
    from megatron_gpas.checkpoint_paths import RUN_CONFIG

    tree = load_tree(path, overrides)
    source = architecture_source(config_from_tree(tree))  # (typed) checkpoint keys first
    saved = None
    if source is not None:
        run_config = os.path.join(source, RUN_CONFIG)
        if not os.path.isfile(run_config):
            raise ConfigError(f"{source} has no {RUN_CONFIG}: cannot tell the network it holds")
        with open(run_config) as f:
            saved = yaml.safe_load(f) or {}
        log = (lambda note: print(f"[finetune] {note}", flush=True)) if is_logging_process() else None
        tree = inherit_architecture(tree, saved, checkpoint=source, log=log)
    gpas = dict(tree.get("gpas") or {})
    gpas.setdefault("freeze", True)  # the fine-tuning default; gpas.freeze=false unfreezes
    tree["gpas"] = gpas
    return config_from_tree(tree), source, saved


def check_finetune_config(cfg: Config, source: str | None, saved: dict | None, world_size: int | None = None) -> None:
    """The fine-tuning data keys, the config (``validate``) and its agreement with the checkpoint."""
    from megatron_gpas.checkpoint import CheckpointError, check_compatible
    from megatron_gpas.validation import validate

    if cfg.data.paths:
        raise ConfigError("data.paths is pretraining data; fine-tuning reads the JSONL files of sft.train_files")
    if not cfg.sft.train_files:
        raise ConfigError("sft.train_files is empty: give the JSONL file(s) of instruction examples")
    validate(cfg, world_size)
    if source is not None:
        try:
            check_compatible(cfg, source)
        except CheckpointError as e:
            raise ConfigError(str(e)) from e
        check_vocab_padding(cfg, saved)


def build_trainer(cfg: Config, source: str | None = None, log=None, force: bool = False):
    """Read the instruction data (errors before any process group), then the Trainer on it."""
    from megatron_gpas.data.instruct import build_instruct_datasets
    from megatron_gpas.training import Trainer, load_run_tokenizer  # heavy imports only after the config is valid

    if log:
        where = f"network of {source}" if source else "no checkpoint: random initial weights"
        log(f"[finetune] {where}; gpas.freeze={cfg.gpas.freeze}")
    data = build_instruct_datasets(cfg, load_run_tokenizer(cfg), log=log)
    return Trainer(cfg, data_builder=lambda _: (data.train, data.valid), per_token_loss=True, force=force)


def _finetune_plan(config_path, overrides):
    from megatron_gpas.pretrain import RunPlan

    cfg, source, saved = resolve_finetune_config(config_path, overrides)
    log = print if is_logging_process() else None

    def check(world_size: int) -> None:  # --dry-run: the checks, and the instruction data read as a start does
        from megatron_gpas.data.instruct import build_instruct_datasets
        from megatron_gpas.training import load_run_tokenizer

        check_finetune_config(cfg, source, saved, world_size)
        build_instruct_datasets(cfg, load_run_tokenizer(cfg), log=log)

    def make_trainer(force: bool):
        check_finetune_config(cfg, source, saved)
        return build_trainer(cfg, source, log=log, force=force)

    return RunPlan(cfg, check, make_trainer)


def main(argv: list[str] | None = None) -> int:
    from megatron_gpas.pretrain import run_cli

    return run_cli(argv, "python -m megatron_gpas.finetune", __doc__, "sft.packing=false optim.lr=1e-5",
                   _finetune_plan)


if __name__ == "__main__":
    sys.exit(main())
