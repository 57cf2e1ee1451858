"""Synthetic indexed datasets for tests: learnable token streams, written with Megatron's builder."""

from __future__ import annotations

from pathlib import Path

from megatron_gpas.data.synthetic import write_synthetic_dataset  # noqa: F401  (the tests import it from here)


def synthetic_run_overrides(ws: Path, log_dir: Path, vocab_size: int = 256) -> list[str]:
    """Overrides for a run on the workspace's synthetic dataset (``ws/data/synthetic``, split 98/1/1,
    the data the parallel tests' thresholds were set on), logging every step to ``log_dir``
    without TensorBoard or plots."""
    return [
        f"data.paths=['{ws / 'data' / 'synthetic'}']", "data.tokenizer.kind='null'",
        f"data.tokenizer.vocab_size={vocab_size}", f"data.cache_dir='{ws / 'data_cache'}'", "data.split='98,1,1'",
        f"logging.dir='{log_dir}'", "logging.interval=1", "logging.tensorboard=false", "logging.plots=false",
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
