"""What a run does when training goes wrong: skip the update, count it, halt if it persists.

A step whose loss or gradient norm is not finite is not applied (its update would put NaN into
every weight); an optional guard also skips a step whose loss jumps above
``train.loss_spike_factor`` × the mean loss of the last ``train.loss_spike_window`` applied steps
(a bad batch or an instability caught one step early). Skipped steps still consume their data
and advance the step counter, as in Megatron. ``train.max_skipped_steps`` consecutive skips mean
the run has diverged: it halts with exit code 3 rather than burning its allocation on no-ops.
The state is part of every checkpoint, so a resumed run decides as the uninterrupted one would.
"""

from __future__ import annotations

import collections
import math


class Diverged(RuntimeError):
    """Too many consecutive skipped updates (exit code DIVERGED)."""


class DivergenceGuard:
    def __init__(self, max_consecutive: int, spike_factor: float, spike_window: int):
        self.max_consecutive = max_consecutive
        self.spike_factor = spike_factor
        self.recent = collections.deque(maxlen=spike_window)  # losses of applied steps
        self.consecutive = 0
        self.total = 0  # skipped updates over the whole run, resumed runs included

    def veto(self, loss: float) -> str | None:
        """Why this step's update must not be applied (None: apply it). Called with the
        global-batch loss, which every rank knows, so every rank decides the same."""
        if not math.isfinite(loss):
            return f"non-finite loss {loss}"
        if self.spike_factor and len(self.recent) == self.recent.maxlen:
            mean = sum(self.recent) / len(self.recent)
            if loss > self.spike_factor * mean:
                return f"loss spike: {loss:.4f} > {self.spike_factor:g} × running mean {mean:.4f}"
        return None

    def record(self, loss: float, skipped: bool) -> None:
        if skipped:
            self.consecutive += 1
            self.total += 1
        else:
            self.consecutive = 0
            self.recent.append(loss)

    def halt_message(self, step: int, reason: str) -> str | None:
        """The message to halt with, once the consecutive skips reach the limit."""
        if not self.max_consecutive or self.consecutive < self.max_consecutive:
            return None
        return (f"step {step}: {self.consecutive} consecutive updates skipped (last: {reason}); "
                f"train.max_skipped_steps={self.max_consecutive}, so the run has diverged. The weights are "
                "those of the last applied update. Resume from the last checkpoint with a lower optim.lr, "
                "more optim.warmup_steps or optim.clip_grad")

    def state_dict(self) -> dict:
        return {"recent_losses": list(self.recent), "consecutive_skips": self.consecutive,
                "skipped_steps": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.recent.clear()
        self.recent.extend(float(x) for x in state.get("recent_losses", []))
        self.consecutive = int(state.get("consecutive_skips", 0))
        self.total = int(state.get("skipped_steps", 0))
