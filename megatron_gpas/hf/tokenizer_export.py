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


def tokenizer_spec(checkpoint_path: str, run_config: dict, override: str | None) -> dict | None:
    """The ``data.tokenizer`` config section to load the run's tokenizer from, or None."""
    if override:
        return {"kind": "auto", "path": override}
    copy = os.path.join(checkpoint_path, TOKENIZER_DIR)
    if os.path.isfile(os.path.join(copy, TOKENIZER_SPEC)):
        with open(os.path.join(copy, TOKENIZER_SPEC)) as f:
            spec = yaml.safe_load(f)
        if spec.get("path") is not None:
            spec["path"] = os.path.normpath(os.path.join(copy, spec["path"]))
        return spec
    spec = dict(run_config.get("data", {}).get("tokenizer") or {})
    if spec.get("kind") == "null" or (spec.get("path") and os.path.exists(os.path.expanduser(spec["path"]))):
        return spec
    return None


def _hf_tokenizer(kind: str, path: str, ours, out_dir: str):
    """Write and load the HF tokenizer for our tokenizer file (None if this kind has no HF form)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if kind == "sentencepiece":
        shutil.copy(path, os.path.join(out_dir, "tokenizer.model"))
        # transformers converts the SentencePiece model into its Llama tokenizer on load.
        config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
                  "legacy": True, "eos_token": ours.sp.id_to_piece(ours.eod_id)}
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump(config, f)
        return AutoTokenizer.from_pretrained(out_dir)
    if kind == "huggingface":
        import tokenizers
        from tokenizers import processors

        tok = tokenizers.Tokenizer.from_file(path)
        tok.post_processor = processors.Sequence([])  # no BOS/EOS template: training saw none
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=ours.tok.id_to_token(ours.eod_id))
    return None


def export_tokenizer(checkpoint_path: str, run_config: dict, out_dir: str, override: str | None = None):
    """Write the tokenizer into ``out_dir``; returns (report, (bos_id, eos_id))."""
    from megatron_gpas.tokenizer import tokenizer_from_config

    spec = tokenizer_spec(checkpoint_path, run_config, override)
    if spec is None:
        return {"exported": False, "reason": "the checkpoint has no tokenizer copy and the run's tokenizer path "
                                              "does not exist here; pass --tokenizer"}, (None, None)
    ours = tokenizer_from_config(spec)
    kind = type(ours).__name__
    file_kind = {"SentencePieceTokenizer": "sentencepiece", "HFTokenizer": "huggingface"}.get(kind)
    hf = _hf_tokenizer(file_kind, ours.path, ours, out_dir) if file_kind else None
    if hf is None:
        return {"exported": False, "reason": f"{kind} has no Hugging Face form", "eos_token_id": ours.eod_id}, \
            (None, ours.eod_id)
    hf.save_pretrained(out_dir)
    mismatches = [text for text in PROBE_TEXTS if hf.encode(text, add_special_tokens=True) != ours.encode(text)]
    bos = getattr(hf, "bos_token_id", None)
    report = {"exported": True, "source": spec.get("path"), "kind": file_kind, "eos_token_id": ours.eod_id,
              "bos_token_id": bos, "probe_texts": len(PROBE_TEXTS), "probe_mismatches": len(mismatches),
              "mismatching_texts": mismatches}
    return report, (bos, ours.eod_id)


def copy_into_checkpoint(tokenizer_cfg: dict, checkpoint_dir: str, max_bytes: int = 256 * 1024**2) -> None:
    """Store the run's tokenizer file(s) with a checkpoint, so exports need no outside files."""
    path = tokenizer_cfg.get("path")
    dest = os.path.join(checkpoint_dir, TOKENIZER_DIR)
    spec = {k: v for k, v in tokenizer_cfg.items() if v is not None}
    if path:
        path = os.path.expanduser(path)
        files = [path] if os.path.isfile(path) else sorted(
            os.path.join(path, n) for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))
        if sum(os.path.getsize(f) for f in files) > max_bytes:
            return  # an unusual tokenizer directory: leave the config's path as the reference
        os.makedirs(dest, exist_ok=True)
        for f in files:
            shutil.copy(f, dest)
        spec["path"] = os.path.basename(path) if os.path.isfile(path) else "."
    os.makedirs(dest, exist_ok=True)
    with open(os.path.join(dest, TOKENIZER_SPEC), "w") as f:
        yaml.safe_dump(spec, f)
