"""PNG summaries of a run from its metrics.jsonl: loss curves, per-layer variance and GPAS gates, and the
per-layer telemetry over depth; titles name the run (its folder and scheme)."""

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


def save_figure(fig, folder: str, name: str) -> str:
    """Write ``fig`` as ``folder/name`` (tight layout, 120 dpi), close it; returns the path."""
    import matplotlib.pyplot as plt

    path = os.path.join(folder, name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def scheme_of(config: dict) -> str:
    """``pre+gpas`` / ``pre`` from a saved config tree (norm.scheme, gpas.enabled)."""
    scheme = (config.get("norm") or {}).get("scheme", "?")
    return scheme + ("+gpas" if (config.get("gpas") or {}).get("enabled") else "")


def run_title(run_dir: str) -> str:
    """"folder (scheme)" for plot titles, the scheme from the run's config.yaml when it has one."""
    import yaml

    from megatron_gpas.run_folder import CONFIG

    name = os.path.basename(os.path.abspath(run_dir))
    path = os.path.join(run_dir, CONFIG)
    if not os.path.isfile(path):
        return name
    with open(path) as f:
        return f"{name} ({scheme_of(yaml.safe_load(f) or {})})"


# the per-layer telemetry drawn over depth at the last logged step by plot_run (layer_telemetry.py)
DEPTH_PANELS = (("layers/grad_norm", "gradient L2 norm"), ("layers/weight_norm", "weight L2 norm"),
                ("layers/update_ratio", "‖ΔW‖ / ‖W‖ of the step"),
                ("layers/branch_to_shortcut", "RMS(branch) / RMS(shortcut)"))


def plot_run(run_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    series = read_metrics(run_dir)
    title = run_title(run_dir)
    written = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for tag, label in (("train/loss", "train"), ("eval/loss", "eval")):
        if tag in series:
            steps, values = zip(*series[tag])
            ax.plot(steps, values, marker="o" if tag.startswith("eval") else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"Loss: {title}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(save_figure(fig, run_dir, "loss.png"))

    variances = _layer_series(series, "activations/variance")
    if variances:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        cmap = plt.get_cmap("viridis")
        for i, (layer, points) in enumerate(variances):
            steps, values = zip(*points)
            ax.plot(steps, values, color=cmap(i / max(len(variances) - 1, 1)), label=f"layer {layer[0]}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("variance")
        ax.set_title(f"Variance of each layer's input hidden state: {title}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        written.append(save_figure(fig, run_dir, "activation_variance.png"))

    alphas = _layer_series(series, "gpas/alpha")
    if alphas:
        scales = _layer_series(series, "gpas/scale")
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        cmap = plt.get_cmap("viridis")
        for ax, curves, panel in ((axes[0], alphas, "gate α per layer"),
                                  (axes[1], scales, "residual scale 1 − act(α) per layer")):
            for i, (layer, points) in enumerate(curves):
                steps, values = zip(*points)
                ax.plot(steps, values, color=cmap(i / max(len(curves) - 1, 1)), label=f"layer {layer[0]}{layer[1]}")
            ax.set_xlabel("step")
            ax.set_ylabel(panel)
            ax.set_title(panel)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7, ncol=2)
        fig.suptitle(f"GPAS gates: {title}")
        written.append(save_figure(fig, run_dir, "gates.png"))

    families = layer_families(series)
    panels = [(family, label) for family, label in DEPTH_PANELS if family in families]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
        for ax, (family, label) in zip(axes[0], panels):
            curves: dict[str, dict[int, float]] = defaultdict(dict)
            for (layer, suffix), points in families[family].items():
                curves[suffix.lstrip("_") or "whole layer"][layer] = points[-1][1]
            for name, values in sorted(curves.items()):
                layers = sorted(values)
                ax.plot(layers, [values[l] for l in layers], marker="o", label=name)
            ax.set_xlabel("layer")
            ax.set_ylabel(label)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        step = max(points[-1][0] for points in families[panels[0][0]].values())
        fig.suptitle(f"Per-layer telemetry at step {step}: {title}")
        written.append(save_figure(fig, run_dir, "layers.png"))
    return written
