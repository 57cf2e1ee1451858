#!/usr/bin/env python
r"""Perplexity of a checkpoint on Megatron indexed datasets (PREFIX.bin/.idx), in any layout.

    python tools/evaluate.py runs/demo/checkpoints --data demo_assets/data/shakespeare_text_document
    torchrun --nproc-per-node 2 tools/evaluate.py CKPT --data PREFIX --split test parallel.tensor=2

CKPT is a checkpoint directory or a save root (its latest checkpoint). The network and the
tokenizer come from the checkpoint's run_config.yaml, so do the sample order (train.seed) and,
for --split train/valid/test, the document split (data.split); ``key=value`` overrides change
any of them (e.g. ``data.split=90,5,5``) and set the layout (``parallel.tensor=2``).

The samples are those of pretraining: Megatron's GPTDataset windows of --seq-length tokens
over the split's documents. Without --num-batches, every window of one pass over the split
is evaluated once (the last global batch is padded with masked samples); with --num-batches N
the first N global batches of the dataset the trainer would build for N evaluation batches, so
the result equals the trainer's eval/loss with train.eval_iters=N and the same batch sizes.
The forward pass is the trainer's own evaluation (Trainer.evaluate_dataset: Megatron's
schedules, forward only). It prints loss, perplexity and tokens, and writes them to --output.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys

# Runnable from a checkout without installing the package.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

# Only light modules here: Megatron-Core is imported after main() has decided what the
# libraries may print (logging.verbose=true shows their warnings; megatron_gpas/console.py).
from megatron_gpas import console  # noqa: E402
from megatron_gpas.checkpoint_paths import CheckpointError  # noqa: E402
from megatron_gpas.config import (ConfigError, config_from_tree, data_parallel_size, load_tree,  # noqa: E402
                                  world_size_from_env)

SPLITS = ("train", "valid", "test", "all")
SPLIT_INDEX = {"train": 0, "valid": 1, "test": 2, "all": 0}  # "all": one split holding every document


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="tools/evaluate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint directory, or a save root (its latest checkpoint)")
    p.add_argument("--data", action="append", required=True, metavar="PREFIX",
                   help="indexed dataset prefix (PREFIX.bin/.idx); repeat for several (their splits are concatenated)")
    p.add_argument("--split", default="valid", choices=SPLITS,
                   help="which split of data.split (default: valid), or all: every document")
    p.add_argument("--seq-length", type=int, help="tokens per sample (default: the checkpoint's train.seq_length)")
    p.add_argument("--num-batches", type=int, help="global batches to evaluate (default: all of the split)")
    p.add_argument("--micro-batch-size", type=int, help="default: the checkpoint's train.micro_batch_size")
    p.add_argument("--global-batch-size", type=int, help="default: micro-batch size × data-parallel size")
    p.add_argument("--output", help="write the result as JSON to this file")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. parallel.tensor=2")
    return p.parse_intermixed_args(argv)


def build_config(args):
    """(config, checkpoint dir): the checkpoint's network and data settings, this evaluation's
    data and batch sizes, the weights loaded through checkpoint.pretrained."""
    from megatron_gpas.evaluation.loading import checkpoint_tree, forward_only_config

    tree, saved, path = checkpoint_tree(args.checkpoint, args.overrides, "evaluate")
    saved_train, saved_data = saved.get("train") or {}, saved.get("data") or {}
    train = tree.setdefault("train", {})
    train.setdefault("seed", saved_train.get("seed", 42))  # GPTDataset's sample order, as in training
    if args.seq_length:
        train["seq_length"] = args.seq_length
    train.setdefault("seq_length", saved_train.get("seq_length"))
    if args.micro_batch_size:
        train["micro_batch_size"] = args.micro_batch_size
    train.setdefault("micro_batch_size", saved_train.get("micro_batch_size", 1))
    dp = data_parallel_size(config_from_tree(tree), world_size_from_env())
    train["global_batch_size"] = args.global_batch_size or train["micro_batch_size"] * max(dp, 1)
    train.update(steps=1, eval_iters=args.num_batches or 1, eval_interval=0, exit_after_steps=0)
    data = tree["data"]
    data.update(paths=list(args.data), weights=None)
    if args.split == "all":
        data["split"] = "1,0,0"
    elif "split" not in data:
        if (saved.get("sft") or {}).get("train_files"):
            raise ConfigError(f"{path} is a fine-tuning checkpoint: its run_config.yaml has no data.split of "
                              f"indexed data; give the split of --data (e.g. data.split=98,1,1) or use --split all")
        data["split"] = saved_data.get("split", "99,1,0")
    return forward_only_config(tree, saved, path, "evaluate"), path


def build_dataset(cfg, split: str, num_batches: int | None, tokenizer, log):
    """(dataset, number of global batches, sequences in it): the GPTDataset of ``split``."""
    from megatron_gpas.data.datasets import (PadToLength, build_datasets, check_data_vocabulary, check_indexed_dataset,
                                             check_split)

    for prefix in cfg.data.paths:
        check_indexed_dataset(prefix)
    check_split(cfg.data.paths, cfg.data.split)
    for warning in check_data_vocabulary(cfg, tokenizer):  # the checkpoint's tokenizer and vocabulary
        if log:
            log(f"[data] warning: {warning}")
    index, gbs = SPLIT_INDEX[split], cfg.train.global_batch_size
    cache_dir = cfg.data.cache_dir  # None: indices built in memory on every rank

    def split_dataset(num_samples):
        datasets = build_datasets(cfg, tokenizer.eod_id, tokenizer.vocab_size, cache_dir,
                                  num_samples=[num_samples if i == index else None for i in range(3)])
        if datasets[index] is None:
            raise ValueError(f"data.split '{cfg.data.split}' gives the {split} split no documents")
        return datasets[index]

    one_pass = split_dataset(None)
    if num_batches is None:
        num_batches = math.ceil(len(one_pass) / gbs)
        return PadToLength(one_pass, num_batches * gbs), num_batches, len(one_pass)
    if num_batches * gbs > len(one_pass) and log:
        log(f"[evaluate] warning: {num_batches} batches × {gbs} = {num_batches * gbs} samples, but one pass over "
            f"the {split} split has {len(one_pass)}: samples repeat")
    return split_dataset(num_batches * gbs), num_batches, num_batches * gbs


def _rank0() -> bool:
    """Rank 0 of the job, known before any process group starts (torchrun or SLURM)."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0


def main(argv=None) -> int:
    args = parse_args(argv)
    log = print if _rank0() else None
    if args.num_batches is not None and args.num_batches < 1:
        print("error: --num-batches must be positive", file=sys.stderr)
        return 2
    try:
        console.configure(config_from_tree(load_tree(None, args.overrides)).logging.verbose)
        cfg, path = build_config(args)
        from megatron_gpas.training import Trainer, load_run_tokenizer  # heavy imports after the config is valid

        dataset, num_batches, sequences = build_dataset(cfg, args.split, args.num_batches, load_run_tokenizer(cfg), log)
        trainer = Trainer(cfg, data_builder=lambda _: (None, dataset))
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if log:
            log(f"[evaluate] {path}: {args.split} split of {', '.join(cfg.data.paths)} (data.split "
                f"{cfg.data.split}), {num_batches} batches × {cfg.train.global_batch_size} sequences of "
                f"{cfg.train.seq_length} tokens")
        loss_sum, tokens = trainer.evaluate_dataset(dataset, num_batches)
        p = cfg.parallel
        result = {
            "checkpoint": os.path.abspath(path),
            "data": [os.path.abspath(prefix) for prefix in cfg.data.paths],
            "split": args.split,
            "data_split": cfg.data.split,
            "seq_length": cfg.train.seq_length,
            "global_batch_size": cfg.train.global_batch_size,
            "num_batches": num_batches,
            "sequences": sequences,
            "tokens": tokens,
            "loss": loss_sum / max(tokens, 1),
            "perplexity": math.exp(min(loss_sum / max(tokens, 1), 700.0)),  # (a loss of 700 is no model)
            "layout": {"tensor": p.tensor, "pipeline": p.pipeline, "virtual_pipeline": p.virtual_pipeline,
                       "data": trainer.dp, "world": trainer.world_size},
        }
        if log:
            log(f"[evaluate] loss {result['loss']:.6f} | perplexity {result['perplexity']:.4f} | "
                f"tokens {tokens:,} ({sequences:,} sequences)")
            if args.output:
                os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
                with open(args.output, "w") as f:
                    json.dump(result, f, indent=2)
                log(f"[evaluate] wrote {args.output}")
    finally:
        trainer.close()
        if _rank0():
            shutil.rmtree(cfg.logging.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
