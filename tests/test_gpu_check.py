"""tools/gpu_check.py: the one-command GPU validation, run end to end on CPU (--dry-run).

The dry run goes through everything a GPU run does (wheels aside): the synthetic dataset, a few
training steps of every scheme ± GPAS in one worker process, the three benchmarks as subprocesses,
and the JSON + Markdown report. What it measures on a CPU means nothing; that it runs, that every
scheme learns, and that the report holds what the runs wrote is what is checked here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "gpu_check.py"
sys.path.insert(0, str(REPO / "tools"))

import gpu_check  # noqa: E402

from megatron_gpas.model.schemes import SCHEMES  # noqa: E402


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    # no GPU visible: the dry run is what CI can run, whatever the machine
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, env=env,
                          timeout=900, **kwargs)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    result = _run(["run", "--dry-run", "--out", str(out)])
    return out, result


def test_dry_run_passes_and_writes_the_report(dry_run):
    out, result = dry_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and report["environment"]["dry_run"]
    phases = ["train", "bench_1b", "bench_8b", "memory", "bench_norms"]
    assert [p["phase"] for p in report["phases"]] == phases
    assert all(p["status"] == "ok" for p in report["phases"])
    for phase in phases:
        assert (out / f"{phase}.log").stat().st_size > 0
    markdown = (out / "report.md").read_text()
    for heading in ("## Targets", "## Phases", "## Training steps", "## bench_1b", "## bench_8b", "## bench_norms",
                    "## Memory"):
        assert heading in markdown
    # the memory phase: one model, the planner's estimate by part (the measured peak needs a GPU)
    (memory,) = report["memory"]
    assert memory["passed"] and "peak_memory_gib" not in memory
    plan = memory["planned_memory_gib"]
    assert plan["total"] == pytest.approx(sum(plan[p] for p in ("weights", "gradients", "optimizer", "activations")))


def test_every_scheme_trains_with_and_without_gpas(dry_run):
    out, _ = dry_run
    report = json.loads((out / "report.json").read_text())
    trained = {(r["variant"], r["gpas"]) for r in report["train"]}
    for scheme in SCHEMES:  # the registry, so a new scheme is validated without editing the tool
        assert (scheme, False) in trained, scheme
        assert ((scheme, True) in trained) is (SCHEMES[scheme].gpas_refusal is None), scheme  # nGPT: none
    assert ("osp+muon", True) in trained and ("pre@layernorm", False) in trained
    assert not report["train_not_run"]
    markdown = (out / "report.md").read_text()
    for record in report["train"]:
        assert record["passed"], record
        # the report's losses are the ones the run logged, and they fell
        run_dir = next((out / "work" / "runs").glob(
            "".join(c if c.isalnum() or c in "+-" else "_" for c in record["name"])))
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        logged = [r["train/loss"] for r in records if "train/loss" in r]
        assert record["losses"] == logged and len(logged) == 12
        assert all(math.isfinite(x) for x in logged) and sum(logged[-3:]) / 3 < 0.97 * logged[0]
        assert f"| {record['name']} |" in markdown


def test_benchmarks_compare_with_pre_ln(dry_run):
    out, _ = dry_run
    from bench_schemes import DEFAULT_VARIANTS

    bench_1b = json.loads((out / "bench_1b.json").read_text())
    variants = {r["variant"]: r for r in bench_1b["results"]}
    assert set(variants) == {"pre", "pre+gpas", "pre~unfused+gpas"}  # GPAS overhead, fused and not
    assert variants["pre"]["ratio"] == 1.0
    pre, gpas = variants["pre"], variants["pre+gpas"]
    assert gpas["ratio"] == pytest.approx(gpas["median_step_s"] / pre["median_step_s"])
    norms = json.loads((out / "bench_norms.json").read_text())
    assert {r["variant"] for r in norms["results"]} == set(DEFAULT_VARIANTS)
    report = json.loads((out / "report.json").read_text())
    assert [t["measured"] for t in report["targets"]][2:] == [None, None]  # no MFU without a GPU


def test_loss_verdict():
    # the mean of the last three against 97% of the first (5.82)
    assert gpu_check.loss_verdict([6.0, 5.9, 5.8, 5.75, 5.7]) == {"finite": True, "falls": True}  # 5.75 < 5.82
    assert gpu_check.loss_verdict([6.0, 5.95, 5.9, 5.85, 5.85]) == {"finite": True, "falls": False}  # 5.867
    assert gpu_check.loss_verdict([6.0, 6.5, 7.0, 7.5, 8.0]) == {"finite": True, "falls": False}
    assert gpu_check.loss_verdict([6.0, 3.0, 2.0]) == {"finite": True, "falls": False}  # too few steps to say
    assert gpu_check.loss_verdict([6.0, 5.0, float("nan"), 4.0, 3.0]) == {"finite": False, "falls": False}
    assert gpu_check.loss_verdict([]) == {"finite": False, "falls": False}


def test_failing_case_is_reported_and_the_others_still_run(tmp_path):
    cases = gpu_check.training_cases(dry_run=True, backends=[("local", None)])
    pre = next(c for c in cases if c["variant"] == "pre" and not c["gpas"])
    broken = {**pre, "name": "broken", "overrides": [*pre["overrides"], "model.hidden_size=63"]}
    spec = tmp_path / "spec.json"
    results = tmp_path / "results.jsonl"
    spec.write_text(json.dumps({"work": str(tmp_path / "work"), "results": str(results), "cases": [broken, pre],
                                "vocab": 512, "docs": 200, "doc_len": 300}))
    result = _run(["_train", str(spec)])
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = [json.loads(line) for line in results.read_text().splitlines()]
    assert first["name"] == "broken" and not first["passed"] and "hidden_size" in first["error"]
    assert second["name"] == pre["name"] and second["passed"], second


def test_time_budget_spent_is_reported(tmp_path):
    result = _run(["run", "--dry-run", "--out", str(tmp_path), "--budget-minutes", "0.01"])
    assert result.returncode == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert {p["status"] for p in report["phases"]} == {"not run (time budget spent)"}
    from bench_schemes import takes_gpas

    cases = sum(2 if takes_gpas(variant) else 1 for variant in gpu_check.training_variants())  # ± GPAS
    assert not report["passed"] and len(report["train_not_run"]) == cases


def test_without_a_gpu_only_the_dry_run_runs(tmp_path):
    result = _run(["run", "--out", str(tmp_path)])
    assert result.returncode == 2 and "--dry-run" in result.stderr


def test_missing_packages_are_named_with_the_remedy(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(gpu_check.REQUIRED_MODULES, "no_such_module_for_gpu_check", "no-such-dist")
    assert gpu_check.main(["run", "--dry-run", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no-such-dist" in err and "gpu_check.py prepare --wheels" in err


def _write_wheel(folder: Path, name: str, version: str, module_source: str) -> Path:
    """A minimal pure-Python wheel (PEP 427), written by hand: the host installs wheels offline."""
    dist_info = f"{name}-{version}.dist-info"
    files = {f"{name}.py": module_source.encode(),
             f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
    return wheel


def test_wheels_install_offline_into_the_site_folder(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _write_wheel(wheels, "gpu_check_probe", "1.0", "VALUE = 42\n")
    site = tmp_path / "site"
    gpu_check.install_wheels(str(wheels), str(site))
    probe = subprocess.run([sys.executable, "-c", "import gpu_check_probe; print(gpu_check_probe.VALUE)"],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(site)})
    assert probe.stdout.strip() == "42", probe.stderr
    with pytest.raises(SystemExit, match="holds no .whl"):
        gpu_check.install_wheels(str(tmp_path / "site"), str(tmp_path / "elsewhere"))
