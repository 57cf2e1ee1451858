"""The SLURM batch jobs (slurm/*.sbatch) through the SLURM emulator (tests/slurm_emulator).

Real processes and real signals throughout; the emulator stands in only for SLURM's daemons:
sbatch runs the job here (#SBATCH options, output file, requeue), srun starts the tasks as
real processes and treats signals as srun does, scancel and scontrol signal and requeue the
job as the scheduler would. The test plays the scheduler: it preempts a running training job
twice (a time-limit warning, SIGUSR2, then a SIGTERM), the job saves, requeues itself and
finishes, and its losses and gradient norms are bitwise those of an uninterrupted run of the
same layout through the same script (locally, without SLURM). Jobs that diverge, are invalid
or make no progress are not requeued; the conversion and evaluation jobs run on the
reference's checkpoint.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from synthetic import synthetic_run_overrides, write_synthetic_dataset

REPO_ROOT = Path(__file__).resolve().parent.parent
EMULATOR = REPO_ROOT / "tests" / "slurm_emulator"
SLURM = REPO_ROOT / "slurm"
sys.path.insert(0, str(EMULATOR))
import _emulator  # noqa: E402

STEPS = 60  # about 0.1 s each: the preemptions land while training is under way
CONFIG = """\
model: {preset: tiny, vocab_size: 256, make_vocab_size_divisible_by: 64}
train: {steps: %d, seq_length: 64, micro_batch_size: 2, global_batch_size: 8, eval_interval: 0, eval_iters: 1}
optim: {lr: 3.0e-3, warmup_steps: 2, clip_grad: 1.0}
""" % STEPS
TIMEOUT = 600


@pytest.fixture(scope="module")
def ws(workspace) -> Path:
    write_synthetic_dataset(str(workspace / "data" / "synthetic"))
    (workspace / "tiny.yaml").write_text(CONFIG)
    return workspace


def _overrides(ws: Path, run: str, *extra: str) -> list[str]:
    """The run's data, logging.dir (runs/RUN) and checkpoint.save (ckpt/RUN), as command-line overrides."""
    return [*synthetic_run_overrides(ws, ws / "runs" / run), f"checkpoint.save='{ws / 'ckpt' / run}'", *extra]


def _env(ws: Path, **extra: str) -> dict:
    return {
        **os.environ, "PATH": f"{EMULATOR}{os.pathsep}{os.environ['PATH']}", "SBATCH_LOG": str(ws / "sbatch.jsonl"),
        # job ids (and so rendezvous ports) apart from other test sessions on this machine
        "SBATCH_EMULATOR_FIRST_JOB_ID": str(random.randrange(1000, 1999)), "SBATCH_EMULATOR_KILL_WAIT": "15",
        "REPO": str(REPO_ROOT), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "TASK_EXIT_WAIT": "30",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]), **extra}


class Job:
    """A job submitted to the emulator's sbatch, which runs it and says its id first."""

    def __init__(self, ws: Path, env: dict, *args: str):
        self.ws, self.env = ws, env
        self.proc = subprocess.Popen(["sbatch", "--parsable", *args], cwd=ws, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.id = self.proc.stdout.readline().strip()
        assert self.id.isdigit(), self.proc.stderr.read()

    def wait(self) -> dict:
        """The emulator's record of the finished job (every run of it, the final state)."""
        _, err = self.proc.communicate(timeout=TIMEOUT)
        assert self.proc.returncode == 0, err
        records = [json.loads(line) for line in (self.ws / "sbatch.jsonl").read_text().splitlines()]
        return next(r for r in records if r["id"] == self.id)

    def log(self, name: str) -> str:
        return (self.ws / f"{name}-{self.id}.out").read_text()

    def until(self, condition, what: str, timeout: float = 300):
        """Poll ``condition`` (its first true value) while the job runs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            if self.proc.poll() is not None:
                logs = "".join(p.read_text() for p in self.ws.glob(f"*-{self.id}.out"))
                raise AssertionError(f"the job ended before {what}:\n{logs[-4000:]}")
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}")

    def scancel(self, *args: str):
        subprocess.run(["scancel", *args, self.id], env=self.env, check=True, timeout=60)


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _last_step(run_dir: Path) -> int:
    return max((r["step"] for r in _metrics(run_dir) if "train/loss" in r), default=0)


def _checkpoints(root: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in root.glob("iter_*") if p.name[5:].isdigit())


def _attempts(run_dir: Path) -> list[dict]:
    header, *rows = (run_dir / "job_attempts.tsv").read_text().splitlines()
    return [dict(zip(header.split("\t"), row.split("\t"))) for row in rows]


def _comparable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in records]


@pytest.fixture(scope="module")
def reference(ws) -> dict:
    """The uninterrupted run: the same script and layout (2 processes, DP=2), locally."""
    proc = subprocess.run(["bash", str(SLURM / "pretrain.sbatch"), str(ws / "tiny.yaml"), *_overrides(ws, "reference")],
                          cwd=ws, env=_env(ws, NPROC="2"), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    assert "local run (no SLURM), 2 process(es)" in proc.stdout and "[job] done" in proc.stdout
    metrics = _metrics(ws / "runs" / "reference")
    assert [r["step"] for r in metrics if "train/loss" in r] == list(range(1, STEPS + 1))
    return {"metrics": metrics, "checkpoint": ws / "ckpt" / "reference"}


# ----------------------------------------------------------------------------- the emulator itself

EMULATED_JOB = r"""#!/bin/bash
#SBATCH --job-name=emu
#SBATCH --nodes=1 --ntasks-per-node=4
#SBATCH --output=%x-%j.out
set -uo pipefail
echo "start ${SLURM_RESTART_COUNT:-0}" >> trail.txt
echo "run restart=${SLURM_RESTART_COUNT:-none} nodes=$SLURM_JOB_NODELIST ntasks=$SLURM_NTASKS per_node=$SLURM_TASKS_PER_NODE"
echo "hosts: $(scontrol show hostnames | tr '\n' ' ')"
srun bash -c 'echo "task $SLURM_PROCID local $SLURM_LOCALID node $SLURM_NODEID on $SLURMD_NODENAME"; exit $SLURM_PROCID'
echo "srun exit $?"
start=$SECONDS
srun --ntasks=2 --kill-on-bad-exit=1 bash -c '[[ $SLURM_PROCID == 0 ]] && exit 3; sleep 20; echo "task $SLURM_PROCID survived"'
echo "srun -K exit $? after $(( SECONDS - start )) s"
[[ -z ${SLURM_RESTART_COUNT:-} ]] && scontrol requeue "$SLURM_JOB_ID" && sleep 20
echo "end ${SLURM_RESTART_COUNT:-0}" >> trail.txt
echo "end"
"""


def test_emulator_runs_jobs_steps_and_requeues_as_slurm_does(tmp_path):
    (tmp_path / "job.sh").write_text(EMULATED_JOB)
    job = Job(tmp_path, _env(tmp_path), "--nodes=2", "--ntasks-per-node=2", "job.sh")  # the command line wins
    record = job.wait()
    assert [(r["restart"], r["requeued"]) for r in record["runs"]] == [(0, True), (1, False)]
    log = job.log("emu")  # %x-%j.out in the submit directory; truncated by the second run (no --open-mode)
    assert "restart=none" not in log and "run restart=1 nodes=localhost,emu-node1 ntasks=4 per_node=2(x2)" in log
    assert "hosts: localhost emu-node1 " in log
    assert sorted(line for line in log.splitlines() if line.startswith("task ")) == [
        "task 0 local 0 node 0 on localhost", "task 1 local 1 node 0 on localhost",
        "task 2 local 0 node 1 on emu-node1", "task 3 local 1 node 1 on emu-node1"]
    assert "srun exit 3" in log and "srun: error: emu-node1: task 3: Exited with exit code 3" in log
    # --kill-on-bad-exit: task 0 failed, so task 1 was killed at once
    assert "survived" not in log and "srun: Terminating StepId=" in log
    assert int(log.split("srun -K exit 137 after ")[1].split()[0]) < 15
    # the requeue ended the first run (SIGTERM to the batch shell) before its "sleep 20" was over
    assert (tmp_path / "trail.txt").read_text().split("\n") == ["start 0", "start 1", "end 1", ""]
    assert record["state"] == "COMPLETED" and log.rstrip().endswith("end")


SIGNALLED_JOB = r"""#!/bin/bash
#SBATCH --job-name=sig
#SBATCH --ntasks=2
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
trap 'echo "batch shell: TERM"' TERM
srun bash -c 'trap "echo task $SLURM_PROCID: USR2" USR2; trap "echo task $SLURM_PROCID: TERM; exit 5" TERM
              echo "task $SLURM_PROCID: ready"; for i in $(seq 400); do sleep 0.05; done' &
pid=$!
while kill -0 $pid 2>/dev/null; do wait $pid; rc=$?; done
echo "srun exit $rc"
"""


def test_emulator_signals_reach_the_processes_slurm_sends_them_to(tmp_path):
    """scancel --signal reaches the tasks (every time); a SIGTERM to srun (scancel --batch, as
    SLURM's end of a job) makes srun kill its tasks at once, as SLURM's srun does."""
    (tmp_path / "job.sh").write_text(SIGNALLED_JOB)
    job = Job(tmp_path, _env(tmp_path), "job.sh")
    log = lambda: (tmp_path / f"sig-{job.id}.out").read_text() if (tmp_path / f"sig-{job.id}.out").exists() else ""
    job.until(lambda: log().count(": ready") == 2, "the tasks", timeout=60)
    job.scancel("--signal=USR2")
    job.until(lambda: log().count(": USR2") == 2, "SIGUSR2 in both tasks", timeout=60)
    job.scancel("--signal=TERM", "--batch")
    record = job.wait()
    text = log()
    assert "batch shell: TERM" in text and "srun: forcing job termination" in text
    assert ": TERM" not in text.replace("batch shell: TERM", "")  # the tasks were killed, not asked
    assert "srun exit 137" in text and record["state"] == "COMPLETED"


TIMED_JOB = r"""#!/bin/bash
#SBATCH --job-name=timed
#SBATCH --time=0:03
#SBATCH --signal=B:USR1@2
#SBATCH --output=%x-%j.out
trap 'echo "USR1 after $SECONDS s"' USR1
trap 'echo "TERM after $SECONDS s"' TERM
for i in $(seq 300); do sleep 0.05; done
echo "not ended"
"""


def test_emulator_time_limit_warns_then_ends_the_job(tmp_path):
    """--time with --signal=B:SIG@LEAD: SIG LEAD seconds before the limit, SIGTERM at the limit,
    SIGKILL after KillWait (the emulator counts seconds where SLURM counts minutes)."""
    (tmp_path / "job.sh").write_text(TIMED_JOB)
    job = Job(tmp_path, _env(tmp_path, SBATCH_EMULATOR_KILL_WAIT="1"), "job.sh")
    record = job.wait()
    lines = [line for line in job.log("timed").splitlines() if " after " in line]  # (and bash's "Terminated")
    assert [line.split(" after")[0] for line in lines] == ["USR1", "TERM"], lines
    assert int(lines[0].split()[2]) in (0, 1, 2) and int(lines[1].split()[2]) in (2, 3, 4)
    assert record["state"] == "TIMEOUT" and record["runs"][0]["returncode"] == -signal.SIGKILL


# ----------------------------------------------------------------------------- training jobs


def test_preempted_twice_requeues_itself_and_equals_the_uninterrupted_run(ws, reference):
    env = _env(ws)
    run, ckpt = ws / "runs" / "job", ws / "ckpt" / "job"
    job = Job(ws, env, "--ntasks-per-node=2", "--cpus-per-task=1", str(SLURM / "pretrain.sbatch"),
              str(ws / "tiny.yaml"), *_overrides(ws, "job"))

    # 1. a time-limit warning (what --signal=USR2@lead sends every task) while training runs
    job.until(lambda: _last_step(run) >= 2, "training in attempt 1")
    os.environ["SBATCH_LOG"] = env["SBATCH_LOG"]  # for _emulator's view of the job
    step_processes = _emulator.step_tasks(job.id)
    job.scancel("--signal=USR2")
    k1 = job.until(lambda: (_checkpoints(ckpt) or [0])[-1], "the first checkpoint")
    # SLURM signals every process of a step: the checkpoint writer helpers got SIGUSR2 too
    assert len(step_processes) > 2, "the signal reached no process but the 2 tasks"

    # 2. a SIGTERM preemption in attempt 2: the tasks and the batch shell get it (not srun, which
    # would kill the tasks at once, as SLURM's srun does)
    job.until(lambda: _last_step(run) > k1 + 1, "training in attempt 2")
    os.kill(int((ws / "sbatch.jsonl.jobs" / job.id / "batch.pid").read_text()), signal.SIGTERM)
    job.scancel("--signal=TERM")
    k2 = job.until(lambda: [s for s in _checkpoints(ckpt) if s > k1], "the second checkpoint")[0]

    record = job.wait()
    log = job.log("pretrain")
    assert [(r["restart"], r["requeued"], r["returncode"]) for r in record["runs"]] == [
        (0, True, 0), (1, True, 0), (2, False, 0)], log[-3000:]  # (a requeued attempt exits 0 after scontrol)
    assert record["state"] == "COMPLETED" and record["returncodes"] == [0]
    assert f"requeued job {job.id}: attempt 2 resumes at step {k1}" in log
    assert f"requeued job {job.id}: attempt 3 resumes at step {k2}" in log
    # every attempt in the one log (--open-mode=append), each resuming where the last one stopped
    for restart in range(3):
        assert f"attempt {restart + 1} (SLURM_RESTART_COUNT={restart})" in log
    assert "[signal] SIGUSR2 received" in log and "[signal] SIGTERM received" in log
    assert "[job] SIGTERM: SLURM is ending the job; waiting for the tasks" in log
    assert "srun: forcing job termination" not in log
    for k in (k1, k2):
        assert f"resumed from {ckpt}/iter_{k:07d} at step {k} " in log
    assert f"[summary] {STEPS - k2} steps " in log  # the last attempt trained only what was left
    assert 0 < k1 < k2 < STEPS and _checkpoints(ckpt) == [k1, k2, STEPS]
    assert [(a["restart"], a["exit_code"], a["outcome"], a["step_before"], a["step_after"])
            for a in _attempts(run)] == [("0", "75", "stopped", "0", str(k1)), ("1", "75", "stopped", str(k1), str(k2)),
                                         ("2", "0", "done", str(k2), str(STEPS))]

    # the same numbers as the uninterrupted run, bitwise: every step once, every key but perf/*
    metrics = _metrics(run)
    assert [r["step"] for r in metrics if "train/loss" in r] == list(range(1, STEPS + 1))
    assert _comparable(metrics) == _comparable(reference["metrics"])
    assert len({r["train/loss"] for r in metrics if "train/loss" in r}) > STEPS // 2  # it trained


@pytest.fixture(scope="module")
def single_task_runs(ws) -> dict:
    """Four single-process runs side by side: three jobs that must end without being requeued
    (again), name -> (the emulator's record, the job's log), and "local": a run without SLURM
    stopped by SIGTERM to the script, -> (exit code, output)."""
    jobs = {
        # every attempt ends before its first step (a wall-clock budget shorter than a step)
        "stuck": Job(ws, _env(ws, MAX_NO_PROGRESS="2"), "--ntasks=1", "--job-name=stuck", str(SLURM / "pretrain.sbatch"),
                     str(ws / "tiny.yaml"), *_overrides(ws, "stuck", "train.exit_duration_minutes=1e-4")),
        "diverged": Job(ws, _env(ws), "--ntasks=1", "--job-name=diverged", str(SLURM / "pretrain.sbatch"),
                        str(ws / "tiny.yaml"), *_overrides(ws, "diverged", "optim.lr=1.0e30", "train.max_skipped_steps=1")),
        "invalid": Job(ws, _env(ws), "--ntasks=1", "--job-name=invalid", str(SLURM / "pretrain.sbatch"),
                       str(ws / "tiny.yaml"), *_overrides(ws, "invalid", "train.global_batch_size=7")),
    }
    local = subprocess.Popen(["bash", str(SLURM / "pretrain.sbatch"), str(ws / "tiny.yaml"), *_overrides(ws, "local")],
                             cwd=ws, env=_env(ws), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while _last_step(ws / "runs" / "local") < 1 and local.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    local.send_signal(signal.SIGTERM)
    out, _ = local.communicate(timeout=TIMEOUT)
    return {"local": (local.returncode, out), **{name: (job.wait(), job.log(name)) for name, job in jobs.items()}}


def test_locally_a_stop_signal_saves_and_exits_75(ws, single_task_runs):
    """Without SLURM: SIGTERM to the script reaches the trainer, which saves; exit 75 says "run it again"."""
    code, out = single_task_runs["local"]
    assert code == 75, out[-3000:]
    (step,) = _checkpoints(ws / "ckpt" / "local")
    assert "[job] SIGTERM: passed to the 1 process(es)" in out and "[signal] SIGTERM received" in out
    assert f"stopped early (exit code 75); newest checkpoint: {ws / 'ckpt' / 'local'}/iter_{step:07d}" in out
    assert "Run the same command again to continue" in out and 0 < step < STEPS


def test_a_job_without_progress_stops_requeueing(ws, single_task_runs):
    """After MAX_NO_PROGRESS attempts in a row without a newer checkpoint the job gives up."""
    record, log = single_task_runs["stuck"]
    assert [(r["restart"], r["requeued"], r["returncode"]) for r in record["runs"]] == [(0, True, 0), (1, False, 75)], \
        log[-3000:]
    assert record["state"] == "FAILED"
    assert log.count("stopped by train.exit_duration_minutes") == 2
    assert log.count("[checkpoint] stopped before the first step: nothing to save") == 2
    assert _checkpoints(ws / "ckpt" / "stuck") == []
    assert "2 attempts in a row ended without a newer checkpoint (MAX_NO_PROGRESS=2" in log
    assert "not requeueing a job that makes no progress" in log
    assert [(a["outcome"], a["step_before"], a["step_after"], a["no_progress"]) for a in _attempts(ws / "runs" / "stuck")] \
        == [("stopped", "0", "0", "1"), ("stopped", "0", "0", "2")]


@pytest.mark.parametrize("name, code, message", [
    ("diverged", 3, "the run diverged (exit code 3"), ("invalid", 2, "the trainer refused the configuration")])
def test_diverged_and_invalid_jobs_are_not_requeued(single_task_runs, name, code, message):
    record, log = single_task_runs[name]
    assert [(r["requeued"], r["returncode"]) for r in record["runs"]] == [(False, code)], log[-3000:]
    assert record["state"] == "FAILED" and message in log and "requeued job" not in log
    assert {"diverged": "1 consecutive updates skipped", "invalid": "global_batch_size"}[name] in log


def test_a_job_without_checkpoint_save_is_refused(ws, tmp_path):
    """Without checkpoint.save a requeued job would start from zero: refused before srun."""
    proc = subprocess.run(["bash", str(SLURM / "pretrain.sbatch"), str(ws / "tiny.yaml"),
                           *synthetic_run_overrides(ws, tmp_path / "run")],
                          cwd=ws, env=_env(ws), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "checkpoint.save is not set" in proc.stderr
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- conversion and evaluation


def test_convert_and_evaluate_jobs_on_the_reference_checkpoint(ws, reference, tmp_path):
    ckpt = reference["checkpoint"]
    # perplexity on 2 srun tasks (DP=2), submitted first: the conversion runs meanwhile, locally
    job = Job(ws, _env(ws, RESULTS=str(tmp_path / "eval")), "--ntasks=2", str(SLURM / "evaluate.sbatch"), str(ckpt),
              "--data", str(ws / "data" / "synthetic"), "--num-batches", "1", "--global-batch-size", "8")
    proc = subprocess.run(["bash", str(SLURM / "convert_to_hf.sbatch"), str(ckpt), str(tmp_path / "hf")],
                          cwd=tmp_path, env=_env(ws), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    export = json.loads((tmp_path / "hf" / "megatron_gpas_export.json").read_text())
    assert export["format"] == "llama" and (tmp_path / "hf" / "model.safetensors").exists()
    assert Path(export["checkpoint"]).name == f"iter_{STEPS:07d}"

    # the perplexity equals the reference's own final evaluation, bitwise
    record = job.wait()
    assert record["state"] == "COMPLETED", job.log("evaluate")[-3000:]
    result = json.loads((tmp_path / "eval" / "perplexity.json").read_text())
    final_eval = [r for r in reference["metrics"] if "eval/loss" in r][-1]
    assert final_eval["step"] == STEPS and result["layout"]["world"] == 2
    assert result["loss"] == final_eval["eval/loss"] and result["perplexity"] == final_eval["eval/ppl"]
