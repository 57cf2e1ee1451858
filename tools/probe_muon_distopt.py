"""Probe Megatron-Core 0.19.2's ways of combining Muon with a distributed optimizer, on CPU.

The evidence behind refusing ``optim.optimizer=muon`` with ``parallel.distributed_optimizer=true``
(docs/muon.md). Run the 1-process reference and each variant with 2 processes (DP=2):

    python tools/probe_muon_distopt.py reference
    torchrun --nproc-per-node 2 tools/probe_muon_distopt.py plain
    torchrun --nproc-per-node 2 tools/probe_muon_distopt.py layerwise
    torchrun --nproc-per-node 2 tools/probe_muon_distopt.py layerwise_layout
    torchrun --nproc-per-node 2 tools/probe_muon_distopt.py layerwise_layout --force-wrap [--resume]

Variants (each bypasses our validation, which refuses all of them):
  plain             OptimizerConfig(use_distributed_optimizer=True) and DDP with the distributed
                    optimizer: Megatron's emerging-optimizer path without the layer-wise flag;
  layerwise         use_layer_wise_distributed_optimizer=True with an all-reduce DDP: what
                    Megatron-LM's arguments.py makes of ``--optimizer muon --use-distributed-optimizer``;
  layerwise_layout  the same flag plus LayerWise's shard-aligned DDP buffers
                    (tag_params_for_buffer_routing + compute_full_param_layout, reduce-scatter);
  --force-wrap      OptimizerConfig(bf16=True) over the fp32 model, only so that LayerWise wraps
                    its torch optimizers in Megatron optimizers as it does in BF16 runs;
  --resume          train 2 steps and save, then resume in a new Trainer (optimizer state included).
Prints the per-step (loss, grad norm) of rank 0, or the error.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def _patch(variant: str, force_wrap: bool) -> None:
    import megatron_gpas.optim as optim
    from megatron_gpas import training

    optim.validate_optimizer = lambda cfg: None  # config.validate imports it from the module
    make_config = optim.OptimizerConfig

    def optimizer_config(**kwargs):
        if variant.startswith("layerwise"):
            kwargs["use_layer_wise_distributed_optimizer"] = True
            kwargs["use_distributed_optimizer"] = variant == "layerwise_layout"
        if force_wrap:
            kwargs["bf16"] = True  # Float16OptimizerWithFloat16Params keeps fp32 params as they are
        return make_config(**kwargs)

    optim.OptimizerConfig = optimizer_config
    if variant != "layerwise_layout":
        return
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer.layer_wise_optimizer import (LayerWiseDistributedOptimizer,
                                                              tag_params_for_buffer_routing)
    from megatron_gpas.model.builder import build_model_chunks

    def build_model(self):
        chunks = build_model_chunks(self.cfg, self.model_config)
        tag_params_for_buffer_routing(chunks)
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
        wrapped = []
        for chunk in chunks:
            layout = LayerWiseDistributedOptimizer.compute_full_param_layout(
                [p for p in chunk.parameters() if p.requires_grad], None,
                parallel_state.get_data_parallel_world_size(), ddp_config)
            wrapped.append(DistributedDataParallel(self.model_config, ddp_config, chunk, disable_bucketing=True,
                                                   full_param_layout=layout))
        for chunk in wrapped:
            chunk.broadcast_params()
        return wrapped

    training.Trainer._build_model = build_model


def _train(overrides: list[str]) -> list:
    from megatron_gpas.config import load_config
    from megatron_gpas.training import Trainer

    trainer = Trainer(load_config(None, overrides))
    steps = []
    real_step = trainer.train_step

    def train_step(iterator):
        values = real_step(iterator)
        steps.append((trainer.step, values["train/loss"], values["train/grad_norm"]))
        return values

    trainer.train_step = train_step
    try:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"optimizer: {type(trainer.optimizer).__name__} "
                  f"{[type(o).__name__ for o in getattr(trainer.optimizer, 'chained_optimizers', [])]}", flush=True)
        trainer.train()
    finally:
        trainer.close(keep_process_group=True)
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", choices=["reference", "plain", "layerwise", "layerwise_layout"])
    parser.add_argument("--force-wrap", action="store_true")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "probe_muon_distopt"))
    args = parser.parse_args()

    from synthetic import synthetic_run_overrides, write_synthetic_dataset

    ws = Path(args.workdir)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if rank0 and not (ws / "data" / "synthetic.idx").exists():
        (ws / "data").mkdir(parents=True, exist_ok=True)
        write_synthetic_dataset(str(ws / "data" / "synthetic"))
    if args.variant != "reference":
        _patch(args.variant, args.force_wrap)
    import torch.distributed as dist

    from megatron_gpas import distributed

    name = f"{args.variant}{'_wrap' if args.force_wrap else ''}"
    base = ["model.preset=tiny", "model.vocab_size=256", "model.make_vocab_size_divisible_by=64", "gpas.enabled=true",
            "train.steps=4", "train.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=4",
            "optim.optimizer=muon", "optim.lr=1e-3", "optim.muon_matmul_precision=highest", "optim.clip_grad=0.5",
            *synthetic_run_overrides(ws, ws / "runs" / name)]
    if args.variant == "plain":
        base.append("parallel.distributed_optimizer=true")  # DDP reduce-scatters; the optimizer config follows
    try:
        if args.resume:
            root = ws / f"ckpt_{name}"
            steps = _train([*base, "train.exit_after_steps=2", f"checkpoint.save='{root}'"])
            steps += _train([*base, f"checkpoint.load='{root}'"])
        else:
            steps = _train(base)
        if rank0:
            print(f"{name}: (step, loss, grad norm) = {steps}", flush=True)
    except Exception:  # noqa: BLE001 - the error is the result
        if rank0:
            print(f"{name}: FAILED\n{traceback.format_exc()}", flush=True)
    finally:
        distributed.shutdown(keep_process_group=True)
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
