"""tools/evaluate.py: perplexity of a checkpoint on an indexed dataset.

A short pretraining run (in this process) ends with its evaluation (eval/loss over
train.eval_iters validation batches) and a checkpoint. tools/evaluate.py on that checkpoint
and the same validation batches must give exp(that loss), in one process and under
``torchrun`` with two processes and TP=2. Evaluating a whole split pads its last global batch
with masked samples; that must count for nothing (same result as batches that need no padding).
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron.core import parallel_state

from megatron_gpas import distributed
from megatron_gpas.config import load_config
from megatron_gpas.training import Trainer
from synthetic import write_integer_tokenizer, write_synthetic_dataset
from test_parallel import _child_env, _free_port

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

REPO_ROOT = Path(__file__).resolve().parent.parent
TOOL = REPO_ROOT / "tools" / "evaluate.py"
VOCAB = 128  # padded to 128 rows at TP1 and TP2 (make_vocab_size_divisible_by 64 × TP)
SEQ, MBS, GBS, EVAL_ITERS = 16, 2, 4, 3


def _load_tool():
    spec = importlib.util.spec_from_file_location("evaluate_tool", TOOL)  # not the `evaluate` package
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


evaluate_tool = _load_tool()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """3 pretraining steps (TP1), the end-of-run evaluation, and the checkpoint. The tokenizer is a
    file (encoding like the null tokenizer), so the checkpoint carries a copy of it."""
    ws = tmp_path_factory.mktemp("evaluate")
    prefix = write_synthetic_dataset(str(ws / "synthetic"), vocab_size=VOCAB, num_docs=60, doc_len=100)
    tokenizer = write_integer_tokenizer(ws / "tokenizer" / "tokenizer.json", VOCAB)
    if parallel_state.model_parallel_is_initialized():
        distributed.shutdown(keep_process_group=True)
    trainer = Trainer(load_config(None, [
        "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.ffn_hidden_size=64",
        f"model.vocab_size={VOCAB}", "model.make_vocab_size_divisible_by=64", "model.max_seq_length=64",
        "gpas.enabled=true", "train.steps=3", f"train.seq_length={SEQ}", f"train.micro_batch_size={MBS}",
        f"train.global_batch_size={GBS}", f"train.eval_iters={EVAL_ITERS}", "optim.lr=1.0e-2",
        f"data.paths=['{prefix}']", "data.tokenizer.kind='huggingface'", f"data.tokenizer.path='{tokenizer}'",
        f"data.cache_dir='{ws / 'data_cache'}'", "data.split='80,20,0'", f"checkpoint.save='{ws / 'ckpt'}'",
        f"logging.dir='{ws / 'run'}'", "logging.tensorboard=false", "logging.plots=false"]))
    try:
        summary = trainer.train()
    finally:
        trainer.close()  # as the CLI does; evaluate.py starts its own process group
    # data of a larger vocabulary than the checkpoint's (ids up to 511 for an embedding of 128 rows)
    wide = write_synthetic_dataset(str(ws / "wide"), vocab_size=512, num_docs=60, doc_len=100)
    return {"ws": ws, "prefix": prefix, "wide": wide, "ckpt": ws / "ckpt", "eval_loss": summary["eval/loss"],
            "tokenizer": tokenizer}


def _evaluate(trained: dict, name: str, *args: str, checkpoint: Path | None = None) -> dict:
    out = trained["ws"] / f"{name}.json"
    code = evaluate_tool.main([str(checkpoint or trained["ckpt"]), "--data", trained["prefix"], "--output", str(out),
                               *args])
    assert code == 0
    return json.loads(out.read_text())


# the trainer's end-of-run evaluation: its validation batches
TRAINER_EVAL = ("--split", "valid", "--num-batches", str(EVAL_ITERS), "--micro-batch-size", str(MBS),
                "--global-batch-size", str(GBS))


def test_perplexity_is_exp_of_the_trainer_eval_loss(trained):
    result = _evaluate(trained, "tp1", *TRAINER_EVAL)
    assert result["tokens"] == EVAL_ITERS * GBS * SEQ and result["sequences"] == EVAL_ITERS * GBS
    # same weights, samples, micro-batches and reduction as the trainer: the same number
    assert result["loss"] == pytest.approx(trained["eval_loss"], rel=1e-12, abs=0)
    assert result["perplexity"] == pytest.approx(math.exp(trained["eval_loss"]), rel=1e-12)
    assert result["layout"] == {"tensor": 1, "pipeline": 1, "virtual_pipeline": 1, "data": 1, "world": 1}
    assert result["checkpoint"].endswith("iter_0000003") and result["data_split"] == "80,20,0"


def test_whole_split_padding_counts_for_nothing(trained):
    padded = _evaluate(trained, "all_padded", "--split", "valid", "--micro-batch-size", "2",
                       "--global-batch-size", "4")
    exact = _evaluate(trained, "all_exact", "--split", "valid", "--micro-batch-size", "1",
                      "--global-batch-size", "1")
    assert padded["sequences"] == exact["sequences"] and padded["sequences"] % 4 != 0  # padding was needed
    assert padded["num_batches"] == math.ceil(padded["sequences"] / 4) and exact["num_batches"] == exact["sequences"]
    assert padded["tokens"] == exact["tokens"] == padded["sequences"] * SEQ
    assert padded["loss"] == pytest.approx(exact["loss"], rel=1e-6)
    # the whole dataset (split "all") holds more than the valid split
    everything = _evaluate(trained, "all_docs", "--split", "all", "--num-batches", "2")
    assert everything["data_split"] == "1,0,0" and everything["tokens"] == 2 * 2 * SEQ  # micro-batch 2 (checkpoint)


def test_tensor_parallel_evaluation_under_torchrun(trained):
    out = trained["ws"] / "tp2.json"
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    cmd = [*launcher, "--nnodes=1", "--nproc-per-node=2", "--master-addr=127.0.0.1", f"--master-port={_free_port()}",
           str(TOOL), str(trained["ckpt"]), "--data", trained["prefix"], "--split", "valid",
           "--num-batches", str(EVAL_ITERS), "--micro-batch-size", str(MBS), "--global-batch-size", str(GBS),
           "--output", str(out), "parallel.tensor=2", "parallel.sequence_parallel=true"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_child_env(1), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    result = json.loads(out.read_text())
    assert result["layout"]["tensor"] == 2 and result["layout"]["world"] == 2
    assert result["tokens"] == EVAL_ITERS * GBS * SEQ
    # TP splits the matmuls: equal up to fp32 rounding
    assert result["loss"] == pytest.approx(trained["eval_loss"], rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(trained["eval_loss"]), rel=1e-5)


def test_a_moved_checkpoint_uses_the_tokenizer_copy_inside_it(trained, capsys):
    """The checkpoint copied elsewhere and its run's tokenizer file gone (another machine): the
    tokenizer comes from the copy inside the checkpoint, with a line saying so, and the
    evaluation is the trainer's."""
    moved = trained["ws"] / "elsewhere" / "ckpt"
    shutil.copytree(trained["ckpt"], moved)
    original = Path(trained["tokenizer"])
    original.rename(original.with_suffix(".gone"))
    try:
        capsys.readouterr()
        result = _evaluate(trained, "moved", *TRAINER_EVAL, checkpoint=moved)
    finally:
        original.with_suffix(".gone").rename(original)
    copy = moved / "iter_0000003" / "tokenizer" / "tokenizer.json"
    assert f"[evaluate] tokenizer {original} not found; using the checkpoint's copy {copy}" in capsys.readouterr().out
    assert result["checkpoint"] == str(moved / "iter_0000003")
    assert result["loss"] == pytest.approx(trained["eval_loss"], rel=1e-12, abs=0)


@pytest.mark.parametrize("args, message", [
    (["/nonexistent/ckpt", "--data", "{prefix}"], "error: checkpoint not found: /nonexistent/ckpt is not a directory"),
    (["{ckpt}", "--data", "/nonexistent/corpus"], "error: data file not found: /nonexistent/corpus.bin"),
    (["{ckpt}", "--data", "{prefix}", "--num-batches", "0"], "error: --num-batches must be positive"),
    (["{ckpt}", "--data", "{prefix}", "model.hidden_size=48"], "model.hidden_size: checkpoint has 32, config has 48"),
    (["{ckpt}", "--data", "{prefix}", "model.make_vocab_size_divisible_by=256"],
     "the checkpoint's embedding has 128 rows (model.vocab_size 128 padded at parallel.tensor=1) but this run pads "
     "it to 256 (model.make_vocab_size_divisible_by 256 × parallel.tensor 1); make them agree, "
     "e.g. model.make_vocab_size_divisible_by=128"),
    (["{ckpt}", "--data", "{wide}"], "but model.vocab_size has 128 ids: tokenized with another tokenizer?"),
])
def test_bad_arguments_fail_before_any_process_group(trained, monkeypatch, capsys, args, message):
    monkeypatch.setattr(distributed, "init_distributed", lambda cfg: pytest.fail("process group started"))
    names = {"{prefix}": trained["prefix"], "{wide}": trained["wide"], "{ckpt}": str(trained["ckpt"])}
    args = [names.get(a, a) for a in args]
    assert evaluate_tool.main(args) == 2
    assert message in capsys.readouterr().err
