"""Pretraining entry point.

    python -m megatron_gpas.pretrain --config examples/tiny_pre_gpas.yaml [section.key=value ...]
    torchrun --nproc-per-node 4 -m megatron_gpas.pretrain --config FILE parallel.tensor=2 ...
"""

from __future__ import annotations

import argparse
import logging
import sys

from megatron_gpas.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_gpas.pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=20 gpas.enabled=true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        from megatron_gpas.training import Trainer  # heavy imports only after the config is valid

        trainer = Trainer(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        trainer.train()
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
