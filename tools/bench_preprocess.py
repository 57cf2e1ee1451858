#!/usr/bin/env python
r"""Benchmark: our preprocessing vs Megatron-Core's reference path, same input, same tokenizer.

    python tools/bench_preprocess.py --sizes 10M 1G --workers 1 2

For each input size (JSONL synthesized from the Shakespeare corpus of the demo assets,
repeated with variation), each tool and each worker count, one subprocess runs the
conversion while this process samples the resident memory of its whole process tree.
Reported per run: tokens/s per worker (processing time, after imports), tokens per
CPU-second of the process tree, and peak memory of the tree: the sum of each process's peak
RSS (which counts pages shared by forked workers once per process) and the peak of the
summed PSS (shared pages split between their users). The two tools' outputs
must be byte-identical, which is checked.

"reference" is Megatron-Core's IndexedDatasetBuilder driven the way Megatron-LM's
tools/preprocess_data.py drives it: a multiprocessing.Pool (default start method) with
``imap(encoder.encode, open(input), 32)`` over the lines, ``json.loads`` and ``encode``
in the workers, one builder with ``add_document`` in the main process. Both tools use
the same tokenizer object type (megatron_gpas.tokenizer), so only the pipelines differ.

Inputs and outputs go to --workdir (default /tmp/bench_preprocess); inputs are reused
between runs of the benchmark.
"""

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tools/: the shared CLI pieces
from preprocess_data import REPO_ROOT, parse_size  # noqa: E402  (also sets up sys.path, logs)

DEFAULT_CORPUS = os.path.join(REPO_ROOT, "demo_assets", "corpus.jsonl")
DEFAULT_TOKENIZER = os.path.join(REPO_ROOT, "demo_assets", "tokenizer.model")


# ----------------------------------------------------------------------------- input


def synthesize(corpus: str, size: int, path: str, seed: int = 0) -> None:
    """JSONL of ~size bytes: documents of consecutive corpus lines (a few hundred bytes to
    ~50 kB), each varied (word swaps, case, numbers) so that no two documents repeat."""
    lines = [line for doc in map(json.loads, open(corpus, encoding="utf-8"))
             for line in doc["text"].splitlines() if line.strip()]
    rng = random.Random(seed)
    tmp = path + ".tmp"
    written = n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        while written < size:
            start = rng.randrange(len(lines))
            count = min(int(rng.lognormvariate(3.5, 1.0)) + 2, 1200)
            doc = lines[start:start + count]
            for i in rng.sample(range(len(doc)), k=max(1, len(doc) // 4)):
                words = doc[i].split()
                if len(words) > 2 and rng.random() < 0.5:
                    a, b = rng.sample(range(len(words)), 2)
                    words[a], words[b] = words[b], words[a]
                elif rng.random() < 0.3:
                    words = [w.upper() for w in words]
                else:
                    words.append(str(rng.randrange(10_000)))
                doc[i] = " ".join(words)
            line = json.dumps({"id": n, "text": "\n".join(doc)}) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            n += 1
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the two tools (child side)


class _ReferenceEncoder:
    """Megatron-LM preprocess_data.py's Encoder, reduced to what this comparison needs."""

    def __init__(self, tokenizer_path: str, key: str = "text"):
        self.tokenizer_path, self.key = tokenizer_path, key

    def initializer(self):
        from megatron_gpas.tokenizer import load_tokenizer

        _ReferenceEncoder.tokenizer = load_tokenizer("auto", self.tokenizer_path)

    def encode(self, json_line):
        data = json.loads(json_line)
        doc_ids = _ReferenceEncoder.tokenizer.encode(data[self.key])
        lens = [len(doc_ids)]
        if doc_ids:  # --append-eod
            doc_ids.append(_ReferenceEncoder.tokenizer.eod_id)
            lens[-1] += 1
        return {self.key: doc_ids}, {self.key: lens}, len(json_line)


def run_reference(input_path: str, prefix: str, tokenizer_path: str, workers: int) -> dict:
    import multiprocessing

    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megatron_gpas.tokenizer import load_tokenizer

    vocab_size = load_tokenizer("auto", tokenizer_path).vocab_size
    encoder = _ReferenceEncoder(tokenizer_path)
    tokens = docs = 0
    with open(input_path, "r", encoding="utf-8") as fin:
        pool = multiprocessing.Pool(workers, initializer=encoder.initializer)
        encoded_docs = pool.imap(encoder.encode, fin, 32)
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(vocab_size))
        for doc, lens, _ in encoded_docs:
            builder.add_document(doc["text"], lens["text"])
            tokens += lens["text"][0]
            docs += 1
        builder.finalize(prefix + ".idx")
        pool.close()
        pool.join()
    return {"tokens": tokens, "documents": docs}


def run_ours(input_path: str, prefix: str, tokenizer_path: str, workers: int) -> dict:
    from megatron_gpas.data.preprocess import preprocess
    from megatron_gpas.tokenizer import load_tokenizer

    (report,) = preprocess([input_path], prefix, load_tokenizer("auto", tokenizer_path), workers=workers,
                           force=True, progress_interval_s=None)
    return {"tokens": report["tokens_written"], "documents": report["documents"]["written"]}


def child(args) -> None:
    import psutil
    from megatron.core.datasets import indexed_dataset  # noqa: F401  (import cost outside the timing)

    cpu_start = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    rss_start = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    run = run_ours if args.tool == "ours" else run_reference
    result = run(args.input, args.output, args.tokenizer, args.workers)
    result.update(seconds=time.perf_counter() - t0, cpu_before_start=cpu_start, rss_after_imports=rss_start)
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- driver (parent side)


def _proc_kb(pid: int, name: str, field: str) -> int:
    """A "Field:  N kB" line of /proc/PID/<name>, in bytes."""
    with open(f"/proc/{pid}/{name}") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def measure(tool: str, input_path: str, prefix: str, tokenizer: str, workers: int) -> dict:
    """Run one conversion in a subprocess and watch its process tree every 0.1 s.

    Peak RSS: the sum over the tree's processes of each one's peak resident set, which the
    kernel tracks (VmHWM), so short spikes between samples are not missed. Peak PSS (shared
    pages split between the processes that share them, so forked workers' shared pages count
    once): sampled, every 0.25 s at first and every 2 s later (reading it costs ~15 ms per
    process; sampling must not compete for the cores it measures). CPU: per process.
    """
    import psutil

    cmd = [sys.executable, os.path.abspath(__file__), "_child", "--tool", tool, "--input", input_path,
           "--output", prefix, "--tokenizer", tokenizer, "--workers", str(workers)]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    hwm: dict[int, int] = {}  # peak RSS per process of the tree
    cpu: dict[int, float] = {}  # last CPU time seen per process
    peak_pss = 0
    next_pss = start
    while proc.poll() is None:
        try:
            tree = [root] + root.children(recursive=True)
            for p in tree:
                hwm[p.pid] = _proc_kb(p.pid, "status", "VmHWM")
                t = p.cpu_times()
                cpu[p.pid] = t.user + t.system
            now = time.monotonic()
            if now >= next_pss:
                peak_pss = max(peak_pss, sum(_proc_kb(p.pid, "smaps_rollup", "Pss") for p in tree))
                next_pss = now + min(2.0, max(0.25, (now - start) / 10))
        except (psutil.Error, OSError, StopIteration):  # a process ended while being read
            pass
        time.sleep(0.1)
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} run failed (exit {proc.returncode}): {out}")
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    processing_cpu = sum(cpu.values()) - result["cpu_before_start"]
    return {
        "tool": tool, "workers": workers, "tokens": result["tokens"], "documents": result["documents"],
        "seconds": round(result["seconds"], 3),
        "tokens_per_s_per_worker": round(result["tokens"] / result["seconds"] / workers),
        "tokens_per_cpu_s": round(result["tokens"] / max(processing_cpu, 1e-9)),
        "peak_rss_mb": round(sum(hwm.values()) / 2**20, 1),
        "peak_pss_mb": round(peak_pss / 2**20, 1),
        "rss_after_imports_mb": round(result["rss_after_imports"] / 2**20, 1),
        "processes": len(hwm),
    }


def machine_info() -> dict:
    import psutil

    cpu = platform.processor() or "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "platform": platform.platform(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")
    c = sub.add_parser("_child")  # internal: one run, in its own process
    for flag in ("--tool", "--input", "--output", "--tokenizer"):
        c.add_argument(flag, required=True)
    c.add_argument("--workers", type=int, required=True)
    p.add_argument("--sizes", nargs="+", default=["10M"], type=parse_size, help="input sizes (default: 10M)")
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2], help="worker counts (default: 1 2)")
    p.add_argument("--repeats", type=int, default=1, help="runs per configuration; the fastest is kept")
    p.add_argument("--corpus", default=DEFAULT_CORPUS, help="JSONL with a 'text' key to synthesize from")
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="tokenizer file (default: the demo's 32k SP)")
    p.add_argument("--workdir", default="/tmp/bench_preprocess")
    p.add_argument("--results", help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.command == "_child":
        child(args)
        return 0
    for path, what in ((args.corpus, "corpus"), (args.tokenizer, "tokenizer")):
        if not os.path.isfile(path):
            print(f"error: {what} {path} not found; run `python tools/fetch_demo_assets.py` first", file=sys.stderr)
            return 1

    os.makedirs(args.workdir, exist_ok=True)
    info = machine_info()
    print(f"machine: {info}")
    results = []
    for size in args.sizes:
        input_path = os.path.join(args.workdir, f"input_{size}.jsonl")
        if not os.path.isfile(input_path):
            print(f"synthesizing {input_path} ({size / 1e6:,.0f} MB) ...", flush=True)
            synthesize(args.corpus, size, input_path)
        for workers in args.workers:
            outputs = {}
            for tool in ("reference", "ours"):
                prefix = os.path.join(args.workdir, f"out_{size}_{tool}_{workers}")
                best = min((measure(tool, input_path, prefix, args.tokenizer, workers) for _ in range(args.repeats)),
                           key=lambda r: r["seconds"])
                best.update(input_mb=round(os.path.getsize(input_path) / 1e6, 1))
                results.append(best)
                outputs[tool] = prefix
                print(json.dumps(best), flush=True)
            same = all(open(outputs["reference"] + s, "rb").read() == open(outputs["ours"] + s, "rb").read()
                       for s in (".bin", ".idx"))
            if not same:
                raise SystemExit(f"error: outputs differ for size {size}, {workers} workers")
            for tool in outputs.values():
                for suffix in (".bin", ".idx", ".report.json"):
                    if os.path.exists(tool + suffix):
                        os.remove(tool + suffix)

    print("\n| input | workers | tool | tokens/s per worker | tokens per CPU-s | peak RSS (tree) | peak PSS (tree) "
          "| seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['input_mb']:,.0f} MB | {r['workers']} | {r['tool']} | {r['tokens_per_s_per_worker']:,} | "
              f"{r['tokens_per_cpu_s']:,} | {r['peak_rss_mb']:,.0f} MB | {r['peak_pss_mb']:,.0f} MB | "
              f"{r['seconds']:,.1f} |")
    print("\nratio ours / reference (outputs byte-identical):")
    for ours in (r for r in results if r["tool"] == "ours"):
        ref = next(r for r in results if r["tool"] == "reference" and r["workers"] == ours["workers"]
                   and r["input_mb"] == ours["input_mb"])
        print(f"  {ours['input_mb']:,.0f} MB, {ours['workers']} workers: throughput per worker "
              f"{ours['tokens_per_s_per_worker'] / ref['tokens_per_s_per_worker']:.2f}x, per CPU-second "
              f"{ours['tokens_per_cpu_s'] / ref['tokens_per_cpu_s']:.2f}x, peak RSS "
              f"{ours['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x, "
              f"peak PSS {ours['peak_pss_mb'] / ref['peak_pss_mb']:.2f}x")
    if args.results:
        with open(args.results, "w") as f:
            json.dump({"machine": info, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
