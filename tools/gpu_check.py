#!/usr/bin/env python
r"""One-command GPU validation: every scheme trains in BF16, the benchmark measures GPAS overhead,
MFU and memory, and one JSON + Markdown report says what was met.

On a machine with PyPI access (once; the GPU host has no network), from the repository root:

    python tools/gpu_check.py prepare --wheels .whl     # megatron-core and what the host lacks, as wheels

On the GPU host (Python 3.12 and PyTorch with CUDA), from a copy of the repository holding .whl/:

    python tools/gpu_check.py run --wheels .whl --out gpu_report        # within 8 minutes on one H100/H200

Anywhere, to check the tool itself on tiny shapes (CI runs this on CPU):

    python tools/gpu_check.py run --dry-run --out /tmp/gpu_check

``run`` installs the wheels into a private folder (``--site``) when megatron-core is not
importable, then runs five phases, each in its own process with its own time limit, so a phase
that fails or runs out of time leaves the others and the report intact:

  train        BF16 training steps of every scheme ± GPAS on the ``local`` backend, and on ``te``
               with and without FP8 where Transformer Engine imports, on a learnable synthetic
               dataset (a fixed Markov chain) written on the spot: every loss must stay finite and fall
  bench_1b     tools/bench_schemes.py at the GPAS paper's 1B shape: Pre-LN against Pre+GPAS
               (GPAS overhead, MFU, memory); with the fusions turned off too where they exist
  bench_8b     the Llama-3-8B layer shape (hidden 4096, GQA 32/8, SwiGLU 14336, vocabulary 128256,
               sequence 8192) cut to 4 layers so that two models fit one GPU: MFU, GPAS overhead
  memory       the 1B shape alone on the GPU: its peak memory against the planner's estimate
  bench_norms  every norm replacement against Pre-LN at the 350M shape (their step-time overheads)

Written to --out: report.json, report.md, one log per phase, train_results.jsonl and the
benchmarks' JSON. The exit code is 0 when every phase ran and every training case passed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(REPO_ROOT, "tools")
for path in (REPO_ROOT, TOOLS):
    if path not in sys.path:
        sys.path.insert(0, path)

# module -> distribution the GPU host may lack (KINDS.md lists what its image holds). megatron-core,
# emerging-optimizers (Muon) and zstandard are not there; the rest are checked so that a different
# host says at once what to carry.
REQUIRED_MODULES = {"megatron.core": "megatron-core", "emerging_optimizers": "emerging-optimizers",
                    "zstandard": "zstandard", "yaml": "pyyaml", "numpy": "numpy", "safetensors": "safetensors",
                    "transformers": "transformers", "tensorboard": "tensorboard", "matplotlib": "matplotlib",
                    "psutil": "psutil", "sentencepiece": "sentencepiece", "tokenizers": "tokenizers"}
# what `prepare` downloads: the versions installed here (megatron-core is pinned in pyproject.toml)
CARRIED = ("megatron-core", "emerging-optimizers", "zstandard")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")

# The targets (targets.md): GPAS overhead over Pre-LN, MFU of the 1B recipe and of the 8B shape.
GPAS_OVERHEAD_TARGET = 0.01
MFU_1B_TARGET = 0.45
MFU_8B_TARGET = 0.50
DEFAULT_BUDGET_MINUTES = 8.0


@dataclasses.dataclass
class Phase:
    name: str
    what: str
    cap_s: float  # the most this phase may take on a GPU (the run's deadline may cut it shorter)


PHASES = (
    Phase("train", "training steps of every scheme ± GPAS, BF16 on a GPU (loss finite and falling)", 210),
    Phase("bench_1b", "GPAS overhead and MFU at the 1B paper shape", 120),
    Phase("bench_8b", "MFU at the Llama-3-8B shape cut to 4 layers, sequence 8192", 100),
    Phase("memory", "the planner's memory estimate against the measured peak (1B shape, one model)", 60),
    Phase("bench_norms", "the norm replacements' step time against Pre-LN (350M shape)", 100),
)


# --------------------------------------------------------------------------- the training cases


def training_variants() -> list[str]:
    """Every registered scheme (bench_schemes' variant syntax), plus Pre-LN with LayerNorm and OSP
    with Muon, its own optimizer."""
    from megatron_gpas.model.schemes import SCHEMES

    variants = list(SCHEMES)
    variants.insert(variants.index("pre") + 1, "pre@layernorm")
    if "osp" in variants:
        variants.insert(variants.index("osp") + 1, "osp+muon")
    return variants


def training_shape(dry_run: bool) -> dict:
    if dry_run:  # seconds on 2 CPU cores per case
        return dict(overrides=["model.preset=tiny", "model.num_layers=2", "model.vocab_size=512",
                               "model.make_vocab_size_divisible_by=128", "train.seq_length=64",
                               "train.micro_batch_size=8", "train.global_batch_size=16", "train.steps=12",
                               "optim.lr=1e-2", "optim.warmup_steps=0"],
                    vocab=512, hidden=64, docs=200, doc_len=300)
    return dict(overrides=["model.num_layers=4", "model.hidden_size=512", "model.num_attention_heads=8",
                           "model.ffn_hidden_size=1368", "model.vocab_size=4096", "model.max_seq_length=512",
                           "train.seq_length=512", "train.micro_batch_size=8", "train.global_batch_size=16",
                           "train.steps=30", "optim.lr=1e-3", "optim.warmup_steps=5"],
                vocab=4096, hidden=512, docs=1000, doc_len=1000)


def training_cases(dry_run: bool, backends: list[tuple[str, str | None]]) -> list[dict]:
    from bench_schemes import takes_gpas, variant_overrides

    shape = training_shape(dry_run)
    cases = []
    for backend, fp8 in backends:
        for variant in training_variants():
            for gpas in (False, True) if takes_gpas(variant) else (False,):
                name = f"{variant}{'+gpas' if gpas else ''} [{backend}{' fp8' if fp8 else ''}]"
                overrides = [*shape["overrides"], *variant_overrides(variant, gpas, shape["hidden"]),
                             f"model.backend={backend}", "optim.clip_grad=1.0", "train.eval_iters=1"]
                if fp8:
                    overrides.append(f"train.fp8={fp8}")
                cases.append({"name": name, "variant": variant, "gpas": gpas, "backend": backend, "fp8": fp8,
                              "overrides": overrides})
    return cases


def memory_case(dry_run: bool) -> dict:
    """One model alone on the GPU, so that its peak memory can be set against the planner's estimate
    (tools/plan_run.py): the 1B paper shape with GPAS, sequence 2048, micro-batch 4."""
    from bench_schemes import takes_gpas, variant_overrides

    shape = training_shape(dry_run)["overrides"] if dry_run else [
        "model.preset=1b", "train.seq_length=2048", "train.micro_batch_size=4", "train.global_batch_size=8",
        "train.steps=4", "optim.lr=1e-3", "optim.warmup_steps=0"]
    return {"name": "memory: pre+gpas 1b" if not dry_run else "memory: pre+gpas tiny", "variant": "pre",
            "gpas": True, "backend": "local", "fp8": None, "check_falls": False, "measure_memory": True,
            "overrides": [*shape, *variant_overrides("pre", True, 2048), "model.backend=local", "train.eval_iters=1"]}


def available_backends(on_gpu: bool) -> tuple[list[tuple[str, str | None]], str]:
    """(backend, fp8) pairs to train with, and why te is or is not among them."""
    backends: list[tuple[str, str | None]] = [("local", None)]
    if not on_gpu:
        return backends, "te: not run (no GPU)"
    if importlib.util.find_spec("transformer_engine") is None:
        return backends, "te: not run (Transformer Engine is not importable on this host)"
    import torch

    backends.append(("te", None))
    if torch.cuda.get_device_capability() >= (8, 9):
        backends.append(("te", "e4m3"))
        return backends, "te: BF16 and FP8 (e4m3)"
    return backends, "te: BF16 only (FP8 needs compute capability 8.9 or newer)"


def loss_verdict(losses: list[float]) -> dict:
    """Finite everywhere, and the mean of the last three steps at least 3% below the first step's loss
    (the Markov stream is learned within a dozen steps: a scheme that does not get there is broken;
    nGPT, the slowest starter at the dry run's size, falls 5.4%)."""
    finite = bool(losses) and all(math.isfinite(x) for x in losses)
    tail = losses[-3:]
    falls = finite and len(losses) >= 4 and sum(tail) / len(tail) < 0.97 * losses[0]
    return {"finite": finite, "falls": falls}


def train_phase(spec_path: str) -> int:
    """The phase worker: run every case of the spec one after another in this process (one import,
    one process group), appending each result to the results file as soon as it is known."""
    import torch

    from megatron_gpas import distributed
    from megatron_gpas.config import load_config
    from megatron_gpas.data.synthetic import write_markov_dataset
    from megatron_gpas.training import Trainer

    with open(spec_path) as f:
        spec = json.load(f)
    work = spec["work"]
    prefix = os.path.join(work, "data", "synthetic")
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    write_markov_dataset(prefix, vocab_size=spec["vocab"], num_docs=spec["docs"], doc_len=spec["doc_len"])
    data = [f"data.paths=['{prefix}']", "data.tokenizer.kind='null'", f"data.tokenizer.vocab_size={spec['vocab']}",
            f"data.cache_dir='{os.path.join(work, 'data_cache')}'", "data.split='98,1,1'",
            "logging.interval=1", "logging.tensorboard=false", "logging.plots=false"]
    try:
        for case in spec["cases"]:
            log_dir = os.path.join(work, "runs", "".join(c if c.isalnum() or c in "+-" else "_" for c in case["name"]))
            record = {"name": case["name"], "variant": case["variant"], "gpas": case["gpas"],
                      "backend": case["backend"], "fp8": case["fp8"]}
            started = time.perf_counter()
            trainer = None
            try:
                cfg = load_config(None, [*case["overrides"], *data, f"logging.dir='{log_dir}'"])
                if case.get("measure_memory"):
                    record["planned_memory_gib"] = planned_memory(cfg)
                    if torch.cuda.is_available():
                        torch.cuda.reset_peak_memory_stats()
                trainer = Trainer(cfg, force=True)
                result = trainer.train()
                if case.get("measure_memory") and torch.cuda.is_available():
                    record["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                record.update(_metrics_of(log_dir))
                record["exit_code"] = result["exit_code"]
                record["eval_loss"] = trainer.last_eval_loss
                record["precision"] = "bf16" if trainer.bf16 else "fp32"
            except Exception as e:  # one failing scheme must not hide the others
                record["error"] = f"{type(e).__name__}: {e}"
            finally:
                if trainer is not None:
                    trainer.close(keep_process_group=True)
                del trainer
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            record["seconds"] = round(time.perf_counter() - started, 2)
            record.update(loss_verdict(record.get("losses", [])))
            record["passed"] = "error" not in record and record["finite"] and record.get("exit_code") == 0 \
                and (record["falls"] or not case.get("check_falls", True))
            with open(spec["results"], "a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"[train] {case['name']}: {'ok' if record['passed'] else 'FAILED'} "
                  f"({record.get('error') or _loss_line(record)}) in {record['seconds']:.1f} s", flush=True)
    finally:
        distributed.shutdown()
    return 0


def planned_memory(cfg) -> dict:
    """The planner's per-GPU estimate for a one-process run (GiB, by part). Counted on the meta
    device, so before the run's process groups exist."""
    from megatron_gpas.model.inventory import count_parameters
    from megatron_gpas.planner import memory_per_gpu

    stage = memory_per_gpu(cfg, count_parameters(cfg), world_size=1)[0]
    return {part: getattr(stage, part) / 2**30 for part in ("weights", "gradients", "optimizer", "activations", "total")}


def _metrics_of(log_dir: str) -> dict:
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    steps = [r for r in records if "train/loss" in r]
    last = steps[-1] if steps else {}
    out = {"losses": [r["train/loss"] for r in steps], "skipped_steps": int(last.get("train/skipped_steps", 0))}
    if "perf/tokens_per_s" in last:
        out["tokens_per_s"] = last["perf/tokens_per_s"]
    if "perf/mfu" in last:
        out["mfu"] = last["perf/mfu"]
    return out


def _loss_line(record: dict) -> str:
    losses = record.get("losses") or [float("nan")]
    return f"loss {losses[0]:.3f} → {losses[-1]:.3f}"


# --------------------------------------------------------------------------- the benchmarks


def bench_arguments(phase: str, dry_run: bool) -> list[str]:
    from bench_schemes import DEFAULT_VARIANTS

    fusions = ["pre~unfused+gpas"] if _bench_knows_unfused() else []  # 3 models of 1.3B: 73 GB with Adam
    schemes = {"bench_1b": ["pre", *fusions], "bench_8b": ["pre"],
               "bench_norms": [v for v in DEFAULT_VARIANTS if v != "pre"]}[phase]
    gpas = "off" if phase == "bench_norms" else "both"
    if dry_run:
        shape = ["--quick", "--preset", "tiny", "--seq-length", "64", "--micro-batch-size", "2",
                 "--rounds", "1", "--steps", "1", "--warmup", "1"]
    else:
        shape = {"bench_1b": ["--preset", "1b", "--seq-length", "2048", "--micro-batch-size", "4",
                              "--rounds", "3", "--steps", "5", "--warmup", "3"],
                 "bench_8b": ["--preset", "llama3-8b", "--seq-length", "8192", "--micro-batch-size", "1",
                              "--rounds", "3", "--steps", "3", "--warmup", "2", "model.num_layers=4"],
                 "bench_norms": ["--preset", "350m", "--seq-length", "2048", "--micro-batch-size", "4",
                                 "--rounds", "3", "--steps", "4", "--warmup", "2"]}[phase]
    return ["--schemes", *schemes, "--gpas", gpas, *shape]


def _bench_knows_unfused() -> bool:
    from bench_schemes import variant_overrides

    try:
        # a bench that does not know the suffix keeps it in the scheme name
        return all("~" not in o for o in variant_overrides("pre~unfused", True, 256))
    except Exception:
        return False


# --------------------------------------------------------------------------- the run


def environment(dry_run: bool) -> dict:
    import torch

    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "dry_run": dry_run, "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda if torch.cuda.is_available() else None,
           "megatron_core": _version("megatron-core"), "transformer_engine": _version("transformer-engine")
           or _version("transformer_engine"), "commit": _commit(), "host": platform.node()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["device"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor})"
    else:
        env["device"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return env


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def missing_modules() -> dict[str, str]:
    return {module: dist for module, dist in REQUIRED_MODULES.items() if not _importable(module)}


def _importable(module: str) -> bool:
    try:  # a dotted name raises when its parent package is missing
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def install_wheels(wheels: str, site: str) -> None:
    """``pip install --no-index --no-deps --target site wheels/*.whl`` (the host has no network)."""
    found = sorted(os.path.join(wheels, w) for w in os.listdir(wheels) if w.endswith(".whl"))
    if not found:
        raise SystemExit(f"error: --wheels {wheels} holds no .whl files (make them with `gpu_check.py prepare`)")
    print(f"[gpu_check] installing {len(found)} wheels from {wheels} into {site}", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--root-user-action=ignore", "--no-index",
                    "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade", "--target", site, *found], check=True)


def run_phase(name: str, command: list[str], log_path: str, timeout_s: float, env: dict) -> dict:
    started = time.perf_counter()
    if timeout_s < 5:
        return {"phase": name, "status": "not run (time budget spent)", "seconds": 0.0}
    print(f"[gpu_check] {name}: up to {timeout_s:.0f} s; log {log_path}", flush=True)
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, env=env,
                                cwd=REPO_ROOT).returncode
            status = "ok" if rc == 0 else f"failed (exit code {rc})"
        except subprocess.TimeoutExpired:
            status = f"cut short at its time limit ({timeout_s:.0f} s)"
    seconds = round(time.perf_counter() - started, 1)
    print(f"[gpu_check] {name}: {status} in {seconds} s", flush=True)
    return {"phase": name, "status": status, "seconds": seconds, "log": os.path.basename(log_path)}


def run(args: argparse.Namespace) -> int:
    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.dry_run:
        print("error: no CUDA device here. `gpu_check.py run --dry-run` checks the tool on tiny CPU shapes; "
              "the measurements need a GPU", file=sys.stderr)
        return 2
    out = os.path.abspath(args.out)
    work = os.path.join(out, "work")
    os.makedirs(work, exist_ok=True)
    started = time.perf_counter()
    budget = args.budget_minutes * 60
    deadline = started + budget
    env_record = environment(args.dry_run)
    print(f"[gpu_check] {env_record['device']}, torch {env_record['torch']}, megatron-core "
          f"{env_record['megatron_core']}; budget {args.budget_minutes:g} min; report in {out}", flush=True)
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1",
                 "PYTHONPATH": os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))}

    backends, te_note = available_backends(on_gpu)
    shape = training_shape(args.dry_run)
    cases = training_cases(args.dry_run, backends)
    if args.schemes:
        cases = [c for c in cases if c["variant"] in args.schemes]
    results_path = os.path.join(out, "train_results.jsonl")
    if os.path.exists(results_path):
        os.remove(results_path)
    specs = {}
    for phase, phase_cases in (("train", cases), ("memory", [memory_case(args.dry_run)])):
        specs[phase] = os.path.join(work, f"{phase}_spec.json")
        with open(specs[phase], "w") as f:
            json.dump({"work": work, "results": results_path, "cases": phase_cases, "vocab": shape["vocab"],
                       "docs": shape["docs"], "doc_len": shape["doc_len"]}, f, indent=1)

    phases = []
    for phase in PHASES:
        if args.phases and phase.name not in args.phases:
            continue
        if phase.name in specs:
            command = [sys.executable, os.path.abspath(__file__), "_train", specs[phase.name]]
        else:
            command = [sys.executable, os.path.join(TOOLS, "bench_schemes.py"),
                       *bench_arguments(phase.name, args.dry_run), "--output", os.path.join(out, f"{phase.name}.json")]
        limit = deadline - time.perf_counter()
        if on_gpu:
            limit = min(limit, phase.cap_s)
        phases.append({**run_phase(phase.name, command, os.path.join(out, f"{phase.name}.log"), limit, child_env),
                       "what": phase.what, "command": " ".join(command[1:])})

    report = build_report(out, env_record, phases, cases, te_note, time.perf_counter() - started)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(markdown(report))
    print(f"[gpu_check] report: {os.path.join(out, 'report.md')} and report.json "
          f"({report['seconds']:.0f} s in all)", flush=True)
    print(markdown_headline(report), flush=True)
    return 0 if report["passed"] else 1


def build_report(out: str, env: dict, phases: list[dict], cases: list[dict], te_note: str, seconds: float) -> dict:
    train = []
    results_path = os.path.join(out, "train_results.jsonl")
    if os.path.exists(results_path):
        with open(results_path) as f:
            train = [json.loads(line) for line in f if line.strip()]
    memory = [r for r in train if r["name"].startswith("memory:")]
    train = [r for r in train if not r["name"].startswith("memory:")]
    done = {r["name"] for r in train}
    not_run = [c["name"] for c in cases if c["name"] not in done]
    benches = {}
    for phase in phases:
        path = os.path.join(out, f"{phase['phase']}.json")
        if phase["phase"].startswith("bench") and os.path.exists(path):
            with open(path) as f:
                benches[phase["phase"]] = json.load(f)
    report = {"environment": env, "phases": phases, "train": train, "memory": memory, "train_not_run": not_run,
              "te": te_note,
              "benchmarks": benches, "targets": targets(benches), "seconds": round(seconds, 1)}
    report["passed"] = (all(p["status"] == "ok" for p in phases) and not not_run
                        and all(r["passed"] for r in train + memory))
    return report


def _row(bench: dict | None, variant: str) -> dict | None:
    return next((r for r in (bench or {}).get("results", []) if r["variant"] == variant), None)


def targets(benches: dict) -> list[dict]:
    """The issue's targets against what the benchmarks measured (None where not measured)."""
    out = []
    b1, b8 = benches.get("bench_1b"), benches.get("bench_8b")
    gpas = _row(b1, "pre+gpas")
    out.append({"target": "GPAS step-time overhead over Pre-LN at 1B", "goal": f"≤ {100 * GPAS_OVERHEAD_TARGET:.0f}%",
                "measured": None if gpas is None else
                f"{100 * (gpas['ratio'] - 1):+.1f}% (rounds {100 * (gpas['ratio_min'] - 1):+.1f}…"
                f"{100 * (gpas['ratio_max'] - 1):+.1f}%)",
                "met": None if gpas is None else gpas["ratio"] - 1 <= GPAS_OVERHEAD_TARGET})
    unfused = _row(b1, "pre~unfused+gpas")
    if unfused is not None or b1 is None:  # the same overhead before the fusions (gpas.fused, norm.fused)
        out.append({"target": "the same without the fusions (gpas.fused=none, norm.fused=false): the before",
                    "goal": "—", "measured": None if unfused is None else f"{100 * (unfused['ratio'] - 1):+.1f}%",
                    "met": None})
    out.append({"target": "MFU of the 1B paper shape with GPAS, BF16, one GPU", "goal": f"≥ {100 * MFU_1B_TARGET:.0f}%",
                "measured": None if gpas is None or "mfu" not in gpas else f"{100 * gpas['mfu']:.1f}%",
                "met": None if gpas is None or "mfu" not in gpas else gpas["mfu"] >= MFU_1B_TARGET})
    eight = _row(b8, "pre+gpas") or _row(b8, "pre")
    out.append({"target": "MFU of the Llama-3-8B shape (4 layers, seq 8192), BF16, local backend "
                          "(the target is set for Transformer Engine)", "goal": f"≥ {100 * MFU_8B_TARGET:.0f}%",
                "measured": None if eight is None or "mfu" not in eight else f"{100 * eight['mfu']:.1f}%",
                "met": None if eight is None or "mfu" not in eight else eight["mfu"] >= MFU_8B_TARGET})
    return out


def markdown_headline(report: dict) -> str:
    lines = ["| target | goal | measured | met |", "|---|---|---|---|"]
    for t in report["targets"]:
        met = "n/a (no GPU)" if report["environment"]["dry_run"] else "—" if t["goal"] == "—" else \
            {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {t['goal']} | {t['measured'] or '—'} | {met} |")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    from bench_schemes import markdown_table

    env = report["environment"]
    passed = sum(r["passed"] for r in report["train"])
    lines = [f"# GPU validation report ({'dry run on CPU, tiny shapes' if env['dry_run'] else env['device']})", "",
             f"- date: {env['date']}; commit: {env['commit'] or 'unknown'}; host: {env['host']}",
             f"- device: {env['device']}; Python {env['python']}, torch {env['torch']}, CUDA {env['cuda']}, "
             f"megatron-core {env['megatron_core']}, Transformer Engine {env['transformer_engine'] or 'absent'}",
             f"- {report['te']}",
             f"- result: {'**passed**' if report['passed'] else '**FAILED**'} in {report['seconds']:.0f} s: "
             f"{passed}/{len(report['train'])} training cases passed"
             + (f", {len(report['train_not_run'])} not run" if report["train_not_run"] else ""), "",
             "## Targets", "", markdown_headline(report), "", "## Phases", "",
             "| phase | what | status | seconds |", "|---|---|---|---|"]
    for p in report["phases"]:
        lines.append(f"| {p['phase']} | {p['what']} | {p['status']} | {p['seconds']} |")
    lines += ["", "## Training steps", "",
              "Each case trains from scratch on a synthetic stream from a fixed Markov chain (4 successors per token); passed = every loss finite and "
              "the mean of the last three at least 1% below the first.", "",
              "| case | precision | first loss | last loss | eval loss | skipped | tokens/s | MFU | seconds | result |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["train"]:
        losses = r.get("losses") or []
        first = f"{losses[0]:.3f}" if losses else "—"
        last = f"{losses[-1]:.3f}" if losses else "—"
        ev = f"{r['eval_loss']:.3f}" if r.get("eval_loss") is not None else "—"
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "—"
        tps = f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "—"
        result = "ok" if r["passed"] else f"**FAILED**: {r.get('error') or ('not finite' if not r['finite'] else 'loss did not fall')}"
        lines.append(f"| {r['name']} | {r.get('precision', '—')} | {first} | {last} | {ev} | "
                     f"{r.get('skipped_steps', '—')} | {tps} | {mfu} | {r['seconds']} | {result} |")
    for name in report["train_not_run"]:
        lines.append(f"| {name} | | | | | | | | | not run (time budget) |")
    if report["memory"]:
        lines += ["", "## Memory: the planner's estimate against the measured peak", "",
                  "The planner (`tools/plan_run.py`, docs/planning.md) per GPU, against torch's peak allocated "
                  "memory over the run (one model alone on the device).", "",
                  "| run | weights | gradients | optimizer | activations | planned total | measured peak | "
                  "measured / planned |", "|---|---|---|---|---|---|---|---|"]
        for r in report["memory"]:
            plan = r.get("planned_memory_gib")
            if plan is None:
                lines.append(f"| {r['name']} | | | | | | | **FAILED**: {r.get('error')} |")
                continue
            peak = r.get("peak_memory_gib")
            measured = f"{peak:.2f}" if peak is not None else "— (no GPU)"
            ratio = f"{peak / plan['total']:.2f}" if peak is not None else "—"
            lines.append(f"| {r['name']} | {plan['weights']:.2f} | {plan['gradients']:.2f} | {plan['optimizer']:.2f} | "
                         f"{plan['activations']:.2f} | {plan['total']:.2f} | {measured} | {ratio} |")
    for phase, bench in report["benchmarks"].items():
        lines += ["", f"## {phase}: {bench['preset']}, sequence {bench['seq_length']}, "
                  f"{bench['tokens_per_step']} tokens per step, {bench['precision']}", "",
                  f"{bench['rounds']} rounds × {bench['steps']} steps after {bench['warmup']} warm-up steps; "
                  f"overrides: {' '.join(bench['overrides']) or 'none'}", "", markdown_table(bench)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- prepare


def prepare(args: argparse.Namespace) -> int:
    """Download the wheels the GPU host lacks, for its Python and platform (no dependencies are
    resolved: each carried package's own needs are already on the host, KINDS.md)."""
    specs = []
    for dist in CARRIED:
        version = _version(dist)
        specs.append(f"{dist}=={version}" if version else dist)
    specs += args.also
    os.makedirs(args.wheels, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
               args.python_version, "--implementation", "cp", *[f"--platform={p}" for p in PLATFORMS],
               "-d", args.wheels, *specs]
    print("[gpu_check] " + " ".join(command[1:]), flush=True)
    rc = subprocess.run(command).returncode
    if rc == 0:
        wheels = sorted(w for w in os.listdir(args.wheels) if w.endswith(".whl"))
        size = sum(os.path.getsize(os.path.join(args.wheels, w)) for w in wheels) / 2**20
        print(f"[gpu_check] {args.wheels}: {len(wheels)} wheels, {size:.1f} MiB: {', '.join(wheels)}")
    return rc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("prepare", help="download the wheels the GPU host lacks (needs PyPI access)")
    pr.add_argument("--wheels", default=".whl", help="folder for the wheels (default .whl)")
    pr.add_argument("--python-version", default="3.12", help="the GPU host's Python (default 3.12)")
    pr.add_argument("--also", nargs="*", default=[], metavar="NAME==VERSION", help="more packages to carry")
    r = sub.add_parser("run", help="validate and measure on this machine's GPU (or --dry-run on CPU)")
    r.add_argument("--out", required=True, help="folder for the report, logs and benchmark results")
    r.add_argument("--wheels", help="install these wheels first when megatron-core is not importable")
    r.add_argument("--site", default="/tmp/megatron_gpas_site", help="where --wheels are installed")
    r.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU: checks the tool, measures nothing")
    r.add_argument("--budget-minutes", type=float, default=DEFAULT_BUDGET_MINUTES,
                   help=f"wall-clock budget of all phases (default {DEFAULT_BUDGET_MINUTES:g})")
    r.add_argument("--phases", nargs="+", choices=[ph.name for ph in PHASES], help="run only these phases")
    r.add_argument("--schemes", nargs="+", metavar="VARIANT", help="train only these variants (e.g. pre osp+muon)")
    t = sub.add_parser("_train", help=argparse.SUPPRESS)
    t.add_argument("spec")
    args = p.parse_args(argv)

    if args.command == "prepare":
        return prepare(args)
    if args.command == "_train":
        return train_phase(args.spec)
    missing = missing_modules()
    if missing and args.wheels:
        install_wheels(args.wheels, args.site)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [args.site, os.environ.get("PYTHONPATH")]))}
        argv_again = list(argv if argv is not None else sys.argv[1:])
        # start again with the installed packages importable (and without installing twice)
        return subprocess.run([sys.executable, os.path.abspath(__file__), *_without_wheels(argv_again)],
                              env=env).returncode
    if missing:
        print("error: missing Python packages: " + ", ".join(sorted(set(missing.values())))
              + ". On a machine with PyPI access run `python tools/gpu_check.py prepare --wheels .whl`, copy .whl "
              "here and pass `--wheels .whl` (docs/gpu-validation.md)", file=sys.stderr)
        return 2
    return run(args)


def _without_wheels(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--wheels":
            skip = True
            continue
        if a.startswith("--wheels="):
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(main())
