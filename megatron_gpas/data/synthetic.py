"""A learnable synthetic token stream as an indexed dataset (Megatron's builder).

Used where no corpus is at hand: the tests, and ``tools/gpu_check.py`` on a GPU host that has no
data and no network. Documents are a noisy periodic pattern of random tokens, so a model's loss
falls quickly from ln(vocab) and a scheme that fails to learn shows at once.
"""

from __future__ import annotations

import numpy as np
import torch

from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder


def write_synthetic_dataset(prefix: str, vocab_size: int = 256, num_docs: int = 200, doc_len: int = 300,
                            seed: int = 0) -> str:
    """Documents of a noisy periodic token pattern (so a model can learn it), EOD = vocab_size-1."""
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(vocab_size))
    for _ in range(num_docs):
        period = int(rng.integers(3, 9))
        base = rng.integers(0, vocab_size - 1, size=period)
        doc = np.resize(base, doc_len)
        noise = rng.random(doc_len) < 0.1
        doc[noise] = rng.integers(0, vocab_size - 1, size=int(noise.sum()))
        builder.add_document(torch.from_numpy(np.append(doc, vocab_size - 1).astype(np.int64)), [doc_len + 1])
    builder.finalize(prefix + ".idx")
    return prefix


def write_markov_dataset(prefix: str, vocab_size: int = 512, num_docs: int = 200, doc_len: int = 300,
                         successors: int = 4, seed: int = 0) -> str:
    """Documents from one fixed first-order Markov chain: every token has ``successors`` equally likely
    next tokens. The chain is shared by all documents, so even a tiny model learns it within a few
    steps (the loss falls from ln(vocab) towards ln(successors)): a quick check that a model learns."""
    rng = np.random.default_rng(seed)
    table = rng.integers(0, vocab_size - 1, size=(vocab_size - 1, successors))
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(vocab_size))
    for _ in range(num_docs):
        doc = np.empty(doc_len + 1, dtype=np.int64)
        doc[0] = rng.integers(0, vocab_size - 1)
        choices = rng.integers(0, successors, size=doc_len)
        for i in range(1, doc_len):
            doc[i] = table[doc[i - 1], choices[i]]
        doc[doc_len] = vocab_size - 1  # EOD
        builder.add_document(torch.from_numpy(doc), [doc_len + 1])
    builder.finalize(prefix + ".idx")
    return prefix
