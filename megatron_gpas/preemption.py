"""Stopping a run cleanly: signals, a wall-clock budget, and workers that die with their launcher.

SLURM warns a job before its time limit or a preemption with a signal (``--signal=USR2@lead``,
SIGTERM on preemption); a user presses Ctrl-C. The handler only sets a flag: the step in flight
finishes, every rank agrees on the flag at the step boundary (one small all-reduce, so no rank
stops alone while the others wait in a collective), then the trainer saves and exits with
``exit_codes.REQUEUE``. A second Ctrl-C aborts at once (KeyboardInterrupt).

The entry points call ``catch_early()`` first, so a stop signal that arrives during imports and
set-up, before the trainer's handler exists, is kept for it rather than killing the process.
Light on imports for that reason: torch is imported where it is used.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)
_PR_SET_PDEATHSIG = 1  # linux/prctl.h

# agreed stop reasons, in the order they win when ranks disagree (all-reduce MAX)
NO_STOP, TIME_BUDGET, SIGNALLED = 0, 1, 2

_early_signal: int | None = None  # a stop signal received before the trainer's handler existed


def catch_early() -> dict:
    """Keep SIGTERM/SIGUSR1/SIGUSR2 for the trainer from now on (their default action kills the
    process, e.g. when SLURM's warning lands while the job is still importing or building the
    model); the trainer acts on them at its first step boundary. Ctrl-C still aborts set-up.
    Returns the previous handlers, for ``release_early``."""
    def remember(signum, frame):
        global _early_signal
        if _early_signal is None:
            _early_signal = signum
            print(f"[signal] {signal.Signals(signum).name} received while starting: the run stops at its first "
                  "step boundary", file=sys.stderr, flush=True)

    return {signum: signal.signal(signum, remember) for signum in STOP_SIGNALS if signum != signal.SIGINT}


def release_early(previous: dict) -> None:
    """Undo ``catch_early`` (an entry point called in-process, e.g. by tests, leaves no trace)."""
    global _early_signal
    for signum, handler in previous.items():
        signal.signal(signum, handler)
    _early_signal = None


class StopRequest:
    """The flag set by stop signals and the wall-clock budget; ``agreed()`` is the collective.

    ``budget_s``: the process's wall-clock budget (train.exit_duration_minutes, measured from
    ``started``); the run stops when the next step plus a save would not fit in what is left.
    """

    def __init__(self, budget_s: float = 0.0, started: float | None = None):
        self.budget_s = budget_s
        self.started = time.monotonic() if started is None else started
        self.signal: int | None = None  # the first stop signal received on this rank
        self._previous: dict[int, object] = {}

    # ------------------------------------------------------------------ signals

    def install(self) -> "StopRequest":
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        if self.signal is None:
            self.signal = _early_signal
        return self

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the save
        if self.signal is None:
            self.signal = signum
            print(f"[signal] {signal.Signals(signum).name} received: finishing this step, then saving and "
                  "exiting", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ decisions

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def out_of_time(self, next_step_s: float, save_s: float) -> bool:
        """Whether another step and then a save would overrun the budget."""
        return bool(self.budget_s) and self.elapsed() + next_step_s + save_s > self.budget_s

    def agreed(self, device, next_step_s: float = 0.0, save_s: float = 0.0) -> int:
        """NO_STOP, TIME_BUDGET or SIGNALLED, the same on every rank (a collective: call it at the
        same point on all ranks). The time check is local and the MAX makes it common, so ranks
        whose clocks straddle the deadline still agree."""
        import torch
        import torch.distributed as dist

        local = SIGNALLED if self.signal is not None else (
            TIME_BUDGET if self.out_of_time(next_step_s, save_s) else NO_STOP)
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return local
        flag = torch.tensor([local], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def describe(self, reason: int) -> str:
        if reason == SIGNALLED:
            return f"stopped by {signal.Signals(self.signal).name}" if self.signal else "stopped by a signal on another rank"
        if reason == TIME_BUDGET:
            return f"stopped by train.exit_duration_minutes ({self.budget_s / 60:g} min)"
        return "running"


def start_checkpoint_writer() -> None:
    """Start Megatron's checkpoint-writer helper now, deaf to the stop signals.

    dist-checkpointing's first save spawns a helper process (a multiprocessing Manager holding
    the write-results queue, kept for the life of the process) that every later save talks to.
    SLURM signals every process of a job step, children included (``--signal=USR2@lead``,
    ``scancel --signal=...``): a helper spawned with default dispositions dies of that SIGUSR2
    or SIGTERM, and the very save the signal asks for then fails (EOFError), exit 1 instead of
    75. Spawned here with the stop signals ignored (inherited through exec) and blocked (so one
    that arrives meanwhile waits for the trainer's handler instead of being lost). The same
    for multiprocessing's resource tracker, which the spawn starts if it is not running."""
    from multiprocessing import resource_tracker

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    handlers = {signum: signal.signal(signum, signal.SIG_IGN) for signum in STOP_SIGNALS}
    try:
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # starting the tracker unblocks SIGINT/SIGTERM
        filesystem_async.get_write_results_queue()
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def die_with_launcher() -> None:
    """Under torchrun, have the kernel kill this worker when the launcher process dies.

    torchrun forwards the signals it handles (``--signals-to-handle``) to the workers, which
    then stop cleanly; but a launcher killed by SIGKILL, or by a signal it does not handle,
    leaves its workers running, still training and writing checkpoints into the folder a
    requeued job will use. PR_SET_PDEATHSIG ties their lifetime to the launcher's."""
    if not os.environ.get("TORCHELASTIC_RUN_ID") or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:  # the launcher was already gone before prctl took effect
        os._exit(1)
