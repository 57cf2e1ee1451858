"""A run folder (``logging.dir``) belongs to one run.

A second run started into it would append to ``metrics.jsonl``, add a second TensorBoard event
file and splice both into one ``loss.png``. So a folder holding another run's logs is refused
unless this start resumes that run (``run.json`` names its checkpoint root, and
``checkpoint.load`` points there) or the user passes ``--force`` (the old logs are deleted).
On a resume, what was logged after the checkpoint (the steps a crash or preemption lost) is
dropped from ``metrics.jsonl`` and, through TensorBoard's purge step, from the event files,
so every step appears once.

Files of a run: ``run.json`` (who owns the folder), ``config.yaml`` (the resolved config),
``train.log`` (rank 0's console), ``metrics.jsonl``, TensorBoard events, ``*.png``,
``summary.json`` (end of run), ``wandb/`` (with ``logging.wandb``).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys

from megatron_gpas.config import Config, ConfigError

OWNER = "run.json"
CONFIG = "config.yaml"
LOG = "train.log"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
WANDB_DIR = "wandb"  # logging.wandb's files
_RUN_FILES = (OWNER, CONFIG, LOG, METRICS, SUMMARY, "optimizer_routing.json", "events.out.tfevents.*", "*.png")


def _real(path: str | None) -> str | None:
    return os.path.realpath(path) if path else None


def run_files(log_dir: str) -> list[str]:
    """The files of a run in ``log_dir`` (not the data cache, which runs may share)."""
    return sorted(path for pattern in _RUN_FILES for path in glob.glob(os.path.join(glob.escape(log_dir), pattern)))


def continues_run(cfg: Config) -> bool:
    """Whether this start continues the run that owns ``logging.dir``: it resumes (optimizer
    included) from the checkpoint root that run saves to."""
    owner = _read_owner(cfg.logging.dir)
    return (owner is not None and cfg.checkpoint.load_optimizer and owner.get("checkpoint_save") is not None
            and owner["checkpoint_save"] == _real(cfg.checkpoint.load))


def check_ownership(cfg: Config, force: bool) -> None:
    """ConfigError if ``logging.dir`` holds another run's logs (before any process group)."""
    existing = run_files(cfg.logging.dir)
    if not existing or force or continues_run(cfg):
        return
    owner = _read_owner(cfg.logging.dir)
    resume = (f"resume it with checkpoint.load='{owner['checkpoint_save']}', " if owner and owner.get("checkpoint_save")
              else "")
    raise ConfigError(
        f"logging.dir {cfg.logging.dir} holds the logs of another run ({len(existing)} files, e.g. "
        f"{os.path.basename(existing[0])}): choose a new logging.dir, {resume}or pass --force to delete "
        "those logs and start over")


def claim(cfg: Config, force: bool, resumed_step: int) -> None:
    """Rank 0, after ``check_ownership``: delete the old logs (``--force`` on another run's
    folder), or drop what the resumed run logged after ``resumed_step``; record the owner."""
    os.makedirs(cfg.logging.dir, exist_ok=True)
    if force and not continues_run(cfg):
        for path in run_files(cfg.logging.dir):
            os.remove(path)
        # the old run's W&B files (logging.wandb), which `wandb sync` would upload with the new run's
        shutil.rmtree(os.path.join(cfg.logging.dir, WANDB_DIR), ignore_errors=True)
    else:
        truncate_metrics(os.path.join(cfg.logging.dir, METRICS), resumed_step)
    with open(os.path.join(cfg.logging.dir, OWNER), "w") as f:
        json.dump({"checkpoint_save": _real(cfg.checkpoint.save)}, f)


def truncate_metrics(path: str, last_step: int) -> int:
    """Keep the records of steps <= ``last_step``; returns how many were dropped."""
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= last_step]
    if len(kept) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return len(lines) - len(kept)


def _read_owner(log_dir: str) -> dict | None:
    try:
        with open(os.path.join(log_dir, OWNER)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class ConsoleLog:
    """Copies rank 0's stdout and stderr into ``train.log`` (appended: a resumed run continues
    the log of the run it resumes)."""

    def __init__(self, path: str):
        self.file = open(path, "a", buffering=1)
        self.streams = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = _Tee(sys.stdout, self.file), _Tee(sys.stderr, self.file)

    def close(self) -> None:
        if self.file.closed:
            return
        sys.stdout, sys.stderr = self.streams
        self.file.close()


class _Tee:
    def __init__(self, stream, file):
        self.stream, self.file = stream, file

    def write(self, text: str) -> int:
        self.stream.write(text)
        if not self.file.closed:
            self.file.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        if not self.file.closed:
            self.file.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)
