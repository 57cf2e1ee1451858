"""Progress reporting: console lines, TensorBoard scalars, metrics.jsonl, MFU.

Only global rank 0 writes; every value it writes has already been reduced over the
whole job (loss over DP, gates gathered over PP/VP), so tags and values are the same
whatever the TP/PP layout.

TensorBoard tags: train/loss, train/lr, train/muon_lr (optim.optimizer=muon), train/grad_norm, train/gate_grad_norm,
train/skipped_steps (updates skipped so far, divergence.py),
eval/loss, eval/ppl, perf/tokens_per_s, gpas/alpha/layer_{l}, gpas/scale/layer_{l}
(l = global 1-based layer number, scale = 1 − act(α)), activations/variance/layer_{l},
and the per-layer telemetry's layers/* and scales/* (layer_telemetry.py).
"""

from __future__ import annotations

import json
import math
import os
import time

import torch

from megatron_gpas.config import Config, config_yaml, head_dim

# Dense BF16 peak per GPU (TFLOP/s) used for MFU; FP8 runs still report against BF16 peak.
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "H20": 148.0, "A100": 312.0, "A800": 312.0,
                    "L40S": 362.0, "B200": 2250.0, "GB200": 2500.0}


def flops_per_token(cfg: Config) -> float:
    """Megatron's training FLOPs per token (targets.md): causal attention counted once,
    6·[L·(h·(q+k+v) + q·s + q·h + 3·h·ffn) + h·V] with q/k/v the projection widths."""
    m = cfg.model
    d = head_dim(m)
    q = m.num_attention_heads * d
    kv = (m.num_query_groups or m.num_attention_heads) * d
    h, s = m.hidden_size, cfg.train.seq_length
    per_layer = h * (q + 2 * kv) + q * s + q * h + 3 * h * m.ffn_hidden_size
    return 6.0 * (m.num_layers * per_layer + h * m.vocab_size)


def peak_flops_per_gpu() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in sorted(PEAK_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if key in name:
            return tflops * 1e12
    return None


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsWriter:
    """Rank-0 sink for scalars: TensorBoard + JSONL (+ Weights & Biases with ``logging.wandb``);
    console lines with throughput/MFU/ETA."""

    def __init__(self, cfg: Config, world_size: int, enabled: bool, purge_step: int | None = None):
        """``purge_step``: the first step this process logs when it resumes a run; TensorBoard then
        drops the events the interrupted run wrote from that step on (run_folder truncates
        metrics.jsonl the same way)."""
        self.cfg = cfg
        self.closed = False
        self.enabled = enabled
        self.world_size = world_size
        self.tb = None
        self.jsonl = None
        self.wandb = None
        self.history: list[dict] = []
        self.flops_per_token = flops_per_token(cfg)
        self.peak = peak_flops_per_gpu()
        if not enabled:
            return
        os.makedirs(cfg.logging.dir, exist_ok=True)
        self.jsonl = open(os.path.join(cfg.logging.dir, "metrics.jsonl"), "a")
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=cfg.logging.dir, purge_step=purge_step)
            self.tb.add_text("config", "```yaml\n" + config_yaml(cfg) + "```", global_step=purge_step or 0)
        if cfg.logging.wandb.enabled:
            from megatron_gpas.wandb_logging import WandbRun

            self.wandb = WandbRun(cfg, resumed=(purge_step or 1) > 1)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: float(v) for k, v in values.items()}}
        self.history.append(record)
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for tag, value in values.items():
                self.tb.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log(step, {k: v for k, v in record.items() if k != "step"})

    def throughput(self, tokens: int, seconds: float) -> dict[str, float]:
        tokens_per_s = tokens / max(seconds, 1e-9)
        out = {"perf/tokens_per_s": tokens_per_s}
        if self.peak is not None:
            achieved = tokens_per_s * self.flops_per_token / self.world_size
            out["perf/mfu"] = achieved / self.peak
        return out

    def console(self, step: int, total_steps: int, values: dict[str, float], elapsed: float, done_steps: int):
        if not self.enabled:
            return
        eta = elapsed / max(done_steps, 1) * (total_steps - step)
        parts = [f"step {step:>6d}/{total_steps}", f"loss {values['train/loss']:.4f}",
                 f"lr {values['train/lr']:.3e}", f"grad_norm {values['train/grad_norm']:.3f}"]
        if "train/gate_grad_norm" in values:
            parts.append(f"gate_grad_norm {values['train/gate_grad_norm']:.2e}")
        if values.get("train/skipped_steps"):
            parts.append(f"skipped {int(values['train/skipped_steps'])}")
        parts.append(f"tok/s {values['perf/tokens_per_s']:,.0f}")
        if "perf/mfu" in values:
            parts.append(f"MFU {100 * values['perf/mfu']:.1f}% (Megatron formula, BF16 peak)")
        parts.append(f"ETA {format_duration(eta)}")
        print(" | ".join(parts), flush=True)

    def close(self):
        self.closed = True
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.close()
        if self.jsonl is not None:
            self.jsonl.close()


class Stopwatch:
    def __init__(self):
        self.start = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self.start = now - self.start, now
        return elapsed


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
