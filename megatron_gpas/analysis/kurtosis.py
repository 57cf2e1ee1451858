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

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_gpas.analysis.model_inputs import (DTYPES, SUPPORTED_MODEL_TYPES, AnalysisError, ModelSource,
                                                 ProgressPrinter, TokenSamples, describe_inputs, load_model,
                                                 load_samples, model_class, opened_model, prepare_inputs,
                                                 resolve_model)

DEFAULT_DTYPE = "bfloat16"  # OSP's script runs the model in bf16
STAT_DTYPES = {"float32": torch.float32, "float64": torch.float64, "native": None}
# OSP's protocol: 128 samples x 2048 tokens of C4 validation (its first 1000 documents)
OSP_SAMPLES, OSP_SEQ_LEN, OSP_DOCUMENTS = 128, 2048, 1000
KurtosisError = AnalysisError  # this tool's errors (the analysis tools share them)


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


# --------------------------------------------------------------------------- the evaluation loop


@dataclass
class KurtosisResult:
    names: list[str]
    per_layer: list[float | None]  # mean over the finite per-token values (None: none was finite)
    overall: float | None  # mean over tokens, samples and hidden states
    tokens_per_layer: int  # tokens evaluated at each hidden state
    nonfinite: list[int]  # tokens skipped per hidden state (non-finite statistic)
    elapsed_s: float


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


def measure(model_path: str, data_prefix: str, settings: Settings, *, name: str | None = None,
            log: Callable[[str], None] = print) -> dict:
    """Resolve MODEL, read and check the data (before any weights are read), export a Megatron
    checkpoint to a temporary directory if needed, run the model and return the report."""
    if settings.stat_dtype not in STAT_DTYPES:
        raise KurtosisError(f"unknown --stat-dtype {settings.stat_dtype!r} ({' | '.join(STAT_DTYPES)})")
    mode = "length_one_quirk" if settings.length_one_quirk else "contextual"
    source, data, device = prepare_inputs(model_path, data_prefix, samples=settings.samples, seq_len=settings.seq_len,
                                          documents=settings.documents, dtype=settings.dtype, device=settings.device,
                                          batch_size=settings.batch_size, tag="kurtosis", log=log, mode=mode)

    show_progress = settings.progress_interval > 0
    progress = ProgressPrinter(log, settings.progress_interval) if show_progress else None
    with opened_model(source, DTYPES[settings.dtype], device, export_dir=settings.export_dir, log=log, tag="kurtosis",
                      progress=show_progress) as (model, export_info):
        result = evaluate(model, data.tokens, length_one_quirk=settings.length_one_quirk,
                          batch_size=settings.batch_size, stat_dtype=STAT_DTYPES[settings.stat_dtype],
                          progress=progress)
        model_class_name = type(model).__name__

    tokens = result.tokens_per_layer
    return {
        "metric": "OSP excess kurtosis: relu(mean(x^4) / std(x)^4 - 3) per token over the hidden dimension "
                  "(std unbiased and centred, 4th moment not centred); mean over tokens, samples, hidden states",
        **describe_inputs(model_path, source, data, name, model_class_name, export_info),
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


__all__ = ["DTYPES", "SUPPORTED_MODEL_TYPES", "KurtosisError", "ModelSource", "ProgressPrinter", "Settings", "TokenSamples", "evaluate", "excess_kurtosis",
           "format_report", "hidden_state_names", "load_model", "load_samples", "measure", "model_class",
           "plot_per_layer", "resolve_model"]

