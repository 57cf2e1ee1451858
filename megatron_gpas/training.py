"""The training loop: thin, on Megatron-Core's DDP, schedules, optimizer and checkpoints.

    trainer = Trainer(cfg); trainer.train(); trainer.close()

Each step: forward/backward over all micro-batches with Megatron's schedule for the
layout (no pipelining, 1F1B, or interleaved 1F1B), gradient finalization (DP reduce,
SP all-reduce of replicated params, embedding sync), the GPAS two-stage clip, the
optimizer step (Adam, or Muon + Adam: optim.optimizer) and the LR schedule.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import os
import time
from typing import Callable

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer_param_scheduler import get_canonical_lr_for_logging
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module
from megatron.core.utils import unwrap_model

from megatron_gpas import checkpoint, distributed, exit_codes, run_folder
from megatron_gpas.activation_stats import LayerInputVariance
from megatron_gpas.layer_telemetry import LayerTelemetry
from megatron_gpas.checkpoint_paths import NonFiniteWeightsError, pretrained_checkpoint
from megatron_gpas.config import (Config, ConfigError, config_from_tree, data_parallel_size, padded_vocab_size, save_config,
                                  world_size_from_env)
from megatron_gpas.data.datasets import (
    build_datasets,
    build_loader,
    check_data_vocabulary,
    check_indexed_dataset,
    check_split,
    describe_blend,
)
from megatron_gpas.divergence import Diverged, DivergenceGuard
from megatron_gpas.metrics import MetricsWriter, Stopwatch, format_duration, perplexity
from megatron_gpas.model.builder import build_model_chunks, schedule_config, transformer_config
from megatron_gpas.model.schemes import get_scheme
from megatron_gpas.optim import MUON, StepResult, build_optimizer, clipped_step, gather_routing, lr_schedule, routing_summary
from megatron_gpas.preemption import StopRequest, die_with_launcher, start_checkpoint_writer
from megatron_gpas.tokenizer import tokenizer_from_config
from megatron_gpas.validation import validate

log = logging.getLogger(__name__)


def _loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """(summed loss, count) over this micro-batch's unmasked tokens, plus both for reporting.

    Megatron's schedule turns this into the micro-batch mean (divided by the number of
    micro-batches), or, with ``calculate_per_token_loss``, divides the gradients by the
    global batch's count: every unmasked token then weighs the same.
    """
    mask = loss_mask.reshape(-1).float()
    loss_sum = (per_token_loss.reshape(-1).float() * mask).sum()
    count = mask.sum()
    return loss_sum, count.to(torch.int), {"lm loss": torch.stack([loss_sum.detach(), count])}


def _forward_step(device, data_iterator, model):
    batch = next(data_iterator)
    tokens = batch["tokens"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    position_ids = batch["position_ids"].to(device, non_blocking=True)
    per_token_loss = model(tokens, position_ids, None, labels=labels)
    return per_token_loss, functools.partial(_loss_func, batch["loss_mask"].to(device))


def load_run_tokenizer(cfg: Config):
    """The run's tokenizer (data.tokenizer), checked against the model's vocabulary."""
    tokenizer = tokenizer_from_config(cfg.data.tokenizer.__dict__)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
            f"{cfg.model.vocab_size}: the embedding must cover every token id"
        )
    return tokenizer


def check_before_start(cfg: Config, pretraining_data: bool = True, world_size: int | None = None):
    """Every check of a start that needs no process group (the Trainer runs them first; --dry-run
    runs them alone); returns the run's tokenizer. ``pretraining_data``: the run reads the indexed
    datasets of data.paths (not data a caller supplies)."""
    validate(cfg, world_size, require_data=pretraining_data)
    check_memory(cfg, world_size)
    tokenizer = load_run_tokenizer(cfg)
    if pretraining_data:
        if cfg.sft.train_files:
            raise ConfigError("this config holds fine-tuning data (sft.train_files): run it with "
                              "python -m megatron_gpas.finetune")
        for prefix in cfg.data.paths:
            check_indexed_dataset(prefix)
        check_split(cfg.data.paths, cfg.data.split)
        for warning in check_data_vocabulary(cfg, tokenizer):
            if distributed.launch_rank() == 0:
                print(f"[data] warning: {warning}", flush=True)
    return tokenizer


def check_memory(cfg: Config, world_size: int | None = None) -> str | None:
    """train.memory_check: the planner's per-GPU estimate of this layout against the GPU's memory
    (train.gpu_memory_gib, else the device's; no check on CPU without the key), before the model is
    built. Too little is a ConfigError (error) or a warning on rank 0 (warn); returns the shortfall."""
    from megatron_gpas import planner

    t = cfg.train
    if t.memory_check == "skip":
        return None
    if t.gpu_memory_gib > 0:
        gpu_memory = t.gpu_memory_gib * planner.GIB
    elif torch.cuda.is_available():
        gpu_memory = torch.cuda.get_device_properties(distributed.local_device_index()).total_memory
    else:
        return None
    if planner.usable_bytes(gpu_memory) <= 0:
        raise ConfigError(f"train.memory_check: {gpu_memory / planner.GIB:.2f} GiB of GPU memory leave nothing after the "
                          f"{planner.MARGIN:.0%} margin and the {planner.RESERVE_GIB:g} GiB reserve the planner keeps free")
    if dist.is_initialized():  # the estimate builds the model on stand-in process groups of its own
        return None
    planned = copy.deepcopy(cfg)
    if t.precision == "auto":  # the precision this run will have, which the estimate depends on
        planned.train.precision = "bf16" if torch.cuda.is_available() else "fp32"
    shortfall = planner.memory_shortfall(planned, world_size_from_env() if world_size is None else world_size,
                                         gpu_memory)
    if shortfall is None:
        return None
    if t.memory_check == "error":
        raise ConfigError(f"train.memory_check: {shortfall}. To start anyway, set train.memory_check=warn")
    if distributed.launch_rank() == 0:
        print(f"[warn] train.memory_check: {shortfall}", flush=True)
    return shortfall


def wrap_for_training(cfg: Config, chunks, model_config, *, on_cpu: bool, bf16: bool):
    """(DDP-wrapped chunks on their device, the config DDP and the schedules read): the latter is
    ``model_config`` with the scheme's residual-stream width (pipeline stages exchange that)."""
    model_config = schedule_config(cfg, model_config)
    if not on_cpu:
        chunks = [chunk.cuda(torch.cuda.current_device()) for chunk in chunks]
    if bf16:
        chunks = [Float16Module(model_config, chunk) for chunk in chunks]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        # DDP then all-gathers the updated parameters in forward pre-hooks of the next step, bucket
        # by bucket, instead of in the optimizer step; see params_synced for reads outside a forward
        overlap_param_gather=cfg.parallel.overlap_param_gather,
    )
    wrapped = [DistributedDataParallel(model_config, ddp_config, chunk, disable_bucketing=i > 0)
               for i, chunk in enumerate(chunks)]
    for chunk in wrapped:
        chunk.broadcast_params()
    return wrapped, model_config


def sync_params(model) -> None:
    """Complete the parameter all-gather now (parallel.overlap_param_gather defers it to the next
    forward's pre-hooks, so until then each rank's parameters outside its own shard are stale);
    a no-op without the overlap."""
    for chunk in model:
        if getattr(chunk, "use_forward_hook", False):
            with torch.no_grad():
                chunk.start_param_sync(force_sync=True)


@contextlib.contextmanager
def params_synced(model):
    """Evaluation and checkpoint saves with parallel.overlap_param_gather, as Megatron-LM's training
    loop does them: the forward pre-hooks off and the parameters gathered synchronously first (a save
    would otherwise write stale shards), the hooks back on afterwards."""
    hooked = [chunk for chunk in model if getattr(chunk, "use_forward_hook", False)]
    for chunk in hooked:
        chunk.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for chunk in hooked:
            chunk.enable_forward_pre_hook()


def wire_schedules(cfg: Config, model_config, model, optimizer):
    """Hook gradient finalization, loss scaling and (with overlap) no-sync into the config the
    schedules read; returns Megatron's forward-backward function for the layout."""
    model_config.finalize_model_grads_func = finalize_model_grads
    model_config.grad_scale_func = optimizer.scale_loss
    if cfg.parallel.overlap_grad_reduce:
        no_sync = [chunk.no_sync for chunk in model]
        model_config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    return get_forward_backward_func()


def optimizer_step(cfg: Config, scheme, model, optimizer, step: int, run_schedule: Callable[[], list],
                   measure_post_clip: bool = False, veto: Callable[[list], str | None] | None = None):
    """One training step without the bookkeeping: the scheme's pre-step work, zeroed gradients,
    ``run_schedule()`` (forward and backward over the micro-batches), the two-stage clip, the
    optimizer step and the scheme's post-step work. ``veto(losses)``: a reason not to apply this
    step's update (it must give the same answer on every rank). Returns (the schedule's losses,
    StepResult)."""
    scheme.before_step(model, step, cfg)
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses = run_schedule()
    reason = veto(losses) if veto is not None else None
    if reason is not None:
        return losses, StepResult(False, float("nan"), float("nan"), skip_reason=reason)
    result = clipped_step(optimizer, cfg.optim.clip_grad, cfg.gpas.clip_grad, measure_post_clip=measure_post_clip)
    if result.updated:
        scheme.after_optimizer_step(optimizer, model)
    return losses, result


# (trainer) -> (train dataset, validation dataset or None): datasets the caller supplies
# instead of the indexed-dataset blend of data.paths (fine-tuning, evaluation)
DataBuilder = Callable[["Trainer"], tuple]


class Trainer:
    def __init__(self, cfg: Config, data_builder: DataBuilder | None = None, per_token_loss: bool = False,
                 force: bool = False):
        """``data_builder``: supplies the datasets (samples as GPTDataset's: tokens, labels,
        loss_mask, position_ids); it is called once the process groups exist.
        ``per_token_loss``: weigh every unmasked token of a global batch the same (Megatron's
        calculate_per_token_loss) rather than every micro-batch; for data whose micro-batches
        hold different numbers of loss tokens (fine-tuning).
        ``force``: start even if ``logging.dir`` holds another run's logs (they are deleted)."""
        # the wall-clock budget (train.exit_duration_minutes) counts from here, set-up included
        self.stop = StopRequest(budget_s=cfg.train.exit_duration_minutes * 60)
        # Everything that can be wrong with the request fails here, before process groups.
        self.tokenizer = check_before_start(cfg, pretraining_data=data_builder is None)
        run_folder.check_ownership(cfg, force)

        self.cfg = cfg
        self.data_builder = data_builder
        self.per_token_loss = per_token_loss
        self.force = force
        self.console_log = None
        self.summary: dict | None = None
        die_with_launcher()
        self.stop.install()  # a stop signal during set-up is acted on at the first step boundary
        if cfg.checkpoint.save:
            start_checkpoint_writer()  # a helper process that SLURM's signals must not kill
        try:
            self.device = distributed.init_distributed(cfg)
        except BaseException:
            self.stop.restore()
            raise
        try:
            self._setup()
        except BaseException:
            self.stop.restore()
            if self.console_log is not None:
                self.console_log.close()
            distributed.shutdown(keep_process_group=True)  # Megatron's groups; the caller owns the rest
            raise

    def _setup(self):
        cfg = self.cfg
        self.on_cpu = self.device.type == "cpu"
        self.bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and not self.on_cpu)
        self.world_size = dist.get_world_size()
        self.dp = data_parallel_size(cfg, self.world_size)
        self.num_microbatches = cfg.train.global_batch_size // (cfg.train.micro_batch_size * self.dp)
        self.rank0 = dist.get_rank() == 0

        self.scheme = get_scheme(cfg)
        self.model_config = transformer_config(cfg, bf16=self.bf16, on_cpu=self.on_cpu)
        self.model_config.calculate_per_token_loss = self.per_token_loss  # read by DDP and the schedules
        self.model = self._build_model()
        self.optimizer, self.scheduler = build_optimizer(cfg, self.model, bf16=self.bf16)
        # which tensors Muon and Adam train (gathered over pipeline stages: a collective)
        self.routing = gather_routing(self.model) if cfg.optim.optimizer == MUON else None
        self.activation_stats = LayerInputVariance(self.model, cfg.model.num_layers, cfg.parallel.sequence_parallel,
                                                   self.device)
        self.telemetry = LayerTelemetry(self.model, self.optimizer, self.scheme, cfg.model.num_layers,
                                        cfg.parallel.sequence_parallel, self.device) \
            if cfg.logging.layer_telemetry else None
        self._wire_schedules()

        self.step = 0
        self.consumed_train_samples = 0
        self.divergence = DivergenceGuard(cfg.train.max_skipped_steps, cfg.train.loss_spike_factor,
                                          cfg.train.loss_spike_window)
        self.last_eval_loss: float | None = None
        self.measure_post_clip = False  # re-measure norms after clipping (tests/debugging)
        self.last_step_result = None
        self._saved_step: int | None = None
        self.last_checkpoint: str | None = None
        self._save_seconds = 0.0  # the longest save so far (the wall-clock budget reserves it)
        self._warned_no_valid = False
        self._maybe_resume()
        self._open_run_folder()

        if self.data_builder is not None:
            self.train_ds, self.valid_ds = self.data_builder(self)
        else:
            cache_dir = cfg.data.cache_dir or os.path.join(cfg.logging.dir, "data_cache")
            self.train_ds, self.valid_ds, _ = build_datasets(cfg, self.tokenizer.eod_id, self.tokenizer.vocab_size,
                                                             cache_dir)
        self._log_setup()

    # ------------------------------------------------------------------ setup

    def _build_model(self):
        chunks = build_model_chunks(self.cfg, self.model_config)
        model, self.model_config = wrap_for_training(self.cfg, chunks, self.model_config, on_cpu=self.on_cpu,
                                                     bf16=self.bf16)
        return model

    def _wire_schedules(self):
        self.forward_backward = wire_schedules(self.cfg, self.model_config, self.model, self.optimizer)

    def _maybe_resume(self):
        root, pretrained = self.cfg.checkpoint.load, self.cfg.checkpoint.pretrained
        path = checkpoint.resume_point(self.cfg, root) if root else None  # checked (collective)
        if path is None and pretrained:  # the run has no checkpoint of its own yet
            path = pretrained_checkpoint(pretrained)
            checkpoint.load(self.cfg, path, self.model, self.optimizer, self.scheduler, load_optimizer=False)
            if self.rank0:
                print(f"[checkpoint] initialised weights from checkpoint.pretrained {path}; starting at step 0 "
                      "with a fresh optimizer", flush=True)
            return
        if not root:
            return
        if path is None:
            if self.rank0:
                print(f"[checkpoint] no checkpoint under {root}; starting from scratch", flush=True)
            return
        resume = self.cfg.checkpoint.load_optimizer
        state = checkpoint.load(self.cfg, path, self.model, self.optimizer, self.scheduler, load_optimizer=resume,
                                verified=True)
        if not resume:
            if self.rank0:
                print(f"[checkpoint] initialised weights from {path}; starting at step 0", flush=True)
            return
        self.step = int(state["step"])
        self.consumed_train_samples = int(state["consumed_train_samples"])
        self.divergence.load_state_dict(state)
        self._saved_step = self.step  # that checkpoint exists: a stop right away has nothing to save
        self.last_checkpoint = path
        if self.rank0:
            print(f"[checkpoint] resumed from {path} at step {self.step} "
                  f"({self.consumed_train_samples} samples consumed)", flush=True)
            self._report_schedule_change(path)

    def _report_schedule_change(self, path: str):
        """Say which LR schedule a resumed run follows when this config asks for another one
        than the checkpoint's run did (Megatron would silently keep the checkpoint's)."""
        saved_tree = checkpoint.saved_run_config(path)
        if saved_tree is None:
            return
        try:
            saved = lr_schedule(config_from_tree(saved_tree))
        except ConfigError:
            return
        now = lr_schedule(self.cfg)
        changed = [f"{key} {saved[key]} -> {now[key]}" for key in now if saved[key] != now[key]]
        if not changed:
            return
        if self.cfg.optim.override_schedule:
            print(f"[checkpoint] LR schedule changed ({'; '.join(changed)}): following this config's schedule "
                  "(optim.override_schedule=true)", flush=True)
        else:
            print(f"[warn] this config changes the LR schedule ({'; '.join(changed)}) but a resumed run keeps its "
                  "checkpoint's schedule; set optim.override_schedule=true to follow this config's", flush=True)

    def _open_run_folder(self):
        """Rank 0 takes ``logging.dir`` for this run (run_folder), copies its console into
        train.log, writes the resolved config, and opens the metrics sinks, which continue a
        resumed run's without repeating the steps logged after its checkpoint."""
        cfg = self.cfg
        if self.rank0:
            run_folder.claim(cfg, self.force, self.step)
            self.console_log = run_folder.ConsoleLog(os.path.join(cfg.logging.dir, run_folder.LOG))
            print(f"[run] {time.strftime('%Y-%m-%d %H:%M:%S')} {'resuming at step ' + str(self.step) if self.step else 'starting'}"
                  f" in {os.path.abspath(cfg.logging.dir)}", flush=True)
            save_config(cfg, os.path.join(cfg.logging.dir, run_folder.CONFIG))
        self.metrics = MetricsWriter(cfg, self.world_size, enabled=self.rank0, purge_step=self.step + 1)

    def _log_setup(self):
        if not self.rank0:
            return
        cfg = self.cfg
        n_params = sum(p.numel() for chunk in self.model for p in unwrap_model(chunk).parameters())
        p = cfg.parallel
        print(
            f"[setup] scheme={cfg.norm.scheme} ({self.scheme.summary}) gpas={'on (' + cfg.gpas.activation + ')' if cfg.gpas.enabled else 'off'} "
            f"backend={cfg.model.backend} precision={'bf16' if self.bf16 else 'fp32'} "
            f"device={'cpu (gloo)' if self.on_cpu else torch.cuda.get_device_name()}\n"
            f"[setup] layers={cfg.model.num_layers} hidden={cfg.model.hidden_size} heads={cfg.model.num_attention_heads} "
            f"vocab={padded_vocab_size(cfg.model, p.tensor)} params on rank 0: {n_params / 1e6:.2f}M\n"
            f"[setup] world={self.world_size} TP={p.tensor} PP={p.pipeline} VP={p.virtual_pipeline} DP={self.dp} "
            f"SP={p.sequence_parallel} dist-opt={p.distributed_optimizer} micro-batches/step={self.num_microbatches}\n"
            f"[setup] logs: {os.path.abspath(cfg.logging.dir)}"
            + ("\n[setup] evaluation off (train.eval_iters=0)" if cfg.train.eval_iters == 0 else ""),
            flush=True,
        )
        if self.routing is not None:
            path = os.path.join(cfg.logging.dir, "optimizer_routing.json")
            os.makedirs(cfg.logging.dir, exist_ok=True)
            with open(path, "w") as f:
                json.dump({name: route for name, (route, _) in self.routing.items()}, f, indent=1)
            print(f"{routing_summary(self.routing)}; per tensor: {path}", flush=True)
        if self.data_builder is None:  # pretraining data: the blend as Megatron-Core samples it
            print(describe_blend(cfg), flush=True)

    # ------------------------------------------------------------------ steps

    def _iterators(self, dataset, consumed: int):
        """One micro-batch iterator per model chunk (interleaving reads each chunk's own)."""
        its = [build_loader(dataset, consumed, self.cfg.train.micro_batch_size, self.cfg.data.num_workers)
               for _ in self.model]
        return its if len(its) > 1 else its[0]

    def _run_schedule(self, data_iterator, forward_only: bool):
        return self.forward_backward(
            forward_step_func=functools.partial(_forward_step, self.device),
            data_iterator=data_iterator,
            model=self.model if len(self.model) > 1 else self.model[0],
            num_microbatches=self.num_microbatches,
            seq_length=self.cfg.train.seq_length,
            micro_batch_size=self.cfg.train.micro_batch_size,
            forward_only=forward_only,
        )

    def _loss_totals(self, losses: list[dict]) -> torch.Tensor:
        """(summed loss, unmasked tokens) of a global batch, float64, known on every rank."""
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            for item in losses:
                totals += item["lm loss"].to(torch.float64)
        # Sum over DP (token-weighted) and over PP (only the last stage contributes).
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
        dist.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
        return totals

    def _reduce_loss(self, losses: list[dict]) -> float:
        """Token-weighted mean loss of a global batch, known on every rank."""
        totals = self._loss_totals(losses)
        return float(totals[0] / totals[1].clamp(min=1))

    def train_step(self, data_iterator) -> dict[str, float]:
        """One step with its bookkeeping. A step whose update is skipped (divergence.py) still
        consumes its data; ``Diverged`` once too many skips follow each other."""
        loss = float("nan")

        def veto(losses):  # the global-batch loss, known on every rank, decides before the update
            nonlocal loss
            if self.telemetry is not None:
                self.telemetry.after_backward()  # the reduced gradients, before the clip
            loss = self._reduce_loss(losses)
            return self.divergence.veto(loss)

        if self.telemetry is not None:
            self.telemetry.before_step()

        _, result = optimizer_step(self.cfg, self.scheme, self.model, self.optimizer, self.step,
                                   lambda: self._run_schedule(data_iterator, forward_only=False),
                                   measure_post_clip=self.measure_post_clip, veto=veto)
        self.last_step_result = result
        lr = get_canonical_lr_for_logging(self.optimizer.param_groups)  # optim.lr's groups (Adam's)
        muon_lr = self._muon_lr()
        if result.updated:
            self.scheduler.step(increment=1)
        self.step += 1
        self.consumed_train_samples += self.cfg.train.global_batch_size
        self.divergence.record(loss, skipped=not result.updated)
        values = {"train/loss": loss, "train/lr": lr, "train/grad_norm": result.grad_norm,
                  "train/skipped_steps": self.divergence.total}
        if muon_lr is not None:
            values["train/muon_lr"] = muon_lr
        if self.cfg.gpas.enabled:
            values["train/gate_grad_norm"] = result.gate_grad_norm
        if not result.updated:
            if self.rank0:
                print(f"[warn] step {self.step}: update skipped ({result.skip_reason}); "
                      f"{self.divergence.consecutive} in a row, {self.divergence.total} in this run", flush=True)
            message = self.divergence.halt_message(self.step, result.skip_reason)
            if message is not None:
                self.metrics.scalars(self.step, values)
                raise Diverged(message)
        return values

    def _muon_lr(self) -> float | None:
        """The Muon group's LR this step (its own peak, optim.muon_lr; None without Muon).
        Megatron marks the groups of a non-default LR schedule with default_config=False."""
        if self.cfg.optim.optimizer != MUON:
            return None
        return next((g["lr"] for g in self.optimizer.param_groups if not g.get("default_config", True)), None)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Token-mean loss over the first ``train.eval_iters`` global batches of the validation
        set (fewer if it is shorter); None without validation data or with eval_iters=0."""
        if self.valid_ds is None or self.cfg.train.eval_iters == 0:
            return None
        num_batches = min(self.cfg.train.eval_iters, len(self.valid_ds) // self.cfg.train.global_batch_size)
        totals = self.evaluate_dataset(self.valid_ds, num_batches, interruptible=True)
        if totals is None:
            return None
        loss_sum, tokens = totals
        return loss_sum / max(tokens, 1)

    @torch.no_grad()
    def evaluate_dataset(self, dataset, num_batches: int, interruptible: bool = False) -> tuple[float, int] | None:
        """(summed loss, number of unmasked tokens) over the first ``num_batches`` global batches
        of ``dataset``, forward only, with the training schedule; known on every rank.
        ``interruptible``: a stop signal ends it early (None), so a preempted job saves in time."""
        for chunk in self.model:
            chunk.eval()
        iterator = self._iterators(dataset, 0)
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        interrupted = False
        with params_synced(self.model):
            for _ in range(num_batches):
                if interruptible and self.stop.agreed(self.device):
                    interrupted = True
                    break
                totals += self._loss_totals(self._run_schedule(iterator, forward_only=True))
        for chunk in self.model:
            chunk.train()
        if interrupted:
            if self.rank0:
                print(f"[eval] step {self.step}: interrupted by a stop request; skipped", flush=True)
            return None
        return float(totals[0]), int(totals[1])

    def gate_values(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(α, 1 − act(α)) per global layer ([L, 1], or [L, 2] with one gate per sub-layer),
        gathered over pipeline stages and virtual chunks."""
        if not self.cfg.gpas.enabled:
            return None
        width = 2 if self.cfg.gpas.per_sublayer else 1
        sync_params(self.model)  # the gates this rank does not update are gathered in the next forward
        values = torch.zeros(2, self.cfg.model.num_layers, width, dtype=torch.float64, device=self.device)
        for chunk in self.model:
            for layer in unwrap_model(chunk).decoder.layers:
                values[0, layer.layer_number - 1] = layer.gpas.alpha.detach().double()
                values[1, layer.layer_number - 1] = layer.gpas.scale().double()
        dist.all_reduce(values, group=parallel_state.get_pipeline_model_parallel_group())
        return values[0].cpu(), values[1].cpu()

    # ------------------------------------------------------------------ loop

    def _log_gates(self, values: dict[str, float]) -> None:
        gates = self.gate_values()
        if gates is None:
            return
        suffixes = ("_attn", "_mlp") if self.cfg.gpas.per_sublayer else ("",)
        for l, (alphas, scales) in enumerate(zip(*gates), start=1):
            for suffix, alpha, scale in zip(suffixes, alphas, scales):
                values[f"gpas/alpha/layer_{l}{suffix}"] = float(alpha)
                values[f"gpas/scale/layer_{l}{suffix}"] = float(scale)

    def _eval_and_log(self):
        if self.cfg.train.eval_iters == 0:  # evaluation off (said once, at set-up)
            return
        loss = self.evaluate()
        if loss is None and self.stop.signal is not None:
            return
        if loss is None:
            if self.rank0 and not self._warned_no_valid:
                hint = ("set sft.valid_files or sft.valid_fraction" if self.cfg.sft.train_files
                        else "the data.split gives the validation split no documents")
                print(f"[warn] no validation data ({hint}); evaluation is skipped", flush=True)
            self._warned_no_valid = True
            return
        self.last_eval_loss = loss
        self.metrics.scalars(self.step, {"eval/loss": loss, "eval/ppl": perplexity(loss)})
        if self.rank0:
            print(f"[eval] step {self.step}: loss {loss:.4f} ppl {perplexity(loss):.2f}", flush=True)

    def save_checkpoint(self):
        if self._saved_step == self.step:
            return
        self._saved_step = self.step
        root = self.cfg.checkpoint.save
        watch = Stopwatch()
        try:
            with params_synced(self.model):
                path = checkpoint.save(self.cfg, root, self.step, self.model, self.optimizer, self.scheduler,
                                       {"step": self.step, "consumed_train_samples": self.consumed_train_samples,
                                        **self.divergence.state_dict()})
        except NonFiniteWeightsError as e:
            raise Diverged(f"step {self.step}: {e}; no checkpoint was written") from e
        seconds = watch.lap()
        self._save_seconds = max(self._save_seconds, seconds)
        self.last_checkpoint = path
        if self.rank0:
            print(f"[checkpoint] saved {path} ({seconds:.1f} s)", flush=True)

    def train(self) -> dict:
        """Train to ``train.steps``, or until a stop (signal, wall-clock budget, exit_after_steps).
        The result holds ``exit_code`` (exit_codes) and ``outcome``; ``Diverged`` propagates."""
        cfg, t = self.cfg, self.cfg.train
        self._started = time.perf_counter()
        self._start_step = self.step
        if self.step >= t.steps:
            if self.rank0:
                print(f"[train] already at step {self.step} >= train.steps ({t.steps}); nothing to do", flush=True)
            return self._finish(exit_codes.DONE, "already finished", {})
        iterator = self._iterators(self.train_ds, self.consumed_train_samples)
        tokens_per_step = t.global_batch_size * t.seq_length
        start_step = self.step
        interval_watch = Stopwatch()
        step_watch = Stopwatch()
        longest_step = 0.0
        interval_steps = 0
        self.last_values: dict[str, float] = {}
        for chunk in self.model:
            chunk.train()
        try:
            while self.step < t.steps:
                # every rank agrees here whether to stop (a signal on any rank, or no time left for
                # another step and a save)
                reason = self.stop.agreed(self.device, longest_step, self._expected_save_seconds())
                if reason:
                    return self._stop_early(self.stop.describe(reason))
                step = self.step + 1
                at_end = step == t.steps
                stop_now = bool(t.exit_after_steps) and step - start_step >= t.exit_after_steps
                log_now = step % cfg.logging.interval == 0 or at_end or stop_now or step == start_step + 1
                self.activation_stats.active = log_now  # layer-input variance only on logged steps
                if self.telemetry is not None:
                    self.telemetry.active = log_now
                step_watch.lap()
                values = self.train_step(iterator)
                longest_step = max(longest_step, step_watch.lap())
                self.activation_stats.active = False
                interval_steps += 1
                if log_now:
                    values.update(self.metrics.throughput(tokens_per_step * interval_steps, interval_watch.lap()))
                    interval_steps = 0
                    self._log_gates(values)
                    for l, variance in enumerate(self.activation_stats.collect().tolist(), start=1):
                        values[f"activations/variance/layer_{l}"] = variance
                    if self.telemetry is not None:
                        sync_params(self.model)  # the weights after the step (overlap_param_gather defers them)
                        values.update(self.telemetry.collect())
                        self.telemetry.active = False
                    self.metrics.scalars(self.step, values)
                    self.metrics.console(self.step, t.steps, values, time.perf_counter() - self._started,
                                         self.step - start_step)
                    self.last_values = values
                if t.eval_interval and self.step % t.eval_interval == 0 and not at_end:
                    self._eval_and_log()
                if cfg.checkpoint.save and cfg.checkpoint.save_interval and \
                        self.step % cfg.checkpoint.save_interval == 0 and not at_end:
                    self.save_checkpoint()
                if stop_now and not at_end:
                    if cfg.checkpoint.save:
                        self.save_checkpoint()
                    return self._finish(exit_codes.DONE, f"stopped after train.exit_after_steps={t.exit_after_steps}",
                                        {"stopped_early": True})
            self._eval_and_log()
            if cfg.checkpoint.save and cfg.checkpoint.save_at_end:
                self.save_checkpoint()
        except Diverged as e:
            self._finish(exit_codes.DIVERGED, f"diverged: {e}", {})
            raise
        return self._finish(exit_codes.DONE, "finished", {"eval/loss": self.last_eval_loss})

    def _expected_save_seconds(self) -> float:
        """What the wall-clock budget reserves for the final save: the longest save so far, else
        5 s plus this rank's share of the checkpoint (weights, Adam moments and fp32 master
        copies: 16 bytes a parameter) at 200 MB/s, a conservative shared-filesystem rate."""
        if self._save_seconds:
            return self._save_seconds
        params = sum(p.numel() for chunk in self.model for p in chunk.parameters())
        return 5.0 + 16 * params / 200e6

    def _stop_early(self, why: str) -> dict:
        """Save (if there is progress to keep) and report a stop the job should be requeued for."""
        if not self.cfg.checkpoint.save:
            if self.rank0:
                print("[warn] checkpoint.save is not set: the progress of this run is lost", flush=True)
            return self._finish(exit_codes.FAILED, f"{why}; no checkpoint (checkpoint.save is not set)",
                                {"stopped_early": True})
        if self.step == 0:
            # nothing trained yet: nothing to keep (a step-0 checkpoint has no optimizer state, so
            # the next start could not resume from it); the next start begins where this one did
            if self.rank0:
                print("[checkpoint] stopped before the first step: nothing to save", flush=True)
        else:
            self.save_checkpoint()  # a no-op when this step's checkpoint exists (just saved, or resumed from)
        return self._finish(exit_codes.REQUEUE, why, {"stopped_early": True})

    def _finish(self, exit_code: int, outcome: str, extra: dict) -> dict:
        """The end-of-run summary (console, summary.json) and the result of ``train()``."""
        t = self.cfg.train
        start_step = getattr(self, "_start_step", self.step)
        elapsed = time.perf_counter() - getattr(self, "_started", time.perf_counter())
        values = getattr(self, "last_values", {})
        self._write_plots()  # before the summary, so the exit line is the last one
        self.summary = {
            "outcome": outcome, "exit_code": exit_code, "step": self.step, "train_steps": t.steps,
            "steps_this_run": self.step - start_step,
            "tokens_this_run": (self.step - start_step) * t.global_batch_size * t.seq_length,
            "tokens_total": self.consumed_train_samples * t.seq_length,
            "seconds_this_run": round(elapsed, 3), "seconds_since_start": round(self.stop.elapsed(), 3),
            "train_loss": values.get("train/loss"),
            "eval_loss": self.last_eval_loss, "skipped_steps": self.divergence.total,
            "checkpoint": self.last_checkpoint, "logs": os.path.abspath(self.cfg.logging.dir),
        }
        if self.rank0:
            s = self.summary
            losses = f"train loss {s['train_loss']:.4f}" if s["train_loss"] is not None else "no train loss logged"
            if s["eval_loss"] is not None:
                losses += f", eval loss {s['eval_loss']:.4f}"
            print(f"[summary] {s['steps_this_run']} steps ({s['tokens_this_run']:,} tokens) in "
                  f"{format_duration(elapsed)}; at step {self.step}/{t.steps}, {s['tokens_total']:,} tokens in all; "
                  f"{losses}; {s['skipped_steps']} skipped updates\n"
                  f"[summary] checkpoint: {s['checkpoint'] or 'none'}; logs: {s['logs']}", flush=True)
            with open(os.path.join(self.cfg.logging.dir, run_folder.SUMMARY), "w") as f:
                json.dump(self.summary, f, indent=1)
            meaning = {exit_codes.DONE: "done", exit_codes.REQUEUE: "requeue: run the same command to continue",
                       exit_codes.DIVERGED: "diverged", exit_codes.FAILED: "failed"}[exit_code]
            print(f"[exit] {outcome} at step {self.step}/{t.steps}; exit code {exit_code} ({meaning})", flush=True)
        return {"step": self.step, "exit_code": exit_code, "outcome": outcome, **values, **extra}

    def _write_plots(self):
        """Flush the metrics and draw the run's PNGs (once)."""
        if self.metrics.closed:
            return
        self.metrics.close()
        if self.rank0 and self.cfg.logging.plots and self.metrics.history:
            from megatron_gpas.plots import plot_run

            for path in plot_run(self.cfg.logging.dir):
                print(f"[plots] wrote {path}", flush=True)

    def close(self, keep_process_group: bool = False):
        """Flush logs, write the PNGs, and tear down Megatron's groups (and the default
        process group unless ``keep_process_group``, so a test can build another Trainer)."""
        self.stop.restore()
        self._write_plots()
        if self.console_log is not None:
            self.console_log.close()
        distributed.shutdown(keep_process_group=keep_process_group)
