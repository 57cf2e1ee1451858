#!/usr/bin/env python
"""The demo behind `make demo`: real corpus + real tokenizer -> indexed dataset -> Pre+GPAS pretraining.

    python tools/run_demo.py                 # the full demo (a few minutes on 2 CPU cores)
    python tools/run_demo.py --quick         # a tiny model for a few steps (tests, smoke checks)
    python tools/run_demo.py --steps 100 --out runs/demo100 train.seed=1   # extra key=value overrides

Steps (each one skipped when its output is already there):
  1. fetch the Shakespeare corpus and the 32k SentencePiece tokenizer (tools/fetch_demo_assets.py);
  2. tokenize demo_assets/corpus.jsonl into demo_assets/data/shakespeare_text_document.{bin,idx}
     (tools/preprocess_data.py, 2 workers);
  3. pretrain with examples/demo_pre_gpas.yaml (python -m megatron_gpas.pretrain), logging to
     --out (TensorBoard events, metrics.jsonl, loss.png, gates.png,
     activation_variance.png, train.log) and checkpointing to
     --out/checkpoints. precision=auto: BF16 on a GPU, fp32 on CPU;
  4. print where everything went and the loss numbers, and fail (exit 1) unless the final training
     loss is at least --min-drop nats below the first one.

A previous demo run in --out is replaced; a non-empty --out that is not a demo run is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "examples" / "demo_pre_gpas.yaml"
DATASET_NAME = "shakespeare_text_document"
MARKER = ".run_demo"  # marks a directory this script created, so it may replace it

# --quick: a tiny model and a short run, for tests (about 20 s of training on 2 cores).
QUICK_OVERRIDES = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.ffn_hidden_size=172",
    "train.seq_length=64",
    "train.micro_batch_size=4",
    "train.global_batch_size=8",
    "train.steps=40",
    "train.eval_interval=20",
    "train.eval_iters=2",
    "optim.lr=5.0e-3",
    "optim.warmup_steps=5",
    "logging.interval=5",
]

# Library warnings that say nothing about this run (no apex/TE on CPU, deprecations); they stay
# in the trainer's train.log but are kept off the console.
_NOISE = re.compile(
    r"site-packages/.*(Warning:|\.py:\d+\])"  # warnings.warn(...) / torch's C++ log lines
    r"|^WARNING megatron\.core\."  # Megatron's deprecation notices
)


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _banner(msg: str) -> None:
    _say(f"\n==> {msg}")


@contextlib.contextmanager
def _locked(directory: Path):
    """Serialize asset preparation between concurrent demo runs (e.g. a test and `make demo`)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as f:
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX)
        except ImportError:  # not POSIX: no locking
            pass
        yield


def _yaml_str(path: Path) -> str:
    """A path as an override value: plain when YAML reads it back as the same string, else quoted."""
    text = str(path)
    return text if re.fullmatch(r"/?[A-Za-z0-9_][A-Za-z0-9_./-]*", text) else json.dumps(text)  # JSON is YAML


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, cwd=REPO_ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"error: {what} failed (exit {proc.returncode}): {' '.join(cmd)}")


def fetch_assets(assets: Path) -> None:
    _run([sys.executable, str(REPO_ROOT / "tools" / "fetch_demo_assets.py"), "--out", str(assets)],
         "fetching the demo assets")


def preprocess(assets: Path, workers: int) -> Path:
    """Tokenize corpus.jsonl once; written under a temporary prefix and renamed into place."""
    data_dir = assets / "data"
    prefix = data_dir / DATASET_NAME
    if prefix.with_suffix(".bin").is_file() and prefix.with_suffix(".idx").is_file():
        _say(f"dataset: {prefix}.{{bin,idx}} exist, skipping")
        return prefix
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = data_dir / f".tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    try:
        _run([sys.executable, str(REPO_ROOT / "tools" / "preprocess_data.py"),
              "--input", str(assets / "corpus.jsonl"),
              "--output-prefix", str(tmp_dir / DATASET_NAME),
              "--tokenizer-path", str(assets / "tokenizer.model"),
              "--workers", str(workers)], "preprocessing the corpus")
        report_path = tmp_dir / f"{DATASET_NAME}.report.json"
        if report_path.is_file():  # name the final files in the report
            report = json.loads(report_path.read_text())
            report.update(output_prefix=str(prefix), bin_path=f"{prefix}.bin", idx_path=f"{prefix}.idx")
            report_path.write_text(json.dumps(report, indent=2) + "\n")
        # .idx last: both files present means the dataset is complete.
        for suffix in (".report.json", ".bin", ".idx"):
            src = tmp_dir / f"{DATASET_NAME}{suffix}"
            if src.exists():
                os.replace(src, data_dir / f"{DATASET_NAME}{suffix}")
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    _say(f"dataset: {prefix}.{{bin,idx}} ready")
    return prefix


def prepare_out_dir(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise SystemExit(f"error: --out {out} exists and is not a directory")
        if any(out.iterdir()):
            if not (out / MARKER).exists():
                raise SystemExit(f"error: --out {out} is not empty and was not written by run_demo.py; "
                                 "choose another directory")
            _say(f"removing the previous demo run in {out}")
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by tools/run_demo.py; replaced by the next demo run\n")


def pretrain(config: Path, overrides: list[str], out: Path) -> int:
    """Run the trainer (it writes its whole console, warnings included, to out/train.log); the
    console here shows it without library warning noise."""
    cmd = [sys.executable, "-m", "megatron_gpas.pretrain", "--config", str(config), *overrides]
    _say("$ " + shlex.join(["python", *cmd[1:]]))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    hidden_continuation = False
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", bufsize=1)
    try:
        for line in proc.stdout:
            if _NOISE.search(line):
                hidden_continuation = True
                continue
            # the source line that Python prints under a warning is indented
            if hidden_continuation and line.startswith("  "):
                continue
            hidden_continuation = False
            sys.stdout.write(line)
            sys.stdout.flush()
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        raise


def read_metrics(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(out: Path, min_drop: float) -> tuple[dict, bool]:
    records = read_metrics(out / "metrics.jsonl")
    train = [r for r in records if "train/loss" in r]
    evals = [r for r in records if "eval/loss" in r]
    if not train:
        raise SystemExit(f"error: no train/loss in {out / 'metrics.jsonl'}")
    first, last = train[0], train[-1]
    summary = {
        "first_step": first["step"], "first_train_loss": first["train/loss"],
        "final_step": last["step"], "final_train_loss": last["train/loss"],
        "final_eval_loss": evals[-1]["eval/loss"] if evals else None,
        "final_eval_ppl": evals[-1]["eval/ppl"] if evals else None,
        "tokens_per_s": last.get("perf/tokens_per_s"),
    }
    summary["loss_drop"] = summary["first_train_loss"] - summary["final_train_loss"]
    ok = math.isfinite(summary["final_train_loss"]) and summary["loss_drop"] >= min_drop
    summary["passed"] = ok
    summary["min_drop"] = min_drop
    return summary, ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, help="training steps (default: the config's; with --quick: 40)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "demo",
                   help="run directory: TensorBoard events, metrics.jsonl, PNGs, checkpoints (default: runs/demo)")
    p.add_argument("--quick", action="store_true", help="a tiny model and a short run (for tests)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="training config (default: %(default)s)")
    p.add_argument("--assets", type=Path, default=REPO_ROOT / "demo_assets",
                   help="where the corpus, tokenizer and indexed dataset live (default: demo_assets/)")
    p.add_argument("--workers", type=int, default=2, help="tokenizer processes for preprocessing (default: 2)")
    p.add_argument("--min-drop", type=float, default=1.0,
                   help="fail unless final train loss <= first train loss - this (nats; default: 1.0)")
    p.add_argument("overrides", nargs="*", help="extra section.key=value overrides for the trainer (applied last)")
    args = p.parse_args(argv)

    started = time.monotonic()
    out = args.out.resolve()
    assets = args.assets.resolve()
    timings: dict[str, float] = {}

    _banner(f"1/3 demo assets in {assets}")
    t0 = time.monotonic()
    with _locked(assets):
        fetch_assets(assets)
        timings["fetch"] = time.monotonic() - t0
        _banner("2/3 indexed dataset")
        t0 = time.monotonic()
        prefix = preprocess(assets, args.workers)
        timings["preprocess"] = time.monotonic() - t0

    _banner(f"3/3 pretraining ({args.config.name}{', quick' if args.quick else ''}) -> {out}")
    prepare_out_dir(out)
    overrides = [
        f"data.paths=[{_yaml_str(prefix)}]",
        "data.tokenizer.kind=sentencepiece",
        f"data.tokenizer.path={_yaml_str(assets / 'tokenizer.model')}",
        f"logging.dir={_yaml_str(out)}",
        f"checkpoint.save={_yaml_str(out / 'checkpoints')}",
    ]
    if args.quick:
        overrides += QUICK_OVERRIDES
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
        if args.steps <= 100:  # keep warmup (< steps) and eval cadence sensible for short runs
            overrides += [f"optim.warmup_steps={max(1, args.steps // 8)}",
                          f"train.eval_interval={max(1, args.steps // 2)}"]
    overrides += args.overrides
    t0 = time.monotonic()
    rc = pretrain(args.config, overrides, out)
    timings["train"] = time.monotonic() - t0
    if rc != 0:
        _say(f"\nerror: training failed (exit {rc}); full log: {out / 'train.log'}")
        return rc

    summary, ok = summarize(out, args.min_drop)
    timings["total"] = time.monotonic() - started
    summary["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    events = sorted(out.glob("events.out.tfevents.*"))
    ckpt_root = out / "checkpoints"
    latest = (ckpt_root / "latest").read_text().strip() if (ckpt_root / "latest").is_file() else None
    rel = os.path.relpath(out, Path.cwd())
    tb_arg = rel if not rel.startswith("..") else str(out)
    _say("\n" + "=" * 78)
    _say("Demo finished. Outputs:")
    _say(f"  TensorBoard dir  {out}   ({len(events)} event file(s))")
    _say(f"                   view: tensorboard --logdir {tb_arg}")
    _say(f"  metrics          {out / 'metrics.jsonl'}")
    _say(f"  loss curve       {out / 'loss.png'}")
    _say(f"  GPAS gates       {out / 'gates.png'}")
    _say(f"  layer variance   {out / 'activation_variance.png'}")
    _say(f"  checkpoint       {ckpt_root / latest if latest else '(none written)'}")
    _say(f"  console log      {out / 'train.log'}")
    _say(f"  dataset          {prefix}.{{bin,idx}}   tokenizer {assets / 'tokenizer.model'}")
    _say("Loss (nats/token):")
    _say(f"  first train loss {summary['first_train_loss']:.4f} (step {summary['first_step']})")
    _say(f"  final train loss {summary['final_train_loss']:.4f} (step {summary['final_step']})")
    if summary["final_eval_loss"] is not None:
        _say(f"  final eval loss  {summary['final_eval_loss']:.4f}   ppl {summary['final_eval_ppl']:.2f}")
    _say("Time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    if not ok:
        _say(f"FAIL: the training loss fell by {summary['loss_drop']:.3f} nats; expected at least {args.min_drop}")
        return 1
    _say(f"OK: the training loss fell by {summary['loss_drop']:.2f} nats")
    return 0


if __name__ == "__main__":
    sys.exit(main())
