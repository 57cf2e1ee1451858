"""Synthetic indexed datasets for tests: learnable token streams, written with Megatron's builder."""

from __future__ import annotations

from pathlib import Path

from megatron_gpas.data.synthetic import write_synthetic_dataset  # noqa: F401  (the tests import it from here)


def synthetic_run_overrides(ws: Path, log_dir: Path, vocab_size: int = 256) -> list[str]:
    """Overrides for a run on the workspace's synthetic dataset (``ws/data/synthetic``, split 98/1/1,
    the data the parallel tests' thresholds were set on), logging every step to ``log_dir``
    without TensorBoard, plots or the per-layer telemetry (tests of those turn them on)."""
    return [
        f"data.paths=['{ws / 'data' / 'synthetic'}']", "data.tokenizer.kind='null'",
        f"data.tokenizer.vocab_size={vocab_size}", f"data.cache_dir='{ws / 'data_cache'}'", "data.split='98,1,1'",
        f"logging.dir='{log_dir}'", "logging.interval=1", "logging.tensorboard=false", "logging.plots=false",
        "logging.layer_telemetry=false",
    ]


def write_integer_tokenizer(path: Path, vocab_size: int) -> str:
    """A Hugging Face tokenizer.json that encodes like the ``null`` tokenizer: whitespace-separated
    integers 0 .. vocab_size-2 are their own ids, ``</s>`` (the end of document) is vocab_size-1.
    For tests that need a tokenizer file (e.g. a checkpoint's tokenizer copy) on the synthetic data."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {str(i): i for i in range(vocab_size - 1)} | {"</s>": vocab_size - 1}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return str(path)


def resumable_run_config(ws: Path, run: str, *extra: str):
    """The config of ``resumable_run_overrides``."""
    from megatron_gpas.config import load_config

    return load_config(None, resumable_run_overrides(ws, run, *extra))


def resumable_run_overrides(ws: Path, run: str, *extra: str) -> list[str]:
    """A 2-layer tiny Pre+GPAS run of 6 steps on the synthetic data, logged every step (TensorBoard
    and the per-layer telemetry on) to ``ws/runs/<run>``, checkpointed into and resumed from ``ws/runs/<run>/ckpt``; ``extra``
    overrides win."""
    run_dir = ws / "runs" / run
    return [
        "model.preset=tiny", "model.num_layers=2", "model.vocab_size=256", "model.make_vocab_size_divisible_by=64",
        "gpas.enabled=true", "train.steps=6", "train.seq_length=32", "train.micro_batch_size=2",
        "train.global_batch_size=4", "train.eval_iters=1", "optim.lr=3.0e-3", "optim.warmup_steps=1",
        *synthetic_run_overrides(ws, run_dir), "logging.tensorboard=true", "logging.layer_telemetry=true",
        f"checkpoint.save='{run_dir / 'ckpt'}'", f"checkpoint.load='{run_dir / 'ckpt'}'",
        "checkpoint.load_if_exists=true", *extra]


def train_in_process(cfg, force: bool = False) -> dict:
    """``Trainer(cfg).train()`` in this process; the trainer's process groups are gone afterwards."""
    import torch.distributed as dist

    from megatron_gpas.training import Trainer

    trainer = Trainer(cfg, force=force)
    try:
        return trainer.train()
    finally:
        trainer.close()
        assert not dist.is_initialized()
