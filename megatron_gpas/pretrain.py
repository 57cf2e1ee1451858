"""Pretraining entry point.

    python -m megatron_gpas.pretrain --config examples/tiny_pre_gpas.yaml [section.key=value ...]
    torchrun --nproc-per-node 4 -m megatron_gpas.pretrain --config FILE parallel.tensor=2 ...

Exit codes (megatron_gpas/exit_codes.py): 0 done, 1 failed, 2 invalid input, 3 diverged,
75 stopped early with a checkpoint (signal or train.exit_duration_minutes): run it again.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from megatron_gpas import exit_codes
from megatron_gpas.config import ConfigError, load_config
from megatron_gpas.divergence import Diverged


def run_cli(argv: list[str] | None, prog: str, description: str, overrides_example: str, make_trainer) -> int:
    """The command line shared by pretraining and fine-tuning: ``--config FILE`` plus dotted
    overrides; ``make_trainer(config_path, overrides, force)`` builds the Trainer. Returns the
    exit code (exit_codes): bad input exits with 2 before any training starts."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {overrides_example}")
    parser.add_argument("--force", action="store_true",
                        help="start even if logging.dir holds the logs of another run (they are deleted)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        trainer = make_trainer(args.config, args.overrides, args.force)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_codes.INVALID
    failure = None
    try:
        code = trainer.train()["exit_code"]
    except Diverged as e:  # the trainer has written its summary and exit line
        print(f"error: diverged at {e}", file=sys.stderr)
        code = exit_codes.DIVERGED
    except Exception:
        failure = traceback.format_exc()
        code = exit_codes.FAILED
    finally:
        trainer.close()
    if failure is not None:
        print(f"{failure}[exit] failed at step {trainer.step}; exit code {code}", file=sys.stderr, flush=True)
    return code


def _pretrain_trainer(config_path, overrides, force):
    cfg = load_config(config_path, overrides)
    from megatron_gpas.training import Trainer  # heavy imports only after the config is valid

    return Trainer(cfg, force=force)


def main(argv: list[str] | None = None) -> int:
    return run_cli(argv, "python -m megatron_gpas.pretrain", __doc__, "train.steps=20 gpas.enabled=true",
                   _pretrain_trainer)


if __name__ == "__main__":
    sys.exit(main())
