"""Checkpoint safety and integrity (docs/checkpoints.md).

One real 2-step run writes the checkpoints every case copies (iter_1 and iter_2; Pre-LN with
GPAS gates, so every reader of this package applies). Then:
  * unsafe pickles: the DCP ``.metadata``, the ``rng_state`` object inside the ``.distcp`` file and a
    legacy ``common.pt`` are replaced by pickles that create a marker file when unpickled (each
    shown to do so through the stock readers), with a checksum manifest recomputed to match (as an
    attacker would) and torch's ``weights_only`` default switched off: no entry point creates the
    marker, each says which file and which global it refused;
  * integrity: a byte flipped inside a tensor is found by the checksums (and loads silently without
    them), missing/extra/resized files are named, the manifest is every file's size and SHA-256,
    and the checking processes share the files;
  * fallback to the newest intact checkpoint, or an error naming it;
  * start-up checks before any process group: checkpoint.load that finds nothing, checkpoint.save
    ahead of the run, unwritable directories, too little disk;
  * saving: NaN weights, a full disk, ``latest`` moving back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import importlib.util
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.utils import unwrap_model

from megatron_gpas import checkpoint, distributed, pretrain
from megatron_gpas import checkpoint_integrity as integrity
from megatron_gpas.checkpoint_paths import CheckpointError, NonFiniteWeightsError
from megatron_gpas.config import ConfigError, load_config
from megatron_gpas.finetune import build_trainer, load_finetune_config
from megatron_gpas.training import Trainer
from megatron_gpas.validation import validate
from process_groups import release_parallel_state
from synthetic import write_synthetic_dataset

pytestmark = [
    pytest.mark.usefixtures("parallel_state_released"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

REPO_ROOT = Path(__file__).resolve().parent.parent
VOCAB = 64
SHAPE = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.ffn_hidden_size=64",
         f"model.vocab_size={VOCAB}", "model.make_vocab_size_divisible_by=64", "model.max_seq_length=64",
         "norm.kind=layernorm", "gpas.enabled=true", "gpas.init=0.3"]
DATA = "distcp"  # suffix of DCP's data files


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_tool", REPO_ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def overrides(ws: Path, run: str, *extra: str) -> list[str]:
    return [*SHAPE, "train.steps=2", "train.seq_length=16", "train.micro_batch_size=2", "train.global_batch_size=4",
            "train.eval_iters=1", f"data.paths=['{ws / 'synthetic'}']", "data.tokenizer.kind='null'",
            f"data.tokenizer.vocab_size={VOCAB}", f"data.cache_dir='{ws / 'data_cache'}'", "data.split='90,10,0'",
            f"logging.dir='{ws / 'runs' / run}'", "logging.tensorboard=false", "logging.plots=false", *extra]


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("checkpoint_safety")
    write_synthetic_dataset(str(ws / "synthetic"), vocab_size=VOCAB, num_docs=40, doc_len=60)
    (ws / "sft.jsonl").write_text("".join(json.dumps({"prompt": f"{i} {i + 1} {i + 2}", "response": f"{i + 3} {i + 4}"})
                                          + "\n" for i in range(5, 25)))
    return ws


@pytest.fixture(scope="module")
def base(ws) -> Path:
    """A save root with iter_0000001 and iter_0000002 of a 2-step run."""
    release_parallel_state()
    root = ws / "base"
    trainer = Trainer(load_config(None, overrides(ws, "base", f"checkpoint.save='{root}'",
                                                  "checkpoint.save_interval=1")))
    try:
        trainer.train()
    finally:
        trainer.close(keep_process_group=True)
    return root


def copy_of(base: Path, tmp_path: Path) -> Path:
    root = tmp_path / "ckpt"
    shutil.copytree(base, root)
    return root


@contextlib.contextmanager
def live_trainer(cfg_overrides: list[str]):
    release_parallel_state()
    trainer = Trainer(load_config(None, cfg_overrides), force=True)  # the cases share a log folder
    try:
        yield trainer
    finally:
        trainer.close(keep_process_group=True)


def reseal(path: Path) -> None:
    """Recompute the checksum manifest for the files as they are now: what someone planting a
    payload would do, so that the checksums cannot be what stops it."""
    sizes = integrity.list_files(str(path))
    integrity.write_manifest(str(path), sizes, {name: hashlib.sha256((path / name).read_bytes()).hexdigest()
                                                for name in sizes})


# =========================================================================== unsafe pickles


class CodeRunner:
    """Unpickling it calls exec, which creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def _plain_metadata(path: Path):
    with open(path / ".metadata", "rb") as f:
        return pickle.load(f)  # the test's own, trusted file


def _rng_entry(path: Path):
    metadata = _plain_metadata(path)
    index = next(i for i in metadata.storage_data if i.fqn.startswith("rng_state"))
    return metadata, index


def plant(kind: str, path: Path, marker: Path) -> str:
    """Put a code-running pickle into checkpoint directory ``path``; returns the global it names."""
    if kind == "metadata":
        (path / ".metadata").write_bytes(pickle.dumps(CodeRunner(marker)))
    elif kind == "rng_state":  # appended to the data file, the metadata pointing at it
        metadata, index = _rng_entry(path)
        info = metadata.storage_data[index]
        payload = io.BytesIO()
        torch.save([CodeRunner(marker)], payload)
        data_file = path / info.relative_path
        offset = data_file.stat().st_size
        with open(data_file, "ab") as f:
            f.write(payload.getvalue())
        metadata.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(payload.getvalue()))
        with open(path / ".metadata", "wb") as f:
            pickle.dump(metadata, f)
    elif kind == "common_pt":
        torch.save(CodeRunner(marker), path / "common.pt")
    else:
        raise ValueError(kind)
    reseal(path)
    return "builtins.exec"


PAYLOADS = ("metadata", "rng_state", "common_pt")


@pytest.fixture
def unsafe_torch_default(monkeypatch):
    """torch.load's weights_only default switched off (a user's environment may): refusals must not
    rest on torch's default."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")


@pytest.mark.parametrize("kind", PAYLOADS)
def test_the_payloads_run_code_through_the_stock_readers(base, tmp_path, kind, unsafe_torch_default):
    """Control: each planted pickle does create the marker when torch DCP / Megatron read it."""
    from megatron.core.dist_checkpointing import load_common_state_dict
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load

    path = copy_of(base, tmp_path) / "iter_0000002"
    marker = tmp_path / "marker"
    plant(kind, path, marker)
    with contextlib.suppress(Exception):  # (what the payload returns is no metadata/state: errors follow)
        if kind == "metadata":
            FileSystemReader(str(path)).read_metadata()
        elif kind == "rng_state":
            dcp_load({_rng_entry(path)[1].fqn: io.BytesIO()}, storage_reader=FileSystemReader(str(path)), no_dist=True)
        else:
            load_common_state_dict(str(path))
    assert marker.exists()


def _resume(ws, root, tmp_path, capsys):
    with pytest.raises(CheckpointError) as e:
        with live_trainer(overrides(ws, "resume", f"checkpoint.load='{root}'", f"checkpoint.save='{root}'",
                                    "train.steps=3")):
            pass
    return str(e.value)


def _pretrained(ws, root, tmp_path, capsys):
    with pytest.raises(CheckpointError) as e:
        with live_trainer(overrides(ws, "pretrained", f"checkpoint.pretrained='{root}'")):
            pass
    return str(e.value)


def _finetune(ws, root, tmp_path, capsys):
    release_parallel_state()
    cfg, source = load_finetune_config(None, [
        f"checkpoint.pretrained='{root}'", f"sft.train_files=['{ws / 'sft.jsonl'}']", "train.steps=1",
        "train.seq_length=16", "train.micro_batch_size=2", "train.global_batch_size=4",
        f"logging.dir='{tmp_path / 'ft'}'", "logging.tensorboard=false", "logging.plots=false"])
    with pytest.raises(CheckpointError) as e:
        build_trainer(cfg, source).close(keep_process_group=True)
    return str(e.value)


def _evaluate(ws, root, tmp_path, capsys):
    release_parallel_state()
    assert _load_tool("evaluate").main([str(root), "--data", str(ws / "synthetic"), "--num-batches", "1"]) == 2
    return capsys.readouterr().err


def _generate(ws, root, tmp_path, capsys):
    release_parallel_state()
    assert _load_tool("generate").main([str(root), "--prompt", "5 6", "--max-new-tokens", "1"]) == 2
    return capsys.readouterr().err


def _convert_to_hf(ws, root, tmp_path, capsys):
    assert _load_tool("convert_to_hf").main([str(root), str(tmp_path / "hf"), "--no-progress"]) == 2
    assert not (tmp_path / "hf").exists()
    return capsys.readouterr().err


def _kurtosis(ws, root, tmp_path, capsys):
    assert _load_tool("kurtosis").main([str(root), "--data", str(ws / "synthetic"), "--samples", "1", "--seq-len", "8",
                                        "--progress-interval", "0"]) == 2
    return capsys.readouterr().err


def _convert_norm(ws, root, tmp_path, capsys):
    release_parallel_state()
    assert _load_tool("convert_norm").main([str(root), str(tmp_path / "converted"), "--to", "pre_rmsnorm"]) == 2
    return capsys.readouterr().err


def _fixed_gate_values(ws, root, tmp_path, capsys):
    with pytest.raises(ConfigError) as e:  # read inside config validation
        validate(load_config(None, overrides(ws, "fixed", f"gpas.fixed_values='{root}'", "gpas.freeze=true")))
    return str(e.value)


ENTRY_POINTS = {"resume": _resume, "checkpoint.pretrained": _pretrained, "finetune": _finetune,
                "tools/evaluate.py": _evaluate, "tools/generate.py": _generate, "tools/convert_to_hf.py": _convert_to_hf,
                "tools/kurtosis.py": _kurtosis, "tools/convert_norm.py": _convert_norm,
                "gpas.fixed_values": _fixed_gate_values}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("kind", PAYLOADS)
def test_no_entry_point_runs_code_from_a_checkpoint(base, ws, tmp_path, capsys, kind, entry, unsafe_torch_default):
    root = copy_of(base, tmp_path)
    marker = tmp_path / "marker"
    refused = plant(kind, root / "iter_0000002", marker)
    message = ENTRY_POINTS[entry](ws, root, tmp_path, capsys)
    assert not marker.exists(), f"{entry} ran code from a {kind} pickle"
    named = {"metadata": ".metadata", "rng_state": f"__0_0.{DATA}", "common_pt": "common.pt"}[kind]
    assert f"iter_0000002/{named}" in message, message
    if kind != "common_pt":  # (common.pt is refused unread: Megatron would read it outside DCP)
        assert f"refusing to unpickle {refused}" in message, message


@pytest.mark.parametrize("kind", PAYLOADS)
def test_loading_reads_pickles_only_through_the_restricted_unpicklers(base, ws, tmp_path, kind, unsafe_torch_default):
    """Past the checks (``verified=True``), Megatron's own load path still refuses: the restricted
    reader is what reads, not only what checks."""
    path = copy_of(base, tmp_path) / "iter_0000002"
    marker = tmp_path / "marker"
    refused = plant(kind, path, marker)
    with live_trainer(overrides(ws, "direct")) as trainer:
        with pytest.raises(CheckpointError) as e:
            checkpoint.load(trainer.cfg, str(path), trainer.model, trainer.optimizer, trainer.scheduler,
                            verified=True)
    assert not marker.exists()
    assert str(path) in str(e.value)
    if kind != "common_pt":
        assert f"refusing to unpickle {refused}" in str(e.value)


def test_the_pretrain_cli_refuses_with_exit_code_2(base, ws, tmp_path):
    root = copy_of(base, tmp_path)
    marker = tmp_path / "marker"
    plant("rng_state", root / "iter_0000002", marker)
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    proc = subprocess.run([sys.executable, "-m", "megatron_gpas.pretrain", *overrides(
        ws, "cli", f"checkpoint.load='{root}'", f"checkpoint.save='{root}'", "train.steps=3")],
        capture_output=True, text=True, env=env, timeout=240, cwd=REPO_ROOT)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert not marker.exists()
    assert "refusing to unpickle builtins.exec" in proc.stderr and f"iter_0000002/__0_0.{DATA}" in proc.stderr


# =========================================================================== integrity


def flip_byte_in_tensor(path: Path, key: str = "embedding.word_embeddings.weight") -> Path:
    """Flip the high exponent bit of one float of tensor ``key`` in its data file. Each tensor is a
    torch.save zip record inside the file; its raw bytes are the record's ``data/0`` member."""
    metadata = _plain_metadata(path)
    info = metadata.storage_data[next(i for i in metadata.storage_data if i.fqn == key)]
    data_file = path / info.relative_path
    data = bytearray(data_file.read_bytes())
    record = zipfile.ZipFile(io.BytesIO(bytes(data[info.offset:info.offset + info.length])))
    member = next(m for m in record.infolist() if m.filename.endswith("/data/0"))
    assert member.compress_type == zipfile.ZIP_STORED
    header = info.offset + member.header_offset  # a zip local header: 30 bytes, then name and extra field
    name_length, extra_length = struct.unpack("<HH", data[header + 26:header + 30])
    start = header + 30 + name_length + extra_length
    data[start + member.file_size // 2 + 3] ^= 0x40  # a float's top byte: an exponent bit (|x| < 2 becomes ~1e38)
    data_file.write_bytes(bytes(data))
    return data_file


def test_the_manifest_is_every_file_with_its_size_and_sha256(base):
    for path in sorted(base.glob("iter_*")):
        manifest = json.loads((path / "checksums.json").read_text())
        assert manifest["algorithm"] == "sha256"
        files = {str(f.relative_to(path)): f for f in path.rglob("*") if f.is_file() and f.name != "checksums.json"}
        assert set(manifest["files"]) == set(files) and {".metadata", f"__0_0.{DATA}", "run_config.yaml"} <= set(files)
        for name, f in files.items():
            assert manifest["files"][name] == {"size": f.stat().st_size,
                                               "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}, name


def test_a_flipped_byte_in_a_tensor_is_detected_and_loads_silently_without_checksums(base, ws, tmp_path):
    root = copy_of(base, tmp_path)
    damaged = flip_byte_in_tensor(root / "iter_0000002")
    with pytest.raises(CheckpointError) as e:
        with live_trainer(overrides(ws, "flip", f"checkpoint.load='{root}'", f"checkpoint.save='{root}'",
                                    "train.steps=3")):
            pass
    assert f"{damaged}: contents changed since the save" in str(e.value)
    # without the checksums nothing notices: the damaged weights are loaded
    with live_trainer(overrides(ws, "flip", f"checkpoint.load='{root}'", "checkpoint.verify=false",
                                "train.steps=3")) as trainer:
        assert trainer.step == 2
        embedding = dict(unwrap_model(trainer.model[0]).named_parameters())["embedding.word_embeddings.weight"]
        assert float(embedding.abs().max()) > 1e30


def test_missing_extra_and_resized_files_are_named(base, tmp_path):
    path = copy_of(base, tmp_path) / "iter_0000002"
    assert integrity.check_checkpoint(str(path)).problems == []
    (path / "tokenizer" / "tokenizer.yaml").unlink()
    (path / "stray.bin").write_bytes(b"x")
    with open(path / "run_config.yaml", "a") as f:
        f.write("# edited\n")
    problems = "\n".join(integrity.check_checkpoint(str(path)).problems)
    assert f"{path}/tokenizer/tokenizer.yaml: missing" in problems
    assert f"{path}/stray.bin: not part of the checkpoint" in problems
    assert f"{path}/run_config.yaml: " in problems and "bytes, checksums.json says" in problems
    # without checksums only what would stop a load is reported
    assert integrity.check_checkpoint(str(path), checksums=False).problems == []


def test_processes_share_the_checking(base, tmp_path):
    path = copy_of(base, tmp_path) / "iter_0000002"
    damaged = flip_byte_in_tensor(path)
    reports = [integrity.check_checkpoint(str(path), rank=rank, world=2).problems for rank in range(2)]
    hits = [any(str(damaged) in p for p in problems) for problems in reports]
    assert sorted(hits) == [False, True]  # exactly one process hashed the data file


def test_shares_cover_every_file_once_and_balance_bytes():
    sizes = {f"f{i}": size for i, size in enumerate([100, 90, 80, 10, 10, 10, 5, 5, 1, 0, 0])}
    shares = [integrity.my_share(sizes, rank, 3) for rank in range(3)]
    assert sorted(name for share in shares for name in share) == sorted(sizes)
    loads = [sum(sizes[name] for name in share) for share in shares]
    assert max(loads) - min(loads) <= 10, loads  # 311 bytes over 3: 100/105/106 or so


def test_a_checkpoint_without_manifest_loads_with_a_warning(base, ws, tmp_path, capsys):
    root = copy_of(base, tmp_path)
    (root / "iter_0000002" / "checksums.json").unlink()
    with live_trainer(overrides(ws, "legacy", f"checkpoint.load='{root}'", "train.steps=3")) as trainer:
        assert trainer.step == 2
    out = capsys.readouterr().out
    assert f"checkpoint {root}/iter_0000002 has no checksums.json" in out
    assert sum("checksums.json" in line for line in out.splitlines()) == 1


# =========================================================================== fallback


DAMAGES = {
    "flipped byte": lambda path, marker: flip_byte_in_tensor(path),
    "unsafe pickle": lambda path, marker: plant("rng_state", path, marker),
    "incomplete": lambda path, marker: (path / "metadata.json").unlink(),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_newest_checkpoint_names_the_intact_one(base, ws, tmp_path, damage):
    root = copy_of(base, tmp_path)
    DAMAGES[damage](root / "iter_0000002", tmp_path / "marker")
    with pytest.raises(CheckpointError) as e:
        with live_trainer(overrides(ws, "nofallback", f"checkpoint.load='{root}'", f"checkpoint.save='{root}'",
                                    "train.steps=3")):
            pass
    message = str(e.value)
    assert f"checkpoint {root}/iter_0000002 is damaged" in message
    assert f"The newest intact checkpoint is {root}/iter_0000001" in message
    assert "set checkpoint.fallback=true to resume from iter_0000001" in message
    assert not (tmp_path / "marker").exists()


def test_fallback_resumes_from_the_newest_intact_checkpoint(base, ws, tmp_path, capsys):
    root = copy_of(base, tmp_path)
    flip_byte_in_tensor(root / "iter_0000002")
    with live_trainer(overrides(ws, "fallback", f"checkpoint.load='{root}'", f"checkpoint.save='{root}'",
                                "checkpoint.fallback=true", "checkpoint.save_interval=1", "train.steps=3")) as trainer:
        assert trainer.step == 1
        out = capsys.readouterr().out
        assert f"checkpoint {root}/iter_0000002 is damaged" in out
        assert f"resuming from the newest intact checkpoint, {root}/iter_0000001" in out
        # the damaged one is kept aside, and this run's saves continue from step 1
        assert (root / "iter_0000002.damaged").is_dir() and not (root / "iter_0000002").exists()
        assert (root / "latest").read_text().strip() == "iter_0000001"
        trainer.train()
    assert (root / "latest").read_text().strip() == "iter_0000003"
    for step in (2, 3):  # step 2 saved again, intact
        assert integrity.check_checkpoint(str(root / f"iter_000000{step}")).problems == []


def test_no_intact_checkpoint_at_all(base, ws, tmp_path):
    root = copy_of(base, tmp_path)
    for name in ("iter_0000001", "iter_0000002"):
        flip_byte_in_tensor(root / name)
    with pytest.raises(CheckpointError, match="holds no older intact checkpoint to fall back to"):
        with live_trainer(overrides(ws, "none", f"checkpoint.load='{root}'", "checkpoint.fallback=true",
                                    "train.steps=3")):
            pass


# =========================================================================== start-up checks


def _validate(ws, *extra):
    validate(load_config(None, overrides(ws, "startup", *extra)))


def test_checkpoint_load_that_finds_nothing_is_an_error(base, ws, tmp_path):
    typo = tmp_path / "chekpoints"
    with pytest.raises(ConfigError, match=f"checkpoint.load={typo} does not exist.*checkpoint.load_if_exists=true"):
        _validate(ws, f"checkpoint.load='{typo}'")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no complete checkpoint"):
        _validate(ws, f"checkpoint.load='{tmp_path / 'empty'}'")
    _validate(ws, f"checkpoint.load='{typo}'", "checkpoint.load_if_exists=true")  # a job's first start
    _validate(ws, f"checkpoint.load='{typo}'", f"checkpoint.pretrained='{base}'")  # fine-tuning's first start
    _validate(ws, f"checkpoint.load='{base}'")


def test_the_cli_refuses_a_mistyped_load_before_any_process_group(ws, tmp_path, capsys, monkeypatch):
    def no_process_group(cfg):
        raise AssertionError("a process group was started")

    monkeypatch.setattr(distributed, "init_distributed", no_process_group)
    typo = tmp_path / "chekpoints"
    assert pretrain.main(overrides(ws, "typo", f"checkpoint.load='{typo}'")) == 2
    assert f"checkpoint.load={typo} does not exist" in capsys.readouterr().err


def test_saving_over_a_newer_checkpoint_is_refused_at_start_up(base, ws, tmp_path):
    root = copy_of(base, tmp_path)
    with pytest.raises(ConfigError) as e:  # a new run into a finished run's folder
        _validate(ws, f"checkpoint.save='{root}'")
    assert f"holds a checkpoint of step 2 ({root}/iter_0000002), but this run starts at step 0" in str(e.value)
    assert "steps 1..2 would be lost" in str(e.value) and "checkpoint.overwrite=true" in str(e.value)
    with pytest.raises(ConfigError, match="starts at step 0"):  # weights only: a fresh start
        _validate(ws, f"checkpoint.save='{root}'", f"checkpoint.load='{root}'", "checkpoint.load_optimizer=false")
    other = tmp_path / "other"
    shutil.copytree(base, other)
    shutil.rmtree(other / "iter_0000002")
    (other / "latest").write_text("iter_0000001\n")
    with pytest.raises(ConfigError, match="but this run starts at step 1"):  # resuming another run's older step
        _validate(ws, f"checkpoint.save='{root}'", f"checkpoint.load='{other}'")
    _validate(ws, f"checkpoint.save='{root}'", "checkpoint.overwrite=true")
    _validate(ws, f"checkpoint.save='{root}'", f"checkpoint.load='{root}'")  # resuming it


def test_unwritable_directories_are_refused_at_start_up(ws, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=f"checkpoint.save={blocker}/ckpt cannot be created: {blocker} is a file"):
        _validate(ws, f"checkpoint.save='{blocker / 'ckpt'}'")
    with pytest.raises(ConfigError, match=f"logging.dir={blocker}/deep/run cannot be created: {blocker} is a file"):
        validate(load_config(None, [*overrides(ws, "x"), f"logging.dir='{blocker / 'deep' / 'run'}'"]))


def test_too_little_disk_for_one_checkpoint_is_a_warning(ws, tmp_path, capsys):
    free = shutil.disk_usage(tmp_path).free
    # a model of at least 16·h² parameters per layer (4h² attention, 12h² SwiGLU with ffn = 4h),
    # 16 bytes each: L·256·h² bytes, made twice the free space
    hidden = 4096
    layers = max(1, int(2 * free / (256 * hidden**2)) + 1)
    big = [f"model.num_layers={layers}", f"model.hidden_size={hidden}", "model.num_attention_heads=32",
           f"model.ffn_hidden_size={4 * hidden}"]
    validate(load_config(None, [*overrides(ws, "big"), *big, f"checkpoint.save='{tmp_path / 'ckpt'}'"]))
    out = capsys.readouterr().out
    assert f"[warn] checkpoint.save={tmp_path / 'ckpt'}: " in out and "less than one checkpoint" in out
    _validate(ws, f"checkpoint.save='{tmp_path / 'ckpt'}'")
    assert "less than one checkpoint" not in capsys.readouterr().out


# =========================================================================== saving


class TestSaving:
    @pytest.fixture(scope="class")
    def trainer(self, ws):
        with live_trainer(overrides(ws, "saving")) as trainer:
            yield trainer

    @staticmethod
    def _save(trainer, root: Path, step: int, **cfg_changes) -> str:
        cfg = trainer.cfg
        if cfg_changes:
            cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, **cfg_changes))
        return checkpoint.save(cfg, str(root), step, trainer.model, trainer.optimizer, trainer.scheduler,
                               {"step": step, "consumed_train_samples": 0})

    def test_non_finite_weights_are_never_saved(self, trainer, tmp_path):
        weight = dict(unwrap_model(trainer.model[0]).named_parameters())["decoder.layers.1.mlp.linear_fc2.weight"]
        saved = weight.detach().clone()
        try:
            with torch.no_grad():
                weight.view(-1)[7] = float("nan")
            with pytest.raises(NonFiniteWeightsError, match=r"decoder\.layers\.1\.mlp\.linear_fc2\.weight"):
                self._save(trainer, tmp_path / "ckpt", 1)
            with torch.no_grad():
                weight.copy_(saved)
                weight.view(-1)[0] = float("-inf")
            with pytest.raises(NonFiniteWeightsError):
                self._save(trainer, tmp_path / "ckpt", 1)
        finally:
            with torch.no_grad():
                weight.copy_(saved)
        assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())
        self._save(trainer, tmp_path / "ckpt", 1)  # finite again: saved

    def test_a_full_disk_removes_the_partial_save_and_says_where_and_how_much_is_free(self, trainer, tmp_path,
                                                                                        monkeypatch):
        root = tmp_path / "ckpt"
        self._save(trainer, root, 1)

        class NearlyFullDisk(io.FileIO):
            """A file on a disk with 4 KiB left: writing more fails as the kernel's write(2) does."""
            room = 4096

            def write(self, data):
                size = memoryview(data).nbytes
                if size > NearlyFullDisk.room:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)
                NearlyFullDisk.room -= size
                return super().write(data)

        # the writer's open() of each data file (the lowest level reachable in this process)
        monkeypatch.setattr(filesystem_async, "open", lambda name, mode: io.BufferedWriter(NearlyFullDisk(name, mode)),
                            raising=False)
        with pytest.raises(CheckpointError) as e:
            self._save(trainer, root, 2)
        message = str(e.value)
        # (Megatron's writer reports the worker's OSError by its class only)
        assert f"saving checkpoint {root}/iter_0000002 failed: " in message and "OSError" in message
        assert f"free on {root}" in message and f"the incomplete {root}/iter_0000002.partial was removed" in message
        assert sorted(p.name for p in root.iterdir()) == ["iter_0000001", "latest"]
        assert (root / "latest").read_text().strip() == "iter_0000001"
        monkeypatch.undo()
        self._save(trainer, root, 2)  # room again: the next save works
        assert (root / "latest").read_text().strip() == "iter_0000002"

    def test_latest_never_moves_back_unless_overwrite(self, trainer, tmp_path):
        root = tmp_path / "ckpt"
        self._save(trainer, root, 5)
        with pytest.raises(CheckpointError, match="its latest checkpoint is step 5.*checkpoint.overwrite=true"):
            self._save(trainer, root, 3)
        assert sorted(p.name for p in root.iterdir()) == ["iter_0000005", "latest"]
        self._save(trainer, root, 5)  # the same step again: replaced in place
        self._save(trainer, root, 3, overwrite=True)
        assert (root / "latest").read_text().strip() == "iter_0000003"
