"""OSP's excess-kurtosis metric of a model's hidden states (``tools/kurtosis.py``, docs/kurtosis.md).

Outlier-Safe Pre-Training (Park et al., ACL 2025, arXiv 2506.19697) measures activation
outliers with the excess kurtosis of every hidden state that Hugging Face returns with
``output_hidden_states=True``: the embedding output and every decoder layer's output (for
Llama-style models the last one is taken after the final RMSNorm). Per token, over the
hidden dimension::

    k(x) = relu( mean_i(x_i^4) / std(x)^4 - 3 )

``std`` is torch's default: centred, unbiased (n - 1). The fourth moment is *not* centred.
That is OSP's definition, not the textbook one (which centres both); for hidden states
with a non-zero mean the two differ, so do not "fix" it. The reported number is the mean of
``k`` over tokens, samples and hidden states; per hidden state ("layer") means are reported
too. OSP reports 1818.56 for its Adam-trained 1.4B model and 0.04 for the OSP one.

Data: OSP concatenates the first 1000 documents of C4's validation set and cuts the stream
into 128 samples of 2048 tokens. Here the documents come from an indexed dataset
(``tools/preprocess_data.py``), concatenated in order, cut the same way.

Context: OSP's script calls ``model(seq.unsqueeze(1))`` on a 2048-token sample, i.e. a batch
of 2048 sequences of ONE token each, so every token is processed at position 0 with no
context (attention over a single position returns that token's own value vector). The
default here is the contextual computation, each sample a sequence of ``seq_len`` tokens;
``length_one_quirk=True`` reproduces OSP's script.

The model runs in bfloat16 by default, as in OSP's script; the statistic is computed from
the hidden states upcast to float32 (``stat_dtype``; "native" keeps the model's dtype).
Tokens whose statistic is not finite (a hidden state with zero variance, or an overflow)
cannot enter a mean: they are skipped and counted per hidden state.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEFAULT_DTYPE = "bfloat16"  # OSP's script runs the model in bf16
STAT_DTYPES = {"float32": torch.float32, "float64": torch.float64, "native": None}
# OSP's protocol: 128 samples x 2048 tokens of C4 validation (its first 1000 documents)
OSP_SAMPLES, OSP_SEQ_LEN, OSP_DOCUMENTS = 128, 2048, 1000
SUPPORTED_MODEL_TYPES = ("llama", "megatron_gpas")


class KurtosisError(ValueError):
    """A request this tool cannot serve (bad model path, too little data, wrong vocabulary...)."""


# --------------------------------------------------------------------------- the metric


def excess_kurtosis(hidden: torch.Tensor, stat_dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """OSP's per-vector excess kurtosis over the last dimension: relu(mean(x⁴) / std(x)⁴ − 3).

    ``std`` is centred and unbiased (torch's default), the fourth moment is not centred (as in
    OSP). ``stat_dtype``: the precision of the computation (None: ``hidden``'s own dtype).
    Returns a tensor of ``hidden.shape[:-1]``; a zero-variance vector gives a non-finite value.
    """
    x = hidden if stat_dtype is None else hidden.to(stat_dtype)
    fourth_moment = x.pow(4).mean(dim=-1)
    std = x.std(dim=-1)
    return torch.relu(fourth_moment / std.pow(4) - 3.0)


def hidden_state_names(num_hidden_states: int) -> list[str]:
    """Names of the hidden states HF returns: the embedding output, then one per decoder layer
    (the last one after the final norm)."""
    layers = num_hidden_states - 1
    return ["embedding"] + [f"layer {i}" for i in range(1, layers)] + [f"layer {layers} (after final norm)"]


# --------------------------------------------------------------------------- data


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

    KurtosisError if the data is too short or holds an id ≥ ``vocab_size``; DataCorruptError
    (a ValueError) if ``PREFIX.bin/.idx`` are missing or corrupt.
    """
    from megatron_gpas.data.datasets import check_indexed_dataset  # Megatron's IndexedDataset, checked

    if samples < 1 or seq_len < 1:
        raise KurtosisError(f"--samples and --seq-len must be positive (got {samples} and {seq_len})")
    if max_documents is not None and max_documents < 1:
        raise KurtosisError(f"--documents must be positive (got {max_documents})")
    dataset = check_indexed_dataset(prefix, allow_empty=True)
    index = dataset.index
    documents = int(index.document_count) - 1
    if max_documents is not None and max_documents > documents:
        raise KurtosisError(f"--documents {max_documents}, but {prefix} holds only {documents} documents")
    considered = documents if max_documents is None else max_documents
    # A document is a run of sequences: document d spans sequences doc_start[d] .. doc_start[d + 1] - 1.
    doc_start = np.asarray(index.document_indices, dtype=np.int64)
    num_sequences = int(doc_start[considered])
    lengths = np.asarray(index.sequence_lengths[:num_sequences], dtype=np.int64)
    available = int(lengths.sum())
    needed = samples * seq_len
    if available < needed:
        which = "its" if considered == documents else f"its first {considered} (of {documents})"
        raise KurtosisError(
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
        raise KurtosisError(
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
        raise KurtosisError(f"MODEL {path} does not exist")
    if not os.path.isdir(path):
        raise KurtosisError(f"MODEL {path} is not a directory (a Hugging Face model directory or a Megatron "
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
        raise KurtosisError(f"cannot read {config_file}: {e}") from e
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise KurtosisError(
            f"{config_file} has model_type {model_type!r}; supported: 'llama' (transformers' LlamaForCausalLM) and "
            "'megatron_gpas' (this package's MegatronGPASForCausalLM, as tools/convert_to_hf.py exports it)")
    for key in ("vocab_size", "num_hidden_layers"):
        if not isinstance(config.get(key), int):
            raise KurtosisError(f"{config_file} has no integer {key!r}")
    return ModelSource(path=path, kind="huggingface", directory=os.path.abspath(path), model_type=model_type,
                       vocab_size=config["vocab_size"], max_positions=config.get("max_position_embeddings"),
                       num_layers=config["num_hidden_layers"], name=os.path.basename(os.path.abspath(path)))


def _megatron_source(path: str) -> ModelSource:
    import yaml

    from megatron_gpas.checkpoint import RUN_CONFIG, CheckpointError, find_latest

    try:
        checkpoint = find_latest(path)
    except CheckpointError as e:
        raise KurtosisError(f"MODEL {path}: {e}") from e
    if checkpoint is None:
        raise KurtosisError(
            f"MODEL {path} is neither a Hugging Face model directory (it has no config.json) nor a Megatron "
            "checkpoint (no metadata.json, no complete iter_N/ under it)")
    run_config_file = os.path.join(checkpoint, RUN_CONFIG)
    if not os.path.isfile(run_config_file):
        raise KurtosisError(f"{checkpoint} has no {RUN_CONFIG}: cannot tell the model's architecture")
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
    raise KurtosisError(f"unsupported model_type {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")


def load_model(directory: str, model_type: str, dtype: torch.dtype, device: torch.device):
    cls = model_class(model_type)
    model = cls.from_pretrained(directory, dtype=dtype, local_files_only=True)  # never downloads
    return model.to(device).eval()


# --------------------------------------------------------------------------- the evaluation loop


@dataclass
class KurtosisResult:
    names: list[str]
    per_layer: list[float | None]  # mean over the finite per-token values (None: none was finite)
    overall: float | None  # mean over tokens, samples and hidden states
    tokens_per_layer: int  # tokens evaluated at each hidden state
    nonfinite: list[int]  # tokens skipped per hidden state (non-finite statistic)
    elapsed_s: float


class ProgressPrinter:
    """Prints samples done and tokens/s every ``interval_s`` seconds (and at the end)."""

    def __init__(self, log: Callable[[str], None], interval_s: float):
        self.log, self.interval_s, self.last = log, interval_s, 0.0

    def __call__(self, done: int, total: int, tokens: int, elapsed: float) -> None:
        if done < total and elapsed - self.last < self.interval_s:
            return
        self.last = elapsed
        rate = tokens / elapsed if elapsed > 0 else float("inf")
        eta = (total - done) * elapsed / done if done else float("nan")
        self.log(f"[kurtosis] {done}/{total} samples | {tokens:,} tokens | {rate:,.0f} tokens/s | "
                 f"elapsed {elapsed:.0f}s | eta {eta:.0f}s")


@torch.no_grad()
def evaluate(model, tokens: torch.Tensor, *, length_one_quirk: bool = False, batch_size: int = 1,
             stat_dtype: torch.dtype | None = torch.float32,
             progress: Callable[[int, int, int, float], None] | None = None) -> KurtosisResult:
    """Per-hidden-state mean excess kurtosis of ``model`` (a HF causal LM) on ``tokens``
    [samples, seq_len], ``batch_size`` samples per forward pass.

    Contextual (default): each sample is one sequence. ``length_one_quirk``: each sample is a
    batch of seq_len sequences of one token (OSP's ``model(seq.unsqueeze(1))``).
    """
    if batch_size < 1:
        raise KurtosisError(f"--batch-size must be positive (got {batch_size})")
    base = model.base_model  # the decoder stack: hidden states without computing the LM head's logits
    device = next(model.parameters()).device
    samples, seq_len = tokens.shape
    sums = counts = nonfinite = None
    start_time = time.perf_counter()
    for start in range(0, samples, batch_size):
        batch = tokens[start:start + batch_size].to(device)
        input_ids = batch.reshape(-1, 1) if length_one_quirk else batch
        hidden_states = base(input_ids=input_ids, output_hidden_states=True, use_cache=False).hidden_states
        if sums is None:
            # float64 accumulators: 128 × 2048 values of up to ~1e4 per hidden state
            sums = torch.zeros(len(hidden_states), dtype=torch.float64, device=device)
            counts = torch.zeros(len(hidden_states), dtype=torch.int64, device=device)
            nonfinite = torch.zeros_like(counts)
        for i, hidden in enumerate(hidden_states):
            k = excess_kurtosis(hidden, stat_dtype)
            finite = torch.isfinite(k)
            sums[i] += k[finite].sum(dtype=torch.float64)
            counts[i] += finite.sum()
            nonfinite[i] += k.numel() - finite.sum()
        if progress is not None:
            done = min(start + batch_size, samples)
            progress(done, samples, done * seq_len, time.perf_counter() - start_time)
    sums, counts, nonfinite = sums.cpu(), counts.cpu(), nonfinite.cpu()
    per_layer = [float(s / c) if c else None for s, c in zip(sums.tolist(), counts.tolist())]
    total = int(counts.sum())
    return KurtosisResult(
        names=hidden_state_names(len(per_layer)), per_layer=per_layer,
        overall=float(sums.sum() / total) if total else None, tokens_per_layer=samples * seq_len,
        nonfinite=[int(n) for n in nonfinite.tolist()], elapsed_s=time.perf_counter() - start_time)


# --------------------------------------------------------------------------- the whole measurement


@dataclass
class Settings:
    samples: int = OSP_SAMPLES
    seq_len: int = OSP_SEQ_LEN
    length_one_quirk: bool = False
    dtype: str = DEFAULT_DTYPE
    stat_dtype: str = "float32"
    device: str = "auto"
    batch_size: int = 1
    documents: int | None = None  # only the first N documents of the dataset (OSP: 1000)
    export_dir: str | None = None  # where a Megatron checkpoint's temporary export goes
    progress_interval: float = 10.0  # seconds between progress lines; <= 0: none


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KurtosisError(f"--device {name}, but no CUDA device is available")
    return device


def measure(model_path: str, data_prefix: str, settings: Settings, *, name: str | None = None,
            log: Callable[[str], None] = print) -> dict:
    """Resolve MODEL, read and check the data (before any weights are read), export a Megatron
    checkpoint to a temporary directory if needed, run the model and return the report."""
    if settings.dtype not in DTYPES:
        raise KurtosisError(f"unknown --dtype {settings.dtype!r} ({' | '.join(DTYPES)})")
    if settings.stat_dtype not in STAT_DTYPES:
        raise KurtosisError(f"unknown --stat-dtype {settings.stat_dtype!r} ({' | '.join(STAT_DTYPES)})")
    if settings.batch_size < 1:
        raise KurtosisError(f"--batch-size must be positive (got {settings.batch_size})")
    device = _device(settings.device)
    source = resolve_model(model_path)
    data = load_samples(data_prefix, settings.samples, settings.seq_len, max_documents=settings.documents,
                        vocab_size=source.vocab_size)
    mode = "length_one_quirk" if settings.length_one_quirk else "contextual"
    log(f"[kurtosis] model {source.name} ({source.kind}, {source.model_type}); data {data_prefix}: "
        f"{settings.samples} samples × {settings.seq_len} tokens from {data.documents_used} of "
        f"{data.documents_in_dataset} documents ({data.tokens_unused:,} tokens of the "
        f"{data.documents_considered} documents considered left unused); {mode}; {settings.dtype} on {device}")
    if not settings.length_one_quirk and source.max_positions and settings.seq_len > source.max_positions:
        log(f"[kurtosis] warning: --seq-len {settings.seq_len} exceeds the model's max_position_embeddings "
            f"{source.max_positions}: positions beyond it were never trained")

    show_progress = settings.progress_interval > 0
    progress = ProgressPrinter(log, settings.progress_interval) if show_progress else None
    export_info = None
    with tempfile.TemporaryDirectory(prefix="kurtosis_export_", dir=settings.export_dir) as tmp:
        directory = source.directory
        if source.kind == "megatron":
            from megatron_gpas.hf.export import export_checkpoint

            # "custom": our class computes the Megatron model as is, for every scheme (no folding,
            # whose only approximation is RMSNorm's ε, and no fallback decisions).
            log(f"[kurtosis] exporting {source.directory} to a temporary Hugging Face directory")
            exported = export_checkpoint(source.directory, os.path.join(tmp, "model"), target="custom",
                                         progress=show_progress)
            directory = exported.out_dir
            export_info = {"checkpoint": exported.checkpoint, "format": exported.format, "dtype": exported.dtype}
        model = load_model(directory, source.model_type, DTYPES[settings.dtype], device)
        result = evaluate(model, data.tokens, length_one_quirk=settings.length_one_quirk,
                          batch_size=settings.batch_size, stat_dtype=STAT_DTYPES[settings.stat_dtype],
                          progress=progress)
        model_class_name = type(model).__name__
        del model

    tokens = result.tokens_per_layer
    return {
        "metric": "OSP excess kurtosis: relu(mean(x^4) / std(x)^4 - 3) per token over the hidden dimension "
                  "(std unbiased and centred, 4th moment not centred); mean over tokens, samples, hidden states",
        "model": {"name": name or source.name, "path": os.path.abspath(model_path), "kind": source.kind,
                  "directory": source.directory, "class": model_class_name, "model_type": source.model_type,
                  "vocab_size": source.vocab_size, "num_layers": source.num_layers},
        "export": export_info,
        "data": {"prefix": os.path.abspath(data_prefix), "documents_in_dataset": data.documents_in_dataset,
                 "documents_considered": data.documents_considered, "documents_used": data.documents_used,
                 "tokens_considered": data.tokens_considered, "tokens_used": tokens,
                 "tokens_unused": data.tokens_unused, "max_token_id": data.max_token_id},
        "settings": {"samples": settings.samples, "seq_len": settings.seq_len, "mode": mode,
                     "length_one_quirk": settings.length_one_quirk, "dtype": settings.dtype,
                     "stat_dtype": settings.stat_dtype, "device": str(device), "batch_size": settings.batch_size,
                     "documents": settings.documents},
        "overall": result.overall,
        "per_layer": [{"index": i, "name": n, "kurtosis": k, "tokens": tokens - skipped, "nonfinite_tokens": skipped}
                      for i, (n, k, skipped) in enumerate(zip(result.names, result.per_layer, result.nonfinite))],
        "nonfinite_tokens": sum(result.nonfinite),
        "elapsed_s": round(result.elapsed_s, 3),
        "tokens_per_s": round(settings.samples * settings.seq_len / result.elapsed_s, 1) if result.elapsed_s else None,
    }


def format_report(report: dict) -> str:
    """The per-layer table and the overall value, as printed by the CLI."""
    width = max(len(layer["name"]) for layer in report["per_layer"])
    lines = [f"{'hidden state':<{width}}  excess kurtosis"]
    for layer in report["per_layer"]:
        value = "n/a" if layer["kurtosis"] is None else f"{layer['kurtosis']:.4f}"
        skipped = f"  ({layer['nonfinite_tokens']} non-finite tokens skipped)" if layer["nonfinite_tokens"] else ""
        lines.append(f"{layer['name']:<{width}}  {value:>15}{skipped}")
    overall = "n/a" if report["overall"] is None else f"{report['overall']:.4f}"
    s = report["settings"]
    lines.append(f"overall (mean over {s['samples']} samples × {s['seq_len']} tokens × {len(report['per_layer'])} "
                 f"hidden states, {s['mode']}): {overall}")
    if report["nonfinite_tokens"]:
        lines.append(f"warning: {report['nonfinite_tokens']} token values were not finite (zero variance or "
                     "overflow) and are left out of the means")
    return "\n".join(lines)


def plot_per_layer(report: dict, path: str) -> str:
    """PNG of the per-hidden-state kurtosis (the project's plot style, megatron_gpas/plots.py)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    layers = [(layer["index"], layer["kurtosis"]) for layer in report["per_layer"] if layer["kurtosis"] is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if layers:
        x, y = zip(*layers)
        ax.plot(x, y, marker="o", label="per hidden state")
        if max(y) > 100:  # OSP's Adam baseline reaches the thousands, its OSP model ~0: symlog shows both
            ax.set_yscale("symlog", linthresh=1.0)
    if report["overall"] is not None:
        ax.axhline(report["overall"], color="tab:red", linestyle="--", label=f"overall {report['overall']:.2f}")
    num_layers = len(report["per_layer"]) - 1
    ax.set_xlabel(f"hidden state (0 = embedding output, {num_layers} = last layer after the final norm)")
    ax.set_ylabel("excess kurtosis (mean over tokens)")
    s = report["settings"]
    ax.set_title(f"Excess kurtosis per layer: {report['model']['name']}\n"
                 f"{s['samples']}×{s['seq_len']} tokens, {s['mode'].replace('_', ' ')}, {s['dtype']}", fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["KurtosisError", "Settings", "evaluate", "excess_kurtosis", "format_report", "hidden_state_names",
           "load_model", "load_samples", "measure", "model_class", "plot_per_layer", "resolve_model"]

