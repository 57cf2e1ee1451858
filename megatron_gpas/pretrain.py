"""Pretraining entry point.

    python -m megatron_gpas.pretrain --config examples/tiny_pre_gpas.yaml [section.key=value ...]
    torchrun --nproc-per-node 4 -m megatron_gpas.pretrain --config FILE parallel.tensor=2 ...
"""

from __future__ import annotations

import argparse
import logging
import sys

from megatron_gpas.checkpoint_paths import CheckpointError
from megatron_gpas.config import ConfigError, load_config


def run_cli(argv: list[str] | None, prog: str, description: str, overrides_example: str, make_trainer) -> int:
    """The command line shared by pretraining and fine-tuning: ``--config FILE`` plus dotted
    overrides; ``make_trainer(config_path, overrides)`` builds the Trainer. Bad input exits
    with status 2 before any training starts."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {overrides_example}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        trainer = make_trainer(args.config, args.overrides)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:  # (a damaged or unsafe checkpoint)
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        trainer.train()
    finally:
        trainer.close()
    return 0


def _pretrain_trainer(config_path, overrides):
    cfg = load_config(config_path, overrides)
    from megatron_gpas.training import Trainer  # heavy imports only after the config is valid

    return Trainer(cfg)


def main(argv: list[str] | None = None) -> int:
    return run_cli(argv, "python -m megatron_gpas.pretrain", __doc__, "train.steps=20 gpas.enabled=true",
                   _pretrain_trainer)


if __name__ == "__main__":
    sys.exit(main())
