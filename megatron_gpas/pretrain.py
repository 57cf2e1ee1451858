"""Pretraining entry point.

    python -m megatron_gpas.pretrain --config examples/demo_pre_gpas.yaml [section.key=value ...]
    torchrun --nproc-per-node 4 -m megatron_gpas.pretrain --config FILE parallel.tensor=2 ...

    --print-config   print the resolved config (preset expanded, overrides applied) as YAML; exit
    --dry-run        run every check of a start (config, layout, tokenizer, data), count the
                     model's parameters per pipeline stage without allocating them; start nothing,
                     write nothing (--world-size N: check the layout for N processes)

Exit codes (megatron_gpas/exit_codes.py): 0 done, 1 failed, 2 invalid input, 3 diverged,
75 stopped early with a checkpoint (signal or train.exit_duration_minutes): run it again.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from dataclasses import dataclass
from typing import Callable

from megatron_gpas import console, exit_codes, preemption
from megatron_gpas.checkpoint_paths import CheckpointError
from megatron_gpas.config import (Config, ConfigError, config_from_tree, config_yaml, data_parallel_size, load_config,
                                  load_tree, world_size_from_env)
from megatron_gpas.divergence import Diverged


@dataclass
class RunPlan:
    """What an entry point does with its resolved config."""

    cfg: Config
    # every check of a real start before any process group, for a layout of this many processes
    check: Callable[[int], None]
    make_trainer: Callable[[bool], object]  # the Trainer of a real start (it runs the checks itself); arg: --force


def run_cli(argv: list[str] | None, prog: str, description: str, overrides_example: str,
            plan: Callable[[str | None, list[str]], RunPlan]) -> int:
    """The command line shared by pretraining and fine-tuning: ``--config FILE`` plus dotted
    overrides; ``plan(config_path, overrides)`` resolves the config. Returns the exit code
    (exit_codes): bad input exits with 2 before any training starts."""
    early = preemption.catch_early()  # a stop signal during start-up is kept for the trainer
    try:
        return _run_cli(argv, prog, description, overrides_example, plan)
    finally:
        preemption.release_early(early)


def _run_cli(argv, prog, description, overrides_example, plan) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit (nothing is checked beyond keys and types)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check everything a start checks, count the parameters, exit; starts and writes nothing")
    parser.add_argument("--world-size", type=int,
                        help="--dry-run: the number of processes to check the layout for (default: WORLD_SIZE, "
                             "else parallel.tensor × parallel.pipeline)")
    parser.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {overrides_example}")
    parser.add_argument("--force", action="store_true",
                        help="start even if logging.dir holds the logs of another run (they are deleted)")
    args = parser.parse_intermixed_args(argv)
    if args.world_size is not None and (not args.dry_run or args.world_size < 1):
        parser.error("--world-size takes a positive number of processes, with --dry-run (a real start takes its "
                     "world size from the launcher)")
    try:
        # logging.verbose decides what the libraries may print, before any of them is imported
        console.configure(config_from_tree(load_tree(args.config, args.overrides)).logging.verbose)
        run = plan(args.config, args.overrides)
        if args.print_config:
            print(config_yaml(run.cfg), end="")
            return 0
        if args.dry_run:
            return dry_run(run, args.world_size)
        trainer = run.make_trainer(args.force)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:  # (a damaged or unsafe checkpoint)
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


def dry_run(run: RunPlan, world_size: int | None) -> int:
    """Check what a start checks, print the layout and the parameter counts."""
    from megatron_gpas.model.inventory import count_parameters, describe_parameters

    cfg, p = run.cfg, run.cfg.parallel
    # outside a launcher, the smallest job of the layout (DP = 1)
    world = world_size or (world_size_from_env() if world_size_from_env() > 1 else p.tensor * p.pipeline)
    run.check(world)
    processes = f"{world} process{'es' if world > 1 else ''}"
    print(f"[dry-run] the config is valid for {processes}: TP={p.tensor} × PP={p.pipeline} × "
          f"DP={data_parallel_size(cfg, world)} (VP={p.virtual_pipeline}, SP={p.sequence_parallel}, "
          f"distributed optimizer={p.distributed_optimizer})", flush=True)
    for line in describe_parameters(cfg, count_parameters(cfg)):
        print(f"[dry-run] {line}", flush=True)
    print("[dry-run] nothing was started or written", flush=True)
    return 0


def _pretrain_plan(config_path: str | None, overrides: list[str]) -> RunPlan:
    cfg = load_config(config_path, overrides)

    def check(world_size: int) -> None:
        from megatron_gpas.training import check_before_start  # heavy imports only once they are needed

        check_before_start(cfg, world_size=world_size)

    def make_trainer(force: bool):
        from megatron_gpas.training import Trainer

        return Trainer(cfg, force=force)

    return RunPlan(cfg, check, make_trainer)


def main(argv: list[str] | None = None) -> int:
    return run_cli(argv, "python -m megatron_gpas.pretrain", __doc__, "train.steps=20 gpas.enabled=true",
                   _pretrain_plan)


if __name__ == "__main__":
    sys.exit(main())
