"""What the analysis tools (``tools/kurtosis.py``, ``tools/layer_importance.py``,
``tools/activation_profile.py``) read: token samples from an indexed dataset, and a model given as
a Hugging Face directory or a Megatron checkpoint of any layout (exported to a temporary directory
of our class, exact for every scheme). Code inside a directory handed to us is never imported.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SUPPORTED_MODEL_TYPES = ("llama", "megatron_gpas")


class AnalysisError(ValueError):
    """A request an analysis tool cannot serve (bad model path, too little data, wrong vocabulary...)."""


# --------------------------------------------------------------------------- the data


@dataclass
class TokenSamples:
    tokens: torch.Tensor  # [samples, seq_len], int64
    prefix: str
    documents_in_dataset: int
    documents_considered: int  # all of them, or the first max_documents
    documents_used: int  # documents with at least one token in the samples
    tokens_considered: int  # tokens of the documents considered
    tokens_unused: int  # of those, the tail left after the last full sample
    max_token_id: int


def load_samples(prefix: str, samples: int, seq_len: int, *, max_documents: int | None = None,
                 vocab_size: int | None = None) -> TokenSamples:
    """The first ``samples × seq_len`` tokens of the dataset's documents, concatenated in order
    (the first ``max_documents`` of them, if given), as ``samples`` rows of ``seq_len``.

    AnalysisError if the data is too short or holds an id ≥ ``vocab_size``; DataCorruptError
    (a ValueError) if ``PREFIX.bin/.idx`` are missing or corrupt.
    """
    from megatron_gpas.data.datasets import check_indexed_dataset  # Megatron's IndexedDataset, checked

    if samples < 1 or seq_len < 1:
        raise AnalysisError(f"--samples and --seq-len must be positive (got {samples} and {seq_len})")
    if max_documents is not None and max_documents < 1:
        raise AnalysisError(f"--documents must be positive (got {max_documents})")
    dataset = check_indexed_dataset(prefix, allow_empty=True)
    index = dataset.index
    documents = int(index.document_count) - 1
    if max_documents is not None and max_documents > documents:
        raise AnalysisError(f"--documents {max_documents}, but {prefix} holds only {documents} documents")
    considered = documents if max_documents is None else max_documents
    # A document is a run of sequences: document d spans sequences doc_start[d] .. doc_start[d + 1] - 1.
    doc_start = np.asarray(index.document_indices, dtype=np.int64)
    num_sequences = int(doc_start[considered])
    lengths = np.asarray(index.sequence_lengths[:num_sequences], dtype=np.int64)
    available = int(lengths.sum())
    needed = samples * seq_len
    if available < needed:
        which = "its" if considered == documents else f"its first {considered} (of {documents})"
        raise AnalysisError(
            f"{prefix}: {which} documents hold {available:,} tokens, but {samples} samples × {seq_len} tokens need "
            f"{needed:,}: lower --samples or --seq-len, or use more documents")

    # Read only as many sequences as the samples need (a large dataset is not read whole).
    ends = np.cumsum(lengths)
    last = int(np.searchsorted(ends, needed, side="left"))  # the sequence holding token number `needed`
    stream = np.concatenate([dataset.get(i) for i in range(last + 1)])[:needed]
    tokens = torch.from_numpy(stream.astype(np.int64)).reshape(samples, seq_len)
    max_id = int(tokens.max())
    if vocab_size is not None and max_id >= vocab_size:
        flat = int(torch.argmax((tokens.reshape(-1) >= vocab_size).to(torch.uint8)))
        sequence = int(np.searchsorted(ends, flat, side="right"))
        document = int(np.searchsorted(doc_start, sequence, side="right")) - 1
        raise AnalysisError(
            f"{prefix} holds token id {int(tokens.reshape(-1)[flat])} (document {document}, sample {flat // seq_len}, "
            f"position {flat % seq_len}) but the model's vocabulary has {vocab_size} ids: was the data tokenized "
            "with the model's tokenizer?")
    documents_used = int(np.searchsorted(doc_start, last, side="right"))
    return TokenSamples(tokens=tokens, prefix=prefix, documents_in_dataset=documents, documents_considered=considered,
                        documents_used=documents_used, tokens_considered=available, tokens_unused=available - needed,
                        max_token_id=max_id)


# --------------------------------------------------------------------------- the model


@dataclass
class ModelSource:
    path: str  # as given
    kind: str  # "huggingface" | "megatron"
    directory: str  # the HF directory, or the complete checkpoint directory (iter_N)
    model_type: str  # the HF model_type that will be evaluated
    vocab_size: int
    max_positions: int | None
    num_layers: int | None
    name: str


def resolve_model(path: str) -> ModelSource:
    """What MODEL names, from its config alone (no weights read): a Hugging Face directory
    (``config.json``) or a Megatron checkpoint (a save root or ``iter_N/``)."""
    if not os.path.exists(path):
        raise AnalysisError(f"MODEL {path} does not exist")
    if not os.path.isdir(path):
        raise AnalysisError(f"MODEL {path} is not a directory (a Hugging Face model directory or a Megatron "
                            "checkpoint)")
    config_file = os.path.join(path, "config.json")
    if os.path.isfile(config_file):
        return _hf_source(path, config_file)
    return _megatron_source(path)


def _hf_source(path: str, config_file: str) -> ModelSource:
    try:
        with open(config_file) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise AnalysisError(f"cannot read {config_file}: {e}") from e
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise AnalysisError(
            f"{config_file} has model_type {model_type!r}; supported: 'llama' (transformers' LlamaForCausalLM) and "
            "'megatron_gpas' (this package's MegatronGPASForCausalLM, as tools/convert_to_hf.py exports it)")
    for key in ("vocab_size", "num_hidden_layers"):
        if not isinstance(config.get(key), int):
            raise AnalysisError(f"{config_file} has no integer {key!r}")
    return ModelSource(path=path, kind="huggingface", directory=os.path.abspath(path), model_type=model_type,
                       vocab_size=config["vocab_size"], max_positions=config.get("max_position_embeddings"),
                       num_layers=config["num_hidden_layers"], name=os.path.basename(os.path.abspath(path)))


def _megatron_source(path: str) -> ModelSource:
    import yaml

    from megatron_gpas.checkpoint import RUN_CONFIG, CheckpointError, find_latest

    try:
        checkpoint = find_latest(path)
    except CheckpointError as e:
        raise AnalysisError(f"MODEL {path}: {e}") from e
    if checkpoint is None:
        raise AnalysisError(
            f"MODEL {path} is neither a Hugging Face model directory (it has no config.json) nor a Megatron "
            "checkpoint (no metadata.json, no complete iter_N/ under it)")
    run_config_file = os.path.join(checkpoint, RUN_CONFIG)
    if not os.path.isfile(run_config_file):
        raise AnalysisError(f"{checkpoint} has no {RUN_CONFIG}: cannot tell the model's architecture")
    with open(run_config_file) as f:
        model = (yaml.safe_load(f) or {}).get("model") or {}
    checkpoint = os.path.abspath(checkpoint)
    return ModelSource(path=path, kind="megatron", directory=checkpoint, model_type="megatron_gpas",
                       vocab_size=int(model["vocab_size"]), max_positions=model.get("max_seq_length"),
                       num_layers=model.get("num_layers"),
                       name=f"{os.path.basename(os.path.dirname(checkpoint))}/{os.path.basename(checkpoint)}")


def model_class(model_type: str):
    """The class evaluating a model_type: transformers' Llama, or OUR MegatronGPASForCausalLM,
    imported from this package. The copy of the modeling code inside an exported directory is
    never imported (no trust_remote_code): code in a directory handed to us is not executed."""
    if model_type == "llama":
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM
    if model_type == "megatron_gpas":
        from megatron_gpas.hf.modeling_megatron_gpas import MegatronGPASForCausalLM

        return MegatronGPASForCausalLM
    raise AnalysisError(f"unsupported model_type {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")


def load_model(directory: str, model_type: str, dtype: torch.dtype, device: torch.device):
    cls = model_class(model_type)
    model = cls.from_pretrained(directory, dtype=dtype, local_files_only=True)  # never downloads
    return model.to(device).eval()


# --------------------------------------------------------------------------- evaluation helpers


class ProgressPrinter:
    """Prints samples done and tokens/s every ``interval_s`` seconds (and at the end), tagged ``[tag]``."""

    def __init__(self, log: Callable[[str], None], interval_s: float, tag: str = "kurtosis"):
        self.log, self.interval_s, self.last, self.tag = log, interval_s, 0.0, tag

    def __call__(self, done: int, total: int, tokens: int, elapsed: float) -> None:
        if done < total and elapsed - self.last < self.interval_s:
            return
        self.last = elapsed
        rate = tokens / elapsed if elapsed > 0 else float("inf")
        eta = (total - done) * elapsed / done if done else float("nan")
        self.log(f"[{self.tag}] {done}/{total} samples | {tokens:,} tokens | {rate:,.0f} tokens/s | "
                 f"elapsed {elapsed:.0f}s | eta {eta:.0f}s")


def device_of(name: str) -> torch.device:
    """``auto``: the GPU when there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AnalysisError(f"--device {name}, but no CUDA device is available")
    return device


@contextlib.contextmanager
def opened_model(source: ModelSource, dtype: torch.dtype, device: torch.device, *, export_dir: str | None = None,
                 log: Callable[[str], None] = print, tag: str = "analysis", progress: bool = True):
    """The model of ``source`` loaded for evaluation, and (for a Megatron checkpoint) what its temporary
    export was: yields (model, export_info or None); the export is deleted afterwards."""
    with tempfile.TemporaryDirectory(prefix=f"{tag}_export_", dir=export_dir) as tmp:
        directory, export_info = source.directory, None
        if source.kind == "megatron":
            from megatron_gpas.hf.export import export_checkpoint

            # "custom": our class computes the Megatron model as is, for every scheme (no folding,
            # whose only approximation is RMSNorm's ε, and no fallback decisions).
            log(f"[{tag}] exporting {source.directory} to a temporary Hugging Face directory")
            exported = export_checkpoint(source.directory, os.path.join(tmp, "model"), target="custom", progress=progress)
            directory = exported.out_dir
            export_info = {"checkpoint": exported.checkpoint, "format": exported.format, "dtype": exported.dtype}
        model = load_model(directory, source.model_type, dtype, device)
        try:
            yield model, export_info
        finally:
            del model


# --------------------------------------------------------------------------- the tools' command lines


def add_model_and_data_arguments(p, *, samples: int, seq_len: int, dtype: str, what: str) -> None:
    """The arguments every analysis tool takes: MODEL, the data and its cut, the model's dtype and
    device, and where the results go (``what``: the per-layer values the PNG shows)."""
    p.add_argument("model", metavar="MODEL", help="Hugging Face model directory, or Megatron save root / iter_N/")
    p.add_argument("--data", required=True, metavar="PREFIX", help="indexed dataset prefix (PREFIX.bin/.idx)")
    p.add_argument("--samples", type=int, default=samples, help=f"sequences (default {samples})")
    p.add_argument("--seq-len", type=int, default=seq_len, help=f"tokens per sequence (default {seq_len})")
    p.add_argument("--documents", type=int, default=None, metavar="N",
                   help="use only the dataset's first N documents; default all")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=dtype, help=f"model dtype (default {dtype})")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--batch-size", type=int, default=1, help="samples per forward pass (default 1)")
    p.add_argument("--name", help="model name for the plot title and the JSON (default: from MODEL's path)")
    p.add_argument("--output", metavar="JSON", help="write the per-layer values and the settings here")
    p.add_argument("--plot", metavar="PNG", help=f"write a plot of {what} here")
    p.add_argument("--export-dir", help="where a Megatron checkpoint's temporary export goes (default: system temp)")
    p.add_argument("--progress-interval", type=float, default=10.0,
                   help="seconds between progress lines (default 10; 0: no progress output)")


def output_path_problem(args) -> str | None:
    """A clear error when --output or --plot points into a directory that does not exist."""
    for path, flag in ((args.output, "--output"), (args.plot, "--plot")):
        parent = os.path.dirname(os.path.abspath(path)) if path else None
        if parent and not os.path.isdir(parent):
            return f"{flag} {path}: directory {parent} does not exist"
    return None


def write_json(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")


def prepare_inputs(model_path: str, data_prefix: str, *, samples: int, seq_len: int, documents: int | None,
                   dtype: str, device: str, batch_size: int, tag: str, log: Callable[[str], None],
                   mode: str = "contextual") -> tuple[ModelSource, TokenSamples, torch.device]:
    """Everything checked before any weights are read: the options, MODEL (from its config) and the
    data (its length, its token ids against the model's vocabulary); the plan is logged."""
    if dtype not in DTYPES:
        raise AnalysisError(f"unknown --dtype {dtype!r} ({' | '.join(DTYPES)})")
    if batch_size < 1:
        raise AnalysisError(f"--batch-size must be positive (got {batch_size})")
    device = device_of(device)
    source = resolve_model(model_path)
    data = load_samples(data_prefix, samples, seq_len, max_documents=documents, vocab_size=source.vocab_size)
    log(f"[{tag}] model {source.name} ({source.kind}, {source.model_type}); data {data_prefix}: "
        f"{samples} samples × {seq_len} tokens from {data.documents_used} of "
        f"{data.documents_in_dataset} documents ({data.tokens_unused:,} tokens of the "
        f"{data.documents_considered} documents considered left unused); {mode}; {dtype} on {device}")
    if mode == "contextual" and source.max_positions and seq_len > source.max_positions:
        log(f"[{tag}] warning: --seq-len {seq_len} exceeds the model's max_position_embeddings "
            f"{source.max_positions}: positions beyond it were never trained")
    return source, data, device


def describe_inputs(model_path: str, source: ModelSource, data: TokenSamples, name: str | None, model_class_name: str,
                    export_info: dict | None) -> dict:
    """The "model", "export" and "data" parts of a tool's JSON report."""
    return {
        "model": {"name": name or source.name, "path": os.path.abspath(model_path), "kind": source.kind,
                  "directory": source.directory, "class": model_class_name, "model_type": source.model_type,
                  "vocab_size": source.vocab_size, "num_layers": source.num_layers},
        "export": export_info,
        "data": {"prefix": os.path.abspath(data.prefix), "documents_in_dataset": data.documents_in_dataset,
                 "documents_considered": data.documents_considered, "documents_used": data.documents_used,
                 "tokens_considered": data.tokens_considered, "tokens_used": data.tokens.numel(),
                 "tokens_unused": data.tokens_unused, "max_token_id": data.max_token_id},
    }


def run_tool(args, tag: str, measure: Callable[[], dict], format_report: Callable[[dict], str],
             plot: Callable[[dict, str], str]) -> int:
    """A tool's main: the output paths checked, ``measure()`` run (its request errors printed, exit 2),
    the report printed, --output and --plot written; 0 on success."""
    import sys

    from megatron_gpas.checkpoint_paths import CheckpointError

    problem = output_path_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        report = measure()
    except (AnalysisError, CheckpointError, ValueError, FileNotFoundError) as e:  # DataCorruptError, ExportError: ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.output:
        write_json(report, args.output)
        print(f"[{tag}] wrote {args.output}")
    if args.plot:
        print(f"[{tag}] wrote {plot(report, args.plot)}")
    return 0
