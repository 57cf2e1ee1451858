"""A run folder belongs to one run (megatron_gpas/run_folder.py), in-process Trainers on CPU.

- a new run into a folder holding another run's logs is refused before any process group,
  ``--force`` deletes those logs (not the shared data cache);
- a resumed run continues the folder: metrics.jsonl and the TensorBoard events hold every step
  once, the steps logged after the checkpoint (lost by a crash) replaced by the resumed ones;
- config.yaml, train.log, summary.json and TensorBoard's config text are written;
- a resume with a changed LR schedule says so, and optim.override_schedule follows the new one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.distributed as dist
import yaml

from megatron_gpas import run_folder
from megatron_gpas.config import ConfigError
from synthetic import resumable_run_config, train_in_process, write_synthetic_dataset

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture(scope="module")
def ws(workspace) -> Path:
    write_synthetic_dataset(str(workspace / "data" / "synthetic"))
    return workspace


def _tensorboard(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_new_run_into_a_used_folder_is_refused_and_force_replaces_it(ws):
    from megatron_gpas import distributed

    distributed.shutdown()  # a process group left by another test module would hide what this one checks
    run_dir = ws / "runs" / "owned"
    (run_dir / "data_cache").mkdir(parents=True)
    (run_dir / "data_cache" / "index.npy").write_text("shared")
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "train/loss": 5.0}\n')
    (run_dir / "run.json").write_text(json.dumps({"checkpoint_save": "/elsewhere/ckpt"}))
    (run_dir / "loss.png").write_bytes(b"png")
    cfg = resumable_run_config(ws, "owned", "checkpoint.load=null")
    with pytest.raises(ConfigError, match=r"holds the logs of another run \(3 files.*checkpoint.load='/elsewhere/ckpt'.*--force"):
        train_in_process(cfg)
    assert not dist.is_initialized()  # refused before any process group
    # a run that resumes from another root is not that run either
    with pytest.raises(ConfigError, match="holds the logs of another run"):
        run_folder.check_ownership(resumable_run_config(ws, "owned"), force=False)

    result = train_in_process(resumable_run_config(ws, "owned", "checkpoint.load=null", "train.steps=2"), force=True)
    assert result["exit_code"] == 0
    assert [r["step"] for r in _metrics(run_dir) if "train/loss" in r] == [1, 2]  # the old step 1 is gone
    assert (run_dir / "data_cache" / "index.npy").read_text() == "shared" and not (run_dir / "loss.png").exists()
    assert json.loads((run_dir / "run.json").read_text()) == {"checkpoint_save": str((run_dir / "ckpt").resolve())}


def test_resume_continues_the_folder_without_duplicate_steps(ws, capsys):
    run_dir = ws / "runs" / "crashed"
    # 6 steps, a checkpoint at step 3 only: steps 4-6 are logged but lost, as after a crash
    train_in_process(resumable_run_config(ws, "crashed", "checkpoint.save_interval=3", "checkpoint.save_at_end=false"))
    first = _metrics(run_dir)
    assert (run_dir / "ckpt" / "latest").read_text().strip() == "iter_0000003"
    assert [r["step"] for r in first if "train/loss" in r] == [1, 2, 3, 4, 5, 6]

    capsys.readouterr()
    train_in_process(resumable_run_config(ws, "crashed", "checkpoint.save_interval=3", "optim.lr=1.0e-3"))
    out = capsys.readouterr().out
    assert "[warn] this config changes the LR schedule (optim.lr 0.003 -> 0.001)" in out
    assert "optim.override_schedule=true" in out
    resumed = _metrics(run_dir)
    steps = [r["step"] for r in resumed if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert resumed[:3] == first[:3]  # what the checkpoint covers is kept as it was
    # the checkpoint's LR schedule continued (lr 3e-3 peak), not the config's
    assert [r["train/lr"] for r in resumed[3:6]] == [r["train/lr"] for r in first[3:6]]
    assert [r["step"] for r in resumed if "eval/loss" in r] == [6]
    # TensorBoard purged the lost steps of the first run: each step once, with the resumed values
    loss = _tensorboard(run_dir, "train/loss")
    assert [s for s, _ in loss] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in loss] == pytest.approx([r["train/loss"] for r in resumed if "train/loss" in r], rel=1e-6)

    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == 1.0e-3
    log = (run_dir / "train.log").read_text()
    assert log.count("[run] ") == 2 and "resuming at step 3" in log and log.rstrip().endswith("exit code 0 (done)")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["step"], summary["steps_this_run"], summary["skipped_steps"]) == (6, 3, 0)
    assert summary["checkpoint"].endswith("iter_0000006")

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    events.Reload()
    assert any(tag.startswith("config") for tag in events.Tags()["tensors"])


def test_override_schedule_follows_the_new_config(ws):
    """Resumed at step 3 with optim.lr changed and override_schedule: steps 4-6 get the LR a fresh
    run of the new config has at those steps."""
    train_in_process(resumable_run_config(ws, "override", "train.steps=3"))
    train_in_process(resumable_run_config(ws, "override", "optim.lr=1.0e-3", "optim.override_schedule=true"))
    train_in_process(resumable_run_config(ws, "fresh_new_lr", "optim.lr=1.0e-3", "checkpoint.load=null"))
    overridden = [r["train/lr"] for r in _metrics(ws / "runs" / "override") if r.get("step", 0) > 3 and "train/lr" in r]
    fresh = [r["train/lr"] for r in _metrics(ws / "runs" / "fresh_new_lr") if r.get("step", 0) > 3 and "train/lr" in r]
    assert overridden == fresh and len(fresh) == 3


def test_truncate_metrics_keeps_the_steps_a_checkpoint_covers(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in (1, 2, 3, 3, 4, 5)))
    assert run_folder.truncate_metrics(str(path), 3) == 2
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 3]
