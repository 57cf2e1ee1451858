"""tools/compare_runs.py (megatron_gpas/compare_runs.py) on two short real training runs (in-process
Trainers on CPU): the PNGs, and a table whose numbers are the runs' own metrics.jsonl and
summary.json values (read here independently); a per-layer tag family the tool has never heard of
gets its depth profile; what a run lacks is reported; bad input is refused before any plot.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from megatron_gpas.compare_runs import CompareError, compare, ema
from synthetic import resumable_run_config, train_in_process, write_synthetic_dataset

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

REPO_ROOT = Path(__file__).resolve().parent.parent
STEPS, GLOBAL_BATCH, SEQ = 6, 4, 32  # resumable_run_config's
LOSS_PNGS = ["train_loss.png", "eval_loss.png", "throughput.png"]
LAYER_PNGS = ["gpas_gates_over_steps.png", "activation_variance_over_steps.png", "depth_gpas_alpha.png",
              "depth_gpas_scale.png", "depth_activations_variance.png"]


def _train(ws: Path, run: str, *extra: str) -> Path:
    train_in_process(resumable_run_config(ws, run, "model.num_layers=3", "train.eval_interval=3", *extra))
    return ws / "runs" / run


@pytest.fixture(scope="module")
def runs(workspace) -> tuple[Path, Path]:
    write_synthetic_dataset(str(workspace / "data" / "synthetic"))
    return (_train(workspace, "pre_gpas", "gpas.enabled=true", "optim.lr=3.0e-3"),
            _train(workspace, "pre", "gpas.enabled=false", "optim.lr=1.0e-3"))


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _tool():
    spec = importlib.util.spec_from_file_location("compare_runs_tool", REPO_ROOT / "tools" / "compare_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table_rows(markdown: str) -> dict[str, list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    return {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[1:])}


def test_two_runs_give_the_figures_and_their_own_numbers(runs, tmp_path, capsys):
    gpas_run, pre_run = runs
    out = tmp_path / "cmp"
    assert _tool().main([str(gpas_run), str(pre_run), "--output", str(out), "--smooth", "0.5"]) == 0
    printed = capsys.readouterr().out

    import matplotlib.image

    for name in LOSS_PNGS + LAYER_PNGS:
        assert matplotlib.image.imread(out / name).shape[2] == 4, name  # a real RGBA image
    report = json.loads((out / "compare.json").read_text())
    table = _table_rows((out / "compare.md").read_text())
    assert _table_rows(printed) == table

    for run_dir, scheme in ((gpas_run, "pre+gpas"), (pre_run, "pre")):
        records = _records(run_dir)
        summary = json.loads((run_dir / "summary.json").read_text())
        train = [r["train/loss"] for r in records if "train/loss" in r]
        evals = [r["eval/loss"] for r in records if "eval/loss" in r]
        assert len(train) == STEPS and len(evals) == 2  # logged every step; eval at step 3 and the end
        label = f"{run_dir.name} ({scheme})"
        [row] = [r for r in report["rows"] if r["run"] == label]
        expected = {"scheme": scheme, "steps": STEPS, "tokens": STEPS * GLOBAL_BATCH * SEQ,
                    "wall_s": summary["seconds_since_start"], "final_train_loss": train[-1],
                    "final_eval_loss": evals[-1], "best_eval_loss": min(evals), "skipped_steps": 0}
        assert {k: row[k] for k in expected} == expected
        assert summary["tokens_total"] == expected["tokens"] and summary["train_loss"] == train[-1]
        assert table[label] == [label, scheme, str(STEPS), f"{STEPS * GLOBAL_BATCH * SEQ:,}",
                                f"{summary['seconds_since_start']:.1f} s", f"{train[-1]:.4f}", f"{evals[-1]:.4f}",
                                f"{min(evals):.4f}", "0"]
    # every per-layer family the runs logged (the trainer's telemetry included) has its depth profile
    families = {tag.rsplit("/", 1)[0] for run_dir in runs for r in _records(run_dir) for tag in r
                if "/layer_" in tag}
    assert {"layers/grad_norm", "layers/branch_to_shortcut"} <= families
    for family in families:
        assert (out / f"depth_{family.replace('/', '_').replace('.', '_')}.png").is_file(), family
    # the run without GPAS lacks the gates: said, with the run's name
    assert report["missing"] == ["gpas/alpha/layer_*: missing in pre (pre)", "gpas/scale/layer_*: missing in pre (pre)"]
    assert "[missing] gpas/alpha/layer_*: missing in pre (pre)" in printed


def test_a_new_layer_family_is_drawn_and_the_runs_lacking_it_named(runs, tmp_path):
    gpas_run, pre_run = runs
    telemetry = tmp_path / "telemetry"
    shutil.copytree(gpas_run, telemetry)
    # tags of a family the tool does not know (per-sub-layer suffixes), at the last step
    with open(telemetry / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": STEPS, **{f"probes/new_stat/layer_{l}_{part}": 0.1 * l
                                               for l in (1, 2, 3) for part in ("attn", "mlp")}}) + "\n")
    result = compare([str(telemetry), str(pre_run)], str(tmp_path / "out"), names=["with telemetry", "plain"])
    assert (tmp_path / "out" / "depth_probes_new_stat.png").is_file()
    assert "probes/new_stat/layer_*: missing in plain" in result["missing"]
    assert [r["run"] for r in result["rows"]] == ["with telemetry", "plain"]
    # the appended record changes nothing the table reads
    assert result["rows"][0]["final_train_loss"] == [r["train/loss"] for r in _records(gpas_run) if "train/loss" in r][-1]


def test_bad_input_is_refused_before_any_plot(runs, tmp_path, capsys):
    gpas_run, _ = runs
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "metrics.jsonl").write_text("\n")
    out = tmp_path / "out"
    with pytest.raises(CompareError) as error:
        compare([str(gpas_run), str(empty), str(tmp_path / "blank"), str(tmp_path / "nowhere")], str(out))
    assert str(error.value).splitlines()[1:] == [
        f"  {empty}: no metrics.jsonl (not a logging.dir of a training run)",
        f"  {tmp_path / 'blank'}: metrics.jsonl is empty (the run logged no step)",
        f"  {tmp_path / 'nowhere'}: not a directory"]
    with pytest.raises(CompareError, match="--names gives 1 names for 2 runs"):
        compare([str(gpas_run), str(gpas_run)], str(out), names=["one"])
    with pytest.raises(CompareError, match=r"--smooth must be in \[0, 1\)"):
        compare([str(gpas_run)], str(out), smooth=1.0)
    assert not out.exists()
    assert _tool().main([str(empty), "--output", str(out)]) == 2
    assert f"{empty}: no metrics.jsonl" in capsys.readouterr().err and not out.exists()

    # a run folder without config.yaml or summary.json is compared, and said to lack them
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(gpas_run / "metrics.jsonl", bare)
    result = compare([str(bare)], str(out))
    assert result["notes"] == ["bare has no config.yaml: scheme unknown",
                               "bare has no summary.json: tokens and wall time unknown"]
    assert (result["rows"][0]["run"], result["rows"][0]["tokens"], result["rows"][0]["steps"]) == ("bare (?)", None, STEPS)


def test_smoothing_is_tensorboards_debiased_ema():
    # by hand: s1 = 0.5·1 / (1 − 0.5) = 1; s2 = (0.5·0.5 + 0.5·3) / (1 − 0.25) = 7/3
    assert ema([1.0, 3.0], 0.5) == pytest.approx([1.0, 7 / 3])
    assert ema([1.0, 3.0], 0.0) == [1.0, 3.0]
