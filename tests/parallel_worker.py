"""Worker for tests/test_parallel.py: runs several training cases in one (multi-)process job.

    torchrun --nproc-per-node N tests/parallel_worker.py SPEC.json     (or plain python for 1 process)

SPEC.json = {"out": "results_{rank}.json", "cases": [{"name": ..., "kind": ..., ...}, ...]}.
Cases run one after another in the same processes: each builds a Trainer, does its
work and closes it with ``keep_process_group=True`` so the next case reuses the
default (gloo) process group. Every rank writes its own results file; the test compares.

Kinds:
  dataset      write the synthetic indexed dataset at spec["prefix"] (rank 0)
  save_init    build a Trainer and save its (step-0) checkpoint
  train        build a Trainer (resuming per its config) and run ``train()``, recording per
               step: loss, pre-/post-clip norms (``measure_post_clip``) and the gate values α
  expect_error build a Trainer and record the exception it raises
  crash_save   simulate a save that dies mid-way and check what a resume picks up
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from megatron_gpas import checkpoint, distributed  # noqa: E402
from megatron_gpas.config import load_config  # noqa: E402
from megatron_gpas.training import Trainer  # noqa: E402


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _record_steps(trainer: Trainer) -> list[dict]:
    """Wrap trainer.train_step so every step's numbers are captured on every rank."""
    records: list[dict] = []
    original = trainer.train_step

    def train_step(iterator):
        values = original(iterator)
        result = trainer.last_step_result
        alpha, _ = trainer.gate_values()  # collective over PP: every rank runs it
        records.append({
            "step": trainer.step,
            "loss": values["train/loss"],
            "lr": values["train/lr"],
            "grad_norm": result.grad_norm,
            "gate_grad_norm": result.gate_grad_norm,
            "clipped_grad_norm": result.clipped_grad_norm,
            "clipped_gate_grad_norm": result.clipped_gate_grad_norm,
            "updated": result.updated,
            "alpha": [float(a) for a in alpha],
        })
        return values

    trainer.train_step = train_step
    return records


def _sequence_parallel_audit(trainer: Trainer) -> dict:
    """Parameters that are not tensor-parallel must carry sequence_parallel=True under SP."""
    from megatron.core.utils import unwrap_model

    checked, tensor_parallel, offenders = [], [], []
    for i, chunk in enumerate(trainer.model):
        for name, param in unwrap_model(chunk).named_parameters():
            full = f"chunk{i}.{name}"
            if getattr(param, "tensor_model_parallel", False):
                tensor_parallel.append(full)
                continue
            checked.append(full)
            if getattr(param, "sequence_parallel", False) is not True:
                offenders.append(full)
    return {
        "config_sequence_parallel": bool(trainer.model_config.sequence_parallel),
        "checked": checked,
        "tensor_parallel": tensor_parallel,
        "offenders": offenders,
    }


def run_dataset(case: dict) -> dict:
    if _rank() == 0:
        from synthetic import write_synthetic_dataset

        write_synthetic_dataset(case["prefix"], vocab_size=case.get("vocab_size", 256))
    if dist.is_initialized():
        dist.barrier()
    return {"prefix": case["prefix"]}


def run_save_init(case: dict) -> dict:
    trainer = Trainer(load_config(None, case["overrides"]))
    try:
        trainer.save_checkpoint()
        return {"step": trainer.step, "latest": checkpoint.find_latest(trainer.cfg.checkpoint.save)}
    finally:
        trainer.close(keep_process_group=True)


def run_train(case: dict) -> dict:
    trainer = Trainer(load_config(None, case["overrides"]))
    try:
        out: dict = {"start_step": trainer.step, "start_consumed": trainer.consumed_train_samples,
                     "world_size": trainer.world_size, "dp": trainer.dp,
                     "num_microbatches": trainer.num_microbatches}
        if case.get("sp_audit"):
            out["sp_audit"] = _sequence_parallel_audit(trainer)
        trainer.measure_post_clip = True
        out["records"] = _record_steps(trainer)
        summary = trainer.train()
        out["summary"] = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                          for k, v in summary.items()}
        out["end_step"] = trainer.step
        if trainer.rank0:
            out["history"] = trainer.metrics.history
        return out
    finally:
        trainer.close(keep_process_group=True)


def run_expect_error(case: dict) -> dict:
    trainer = None
    try:
        trainer = Trainer(load_config(None, case["overrides"]))
    except Exception as e:  # noqa: BLE001 - the point is to record it
        distributed.shutdown(keep_process_group=True)
        return {"raised": True, "type": type(e).__name__, "message": str(e)}
    trainer.close(keep_process_group=True)
    return {"raised": False}


def run_crash_save(case: dict) -> dict:
    """Resume (at the complete checkpoint's step), then save again with a save that dies
    after writing everything (metadata.json included) but before the rename; plus a junk
    ``.partial`` directory of a later step. Record what find_latest and a resume pick."""
    root = case["root"]
    cfg_overrides = case["overrides"]
    out: dict = {"latest_before": checkpoint.find_latest(root)}
    trainer = Trainer(load_config(None, cfg_overrides))
    try:
        out["resumed_step_before"] = trainer.step
        crash_step = trainer.step + 1
        real_save = checkpoint.dist_checkpointing.save

        def dying_save(state, path, *args, **kwargs):
            real_save(state, path, *args, **kwargs)  # every file written ...
            raise RuntimeError("simulated crash during checkpoint save")  # ... but no rename

        checkpoint.dist_checkpointing.save = dying_save
        try:
            checkpoint.save(trainer.cfg, root, crash_step, trainer.model, trainer.optimizer, trainer.scheduler,
                            {"step": crash_step, "consumed_train_samples": 12345})
            out["save_raised"] = None
        except RuntimeError as e:
            out["save_raised"] = str(e)
        finally:
            checkpoint.dist_checkpointing.save = real_save
        junk = checkpoint.iteration_dir(root, crash_step + 2) + checkpoint.PARTIAL_SUFFIX
        os.makedirs(junk, exist_ok=True)
        with open(os.path.join(junk, "metadata.json"), "w") as f:
            f.write("{ truncated")
        with open(os.path.join(junk, "garbage.distcp"), "wb") as f:
            f.write(os.urandom(64))
        out["crash_partial"] = checkpoint.iteration_dir(root, crash_step) + checkpoint.PARTIAL_SUFFIX
        out["crash_final"] = checkpoint.iteration_dir(root, crash_step)
        out["listing"] = sorted(os.listdir(root))
        with open(os.path.join(root, checkpoint.LATEST)) as f:
            out["latest_file"] = f.read().strip()
        out["latest_after"] = checkpoint.find_latest(root)
    finally:
        trainer.close(keep_process_group=True)
    # A brand-new trainer resumes from the last complete checkpoint, not the crashed one.
    trainer = Trainer(load_config(None, cfg_overrides))
    try:
        out["resumed_step_after"] = trainer.step
        out["resumed_consumed_after"] = trainer.consumed_train_samples
        # retrying the crashed step's save works and replaces the stale .partial
        checkpoint.save(trainer.cfg, root, crash_step, trainer.model, trainer.optimizer, trainer.scheduler,
                        {"step": crash_step, "consumed_train_samples": trainer.consumed_train_samples})
        out["latest_after_retry"] = checkpoint.find_latest(root)
        out["listing_after_retry"] = sorted(os.listdir(root))
    finally:
        trainer.close(keep_process_group=True)
    return out


KINDS = {"dataset": run_dataset, "save_init": run_save_init, "train": run_train,
         "expect_error": run_expect_error, "crash_save": run_crash_save}


def main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rank = _rank()
    results: dict = {"rank": rank, "cases": {}}
    out_path = spec["out"].format(rank=rank)
    try:
        for case in spec["cases"]:
            if rank == 0:
                print(f"[worker] case {case['name']} ({case['kind']})", flush=True)
            results["cases"][case["name"]] = KINDS[case["kind"]](case)
            with open(out_path, "w") as f:  # partial results survive a later failure
                json.dump(results, f)
    except BaseException:
        results["error"] = traceback.format_exc()
        with open(out_path, "w") as f:
            json.dump(results, f)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
