"""Stopping runs cleanly, with real processes and real signals (megatron_gpas/preemption.py).

- one process, SIGUSR2 at a random moment of training: exit 75 with a checkpoint at the step
  reached; the same command again finishes, and every logged step equals an uninterrupted run
  bitwise (metrics.jsonl holds each step once);
- torchrun, 2 processes: TP=2 with SIGTERM to the launcher (forwarded), DP=2 with SIGUSR2 to
  one worker only (the ranks agree on it); each against its own uninterrupted run;
- a launcher killed with SIGKILL takes its workers with it;
- train.exit_duration_minutes stops in time with a checkpoint;
- a diverging run skips its updates, halts with exit 3 and leaves no non-finite checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from synthetic import synthetic_run_overrides, write_synthetic_dataset

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).with_name("torchrun")
STEPS = 40
REQUEUE, DIVERGED = 75, 3  # exit codes (megatron_gpas/exit_codes.py), written out: the test states the contract

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def ws(workspace) -> Path:
    write_synthetic_dataset(str(workspace / "data" / "synthetic"))
    return workspace


def _overrides(ws: Path, run: str, *extra: str) -> list[str]:
    run_dir = ws / "runs" / run
    return ["model.preset=tiny", "model.vocab_size=256", "model.make_vocab_size_divisible_by=64",
            "gpas.enabled=true", f"train.steps={STEPS}", "train.seq_length=64", "train.micro_batch_size=2",
            "train.global_batch_size=8", "train.eval_iters=1", "optim.lr=3.0e-3", "optim.warmup_steps=2",
            *synthetic_run_overrides(ws, run_dir),
            f"checkpoint.save='{run_dir / 'ckpt'}'", f"checkpoint.load='{run_dir / 'ckpt'}'",
            "checkpoint.load_if_exists=true", *extra]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                        "SLURM_NTASKS", "SLURM_LOCALID")}
    return dict(env, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(nproc: int, overrides: list[str]) -> list[str]:
    module = ["-m", "megatron_gpas.pretrain", *overrides]
    if nproc == 1:
        return [sys.executable, *module]
    return [str(TORCHRUN), "--nnodes=1", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
            f"--master-port={_free_port()}", "--signals-to-handle=SIGTERM,SIGINT,SIGUSR1,SIGUSR2",
            "--shutdown-timeout=120", *module]


def _start(nproc: int, overrides: list[str], log: Path) -> subprocess.Popen:
    out = open(log, "a")
    return subprocess.Popen(_command(nproc, overrides), cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _run(nproc: int, overrides: list[str], log: Path, timeout: int = 300) -> int:
    proc = _start(nproc, overrides, log)
    return proc.wait(timeout=timeout)


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("perf/")} for line in lines if line]


def _logged_step(run_dir: Path) -> int:
    try:
        return max((r["step"] for r in _records(run_dir)), default=0)
    except (OSError, ValueError):
        return 0


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while _logged_step(run_dir) < step:
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before step {step}"
        assert time.monotonic() < deadline, f"no step {step} within {timeout} s"
        time.sleep(0.05)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status  # a zombie has exited; only its parent has not reaped it yet


def _rank_of(pid: int) -> int:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(e for e in environ if e.startswith(b"RANK=")).split(b"=")[1])


def _interrupt_and_resume(ws: Path, name: str, nproc: int, layout: list[str], deliver) -> tuple[int, Path]:
    """Start a run, let ``deliver(proc)`` signal it once training is under way (after a random
    extra delay), check the stop, then run the same command again to the end. Returns the step
    at which it stopped and the run folder."""
    run_dir = ws / "runs" / name
    log = ws / f"{name}.log"
    overrides = _overrides(ws, name, *layout)
    proc = _start(nproc, overrides, log)
    _wait_for_step(run_dir, 3, proc)
    time.sleep(random.Random(name).uniform(0.0, 0.3))
    deliver(proc)
    rc = proc.wait(timeout=240)
    output = log.read_text()
    assert rc == REQUEUE or nproc > 1, output[-3000:]  # torchrun reports its own code for a forwarded signal
    stopped = _logged_step(run_dir)
    assert 3 <= stopped < STEPS, f"stopped at step {stopped}"
    ckpt = run_dir / "ckpt"
    assert (ckpt / "latest").read_text().strip() == f"iter_{stopped:07d}"
    assert f"at step {stopped}/{STEPS}; exit code {REQUEUE}" in output, output[-3000:]

    assert _run(nproc, overrides, log) == 0, log.read_text()[-3000:]
    output = log.read_text()
    assert f"resumed from {ckpt / f'iter_{stopped:07d}'} at step {stopped}" in output
    assert "finished at step 40/40; exit code 0" in output
    return stopped, run_dir


def _assert_same_run(resumed: Path, reference: Path) -> None:
    """Every step once, each equal bitwise (losses, norms, LR, gates, variances) to the reference."""
    got, want = _records(resumed), _records(reference)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    assert len({r["step"] for r in got if "train/loss" in r}) == STEPS
    assert got == want


def test_one_process_sigusr2_resumes_bitwise(ws):
    assert _run(1, _overrides(ws, "ref1"), ws / "ref1.log") == 0
    stopped, run_dir = _interrupt_and_resume(ws, "usr2", 1, [], lambda proc: proc.send_signal(signal.SIGUSR2))
    _assert_same_run(run_dir, ws / "runs" / "ref1")
    log = (run_dir / "train.log").read_text()  # rank 0's console of both parts, in order
    assert log.count("[run] ") == 2 and "[signal] SIGUSR2 received" in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["step"], summary["steps_this_run"], summary["exit_code"]) == (STEPS, STEPS - stopped, 0)


@pytest.mark.parametrize("layout,signal_to", [
    (["parallel.tensor=2", "parallel.sequence_parallel=true"], "launcher:SIGTERM"),
    ([], "rank1:SIGUSR2"),  # DP=2: one worker alone is signalled; the collective flag stops both
])
def test_torchrun_two_processes_resume_bitwise(ws, layout, signal_to):
    name = "tp2" if layout else "dp2"
    assert _run(2, _overrides(ws, f"ref_{name}", *layout), ws / f"ref_{name}.log") == 0
    target, signame = signal_to.split(":")
    workers: list[int] = []

    def deliver(proc):
        workers.extend(_children(proc.pid))
        assert len(workers) == 2
        pid = proc.pid if target == "launcher" else next(w for w in workers if _rank_of(w) == 1)
        os.kill(pid, getattr(signal, signame))

    _interrupt_and_resume(ws, name, 2, layout, deliver)
    _assert_same_run(ws / "runs" / name, ws / "runs" / f"ref_{name}")
    assert not any(_alive(w) for w in workers)


def test_workers_die_with_a_killed_launcher(ws):
    run_dir = ws / "runs" / "orphans"
    proc = _start(2, _overrides(ws, "orphans", "train.steps=100000", "checkpoint.save_interval=1"),
                  ws / "orphans.log")
    _wait_for_step(run_dir, 2, proc)
    workers = _children(proc.pid)
    assert len(workers) == 2 and all(_alive(w) for w in workers)
    proc.kill()  # SIGKILL: torchrun cannot forward anything
    proc.wait()
    deadline = time.monotonic() + 20
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers), "workers outlived their launcher"
    before = sorted(p.name for p in (run_dir / "ckpt").iterdir())
    time.sleep(1.0)
    assert sorted(p.name for p in (run_dir / "ckpt").iterdir()) == before  # nobody writes checkpoints any more


def test_exit_duration_stops_in_time_with_a_checkpoint(ws):
    run_dir = ws / "runs" / "budget"
    budget_s = 15.0
    started = time.monotonic()
    rc = _run(1, _overrides(ws, "budget", "train.steps=100000", f"train.exit_duration_minutes={budget_s / 60}"),
              ws / "budget.log")
    wall = time.monotonic() - started
    output = (ws / "budget.log").read_text()
    assert rc == REQUEUE, output[-3000:]
    stopped = _logged_step(run_dir)
    assert stopped > 0 and (run_dir / "ckpt" / f"iter_{stopped:07d}").is_dir()
    assert "stopped by train.exit_duration_minutes" in output
    # the budget counts from the trainer's start (after the imports): the process ends within it plus start-up
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["seconds_since_start"] < budget_s and wall < budget_s + 30


def test_divergence_halts_after_consecutive_skips_without_a_bad_checkpoint(ws):
    """lr = 1e30 (finite, so the config accepts it): the first update throws the weights to
    ~1e30, the next losses are not finite, their updates are skipped, and the run halts."""
    run_dir = ws / "runs" / "diverge"
    log = ws / "diverge.log"
    rc = _run(1, _overrides(ws, "diverge", "optim.lr=1.0e30", "optim.warmup_steps=0", "train.max_skipped_steps=3",
                            "checkpoint.save_interval=1"), log)
    output = log.read_text()
    assert rc == DIVERGED, output[-3000:]
    records = _records(run_dir)
    skipped = [r["train/skipped_steps"] for r in records]
    assert skipped[-3:] == [1.0, 2.0, 3.0] and skipped[0] == 0.0
    assert all(not math.isfinite(r["train/loss"]) for r in records[-3:])
    assert "3 consecutive updates skipped" in output and "update skipped (non-finite loss" in output
    # every checkpoint on disk holds finite weights (none is written at a skipped step)
    from megatron_gpas.hf.dcp_reader import CheckpointReader

    saved = sorted(p for p in (run_dir / "ckpt").iterdir() if p.name.startswith("iter_"))
    assert saved, "the run saved nothing before diverging"
    for path in saved:
        reader = CheckpointReader(str(path))
        for name in reader.metadata:
            assert torch.isfinite(reader.read(name)).all(), f"{path.name}: {name} is not finite"


def test_loss_spike_guard_skips_and_is_counted():
    """The guard against an independent restatement: skip when loss > k × the mean of the last
    W applied losses, only once W are known; skipped losses do not enter the mean."""
    from megatron_gpas.divergence import DivergenceGuard

    guard = DivergenceGuard(max_consecutive=2, spike_factor=2.0, spike_window=3)
    decisions = []
    for loss in (1.0, 1.2, 5.0, 0.8, 2.0, 2.01, 9.0, 9.0):
        reason = guard.veto(loss)
        decisions.append(reason is not None)
        guard.record(loss, skipped=reason is not None)
    # window [1.0, 1.2, 5.0] is not full before the 4th loss; 0.8 < 2·2.4; then [1.2, 5.0, 0.8]: mean 7/3;
    # 2.0 < 4.67 ok -> [5.0, 0.8, 2.0] mean 2.6: 2.01 ok -> [0.8, 2.0, 2.01] mean 1.603: 9.0 > 3.207 skip, twice
    assert decisions == [False, False, False, False, False, False, True, True]
    assert (guard.total, guard.consecutive) == (2, 2)
    assert guard.halt_message(8, "loss spike") is not None
    assert guard.veto(float("nan")).startswith("non-finite loss")


def test_a_signal_during_start_up_stops_at_the_first_boundary(ws):
    """SIGUSR2 while the process is still importing: not killed by the default action; it stops
    before its first step with nothing to save (a step-0 checkpoint could not be resumed)."""
    run_dir = ws / "runs" / "early"
    log = ws / "early.log"
    proc = _start(1, _overrides(ws, "early"), log)
    time.sleep(1.0)  # well inside the imports (several seconds)
    proc.send_signal(signal.SIGUSR2)
    assert proc.wait(timeout=240) == REQUEUE, log.read_text()[-3000:]
    output = log.read_text()
    assert "SIGUSR2 received while starting" in output and "stopped before the first step: nothing to save" in output
    assert _logged_step(run_dir) == 0 and not (run_dir / "ckpt" / "latest").exists()
