"""File fingerprints shared by the tokenizer records and the evaluation-data checks."""

from __future__ import annotations

import hashlib
import os


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, streamed (hashlib releases the GIL meanwhile)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
