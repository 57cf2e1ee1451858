"""Tokenizers and the text -> Megatron indexed dataset preprocessing (CPU, offline).

Test tokenizers are built inside the tests: a tiny SentencePiece model trained on a
generated corpus, a tiny byte-level BPE tokenizer.json, the same BPE as GPT-2 files
(vocab.json + merges.txt) and as a tiktoken rank file. Every kind is checked against an
independent reference: the sentencepiece / tokenizers libraries used directly, a
pure-Python GPT-2 BPE written here, and tiktoken's own Encoding with OpenAI's patterns.

The helpers and fixtures here are also used by the other tests/test_preprocess_*.py files.
"""

import base64
import json
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_gpas.data.preprocess import SKIP_REASONS, build_indexed_dataset
from megatron_gpas.tokenizer import (
    GPT2BPETokenizer,
    HFTokenizer,
    NullTokenizer,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    detect_kind,
    load_tokenizer,
    read_tiktoken_ranks,
    tokenizer_from_config,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


WORDS = (
    "the king queen lord lady night day love death sword crown heaven earth fair foul "
    "speak hear tell come go stay sweet gentle noble brave father mother son daughter "
    "thou thee thy art hath doth shall will what why where when how good ill"
).split()

# Beyond the generated vocabulary: newlines, runs of spaces, digits, contractions, non-ASCII.
AWKWARD_TEXTS = [
    "Two lines,\nand   extra  spaces — plus café.",
    "It's 12345 o'clock; naïve Ünïcode 🙂 and tabs\tto\tend\n\n",
    "  leading spaces and a literal <|endoftext|> in the text",
]


def generated_sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    sentences = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
        sentences.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ","]))
    return sentences


def write_jsonl(path: Path, texts: list[str], key: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({key: text}) + "\n")
    return path


def read_dataset(prefix) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))]


def read_files(prefix) -> dict[str, bytes]:
    return {suffix: Path(f"{prefix}{suffix}").read_bytes() for suffix in (".bin", ".idx")}


# ----------------------------------------------------------------------------- references


def gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (from its encoder.py)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class ReferenceGPT2:
    """GPT-2's BPE as in its original encoder.py: regex split, byte map, lowest-rank merges."""

    PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

    def __init__(self, vocab_path, merges_path):
        import regex

        self.vocab = json.loads(Path(vocab_path).read_text(encoding="utf-8"))
        self.inverse = {i: t for t, i in self.vocab.items()}
        lines = Path(merges_path).read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        self.ranks = {pair: r for r, pair in enumerate(merges)}
        self.byte_map = gpt2_bytes_to_unicode()
        self.unbyte = {c: b for b, c in self.byte_map.items()}
        self.pattern = regex.compile(self.PATTERN)

    def _bpe(self, word: tuple) -> tuple:
        while len(word) > 1:
            pair = min(zip(word, word[1:]), key=lambda p: self.ranks.get(p, float("inf")))
            if pair not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self.pattern.findall(text):
            ids += [self.vocab[t] for t in self._bpe(tuple(self.byte_map[b] for b in piece.encode("utf-8")))]
        return ids

    def decode(self, ids) -> str:
        return bytes(self.unbyte[c] for i in ids for c in self.inverse[i]).decode("utf-8", errors="replace")


def tiktoken_reference(rank_file: Path, pattern_name: str, monkeypatch):
    """tiktoken's own Encoding for ``rank_file``, with the regex of OpenAI's ``pattern_name``
    encoding taken from tiktoken_ext (its rank-file download is redirected to our file)."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext import openai_public

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # read the file, cache nothing
    ranks = load_tiktoken_bpe(str(rank_file))
    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *a, **k: ranks)
    spec = {"cl100k": openai_public.cl100k_base, "o200k": openai_public.o200k_base}[pattern_name]()
    eod = max(ranks.values()) + 1
    return tiktoken.Encoding("reference", pat_str=spec["pat_str"], mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": eod}), eod


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory) -> SentencePieceTokenizer:
    import sentencepiece

    out = tmp_path_factory.mktemp("sp")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(generated_sentences(2000, seed=1)),
        model_prefix=str(out / "tiny"),
        vocab_size=200,
        model_type="bpe",
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return SentencePieceTokenizer(out / "tiny.model")


def _train_byte_level_bpe(special_token: str, seed: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[special_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(generated_sentences(2000, seed=seed) + AWKWARD_TEXTS, trainer)
    return tok


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory) -> HFTokenizer:
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    _train_byte_level_bpe("</s>", seed=2).save(str(path))
    return HFTokenizer(path)


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory) -> Path:
    """A directory with GPT-2 style vocab.json + merges.txt (and <|endoftext|>)."""
    out = tmp_path_factory.mktemp("gpt2")
    _train_byte_level_bpe("<|endoftext|>", seed=3).model.save(str(out))
    return out


@pytest.fixture(scope="module")
def tiktoken_file(gpt2_files) -> Path:
    """The GPT-2 fixture's merges as a tiktoken rank file: the 256 bytes, then one rank per merge."""
    unbyte = {c: b for b, c in gpt2_bytes_to_unicode().items()}
    ranks = {bytes([b]): b for b in range(256)}
    for line in (gpt2_files / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]:
        left, right = line.split()
        ranks.setdefault(bytes(unbyte[c] for c in left + right), len(ranks))
    path = gpt2_files.parent / "tiny.tiktoken"
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in ranks.items()))
    return path


# ----------------------------------------------------------------------------- tokenizers


def test_tokenizer_basics(sp_tokenizer, hf_tokenizer, gpt2_files, tiktoken_file, tmp_path):
    gpt2 = GPT2BPETokenizer(gpt2_files / "vocab.json")
    tiktok = TiktokenTokenizer(tiktoken_file)
    assert sp_tokenizer.eod_id == 2 and sp_tokenizer.vocab_size <= 200  # SentencePiece's default </s>
    assert hf_tokenizer.eod_id == 0 and hf_tokenizer.vocab_size <= 400  # </s> is the first special token
    vocab = json.loads((gpt2_files / "vocab.json").read_text())
    assert gpt2.eod_id == vocab["<|endoftext|>"] and gpt2.vocab_size == max(vocab.values()) + 1
    num_ranks = len((tiktoken_file.read_text()).splitlines())
    assert tiktok.eod_id == num_ranks and tiktok.vocab_size == num_ranks + 1  # EOD right after the ranks
    for tok in (sp_tokenizer, hf_tokenizer, gpt2, tiktok):
        ids = tok.encode("Good night, sweet lady.")
        assert ids and tok.eod_id not in ids  # no BOS/EOS added by encode
        assert all(0 <= i < tok.vocab_size for i in ids)
        # Pickles by its files and options, so it can be shipped to worker processes.
        assert pickle.loads(pickle.dumps(tok)).encode("Good night, sweet lady.") == ids
        # config() rebuilds the same tokenizer; describe() hashes its files.
        assert tokenizer_from_config(tok.config()).encode("Good night, sweet lady.") == ids
        assert len(tok.describe()["sha256"]) == (2 if tok is gpt2 else 1)

    # "auto" recognises every kind from the file or its directory.
    assert detect_kind(sp_tokenizer.path) == ("sentencepiece", sp_tokenizer.path)
    assert detect_kind(hf_tokenizer.path) == ("huggingface", hf_tokenizer.path)
    assert detect_kind(str(gpt2_files)) == ("gpt2", str(gpt2_files / "vocab.json"))
    assert detect_kind(str(tiktoken_file)) == ("tiktoken", str(tiktoken_file))
    llama3_style = tmp_path / "tokenizer.model"  # Llama-3 ships its tiktoken ranks under this name
    llama3_style.write_bytes(tiktoken_file.read_bytes())
    assert isinstance(load_tokenizer("auto", tmp_path), TiktokenTokenizer)
    # OpenAI's file names for the GPT-2 pair, found next to each other.
    openai_dir = tmp_path / "openai"
    openai_dir.mkdir()
    (openai_dir / "encoder.json").write_bytes((gpt2_files / "vocab.json").read_bytes())
    (openai_dir / "vocab.bpe").write_bytes((gpt2_files / "merges.txt").read_bytes())
    assert load_tokenizer("auto", openai_dir / "encoder.json").encode("the king") == gpt2.encode("the king")

    null = tokenizer_from_config({"kind": "null", "vocab_size": 50})
    assert null.encode("3 4 5") == [3, 4, 5] and null.decode([3, 4]) == "3 4" and null.eod_id == 49


def test_tokenizer_errors(sp_tokenizer, gpt2_files, tiktoken_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        load_tokenizer("sentencepiece", tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_tokenizer("auto", tmp_path / "missing.json")
    with pytest.raises(ValueError, match="sentencepiece, huggingface, gpt2, tiktoken, null, auto"):
        load_tokenizer("bpe", sp_tokenizer.path)
    with pytest.raises(ValueError, match="unknown keys"):
        tokenizer_from_config({"kind": "auto", "path": sp_tokenizer.path, "vocab": 3})
    with pytest.raises(ValueError, match="takes no pattern"):
        load_tokenizer("sentencepiece", sp_tokenizer.path, pattern="cl100k")

    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / "vocab.json").write_bytes((gpt2_files / "vocab.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="no merges.txt or vocab.bpe next to"):
        load_tokenizer("gpt2", lonely / "vocab.json")
    assert load_tokenizer("gpt2", lonely / "vocab.json", merges_path=gpt2_files / "merges.txt").vocab_size > 256

    with pytest.raises(ValueError, match="not a valid regex"):
        TiktokenTokenizer(tiktoken_file, pattern="(unclosed")
    broken = tmp_path / "broken.tiktoken"
    broken.write_bytes(tiktoken_file.read_bytes() + b"not-base64!! 7\n")
    n = len(tiktoken_file.read_bytes().splitlines()) + 1
    with pytest.raises(ValueError, match=rf"broken.tiktoken:{n}: not a tiktoken rank line"):
        TiktokenTokenizer(broken)
    partial = tmp_path / "partial.tiktoken"
    partial.write_bytes(b"".join(tiktoken_file.read_bytes().splitlines(keepends=True)[10:]))
    with pytest.raises(ValueError, match="lacks 10 of the 256 single-byte tokens"):
        TiktokenTokenizer(partial)


def test_hf_tokenizer_without_eos_needs_eod_token(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2, "[SEP]": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))

    with pytest.raises(ValueError, match="eod_token"):
        HFTokenizer(path)
    assert HFTokenizer(path, eod_token="[SEP]").eod_id == 3
    assert tokenizer_from_config({"kind": "huggingface", "path": str(path), "eod_token": "[SEP]"}).eod_id == 3


@pytest.mark.parametrize("pattern", ["cl100k", "o200k"])
def test_tiktoken_matches_tiktoken_itself(pattern, tiktoken_file, monkeypatch):
    """Our rank-file reader and copied regexes give exactly tiktoken's encoding."""
    from tiktoken.load import load_tiktoken_bpe

    reference, eod = tiktoken_reference(tiktoken_file, pattern, monkeypatch)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    assert read_tiktoken_ranks(str(tiktoken_file)) == load_tiktoken_bpe(str(tiktoken_file))
    tok = TiktokenTokenizer(tiktoken_file, pattern=None if pattern == "cl100k" else pattern)  # cl100k: default
    for text in generated_sentences(50, seed=9) + AWKWARD_TEXTS:
        assert tok.encode(text) == reference.encode_ordinary(text)
    assert tok.eod_id == eod and tok.decode([eod]) == "<|endoftext|>"


def test_training_config_names_every_tokenizer_kind(gpt2_files, tiktoken_file, tmp_path):
    """data.tokenizer in a run config builds the same tokenizer preprocessing used."""
    from megatron_gpas.config import ConfigError, load_config
    from megatron_gpas.validation import validate

    base = ["data.paths=[/nonexistent/x]", "model.vocab_size=512"]
    cfg = load_config(None, base + ["data.tokenizer.kind=gpt2", f"data.tokenizer.path={gpt2_files}",
                                    f"data.tokenizer.merges_path={gpt2_files / 'merges.txt'}",
                                    "data.tokenizer.eod_token='<|endoftext|>'"])
    tok = tokenizer_from_config(cfg.data.tokenizer.__dict__)
    assert isinstance(tok, GPT2BPETokenizer)
    assert tok.encode("the king") == GPT2BPETokenizer(gpt2_files).encode("the king")
    cfg = load_config(None, base + ["data.tokenizer.kind=tiktoken", f"data.tokenizer.path={tiktoken_file}",
                                    "data.tokenizer.pattern=o200k"])
    tok = tokenizer_from_config(cfg.data.tokenizer.__dict__)
    assert isinstance(tok, TiktokenTokenizer) and tok.pattern == "o200k"

    cfg = load_config(None, base + ["data.tokenizer.kind=wordpiece", f"data.tokenizer.path={tiktoken_file}"])
    with pytest.raises(ConfigError, match="unknown data.tokenizer.kind 'wordpiece'"):
        validate(cfg, world_size=1, check_files=False)


# ----------------------------------------------------------------------------- round trips


def _reference(kind: str, tok, gpt2_files, tiktoken_file, monkeypatch):
    """(encode, decode) of the library that defines each tokenizer kind, used directly."""
    if kind == "sentencepiece":
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=tok.path)
        return (lambda t: sp.encode(t, out_type=int)), sp.decode
    if kind == "huggingface":
        import tokenizers

        hf = tokenizers.Tokenizer.from_file(tok.path)
        return (lambda t: hf.encode(t, add_special_tokens=False).ids), hf.decode
    if kind == "gpt2":
        ref = ReferenceGPT2(gpt2_files / "vocab.json", gpt2_files / "merges.txt")
        return ref.encode, ref.decode
    enc, _ = tiktoken_reference(tiktoken_file, "cl100k", monkeypatch)
    return enc.encode_ordinary, enc.decode


@pytest.mark.parametrize("kind", ["sentencepiece", "huggingface", "gpt2", "tiktoken"])
def test_round_trip(kind, sp_tokenizer, hf_tokenizer, gpt2_files, tiktoken_file, tmp_path, monkeypatch):
    """text -> ids -> indexed dataset -> read back -> detokenize, against each library itself."""
    tok = {"sentencepiece": sp_tokenizer, "huggingface": hf_tokenizer,
           "gpt2": GPT2BPETokenizer(gpt2_files), "tiktoken": TiktokenTokenizer(tiktoken_file)}[kind]
    ref_encode, ref_decode = _reference(kind, tok, gpt2_files, tiktoken_file, monkeypatch)
    texts = generated_sentences(40, seed=3) + AWKWARD_TEXTS
    prefix = tmp_path / "out" / "docs"
    report = build_indexed_dataset([write_jsonl(tmp_path / "docs.jsonl", texts)], prefix, tok,
                                   progress_interval_s=None)

    docs = read_dataset(prefix)
    assert len(docs) == len(texts)
    for text, ids in zip(texts, docs):
        assert ids == ref_encode(text) + [tok.eod_id]
        assert tok.decode(ids[:-1]) == ref_decode(ref_encode(text))
        if kind != "sentencepiece":  # byte-level BPEs reproduce any text exactly
            assert tok.decode(ids[:-1]) == text

    assert report["documents"] == {"read": len(texts), "written": len(texts), "skipped": 0}
    assert report["tokens_written"] == sum(map(len, docs))
    assert report["dtype"] == "uint16"
    assert {k: report["tokenizer"][k] for k in ("name", "vocab_size", "eod_id")} == \
        {"name": tok.name, "vocab_size": tok.vocab_size, "eod_id": tok.eod_id}
    lengths = np.array([len(d) for d in docs])
    stats = report["tokens_per_document"]
    assert (stats["min"], stats["max"]) == (lengths.min(), lengths.max())
    assert stats["mean"] == pytest.approx(lengths.mean(), abs=1e-3)
    assert stats["std"] == pytest.approx(lengths.std(), abs=1e-3)
    assert sum(stats["histogram"].values()) == len(docs)
    assert json.loads((tmp_path / "out" / "docs.report.json").read_text()) == report


def test_dtype_follows_the_vocabulary(tmp_path):
    """uint16 below 65500 ids, int32 from there on (Megatron-Core's DType.optimal_dtype)."""
    def dtype(vocab_size: int, texts: list[str]) -> str:
        src = write_jsonl(tmp_path / f"{vocab_size}.jsonl", texts)
        return build_indexed_dataset([src], tmp_path / str(vocab_size), NullTokenizer(vocab_size),
                                     progress_interval_s=None)["dtype"]

    assert dtype(70001, ["1 2", "70000 3"]) == "int32"
    assert read_dataset(tmp_path / "70001") == [[1, 2, 70000], [70000, 3, 70000]]
    assert dtype(65499, ["1 2"]) == "uint16"


def test_no_append_eod(sp_tokenizer, tmp_path):
    texts = generated_sentences(5, seed=4)
    build_indexed_dataset([write_jsonl(tmp_path / "d.jsonl", texts)], tmp_path / "d", sp_tokenizer,
                          append_eod=False, progress_interval_s=None)
    assert read_dataset(tmp_path / "d") == [sp_tokenizer.encode(t) for t in texts]


def test_txt_modes(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("1 2\n3\n\n4 5\n\n\n6\n")
    tok = NullTokenizer(100)
    expected = {
        "file": [[1, 2, 3, 4, 5, 6, 99]],
        "line": [[1, 2, 99], [3, 99], [4, 5, 99], [6, 99]],
        "paragraph": [[1, 2, 3, 99], [4, 5, 99], [6, 99]],
    }
    for mode, docs in expected.items():
        build_indexed_dataset([path], tmp_path / mode, tok, txt_mode=mode, progress_interval_s=None)
        assert read_dataset(tmp_path / mode) == docs, mode


# ----------------------------------------------------------------------------- bad records


def test_bad_records_are_counted_with_locations(tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = [
        b'{"text": "1 2"}',          # 1 ok
        b"{not json",                # 2 invalid_json
        b"[1, 2]",                   # 3 invalid_json (not an object)
        b'{"body": "3"}',            # 4 missing_key
        b'{"text": 42}',             # 5 non_string_text
        b'{"text": "   "}',          # 6 empty_text
        b"",                         # 7 blank line: not a record
        b'{"text": "4 \xff"}',       # 8 invalid_utf8
        b'{"text": "5 6"}',          # 9 ok
        b'{"text": null}',           # 10 missing_key (null)
    ] + [b'{"other": 1}'] * 7        # 11-17 missing_key: only the first 5 locations are kept
    bad.write_bytes(b"\n".join(lines) + b"\n")
    para = tmp_path / "para.txt"
    para.write_bytes(b"1 2\n\n3\n4 \xfe\n5\n\n6\n")  # paragraph starting at line 3, bad byte on line 4
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")

    def run(inputs, mode, **kw):
        return build_indexed_dataset(inputs, tmp_path / "out", NullTokenizer(10), txt_mode=mode,
                                     progress_interval_s=None, **kw)

    def locations(entry):
        return [e["location"] for e in entry["first"]]

    report = run([bad], "file")
    skipped = report["skipped"]
    assert set(skipped) == set(SKIP_REASONS)
    assert skipped["invalid_json"]["count"] == 2 and locations(skipped["invalid_json"]) == [f"{bad}:2", f"{bad}:3"]
    assert skipped["missing_key"]["count"] == 9
    assert locations(skipped["missing_key"]) == [f"{bad}:{n}" for n in (4, 10, 11, 12, 13)]
    assert skipped["missing_key"]["first"][1]["detail"] == "'text' is null"
    assert skipped["non_string_text"]["count"] == 1 and locations(skipped["non_string_text"]) == [f"{bad}:5"]
    assert skipped["empty_text"]["count"] == 1 and locations(skipped["empty_text"]) == [f"{bad}:6"]
    assert skipped["invalid_utf8"]["count"] == 1 and locations(skipped["invalid_utf8"]) == [f"{bad}:8"]
    assert report["documents"] == {"read": 16, "written": 2, "skipped": 14}
    assert read_dataset(tmp_path / "out") == [[1, 2, 9], [5, 6, 9]]

    report = run([para, empty], "paragraph")
    assert locations(report["skipped"]["invalid_utf8"]) == [f"{para}:4"]
    assert report["documents"] == {"read": 3, "written": 2, "skipped": 1}  # empty.txt has no paragraphs
    report = run([empty], "file")
    assert locations(report["skipped"]["empty_text"]) == [f"{empty}:1"]
    assert report["documents"]["written"] == 0  # still a (valid, empty) dataset with its report

    # strict: fail at the first bad record, naming file and line, and write nothing.
    with pytest.raises(ValueError, match=rf"^{bad}:2: invalid_json: Expecting property name"):
        build_indexed_dataset([bad], tmp_path / "strict", NullTokenizer(10), strict=True,
                              progress_interval_s=None)
    assert not list(tmp_path.glob("strict*"))


def test_cli(tmp_path):
    data = tmp_path / "inputs"
    data.mkdir()
    write_jsonl(data / "a.jsonl", ["1 2 3", "4 5"])
    (data / "b.txt").write_text("6 7\n")
    (data / "notes.md").write_text("ignored: not an input format")
    with open(data / "a.jsonl", "a") as f:
        f.write("{broken\n")

    cli = [sys.executable, str(REPO_ROOT / "tools" / "preprocess_data.py")]
    prefix = tmp_path / "out" / "tiny"
    args = ["--input", str(data), "--output-prefix", str(prefix), "--tokenizer-kind", "null", "--vocab-size", "16"]
    proc = subprocess.run(cli + args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "4 read, 3 written, 1 skipped" in proc.stdout
    assert f"invalid_json: 1 (first at {data / 'a.jsonl'}:3)" in proc.stdout
    assert "[preprocess] 100.0% | 4 docs" in proc.stderr and "MB/s" in proc.stderr  # the final progress line
    assert read_dataset(prefix) == [[1, 2, 3, 15], [4, 5, 15], [6, 7, 15]]
    assert json.loads(prefix.with_suffix(".report.json").read_text())["tokens_written"] == 10

    # --strict: the first bad record's file and line, exit status 1, nothing written.
    proc = subprocess.run(cli + args[:3] + [str(tmp_path / "strict")] + args[4:] + ["--strict"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert f"error: {data / 'a.jsonl'}:3: invalid_json: Expecting property name enclosed in double quotes: column 2" \
        in proc.stderr
    assert not list(tmp_path.glob("strict*"))

    # Bad arguments fail before megatron is imported, as one line and exit status 1.
    proc = subprocess.run(cli + ["--input", str(tmp_path / "missing.jsonl"), "--output-prefix", str(prefix),
                                 "--tokenizer-kind", "null", "--vocab-size", "16"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "error: input not found" in proc.stderr
