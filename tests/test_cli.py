"""The command line of pretraining and fine-tuning, through real processes: --print-config,
--dry-run (checks and parameter counts, against a closed-form count), what the libraries may
print (logging.verbose), evaluation off (train.eval_iters=0), and the README's commands.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_gpas.config import ConfigError, load_config
from synthetic import write_synthetic_dataset

REPO_ROOT = Path(__file__).resolve().parent.parent

# A small Llama shape with GQA (2 KV groups) and a vocabulary that TP=2 pads (300 -> 512).
L, H, HEADS, GROUPS, FFN, VOCAB = 4, 64, 4, 2, 172, 300
SHAPE = [f"model.num_layers={L}", f"model.hidden_size={H}", f"model.num_attention_heads={HEADS}",
         f"model.num_query_groups={GROUPS}", f"model.ffn_hidden_size={FFN}", f"model.vocab_size={VOCAB}",
         "model.max_seq_length=64"]

# Library output that the console must not show by default (megatron_gpas/console.py): Python
# warnings printed with their source file, Megatron's log records, torch's C++-style log lines.
NOISE = re.compile(r"site-packages/|^(WARNING|INFO) megatron\.|Warning: |^[WI]\d{4} ", re.M)


@pytest.fixture(scope="module")
def dataset(workspace) -> str:
    return write_synthetic_dataset(str(workspace / "data" / "synthetic"), vocab_size=256, num_docs=40, doc_len=100)


def data_overrides(dataset: str, tmp_path: Path, vocab: int = VOCAB) -> list[str]:
    """Data with the null tokenizer, logs and checkpoints under tmp_path."""
    return [f"data.paths=['{dataset}']", "data.tokenizer.kind='null'", f"data.tokenizer.vocab_size={vocab}",
            "data.split='90,10,0'", f"logging.dir='{tmp_path / 'run'}'", f"checkpoint.save='{tmp_path / 'ckpt'}'",
            "train.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=4",
            "logging.tensorboard=false", "logging.plots=false"]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    for var in ("WORLD_SIZE", "RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        env.pop(var, None)
    return env


def cli(entry: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"megatron_gpas.{entry}", *args], cwd=REPO_ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


# Runs a module as `python -m` does and, at exit, prints the process's peak resident memory (VmHWM:
# this process image's own, unlike rusage, which also counts the parent's pages at the fork).
_WITH_PEAK_MEMORY = """
import atexit, runpy, sys
def peak():
    with open("/proc/self/status") as f:
        kib = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    print(f"peak memory: {kib} KiB", file=sys.stderr)
atexit.register(peak)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def cli_peak_memory(entry: str, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    """``cli`` plus the peak resident memory of that process in GB."""
    proc = subprocess.run([sys.executable, "-c", _WITH_PEAK_MEMORY, f"megatron_gpas.{entry}", *args], cwd=REPO_ROOT,
                          env=_env(), capture_output=True, text=True, timeout=300)
    kib = re.search(r"^peak memory: (\d+) KiB$", proc.stderr, re.M)
    assert kib, proc.stderr
    return proc, int(kib[1]) / 2**20


def dry_run_numbers(stdout: str) -> dict:
    """The counts of a --dry-run's lines, as integers."""
    def number(text: str) -> int:
        return int(text.replace(",", ""))

    totals = re.search(r"\[dry-run\] parameters ([\d,]+): embedding ([\d,]+), LM head ([\d,]+), "
                       r"non-embedding ([\d,]+)", stdout)
    assert totals, stdout
    stages = re.findall(r"\[dry-run\] pipeline stage (\d+): (.*): ([\d,]+) parameters, ([\d,]+) per tensor-parallel",
                        stdout)
    return {"total": number(totals[1]), "embedding": number(totals[2]), "head": number(totals[3]),
            "non_embedding": number(totals[4]),
            "stages": [(int(s), parts, number(n), number(per_rank)) for s, parts, n, per_rank in stages]}


# --------------------------------------------------------------------------- --print-config


def test_print_config_prints_the_resolved_config_as_loadable_yaml(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": {"preset": "llama3-8b", "num_layers": 8}, "train": {"steps": 7}}))
    proc = cli("pretrain", "--config", str(config), "optim.lr=3e-4", "--print-config")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["model"]["preset"] == "llama3-8b"
    assert (printed["model"]["hidden_size"], printed["model"]["num_query_groups"], printed["model"]["vocab_size"]) \
        == (4096, 8, 128256)  # expanded from the preset
    assert printed["model"]["num_layers"] == 8  # the file wins over the preset
    assert printed["train"]["steps"] == 7 and printed["optim"]["lr"] == 3e-4  # the file and the override
    assert printed["train"]["eval_iters"] == 4 and printed["logging"]["verbose"] is False  # defaults
    (tmp_path / "printed.yaml").write_text(proc.stdout)
    assert load_config(tmp_path / "printed.yaml") == load_config(config, ["optim.lr=3e-4"])


def test_finetune_print_config_shows_its_own_defaults(tmp_path):
    proc = cli("finetune", "sft.train_files=[train.jsonl]", "--print-config")
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["gpas"]["freeze"] is True  # fine-tuning freezes the gates unless told otherwise
    assert printed["sft"]["train_files"] == ["train.jsonl"]


# --------------------------------------------------------------------------- --dry-run


def llama_count(layers: int, hidden: int, heads: int, groups: int, ffn: int, padded_vocab: int) -> dict:
    """Parameters of a Llama block stack, written out: q, k, v, o projections, SwiGLU (gate, up,
    down), two RMSNorm weights per layer, the final norm, an untied embedding and LM head."""
    head_dim = hidden // heads
    attention = hidden * (heads + 2 * groups) * head_dim + heads * head_dim * hidden
    mlp = 3 * hidden * ffn
    layer = attention + mlp + 2 * hidden
    embedding = padded_vocab * hidden
    return {"layer": layer, "layer_norms": 2 * hidden, "embedding": embedding, "final_norm": hidden,
            "total": embedding + layers * layer + hidden + embedding}


def test_dry_run_counts_the_layout_without_starting_or_writing(dataset, tmp_path):
    tp, pp = 2, 2
    proc = cli("pretrain", *SHAPE, *data_overrides(dataset, tmp_path), f"parallel.tensor={tp}",
               f"parallel.pipeline={pp}", "--dry-run", "--world-size", "8")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "[dry-run] the config is valid for 8 processes: TP=2 × PP=2 × DP=2" in out
    expected = llama_count(L, H, HEADS, GROUPS, FFN, padded_vocab=512)  # 300 padded to a multiple of 128 × TP
    got = dry_run_numbers(out)
    assert got["total"] == expected["total"]
    assert got["embedding"] == got["head"] == expected["embedding"]
    assert got["non_embedding"] == L * expected["layer"] + expected["final_norm"]
    layers = L // pp * expected["layer"]  # each stage holds half of the layers
    # one TP rank holds 1/TP of every matrix (the vocabulary rows included) and every norm weight whole
    layers_per_rank = L // pp * ((expected["layer"] - expected["layer_norms"]) // tp + expected["layer_norms"])
    vocab_rows_per_rank = expected["embedding"] // tp
    assert got["stages"] == [
        (0, "embedding, layers 1-2", expected["embedding"] + layers, vocab_rows_per_rank + layers_per_rank),
        (1, "layers 3-4, final norm + LM head", layers + expected["final_norm"] + expected["embedding"],
         layers_per_rank + expected["final_norm"] + vocab_rows_per_rank),
    ]
    assert "[dry-run] nothing was started or written" in out
    assert not (tmp_path / "run").exists() and not (tmp_path / "ckpt").exists()
    assert not NOISE.search(proc.stdout + proc.stderr), proc.stderr


def test_dry_run_of_llama3_8b_allocates_no_weights(dataset, tmp_path):
    """8,030,261,248 parameters (Meta's count for Llama-3-8B), in well under the 32 GB that fp32
    weights would take: the model is built on the meta device."""
    proc, peak_gb = cli_peak_memory("pretrain", "model.preset=llama3-8b",
                                    *data_overrides(dataset, tmp_path, vocab=128256), "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = dry_run_numbers(proc.stdout)
    assert "[dry-run] the config is valid for 1 process: TP=1 × PP=1 × DP=1" in proc.stdout  # (no launcher)
    assert got["total"] == 8_030_261_248
    assert got["total"] == llama_count(32, 4096, 32, 8, 14336, 128256)["total"]
    assert got["stages"][0][1] == "embedding, layers 1-32, final norm + LM head"
    assert peak_gb < 4, f"the dry run used {peak_gb:.1f} GB"


def test_finetune_dry_run_reads_the_instruction_data_and_verbose_shows_megatron(dataset, tmp_path):
    """Also: logging.verbose=true lets Megatron's warnings and INFO messages through (the other
    tests here check that, by default, none are printed)."""
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"{i} {i + 1}", "response": f"{i + 2} 7"}) + "\n"
                             for i in range(1, 40)))
    overrides = [o for o in data_overrides(dataset, tmp_path) if not o.startswith(("data.paths", "data.split"))]
    proc = cli("finetune", *SHAPE, *overrides, f"sft.train_files=['{train}']", "logging.verbose=true", "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[sft] train:" in proc.stdout  # the examples were read and laid out, as a start does
    assert dry_run_numbers(proc.stdout)["total"] == llama_count(L, H, HEADS, GROUPS, FFN, padded_vocab=384)["total"]
    assert not (tmp_path / "run").exists()
    assert "WARNING megatron.core.models.gpt.gpt_model: GPTModel IS DEPRECATED" in proc.stderr
    assert re.search(r"^INFO megatron\.core\.", proc.stderr, re.M), proc.stderr


# --------------------------------------------------------------------------- console and eval off


def test_a_run_shows_only_its_own_lines_and_no_evaluation_with_eval_iters_0(dataset, tmp_path):
    proc = cli("pretrain", *SHAPE, *data_overrides(dataset, tmp_path), "train.steps=2", "train.eval_iters=0",
               "logging.interval=1", "checkpoint.save=null")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not NOISE.search(proc.stdout + proc.stderr), proc.stdout + proc.stderr
    assert "[setup] evaluation off (train.eval_iters=0)" in proc.stdout
    assert re.search(r"^step +2/2 \| loss", proc.stdout, re.M)
    assert "[eval]" not in proc.stdout and "no validation data" not in proc.stdout
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics and not any(key.startswith("eval/") for record in metrics for key in record)


# --------------------------------------------------------------------------- the README's commands


def _documented_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every pretraining command in the README and docs whose config file exists
    (shell loops with variables are left out)."""
    commands = []
    for doc in [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]:
        text = re.sub(r"\\\n\s*", " ", doc.read_text())  # join continued lines
        for n, line in enumerate(text.splitlines(), start=1):
            line = line.split("#")[0] if line.lstrip().startswith(("python", "torchrun")) else line
            if "megatron_gpas.pretrain --config" not in line or "$" in line or "`" in line:
                continue
            argv = shlex.split(line.strip())
            config = argv[argv.index("--config") + 1]
            if (REPO_ROOT / config).is_file():
                commands.append((f"{doc.name}:{n}", argv))
    return commands


def test_every_documented_pretraining_command_is_valid():
    from megatron_gpas.model.spec import transformer_engine_available
    from megatron_gpas.validation import validate

    commands = _documented_commands()
    if not transformer_engine_available():  # docs/gpu-validation.md's commands need a GPU
        commands = [(where, argv) for where, argv in commands if "model.backend=te" not in argv]
    assert any(argv[0] == "torchrun" for _, argv in commands)  # the README's parallel example is among them
    for where, argv in commands:
        def option(name: str, default: int) -> int:
            return int(argv[argv.index(name) + 1]) if name in argv else default

        start = argv.index("--config") + 2
        rest = argv[start:]
        overrides = [a for i, a in enumerate(rest) if not a.startswith("--") and rest[i - 1] != "--world-size"]
        cfg = load_config(REPO_ROOT / argv[start - 1], overrides)
        p = cfg.parallel
        world = option("--nproc-per-node", 1) * option("--nnodes", 1) if argv[0] == "torchrun" else \
            option("--world-size", p.tensor * p.pipeline)  # (a dry run's default)
        try:  # (the data are fetched or made by `make demo`)
            validate(cfg, world_size=world, check_files=False)
        except ConfigError as e:
            raise AssertionError(f"{where}: {' '.join(argv)}: {e}") from e
