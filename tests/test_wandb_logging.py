"""Weights & Biases logging (logging.wandb, megatron_gpas/wandb_logging.py) in offline mode, in-process
Trainers on CPU; nothing touches the network.

The offline run is read back from its ``.wandb`` file: wandb 0.31 no longer ships a Python reader
(``wandb.sdk.internal.datastore`` is gone; its Go core reads the file), so ``_wandb_records``
decodes the container (LevelDB's log format behind a 7-byte W&B header: 32 KiB blocks of records
with a CRC-32, a length and a full/first/middle/last type) and parses each record with wandb's own
protobuf classes (``wandb.proto``).
- the scalars W&B holds at each step are metrics.jsonl's, bit for bit; the config is the resolved
  config (config.yaml); project, name, group and tags as configured;
- under TP2+SP only rank 0 writes a W&B run, holding metrics.jsonl's values;
- a resumed run logs to the same W&B run id; ``--force`` deletes the old run's W&B files;
- TensorBoard's text tab holds the resolved config;
- bad settings, and wandb not installed, are refused at validation with the key named.
"""

from __future__ import annotations

import json
import struct
import sys
import zlib
from pathlib import Path

import pytest
import torch.distributed as dist
import yaml

from megatron_gpas.config import ConfigError, load_config, validate_settings
from synthetic import resumable_run_overrides, train_in_process, write_synthetic_dataset

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

wandb = pytest.importorskip("wandb")

_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Offline whatever the config or the environment says: these tests never reach the network."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


@pytest.fixture(scope="module")
def ws(workspace) -> Path:
    write_synthetic_dataset(str(workspace / "data" / "synthetic"))
    return workspace


def _overrides(ws: Path, run: str, *extra: str) -> list[str]:
    return resumable_run_overrides(
        ws, run, "train.steps=5", "train.eval_interval=4", "logging.interval=2", "logging.wandb.enabled=true",
        "logging.wandb.mode=offline", "logging.wandb.project=gpas-tests", "logging.wandb.group=g1",
        "logging.wandb.tags=[pre, gpas]", *extra)


def _cfg(ws: Path, run: str, *extra: str):
    return load_config(None, _overrides(ws, run, *extra))


def _wandb_records(path: Path):
    """The protobuf records of an offline run's ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    assert raw[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, pending = 7, b""
    while pos + 7 <= len(raw):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        data = raw[pos + 7:pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + data) == crc, f"{path}: bad checksum at byte {pos}"
        pos += 7 + length
        if kind in (_FULL, _FIRST):
            pending = data
        elif kind in (_MIDDLE, _LAST):
            pending += data
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def _read_offline_run(path: Path) -> tuple:
    """(run record, config dict, {step: {tag: value}}) of an offline run."""
    run, config, history = None, {}, {}
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            # a key with a "/" may come as its parts (nested_key)
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(record.history.step.num, {}).update(
                {k: v for k, v in row.items() if not k.startswith("_")})
    config.pop("_wandb", None)
    return run, config, history


def _metrics_by_step(run_dir: Path) -> dict[int, dict]:
    by_step: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        by_step.setdefault(record.pop("step"), {}).update(record)
    return by_step


def test_offline_run_holds_the_logged_scalars_and_the_config(ws):
    run_dir = ws / "runs" / "tracked"
    train_in_process(_cfg(ws, "tracked"))
    [offline] = _offline_runs(run_dir)
    run, config, history = _read_offline_run(offline)

    assert run.run_id == (run_dir / "wandb" / "run_id").read_text().strip()
    assert (run.project, run.display_name, run.run_group, list(run.tags)) == ("gpas-tests", "tracked", "g1",
                                                                           ["pre", "gpas"])
    assert config == yaml.safe_load((run_dir / "config.yaml").read_text())

    metrics = _metrics_by_step(run_dir)
    # logged steps: the first, every logging.interval, the last; eval at step 4 and at the end
    assert [s for s, r in metrics.items() if "train/loss" in r] == [1, 2, 4, 5]
    assert [s for s, r in metrics.items() if "eval/loss" in r] == [4, 5]
    assert sorted(history) == sorted(metrics)
    for step, values in metrics.items():
        assert history[step] == values, f"step {step}"  # exact: JSON carries the float64 in full
    assert {"gpas/alpha/layer_2", "activations/variance/layer_1", "perf/tokens_per_s"} <= set(history[5])

    # TensorBoard's text tab: the resolved config as YAML in a code block
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    events.Reload()
    [text] = events.Tensors("config/text_summary")
    markdown = text.tensor_proto.string_val[0].decode()
    assert markdown.startswith("```yaml\n") and markdown.endswith("```")
    assert yaml.safe_load(markdown.removeprefix("```yaml\n").removesuffix("```")) == config


def test_a_resumed_run_logs_to_the_same_wandb_run_and_force_replaces_it(ws):
    run_dir = ws / "runs" / "resumed"
    train_in_process(_cfg(ws, "resumed", "train.exit_after_steps=2"))
    train_in_process(_cfg(ws, "resumed"))
    first, second = (_read_offline_run(path) for path in _offline_runs(run_dir))
    assert first[0].run_id == second[0].run_id == (run_dir / "wandb" / "run_id").read_text().strip()
    metrics = _metrics_by_step(run_dir)
    assert sorted(first[2]) == [1, 2] and sorted(second[2]) == [3, 4, 5]
    for step, values in {**first[2], **second[2]}.items():
        assert values == metrics[step], f"step {step}"

    # a new run forced into the folder: a new W&B run, the old one's files gone with its other logs
    train_in_process(_cfg(ws, "resumed", "checkpoint.load=null", f"checkpoint.save='{run_dir / 'ckpt_new'}'",
                "train.exit_after_steps=1"), force=True)
    [offline] = _offline_runs(run_dir)
    run, _, history = _read_offline_run(offline)
    assert run.run_id == (run_dir / "wandb" / "run_id").read_text().strip() != first[0].run_id
    assert sorted(history) == [1]


def test_only_rank_0_logs_under_tp2_sp(ws):
    from test_parallel import _launch

    run_dir = ws / "runs" / "tp2"
    _launch(ws, "wandb_tp2", 2, [{"name": "tp2", "kind": "train", "overrides": _overrides(
        ws, "tp2", "parallel.tensor=2", "parallel.sequence_parallel=true")}], timeout=600)
    [offline] = _offline_runs(run_dir)  # one W&B run: rank 1 wrote none
    _, config, history = _read_offline_run(offline)
    assert config["parallel"]["tensor"] == 2
    assert history == _metrics_by_step(run_dir)


@pytest.mark.parametrize("override, message", [
    ("logging.wandb.mode=cloud", r"logging.wandb.mode must be one of offline, online .*got 'cloud'"),
    ("logging.wandb.project=''", r"logging.wandb.project must not be empty"),
    (f"logging.wandb.tags=[ok, {'x' * 65}]", r"logging.wandb.tags: each tag must have 1 to 64 characters"),
    ("logging.wandb.projcet=p", r"unknown config key 'logging.wandb.projcet'. Did you mean 'project'"),
])
def test_bad_settings_are_refused(ws, override, message):
    with pytest.raises(ConfigError, match=message):
        validate_settings(_cfg(ws, "bad", override), world_size=1, check_files=False)


def test_wandb_not_installed_is_refused_with_the_remedy(ws, monkeypatch):
    cfg = _cfg(ws, "no_wandb")
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` sees without the package
    with pytest.raises(ConfigError, match=r"logging.wandb.enabled=true needs the wandb package.*"
                                          r"pip install 'megatron_gpas\[wandb\]'"):
        train_in_process(cfg)
    assert not dist.is_initialized()  # refused at validation, before any process group
    cfg.logging.wandb.enabled = False
    validate_settings(cfg, world_size=1, check_files=False)  # not needed when off
