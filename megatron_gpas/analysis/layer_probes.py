"""Two per-layer analyses of a trained model on held-out data (``tools/layer_importance.py``,
``tools/activation_profile.py``; inputs: model_inputs.py).

Layer importance (the GPAS paper's Fig. 7): the mean next-token loss of the model, and of the model
with layer l skipped (its input passed on unchanged: the whole layer, both sub-layers and its
GPAS gate), for every l. importance(l) = loss(without l) − loss; a layer that computes the identity
has importance 0.

Activation profile: for the input of every layer l (the residual stream the layer reads, as the
training tag activations/variance/layer_{l}) and the last layer's output (before the final norm),
over all tokens of the samples:

    variance        of all elements (mean and variance over tokens × channels)
    rms, max_abs    √mean(x²), max |x|
    outlier_fraction  the fraction of elements more than 6 standard deviations from their token's mean
                    (per-token statistics over the channels: one pass, nothing stored)
    kurtosis        OSP's excess kurtosis per token (analysis/kurtosis.py), averaged
    top_channel_ratio  the largest channel mean |x_c| over the median one (massive activations)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megatron_gpas.analysis.kurtosis import excess_kurtosis
from megatron_gpas.analysis.model_inputs import (DTYPES, AnalysisError, ProgressPrinter, describe_inputs, opened_model,
                                                 prepare_inputs)

OUTLIER_SIGMAS = 6.0
Progress = Callable[[int, int, int, float], None]


def decoder_layers(model) -> nn.ModuleList:
    """The decoder layers of a Hugging Face causal LM (Llama or our class)."""
    return model.base_model.layers


def _batches(tokens: torch.Tensor, batch_size: int, device):
    if batch_size < 1:
        raise AnalysisError(f"--batch-size must be positive (got {batch_size})")
    for start in range(0, tokens.shape[0], batch_size):
        yield start, tokens[start:start + batch_size].to(device)


# --------------------------------------------------------------------------- layer importance


class SkippedLayer(nn.Module):
    """A decoder layer replaced by the identity: its input passes unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@torch.no_grad()
def mean_loss(model, tokens: torch.Tensor, batch_size: int = 1) -> float:
    """Mean next-token cross-entropy over every position of the samples [samples, seq_len] but the last."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for _, batch in _batches(tokens, batch_size, device):
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"))
        count += batch[:, 1:].numel()
    return total / count


@torch.no_grad()
def layer_importance(model, tokens: torch.Tensor, batch_size: int = 1, progress: Progress | None = None) -> dict:
    """{"loss": the full model's mean loss, "skipped": [mean loss with layer l skipped, l = 1..L]}."""
    layers = decoder_layers(model)
    started = time.perf_counter()
    base = mean_loss(model, tokens, batch_size)
    skipped = []
    for index in range(len(layers)):
        layer = layers[index]
        layers[index] = SkippedLayer()
        try:
            skipped.append(mean_loss(model, tokens, batch_size))
        finally:
            layers[index] = layer
        if progress is not None:
            progress(index + 1, len(layers), (index + 2) * tokens.numel(), time.perf_counter() - started)
    return {"loss": base, "skipped": skipped}


# --------------------------------------------------------------------------- activation profile


class _Moments:
    """Running statistics of one hidden state, float64."""

    def __init__(self, width: int, device):
        self.count = 0
        self.sum = torch.zeros((), dtype=torch.float64, device=device)
        self.squares = torch.zeros((), dtype=torch.float64, device=device)
        self.max_abs = 0.0
        self.channel_abs = torch.zeros(width, dtype=torch.float64, device=device)
        self.kurtosis_sum, self.tokens = 0.0, 0
        self.outliers = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach()
        x64 = x.double()
        self.count += x.numel()
        self.sum += x64.sum()
        self.squares += x64.square().sum()
        self.max_abs = max(self.max_abs, float(x64.abs().max()))
        self.channel_abs += x64.abs().reshape(-1, x.shape[-1]).sum(0)
        k = excess_kurtosis(x)
        finite = torch.isfinite(k)
        self.kurtosis_sum += float(k[finite].double().sum())
        self.tokens += int(finite.sum())
        token_mean = x64.mean(-1, keepdim=True)
        token_std = x64.std(-1, keepdim=True)
        self.outliers += int(((x64 - token_mean).abs() > OUTLIER_SIGMAS * token_std).sum())

    def summary(self) -> dict:
        mean = float(self.sum) / self.count
        variance = float(self.squares) / self.count - mean * mean
        channel = self.channel_abs / (self.count // self.channel_abs.numel())
        return {"variance": variance, "rms": (float(self.squares) / self.count) ** 0.5, "max_abs": self.max_abs,
                "outlier_fraction": self.outliers / self.count,
                "kurtosis": self.kurtosis_sum / self.tokens if self.tokens else None,
                "top_channel_ratio": float(channel.max() / channel.median().clamp(min=1e-30))}


@torch.no_grad()
def activation_profile(model, tokens: torch.Tensor, batch_size: int = 1, progress: Progress | None = None) -> dict:
    """{"names": ["layer_1_input", ..., "layer_L_input", "layer_L_output"], "states": [summary, ...]}."""
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    width = model.config.hidden_size
    moments = [_Moments(width, device) for _ in range(len(layers) + 1)]

    def before(index):
        def hook(module, args, kwargs):
            moments[index].add(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])
        return hook

    def after(module, args, kwargs, output):
        moments[-1].add(output[0] if isinstance(output, tuple) else output)

    handles = [layer.register_forward_pre_hook(before(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles.append(layers[-1].register_forward_hook(after, with_kwargs=True))
    started = time.perf_counter()
    try:
        for start, batch in _batches(tokens, batch_size, device):
            model.base_model(input_ids=batch, use_cache=False)
            if progress is not None:
                done = min(start + batch.shape[0], tokens.shape[0])
                progress(done, tokens.shape[0], done * tokens.shape[1], time.perf_counter() - started)
    finally:
        for handle in handles:
            handle.remove()
    names = [f"layer_{l}_input" for l in range(1, len(layers) + 1)] + [f"layer_{len(layers)}_output"]
    return {"names": names, "states": [m.summary() for m in moments]}


# --------------------------------------------------------------------------- the tools


def measure(analysis: str, model_path: str, data_prefix: str, *, samples: int, seq_len: int,
            documents: int | None = None, dtype: str = "float32", device: str = "auto", batch_size: int = 1,
            export_dir: str | None = None, progress_interval: float = 10.0, name: str | None = None,
            log: Callable[[str], None] = print) -> dict:
    """``analysis``: "layer_importance" or "activation_profile". Everything is checked before any
    weights are read; a Megatron checkpoint is exported to a temporary directory of our class."""
    run = {"layer_importance": layer_importance, "activation_profile": activation_profile}[analysis]
    source, data, torch_device = prepare_inputs(model_path, data_prefix, samples=samples, seq_len=seq_len,
                                                documents=documents, dtype=dtype, device=device,
                                                batch_size=batch_size, tag=analysis, log=log)
    show_progress = progress_interval > 0
    progress = ProgressPrinter(log, progress_interval, tag=analysis) if show_progress else None
    started = time.perf_counter()
    with opened_model(source, DTYPES[dtype], torch_device, export_dir=export_dir, log=log, tag=analysis,
                      progress=show_progress) as (model, export_info):
        result = run(model, data.tokens, batch_size, progress)
        model_class_name = type(model).__name__
    report = {
        "analysis": analysis,
        **describe_inputs(model_path, source, data, name, model_class_name, export_info),
        "settings": {"samples": samples, "seq_len": seq_len, "dtype": dtype, "device": str(torch_device),
                     "batch_size": batch_size, "documents": documents},
        "elapsed_s": round(time.perf_counter() - started, 3),
    }
    if analysis == "layer_importance":
        report["loss"] = result["loss"]
        report["per_layer"] = [{"layer": l, "loss_without": loss, "importance": loss - result["loss"],
                                "perplexity_ratio": math.exp(loss - result["loss"])}
                               for l, loss in enumerate(result["skipped"], start=1)]
    else:
        report["per_state"] = [{"name": n, **values} for n, values in zip(result["names"], result["states"])]
    return report


def format_report(report: dict) -> str:
    """The per-layer table, as printed by the CLI."""
    if report["analysis"] == "layer_importance":
        lines = [f"full model: loss {report['loss']:.4f} (perplexity {math.exp(report['loss']):.2f})",
                 "layer  loss without it  importance (Δloss)  perplexity ×"]
        lines += [f"{r['layer']:>5}  {r['loss_without']:>15.4f}  {r['importance']:>18.4f}  {r['perplexity_ratio']:>12.3f}"
                  for r in report["per_layer"]]
        return "\n".join(lines)
    width = max(len(r["name"]) for r in report["per_state"])
    lines = [f"{'hidden state':<{width}}  {'variance':>10}  {'rms':>9}  {'max |x|':>9}  {'>6σ':>9}  {'kurtosis':>9}  "
             f"{'top ch.':>8}"]
    for r in report["per_state"]:
        kurtosis = "n/a" if r["kurtosis"] is None else f"{r['kurtosis']:.3f}"
        lines.append(f"{r['name']:<{width}}  {r['variance']:>10.4g}  {r['rms']:>9.4g}  {r['max_abs']:>9.4g}  "
                     f"{r['outlier_fraction']:>9.2e}  {kurtosis:>9}  {r['top_channel_ratio']:>8.2f}")
    return "\n".join(lines)


def plot(report: dict, path: str) -> str:
    """Layer importance as bars over the layers; the activation profile as variance, max |x| and the
    outlier fraction over depth. Labelled axes, the model's name in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    name, s = report["model"]["name"], report["settings"]
    if report["analysis"] == "layer_importance":
        fig, ax = plt.subplots(figsize=(7, 4.5))
        layers = [r["layer"] for r in report["per_layer"]]
        ax.bar(layers, [r["importance"] for r in report["per_layer"]], color="tab:blue")
        ax.set_xlabel("layer skipped")
        ax.set_ylabel("loss increase (loss without the layer − loss)")
        ax.set_title(f"Layer importance: {name}\nfull-model loss {report['loss']:.3f}; "
                     f"{s['samples']}×{s['seq_len']} tokens", fontsize=10)
        ax.axhline(0.0, color="black", linewidth=0.8)
    else:
        rows = report["per_state"]
        fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
        depth = list(range(1, len(rows) + 1))
        for ax, key, label in zip(axes, ("variance", "max_abs", "outlier_fraction"),
                                  ("variance", "max |x|", "fraction of elements beyond 6σ of their token")):
            values = [r[key] for r in rows]
            ax.plot(depth, values, marker="o")
            if min(values) > 0:
                ax.set_yscale("log")
            else:  # fractions that are 0 somewhere: a linear axis from 0
                ax.set_ylim(bottom=0.0, top=max(max(values) * 1.1, 1e-6))
            ax.set_xlabel(f"input of layer (last point: layer {len(rows) - 1}'s output)")
            ax.set_ylabel(label)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        fig.suptitle(f"Activation profile: {name} ({s['samples']}×{s['seq_len']} tokens)", fontsize=11)
    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def cli(analysis: str, argv, description: str) -> int:
    """The command line of tools/{analysis}.py: the report printed, and --output / --plot written."""
    import argparse

    from megatron_gpas.analysis.model_inputs import add_model_and_data_arguments, run_tool

    p = argparse.ArgumentParser(prog=f"tools/{analysis}.py", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = "the loss increase per skipped layer" if analysis == "layer_importance" else "the statistics over depth"
    add_model_and_data_arguments(p, samples=32, seq_len=1024, dtype="float32", what=what)
    args = p.parse_args(argv)
    return run_tool(args, analysis, lambda: measure(
        analysis, args.model, args.data, samples=args.samples, seq_len=args.seq_len, documents=args.documents,
        dtype=args.dtype, device=args.device, batch_size=args.batch_size, export_dir=args.export_dir,
        progress_interval=args.progress_interval, name=args.name, log=lambda line: print(line, flush=True)),
        format_report, plot)
