"""PNG summaries of a run from its metrics.jsonl: loss curves and per-layer GPAS gates."""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict


def read_metrics(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)], last write wins for a step (a resumed run rewrites steps)."""
    series: dict[str, dict[int, float]] = defaultdict(dict)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            step = record.pop("step")
            for tag, value in record.items():
                series[tag][step] = value
    return {tag: sorted(points.items()) for tag, points in series.items()}


# a per-layer tag: <group>/<name>/layer_<l>[_suffix], l the global 1-based layer (suffix e.g. _attn, _mlp)
LAYER_TAG = re.compile(r"^(?P<family>[^/]+/[^/]+)/layer_(?P<layer>\d+)(?P<suffix>_\w+)?$")


def layer_families(series) -> dict[str, dict[tuple[int, str], list]]:
    """family (``<group>/<name>``) -> {(layer, suffix): series[tag]} for every per-layer tag."""
    families: dict[str, dict[tuple[int, str], list]] = defaultdict(dict)
    for tag, points in series.items():
        if m := LAYER_TAG.match(tag):
            families[m["family"]][(int(m["layer"]), m["suffix"] or "")] = points
    return dict(families)


def _layer_series(series, family: str):
    return sorted(layer_families(series).get(family, {}).items())


def plot_run(run_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_metrics(run_dir)
    written = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for tag, label in (("train/loss", "train"), ("eval/loss", "eval")):
        if tag in series:
            steps, values = zip(*series[tag])
            ax.plot(steps, values, marker="o" if tag.startswith("eval") else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    path = os.path.join(run_dir, "loss.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

    variances = _layer_series(series, "activations/variance")
    if variances:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        cmap = plt.get_cmap("viridis")
        for i, (layer, points) in enumerate(variances):
            steps, values = zip(*points)
            ax.plot(steps, values, color=cmap(i / max(len(variances) - 1, 1)), label=f"layer {layer[0]}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title("variance of each layer's input hidden state")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        path = os.path.join(run_dir, "activation_variance.png")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    alphas = _layer_series(series, "gpas/alpha")
    if alphas:
        scales = _layer_series(series, "gpas/scale")
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        cmap = plt.get_cmap("viridis")
        for ax, curves, title in ((axes[0], alphas, "gate α per layer"),
                                  (axes[1], scales, "residual scale 1 − act(α) per layer")):
            for i, (layer, points) in enumerate(curves):
                steps, values = zip(*points)
                ax.plot(steps, values, color=cmap(i / max(len(curves) - 1, 1)), label=f"layer {layer[0]}{layer[1]}")
            ax.set_xlabel("step")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7, ncol=2)
        path = os.path.join(run_dir, "gates.png")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
