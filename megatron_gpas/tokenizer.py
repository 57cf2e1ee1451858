"""One tokenizer interface shared by data preprocessing and training.

Tokenizers are loaded from local files only; nothing here touches the network.

    tok = load_tokenizer("auto", "demo_assets/tokenizer.model")
    ids = tok.encode("To be, or not to be")      # no BOS/EOS added
    text = tok.decode(ids)
    tok.vocab_size, tok.eod_id                    # eod_id: the tokenizer's EOS

Kinds:
  sentencepiece  a SentencePiece ``.model`` file (Llama/Mistral style)
  huggingface    a Hugging Face ``tokenizer.json`` file (the ``tokenizers`` library)
  null           integers separated by whitespace, for tests; needs ``vocab_size``
  auto           picks sentencepiece or huggingface from the file suffix

The training config carries the same information as ``data.tokenizer``:

    data:
      tokenizer: {kind: sentencepiece, path: demo_assets/tokenizer.model}

Tokenizer objects pickle by their constructor arguments (the file is re-read in the
receiving process), so they can be handed to multiprocessing workers.
"""

from __future__ import annotations

import os
from pathlib import Path

# Special tokens that mean "end of text" in common tokenizer.json files, in the order
# they are tried when no eod_token is given.
HF_EOD_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")

TOKENIZER_KINDS = ("sentencepiece", "huggingface", "null", "auto")

# Keys accepted in the config section data.tokenizer.
CONFIG_KEYS = ("kind", "path", "vocab_size", "eod_token")


class Tokenizer:
    """What the rest of the stack needs from a tokenizer."""

    name: str = "tokenizer"

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS or EOS."""
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        """Number of token ids (every id is in ``[0, vocab_size)``)."""
        raise NotImplementedError

    @property
    def eod_id(self) -> int:
        """Id appended after each document: the tokenizer's end-of-sequence token."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, eod_id={self.eod_id})"


class _FileTokenizer(Tokenizer):
    """A tokenizer loaded from one local file; pickles by path (so worker processes reload it)."""

    path: str
    eod_token: str | None
    _eod_id: int

    @property
    def eod_id(self) -> int:
        return self._eod_id

    def __reduce__(self):
        return (type(self), (self.path, self.eod_token))


class SentencePieceTokenizer(_FileTokenizer):
    """A SentencePiece ``.model`` file, e.g. the 32k Llama/Mistral tokenizer."""

    def __init__(self, path: str | os.PathLike, eod_token: str | None = None):
        import sentencepiece

        self.path = str(path)
        self.eod_token = eod_token
        _require_file(self.path, "sentencepiece")
        self.sp = sentencepiece.SentencePieceProcessor(model_file=self.path)
        self.name = f"sentencepiece:{Path(self.path).name}"

        if eod_token is not None:
            eod = self.sp.piece_to_id(eod_token)
            if eod == self.sp.unk_id() and eod_token != self.sp.id_to_piece(eod):
                raise ValueError(f"eod_token {eod_token!r} is not in the vocabulary of {self.path}")
        else:
            eod = self.sp.eos_id()
            if eod < 0:
                raise ValueError(
                    f"SentencePiece model {self.path} defines no EOS token; "
                    "pass eod_token (config: data.tokenizer.eod_token) to name one"
                )
        self._eod_id = int(eod)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()


class HFTokenizer(_FileTokenizer):
    """A Hugging Face ``tokenizer.json`` file, loaded with the ``tokenizers`` library."""

    def __init__(self, path: str | os.PathLike, eod_token: str | None = None):
        import tokenizers

        self.path = str(path)
        self.eod_token = eod_token
        _require_file(self.path, "huggingface")
        self.tok = tokenizers.Tokenizer.from_file(self.path)
        self.name = f"huggingface:{Path(self.path).name}"

        candidates = (eod_token,) if eod_token is not None else HF_EOD_CANDIDATES
        found = [(t, i) for t in candidates if (i := self.tok.token_to_id(t)) is not None]
        if not found:
            if eod_token is not None:
                raise ValueError(f"eod_token {eod_token!r} is not in the vocabulary of {self.path}")
            raise ValueError(
                f"no end-of-document token found in {self.path} (tried {', '.join(HF_EOD_CANDIDATES)}); "
                "pass eod_token (config: data.tokenizer.eod_token, CLI: --eod-token) to name one"
            )
        self.eod_token_text, self._eod_id = found[0]

        # Added tokens may sit above the base vocabulary, so size the vocabulary by the
        # largest id rather than by the number of entries.
        self._vocab_size = max(self.tok.get_vocab(with_added_tokens=True).values()) + 1

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=False: no post-processor BOS/EOS; EOD is appended by the caller.
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        # Keep special tokens: when inspecting training data we want to see them.
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size


class NullTokenizer(Tokenizer):
    """Text is whitespace-separated integer ids ("5 17 3"); EOD is ``vocab_size - 1``."""

    def __init__(self, vocab_size: int):
        if int(vocab_size) < 2:
            raise ValueError(f"NullTokenizer needs vocab_size >= 2, got {vocab_size}")
        self._vocab_size = int(vocab_size)
        self.name = f"null:{self._vocab_size}"

    def encode(self, text: str) -> list[int]:
        ids = [int(tok) for tok in text.split()]
        bad = [i for i in ids if not 0 <= i < self._vocab_size]
        if bad:
            raise ValueError(f"NullTokenizer: ids {bad[:5]} outside [0, {self._vocab_size})")
        return ids

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod_id(self) -> int:
        return self._vocab_size - 1

    def __reduce__(self):
        return (type(self), (self._vocab_size,))


def _require_file(path: str, kind: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{kind} tokenizer file not found: {path!r}")


def _auto_kind(path: str) -> tuple[str, str]:
    """(kind, file) for a tokenizer file, or a directory holding tokenizer.model/.json."""
    if os.path.isdir(path):
        for name, kind in (("tokenizer.model", "sentencepiece"), ("tokenizer.json", "huggingface")):
            if os.path.isfile(os.path.join(path, name)):
                return kind, os.path.join(path, name)
        raise FileNotFoundError(f"no tokenizer.model or tokenizer.json in directory {path!r}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer file not found: {path!r}")
    if path.endswith(".model"):
        return "sentencepiece", path
    if path.endswith(".json"):
        return "huggingface", path
    raise ValueError(
        f"cannot tell the tokenizer kind of {path!r} from its suffix "
        "(.model = sentencepiece, .json = huggingface); give the kind explicitly"
    )


def load_tokenizer(kind: str, path: str | os.PathLike | None = None, **opts) -> Tokenizer:
    """Build a tokenizer from a local file.

    ``opts``: ``eod_token`` (sentencepiece/huggingface) or ``vocab_size`` (null).
    """
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; valid kinds: {', '.join(TOKENIZER_KINDS)}")
    if kind == "null":
        if opts.get("vocab_size") is None:
            raise ValueError("tokenizer kind 'null' needs vocab_size")
        return NullTokenizer(**opts)

    if path is None:
        raise ValueError(f"tokenizer kind {kind!r} needs a path")
    path = os.path.expanduser(os.fspath(path))
    if kind == "auto":
        kind, path = _auto_kind(path)
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path, **opts)
    return HFTokenizer(path, **opts)


def tokenizer_from_config(d: dict) -> Tokenizer:
    """Build the tokenizer described by the config section ``data.tokenizer``.

    ``{kind: auto|sentencepiece|huggingface|null, path: FILE, vocab_size: N (null only),
    eod_token: TOKEN (optional)}``
    """
    unknown = sorted(set(d) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"unknown keys in data.tokenizer: {unknown}; allowed: {list(CONFIG_KEYS)}")
    kind = d.get("kind", "auto")
    opts = {}
    if kind == "null":
        opts["vocab_size"] = d.get("vocab_size")
    elif d.get("eod_token") is not None:
        opts["eod_token"] = d["eod_token"]
    return load_tokenizer(kind, d.get("path"), **opts)
