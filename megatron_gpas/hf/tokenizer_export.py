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
PROBE_TEXTS = (
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer\nThe slings and arrows of outrageous fortune,",
    "GPAS scales activations down by 1 − SiLU(α) while gradients pass unchanged (2025).",
    "Unicode: naïve café, Straße, 東京, emoji 🙂, numbers 3.14159 and 1,000,000.",
    "def f(x):\n    return x ** 2  # indented code",
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


def _backend_tokenizer(ours):
    """Our tokenizer as a ``tokenizers.Tokenizer`` (None for kinds without a file)."""
    import tokenizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from megatron_gpas.tokenizer import read_tiktoken_ranks

    kind = ours.config()["kind"]
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


def _hf_tokenizer(ours, out_dir: str):
    """Write and load the HF tokenizer for our tokenizer (None if it has no HF form)."""
    from tokenizers import processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if ours.config()["kind"] == "sentencepiece":
        shutil.copy(ours.path, os.path.join(out_dir, "tokenizer.model"))
        # transformers converts the SentencePiece model into its Llama tokenizer on load.
        config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
                  "legacy": True, "eos_token": ours.eod_token_text}
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump(config, f)
        return AutoTokenizer.from_pretrained(out_dir)
    backend = _backend_tokenizer(ours)
    if backend is None:
        return None
    if backend.token_to_id(ours.eod_token_text) != ours.eod_id:
        raise ValueError(f"the Hugging Face form of {ours.name} puts {ours.eod_token_text!r} at id "
                         f"{backend.token_to_id(ours.eod_token_text)}, not at our end-of-document id {ours.eod_id}")
    backend.post_processor = processors.Sequence([])  # no BOS/EOS template: training saw none
    # Our gpt2 and tiktoken kinds read a special-token string inside the text as ordinary text
    # (so data cannot fake a document end); split_special_tokens makes the HF tokenizer agree.
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=ours.eod_token_text,
                                   split_special_tokens=ours.config()["kind"] in ("gpt2", "tiktoken"))


def export_tokenizer(checkpoint_path: str, run_config: dict, out_dir: str, override: str | None = None):
    """Write the tokenizer into ``out_dir``; returns (report, (bos_id, eos_id))."""
    from megatron_gpas.tokenizer import tokenizer_from_config

    spec = tokenizer_spec(checkpoint_path, run_config, override)
    if spec is None:
        return {"exported": False, "reason": "the checkpoint has no tokenizer copy and the run's tokenizer path "
                                              "does not exist here; pass --tokenizer"}, (None, None)
    ours = tokenizer_from_config(spec)
    kind = ours.config()["kind"]
    try:
        hf = _hf_tokenizer(ours, out_dir)
        reason = f"a {kind} tokenizer has no Hugging Face form"
    except ValueError as e:
        hf, reason = None, str(e)
    if hf is None:
        return {"exported": False, "reason": reason, "eos_token_id": ours.eod_id}, (None, ours.eod_id)
    hf.save_pretrained(out_dir)
    mismatches = [text for text in PROBE_TEXTS if hf.encode(text, add_special_tokens=True) != ours.encode(text)]
    bos = getattr(hf, "bos_token_id", None)
    report = {"exported": True, "source": spec.get("path"), "kind": kind, "eos_token_id": ours.eod_id,
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
