"""Several runs side by side (tools/compare_runs.py): overlaid PNGs and a Markdown table.

A run is a ``logging.dir`` folder (megatron_gpas/run_folder.py): ``metrics.jsonl`` (required),
``config.yaml`` (its scheme) and ``summary.json`` (tokens, wall time). Every family of per-layer
tags ``<group>/<name>/layer_<l>[_suffix]`` is drawn as a depth profile at each run's last logged
step, so families added to the trainer appear without changes here. What a run lacks is reported
(which run, which tag), never dropped silently.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import yaml

from megatron_gpas.plots import layer_families, read_metrics, save_figure, scheme_of
from megatron_gpas.run_folder import CONFIG, METRICS, SUMMARY

TABLE = "compare.md"
TABLE_JSON = "compare.json"

# (tag, file, title, y label); the loss is drawn separately (smoothing)
_CURVES = (("eval/loss", "eval_loss.png", "eval loss", "loss (nats/token)"),
           ("perf/tokens_per_s", "throughput.png", "throughput", "tokens/s"))
_GATES = ("gpas/alpha", "gpas/scale")
_VARIANCE = "activations/variance"
# y labels of the families the trainer logs today; any other family is labelled by its tag
_MEANING = {"gpas/alpha": "gate α", "gpas/scale": "residual scale 1 − act(α)",
            "activations/variance": "variance of the layer's input",
            "layers/grad_norm": "gradient L2 norm (before clipping)", "layers/weight_norm": "weight L2 norm",
            "layers/update_ratio": "‖W_after − W_before‖ / ‖W_before‖", "layers/branch_rms": "RMS of the branch output",
            "layers/branch_to_shortcut": "RMS(branch) / RMS(shortcut)"}


class CompareError(ValueError):
    """Bad input (a folder that is not a run, mismatched --names), raised before any plotting."""


@dataclass
class Run:
    path: str
    label: str
    scheme: str
    series: dict[str, list[tuple[int, float]]]
    summary: dict = field(default_factory=dict)


def load_runs(paths: list[str], names: list[str] | None = None) -> tuple[list[Run], list[str]]:
    """The runs, and notes on the files they lack. CompareError naming every folder that is not a
    run (no metrics.jsonl, or no records in it) and a --names count that does not match."""
    errors = []
    for path in paths:
        metrics = os.path.join(path, METRICS)
        if not os.path.isdir(path):
            errors.append(f"{path}: not a directory")
        elif not os.path.isfile(metrics):
            errors.append(f"{path}: no {METRICS} (not a logging.dir of a training run)")
        elif not any(line.strip() for line in open(metrics)):
            errors.append(f"{path}: {METRICS} is empty (the run logged no step)")
    if names is not None and len(names) != len(paths):
        errors.append(f"--names gives {len(names)} names for {len(paths)} runs")
    if errors:
        raise CompareError("cannot compare these runs:\n  " + "\n  ".join(errors))

    runs, notes = [], []
    folder_names = _folder_names(paths)
    for i, path in enumerate(paths):
        config = _read(os.path.join(path, CONFIG), yaml.safe_load)
        summary = _read(os.path.join(path, SUMMARY), json.load)
        for name, content in ((CONFIG, config), (SUMMARY, summary)):
            if content is None:
                notes.append(f"{folder_names[i]} has no {name}" + (": scheme unknown" if name == CONFIG else
                                                                    ": tokens and wall time unknown"))
        scheme = scheme_of(config) if config else "?"
        label = names[i] if names else f"{folder_names[i]} ({scheme})"
        runs.append(Run(path, label, scheme, read_metrics(path), summary or {}))
    return runs, notes


def _read(path: str, parse):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return parse(f)


def _folder_names(paths: list[str]) -> list[str]:
    """Each run's folder name, or its path below the runs' common folder where names repeat."""
    names = [os.path.basename(os.path.abspath(p)) for p in paths]
    if len(set(names)) == len(names):
        return names
    common = os.path.commonpath([os.path.abspath(p) for p in paths])
    return [os.path.relpath(os.path.abspath(p), common) for p in paths]


# --------------------------------------------------------------------------- table


def run_row(run: Run) -> dict:
    """The table's numbers of a run: metrics.jsonl's last/best values and summary.json's totals."""
    def last(tag):
        return run.series[tag][-1][1] if tag in run.series else None

    evals = [v for _, v in run.series.get("eval/loss", [])]
    skipped = last("train/skipped_steps")
    return {
        "run": run.label, "path": run.path, "scheme": run.scheme,
        "steps": run.summary.get("step", max(s for points in run.series.values() for s, _ in points)),
        "tokens": run.summary.get("tokens_total"), "wall_s": run.summary.get("seconds_since_start"),
        "final_train_loss": last("train/loss"), "final_eval_loss": evals[-1] if evals else None,
        "best_eval_loss": min(evals) if evals else None,
        "skipped_steps": int(skipped) if skipped is not None else run.summary.get("skipped_steps"),
    }


def markdown_table(rows: list[dict]) -> str:
    header = ("run", "scheme", "steps", "tokens", "wall time", "final train loss", "final eval loss",
              "best eval loss", "skipped steps")

    def fmt(value, kind):
        if value is None:
            return "—"
        if kind == "time":
            return f"{value:.1f} s" if value < 60 else f"{value / 60:.1f} min" if value < 3600 else f"{value / 3600:.2f} h"
        return {"int": f"{value:,}", "loss": f"{value:.4f}"}.get(kind, str(value))

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["run"], r["scheme"], fmt(r["steps"], "int"), fmt(r["tokens"], "int"), fmt(r["wall_s"], "time"),
                 fmt(r["final_train_loss"], "loss"), fmt(r["final_eval_loss"], "loss"),
                 fmt(r["best_eval_loss"], "loss"), fmt(r["skipped_steps"], "int")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plots


def ema(values: list[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: s_t = w·s_{t-1} + (1 − w)·x_t, debiased (the first points are not
    pulled towards 0)."""
    out, s = [], 0.0
    for t, x in enumerate(values, start=1):
        s = weight * s + (1 - weight) * x
        out.append(s / (1 - weight ** t) if weight else x)
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _style(ax, xlabel: str, ylabel: str, title: str, integer_x: bool = True):
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _log_scale_fits(values: list[float]) -> bool:
    """Log y where positive values span more than a decade (activation variance grows with depth)."""
    return bool(values) and min(values) > 0 and max(values) / min(values) > 10


def _ylabel(family: str) -> str:
    return _MEANING.get(family, family)


def _part(suffix: str, n_suffixes: int) -> str:
    """``attn``/``mlp`` for a sub-layer's tag; ``whole layer`` beside them; nothing when alone."""
    return suffix.lstrip("_") if suffix else ("whole layer" if n_suffixes > 1 else "")


def _safe_name(family: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", family).strip("_")


class _Plotter:
    def __init__(self, runs: list[Run], out_dir: str):
        self.runs, self.out_dir = runs, out_dir
        self.plt = _pyplot()
        self.colors = [self.plt.get_cmap("tab10")(i % 10) for i in range(len(runs))]
        self.written: list[str] = []
        self.missing: dict[str, list[str]] = {}  # what -> labels of the runs that lack it

    def _having(self, tag: str) -> list[tuple[int, Run]]:
        found = [(i, r) for i, r in enumerate(self.runs) if tag in r.series]
        lacking = [r.label for r in self.runs if tag not in r.series]
        if lacking:
            self.missing[tag] = lacking
        return found

    def loss(self, smooth: float):
        having = self._having("train/loss")
        if not having:
            return
        fig, ax = self.plt.subplots(figsize=(8, 5))
        for i, run in having:
            steps, values = zip(*run.series["train/loss"])
            if smooth:
                ax.plot(steps, values, color=self.colors[i], alpha=0.25, linewidth=0.8)
                values = ema(list(values), smooth)
            ax.plot(steps, values, color=self.colors[i], label=run.label)
        title = "train loss" + (f" (EMA smoothing {smooth}; faint: raw)" if smooth else "")
        _style(ax, "step", "loss (nats/token)", f"{title}: {', '.join(r.label for _, r in having)}")
        ax.legend(fontsize=8)
        self.written.append(save_figure(fig, self.out_dir, "train_loss.png"))

    def curves(self):
        for tag, name, title, ylabel in _CURVES:
            having = self._having(tag)
            if not having:
                continue
            fig, ax = self.plt.subplots(figsize=(8, 5))
            for i, run in having:
                steps, values = zip(*run.series[tag])
                ax.plot(steps, values, color=self.colors[i], marker="o", markersize=3, label=run.label)
            _style(ax, "step", ylabel, f"{title} ({tag}): {', '.join(r.label for _, r in having)}")
            ax.legend(fontsize=8)
            self.written.append(save_figure(fig, self.out_dir, name))

    def over_steps(self, families: tuple[str, ...], name: str):
        """One row of panels per run holding ``families``: each layer's value over the steps
        (the runs lacking them are reported by ``depth_profiles``)."""
        rows = [(run, fams) for run in self.runs
                if any(f in (fams := layer_families(run.series)) for f in families)]
        if not rows:
            return
        fig, axes = self.plt.subplots(len(rows), len(families), figsize=(max(8.0, 6.5 * len(families)), 3.8 * len(rows)),
                                      squeeze=False)
        cmap = self.plt.get_cmap("viridis")
        for (run, per_run), row in zip(rows, axes):
            for family, ax in zip(families, row):
                layers = per_run.get(family, {})
                values = [v for points in layers.values() for _, v in points]
                for j, ((layer, suffix), points) in enumerate(sorted(layers.items())):
                    steps, ys = zip(*points)
                    ax.plot(steps, ys, color=cmap(j / max(len(layers) - 1, 1)), label=f"layer {layer}{suffix}")
                if _log_scale_fits(values):
                    ax.set_yscale("log")
                _style(ax, "step", _ylabel(family), f"{run.label}: {family} per layer" if layers else
                       f"{run.label}: no {family} tags")
                if layers:
                    ax.legend(fontsize=6, ncol=2)
        self.written.append(save_figure(fig, self.out_dir, name))

    def depth_profiles(self):
        """Every per-layer family: its profile over depth at each run's last logged step."""
        per_run = [layer_families(r.series) for r in self.runs]
        for family in sorted({f for fams in per_run for f in fams} | {*_GATES, _VARIANCE}):
            lacking = [r.label for r, fams in zip(self.runs, per_run) if family not in fams]
            if lacking:
                self.missing[f"{family}/layer_*"] = lacking
            if len(lacking) == len(self.runs):
                continue
            fig, ax = self.plt.subplots(figsize=(8, 5))
            values = []
            for i, (run, fams) in enumerate(zip(self.runs, per_run)):
                layers = fams.get(family)
                if not layers:
                    continue
                step = max(points[-1][0] for points in layers.values())
                suffixes = sorted({s for _, s in layers})
                for k, suffix in enumerate(suffixes):
                    profile = sorted((layer, dict(points).get(step)) for (layer, s), points in layers.items()
                                     if s == suffix)
                    profile = [(layer, v) for layer, v in profile if v is not None]
                    xs, ys = zip(*profile)
                    values += ys
                    ax.plot(xs, ys, color=self.colors[i], marker="o", linestyle=("-", "--", ":", "-.")[k % 4],
                            label=f"{run.label} {_part(suffix, len(suffixes))}, step {step}".replace("  ", " "))
            if _log_scale_fits(values):
                ax.set_yscale("log")
            _style(ax, "layer", _ylabel(family), f"{family} over depth at each run's last logged step")
            ax.legend(fontsize=8)
            self.written.append(save_figure(fig, self.out_dir, f"depth_{_safe_name(family)}.png"))


def compare(paths: list[str], out_dir: str, names: list[str] | None = None, smooth: float = 0.0) -> dict:
    """Load the runs (CompareError before any plotting), write the PNGs, compare.md and compare.json
    into ``out_dir``; returns {"rows", "figures", "missing", "notes"}."""
    if not 0 <= smooth < 1:
        raise CompareError(f"--smooth must be in [0, 1) (the EMA weight of the previous value), got {smooth}")
    if not paths:
        raise CompareError("no run folders given")
    runs, notes = load_runs(paths, names)
    os.makedirs(out_dir, exist_ok=True)
    plotter = _Plotter(runs, out_dir)
    plotter.loss(smooth)
    plotter.curves()
    plotter.over_steps(_GATES, "gpas_gates_over_steps.png")
    plotter.over_steps((_VARIANCE,), "activation_variance_over_steps.png")
    plotter.depth_profiles()
    rows = [run_row(r) for r in runs]
    missing = [f"{what}: missing in {', '.join(labels)}" for what, labels in plotter.missing.items()]
    report = ["# Run comparison", "", markdown_table(rows)]
    report += ["## Figures", ""] + [f"- `{os.path.basename(p)}`" for p in plotter.written] + [""]
    if missing or notes:
        report += ["## Missing", ""] + [f"- {line}" for line in notes + missing] + [""]
    with open(os.path.join(out_dir, TABLE), "w") as f:
        f.write("\n".join(report))
    result = {"rows": rows, "figures": plotter.written, "missing": missing, "notes": notes}
    with open(os.path.join(out_dir, TABLE_JSON), "w") as f:
        json.dump({**result, "rows": [{k: _json_number(v) for k, v in r.items()} for r in rows]}, f, indent=1)
    return result


def _json_number(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value
