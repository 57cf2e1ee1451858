"""One tokenizer interface shared by data preprocessing and training.

Tokenizers are loaded from local files only; nothing here touches the network.

    tok = load_tokenizer("auto", "demo_assets/tokenizer.model")
    ids = tok.encode("To be, or not to be")      # no BOS/EOS added
    text = tok.decode(ids)
    tok.vocab_size, tok.eod_id                    # eod_id: the tokenizer's end-of-document id

Kinds:
  sentencepiece  a SentencePiece ``.model`` file (Llama-2/Mistral style)
  huggingface    a Hugging Face ``tokenizer.json`` file (the ``tokenizers`` library)
  gpt2           GPT-2 byte-level BPE: ``vocab.json`` + ``merges.txt`` (or OpenAI's
                 ``encoder.json`` + ``vocab.bpe``); ``path`` is the vocabulary file or the
                 directory holding both, ``merges_path`` names the merges file explicitly
  tiktoken       a tiktoken rank file (``*.tiktoken``, or Llama-3's ``tokenizer.model``):
                 one "base64(token) rank" per line. ``pattern`` is the pre-tokenizer regex:
                 ``cl100k`` (default), ``o200k``, ``gpt2``, or a regex of your own. Ids are
                 the ranks; the end-of-document token ``<|endoftext|>`` gets the id after
                 the largest rank
  null           integers separated by whitespace, for tests; needs ``vocab_size``
  auto           picks the kind from the file (see ``detect_kind``)

The training config carries the same information as ``data.tokenizer``:

    data:
      tokenizer: {kind: sentencepiece, path: demo_assets/tokenizer.model}

Tokenizer objects pickle by their constructor arguments (the files are re-read in the
receiving process), so they can be handed to multiprocessing workers.
"""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path

from megatron_gpas.hashing import sha256_of

# Special tokens that mean "end of text", in the order they are tried when no eod_token
# is given (tokenizer.json and GPT-2 vocabularies).
HF_EOD_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")

TIKTOKEN_EOD_TOKEN = "<|endoftext|>"

# Pre-tokenizer regexes of OpenAI's encodings, as in tiktoken_ext/openai_public.py (copied:
# the functions there that hold them download their rank files).
TIKTOKEN_PATTERNS = {
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
    "cl100k": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
    "o200k": "|".join([
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]),
}
DEFAULT_TIKTOKEN_PATTERN = "cl100k"

# GPT-2 vocabulary/merges file pairs, as Hugging Face and OpenAI name them.
GPT2_FILE_PAIRS = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))

TOKENIZER_KINDS = ("sentencepiece", "huggingface", "gpt2", "tiktoken", "null", "auto")

# Keys accepted in the config section data.tokenizer.
CONFIG_KEYS = ("kind", "path", "vocab_size", "eod_token", "merges_path", "pattern")


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

    def config(self) -> dict:
        """The ``data.tokenizer`` config section that rebuilds this tokenizer."""
        raise NotImplementedError

    def describe(self) -> dict:
        """Identity for reports and fingerprints: config, sizes, and a hash of every file."""
        cfg = self.config()
        for key in ("path", "merges_path"):
            if cfg.get(key):
                cfg[key] = os.path.abspath(cfg[key])
        return {
            "name": self.name,
            "vocab_size": self.vocab_size,
            "eod_id": self.eod_id,
            "config": cfg,
            "sha256": [sha256_of(cfg[key]) for key in ("path", "merges_path") if cfg.get(key)],
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, eod_id={self.eod_id})"


def tokenizer_identity(desc: dict) -> dict:
    """What makes two tokenizers the same, from ``Tokenizer.describe()``: kind and options, the
    hashes of the files, vocabulary size and end-of-document id; not where the files are."""
    identity = {k: v for k, v in desc["config"].items() if k not in ("path", "merges_path")}
    identity.update(sha256=desc["sha256"], vocab_size=desc["vocab_size"], eod_id=desc["eod_id"])
    return identity


def describe_briefly(desc: dict) -> str:
    """A ``describe()`` in a few words, for messages: name, file, vocabulary and end-of-document id."""
    where = desc["config"].get("path")
    return (f"{desc['name']}{f' ({where})' if where else ''}, vocabulary {desc['vocab_size']}, "
            f"end-of-document id {desc['eod_id']}")


class _FileTokenizer(Tokenizer):
    """A tokenizer loaded from local files; pickles by its constructor arguments."""

    kind: str
    path: str
    eod_token: str | None  # as given (None: the tokenizer's own)
    eod_token_text: str  # the end-of-document token actually used
    _eod_id: int

    @property
    def eod_id(self) -> int:
        return self._eod_id

    def _options(self) -> dict:
        """Constructor keyword arguments besides ``path`` (also the config keys)."""
        return {"eod_token": self.eod_token}

    def config(self) -> dict:
        opts = {k: v for k, v in self._options().items() if v is not None}
        return {"kind": self.kind, "path": self.path, **opts}

    def __reduce__(self):
        return (_rebuild, (type(self), self.path, self._options()))


def _rebuild(cls, path, options):
    return cls(path, **options)


class SentencePieceTokenizer(_FileTokenizer):
    """A SentencePiece ``.model`` file, e.g. the 32k Llama/Mistral tokenizer."""

    kind = "sentencepiece"

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
        self.eod_token_text = self.sp.id_to_piece(self._eod_id)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()


class _TokenizersLibTokenizer(_FileTokenizer):
    """Shared by the kinds that run on the Hugging Face ``tokenizers`` library."""

    def _setup(self, tok, eod_token: str | None) -> None:
        self.tok = tok
        self.eod_token = eod_token
        candidates = (eod_token,) if eod_token is not None else HF_EOD_CANDIDATES
        found = [(t, i) for t in candidates if (i := tok.token_to_id(t)) is not None]
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
        self._vocab_size = max(tok.get_vocab(with_added_tokens=True).values()) + 1

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=False: no post-processor BOS/EOS; EOD is appended by the caller.
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        # Keep special tokens: when inspecting training data we want to see them.
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size


class HFTokenizer(_TokenizersLibTokenizer):
    """A Hugging Face ``tokenizer.json`` file, loaded with the ``tokenizers`` library."""

    kind = "huggingface"

    def __init__(self, path: str | os.PathLike, eod_token: str | None = None):
        import tokenizers

        self.path = str(path)
        _require_file(self.path, "huggingface")
        self.name = f"huggingface:{Path(self.path).name}"
        self._setup(tokenizers.Tokenizer.from_file(self.path), eod_token)


class GPT2BPETokenizer(_TokenizersLibTokenizer):
    """GPT-2 byte-level BPE from a vocabulary file and a merges file.

    Runs on the ``tokenizers`` library with GPT-2's own pipeline: its pre-tokenizer regex
    on the byte-level alphabet, BPE by merge rank, byte-level decoding. Special-token
    strings in the text (``<|endoftext|>``) are ordinary text, as in GPT-2.
    """

    kind = "gpt2"

    def __init__(self, path: str | os.PathLike, merges_path: str | os.PathLike | None = None,
                 eod_token: str | None = None):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        self.path, self.merges_path = _gpt2_files(str(path), None if merges_path is None else str(merges_path))
        self.name = f"gpt2:{Path(self.path).name}"
        tok = Tokenizer(models.BPE.from_file(self.path, self.merges_path))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        self._setup(tok, eod_token)

    def _options(self) -> dict:
        return {"merges_path": self.merges_path, "eod_token": self.eod_token}


class TiktokenTokenizer(_FileTokenizer):
    """A tiktoken rank file, run by ``tiktoken.Encoding`` (no download, no cache directory).

    The file is parsed here rather than with ``tiktoken.load.load_tiktoken_bpe``, which
    copies every file it reads into a cache keyed by its path and would serve the stale
    copy after the file changed.
    """

    kind = "tiktoken"

    def __init__(self, path: str | os.PathLike, pattern: str | None = None, eod_token: str | None = None):
        import tiktoken

        self.path = str(path)
        self.pattern = pattern
        self.eod_token = eod_token
        _require_file(self.path, "tiktoken")
        ranks = read_tiktoken_ranks(self.path)
        self.pat_str = TIKTOKEN_PATTERNS.get(pattern or DEFAULT_TIKTOKEN_PATTERN, pattern)
        self._eod_id = max(ranks.values()) + 1
        self.eod_token_text = eod_token or TIKTOKEN_EOD_TOKEN
        if self.eod_token_text.encode() in ranks:
            raise ValueError(f"eod_token {self.eod_token_text!r} is an ordinary token of {self.path}; "
                             "name another one")
        self.name = f"tiktoken:{Path(self.path).name}"
        try:
            self.enc = tiktoken.Encoding(self.name, pat_str=self.pat_str, mergeable_ranks=ranks,
                                         special_tokens={self.eod_token_text: self._eod_id})
        except ValueError as e:  # an invalid regex
            raise ValueError(f"tiktoken pattern {pattern!r} is not a valid regex: {e}") from e

    def encode(self, text: str) -> list[int]:
        # Special-token strings inside the text are ordinary text.
        return self.enc.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return self._eod_id + 1

    def _options(self) -> dict:
        return {"pattern": self.pattern, "eod_token": self.eod_token}


def read_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """The {token bytes: rank} map of a tiktoken rank file ("base64 rank" per line)."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: not a tiktoken rank line (base64 token, rank): {e}") from e
    if not ranks:
        raise ValueError(f"tiktoken rank file {path} is empty")
    if len(set(ranks.values())) != len(ranks):
        raise ValueError(f"tiktoken rank file {path} gives the same rank to several tokens")
    missing = 256 - sum(1 for b in range(256) if bytes([b]) in ranks)
    if missing:  # tiktoken's BPE starts from single bytes and cannot encode without them
        raise ValueError(f"tiktoken rank file {path} lacks {missing} of the 256 single-byte tokens")
    return ranks


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

    def config(self) -> dict:
        return {"kind": "null", "vocab_size": self._vocab_size}

    def __reduce__(self):
        return (type(self), (self._vocab_size,))


# ----------------------------------------------------------------------------- files


def _require_file(path: str, kind: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{kind} tokenizer file not found: {path!r}")


def _gpt2_files(path: str, merges_path: str | None) -> tuple[str, str]:
    """(vocabulary file, merges file) from a vocabulary file or a directory holding both."""
    if os.path.isdir(path):
        pairs = [(os.path.join(path, v), os.path.join(path, m)) for v, m in GPT2_FILE_PAIRS]
        found = [pair for pair in pairs if os.path.isfile(pair[0])]
        if not found:
            raise FileNotFoundError(f"no vocab.json or encoder.json in directory {path!r}")
        path, paired_merges = found[0]
        merges_path = merges_path or paired_merges
    _require_file(path, "gpt2 vocabulary")
    if merges_path is None:
        here = os.path.dirname(path)
        found = [os.path.join(here, m) for _, m in GPT2_FILE_PAIRS if os.path.isfile(os.path.join(here, m))]
        if not found:
            raise FileNotFoundError(
                f"no merges.txt or vocab.bpe next to {path!r}; name the merges file "
                "(config: data.tokenizer.merges_path, CLI: --merges-path)"
            )
        merges_path = found[0]
    _require_file(merges_path, "gpt2 merges")
    return path, merges_path


_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2} [0-9]+\r?\n?$")


def _is_tiktoken_file(path: str) -> bool:
    with open(path, "rb") as f:
        return bool(_TIKTOKEN_LINE.match(f.readline(256)))


def detect_kind(path: str) -> tuple[str, str]:
    """(kind, path) for a tokenizer file, or a directory holding one.

    Files: ``*.tiktoken`` and rank-file ``.model`` files (Llama-3) are tiktoken, other
    ``.model`` files SentencePiece; a ``.json`` with a ``model`` object is a
    ``tokenizer.json``, a flat ``{token: id}`` map a GPT-2 vocabulary. Directories:
    ``tokenizer.model``, ``tokenizer.json``, then GPT-2 file pairs.
    """
    if os.path.isdir(path):
        for name in ("tokenizer.model", "tokenizer.json", *(v for v, _ in GPT2_FILE_PAIRS)):
            if os.path.isfile(os.path.join(path, name)):
                return detect_kind(os.path.join(path, name))
        raise FileNotFoundError(f"no tokenizer.model, tokenizer.json, vocab.json or encoder.json in {path!r}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer file not found: {path!r}")
    if path.endswith(".tiktoken"):
        return "tiktoken", path
    if path.endswith(".model"):
        return ("tiktoken" if _is_tiktoken_file(path) else "sentencepiece"), path
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
        if isinstance(content, dict) and isinstance(content.get("model"), dict):
            return "huggingface", path
        if isinstance(content, dict) and all(isinstance(v, int) for v in content.values()):
            return "gpt2", path
        raise ValueError(f"{path!r} is neither a tokenizer.json nor a GPT-2 vocabulary")
    raise ValueError(
        f"cannot tell the tokenizer kind of {path!r} from its name "
        "(.model, .tiktoken, tokenizer.json, vocab.json/encoder.json); give the kind explicitly"
    )


# ----------------------------------------------------------------------------- entry points

# Which options each kind takes (besides path).
_KIND_OPTIONS = {
    "sentencepiece": ("eod_token",),
    "huggingface": ("eod_token",),
    "gpt2": ("merges_path", "eod_token"),
    "tiktoken": ("pattern", "eod_token"),
    "null": ("vocab_size",),
}
_KIND_CLASSES = {
    "sentencepiece": SentencePieceTokenizer,
    "huggingface": HFTokenizer,
    "gpt2": GPT2BPETokenizer,
    "tiktoken": TiktokenTokenizer,
}


def load_tokenizer(kind: str, path: str | os.PathLike | None = None, **opts) -> Tokenizer:
    """Build a tokenizer from local files.

    ``opts`` (None values are ignored): ``eod_token`` (all file kinds), ``merges_path``
    (gpt2), ``pattern`` (tiktoken), ``vocab_size`` (null).
    """
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; valid kinds: {', '.join(TOKENIZER_KINDS)}")
    opts = {k: v for k, v in opts.items() if v is not None}
    if kind == "null":
        if opts.get("vocab_size") is None:
            raise ValueError("tokenizer kind 'null' needs vocab_size")
        _check_options(kind, opts)
        return NullTokenizer(**opts)

    if path is None:
        raise ValueError(f"tokenizer kind {kind!r} needs a path")
    path = os.path.expanduser(os.fspath(path))
    if kind == "auto":
        kind, path = (("gpt2", path) if "merges_path" in opts else detect_kind(path))
    _check_options(kind, opts)
    return _KIND_CLASSES[kind](path, **opts)


def _check_options(kind: str, opts: dict) -> None:
    wrong = sorted(set(opts) - set(_KIND_OPTIONS[kind]))
    if wrong:
        raise ValueError(f"tokenizer kind {kind!r} takes no {', '.join(wrong)} "
                         f"(its options: {', '.join(_KIND_OPTIONS[kind])})")


def tokenizer_from_config(d: dict) -> Tokenizer:
    """Build the tokenizer described by the config section ``data.tokenizer``.

    ``{kind: auto|sentencepiece|huggingface|gpt2|tiktoken|null, path: FILE,
    vocab_size: N (null only), eod_token: TOKEN, merges_path: FILE (gpt2), pattern: REGEX (tiktoken)}``;
    keys set to None are ignored.
    """
    unknown = sorted(set(d) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"unknown keys in data.tokenizer: {unknown}; allowed: {list(CONFIG_KEYS)}")
    opts = {k: v for k, v in d.items() if k not in ("kind", "path") and v is not None}
    if d.get("kind", "auto") != "null":
        opts.pop("vocab_size", None)  # the vocabulary size comes from the file
    return load_tokenizer(d.get("kind", "auto"), d.get("path"), **opts)
