"""tools/run_repro.py end to end in its --quick form (CI): Pre-LN and Pre-LN + GPAS trained for a few
steps on a synthetic dataset, then the report. The table's numbers are those of the runs' own
metrics.jsonl and summary.json (read here), the plots exist, the verdict compares the two, and a
second call trains nothing again (finished runs are kept). The full run (docs/results.md) is
tools/run_repro.py without --quick (about 20 minutes on two CPU cores).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
VOCAB = 256


@pytest.fixture(scope="module")
def repro(tmp_path_factory) -> dict:
    from megatron_gpas.data.synthetic import write_markov_dataset

    root = tmp_path_factory.mktemp("repro")
    prefix = write_markov_dataset(str(root / "markov"), vocab_size=VOCAB, num_docs=120, doc_len=200)
    cmd = [sys.executable, str(REPO_ROOT / "tools" / "run_repro.py"), "--quick", "--out", str(root / "out"),
           "--results", str(root / "results.md"), "--data", prefix, "--tokenizer", f"null:{VOCAB}",
           "model.max_seq_length=64", "train.seq_length=64", "train.micro_batch_size=4", "train.global_batch_size=4"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    return {"root": root, "first": first.stdout, "second": second.stdout, "report": (root / "results.md").read_text()}


def test_every_run_trained_once(repro):
    for name in ("pre_seed0", "pre_gpas_seed0"):
        summary = json.loads((repro["root"] / "out" / "runs" / name / "summary.json").read_text())
        assert summary["outcome"] == "finished" and summary["step"] == 6
        assert f"{name}: training" in repro["first"]
        assert f"{name}: finished before with these settings, not trained again" in repro["second"]


def test_report_holds_the_runs_numbers_and_plots(repro):
    report = repro["report"]
    for name, label in (("pre_seed0", "Pre-LN"), ("pre_gpas_seed0", "Pre-LN + GPAS")):
        run = repro["root"] / "out" / "runs" / name
        summary = json.loads((run / "summary.json").read_text())
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        variances = [r for r in rows if "activations/variance/layer_1" in r][-1]
        growth = variances["activations/variance/layer_4"] / variances["activations/variance/layer_1"]
        line = next(l for l in report.splitlines() if l.startswith(f"| {label} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == f"{summary['eval_loss']:.4g} ± 0"
        assert cells[2] == f"{summary['eval_loss']:.4f}"
        assert cells[3] == f"{summary['train_loss']:.4g} ± 0"
        assert cells[5] == f"{growth:.3g} ± 0"
    assert "**Pre-LN**: with GPAS the final eval loss is" in report and "one seed: no spread measured" in report
    for png in ("eval_loss.png", "variance_by_depth.png", "gpas_scale_by_depth.png"):
        path = repro["root"] / "results" / png
        assert path.stat().st_size > 10_000, png
        assert f"](results/{png})" in report
    assert "examples/paper/pre_gpas_71m.yaml" in report


def test_paper_scale_commands_name_existing_configs():
    out = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "run_repro.py"), "--paper-scale"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    configs = [word for line in out.splitlines() for word in line.split() if word.endswith("_71m.yaml")]
    assert len(configs) == 6 and all((REPO_ROOT / c).is_file() for c in configs)


def test_a_run_with_other_settings_is_trained_again(repro):
    """A finished run is reused only with the same settings: another learning rate retrains it."""
    cmd = [sys.executable, str(REPO_ROOT / "tools" / "run_repro.py"), "--quick", "--variants", "pre", "--out",
           str(repro["root"] / "out"), "--results", str(repro["root"] / "results_lr.md"), "--data",
           str(repro["root"] / "markov"), "--tokenizer", f"null:{VOCAB}", "model.max_seq_length=64",
           "train.seq_length=64", "train.micro_batch_size=4", "train.global_batch_size=4", "optim.lr=1e-3"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "pre_seed0: training" in out.stdout
    config = (repro["root"] / "out" / "runs" / "pre_seed0" / "config.yaml").read_text()
    assert "lr: 0.001" in config
