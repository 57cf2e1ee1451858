"""Shared state and helpers of the SLURM emulator (sbatch, srun, scontrol, scancel; tests only).

The emulator stands in for the SLURM daemons on one machine. Every "node" is this machine, and
every process is real. Jobs run synchronously inside ``sbatch``. The other commands find a job
through files next to ``$SBATCH_LOG``, the JSON Lines log that gets one record per finished
submission:

    $SBATCH_LOG.jobs/<id>/job.json       what was asked (options, nodes, tasks) and the job's state
    $SBATCH_LOG.jobs/<id>/batch.pid      the batch shell of the running attempt
    $SBATCH_LOG.jobs/<id>/steps/<n>.json a running job step: srun's pid and its task pids
    $SBATCH_LOG.jobs/<id>/requeue        ``scontrol requeue`` asked for another run
    $SBATCH_LOG.jobs/<id>/cancelled      ``scancel`` (without --signal) cancelled the job

The batch shell runs in a session of its own. That session plays the part of the job's cgroup:
"every process of the job" means every process in it.

Settings (environment):
    SBATCH_LOG                    the state file (required)
    SBATCH_EMULATOR_FIRST_JOB_ID  the first job id handed out (default 1000)
    SBATCH_EMULATOR_KILL_WAIT     seconds between SIGTERM and SIGKILL when a job or step is
                                  ended (SLURM's KillWait; default 30)
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time

NO_ARRAY_INDEX = "4294967294"  # what SLURM substitutes for %a in a job that is not an array


def fail(command: str, message: str, code: int = 1):
    print(f"{command} (emulator): error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def state_file() -> str:
    path = os.environ.get("SBATCH_LOG")
    if not path:
        fail(os.path.basename(sys.argv[0]), "SBATCH_LOG is not set (the emulator's state file)")
    return path


def jobs_dir() -> str:
    return state_file() + ".jobs"


def job_dir(job_id: str) -> str:
    return os.path.join(jobs_dir(), str(job_id))


def kill_wait() -> float:
    return float(os.environ.get("SBATCH_EMULATOR_KILL_WAIT", "30"))


def read_json(path: str, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def write_json(path: str, data) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- signals


def parse_signal(text: str) -> int:
    """'USR2', 'SIGUSR2' or '12' -> 12."""
    text = text.strip().upper()
    if text.isdigit():
        return int(text)
    name = text if text.startswith("SIG") else "SIG" + text
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise ValueError(f"unknown signal {text!r}") from None


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def send(pid: int, signum: int) -> bool:
    try:
        os.kill(pid, signum)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def alive(pid: int) -> bool:
    """Running (a zombie that its parent has not reaped yet counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, session id) of every live process but this one."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # after the command name: state, ppid, pgrp, session
        if fields[0] != "Z":
            table[int(entry)] = (int(fields[1]), int(fields[3]))
    return table


def session_processes(sid: int) -> list[int]:
    """Every process of session ``sid`` (the job's processes: its "cgroup"), but this one."""
    return [pid for pid, (_, session) in _processes().items() if session == sid]


def with_descendants(roots: list[int]) -> list[int]:
    """``roots`` and every process below them (a job step's processes)."""
    table, found = _processes(), [pid for pid in roots]
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    i = 0
    while i < len(found):
        found += [c for c in children.get(found[i], []) if c not in found]
        i += 1
    return found


def exit_code(returncode: int) -> int:
    """A subprocess return code as a shell reports it (killed by signal N: 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


# ----------------------------------------------------------------------------- jobs


def running_batch_pid(job_id: str) -> int | None:
    try:
        with open(os.path.join(job_dir(job_id), "batch.pid")) as f:
            pid = int(f.read())
    except (OSError, ValueError):
        return None
    return pid if alive(pid) else None


def step_tasks(job_id: str) -> list[int]:
    """The processes of every running step of the job: its tasks and their children."""
    steps = os.path.join(job_dir(job_id), "steps")
    pids = []
    for name in sorted(os.listdir(steps)) if os.path.isdir(steps) else []:
        record = read_json(os.path.join(steps, name), {})
        pids += [pid for pid in record.get("tasks", []) if alive(pid)]
    return with_descendants(pids)


# ----------------------------------------------------------------------------- node lists


def expand_hostlist(text: str) -> list[str]:
    """SLURM's compressed host list: 'node[01-03,07],gpu5' -> node01 node02 node03 node07 gpu5."""
    hosts, parts, depth, start = [], [], 0, 0
    text = text.strip()
    for i, ch in enumerate(text):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    for part in filter(None, parts):
        m = re.fullmatch(r"([^\[\]]*)\[([^\]]+)\]([^\[\]]*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            width = len(lo)
            for n in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{n:0{width}d}{suffix}")
    return hosts


def node_names(count: int) -> tuple[list[str], str]:
    """(names, compressed list) of ``count`` emulated nodes. All are this machine; the first is
    called ``localhost`` so that a rendezvous on the job's first node resolves."""
    names = ["localhost"] + [f"emu-node{i}" for i in range(1, count)]
    compressed = "localhost" + (f",emu-node[1-{count - 1}]" if count > 2 else f",emu-node1" if count == 2 else "")
    return names, compressed


def tasks_per_node_env(counts: list[int]) -> str:
    """SLURM_TASKS_PER_NODE's form: [2, 2, 1] -> '2(x2),1'."""
    out = []
    for n in counts:
        if out and out[-1][0] == n:
            out[-1][1] += 1
        else:
            out.append([n, 1])
    return ",".join(f"{n}(x{k})" if k > 1 else str(n) for n, k in out)


def distribute(ntasks: int, nnodes: int, per_node: int | None) -> list[int]:
    """Tasks on each node, block distribution (as SLURM's default)."""
    if per_node:
        counts = [min(per_node, max(ntasks - i * per_node, 0)) for i in range(nnodes)]
    else:
        base, extra = divmod(ntasks, nnodes)
        counts = [base + (i < extra) for i in range(nnodes)]
    return counts


def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
