"""The run's tokenizer in an exported directory, as a Hugging Face tokenizer.

Source, in order: ``--tokenizer`` given to the converter; the copy every checkpoint carries
(``iter_N/tokenizer/``, written by ``megatron_gpas.checkpoint.save``); the path in the run's
config. The HF tokenizer is checked against ours on sample texts and the agreement reported:
our training data was tokenized without BOS, documents ended by the EOD token, so the exported
tokenizer adds no BOS/EOS either.
"""

from __future__ import annotations

import json
import os
import shutil

import yaml

TOKENIZER_DIR = "tokenizer"  # inside a checkpoint directory
TOKENIZER_SPEC = "tokenizer.yaml"
# Sample texts the export encodes with both tokenizers; the ways tokenizers tend to part:
# runs of spaces, leading and trailing spaces, indented code, tabs and newlines, unicode
# (accents, CJK, emoji), special-token strings written in the text, the empty text.
PROBE_TEXTS = (
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer\nThe slings and arrows of outrageous fortune,",
    "GPAS scales activations down by 1 − SiLU(α) while gradients pass unchanged (2025).",
    "Unicode: naïve café, Straße, 東京, emoji 🙂, numbers 3.14159 and 1,000,000.",
    "def f(x):\n    return x ** 2  # indented code",
    "a  b   c    d",
    "  leading spaces",
    "    def f(x):\n        return x\n\n\n",
    "tabs\tand\t\ttabs\r\nand trailing spaces   ",
    "<s> literal </s> <unk> <|endoftext|> <|im_start|>",
    "",
)


def checkpoint_copy(checkpoint_path: str) -> dict | None:
    """The tokenizer copy a checkpoint carries, as a ``data.tokenizer`` section whose paths are
    those of the copy's files; None if it carries none."""
    copy = os.path.join(checkpoint_path, TOKENIZER_DIR)
    if not os.path.isfile(os.path.join(copy, TOKENIZER_SPEC)):
        return None
    with open(os.path.join(copy, TOKENIZER_SPEC)) as f:
        spec = yaml.safe_load(f) or {}
    for key in ("path", "merges_path"):
        if spec.get(key) is not None:
            spec[key] = os.path.normpath(os.path.join(copy, spec[key]))
    return spec


def tokenizer_spec(checkpoint_path: str, run_config: dict, override: str | None) -> dict | None:
    """The ``data.tokenizer`` config section to load the run's tokenizer from, or None."""
    if override:
        return {"kind": "auto", "path": override}
    copy = checkpoint_copy(checkpoint_path)
    if copy is not None:
        return copy
    spec = dict(run_config.get("data", {}).get("tokenizer") or {})
    if spec.get("kind") == "null" or (spec.get("path") and os.path.exists(os.path.expanduser(spec["path"]))):
        return spec
    return None


# the kinds whose path may name a directory (the copy then holds a file of it)
DIRECTORY_KINDS = ("auto", "gpt2")


def is_copy_of(recorded: dict, copy: dict) -> bool:
    """Whether ``copy`` (a checkpoint's tokenizer.yaml) is the tokenizer that ``recorded`` (the
    data.tokenizer section of the same checkpoint's run_config.yaml) describes, as far as that
    can be told without the recorded files: the same kind (``auto`` stands for any), the same
    options, and the same file names (unless the recorded path may be a directory)."""
    kind = recorded.get("kind") or "auto"
    if kind not in ("auto", copy.get("kind")):
        return False
    for key, value in recorded.items():
        if key not in ("kind", "path", "merges_path") and value is not None and copy.get(key) != value:
            return False
    names = [key for key in ("path", "merges_path")
             if recorded.get(key) and not (key == "path" and kind in DIRECTORY_KINDS)]
    return all(copy.get(key) and os.path.basename(os.path.normpath(recorded[key])) == os.path.basename(copy[key])
               for key in names)


def recorded_or_copy(recorded: dict, checkpoint_path: str) -> tuple[dict, str | None]:
    """The tokenizer to use for a checkpoint whose run_config.yaml records ``recorded``: that
    one while its files exist, else the checkpoint's own copy of it (a moved checkpoint, or one
    on another machine), with a line saying so. When neither is there, ``recorded`` (the config
    check then names the missing file)."""
    files = [recorded[key] for key in ("path", "merges_path") if recorded.get(key)]
    if not files or all(os.path.exists(os.path.expanduser(f)) for f in files):
        return recorded, None
    copy = checkpoint_copy(checkpoint_path)
    if copy is None or not is_copy_of(recorded, copy):
        return recorded, None
    missing = next(f for f in files if not os.path.exists(os.path.expanduser(f)))
    return copy, f"tokenizer {missing} not found; using the checkpoint's copy {copy['path']}"


# SentencePiece piece types (sentencepiece_model.proto)
_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_USER_DEFINED = 1, 2, 3, 4


def _sentencepiece_proto(path: str):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def sentencepiece_known_differences(path: str) -> list[str]:
    """Where the Hugging Face form of a SentencePiece model cannot encode as SentencePiece does."""
    proto = _sentencepiece_proto(path)
    control = [p.piece for p in proto.pieces if p.type in (_SP_UNKNOWN, _SP_CONTROL)]
    user = [p.piece for p in proto.pieces if p.type == _SP_USER_DEFINED]
    known = []
    if proto.trainer_spec.model_type == 1 and control:
        # tokenizers' unigram model may pick any vocabulary entry, and its unknown-piece score
        # follows the lowest score, so no score keeps the control pieces out of its paths.
        known.append(f"control and unknown pieces {control} written in the text can be read as those pieces (SentencePiece "
                     "reads them as plain text): a unigram model's Hugging Face form cannot exclude them")
    if proto.normalizer_spec.add_dummy_prefix and user:
        # tokenizers normalizes the text between added tokens piece by piece, each with the prefix.
        known.append(f"text right after a user-defined piece {user} gets a '\u2581' prefix that SentencePiece "
                     "does not add (Hugging Face normalizes the text between added tokens separately)")
    return known


def _sentencepiece_backend(path: str):
    """A SentencePiece model as a ``tokenizers.Tokenizer`` that encodes exactly as SentencePiece.

    Built from the model file itself rather than by transformers' Llama conversion, which
    differs from SentencePiece in three ways: it ranks BPE merges by piece id, not by score, so
    the whitespace-only pieces Mistral/Llama models add with score -1e9 (``▁▁``, ``▁▁▁▁``, ...)
    merge before ``▁b`` in ``"a  b"``; it ignores the model's normalizer settings; and it
    matches control pieces (``<s>``) in raw text, which SentencePiece reads as plain text.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

    proto = _sentencepiece_proto(path)
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    pieces = list(proto.pieces)
    unk_piece = pieces[trainer.unk_id].piece
    if trainer.model_type == 1:  # unigram: tokenizers' Viterbi over the same scores
        model = models.Unigram([(p.piece, p.score) for p in pieces], unk_id=trainer.unk_id,
                               byte_fallback=trainer.byte_fallback)
    elif trainer.model_type == 2:
        vocab = {p.piece: i for i, p in enumerate(pieces)}
        merges = []
        for p in pieces:
            if p.type != _SP_NORMAL:  # SentencePiece merges only into normal pieces
                continue
            for cut in range(1, len(p.piece)):
                left, right = p.piece[:cut], p.piece[cut:]
                if left in vocab and right in vocab:
                    # SentencePiece merges the best-scoring pair, the leftmost one among equal
                    # scores; ranking a longer left part first reproduces that leftmost growth
                    # for the equal-scored whitespace pieces.
                    merges.append(((-p.score, -len(left)), (left, right)))
        merges = [pair for _, pair in sorted(merges, key=lambda m: m[0])]
        model = models.BPE(vocab, merges, unk_token=unk_piece, byte_fallback=trainer.byte_fallback, fuse_unk=True)
    else:
        raise ValueError(f"SentencePiece model {path} is of type {trainer.model_type} (neither BPE nor unigram), "
                         "which has no exact Hugging Face form")
    if trainer.treat_whitespace_as_suffix or norm.normalization_rule_tsv:
        raise ValueError(f"SentencePiece model {path} treats whitespace as a suffix or has custom normalization "
                         "rules, which have no exact Hugging Face form")
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:  # SentencePiece strips spaces at both ends and collapses runs
        steps += [normalizers.Replace(Regex("^ +| +$"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    steps.append(normalizers.Replace(" ", "\u2581"))
    if norm.add_dummy_prefix:
        # Not as a Metaspace pre-tokenizer: that one skips the prefix when the text starts with a space.
        steps.append(normalizers.Prepend("\u2581"))  # not to an empty text, as in SentencePiece
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence(steps)
    unknown = [decoders.Replace(unk_piece, trainer.unk_surface)] if trainer.unk_surface else []
    tok.decoder = decoders.Sequence(unknown + [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else []))
    # Control pieces and <unk> are special (never matched in text, see split_special_tokens);
    # user-defined pieces are matched in text, as SentencePiece does.
    tok.add_tokens([AddedToken(p.piece, normalized=False, special=False)
                    for p in pieces if p.type == _SP_USER_DEFINED])
    tok.add_special_tokens([AddedToken(p.piece, normalized=False, special=True)
                            for p in pieces if p.type in (_SP_UNKNOWN, _SP_CONTROL)])
    return tok


def _backend_tokenizer(ours):
    """Our tokenizer as a ``tokenizers.Tokenizer`` (None for kinds without a file)."""
    import tokenizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from megatron_gpas.tokenizer import read_tiktoken_ranks

    kind = ours.config()["kind"]
    if kind == "sentencepiece":
        return _sentencepiece_backend(ours.path)
    if kind in ("huggingface", "gpt2"):  # already run by the tokenizers library: copy it
        return tokenizers.Tokenizer.from_str(ours.tok.to_str())
    if kind == "tiktoken":

        class RankFileConverter(TikTokenConverter):
            # transformers would read the file with tiktoken's caching loader; hand it our parse.
            def load_tiktoken_bpe(self, _):
                return read_tiktoken_ranks(ours.path)

        return RankFileConverter(ours.path, pattern=ours.pat_str,
                                 extra_special_tokens=[ours.eod_token_text]).converted()
    return None


# Kinds whose encode reads a special-token string inside the text as ordinary text (so data
# cannot fake a document end); split_special_tokens makes the HF tokenizer agree. The
# huggingface kind matches special tokens in text (tokenizers' default), and so does its export.
SPECIALS_AS_TEXT = ("sentencepiece", "gpt2", "tiktoken")


def _hf_tokenizer(ours):
    """The HF tokenizer for our tokenizer (None if it has no HF form)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = _backend_tokenizer(ours)
    if backend is None:
        return None
    if backend.token_to_id(ours.eod_token_text) != ours.eod_id:
        raise ValueError(f"the Hugging Face form of {ours.name} puts {ours.eod_token_text!r} at id "
                         f"{backend.token_to_id(ours.eod_token_text)}, not at our end-of-document id {ours.eod_id}")
    backend.post_processor = processors.Sequence([])  # no BOS/EOS template: training saw none
    kind = ours.config()["kind"]
    extra = {}
    if kind == "sentencepiece":  # name its BOS and unknown pieces, as transformers' Llama tokenizer did
        extra = {"bos_token": ours.sp.id_to_piece(ours.sp.bos_id()) if ours.sp.bos_id() >= 0 else None,
                 "unk_token": ours.sp.id_to_piece(ours.sp.unk_id())}
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=ours.eod_token_text,
                                   split_special_tokens=kind in SPECIALS_AS_TEXT,
                                   **{k: v for k, v in extra.items() if v is not None})


def hf_chat_template(template: dict[str, str]) -> str:
    """Our per-role chat template (``sft.chat_template``) as the Jinja template of a Hugging Face
    tokenizer: each turn as in training, the last assistant turn closed by EOS instead of its
    closing text, and ``add_generation_prompt`` opening the assistant's turn. Transformers renders
    the whole text and tokenizes it at once, where training tokenized every piece on its own: for
    a tokenizer that merges across the pieces' borders the ids can differ (tools/generate.py
    --chat tokenizes as training did)."""
    turns = {role: text.split("{content}") for role, text in template.items()}
    return ("{% set turns = " + json.dumps(turns, ensure_ascii=False) + " %}"
            "{% for message in messages %}{{ turns[message['role']][0] }}{{ message['content'] }}"
            "{% if loop.last and message['role'] == 'assistant' %}{{ eos_token }}"
            "{% else %}{{ turns[message['role']][1] }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ turns['assistant'][0] }}{% endif %}")


def export_tokenizer(checkpoint_path: str, run_config: dict, out_dir: str, override: str | None = None):
    """Write the tokenizer into ``out_dir``; returns (report, (bos_id, eos_id))."""
    from transformers import AutoTokenizer

    from megatron_gpas.tokenizer import tokenizer_from_config

    spec = tokenizer_spec(checkpoint_path, run_config, override)
    if spec is None:
        return {"exported": False, "reason": "the checkpoint has no tokenizer copy and the run's tokenizer path "
                                              "does not exist here; pass --tokenizer"}, (None, None)
    ours = tokenizer_from_config(spec)
    kind = ours.config()["kind"]
    try:
        hf = _hf_tokenizer(ours)
        reason = f"a {kind} tokenizer has no Hugging Face form"
    except ValueError as e:
        hf, reason = None, str(e)
    if hf is None:
        return {"exported": False, "reason": reason, "eos_token_id": ours.eod_id}, (None, ours.eod_id)
    from megatron_gpas.data.instruct import run_chat_template

    template = run_chat_template(run_config)
    if template is not None:  # fine-tuned on chats: apply_chat_template renders them as training did
        hf.chat_template = hf_chat_template(template)
    # the template inside tokenizer_config.json, where every transformers version looks for it
    hf.save_pretrained(out_dir, save_jinja_files=False)
    # Loaded back as a user would (AutoTokenizer, the fast tokenizer): what lm-eval runs.
    loaded = AutoTokenizer.from_pretrained(out_dir)
    mismatches = [text for text in PROBE_TEXTS if loaded.encode(text) != ours.encode(text)]
    bos = getattr(hf, "bos_token_id", None)
    known = sentencepiece_known_differences(ours.path) if kind == "sentencepiece" else []
    report = {"exported": True, "source": spec.get("path"), "kind": kind, "eos_token_id": ours.eod_id,
              "known_differences": known, "chat_template": template is not None,
              "bos_token_id": bos, "probe_texts": len(PROBE_TEXTS), "probe_mismatches": len(mismatches),
              "mismatching_texts": mismatches}
    return report, (bos, ours.eod_id)


def copy_into_checkpoint(tokenizer_cfg: dict, checkpoint_dir: str, max_bytes: int = 256 * 1024**2) -> None:
    """Store the run's tokenizer file(s) with a checkpoint, so exports need no outside files.

    The copy holds every file the tokenizer reads (a GPT-2 vocabulary and its merges file),
    and ``tokenizer.yaml`` is its resolved config (concrete kind, file names in the copy).
    """
    from megatron_gpas.tokenizer import tokenizer_from_config

    spec = {k: v for k, v in tokenizer_cfg.items() if v is not None}
    dest = os.path.join(checkpoint_dir, TOKENIZER_DIR)
    if spec.get("path"):
        spec = tokenizer_from_config(spec).config()  # "auto" and directories resolved to files
        files = {key: spec[key] for key in ("path", "merges_path") if spec.get(key)}
        if sum(os.path.getsize(f) for f in files.values()) > max_bytes:
            return  # an unusual tokenizer: leave the config's path as the reference
        os.makedirs(dest, exist_ok=True)
        for key, f in files.items():
            shutil.copy(f, dest)
            spec[key] = os.path.basename(f)
    os.makedirs(dest, exist_ok=True)
    with open(os.path.join(dest, TOKENIZER_SPEC), "w") as f:
        yaml.safe_dump(spec, f)
